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

use crate::{counters::CounterSnapshot, health::CheckDurations};

/// Upper bounds (`le`) of the health-check duration buckets: from 0.5 ms, a connect on the
/// same segment, to 5 s, beyond any sensible check timeout; the steps are 1-2.5-5 per decade so
/// a quantile estimate is within a factor of 2.5 everywhere in between.
pub const HEALTH_CHECK_BUCKETS: [Duration; 13] = [
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_micros(2500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(5),
];

/// A Prometheus histogram of durations over fixed buckets: a count per bucket, the sum and the
/// count of all observations. Pure (no clock, no lock): the owner records into it and
/// [`render`] writes it out.
///
/// Bounds and the sum are [`Duration`]s, not floats, so a bound is compared exactly (an
/// observation equal to a bound lands in that bucket, as `le` means "less than or equal") and
/// the sum does not drift however many checks are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    bounds: &'static [Duration],
    /// Observations per bucket, not cumulative: index `i` counts those above `bounds[i - 1]`
    /// and at most `bounds[i]`; the extra last one counts those above every bound (`+Inf`).
    counts: Vec<u64>,
    sum: Duration,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    ///
    /// # Panics
    /// If `bounds` is not strictly ascending: buckets would overlap, which is a programming
    /// error in the constant, not something to carry on with.
    pub fn new(bounds: &'static [Duration]) -> Self {
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be strictly ascending: {bounds:?}"
        );
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: Duration::ZERO,
        }
    }

    /// An empty histogram over [`HEALTH_CHECK_BUCKETS`].
    pub fn health_check() -> Self {
        Self::new(&HEALTH_CHECK_BUCKETS)
    }

    /// A histogram from per-bucket (not cumulative) counts, the last one for `+Inf`, and the
    /// sum: for owners that count into atomics (the gateway, per request) and build the
    /// histogram only when rendering.
    ///
    /// # Panics
    /// As [`Histogram::new`], and if `counts` does not have one entry per bound plus one.
    pub(crate) fn from_counts(
        bounds: &'static [Duration],
        counts: Vec<u64>,
        sum: Duration,
    ) -> Self {
        let mut h = Self::new(bounds);
        assert_eq!(
            counts.len(),
            h.counts.len(),
            "one count per bucket and +Inf"
        );
        h.counts = counts;
        h.sum = sum;
        h
    }

    /// The bucket an observation of `value` falls in (an index into the per-bucket counts of
    /// [`Histogram::from_counts`]).
    pub(crate) fn bucket_of(bounds: &[Duration], value: Duration) -> usize {
        bounds.partition_point(|bound| *bound < value)
    }

    /// Records one observation.
    pub fn observe(&mut self, value: Duration) {
        // The first bound at or above the value: bounds are inclusive.
        let bucket = Self::bucket_of(self.bounds, value);
        self.counts[bucket] = self.counts[bucket].saturating_add(1);
        self.sum = self.sum.saturating_add(value);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |total, n| total.saturating_add(*n))
    }

    /// Sum of the observations.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// The buckets as Prometheus exposes them: each bound (`None` for `+Inf`, last) with the
    /// number of observations at or below it.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        let bounds = self.bounds.iter().copied().map(Some).chain([None]);
        bounds.zip(&self.counts).scan(0u64, |total, (bound, n)| {
            *total = total.saturating_add(*n);
            Some((bound, *total))
        })
    }
}

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
    /// Durations of all its health checks by result, if it has a check.
    pub check_durations: Option<CheckDurations>,
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
    /// Its regions, when it lists a remote one.
    pub regions: Option<VipRegionMetrics>,
}

/// A VIP's multi-region state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VipRegionMetrics {
    /// Per region in priority order: (name, healthy share, share of new flows).
    pub levels: Vec<(String, f64, f64)>,
    /// The active region (highest-priority one taking new flows).
    pub active: String,
    /// Every region is down (last resort).
    pub last_resort: bool,
    /// Changes of the split since start.
    pub transitions: u64,
}

