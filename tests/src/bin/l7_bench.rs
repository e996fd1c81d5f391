//! `cargo xtask bench l7`: xlb's L7 gateway against nginx and HAProxy as HTTP reverse proxies,
//! with wrk (keep-alive) and one nginx upstream returning a fixed 100-byte body. Each proxy
//! runs in turn on the xlb host of the L7 topology (`xlb_tests::l7`), listening on the same
//! VIP:port and proxying to the same upstream, with two workers each (`gateway_workers = 2`,
//! nginx `worker_processes 2`, HAProxy `nbthread 2`). Rounds alternate the proxies in
//! a rotated order; the table holds medians. Per proxy: requests/s, p50 and p99 latency, the
//! proxy's own CPU time per 1,000 requests (its processes' utime + stime over the measured
//! run) and its memory (VmRSS and VmHWM at the end of the run, summed over its processes).
//! Prints a table and ratios against nginx, and writes JSON.
//!
//! What each proxy's CPU figure leaves out: kernel work done in softirq context (the TCP/IP
//! stack's receive path, and for xlb its XDP program) is charged to whichever process was
//! interrupted, not to the proxy. Every proxy shares the 2 CPUs with wrk and the upstream.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use xlb_tests::{
    l7::{Curl, FIXED_BODY, L7_VIP_V4, L7Options, L7Topology, NginxServer, UPSTREAM_HTTP_PORT},
    procs,
    topology::{Daemon, DaemonLogs, set_daemon_logs},
    wrk::{self, WrkLoad, WrkReport},
};

/// The port every proxy listens on, on the VIP.
const PORT: u16 = 80;
/// The agent's log filter: its own lines, not the gateway's per-request access log.
const AGENT_LOG_FILTER: &str = "info,xlb::access=off";
/// Worker threads or processes of every proxy.
const WORKERS: usize = 2;

/// The proxies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Xlb,
    Nginx,
    Haproxy,
}

impl Proxy {
    const ALL: [Proxy; 3] = [Proxy::Xlb, Proxy::Nginx, Proxy::Haproxy];

    fn key(self) -> &'static str {
        match self {
            Proxy::Xlb => "xlb",
            Proxy::Nginx => "nginx",
            Proxy::Haproxy => "haproxy",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proxy::Xlb => "xlb gateway",
            Proxy::Nginx => "nginx",
            Proxy::Haproxy => "HAProxy",
        }
    }
}

struct Args {
    out: PathBuf,
    rounds: usize,
    seconds: u64,
    warmup: u64,
    connections: usize,
    threads: usize,
    agent_timeout: Duration,
    proxies: Vec<Proxy>,
}

const USAGE: &str = "options: --out FILE --rounds N (5) --seconds S (5) --warmup S (1) \
                     --connections C (32) --threads T (2) --agent-timeout S (20) \
                     --proxies xlb,nginx,haproxy (all)";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("target/xlb-bench/l7.json"),
        rounds: 5,
        seconds: 5,
        warmup: 1,
        connections: 32,
        threads: 2,
        agent_timeout: Duration::from_secs(20),
        proxies: Proxy::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
        }
        match a.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--rounds" => args.rounds = num(&a, value()?)?,
            "--seconds" => args.seconds = num(&a, value()?)?,
            "--warmup" => args.warmup = num(&a, value()?)?,
            "--connections" => args.connections = num(&a, value()?)?,
            "--threads" => args.threads = num(&a, value()?)?,
            "--agent-timeout" => args.agent_timeout = Duration::from_secs(num(&a, value()?)?),
            "--proxies" => {
                args.proxies = value()?
                    .split(',')
                    .map(|p| {
                        Proxy::ALL
                            .into_iter()
                            .find(|x| x.key() == p)
                            .ok_or(format!("--proxies: unknown proxy {p}; {USAGE}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}; {USAGE}")),
        }
    }
    if args.rounds == 0 || args.seconds == 0 || args.proxies.is_empty() {
        return Err(format!(
            "rounds, seconds and proxies must not be zero; {USAGE}"
        ));
    }
    Ok(args)
}

