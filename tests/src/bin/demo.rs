//! `cargo xtask demo`: xlb doing its main job, narrated. Builds the namespace topology (two
//! clients, a router, the xlb host, three nginx backends), runs the real agent with
//! `examples/demo.toml`, and drives real traffic through it: distribution by weight, failover
//! when a backend dies, a drain that keeps open connections, and `xlb status`. Every step
//! checks what it shows, so the demo doubles as a smoke test: it exits 1 with the reason when
//! an expectation fails. Needs root.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use lb_userspace::{
    admin,
    config::{self, Config, Probe},
};
use xlb_tests::{
    servers::{HttpConn, Nginx},
    topology::{Daemon, DaemonLogs, Options, Topology, set_daemon_logs},
};

/// Client hosts: two, so new connections come from more than one address.
const CLIENTS: usize = 2;
/// Backend hosts; `examples/demo.toml` names their addresses.
const BACKENDS: usize = 3;
/// New connections in the distribution step (half from each client).
const REQUESTS: usize = 300;
/// New connections in each check of the failover and drain steps.
const PROBE_REQUESTS: usize = 100;
/// How far (in percentage points) a backend's share of the distribution step may stray from
/// its weight's share: about four standard deviations of a binomial share at 300 requests, so
/// a correct balancer fails this about once in ten thousand runs.
const SHARE_TOLERANCE_PP: f64 = 12.0;
/// Keep-alive connections that must land on the drained backend.
const HELD_CONNECTIONS: usize = 3;
/// The wrk run.
const WRK_SECONDS: u32 = 5;
/// wrk's connections (keep-alive: each carries many requests).
const WRK_CONNECTIONS: u32 = 16;
/// The least time a health change may take before the demo gives up (with the shipped checks
/// the design bound is under a second; slower checks in an edited file get twice their bound).
const HEALTH_WAIT: Duration = Duration::from_secs(5);
/// Run directories kept under the output directory (older ones are removed).
const KEEP_RUNS: usize = 5;

