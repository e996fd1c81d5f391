//! `cargo xtask bench e2e`: requests/s and new connections/s with wrk against the same nginx
//! backends in the namespace topology, through (a) xlb, (b) nftables DNAT load balancing on the
//! xlb host (the kube-proxy way: DNAT to a random backend plus masquerade, so replies return
//! through the host) and (c) HAProxy in TCP mode on the xlb host. All three in one run,
//! alternating each round, medians of several rounds, with the machine's CPU time per 1,000
//! requests. Prints a table and writes JSON.
//!
//! The machine is shared by every host of the topology (client, router, balancer, backends),
//! so CPU per 1,000 requests is whole-machine busy time: the modes differ only in the balancer,
//! so the differences are the balancer's.

use std::{
    path::PathBuf,
    process::{Child, ExitCode, Stdio},
    time::{Duration, Instant},
};

use xlb_tests::{
    netns::Netns,
    servers::Nginx,
    topology::{Daemon, Options, Topology, VIP_V4},
    wrk::{self, WrkLoad},
};

/// The balancers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Xlb,
    Nftables,
    Haproxy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Xlb => "xlb",
            Mode::Nftables => "nftables DNAT",
            Mode::Haproxy => "HAProxy (TCP)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Mode::Xlb => "xlb",
            Mode::Nftables => "nftables",
            Mode::Haproxy => "haproxy",
        }
    }
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Whole-machine CPU milliseconds per 1,000 requests.
    cpu_ms_per_1k: f64,
}

struct Args {
    out: PathBuf,
    rounds: usize,
    seconds: u64,
    connections: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("target/xlb-bench/e2e.json"),
        rounds: 3,
        seconds: 5,
        connections: 32,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--connections" => {
                args.connections = value()?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?
            }
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--help" | "-h" => {
                return Err("options: --out FILE --rounds N (3) --seconds S (5) \
                            --connections C (32) --threads T (2)"
                    .into());
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

/// Busy and total jiffies of the whole machine (`/proc/stat`'s cpu line).
fn cpu_busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .take(8)
        .sum()
}

/// Runs wrk from the client against the VIP; `close` sends `Connection: close`, so every
/// request is a new connection.
fn wrk(client: &Netns, args: &Args, close: bool) -> Result<Run, String> {
    let load = WrkLoad {
        threads: args.threads,
        connections: args.connections,
        duration: Duration::from_secs(args.seconds),
        headers: if close {
            vec!["Connection: close".into()]
        } else {
            Vec::new()
        },
    };
    let hz = 100.0; // USER_HZ on Linux
    let before = cpu_busy_jiffies();
    let report = wrk::run(client, &load, &format!("http://{VIP_V4}/"))?;
    let busy_ms = (cpu_busy_jiffies() - before) as f64 * 1000.0 / hz;
    Ok(Run {
        rps: report.rps,
        p50_ms: report.p50_ms,
        p99_ms: report.p99_ms,
        errors: report.errors,
        cpu_ms_per_1k: busy_ms / report.requests as f64 * 1000.0,
    })
}

/// Whatever a mode runs on the xlb host, stopped when dropped.
enum Active {
    Xlb(Daemon),
    Nftables,
    Haproxy(Child),
}

