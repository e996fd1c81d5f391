//! `cargo xtask bench control`: control-plane costs. Maglev table build time for 10, 100 and
//! 1,000 backends at 65,537 slots; planning a 100-VIP x 100-backend desired state; the
//! resident memory of the real agent holding 100 VIPs x 100 backends (in a namespace the bench
//! creates); and the time from a backend failing to the real agent's maps no longer selecting
//! it ([`failover`]). Prints a table and writes JSON.

// Beside this file, not in src/bin/, where cargo would take it for a binary of its own.
#[path = "control_bench/failover.rs"]
mod failover;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use lb_common::types::{FAMILY_V4, LbConfig, VipKey, proto};
use lb_userspace::{
    maglev::{self, MaglevBackend},
    reconcile::{Desired, DesiredBackend, DesiredVip, Reconciler},
};
use xlb_tests::netns::{Netns, sweep_stale, veth_pair};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn maglev_build(n: u32) -> Duration {
    let backends: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            id: i + 1,
            key: [10, (i >> 16) as u8, (i >> 8) as u8, i as u8].to_vec(),
            weight: 1,
        })
        .collect();
    median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&backends, maglev::DEFAULT_TABLE_SIZE).expect("build");
                let d = t.elapsed();
                assert_eq!(table.len(), maglev::DEFAULT_TABLE_SIZE as usize);
                d
            })
            .collect(),
    )
}

fn big_desired(vips: usize, backends: usize, table_size: u32) -> Desired {
    Desired {
        config: LbConfig::default(),
        vips: (0..vips)
            .map(|v| {
                let mut key = VipKey {
                    port_be: 80u16.to_be(),
                    proto: proto::TCP,
                    family: FAMILY_V4,
                    ..Default::default()
                };
                key.addr[..4].copy_from_slice(&[198, 18, (v >> 8) as u8, v as u8]);
                DesiredVip {
                    key,
                    flags: 0,
                    table_size,
                    panic_threshold: 0.5,
                    backends: (0..backends)
                        .map(|b| DesiredBackend {
                            address: std::net::Ipv4Addr::new(10, 1, v as u8, b as u8).into(),
                            weight: 1,
                            healthy: true,
                            mac: None,
                        })
                        .collect(),
                    regions: Default::default(),
                }
            })
            .collect(),
    }
}

fn big_config(vips: usize, backends: usize) -> String {
    let mut t = String::from(
        "[agent]\ninterface = \"eth0\"\nxdp_mode = \"native\"\nnext_hop_mac = \"02:00:00:00:00:01\"\n\
         encap_source_v4 = \"10.99.9.1/32\"\nmetrics_listen = \"127.0.0.1:9641\"\n",
    );
    for v in 0..vips {
        t.push_str(&format!(
            "\n[[vip]]\nname = \"vip{v}\"\naddress = \"198.18.{}.{}\"\nport = 80\nprotocol = \"tcp\"\n",
            v >> 8,
            v & 255
        ));
        for b in 0..backends {
            t.push_str(&format!("[[vip.backend]]\naddress = \"10.1.{v}.{b}\"\n"));
        }
    }
    t
}