/// A remote region's capacity probes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteRegionMetrics {
    /// Region name.
    pub name: String,
    /// Its probes pass (rise/fall applied).
    pub up: bool,
    /// Round-trip time of the latest successful probe.
    pub rtt: Option<Duration>,
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
    /// Remote regions probed.
    pub remote_regions: Vec<RemoteRegionMetrics>,
}

/// Escapes a label value (backslash, double quote, newline).
pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes a family's `# HELP` and `# TYPE` lines.
pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
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
        "Duration of the backend's latest health check only (see \
         xlb_health_check_duration_seconds for every check).",
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
    render_check_durations(&mut out, s);
    render_regions(&mut out, s);
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

/// The multi-region families: per VIP and region the healthy share and the share of new flows,
/// the active region, the last-resort flag and transitions; per remote region its probe state.
fn render_regions(out: &mut String, s: &Snapshot) {
    let with = || s.vips.iter().filter_map(|v| Some((v, v.regions.as_ref()?)));
    header(
        out,
        "xlb_region_healthy_share",
        "gauge",
        "Healthy share of a VIP's capacity in each of its regions (a remote region's as its \
         agent reports it, 0 while its probes fail).",
    );
    for (v, r) in with() {
        for (name, share, _) in &r.levels {
            let _ = writeln!(
                out,
                "xlb_region_healthy_share{{vip=\"{}\",region=\"{}\"}} {share}",
                label(&v.name),
                label(name)
            );
        }
    }
    header(
        out,
        "xlb_region_load",
        "gauge",
        "Share of a VIP's new flows each of its regions takes.",
    );
    for (v, r) in with() {
        for (name, _, load) in &r.levels {
            let _ = writeln!(
                out,
                "xlb_region_load{{vip=\"{}\",region=\"{}\"}} {load}",
                label(&v.name),
                label(name)
            );
        }
    }
    header(
        out,
        "xlb_region_active",
        "gauge",
        "1 for the VIP's active region (the highest-priority one taking new flows), else 0.",
    );
    for (v, r) in with() {
        for (name, _, _) in &r.levels {
            let _ = writeln!(
                out,
                "xlb_region_active{{vip=\"{}\",region=\"{}\"}} {}",
                label(&v.name),
                label(name),
                u8::from(*name == r.active)
            );
        }
    }
    header(
        out,
        "xlb_region_last_resort",
        "gauge",
        "1 while every region of the VIP is down and its new flows go to the last resort.",
    );
    for (v, r) in with() {
        let _ = writeln!(
            out,
            "xlb_region_last_resort{{vip=\"{}\"}} {}",
            label(&v.name),
            u8::from(r.last_resort)
        );
    }
    header(
        out,
        "xlb_region_transitions_total",
        "counter",
        "Changes of a VIP's split of new flows over its regions (failovers and failbacks).",
    );
    for (v, r) in with() {
        let _ = writeln!(
            out,
            "xlb_region_transitions_total{{vip=\"{}\"}} {}",
            label(&v.name),
            r.transitions
        );
    }
    header(
        out,
        "xlb_remote_region_up",
        "gauge",
        "1 while a remote region's capacity probes (through the tunnel) pass, else 0.",
    );
    for r in &s.remote_regions {
        let _ = writeln!(
            out,
            "xlb_remote_region_up{{region=\"{}\"}} {}",
            label(&r.name),
            u8::from(r.up)
        );
    }
    header(
        out,
        "xlb_remote_region_probe_rtt_seconds",
        "gauge",
        "Round-trip time of the latest successful capacity probe of a remote region.",
    );
    for r in &s.remote_regions {
        if let Some(rtt) = r.rtt {
            let _ = writeln!(
                out,
                "xlb_remote_region_probe_rtt_seconds{{region=\"{}\"}} {}",
                label(&r.name),
                rtt.as_secs_f64()
            );
        }
    }
}