fn start(mode: Mode, t: &Topology, xlb: &std::path::Path) -> Result<Active, String> {
    let lb = &t.lb.ns;
    let backends: Vec<String> = t.backends.iter().map(|b| b.v4.to_string()).collect();
    match mode {
        Mode::Xlb => {
            let mut text = t.agent_table();
            text.push_str(&format!(
                "\n[[vip]]\nname = \"web\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n"
            ));
            for b in &backends {
                text.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n"));
            }
            let file = t.dirs.tmp.join("bench.toml");
            std::fs::write(&file, text).map_err(|e| e.to_string())?;
            let mut d = Daemon::start(
                lb,
                xlb,
                &[
                    "agent",
                    "--detach-on-exit",
                    "--config",
                    file.to_str().expect("utf-8"),
                ],
            );
            d.wait_for("xlb_balancer attached", Duration::from_secs(30));
            Ok(Active::Xlb(d))
        }
        Mode::Nftables => {
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect();
            let rules = format!(
                "table ip xlbbench {{\n\
                   chain pre {{ type nat hook prerouting priority dstnat; \
                     ip daddr {VIP_V4} tcp dport 80 dnat to numgen random mod {n} map {{ {map} }}; }}\n\
                   chain post {{ type nat hook postrouting priority srcnat; \
                     ip daddr {{ {set} }} tcp dport 80 masquerade; }}\n\
                 }}\n",
                n = backends.len(),
                map = map.join(", "),
                set = backends.join(", ")
            );
            let file = t.dirs.tmp.join("bench.nft");
            std::fs::write(&file, rules).map_err(|e| e.to_string())?;
            let out = lb.exec(&["nft", "-f", file.to_str().expect("utf-8")]);
            if !out.status.success() {
                return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Ok(Active::Nftables)
        }
        Mode::Haproxy => {
            lb.run(&["ip", "addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"]);
            let servers: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server b{i} {b}:80"))
                .collect();
            let conf = format!(
                "global\n    maxconn 8000\n    nbthread {threads}\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
                 timeout server 60s\n\
                 frontend f\n    bind {VIP_V4}:80\n    default_backend b\n\
                 backend b\n    balance roundrobin\n{servers}\n",
                threads = 2,
                servers = servers.join("\n")
            );
            let file = t.dirs.tmp.join("haproxy.cfg");
            std::fs::write(&file, conf).map_err(|e| e.to_string())?;
            let log =
                std::fs::File::create(t.dirs.tmp.join("haproxy.log")).map_err(|e| e.to_string())?;
            let mut child = lb
                .command("haproxy")
                .args(["-db", "-f", file.to_str().expect("utf-8")])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("haproxy: {e}"))?;
            std::thread::sleep(Duration::from_millis(500));
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(t.dirs.tmp.join("haproxy.log")).unwrap_or_default();
                return Err(format!("haproxy exited ({status}): {log}"));
            }
            Ok(Active::Haproxy(child))
        }
    }
}