/// Runs the narrated demo (root).
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// The `xlb` binary.
    #[arg(long, env = "XLB_BIN", default_value_os_t = workspace().join("target/debug/xlb"))]
    xlb: PathBuf,
    /// The demo configuration; its per-run paths (admin_socket, state_dir, bpffs_dir) are
    /// replaced in a copy.
    #[arg(long, default_value_os_t = workspace().join("examples/demo.toml"))]
    config: PathBuf,
    /// Where run directories (logs, the configuration in force) are created.
    #[arg(long, default_value_os_t = workspace().join("target/xlb-demo"))]
    out_dir: PathBuf,
    /// Echo the agent's, decapsulators' and router's log lines as they arrive.
    #[arg(long)]
    verbose: bool,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "demo: needs root (it loads XDP programs and creates network namespaces); \
             run `sudo cargo xtask demo`"
        );
        return ExitCode::FAILURE;
    }
    // A helper that panics (a guard that cannot create a namespace, say) still unwinds through
    // the guards, which clean up; the hook's message is the reason, printed once.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("\ndemo FAILED: {msg}{at}");
    }));
    match std::panic::catch_unwind(|| run(&args, started)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("\ndemo FAILED: {e:#}");
            eprintln!(
                "(everything the demo created has been removed; logs are in {})",
                args.out_dir.display()
            );
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "(everything the demo created has been removed; logs are in {})",
                args.out_dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Narration
// ---------------------------------------------------------------------------------------------

/// Prints `text` as a paragraph wrapped at 96 columns.
fn say(text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 96 {
            println!("{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        println!("{line}");
    }
}

/// Prints `text` indented, as quoted output.
fn quote(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn heading(title: &str) {
    println!("\n== {title} ==\n");
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The world: topology, servers, agent
// ---------------------------------------------------------------------------------------------

/// Everything the demo runs. Field order is drop order: the agent first, then nginx, then the
/// topology (its daemons, namespaces and pins).
struct World {
    agent: Daemon,
    /// One slot per backend; `None` while that backend's nginx is stopped.
    nginx: Vec<Option<Nginx>>,
    topo: Topology,
    xlb: PathBuf,
    /// The configuration in force (the run's copy of demo.toml).
    config: Config,
    config_path: PathBuf,
}

/// One backend of the demo's VIP: its host name and address, and its configured weight.
struct Backend {
    name: String,
    address: IpAddr,
    weight: u16,
}

impl World {
    fn vip(&self) -> &config::Vip {
        &self.config.vips[0]
    }

    fn backends(&self) -> Vec<Backend> {
        self.vip()
            .backends
            .iter()
            .map(|b| Backend {
                name: host_of(&self.topo, b.address).expect("checked at start"),
                address: b.address,
                weight: b.weight,
            })
            .collect()
    }

    fn url(&self) -> String {
        let v = self.vip();
        let host = match v.address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        if v.port == 80 {
            format!("http://{host}/")
        } else {
            format!("http://{host}:{}/", v.port)
        }
    }

    /// Runs the run-time CLI against the agent; prints the command and its output when
    /// `show`; fails unless it exits 0.
    fn cli(&self, args: &[&str], show: bool) -> anyhow::Result<String> {
        let out = self.topo.cli(&self.xlb, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if show {
            println!("  $ xlb {}", args.join(" "));
            quote(stdout.trim_end());
        }
        ensure!(
            out.status.success(),
            "`xlb {}` exited with {}: {}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// The agent's `xlb status --json`.
    fn status(&self) -> anyhow::Result<admin::Status> {
        let json = self.cli(&["status", "--json"], false)?;
        serde_json::from_str(&json).context("parsing `xlb status --json`")
    }

    /// New flows the agent has assigned to each backend of the VIP since it started.
    fn new_flows(&self) -> anyhow::Result<BTreeMap<IpAddr, u64>> {
        let status = self.status()?;
        let vip = status
            .vips
            .iter()
            .find(|v| v.name == self.vip().name)
            .context("the VIP is missing from `xlb status`")?;
        Ok(vip
            .backends
            .iter()
            .map(|b| (b.address, b.new_flows))
            .collect())
    }

    /// `per_client` requests from every client, each on a new TCP connection (`curl` with
    /// `Connection: close`), the clients in parallel. Returns the answers per backend name;
    /// fails if any request failed.
    fn new_connections(&self, total: usize) -> anyhow::Result<BTreeMap<String, usize>> {
        let per_client = total / self.topo.clients.len();
        let url = self.url();
        let children = self
            .topo
            .clients
            .iter()
            .map(|c| {
                let mut cmd = c.ns.command("curl");
                cmd.args(["-sS", "--connect-timeout", "2", "--max-time", "3"])
                    .args(["-H", "Connection: close"])
                    .args(std::iter::repeat_n(url.as_str(), per_client));
                spawn_bounded(cmd, Duration::from_secs(60), "curl")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut answers: BTreeMap<String, usize> =
            self.backends().into_iter().map(|b| (b.name, 0)).collect();
        let mut failures = Vec::new();
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut ok = 0;
            for line in stdout.lines() {
                if let Some(n) = answers.get_mut(line.trim()) {
                    *n += 1;
                    ok += 1;
                }
            }
            if ok != per_client {
                let errors = String::from_utf8_lossy(&out.stderr);
                failures.push(format!(
                    "client{i}: {} of {per_client} requests failed; curl said: {}",
                    per_client - ok,
                    errors.lines().take(3).collect::<Vec<_>>().join(" | ")
                ));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(answers)
    }
}

/// The topology's name for the backend host with `address` ("backend1").
fn host_of(topo: &Topology, address: IpAddr) -> Option<String> {
    topo.backends
        .iter()
        .position(|b| IpAddr::V4(b.v4) == address || IpAddr::V6(b.v6) == address)
        .map(|i| format!("backend{i}"))
}

/// A child process with a deadline: its output is collected on a thread so that a hung
/// process can be killed.
struct Bounded {
    pid: i32,
    what: &'static str,
    timeout: Duration,
    output: mpsc::Receiver<std::io::Result<Output>>,
}

fn spawn_bounded(
    mut cmd: Command,
    timeout: Duration,
    what: &'static str,
) -> anyhow::Result<Bounded> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what} (installed by `cargo xtask setup`)"))?;
    let pid = child.id() as i32;
    let (tx, output) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    Ok(Bounded {
        pid,
        what,
        timeout,
        output,
    })
}

impl Bounded {
    fn wait(self) -> anyhow::Result<Output> {
        match self.output.recv_timeout(self.timeout) {
            Ok(out) => out.with_context(|| format!("waiting for {}", self.what)),
            Err(_) => {
                // SAFETY: kill(2) on our own child, which has not been reaped (its waiter
                // thread is still blocked in wait).
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                bail!("{} did not finish within {:?}", self.what, self.timeout)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn run(args: &Args, started: Instant) -> anyhow::Result<()> {
    let run_dir = make_run_dir(&args.out_dir)?;
    set_daemon_logs(DaemonLogs {
        echo: args.verbose,
        dir: Some(run_dir.clone()),
    });
    let mut steps: Vec<(&str, Duration)> = Vec::new();
    println!("xlb demo: an XDP load balancer in front of three web servers, on this machine.");
    println!("Logs and the configuration in force: {}", run_dir.display());

    let t = Instant::now();
    let mut world = set_up(args, &run_dir)?;
    steps.push(("set-up", t.elapsed()));

    let t = Instant::now();
    distribution(&world, &run_dir)?;
    steps.push(("distribution", t.elapsed()));

    let t = Instant::now();
    failover(&mut world)?;
    steps.push(("failover", t.elapsed()));

    let t = Instant::now();
    drain(&world)?;
    steps.push(("drain", t.elapsed()));

    let t = Instant::now();
    heading("5. Status");
    say(
        "Finally the operator's overview, `xlb status`, from the running agent over its admin \
         socket. Rates are per second over the agent's latest traffic sample; FLOWS counts \
         connection-table entries, which stay until the table needs the room, so it includes \
         the demo's finished connections.",
    );
    println!();
    world.cli(&["status"], true)?;
    steps.push(("status", t.elapsed()));

    let t = Instant::now();
    heading("Clean-up");
    let status = world.agent.terminate();
    ensure!(
        status.success(),
        "the agent exited with {status} on SIGTERM; see {}",
        run_dir.join("lb-agent.log").display()
    );
    let namespaces = 1 + 1 + CLIENTS + BACKENDS;
    drop(world);
    steps.push(("clean-up", t.elapsed()));
    say(&format!(
        "Stopped the agent (SIGTERM: it logged its totals and exited 0), nginx, the \
         decapsulators and the router's XDP program; deleted the {namespaces} namespaces and \
         the agent's pins."
    ));
    let mut line = String::new();
    for (name, d) in &steps {
        let _ = write!(line, "{name} {:.1} s, ", d.as_secs_f64());
    }
    println!();
    say(&format!(
        "Every check passed. Steps: {line}total {:.1} s.",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// A fresh run directory `<out>/run-<unix time>-<pid>`; keeps the newest [`KEEP_RUNS`].
fn make_run_dir(out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut old: Vec<PathBuf> = std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run-"))
        })
        .collect();
    // Names sort by start time (fixed-width seconds for the next few centuries).
    old.sort();
    let excess = (old.len() + 1).saturating_sub(KEEP_RUNS);
    for dir in old.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let dir = out.join(format!("run-{}-{}", now.as_secs(), std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Replaces the values of `agent.admin_socket`, `agent.state_dir` and `agent.bpffs_dir` in the
/// configuration's text; each key must be present once, on a line of its own.
fn with_run_paths(text: &str, values: &[(&str, &Path)]) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut replaced = vec![0; values.len()];
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        match values.iter().position(|(k, _)| *k == key) {
            Some(i) if line.contains('=') && !line.trim_start().starts_with('#') => {
                replaced[i] += 1;
                let _ = writeln!(out, "{key} = \"{}\"", values[i].1.display());
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for ((key, _), n) in values.iter().zip(replaced) {
        ensure!(
            n == 1,
            "the demo configuration must set agent.{key} exactly once (found {n}); the demo \
             replaces it with a per-run path"
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 1. Set-up
// ---------------------------------------------------------------------------------------------

fn set_up(args: &Args, run_dir: &Path) -> anyhow::Result<World> {
    heading("1. The set-up");
    ensure!(
        args.xlb.is_file(),
        "{} not found; build it with `cargo build -p lb-userspace --bin xlb` (or run \
         `cargo xtask demo`, which does)",
        args.xlb.display()
    );
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;

    let t = Instant::now();
    let topo = Topology::build(&Options {
        clients: CLIENTS,
        backends: BACKENDS,
        xlb: args.xlb.clone(),
    });
    let built = t.elapsed();

    // The run's copy of the configuration, with paths of its own.
    let state_dir = topo.dirs.tmp.join("state");
    let text = with_run_paths(
        &text,
        &[
            ("admin_socket", &topo.admin_socket()),
            ("state_dir", &state_dir),
            ("bpffs_dir", &topo.dirs.bpffs),
        ],
    )?;
    let config_path = run_dir.join("demo.toml");
    std::fs::write(&config_path, &text)?;
    let check = Command::new(&args.xlb)
        .args(["check", "--config"])
        .arg(&config_path)
        .output()?;
    ensure!(
        check.status.success(),
        "`xlb check` refused the demo configuration:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let config = config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        config.vips.len() == 1,
        "the demo expects one VIP in {}",
        args.config.display()
    );
    let vip = &config.vips[0];
    ensure!(
        vip.protocol.to_string() == "tcp" && vip.port == 80,
        "the demo's VIP must be HTTP: tcp port 80"
    );
    let vip_on_lo = [
        IpAddr::V4(xlb_tests::topology::VIP_V4),
        IpAddr::V6(xlb_tests::topology::VIP_V6),
    ];
    ensure!(
        vip_on_lo.contains(&vip.address),
        "the demo's VIP must be one the topology routes: {} or {}",
        vip_on_lo[0],
        vip_on_lo[1]
    );
    for b in &vip.backends {
        ensure!(
            host_of(&topo, b.address).is_some(),
            "backend {} of {} is not a host of the demo topology (backends are 10.99.3.2, \
             10.99.4.2, 10.99.5.2 and fd00:99:3::2, ...)",
            b.address,
            args.config.display()
        );
    }
    ensure!(
        vip.backends.len() == BACKENDS && vip.backends.iter().all(|b| b.weight > 0),
        "the demo expects {BACKENDS} backends, each with a weight above 0"
    );

    let t = Instant::now();
    let nginx: Vec<Option<Nginx>> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Some(Nginx::start(&b.ns, &format!("backend{i}"))))
        .collect();
    let nginx_took = t.elapsed();

    let t = Instant::now();
    let config_arg = config_path.to_str().context("non-UTF-8 run directory")?;
    let mut agent = Daemon::start(&topo.lb.ns, &args.xlb, &["agent", "--config", config_arg]);
    let attached = agent.wait_for_new(&["xlb_balancer attached"], Duration::from_secs(20));
    if attached.is_none() {
        let lines = agent.lines().join("\n");
        bail!("the agent did not attach within 20 s; it printed:\n{lines}");
    }
    let agent_took = t.elapsed();

    let world = World {
        agent,
        nginx,
        topo,
        xlb: args.xlb.clone(),
        config,
        config_path,
    };
    let vip = world.vip();
    let backends = world.backends();
    let t = &world.topo;
    let total: u32 = backends.iter().map(|b| u32::from(b.weight)).sum();
    say(&format!(
        "Every host below is a network namespace on this machine, joined to the router by a \
         veth pair (built in {}):",
        secs(built)
    ));
    println!();
    let c = &t.clients;
    let b = &t.backends;
    println!(
        "    client0 {:<12} ─┐           ┌─ backend0 {:<10} nginx, xlb decap",
        c[0].v4, b[0].v4
    );
    println!(
        "    client1 {:<12} ─┼── router ─┼─ backend1 {:<10} nginx, xlb decap",
        c[1].v4, b[1].v4
    );
    println!(
        "                          │           └─ backend2 {:<10} nginx, xlb decap",
        b[2].v4
    );
    println!(
        "                 xlb host {}  (xlb agent, XDP on eth0)",
        t.lb.v4
    );
    println!();
    say(&format!(
        "The router sends packets for the VIP {} to the xlb host. There xlb's XDP program picks \
         a backend for each new connection, wraps the packet in an IPIP header and sends it \
         back out of the same link to that backend. Each backend holds the VIP on its loopback \
         and runs `xlb decap`, which unwraps the packet for nginx; nginx answers the client \
         directly (direct server return: replies never pass through the balancer). nginx on \
         each backend answers `GET /` with the backend's name (started in {}).",
        vip.address,
        secs(nginx_took)
    ));
    println!();
    let check_out = String::from_utf8_lossy(&check.stdout);
    say(&format!(
        "The agent runs with examples/demo.toml (the run's copy, with per-run socket, state and \
         pin paths: {}; `xlb check` says \"{}\"):",
        world.config_path.display(),
        check_out
            .trim()
            .rsplit(": ok: ")
            .next()
            .map_or_else(|| check_out.trim().to_owned(), |s| format!("ok: {s}"))
    ));
    println!(
        "    VIP {} = {}:{}/{}, mode {}",
        vip.name, vip.address, vip.port, vip.protocol, vip.mode
    );
    for b in &backends {
        println!(
            "    backend {:<10} ({})  weight {:>3}  -> {:>4.1}% of new connections",
            b.address.to_string(),
            b.name,
            b.weight,
            100.0 * f64::from(b.weight) / f64::from(total)
        );
    }
    if let Some(hc) = &vip.health_check {
        let probe = match &hc.probe {
            Probe::Tcp => "TCP connect".to_owned(),
            Probe::Http(h) => format!("HTTP GET {} expecting {}", h.path, h.expected_status),
            Probe::Https(h) => format!("HTTPS GET {} expecting {}", h.path, h.expected_status),
            Probe::Udp(_) => "UDP request".to_owned(),
        };
        println!(
            "    health check: {probe} on port {}, every {} ms (timeout {} ms);",
            hc.port,
            hc.interval.as_millis(),
            hc.timeout.as_millis(),
        );
        println!(
            "                  down after {} failures in a row, up after {} passes",
            hc.fall, hc.rise
        );
    }
    println!();
    say(&format!(
        "The agent filled the maps and attached its XDP program in native mode in {}.",
        secs(agent_took)
    ));
    Ok(world)
}

// ---------------------------------------------------------------------------------------------
// 2. Distribution
// ---------------------------------------------------------------------------------------------

fn distribution(world: &World, run_dir: &Path) -> anyhow::Result<()> {
    heading("2. Distribution");
    let backends = world.backends();
    let total_weight: u32 = backends.iter().map(|b| u32::from(b.weight)).sum();
    say(&format!(
        "{REQUESTS} requests to {}, each on a new TCP connection (curl with `Connection: \
         close`), {} from each client:",
        world.url(),
        REQUESTS / world.topo.clients.len()
    ));
    let before = world.new_flows()?;
    let t = Instant::now();
    let answers = world.new_connections(REQUESTS)?;
    let took = t.elapsed();
    let after = world.new_flows()?;
    println!();
    println!("    backend    weight  expected  answered   share  xlb counted");
    let mut off = Vec::new();
    let mut counts_match = true;
    for b in &backends {
        let expected = REQUESTS as f64 * f64::from(b.weight) / f64::from(total_weight);
        let got = answers[&b.name];
        let share = 100.0 * got as f64 / REQUESTS as f64;
        let counted = after.get(&b.address).copied().unwrap_or(0)
            - before.get(&b.address).copied().unwrap_or(0);
        counts_match &= counted == got as u64;
        println!(
            "    {:<10} {:>6}  {:>8.0}  {:>8}  {:>5.1}%  {counted:>11}",
            b.name, b.weight, expected, got, share
        );
        let want = 100.0 * f64::from(b.weight) / f64::from(total_weight);
        if (share - want).abs() > SHARE_TOLERANCE_PP {
            off.push(format!("{} got {share:.1}% instead of {want:.1}%", b.name));
        }
    }
    println!();
    ensure!(
        off.is_empty(),
        "the shares do not follow the weights (tolerance {SHARE_TOLERANCE_PP} points): {}",
        off.join(", ")
    );
    let agreement = if counts_match {
        "it matches what the clients saw"
    } else {
        "a retransmitted SYN counts twice there"
    };
    // One standard deviation of the smallest share, for the reader's sense of scale.
    let p =
        f64::from(backends.iter().map(|b| b.weight).min().unwrap_or(1)) / f64::from(total_weight);
    let sd = 100.0 * (p * (1.0 - p) / REQUESTS as f64).sqrt();
    say(&format!(
        "All {REQUESTS} succeeded in {}, and the shares follow the weights within what chance \
         allows for {REQUESTS} connections (a {:.0}% share scatters by about {sd:.1} points, \
         one standard deviation; the check allows {SHARE_TOLERANCE_PP} points). The XDP program \
         hashes each new connection's addresses and ports into the VIP's Maglev table, in \
         which each backend owns slots in proportion to its weight, and records the choice \
         in its connection table so that every later packet of the connection goes to the \
         same backend. \"xlb counted\" is the agent's own count of new flows per backend \
         (from `xlb status`): {agreement}.",
        secs(took),
        100.0 * p
    ));
    println!();

    let url = world.url();
    say(&format!(
        "Now wrk for {WRK_SECONDS} s from client0: 2 threads, {WRK_CONNECTIONS} connections, \
         keep-alive on (each connection carries many requests and stays on its backend):"
    ));
    let mut cmd = world.topo.clients[0].ns.command("wrk");
    cmd.args(["-t2", &format!("-c{WRK_CONNECTIONS}")]).args([
        &format!("-d{WRK_SECONDS}s"),
        "--timeout",
        "2s",
        &url,
    ]);
    let out =
        spawn_bounded(cmd, Duration::from_secs(u64::from(WRK_SECONDS) + 20), "wrk")?.wait()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(run_dir.join("wrk.txt"), &text)?;
    ensure!(out.status.success(), "wrk failed ({}): {text}", out.status);
    let wrk = Wrk::parse(&text).with_context(|| format!("reading wrk's output:\n{text}"))?;
    ensure!(
        wrk.errors.is_empty(),
        "wrk saw errors: {}\n{text}",
        wrk.errors.join("; ")
    );
    ensure!(wrk.requests > 0, "wrk completed no request:\n{text}");
    println!();
    println!(
        "    {} requests in {WRK_SECONDS} s: {:.0} requests/s, latency avg {}, no errors",
        wrk.requests, wrk.per_sec, wrk.latency_avg
    );
    println!();
    say(
        "(Both ends share this machine's two cores with the balancer and nginx, so this \
         measures the machine more than xlb; `cargo xtask bench dataplane` measures the XDP \
         program's per-packet cost.)",
    );
    Ok(())
}

/// What the demo reads from wrk's report.
struct Wrk {
    requests: u64,
    per_sec: f64,
    latency_avg: String,
    errors: Vec<String>,
}

impl Wrk {
    fn parse(text: &str) -> Option<Wrk> {
        let mut requests = None;
        let mut per_sec = None;
        let mut latency_avg = String::from("?");
        let mut errors = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("Requests/sec:") {
                per_sec = rest.trim().parse().ok();
            } else if line.contains(" requests in ") {
                requests = line.split_whitespace().next()?.parse().ok();
            } else if let Some(rest) = line.strip_prefix("Latency") {
                latency_avg = rest.split_whitespace().next()?.to_owned();
            } else if line.starts_with("Socket errors:") || line.starts_with("Non-2xx") {
                errors.push(line.to_owned());
            }
        }
        Some(Wrk {
            requests: requests?,
            per_sec: per_sec?,
            latency_avg,
            errors,
        })
    }
}

/// "backend0 34, backend1 0, backend2 66".
fn tally(answers: &BTreeMap<String, usize>) -> String {
    answers
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// 3. Failover
// ---------------------------------------------------------------------------------------------

fn failover(world: &mut World) -> anyhow::Result<()> {
    heading("3. Failover");
    let backends = world.backends();
    // The second backend: a weight-100 one in the shipped file, so the survivors keep more
    // than the VIP's panic threshold and only healthy backends take traffic.
    let victim = &backends[1];
    let index = world
        .topo
        .backends
        .iter()
        .position(|b| IpAddr::V4(b.v4) == victim.address || IpAddr::V6(b.v6) == victim.address)
        .expect("checked at start");
    let hc = world
        .vip()
        .health_check
        .clone()
        .context("the failover step needs a health check on the VIP")?;
    let bound = hc.interval * (u32::from(hc.fall) + 1);
    let down_wait = HEALTH_WAIT.max(bound * 2);
    let up_wait = HEALTH_WAIT.max(hc.interval * (u32::from(hc.rise) + 1) * 2);
    say(&format!(
        "Stopping nginx on {} ({}). Its port now refuses connections; the agent's health checks \
         will fail, and after {} failures in a row it takes the backend out of the VIP's table \
         (expected within fall x interval + one interval = {} ms).",
        victim.name,
        victim.address,
        hc.fall,
        bound.as_millis()
    ));
    let addr = format!("backend={}", victim.address);
    world.agent.lines();
    if let Some(n) = world.nginx[index].as_mut() {
        n.stop();
    }
    world.nginx[index] = None;
    let stopped = Instant::now();
    let Some((line, at)) = world
        .agent
        .wait_for_new(&["backend down", &addr], down_wait)
    else {
        bail!(
            "the agent did not log `backend down` for {} within {down_wait:?}",
            victim.address
        );
    };
    println!();
    say(&format!(
        "After {} the agent logged (quoted from its log, lb-agent.log in the run directory):",
        secs(at - stopped)
    ));
    quote(&line);
    println!();
    let answers = world.new_connections(PROBE_REQUESTS)?;
    ensure!(
        answers[&victim.name] == 0,
        "{} answered {} requests after it was taken out",
        victim.name,
        answers[&victim.name]
    );
    say(&format!(
        "The maps had changed before the line was written, so every new connection avoids \
         it: {PROBE_REQUESTS} new requests, all succeeded: {}.",
        tally(&answers)
    ));
    println!();

    say(&format!(
        "Starting nginx on {} again; after {} passed checks it rejoins.",
        victim.name, hc.rise
    ));
    world.agent.lines();
    let host = &world.topo.backends[index];
    world.nginx[index] = Some(Nginx::start(&host.ns, &victim.name));
    let started = Instant::now();
    let Some((line, at)) = world.agent.wait_for_new(&["backend up", &addr], up_wait) else {
        bail!(
            "the agent did not log `backend up` for {} within {up_wait:?}",
            victim.address
        );
    };
    println!();
    say(&format!("After {} the agent logged:", secs(at - started)));
    quote(&line);
    println!();
    let answers = world.new_connections(PROBE_REQUESTS)?;
    ensure!(
        answers[&victim.name] > 0,
        "{} answered none of {PROBE_REQUESTS} new requests after it came back: {}",
        victim.name,
        tally(&answers)
    );
    say(&format!(
        "{PROBE_REQUESTS} new requests: {}. {} takes its share again.",
        tally(&answers),
        victim.name
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Drain
// ---------------------------------------------------------------------------------------------

fn drain(world: &World) -> anyhow::Result<()> {
    heading("4. Drain");
    let backends = world.backends();
    // The heaviest backend: half of the connections land there, so a few tries suffice.
    let target = backends
        .iter()
        .max_by_key(|b| b.weight)
        .expect("three backends");
    let client = &world.topo.clients[1];
    let vip = world.vip();
    let vip_addr = SocketAddr::new(vip.address, vip.port);
    say(&format!(
        "Draining takes a backend out of the choice for new connections while its open \
         connections carry on, for maintenance without cutting anyone off. First, keep-alive \
         HTTP connections from client1 until {HELD_CONNECTIONS} of them are served by {} \
         ({}):",
        target.name, target.address
    ));
    let mut held = Vec::new();
    let mut opened = 0;
    while held.len() < HELD_CONNECTIONS {
        ensure!(
            opened < 40,
            "only {} of 40 connections landed on {}",
            held.len(),
            target.name
        );
        opened += 1;
        let mut conn = HttpConn::open(&client.ns, vip_addr).context("connecting to the VIP")?;
        let (status, body) = conn.get("/").context("GET / on a new connection")?;
        ensure!(status == 200, "GET / answered {status}");
        if body.trim() == target.name {
            held.push(conn);
        }
        // Others close here: only connections on the drained backend matter.
    }
    println!();
    for conn in &held {
        println!(
            "    {} -> {}  (connection stays open)",
            conn.local_addr()?,
            target.name
        );
    }
    println!();
    let elsewhere = match opened - held.len() {
        0 => String::new(),
        1 => "(The 1 connection that landed elsewhere was closed.) ".to_owned(),
        n => format!("(The {n} connections that landed elsewhere were closed.) "),
    };
    say(&format!(
        "{elsewhere}Now the operator drains {} with the real CLI, through the agent's admin \
         socket:",
        target.name
    ));
    println!();
    let address = target.address.to_string();
    world.cli(&["backend", "drain", &vip.name, &address], true)?;
    println!();
    world.cli(&["backend", "list", &vip.name], true)?;
    println!();
    let mut answered = 0;
    let rounds = 5;
    for conn in &mut held {
        for _ in 0..rounds {
            let (status, body) = conn
                .get("/")
                .context("a request on a connection opened before the drain")?;
            ensure!(
                status == 200 && body.trim() == target.name,
                "an open connection was answered by {} ({status}) after the drain, not {}",
                body.trim(),
                target.name
            );
            answered += 1;
        }
    }
    let answers = world.new_connections(PROBE_REQUESTS)?;
    ensure!(
        answers[&target.name] == 0,
        "{} answered {} new requests while drained",
        target.name,
        answers[&target.name]
    );
    say(&format!(
        "The {HELD_CONNECTIONS} open connections sent {rounds} more requests each: {answered} \
         of {answered} answered by {}, which is drained (the connection table keeps \
         established flows on their backend). Meanwhile {PROBE_REQUESTS} new connections: {}; \
         none reach {}.",
        target.name,
        tally(&answers),
        target.name
    ));
    println!();
    world.cli(&["backend", "undrain", &vip.name, &address], true)?;
    println!();
    drop(held);
    let answers = world.new_connections(PROBE_REQUESTS)?;
    ensure!(
        answers[&target.name] > 0,
        "{} answered none of {PROBE_REQUESTS} new requests after the undrain: {}",
        target.name,
        tally(&answers)
    );
    say(&format!(
        "Undrained, it takes new connections again: {PROBE_REQUESTS} new requests: {}.",
        tally(&answers)
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped file is valid as it stands (`xlb check` on it must pass) and describes the
    /// demo topology: one VIP the router routes, the three backend hosts, weights 1:1:2.
    #[test]
    fn shipped_demo_toml_is_valid_and_matches_the_topology() {
        let config = config::load(&workspace().join("examples/demo.toml"))
            .unwrap_or_else(|e| panic!("examples/demo.toml: {e}"));
        assert_eq!(config.vips.len(), 1);
        let vip = &config.vips[0];
        assert_eq!(vip.address, IpAddr::V4(xlb_tests::topology::VIP_V4));
        assert_eq!(vip.port, 80);
        let backends: Vec<(String, u16)> = vip
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("10.99.3.2".to_owned(), 100),
                ("10.99.4.2".to_owned(), 100),
                ("10.99.5.2".to_owned(), 200)
            ]
        );
        let hc = vip.health_check.as_ref().expect("a health check");
        assert!(hc.interval <= Duration::from_millis(300) && hc.fall == 2 && hc.rise == 2);
        assert_eq!(
            config
                .agent
                .encap_source_v4
                .map(|p| p.addr.to_string())
                .as_deref(),
            Some("10.99.2.2")
        );
    }

    #[test]
    fn run_paths_replace_each_key_once_and_keep_the_rest() {
        let text = "[agent]\n# admin_socket = \"/x\" (a comment)\nadmin_socket = \"/a\"\n\
                    state_dir=\"/b\"\ninterface = \"eth0\"\n";
        let out = with_run_paths(
            text,
            &[
                ("admin_socket", Path::new("/run/1/admin.sock")),
                ("state_dir", Path::new("/run/1/state")),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "[agent]\n# admin_socket = \"/x\" (a comment)\nadmin_socket = \"/run/1/admin.sock\"\n\
             state_dir = \"/run/1/state\"\ninterface = \"eth0\"\n"
        );
    }

    #[test]
    fn run_paths_refuse_a_missing_or_repeated_key() {
        let values: &[(&str, &Path)] = &[("bpffs_dir", Path::new("/p"))];
        let missing = with_run_paths("[agent]\n", values).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("agent.bpffs_dir exactly once (found 0)")
        );
        let twice = with_run_paths("bpffs_dir = \"/a\"\nbpffs_dir = \"/b\"\n", values);
        assert!(twice.is_err());
    }

    #[test]
    fn wrk_report_is_read() {
        let report = "Running 5s test @ http://203.0.113.10/\n  2 threads and 16 connections\n  \
                      Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   \
                      256.76us  1.02ms  30.01ms   98.00%\n    Req/Sec    28.07k     2.11k   \
                      31.90k    71.00%\n  279354 requests in 5.00s, 46.09MB read\n\
                      Requests/sec:  55808.21\nTransfer/sec:      9.21MB\n";
        let wrk = Wrk::parse(report).unwrap();
        assert_eq!(wrk.requests, 279_354);
        assert!((wrk.per_sec - 55_808.21).abs() < 0.01);
        assert_eq!(wrk.latency_avg, "256.76us");
        assert!(wrk.errors.is_empty());
        let failing = format!("{report}  Socket errors: connect 3, read 0, write 0, timeout 0\n");
        assert_eq!(Wrk::parse(&failing).unwrap().errors.len(), 1);
    }
}
