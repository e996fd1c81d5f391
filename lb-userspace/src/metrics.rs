//! Prometheus metrics: a snapshot of what the agent knows, rendered in the text exposition
//! format (version 0.0.4), and a minimal HTTP endpoint serving it.
//!
//! The kernel's counters are mirrored, not incremented here, so the snapshot is rendered
//! directly rather than through an in-process counter registry.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::counters::CounterSnapshot;

/// Traffic of one VIP or backend, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (as received).
    pub bytes: u64,
    /// Flows newly assigned a backend.
    pub new_flows: u64,
}

/// One backend's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendMetrics {
    /// The backend's address, as a label.
    pub address: String,
    /// Passing its health checks (or unchecked).
    pub up: bool,
    /// Its traffic.
    pub traffic: Traffic,
    /// Latency of its latest health check, if checked.
    pub check_latency: Option<Duration>,
}

/// One VIP's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VipMetrics {
    /// The VIP's name, as a label.
    pub name: String,
    /// Its traffic.
    pub traffic: Traffic,
    /// Its backends.
    pub backends: Vec<BackendMetrics>,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Data-path counters by event.
    pub counters: CounterSnapshot,
    /// Per-VIP and per-backend traffic and health.
    pub vips: Vec<VipMetrics>,
    /// Duration of the latest reconcile.
    pub last_reconcile: Option<Duration>,
    /// Reconciles done since start (start, reloads, health changes).
    pub reconciles: u64,
    /// Configuration reloads refused (invalid file or failed apply).
    pub reloads_refused: u64,
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders a snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "xlb_datapath_events_total",
        "counter",
        "Events counted by the XDP balancer, by event (see the README's counter table).",
    );
    for &c in lb_common::counters::Counter::ALL {
        let _ = writeln!(
            out,
            "xlb_datapath_events_total{{event=\"{}\"}} {}",
            c.name(),
            s.counters.get(c)
        );
    }
    let traffic = [
        ("packets_total", "Packets forwarded", 0),
        ("bytes_total", "Bytes forwarded, as received", 1),
        ("new_flows_total", "Flows newly assigned a backend", 2),
    ];
    let pick = |t: &Traffic, i: usize| match i {
        0 => t.packets,
        1 => t.bytes,
        _ => t.new_flows,
    };
    for (suffix, help, i) in traffic {
        let name = format!("xlb_vip_{suffix}");
        header(&mut out, &name, "counter", &format!("{help}, per VIP."));
        for v in &s.vips {
            let _ = writeln!(
                out,
                "{name}{{vip=\"{}\"}} {}",
                label(&v.name),
                pick(&v.traffic, i)
            );
        }
        let name = format!("xlb_backend_{suffix}");
        header(&mut out, &name, "counter", &format!("{help}, per backend."));
        for v in &s.vips {
            for b in &v.backends {
                let _ = writeln!(
                    out,
                    "{name}{{vip=\"{}\",backend=\"{}\"}} {}",
                    label(&v.name),
                    label(&b.address),
                    pick(&b.traffic, i)
                );
            }
        }
    }
    header(
        &mut out,
        "xlb_backend_up",
        "gauge",
        "1 when the backend passes its health checks (or has none), else 0.",
    );
    for v in &s.vips {
        for b in &v.backends {
            let _ = writeln!(
                out,
                "xlb_backend_up{{vip=\"{}\",backend=\"{}\"}} {}",
                label(&v.name),
                label(&b.address),
                u8::from(b.up)
            );
        }
    }
    header(
        &mut out,
        "xlb_health_check_latency_seconds",
        "gauge",
        "Duration of the backend's latest health check.",
    );
    for v in &s.vips {
        for b in &v.backends {
            if let Some(l) = b.check_latency {
                let _ = writeln!(
                    out,
                    "xlb_health_check_latency_seconds{{vip=\"{}\",backend=\"{}\"}} {}",
                    label(&v.name),
                    label(&b.address),
                    l.as_secs_f64()
                );
            }
        }
    }
    header(
        &mut out,
        "xlb_reconcile_duration_seconds",
        "gauge",
        "Duration of the latest reconcile (plan and map writes).",
    );
    if let Some(d) = s.last_reconcile {
        let _ = writeln!(out, "xlb_reconcile_duration_seconds {}", d.as_secs_f64());
    }
    header(
        &mut out,
        "xlb_reconciles_total",
        "counter",
        "Reconciles since start.",
    );
    let _ = writeln!(out, "xlb_reconciles_total {}", s.reconciles);
    header(
        &mut out,
        "xlb_config_reloads_refused_total",
        "counter",
        "Configuration reloads refused (invalid file or failed apply).",
    );
    let _ = writeln!(
        out,
        "xlb_config_reloads_refused_total {}",
        s.reloads_refused
    );
    out
}