/// Starts the real agent with `config` in a fresh namespace and returns its resident memory
/// (KiB) once the configuration is applied, and how long applying took.
fn agent_rss(xlb: &std::path::Path, config: &str) -> (u64, Duration) {
    sweep_stale();
    let a = Netns::create("ctl");
    let b = Netns::create("ctlpeer");
    veth_pair(&a, "eth0", &b, "eth0");
    a.run(&["ip", "addr", "add", "10.99.9.1/24", "dev", "eth0"]);
    let path = std::env::temp_dir().join(format!("xlb-control-{}.toml", std::process::id()));
    std::fs::write(&path, config).expect("write config");
    let started = Instant::now();
    let mut child = a
        .command(xlb.to_str().expect("utf-8 path"))
        .args(["agent", "--config", path.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the agent");
    let stderr = child.stderr.take().expect("stderr");
    let mut applied = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("configuration applied") {
            applied = Some(started.elapsed());
        }
        if line.contains("xlb_balancer attached") || line.contains("ERROR") {
            if line.contains("ERROR") {
                eprintln!("agent: {line}");
            }
            break;
        }
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    (rss, applied.unwrap_or_default())
}

fn main() -> ExitCode {
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/xlb-bench/control.json"));
    let xlb = std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb"));

    let mut rows = Vec::new();
    println!("{:<48} {:>14}", "measure", "value");
    for n in [10u32, 100, 1000] {
        let d = maglev_build(n);
        println!(
            "{:<48} {:>11.3} ms",
            format!("Maglev build, {n} backends x 65537"),
            d.as_secs_f64() * 1e3
        );
        rows.push(format!(
            "{{\"measure\":\"maglev_build_ms\",\"backends\":{n},\"value\":{}}}",
            d.as_secs_f64() * 1e3
        ));
    }
    let desired = big_desired(100, 100, maglev::DEFAULT_TABLE_SIZE);
    let t = Instant::now();
    let plan = Reconciler::new().plan(&desired).expect("plan");
    let d = t.elapsed();
    println!(
        "{:<48} {:>11.1} ms ({} map writes)",
        "plan 100 VIPs x 100 backends (65537 slots)",
        d.as_secs_f64() * 1e3,
        plan.ops.len()
    );
    rows.push(format!(
        "{{\"measure\":\"plan_100x100_ms\",\"value\":{}}}",
        d.as_secs_f64() * 1e3
    ));

    if !xlb.is_file() {
        eprintln!(
            "control-bench: {} not found (cargo xtask bench builds it)",
            xlb.display()
        );
        return ExitCode::FAILURE;
    }
    let (rss, applied) = agent_rss(&xlb, &big_config(100, 100));
    println!(
        "{:<48} {:>11.1} MiB",
        "agent RSS, 100 VIPs x 100 backends",
        rss as f64 / 1024.0
    );
    println!(
        "{:<48} {:>11.2} s",
        "agent start to configuration applied",
        applied.as_secs_f64()
    );
    rows.push(format!(
        "{{\"measure\":\"agent_rss_kib_100x100\",\"value\":{rss}}}"
    ));
    rows.push(format!(
        "{{\"measure\":\"agent_apply_100x100_s\",\"value\":{}}}",
        applied.as_secs_f64()
    ));
    let (rss0, _) = agent_rss(&xlb, &big_config(0, 0));
    println!(
        "{:<48} {:>11.1} MiB",
        "agent RSS, no VIPs",
        rss0 as f64 / 1024.0
    );
    rows.push(format!(
        "{{\"measure\":\"agent_rss_kib_empty\",\"value\":{rss0}}}"
    ));

    let failed = match failover::measure(&xlb) {
        Ok(f) => {
            failover_rows(&f, &mut rows);
            false
        }
        Err(e) => {
            eprintln!("control-bench: failover: {e:#}");
            true
        }
    };

    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = format!("[\n  {}\n]\n", rows.join(",\n  "));
    if let Err(e) = std::fs::write(&out, json) {
        eprintln!("control-bench: writing {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("\nwrote {}", out.display());
    if failed {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Prints the failover rows with their settings and expected bound, and adds them to the JSON.
fn failover_rows(f: &failover::Failover, rows: &mut Vec<String>) {
    let s = failover::SETTINGS;
    let bound_ms = s.bound().as_secs_f64() * 1e3;
    let n = f.sorted.len();
    let stats = [
        (
            "p50",
            "failover p50 (backend fails -> maps drop it)".to_owned(),
            f.percentile(50.0),
        ),
        (
            "p99",
            format!("failover p99 (of {n} trials: the maximum)"),
            f.percentile(99.0),
        ),
        ("min", "failover min".to_owned(), f.min()),
        ("max", "failover max".to_owned(), f.max()),
    ];
    for (stat, label, d) in stats {
        let ms = d.as_secs_f64() * 1e3;
        let verdict = if d <= s.bound() { "within" } else { "OVER" };
        println!("{label:<48} {ms:>11.1} ms  ({verdict} the bound of {bound_ms:.0} ms)");
        rows.push(format!(
            "{{\"measure\":\"failover_ms\",\"stat\":\"{stat}\",\"value\":{ms},\
             \"bound_ms\":{bound_ms},\"trials\":{n},\"check\":\"tcp\",\"interval_ms\":{},\
             \"timeout_ms\":{},\"fall\":{},\"rise\":{}}}",
            s.interval.as_millis(),
            s.timeout.as_millis(),
            s.fall,
            s.rise
        ));
    }
    let flag = f.flag_cleared_percentile(50.0).as_secs_f64() * 1e3;
    println!(
        "{:<48} {flag:>11.1} ms  (the rest is writing the new table)",
        "failover p50, up flag cleared alone"
    );
    rows.push(format!(
        "{{\"measure\":\"failover_flag_cleared_ms\",\"stat\":\"p50\",\"value\":{flag},\"trials\":{n}}}"
    ));
    println!(
        "  failover: {n} trials with the real agent, from the listener closing to the backend's\n  \
         up flag cleared and its VIP's new table published (maps polled every 1 ms); tcp check\n  \
         every {} ms, timeout {} ms, fall {}, rise {}; bound = fall x interval + one interval.\n  \
         Percentiles are nearest-rank: with {n} samples p99 is the maximum.",
        s.interval.as_millis(),
        s.timeout.as_millis(),
        s.fall,
        s.rise
    );
}