/// The `xlb_health_check_duration_seconds` histogram family: both results of every checked
/// backend, the empty one included, so a series exists from the first scrape and `rate()` over
/// it starts at zero instead of at its first failure.
fn render_check_durations(out: &mut String, s: &Snapshot) {
    const NAME: &str = "xlb_health_check_duration_seconds";
    header(
        out,
        NAME,
        "histogram",
        "Duration of every health check, by result (a check that timed out takes about its \
         timeout and counts as fail).",
    );
    for v in &s.vips {
        for b in &v.backends {
            let Some(durations) = &b.check_durations else {
                continue;
            };
            for (result, histogram) in [("ok", &durations.ok), ("fail", &durations.fail)] {
                let labels = format!(
                    "vip=\"{}\",backend=\"{}\",result=\"{result}\"",
                    label(&v.name),
                    label(&b.address)
                );
                write_histogram(out, NAME, &labels, histogram);
            }
        }
    }
}

/// Writes one labelled histogram's `_bucket`, `_sum` and `_count` samples (in seconds);
/// `labels` is the already escaped `k="v",...` list, without braces.
pub(crate) fn write_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    for (bound, count) in histogram.cumulative() {
        let le = bound.map_or_else(|| "+Inf".to_owned(), |d| d.as_secs_f64().to_string());
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_sum{{{labels}}} {}",
        histogram.sum().as_secs_f64()
    );
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count());
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
            remote_regions: Vec::new(),
            counters: CounterSnapshot::from_pairs([(Counter::FwdEncapV4, 7)]),
            vips: vec![VipMetrics {
                regions: None,
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
                    check_durations: None,
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
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_value_on_a_bound_counts_in_that_bucket_and_one_above_in_the_next() {
        let mut h = Histogram::health_check();
        h.observe(ms(1));
        let c: Vec<_> = h.cumulative().collect();
        assert_eq!(c[0], (Some(us(500)), 0));
        assert_eq!(c[1], (Some(ms(1)), 1), "le is inclusive");

        let mut h = Histogram::health_check();
        h.observe(ms(1) + Duration::from_nanos(1));
        let c: Vec<_> = h.cumulative().collect();
        assert_eq!(c[1], (Some(ms(1)), 0));
        assert_eq!(c[2], (Some(us(2500)), 1));

        let mut h = Histogram::health_check();
        h.observe(Duration::ZERO);
        assert_eq!(h.cumulative().next(), Some((Some(us(500)), 1)));
    }

    #[test]
    fn buckets_are_cumulative_and_end_with_inf_equal_to_the_count() {
        let mut h = Histogram::health_check();
        for d in [
            us(100),
            us(500),
            ms(3),
            ms(3),
            ms(100),
            ms(101),
            ms(5000),
            ms(7000),
        ] {
            h.observe(d);
        }
        let c: Vec<(Option<Duration>, u64)> = h.cumulative().collect();
        let want = [
            (Some(us(500)), 2),
            (Some(ms(1)), 2),
            (Some(us(2500)), 2),
            (Some(ms(5)), 4),
            (Some(ms(10)), 4),
            (Some(ms(25)), 4),
            (Some(ms(50)), 4),
            (Some(ms(100)), 5),
            (Some(ms(250)), 6),
            (Some(ms(500)), 6),
            (Some(ms(1000)), 6),
            (Some(ms(2500)), 6),
            (Some(ms(5000)), 7),
            (None, 8),
        ];
        assert_eq!(c, want);
        assert_eq!(h.count(), 8);
        assert_eq!(h.sum(), us(100) + us(500) + ms(6) + ms(201) + ms(12_000));
    }

    #[test]
    fn an_empty_histogram_has_every_bucket_at_zero() {
        let h = Histogram::health_check();
        assert_eq!(h.count(), 0);
        assert_eq!(h.sum(), Duration::ZERO);
        assert_eq!(h.cumulative().count(), HEALTH_CHECK_BUCKETS.len() + 1);
        assert!(h.cumulative().all(|(_, n)| n == 0));
    }

    #[test]
    #[should_panic(expected = "strictly ascending")]
    fn unordered_bounds_are_refused() {
        static BAD: [Duration; 3] = [
            Duration::from_millis(1),
            Duration::from_millis(5),
            Duration::from_millis(5),
        ];
        let _ = Histogram::new(&BAD);
    }

    // A checker of the Prometheus text format (0.0.4), strict enough to catch what a scraper
    // would reject or misread.

    /// One parsed sample line: name, labels in order, value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn is_label_name(name: &str) -> bool {
        is_metric_name(name) && !name.contains(':')
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut rest = &line[end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                match chars.peek() {
                    Some((i, '}')) => {
                        rest = &body[i + 1..];
                        break;
                    }
                    None => return Err("unclosed label set".into()),
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if !is_label_name(&key) {
                    return Err(format!("bad label name {key:?}"));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(format!("label {key} value is not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        },
                        Some('\n') | None => return Err("unterminated label value".into()),
                        Some(c) => value.push(c),
                    }
                }
                if labels.iter().any(|(k, _)| *k == key) {
                    return Err(format!("label {key} twice"));
                }
                labels.push((key, value));
                if let Some((_, ',')) = chars.peek() {
                    chars.next();
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value = value.split(' ').next().unwrap_or_default();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
        };
        Ok((name.to_owned(), labels, value))
    }

    /// Checks `text` line by line: HELP and TYPE at most once per family and before its
    /// samples, a family's samples together, sample names that fit the family's type, no series
    /// twice, and for histograms: `le` on every bucket, bounds ascending, counts cumulative, a
    /// last `+Inf` bucket equal to `_count`, and a `_sum`.
    fn check_exposition(text: &str) -> Result<(), String> {
        use std::collections::{BTreeMap, HashMap, HashSet};
        let mut help = HashSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut finished = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        // Per histogram series (family and labels without le): buckets, sum, count.
        type Key = (String, Vec<(String, String)>);
        let mut buckets: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
        let mut sums: HashSet<Key> = HashSet::new();
        let mut counts: HashMap<Key, f64> = HashMap::new();
        let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), String> {
            if current.as_deref() != Some(family) {
                if finished.contains(family) {
                    return Err(format!("{family} appears in two places"));
                }
                if let Some(previous) = current.take() {
                    finished.insert(previous);
                }
                *current = Some(family.to_owned());
            }
            Ok(())
        };
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let family = rest.split(' ').next().unwrap_or_default();
                if !is_metric_name(family) || !help.insert(family.to_owned()) {
                    return Err(at(format!("HELP for {family} twice or badly named")));
                }
                if types.contains_key(family) {
                    return Err(at("HELP after TYPE".into()));
                }
                enter(family, &mut current).map_err(at)?;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split(' ');
                let family = words.next().unwrap_or_default().to_owned();
                let kind = words.next().unwrap_or_default().to_owned();
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind.as_str())
                {
                    return Err(at(format!("unknown type {kind:?}")));
                }
                enter(&family, &mut current).map_err(at)?;
                if types.insert(family, kind).is_some() {
                    return Err(at("TYPE twice".into()));
                }
            } else if line.starts_with('#') {
                continue;
            } else {
                let (name, mut labels, value) = parse_sample(line).map_err(at)?;
                let family = current
                    .clone()
                    .ok_or_else(|| at("sample before any TYPE".into()))?;
                let kind = types
                    .get(&family)
                    .ok_or_else(|| at(format!("{family} has no TYPE")))?;
                if !series.insert((name.clone(), labels.clone())) {
                    return Err(at("series twice".into()));
                }
                if kind != "histogram" {
                    if name != family {
                        return Err(at(format!("sample {name} under family {family}")));
                    }
                    continue;
                }
                let suffix = name
                    .strip_prefix(family.as_str())
                    .ok_or_else(|| at(format!("sample {name} under family {family}")))?;
                let le = labels
                    .iter()
                    .position(|(k, _)| k == "le")
                    .map(|i| labels.remove(i));
                let key = (family.clone(), labels);
                match (suffix, le) {
                    ("_bucket", Some((_, le))) => {
                        let bound = match le.as_str() {
                            "+Inf" => f64::INFINITY,
                            b => b.parse().map_err(|_| at(format!("bad le {b:?}")))?,
                        };
                        let list = buckets.entry(key).or_default();
                        if let Some(&(last_bound, last_count)) = list.last() {
                            if bound <= last_bound {
                                return Err(at("bucket bounds not ascending".into()));
                            }
                            if value < last_count {
                                return Err(at("bucket counts not cumulative".into()));
                            }
                        }
                        list.push((bound, value));
                    }
                    ("_sum", None) => {
                        sums.insert(key);
                    }
                    ("_count", None) => {
                        counts.insert(key, value);
                    }
                    _ => return Err(at(format!("{name} does not fit histogram {family}"))),
                }
            }
        }
        for (key, list) in &buckets {
            let inf = match list.last() {
                Some(&(b, count)) if b == f64::INFINITY => count,
                _ => return Err(format!("{key:?}: no +Inf bucket")),
            };
            match counts.get(key) {
                Some(&count) if count == inf => {}
                other => return Err(format!("{key:?}: +Inf is {inf}, _count is {other:?}")),
            }
            if !sums.contains(key) {
                return Err(format!("{key:?}: no _sum"));
            }
        }
        if let Some(key) = counts.keys().find(|k| !buckets.contains_key(*k)) {
            return Err(format!("{key:?}: _count without buckets"));
        }
        Ok(())
    }

    fn checked_backend(address: &str, oks: &[u64], fails: &[u64]) -> BackendMetrics {
        let mut durations = CheckDurations::default();
        for &m in oks {
            durations.record(true, us(m));
        }
        for &m in fails {
            durations.record(false, us(m));
        }
        BackendMetrics {
            address: address.into(),
            up: true,
            traffic: Traffic::default(),
            check_latency: Some(us(*oks.last().unwrap_or(&0))),
            check_durations: Some(durations),
        }
    }

    #[test]
    fn rendered_histograms_pass_the_text_format_check() {
        let s = Snapshot {
            remote_regions: Vec::new(),
            vips: vec![
                VipMetrics {
                    regions: None,
                    name: "web".into(),
                    traffic: Traffic::default(),
                    backends: vec![
                        checked_backend("10.0.0.1", &[300, 1000, 1200], &[100_000]),
                        checked_backend("10.0.0.2", &[], &[]),
                        BackendMetrics {
                            address: "10.0.0.3".into(),
                            ..BackendMetrics::default()
                        },
                    ],
                },
                VipMetrics {
                    regions: None,
                    name: "dns \"v6\"".into(),
                    traffic: Traffic::default(),
                    backends: vec![checked_backend("2001:db8::1", &[7_000_000], &[])],
                },
            ],
            ..Snapshot::default()
        };
        let text = render(&s);
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let series = r#"vip="web",backend="10.0.0.1",result="ok""#;
        for want in [
            "# TYPE xlb_health_check_duration_seconds histogram".to_owned(),
            format!("xlb_health_check_duration_seconds_bucket{{{series},le=\"0.0005\"}} 1"),
            format!("xlb_health_check_duration_seconds_bucket{{{series},le=\"0.001\"}} 2"),
            format!("xlb_health_check_duration_seconds_bucket{{{series},le=\"0.0025\"}} 3"),
            format!("xlb_health_check_duration_seconds_bucket{{{series},le=\"2.5\"}} 3"),
            format!("xlb_health_check_duration_seconds_bucket{{{series},le=\"+Inf\"}} 3"),
            format!("xlb_health_check_duration_seconds_sum{{{series}}} 0.0025"),
            format!("xlb_health_check_duration_seconds_count{{{series}}} 3"),
            r#"xlb_health_check_duration_seconds_bucket{vip="web",backend="10.0.0.1",result="fail",le="0.1"} 1"#.to_owned(),
            r#"xlb_health_check_duration_seconds_bucket{vip="web",backend="10.0.0.1",result="fail",le="0.05"} 0"#.to_owned(),
            // A checked backend with no checks yet shows both results at zero.
            r#"xlb_health_check_duration_seconds_count{vip="web",backend="10.0.0.2",result="fail"} 0"#.to_owned(),
            r#"xlb_health_check_duration_seconds_bucket{vip="dns \"v6\"",backend="2001:db8::1",result="ok",le="5"} 0"#.to_owned(),
            r#"xlb_health_check_duration_seconds_bucket{vip="dns \"v6\"",backend="2001:db8::1",result="ok",le="+Inf"} 1"#.to_owned(),
        ] {
            assert!(text.contains(&format!("{want}\n")), "missing {want:?} in:\n{text}");
        }
        // An unchecked backend has no histogram series at all.
        assert!(!text.contains(r#"duration_seconds_count{vip="web",backend="10.0.0.3""#));
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("xlb_health_check_duration_seconds_bucket{"))
            .count();
        assert_eq!(buckets, 3 * 2 * (HEALTH_CHECK_BUCKETS.len() + 1));
    }

    #[test]
    fn the_format_check_rejects_what_a_scraper_would() {
        let ok = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                  h_sum 3\nh_count 2\n";
        check_exposition(ok).unwrap();
        for (why, bad) in [
            ("_count", ok.replace("h_count 2", "h_count 3")),
            ("ascending", ok.replace("le=\"+Inf\"} 2", "le=\"0.5\"} 2")),
            ("cumulative", ok.replace("le=\"1\"} 1", "le=\"1\"} 3")),
            ("+Inf", ok.replace("h_bucket{le=\"+Inf\"} 2\n", "")),
            ("_sum", ok.replace("h_sum 3\n", "")),
            (
                "TYPE twice",
                ok.replace(
                    "# TYPE h histogram\n",
                    "# TYPE h histogram\n# TYPE h histogram\n",
                ),
            ),
            ("HELP", format!("{ok}# HELP h again\n")),
            (
                "two places",
                format!("{ok}# TYPE g gauge\ng 1\n# TYPE h histogram\n"),
            ),
            (
                "under family g",
                format!("{ok}# TYPE g gauge\ng 1\nh_count{{x=\"1\"}} 2\n"),
            ),
            ("before any TYPE", format!("g 1\n{ok}")),
            ("under family", format!("{ok}# TYPE g gauge\nf 1\n")),
            (
                "series twice",
                format!("{ok}# TYPE g gauge\ng{{a=\"1\"}} 1\ng{{a=\"1\"}} 2\n"),
            ),
            (
                "unterminated",
                format!("{ok}# TYPE g gauge\ng{{a=\"1}} 1\n"),
            ),
            ("bad value", format!("{ok}# TYPE g gauge\ng 1x\n")),
        ] {
            let err = check_exposition(&bad).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn the_whole_scrape_passes_the_text_format_check() {
        let s = Snapshot {
            remote_regions: Vec::new(),
            counters: CounterSnapshot::from_pairs([(Counter::FwdEncapV4, 7)]),
            vips: vec![VipMetrics {
                regions: None,
                name: "web".into(),
                traffic: Traffic::default(),
                backends: vec![checked_backend("10.0.0.1", &[300], &[200_000])],
            }],
            last_reconcile: Some(ms(12)),
            reconciles: 3,
            reloads_refused: 1,
        };
        let text = render(&s);
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}