/// A scrape waiting for its text: the serving loop asks the agent's main loop (which owns the
/// maps) and answers with what it gets back.
pub type ScrapeRequest = oneshot::Sender<String>;

/// Connections served at once; more wait in the listen backlog. The endpoint may listen on
/// the network, where anyone can connect: unbounded, idle connections would take every
/// descriptor the agent has, and its health checks (which need sockets) would then fail and
/// take backends down.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves `GET /metrics` on `listen`, asking `scrapes` for the text of each scrape. Anything
/// else gets 404. Runs until the agent's main loop is gone; a failed accept is logged at most
/// every 10 seconds and retried.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<ScrapeRequest>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut warned: Option<std::time::Instant> = None;
    let mut failures = 0u64;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if scrapes.is_closed() {
                    return;
                }
                failures += 1;
                if warned.is_none_or(|t| t.elapsed() >= crate::logging::REPEAT_WARNING_EVERY) {
                    tracing::warn!(
                        failures,
                        "metrics endpoint: accepting connections fails ({e}); retrying"
                    );
                    warned = Some(std::time::Instant::now());
                    failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = [0u8; 1024];
            // A scrape request fits in one read; a slow or silent client is dropped.
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = read else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics ") {
                let (tx, rx) = oneshot::channel();
                if scrapes.send(tx).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(text) => ("200 OK", text),
                    Err(_) => return,
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener (a separate step so a bad address fails the agent's start).
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

#[cfg(test)]
mod tests {
    use lb_common::counters::Counter;

    use super::*;

    #[test]
    fn renders_every_family_with_help_type_and_labels() {
        let s = Snapshot {
            counters: CounterSnapshot::from_pairs([(Counter::FwdEncapV4, 7)]),
            vips: vec![VipMetrics {
                name: "web".into(),
                traffic: Traffic {
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                },
                backends: vec![BackendMetrics {
                    address: "10.0.0.1".into(),
                    up: false,
                    traffic: Traffic {
                        packets: 4,
                        bytes: 400,
                        new_flows: 1,
                    },
                    check_latency: Some(Duration::from_millis(3)),
                }],
            }],
            last_reconcile: Some(Duration::from_millis(12)),
            reconciles: 3,
            reloads_refused: 1,
        };
        let text = render(&s);
        for want in [
            "# TYPE xlb_datapath_events_total counter",
            "xlb_datapath_events_total{event=\"fwd_encap_v4\"} 7",
            "xlb_datapath_events_total{event=\"rx_packets\"} 0",
            "xlb_vip_packets_total{vip=\"web\"} 10",
            "xlb_vip_bytes_total{vip=\"web\"} 1000",
            "xlb_vip_new_flows_total{vip=\"web\"} 2",
            "xlb_backend_packets_total{vip=\"web\",backend=\"10.0.0.1\"} 4",
            "xlb_backend_up{vip=\"web\",backend=\"10.0.0.1\"} 0",
            "xlb_health_check_latency_seconds{vip=\"web\",backend=\"10.0.0.1\"} 0.003",
            "xlb_reconcile_duration_seconds 0.012",
            "xlb_reconciles_total 3",
            "xlb_config_reloads_refused_total 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Every sample line belongs to a family announced before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