/// A proxy running on the xlb host; stopped when dropped.
enum Running {
    Xlb(Daemon),
    Nginx(NginxServer),
    Haproxy(Child),
}

impl Running {
    /// The process whose tree's CPU time and memory are the proxy's.
    fn pid(&self) -> u32 {
        match self {
            Running::Xlb(d) => d.child.id(),
            Running::Nginx(n) => n.pid().expect("nginx is running"),
            Running::Haproxy(c) => c.id(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            // The Daemon and NginxServer guards stop their processes themselves; the agent
            // first gets SIGTERM so it detaches its program (`--detach-on-exit`).
            Running::Xlb(d) => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(d.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Running::Nginx(_) => {}
            Running::Haproxy(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Where each proxy's configuration and log go.
struct Files {
    /// Per-run files (configurations), removed with the topology's scratch directory.
    scratch: PathBuf,
    /// Logs kept after the run, next to the JSON.
    logs: PathBuf,
}

impl Files {
    fn agent_log(&self) -> PathBuf {
        // Named by `set_daemon_logs`: the namespace's role, then the subcommand.
        self.logs.join("l7lb-agent.log")
    }
    fn haproxy_log(&self) -> PathBuf {
        self.logs.join("l7-haproxy.log")
    }
}

fn start(
    proxy: Proxy,
    t: &L7Topology,
    xlb: &Path,
    files: &Files,
    args: &Args,
) -> Result<Running, String> {
    let vip = SocketAddr::from((L7_VIP_V4, PORT));
    let upstream = t.upstreams[0].http();
    let running = match proxy {
        Proxy::Xlb => {
            let vips = t.basic_vip("web", IpAddr::V4(L7_VIP_V4), PORT, UPSTREAM_HTTP_PORT);
            let config = t.write_agent_config(&vips);
            // As many serving threads as nginx and HAProxy get.
            let text = t.agent_config(&vips).replacen(
                "[agent]\n",
                &format!("[agent]\ngateway_workers = {WORKERS}\n"),
                1,
            );
            std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
            // No access log, as nginx (`access_log off`) and HAProxy (no `log`) run here.
            let mut agent = Daemon::start_with_log_filter(
                &t.lb,
                xlb,
                &[
                    "agent",
                    "--detach-on-exit",
                    "--config",
                    config.to_str().expect("utf-8 path"),
                ],
                AGENT_LOG_FILTER,
            );
            if let Err(e) = t.wait_gateway(&mut agent, vip, args.agent_timeout) {
                // The configuration goes with the topology; a copy stays beside the log.
                let kept = files.logs.join("l7-agent.toml");
                let _ = std::fs::copy(&config, &kept);
                return Err(format!(
                    "the xlb agent is not serving the l7 VIP: {e}\nagent log: {}\n\
                     its configuration: {}\n\
                     (to measure the other proxies meanwhile: -- --proxies nginx,haproxy)",
                    files.agent_log().display(),
                    kept.display()
                ));
            }
            Running::Xlb(agent)
        }
        Proxy::Nginx => {
            let conf = move |dir: &Path| {
                let dir = dir.display();
                format!(
                    r#"
daemon off;
worker_processes {WORKERS};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream web {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {vip} reuseport;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
                )
            };
            Running::Nginx(NginxServer::start(&t.lb, "l7-proxy", &conf, vip))
        }
        Proxy::Haproxy => {
            let conf = format!(
                "global\n    nbthread {WORKERS}\n    maxconn 8000\n\
                 defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n\
                 \x20   timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
                 \x20   timeout http-keep-alive 60s\n\
                 frontend web\n    bind {vip}\n    default_backend web\n\
                 backend web\n    server up0 {upstream}\n"
            );
            let file = files.scratch.join("haproxy.cfg");
            std::fs::write(&file, conf).map_err(|e| format!("writing {}: {e}", file.display()))?;
            let log = std::fs::File::create(files.haproxy_log())
                .map_err(|e| format!("creating {}: {e}", files.haproxy_log().display()))?;
            let mut child =
                t.lb.command("haproxy")
                    .arg("-db")
                    .arg("-f")
                    .arg(&file)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .map_err(|e| format!("starting haproxy: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !xlb_tests::l7::accepts(&t.client, vip, Duration::from_millis(200)) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "haproxy exited ({status}); see {}",
                        files.haproxy_log().display()
                    ));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "haproxy did not listen on {vip} within 10 s; see {}",
                        files.haproxy_log().display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Running::Haproxy(child)
        }
    };
    // Proxying what it should: the upstream's fixed body, whole.
    let r = t.curl(&Curl::http1(&t.vip_url(PORT, "/fixed")));
    if (r.exit, r.status, r.body.as_str()) != (0, 200, FIXED_BODY) {
        return Err(format!(
            "{} did not proxy GET /fixed to the upstream: curl exit {}, status {}, body {:?}, {}",
            proxy.name(),
            r.exit,
            r.status,
            r.body,
            r.stderr
        ));
    }
    Ok(running)
}

/// One measured run of one proxy.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wrk: WrkReport,
    cpu_ms_per_1k: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn measure(t: &L7Topology, running: &Running, args: &Args) -> Result<Sample, String> {
    let url = t.vip_url(PORT, "/fixed");
    let load = |secs| WrkLoad {
        threads: args.threads,
        connections: args.connections,
        duration: Duration::from_secs(secs),
        headers: Vec::new(),
    };
    if args.warmup > 0 {
        // Connections, the upstream pools and the allocators warmed before measuring.
        wrk::run(&t.client, &load(args.warmup), &url)?;
    }
    let pid = running.pid();
    let cpu_before = procs::cpu_seconds(pid);
    let report = wrk::run(&t.client, &load(args.seconds), &url)?;
    let cpu = procs::cpu_seconds(pid) - cpu_before;
    let (rss_kib, hwm_kib) = procs::memory_kib(pid);
    Ok(Sample {
        wrk: report,
        cpu_ms_per_1k: cpu * 1000.0 / report.requests as f64 * 1000.0,
        rss_kib,
        hwm_kib,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The medians of one proxy's samples.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: f64,
    rss_mib: f64,
    hwm_mib: f64,
    errors: u64,
}

fn figures(samples: &[Sample]) -> Figures {
    let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    Figures {
        rps: m(|s| s.wrk.rps),
        p50_ms: m(|s| s.wrk.p50_ms),
        p99_ms: m(|s| s.wrk.p99_ms),
        cpu_ms_per_1k: m(|s| s.cpu_ms_per_1k),
        rss_mib: m(|s| s.rss_kib as f64 / 1024.0),
        hwm_mib: m(|s| s.hwm_kib as f64 / 1024.0),
        errors: samples.iter().map(|s| s.wrk.errors).sum(),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("l7-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l7-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let xlb = std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/xlb"));
    if args.proxies.contains(&Proxy::Xlb) && !xlb.is_file() {
        return Err(format!(
            "{} not found; build it (`cargo build --release -p lb-userspace --bin xlb`) or set \
             XLB_BIN",
            xlb.display()
        ));
    }
    let logs = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    set_daemon_logs(DaemonLogs {
        echo: false,
        dir: Some(logs.clone()),
    });
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let files = Files {
        scratch: t.scratch.path.clone(),
        logs,
    };
    let _ = std::fs::remove_file(files.agent_log());

    let proxies = &args.proxies;
    let mut samples: Vec<Vec<Sample>> = proxies.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        // A rotated order each round, so that no proxy always runs first.
        for k in 0..proxies.len() {
            let i = (k + round) % proxies.len();
            let proxy = proxies[i];
            let running = start(proxy, &t, &xlb, &files, args)?;
            let sample =
                measure(&t, &running, args).map_err(|e| format!("{}: {e}", proxy.name()))?;
            drop(running);
            eprintln!(
                "round {} {:<12} {:>9.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  {:>6.1} CPU-ms/1k  \
                 RSS {:>6.1} MiB  errors {}",
                round + 1,
                proxy.name(),
                sample.wrk.rps,
                sample.wrk.p50_ms,
                sample.wrk.p99_ms,
                sample.cpu_ms_per_1k,
                sample.rss_kib as f64 / 1024.0,
                sample.wrk.errors
            );
            samples[i].push(sample);
        }
    }

    let medians: Vec<Figures> = samples.iter().map(|s| figures(s)).collect();
    println!(
        "\nmedians of {} rounds, wrk -t{} -c{} -d{}s keep-alive, GET /fixed (100-byte body) \
         from one nginx upstream; {WORKERS} workers per proxy",
        args.rounds, args.threads, args.connections, args.seconds
    );
    println!(
        "{:<12} {:>10} {:>8} {:>8} {:>10} {:>9} {:>9} {:>7}",
        "proxy", "req/s", "p50 ms", "p99 ms", "CPU-ms/1k", "RSS MiB", "HWM MiB", "errors"
    );
    for (p, f) in proxies.iter().zip(&medians) {
        println!(
            "{:<12} {:>10.0} {:>8.3} {:>8.3} {:>10.1} {:>9.1} {:>9.1} {:>7}",
            p.name(),
            f.rps,
            f.p50_ms,
            f.p99_ms,
            f.cpu_ms_per_1k,
            f.rss_mib,
            f.hwm_mib,
            f.errors
        );
    }
    let nginx = proxies
        .iter()
        .position(|&p| p == Proxy::Nginx)
        .map(|i| medians[i]);
    let mut ratios = serde_json::Map::new();
    if let Some(n) = nginx {
        println!(
            "\nratios vs nginx (req/s: higher is better; latency, CPU and memory: lower is better)"
        );
        for (p, f) in proxies.iter().zip(&medians) {
            if *p == Proxy::Nginx {
                continue;
            }
            let r = [
                f.rps / n.rps,
                f.p50_ms / n.p50_ms,
                f.p99_ms / n.p99_ms,
                f.cpu_ms_per_1k / n.cpu_ms_per_1k,
                f.rss_mib / n.rss_mib,
            ];
            println!(
                "  {:<12} req/s x{:.2}  p50 x{:.2}  p99 x{:.2}  CPU/1k x{:.2}  RSS x{:.2}",
                p.name(),
                r[0],
                r[1],
                r[2],
                r[3],
                r[4]
            );
            ratios.insert(
                p.key().into(),
                json!({"rps": r[0], "p50": r[1], "p99": r[2], "cpu_per_1k": r[3], "rss": r[4]}),
            );
        }
    }
    let mut results = serde_json::Map::new();
    for ((p, f), s) in proxies.iter().zip(&medians).zip(&samples) {
        results.insert(
            p.key().into(),
            json!({
                "rps": f.rps,
                "p50_ms": f.p50_ms,
                "p99_ms": f.p99_ms,
                "cpu_ms_per_1k": f.cpu_ms_per_1k,
                "rss_mib": f.rss_mib,
                "hwm_mib": f.hwm_mib,
                "errors": f.errors,
                "rounds": s.iter().map(|s| json!({
                    "rps": s.wrk.rps,
                    "requests": s.wrk.requests,
                    "p50_ms": s.wrk.p50_ms,
                    "p99_ms": s.wrk.p99_ms,
                    "cpu_ms_per_1k": s.cpu_ms_per_1k,
                    "rss_kib": s.rss_kib,
                    "hwm_kib": s.hwm_kib,
                    "errors": s.wrk.errors,
                })).collect::<Vec<_>>(),
            }),
        );
    }
    let doc = json!({
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "connections": args.connections,
        "threads": args.threads,
        "workers": WORKERS,
        "body_bytes": FIXED_BODY.len(),
        "results": results,
        "vs_nginx": ratios,
    });
    let text = serde_json::to_string_pretty(&doc).expect("JSON") + "\n";
    std::fs::write(&args.out, text).map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    println!(
        "\nwrote {} ({:.0} s)",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