fn stop(active: Active, t: &Topology) {
    match active {
        Active::Xlb(mut d) => {
            d.terminate();
        }
        Active::Nftables => {
            let _ = t.lb.ns.exec(&["nft", "delete", "table", "ip", "xlbbench"]);
        }
        Active::Haproxy(mut c) => {
            let _ = c.kill();
            let _ = c.wait();
            let _ =
                t.lb.ns
                    .exec(&["ip", "addr", "del", &format!("{VIP_V4}/32"), "dev", "lo"]);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let xlb = std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/xlb"));
    let started = Instant::now();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 3,
        xlb: xlb.clone(),
    });
    // The xlb host forwards for the nftables mode (XDP does not need it).
    t.lb.ns.run(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/ip_forward; \
         for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
    ]);
    // Tens of thousands of new connections per run cycle through the client's ephemeral
    // ports, so later runs meet 4-tuples still in TIME_WAIT from earlier ones (on the backends
    // for xlb, on the balancing host and in its conntrack table for nftables and HAProxy), and
    // whichever mode runs later loses SYNs to them. No TIME_WAIT state on the server side and a
    // one-second conntrack TIME_WAIT keep every round as fresh as the first.
    for ns in std::iter::once(&t.lb.ns).chain(t.backends.iter().map(|b| &b.ns)) {
        ns.run(&[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv4/tcp_max_tw_buckets; \
             f=/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait; \
             [ -w $f ] && echo 1 > $f; true",
        ]);
    }
    let _nginx: Vec<Nginx> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Nginx::start(&b.ns, &format!("backend{i}")))
        .collect();
    let modes = [Mode::Xlb, Mode::Nftables, Mode::Haproxy];
    // results[mode][0 = keep-alive, 1 = new connections]
    let mut results: Vec<[Vec<Run>; 2]> = modes.iter().map(|_| [vec![], vec![]]).collect();
    for round in 0..args.rounds {
        // Rotate the order each round so no mode always runs first (warm caches, drift).
        for k in 0..modes.len() {
            let m = (k + round) % modes.len();
            let mode = modes[m];
            let active = match start(mode, &t, &xlb) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("e2e-bench: starting {}: {e}", mode.name());
                    return ExitCode::FAILURE;
                }
            };
            // A second of warm-up (ARP, connection tables, worker start-up).
            let _ = t.clients.first().map(|c| {
                c.ns.exec(&[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "2",
                    &format!("http://{VIP_V4}/"),
                ])
            });
            for (i, close) in [false, true].into_iter().enumerate() {
                match wrk(&t.clients[0].ns, &args, close) {
                    Ok(run) => {
                        eprintln!(
                            "round {} {:<14} {:<16} {:>10.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  \
                             {:>5.1} CPU-ms/1k  errors {}",
                            round + 1,
                            mode.name(),
                            if close {
                                "new connections"
                            } else {
                                "keep-alive"
                            },
                            run.rps,
                            run.p50_ms,
                            run.p99_ms,
                            run.cpu_ms_per_1k,
                            run.errors
                        );
                        results[m][i].push(run);
                    }
                    Err(e) => {
                        stop(active, &t);
                        eprintln!("e2e-bench: {}: {e}", mode.name());
                        return ExitCode::FAILURE;
                    }
                }
            }
            stop(active, &t);
        }
    }

    println!(
        "\nmedians of {} rounds, wrk -t{} -c{} -d{}s against 3 nginx backends",
        args.rounds, args.threads, args.connections, args.seconds
    );
    println!(
        "{:<16} {:>14} {:>10} {:>10} {:>12} {:>16} {:>12} {:>12}",
        "balancer",
        "keep-alive r/s",
        "p50 ms",
        "p99 ms",
        "CPU-ms/1k",
        "new conn/s",
        "p99 ms",
        "CPU-ms/1k"
    );
    let mut json = Vec::new();
    let mut medians = Vec::new();
    for (m, mode) in modes.iter().enumerate() {
        let figure = |i: usize, f: fn(&Run) -> f64| median(results[m][i].iter().map(f).collect());
        let row = [
            figure(0, |r| r.rps),
            figure(0, |r| r.p50_ms),
            figure(0, |r| r.p99_ms),
            figure(0, |r| r.cpu_ms_per_1k),
            figure(1, |r| r.rps),
            figure(1, |r| r.p99_ms),
            figure(1, |r| r.cpu_ms_per_1k),
        ];
        let errors: u64 = results[m].iter().flatten().map(|r| r.errors).sum();
        println!(
            "{:<16} {:>14.0} {:>10.2} {:>10.2} {:>12.1} {:>16.0} {:>12.2} {:>12.1}{}",
            mode.name(),
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            if errors > 0 {
                format!("  ({errors} errors)")
            } else {
                String::new()
            }
        );
        json.push(format!(
            "\"{}\": {{\"keepalive_rps\": {:.1}, \"keepalive_p50_ms\": {:.3}, \
             \"keepalive_p99_ms\": {:.3}, \"keepalive_cpu_ms_per_1k\": {:.2}, \
             \"new_conn_per_s\": {:.1}, \"new_conn_p99_ms\": {:.3}, \
             \"new_conn_cpu_ms_per_1k\": {:.2}, \"errors\": {errors}}}",
            mode.key(),
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6]
        ));
        medians.push(row);
    }
    println!("\nratios (xlb / other): higher is better for r/s, lower for CPU");
    for (m, mode) in modes.iter().enumerate().skip(1) {
        println!(
            "  vs {:<14} keep-alive r/s x{:.2}  new conn/s x{:.2}  CPU/1k keep-alive x{:.2}  CPU/1k new x{:.2}",
            mode.name(),
            medians[0][0] / medians[m][0],
            medians[0][4] / medians[m][4],
            medians[0][3] / medians[m][3],
            medians[0][6] / medians[m][6]
        );
    }
    let doc = format!(
        "{{\"rounds\": {}, \"seconds\": {}, \"connections\": {}, \"threads\": {}, \"results\": {{{}}}}}\n",
        args.rounds,
        args.seconds,
        args.connections,
        args.threads,
        json.join(", ")
    );
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&args.out, doc) {
        eprintln!("e2e-bench: writing {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "\nwrote {} ({:.0} s)",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
