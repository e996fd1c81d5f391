//! The real `xlb` binary on real veth interfaces in namespaces this test creates. Needs root.
//! Run serially (`--test-threads=1`): each test builds and tears down its own hosts.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use xlb_tests::{
    frames,
    netns::{AgentDirs, Netns, in_netns, spawn_in_netns, sweep_stale, veth_pair},
    topology::{Daemon, Options, Topology, run_cli, xlb_bin},
};

/// A running `xlb` whose stderr lines are collected; killed on drop if still running.
type Agent = Daemon;

/// Starts the `xlb` binary under test in `ns`.
fn start_xlb(ns: &Netns, args: &[&str]) -> Agent {
    Daemon::start(ns, &xlb_bin(), args)
}

/// Two hosts joined by one veth pair: `client` (10.99.0.1, fd00:99::1) and `lb` (10.99.0.2,
/// fd00:99::2), where the agent runs.
struct Pair {
    client: Netns,
    lb: Netns,
}

fn two_hosts() -> Pair {
    sweep_stale();
    let client = Netns::create("client");
    let lb = Netns::create("lb");
    veth_pair(&client, "eth0", &lb, "eth0");
    client.run(&["ip", "addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    lb.run(&["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    client.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:99::1/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    lb.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:99::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    Pair { client, lb }
}

fn counter(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    // The line reads `... counters=rx_packets=15 rx_bytes=1344 ...`.
    line.replace("counters=", "")
        .split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn attached_and_passes_traffic(mode: &str, expect_mode: &str) {
    let hosts = two_hosts();
    let mut agent = start_xlb(
        &hosts.lb,
        &["agent", "--interface", "eth0", "--xdp-mode", mode],
    );
    let line = agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert!(line.contains(&format!("mode={expect_mode}")), "{line}");
    let link = hosts.lb.run(&["ip", "link", "show", "dev", "eth0"]);
    assert!(link.contains("xdp"), "no XDP program on eth0: {link}");

    // The program passes everything: IPv4 and IPv6 pings get answered by the lb host's stack.
    hosts
        .client
        .run(&["ping", "-c", "5", "-i", "0.2", "-W", "2", "10.99.0.2"]);
    hosts.client.run(&[
        "ping",
        "-6",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "fd00:99::2",
    ]);
    // A UDP datagram and a TCP SYN (answered by RST: nothing listens) from the client.
    hosts.client.run(&[
        "bash",
        "-c",
        "echo hello > /dev/udp/10.99.0.2/9999; (exec 3<>/dev/tcp/10.99.0.2/7) 2>/dev/null; true",
    ]);
    // A malformed frame (IHL 3) reaches the XDP program and is logged through aya-log.
    let mut bad = frames::tcp_v4(40000, 80, b"");
    bad[..6].copy_from_slice(&[0xff; 6]);
    frames::set_ipv4_ihl(&mut bad, 3);
    hosts.client.send_raw_frame("eth0", &bad);
    agent.wait_for("malformed IPv4 header", Duration::from_secs(10));

    let status = agent.terminate();
    assert!(status.success(), "xlb exited with {status}");
    let totals = agent.wait_for("stopping; detaching", Duration::from_secs(5));
    assert!(counter(&totals, "l3_ipv4") >= 7, "{totals}");
    assert!(counter(&totals, "l3_ipv6") >= 3, "{totals}");
    assert!(counter(&totals, "l4_udp") >= 1, "{totals}");
    assert!(counter(&totals, "l4_tcp") >= 1, "{totals}");
    assert!(counter(&totals, "l3_malformed") >= 1, "{totals}");
    // No VIPs are configured: everything well-formed passes; the malformed frame is dropped.
    assert_eq!(
        counter(&totals, "action_drop"),
        counter(&totals, "l3_malformed"),
        "{totals}"
    );
    assert_eq!(
        counter(&totals, "rx_packets"),
        counter(&totals, "action_pass") + counter(&totals, "action_drop"),
        "{totals}"
    );

    let link = hosts.lb.run(&["ip", "link", "show", "dev", "eth0"]);
    assert!(
        !link.contains("xdp"),
        "XDP program left attached after exit: {link}"
    );
    // Traffic still flows once detached.
    hosts
        .client
        .run(&["ping", "-c", "1", "-W", "2", "10.99.0.2"]);
}

#[test]
fn agent_native_mode_counts_logs_and_detaches() {
    attached_and_passes_traffic("native", "native");
}

#[test]
fn agent_generic_mode_counts_logs_and_detaches() {
    attached_and_passes_traffic("generic", "generic");
}

#[test]
fn agent_auto_mode_prefers_native_on_veth() {
    let hosts = two_hosts();
    let mut agent = start_xlb(&hosts.lb, &["agent", "--interface", "eth0"]);
    let line = agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert!(line.contains("mode=native"), "{line}");
    assert!(agent.terminate().success());
}

#[test]
fn agent_reports_an_unknown_interface_in_one_line() {
    let hosts = two_hosts();
    let out = hosts
        .lb
        .command(xlb_bin().to_str().unwrap())
        .args(["agent", "--interface", "nosuch0"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run xlb");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nosuch0"), "{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
}

/// Guards remove everything they created: after a test's hosts are dropped, no namespace of
/// this process remains.
#[test]
fn namespaces_are_removed_when_guards_drop() {
    let name = {
        let hosts = two_hosts();
        hosts.client.name().to_string()
    };
    let _ = Command::new("true").status();
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "namespace {name} survived its guard"
    );
}

/// Writes a file the test removes on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("xlbt-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("writing a temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The single-arm deployment of `xlb_tests::topology` with one client and `n` backends, its
/// hosts by role. Backend `i` is 10.99.(3+i).2. Field order is drop order: processes, then
/// namespaces, then the agent's directories.
struct Lab {
    // Kept for their Drop: the backends' decapsulators and the pass program on the router's
    // side of the xlb host's link run as long as the lab does.
    decaps: Vec<Agent>,
    _router_xdp: Agent,
    client: Netns,
    lb: Netns,
    backends: Vec<Netns>,
    _router: Netns,
    /// The xlb host agent's socket, state and pin directories (removed last).
    dirs: AgentDirs,
}

const LAB_VIP: &str = "203.0.113.10";

fn lab(n: usize) -> Lab {
    let Topology {
        decaps,
        router_xdp,
        clients,
        lb,
        backends,
        router,
        dirs,
        ..
    } = Topology::build(&Options {
        clients: 1,
        backends: n,
        xlb: xlb_bin(),
    });
    Lab {
        decaps,
        _router_xdp: router_xdp,
        client: clients.into_iter().next().expect("one client").ns,
        lb: lb.ns,
        backends: backends.into_iter().map(|h| h.ns).collect(),
        _router: router,
        dirs,
    }
}

/// A TCP server in a backend host on port 80 of every address (the VIP and its own, so health
/// checks reach it too) answering each request with its name; stops (its port then refuses
/// connections) when dropped.
struct Server {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, name: &str) -> Server {
        let listener = in_netns(ns, || TcpListener::bind("0.0.0.0:80").expect("bind :80"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 256];
                        let n = s.read(&mut buf).unwrap_or(0);
                        let _ = s.write_all(
                            format!("{name}: {}", String::from_utf8_lossy(&buf[..n])).as_bytes(),
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Scrapes the agent's metrics endpoint (default 127.0.0.1:9641 in the xlb host's namespace).
fn scrape(lb: &Netns) -> String {
    in_netns(lb, || {
        let mut s =
            TcpStream::connect_timeout(&"127.0.0.1:9641".parse().unwrap(), Duration::from_secs(3))
                .expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    })
}

/// The value of one sample line (`name{labels}`) of a scrape.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// `count` connections from the client host to the VIP; each returns the answering backend's
/// reply, or the error.
fn connect_many(client: &Netns, count: usize, tag: &str) -> Vec<Result<String, String>> {
    let tag = tag.to_string();
    spawn_in_netns(client, move || {
        let vip: SocketAddr = format!("{LAB_VIP}:80").parse().unwrap();
        (0..count)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .map_err(|e| format!("connect {i}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.write_all(format!("{tag} {i}").as_bytes())
                    .map_err(|e| format!("write {i}: {e}"))?;
                let mut out = String::new();
                s.read_to_string(&mut out)
                    .map_err(|e| format!("read {i}: {e}"))?;
                Ok(out)
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

fn lab_config(dirs: &AgentDirs, backends: usize, health: &str) -> String {
    let paths = dirs.agent_keys();
    let mut text = format!(
        r#"
[agent]
interface = "eth0"
xdp_mode = "native"
next_hop_mac = "auto"
encap_source_v4 = "10.99.2.2/32"
egress_mtu = 1500
flow_table_entries = 65536
{paths}

[[vip]]
name = "web"
address = "{LAB_VIP}"
port = 80
protocol = "tcp"
{health}
"#
    );
    for i in 0..backends {
        text.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"10.99.{}.2\"\n",
            3 + i
        ));
    }
    text
}

/// Real TCP through the real data path: client -> router -> xlb host (XDP encapsulates and
/// sends back to the router) -> router -> backend (xlb decap strips the tunnel, the VIP on
/// loopback answers) -> reply straight to the client. The agent is configured from a file.
#[test]
fn tcp_through_the_balancer_and_decap_reaches_the_backend_and_replies_directly() {
    let lab = lab(2);
    let _servers: Vec<Server> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Server::start(b, &format!("backend{i}")))
        .collect();
    let config = TempFile::new("xlb.toml", &lab_config(&lab.dirs, 2, ""));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("configuration applied", Duration::from_secs(20));
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));

    const CONNECTIONS: usize = 40;
    let replies = connect_many(&lab.client, CONNECTIONS, "hello");
    let mut per_backend = [0usize; 2];
    for (i, r) in replies.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert!(r.ends_with(&format!("hello {i}")), "reply {i}: {r:?}");
        per_backend[if r.starts_with("backend0") { 0 } else { 1 }] += 1;
    }
    assert!(per_backend[0] > 0 && per_backend[1] > 0, "{per_backend:?}");

    // The metrics endpoint shows the same traffic.
    let m = scrape(&lab.lb);
    assert!(
        sample(&m, "xlb_vip_new_flows_total{vip=\"web\"}") >= CONNECTIONS as f64,
        "{m}"
    );
    assert!(
        sample(&m, "xlb_vip_packets_total{vip=\"web\"}") >= 3.0 * CONNECTIONS as f64,
        "{m}"
    );
    let per: f64 = (0..2)
        .map(|i| {
            sample(
                &m,
                &format!(
                    "xlb_backend_new_flows_total{{vip=\"web\",backend=\"10.99.{}.2\"}}",
                    3 + i
                ),
            )
        })
        .sum();
    assert_eq!(
        per,
        sample(&m, "xlb_vip_new_flows_total{vip=\"web\"}"),
        "{m}"
    );
    assert_eq!(
        sample(&m, "xlb_backend_up{vip=\"web\",backend=\"10.99.3.2\"}"),
        1.0
    );
    assert!(
        sample(&m, "xlb_datapath_events_total{event=\"fwd_encap_v4\"}") >= 3.0 * CONNECTIONS as f64
    );

    assert!(agent.terminate().success());
    let totals = agent.wait_for("stopping;", Duration::from_secs(5));
    assert!(
        counter(&totals, "fwd_encap_v4") >= 3 * CONNECTIONS as u64,
        "{totals}"
    );
    assert!(
        counter(&totals, "ct_miss") >= CONNECTIONS as u64,
        "{totals}"
    );
    assert!(counter(&totals, "ct_hit") >= CONNECTIONS as u64, "{totals}");
    let mut decapped = 0;
    for mut d in lab.decaps {
        assert!(d.terminate().success());
        decapped += counter(
            &d.wait_for("stopping; detaching", Duration::from_secs(5)),
            "decap_v4",
        );
    }
    assert!(
        decapped >= 3 * CONNECTIONS as u64,
        "decap_v4 total {decapped}"
    );
}

/// Health checks steer traffic: a backend whose server stops is taken out of the table within
/// fall x interval (+ one interval), after which no new connection fails; when it comes back it
/// rejoins after `rise` good checks.
#[test]
fn a_failed_backend_is_taken_out_and_rejoins_after_rise_checks() {
    let lab = lab(2);
    let mut server0 = Some(Server::start(&lab.backends[0], "backend0"));
    let _server1 = Server::start(&lab.backends[1], "backend1");
    let health = "[vip.health_check]\ntype = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n";
    let config = TempFile::new("xlb-health.toml", &lab_config(&lab.dirs, 2, health));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));

    let seen = |replies: &[Result<String, String>]| {
        let mut per = [0usize; 2];
        for r in replies {
            let r = r.as_ref().unwrap_or_else(|e| panic!("{e}"));
            per[if r.starts_with("backend0") { 0 } else { 1 }] += 1;
        }
        per
    };
    let before = seen(&connect_many(&lab.client, 30, "before"));
    assert!(before[0] > 0 && before[1] > 0, "{before:?}");

    drop(server0.take());
    let stopped = Instant::now();
    agent.wait_for("backend down", Duration::from_secs(10));
    let detected = stopped.elapsed();
    eprintln!("backend0 marked down {detected:?} after its server stopped");
    // fall (2) x interval (200 ms) + one interval, with room for a loaded machine.
    assert!(detected < Duration::from_secs(3), "took {detected:?}");
    let during = seen(&connect_many(&lab.client, 30, "during"));
    assert_eq!(
        during,
        [0, 30],
        "every new connection goes to the healthy backend"
    );
    let m = scrape(&lab.lb);
    assert_eq!(
        sample(&m, "xlb_backend_up{vip=\"web\",backend=\"10.99.3.2\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "xlb_backend_up{vip=\"web\",backend=\"10.99.4.2\"}"),
        1.0,
        "{m}"
    );
    // Every check is in the duration histogram under its result.
    let checks = |m: &str, backend: &str, result: &str| {
        sample(
            m,
            &format!(
                "xlb_health_check_duration_seconds_count{{vip=\"web\",backend=\"{backend}\",result=\"{result}\"}}"
            ),
        )
    };
    let failed0 = checks(&m, "10.99.3.2", "fail");
    let passed0 = checks(&m, "10.99.3.2", "ok");
    let passed1 = checks(&m, "10.99.4.2", "ok");
    assert!(failed0 >= 2.0, "fall is 2: {m}");
    assert!(
        passed0 >= 1.0,
        "checked once before its server stopped: {m}"
    );
    assert!(passed1 >= 1.0, "{m}");
    assert_eq!(checks(&m, "10.99.4.2", "fail"), 0.0, "{m}");

    // A reload that lists the backends the other way round moves their indices: state and
    // histograms follow the backend, not the index, and are not reset.
    let mut swapped = lab_config(&lab.dirs, 0, health);
    swapped.push_str("\n[[vip.backend]]\naddress = \"10.99.4.2\"\n");
    swapped.push_str("\n[[vip.backend]]\naddress = \"10.99.3.2\"\n");
    std::fs::write(&config.0, swapped).expect("rewriting the configuration");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    agent.wait_for("configuration reloaded", Duration::from_secs(10));
    let m = scrape(&lab.lb);
    assert_eq!(
        sample(&m, "xlb_backend_up{vip=\"web\",backend=\"10.99.3.2\"}"),
        0.0,
        "still down after the reload: {m}"
    );
    assert!(checks(&m, "10.99.3.2", "fail") >= failed0, "{m}");
    assert!(checks(&m, "10.99.4.2", "ok") >= passed1, "{m}");
    assert_eq!(checks(&m, "10.99.4.2", "fail"), 0.0, "{m}");
    // Down since before the reload: no passed check since, and none of the other's.
    assert_eq!(checks(&m, "10.99.3.2", "ok"), passed0, "{m}");

    let _server0 = Server::start(&lab.backends[0], "backend0");
    agent.wait_for("backend up", Duration::from_secs(10));
    let after = seen(&connect_many(&lab.client, 40, "after"));
    assert!(after[0] > 0, "backend0 rejoined: {after:?}");
    assert!(agent.terminate().success());
}

/// A configuration with errors is refused at start, naming file, line and key.
#[test]
fn the_agent_refuses_an_invalid_configuration() {
    sweep_stale();
    let hosts = two_hosts();
    let config = TempFile::new(
        "bad.toml",
        "[agent]\ninterface = \"eth0\"\negress_mtu = 100\n",
    );
    let out = hosts
        .lb
        .command(xlb_bin().to_str().unwrap())
        .args(["agent", "--config", config.0.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .expect("run xlb");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":3: agent.egress_mtu"), "{stderr}");
    let link = hosts.lb.run(&["ip", "link", "show", "dev", "eth0"]);
    assert!(!link.contains("xdp"), "nothing may be attached: {link}");
}

/// `--log-format json` writes one JSON object per line, with the event's fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let hosts = two_hosts();
    let mut agent = start_xlb(
        &hosts.lb,
        &["--log-format", "json", "agent", "--interface", "eth0"],
    );
    let line = agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["fields"]["message"], "xlb_balancer attached", "{line}");
    assert_eq!(v["fields"]["interface"], "eth0", "{line}");
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(agent.terminate().success());
}

/// A second balancer on an interface that already has one is refused with a message that
/// names the cause (not a driver problem), and the first keeps running.
#[test]
fn a_second_agent_on_a_busy_interface_is_refused_clearly() {
    let hosts = two_hosts();
    let mut first = start_xlb(&hosts.lb, &["agent", "--interface", "eth0"]);
    first.wait_for("xlb_balancer attached", Duration::from_secs(20));
    let out = hosts
        .lb
        .command(xlb_bin().to_str().unwrap())
        .args(["agent", "--interface", "eth0"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run xlb");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already attached"), "{stderr}");
    assert!(!stderr.contains("refused by the driver"), "{stderr}");
    hosts
        .client
        .run(&["ping", "-c", "1", "-W", "2", "10.99.0.2"]);
    assert!(first.terminate().success());
}

/// A TCP server on port 80 of a backend host that keeps each connection open and answers
/// every message with its name, for connections that must live across agent restarts.
struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Netns, name: &str) -> EchoServer {
        let listener = in_netns(ns, || TcpListener::bind("0.0.0.0:80").expect("bind :80"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let name = name.clone();
                        let flag = flag.clone();
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 256];
                            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        let reply = format!(
                                            "{name}: {}",
                                            String::from_utf8_lossy(&buf[..n])
                                        );
                                        if s.write_all(reply.as_bytes()).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens `count` long-lived connections from the client to the VIP.
fn open_connections(client: &Netns, count: usize) -> Vec<TcpStream> {
    in_netns(client, move || {
        let vip: SocketAddr = format!("{LAB_VIP}:80").parse().unwrap();
        (0..count)
            .map(|i| {
                let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s
            })
            .collect()
    })
}

/// One message on each connection; returns the name of the backend that answered each.
fn ask_each(conns: &mut [TcpStream], what: &str) -> Vec<String> {
    conns
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let msg = format!("{what} {i}");
            s.write_all(msg.as_bytes())
                .unwrap_or_else(|e| panic!("{what}: write on connection {i}: {e}"));
            let mut buf = [0u8; 256];
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("{what}: read on connection {i}: {e}"));
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (name, echoed) = reply
                .split_once(": ")
                .unwrap_or_else(|| panic!("{what}: odd reply on connection {i}: {reply:?}"));
            assert_eq!(echoed, msg, "{what}: connection {i}");
            name.to_string()
        })
        .collect()
}

/// Hitless restart: SIGTERM and kill -9 leave the program attached with its pinned maps; the
/// next agent adopts them. Established connections keep their backend even when the restarted
/// agent's configuration changes the Maglev table (which would move about a third of them if
/// the connection table were lost), and keep working while no agent runs at all.
#[test]
fn established_connections_survive_sigterm_and_kill_9_restarts_of_the_agent() {
    let lab = lab(3);
    let _servers: Vec<EchoServer> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| EchoServer::start(b, &format!("backend{i}")))
        .collect();
    let two = TempFile::new("xlb-restart-2.toml", &lab_config(&lab.dirs, 2, ""));
    let three = TempFile::new("xlb-restart-3.toml", &lab_config(&lab.dirs, 3, ""));
    let start = |file: &TempFile, extra: &[&str]| {
        let mut args = vec!["agent", "--config", file.0.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut a = start_xlb(&lab.lb, &args);
        a.wait_for("xlb_balancer attached", Duration::from_secs(20));
        a
    };
    let xdp_attached = || {
        lab.lb
            .run(&["ip", "link", "show", "dev", "eth0"])
            .contains("xdp")
    };

    let mut agent = start(&two, &[]);
    let mut conns = open_connections(&lab.client, 30);
    let placed = ask_each(&mut conns, "first");
    assert!(
        placed.iter().all(|b| b == "backend0" || b == "backend1"),
        "{placed:?}"
    );

    // SIGTERM: the agent exits, the program and its state stay.
    assert!(agent.terminate().success());
    agent.wait_for(
        "stays attached with its pinned state",
        Duration::from_secs(5),
    );
    assert!(xdp_attached(), "SIGTERM must leave the balancer attached");
    assert!(lab.dirs.bpffs.join("link").exists());
    assert_eq!(ask_each(&mut conns, "no agent"), placed);

    // A new agent with a third backend adopts the maps: the table changes, the flows do not.
    let mut agent = start(&three, &[]);
    agent.wait_for("adopted the pinned maps", Duration::from_secs(5));
    agent.wait_for("took over the pinned XDP link", Duration::from_secs(5));
    assert_eq!(ask_each(&mut conns, "after SIGTERM restart"), placed);
    let mut fresh = open_connections(&lab.client, 30);
    let fresh = ask_each(&mut fresh, "new");
    assert!(
        fresh.iter().any(|b| b == "backend2"),
        "new connections use the new table: {fresh:?}"
    );

    // kill -9: nothing runs on exit; the next agent adopts all the same.
    agent.child.kill().expect("kill -9");
    agent.child.wait().expect("reap");
    assert!(xdp_attached(), "kill -9 leaves the balancer attached");
    assert_eq!(ask_each(&mut conns, "killed"), placed);
    let mut agent = start(&three, &["--detach-on-exit"]);
    agent.wait_for("adopted the pinned maps", Duration::from_secs(5));
    assert_eq!(ask_each(&mut conns, "after kill -9 restart"), placed);

    // The explicit way out: detach and remove every pin.
    assert!(agent.terminate().success());
    assert!(!xdp_attached(), "--detach-on-exit detaches");
    assert!(
        !lab.dirs.bpffs.exists(),
        "--detach-on-exit removes the pins"
    );
}

/// `xlb decap attach` leaves the decapsulator attached (pinned) after it exits, a second attach
/// replaces it in place, `xlb decap detach` removes it, and a detach with nothing attached says
/// so. Ordinary traffic passes throughout.
#[test]
fn decap_attach_stays_after_the_command_exits_and_detach_removes_it() {
    let hosts = two_hosts();
    let dirs = AgentDirs::create("decap");
    let bpffs = dirs.bpffs.to_str().unwrap().to_string();
    let xlb = |args: &[&str]| {
        let out = hosts
            .lb
            .command(xlb_bin().to_str().unwrap())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run xlb");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let xdp_prog = || {
        let link = hosts.lb.run(&["ip", "link", "show", "dev", "eth0"]);
        link.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .map(str::to_string)
    };
    let attach = [
        "decap",
        "attach",
        "--interface",
        "eth0",
        "--address",
        "10.99.0.2",
        "--xdp-mode",
        "native",
        "--bpffs-dir",
        &bpffs,
    ];
    let (code, err) = xlb(&attach);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("attached in native mode"), "{err}");
    let first = xdp_prog().expect("a program is attached after the command exited");
    hosts
        .client
        .run(&["ping", "-c", "1", "-W", "2", "10.99.0.2"]);

    let (code, err) = xlb(&attach);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("replaced the attached decapsulator"), "{err}");
    let second = xdp_prog().expect("still attached");
    assert_ne!(first, second, "the program was replaced");
    hosts
        .client
        .run(&["ping", "-c", "1", "-W", "2", "10.99.0.2"]);

    let detach = [
        "decap",
        "detach",
        "--interface",
        "eth0",
        "--bpffs-dir",
        &bpffs,
    ];
    let (code, err) = xlb(&detach);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(xdp_prog(), None, "detached");
    let (code, err) = xlb(&detach);
    assert_eq!(code, Some(1));
    assert!(err.contains("no decapsulator attached"), "{err}");
}

/// The next hop is resolved over netlink and followed: with the lb host's neighbour table
/// flushed the agent gets the router's MAC resolved by itself; when the router's MAC changes
/// and the neighbour table learns it, the agent rewrites the maps within the change
/// notification's burst, and new connections go through again.
#[test]
fn the_next_hop_mac_is_resolved_and_followed_when_it_changes() {
    let lab = lab(1);
    let _server = Server::start(&lab.backends[0], "backend0");
    lab.lb.run(&["ip", "neigh", "flush", "dev", "eth0"]);
    let config = TempFile::new("xlb-nexthop.toml", &lab_config(&lab.dirs, 1, ""));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("configuration applied", Duration::from_secs(20));
    let ok = |tag: &str| {
        connect_many(&lab.client, 5, tag)
            .iter()
            .filter(|r| r.is_ok())
            .count()
    };
    assert_eq!(ok("first"), 5, "the next hop was resolved at start");

    let new_mac = "02:00:00:aa:bb:cc";
    lab._router
        .run(&["ip", "link", "set", "dev", "l0", "address", new_mac]);
    lab.lb.run(&[
        "ip",
        "neigh",
        "replace",
        "10.99.2.1",
        "lladdr",
        new_mac,
        "dev",
        "eth0",
        "nud",
        "reachable",
    ]);
    let line = agent.wait_for("next hop MAC changed", Duration::from_secs(5));
    assert!(line.contains(new_mac), "{line}");
    assert_eq!(ok("after"), 5, "frames go to the router's new MAC");
    assert!(agent.terminate().success());
}

/// Maps that do not fit the new agent (another layout version after an upgrade, or a changed
/// connection-table size) are not adopted: the new agent starts with fresh maps, still takes
/// over the pinned link without detaching, and removes the old maps. With the backend set
/// unchanged, Maglev sends every established connection to the backend it had anyway.
#[test]
fn maps_of_another_layout_are_replaced_without_detaching() {
    let lab = lab(2);
    let _servers: Vec<EchoServer> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| EchoServer::start(b, &format!("backend{i}")))
        .collect();
    let config = TempFile::new("xlb-layout.toml", &lab_config(&lab.dirs, 2, ""));
    let smaller = TempFile::new(
        "xlb-layout-small.toml",
        &lab_config(&lab.dirs, 2, "")
            .replace("flow_table_entries = 65536", "flow_table_entries = 32768"),
    );
    let start = |file: &TempFile| {
        let mut a = start_xlb(&lab.lb, &["agent", "--config", file.0.to_str().unwrap()]);
        a.wait_for("xlb_balancer attached", Duration::from_secs(20));
        a
    };
    let mut agent = start(&config);
    let mut conns = open_connections(&lab.client, 20);
    let placed = ask_each(&mut conns, "first");
    assert!(agent.terminate().success());

    // An older agent's maps: the same pins under another layout directory.
    let current = std::fs::read_dir(&lab.dirs.bpffs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("maps-v")
        })
        .expect("a maps directory");
    let older = lab.dirs.bpffs.join("maps-v0");
    std::fs::rename(&current, &older).expect("rename on bpffs");
    let mut agent = start(&config);
    agent.wait_for("took over the pinned XDP link", Duration::from_secs(5));
    agent.wait_for("removed maps of an older layout", Duration::from_secs(5));
    assert!(!older.exists());
    assert_eq!(ask_each(&mut conns, "after layout change"), placed);
    assert!(agent.terminate().success());

    // A different connection-table size cannot be adopted either.
    let mut agent = start(&smaller);
    agent.wait_for("pinned maps do not fit this build", Duration::from_secs(5));
    agent.wait_for("took over the pinned XDP link", Duration::from_secs(5));
    assert_eq!(ask_each(&mut conns, "after resize"), placed);
    assert!(agent.terminate().success());
}

/// The run-time CLI against the real agent: `xlb` run in the xlb host's namespace with
/// `--socket`, its exit code, stdout and stderr.
fn xlb_cli(ns: &Netns, socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    run_cli(ns, &xlb_bin(), socket, args)
}

/// Runs the CLI, expects exit 0, and parses its stdout as JSON.
fn xlb_json(ns: &Netns, socket: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = xlb_cli(ns, socket, args);
    assert_eq!(code, 0, "xlb {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Which backend (index into `lab.backends`) answered each connection; panics on a failure.
fn answered_by(replies: &[Result<String, String>], n: usize) -> Vec<usize> {
    let mut per = vec![0; n];
    for r in replies {
        let r = r.as_ref().unwrap_or_else(|e| panic!("{e}"));
        let i = (0..n)
            .find(|i| r.starts_with(&format!("backend{i}:")))
            .unwrap_or_else(|| panic!("unexpected reply {r:?}"));
        per[i] += 1;
    }
    per
}

/// The admin API end to end: the real agent with its socket and state in a temp dir, driven by
/// the real `xlb` CLI. Drains, additions and weights steer new connections; refused changes and
/// a broken reload change nothing; run-time changes survive a restart; a missing agent is one
/// line and exit 3.
#[test]
fn the_cli_changes_the_running_agent_and_the_changes_survive_a_restart() {
    let lab = lab(3);
    let _servers: Vec<Server> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Server::start(b, &format!("backend{i}")))
        .collect();
    let socket = lab.dirs.tmp.join("admin.sock");
    let health = "[vip.health_check]\ntype = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\n";
    let good = lab_config(&lab.dirs, 2, health);
    let config = TempFile::new("xlb-admin.toml", &good);
    let config_path = config.0.to_str().unwrap().to_string();
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", &config_path]);
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    let cli = |args: &[&str]| xlb_cli(&lab.lb, &socket, args);
    let json = |args: &[&str]| xlb_json(&lab.lb, &socket, args);

    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&socket)
        .expect("the socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // Status: the VIP and both backends, checked and up.
    let status = json(&["status", "--json"]);
    let web = &status["vips"][0];
    assert_eq!(web["name"], "web", "{status}");
    assert_eq!(web["address"], LAB_VIP, "{status}");
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["mode"], "dsr-ipip");
    let addresses: Vec<&str> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["10.99.3.2", "10.99.4.2"]);
    for b in web["backends"].as_array().unwrap() {
        assert_eq!(b["health"], "up", "{status}");
    }
    assert_eq!(status["agent"]["interface"], "eth0");
    assert_eq!(status["agent"]["attach_mode"], "native");
    let (code, table, _) = cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("web backends:") && table.contains("10.99.4.2"),
        "{table}"
    );

    // Drain backend0: new connections all go elsewhere.
    let (code, out, _) = cli(&["backend", "drain", "web", "10.99.3.2"]);
    assert_eq!(code, 0);
    assert!(out.contains("drained"), "{out}");
    agent.wait_for("backend drained", Duration::from_secs(5));
    let per = answered_by(&connect_many(&lab.client, 30, "drained"), 3);
    assert_eq!(per, [0, 30, 0], "a drained backend gets no new connections");
    let status = json(&["status", "--json"]);
    let b1 = &status["vips"][0]["backends"][1];
    assert!(b1["active_flows"].as_u64().unwrap() >= 30, "{status}");
    assert_eq!(status["vips"][0]["backends"][0]["drained"], true);
    assert_eq!(status["vips"][0]["backends"][0]["weight"], 0);

    // A third backend added at run time takes connections.
    let (code, _, _) = cli(&["backend", "add", "web", "10.99.5.2"]);
    assert_eq!(code, 0);
    let per = answered_by(&connect_many(&lab.client, 40, "added"), 3);
    assert!(per[0] == 0 && per[1] > 0 && per[2] > 0, "{per:?}");

    // Weight 0 on backend1 leaves backend2 alone; back to 100 afterwards.
    let (code, _, _) = cli(&["backend", "set-weight", "web", "10.99.4.2", "0"]);
    assert_eq!(code, 0);
    let per = answered_by(&connect_many(&lab.client, 20, "weighted"), 3);
    assert_eq!(per, [0, 0, 20], "{per:?}");
    let (code, _, _) = cli(&["backend", "set-weight", "web", "10.99.4.2", "100"]);
    assert_eq!(code, 0);

    let vips = json(&["vip", "list", "--json"]);
    assert_eq!(vips[0]["name"], "web", "{vips}");
    assert_eq!(vips[0]["backends"], 3, "{vips}");
    let (code, table, _) = cli(&["vip", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("NAME") && table.contains(LAB_VIP),
        "{table}"
    );

    // Refused changes: exit 1 with the reason, and nothing changes.
    let before = json(&["backend", "list", "web", "--json"]);
    let (code, _, err) = cli(&["backend", "add", "web", "fd00:99::5"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("agent.encap_source_v6: required key is missing"),
        "{err}"
    );
    let (code, _, err) = cli(&["backend", "drain", "nope", "10.99.3.2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("there is no VIP \"nope\""), "{err}");
    assert_eq!(json(&["backend", "list", "web", "--json"]), before);
    // A usage error is exit 2.
    let (code, _, _) = cli(&["backend", "set-weight", "web", "10.99.3.2", "70000"]);
    assert_eq!(code, 2);

    // A broken file: reload exits 2 naming file and line; the running state stays.
    let broken = format!("{good}\n[[vip.backend]]\naddress = \"10.99.6.2\"\nweight = 70000\n");
    let line = broken.lines().position(|l| l == "weight = 70000").unwrap() + 1;
    std::fs::write(&config.0, &broken).unwrap();
    let (code, _, err) = cli(&["reload"]);
    assert_eq!(code, 2, "{err}");
    let want = format!("{config_path}:{line}: vip[0].backend[2].weight: 70000 is out of range");
    assert!(err.contains(&want), "{want}\nnot in\n{err}");
    assert_eq!(json(&["backend", "list", "web", "--json"]), before);
    std::fs::write(&config.0, &good).unwrap();
    let (code, out, _) = cli(&["reload"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("configuration reloaded: 1 VIPs, 3 backends"),
        "{out}"
    );

    // A second agent on the same socket is refused before it touches anything.
    let out = lab
        .lb
        .command(xlb_bin().to_str().unwrap())
        .args(["agent", "--config", &config_path])
        .env("NO_COLOR", "1")
        .output()
        .expect("run a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "another xlb agent is serving {}",
            socket.display()
        )),
        "{err}"
    );

    // Restart with the same state_dir: the drain and the added backend are still in force.
    assert!(agent.terminate().success());
    assert!(!socket.exists(), "the agent removes its socket on exit");
    assert!(lab.dirs.tmp.join("state/runtime.json").is_file());
    drop(agent);
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", &config_path]);
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    let backends = json(&["backend", "list", "web", "--json"]);
    assert_eq!(backends, before, "run-time changes survived the restart");
    assert_eq!(backends[0]["drained"], true);
    assert_eq!(backends[2]["origin"], "runtime");
    let per = answered_by(&connect_many(&lab.client, 30, "restarted"), 3);
    assert!(per[0] == 0 && per[1] > 0 && per[2] > 0, "{per:?}");
    let (code, _, _) = cli(&["backend", "undrain", "web", "10.99.3.2"]);
    assert_eq!(code, 0);
    let per = answered_by(&connect_many(&lab.client, 40, "undrained"), 3);
    assert!(
        per[0] > 0,
        "undrained backend0 takes connections again: {per:?}"
    );
    assert!(agent.terminate().success());

    // No agent: one line, exit 3.
    let missing = lab.dirs.tmp.join("none.sock");
    let (code, out, err) = xlb_cli(&lab.lb, &missing, &["status"]);
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert_eq!(
        err,
        format!(
            "xlb agent is not running (no admin socket at {}; an agent with another \
             agent.admin_socket is reached with --socket PATH or XLB_SOCKET)\n",
            missing.display()
        )
    );
}

/// Runs `xlb args` in `ns` expecting it to stop by itself within `timeout`: its exit status and
/// every stderr line. One that is still running then is killed and reported as `None` (a
/// command that should have refused to start must not hang the test when it does start).
fn run_bounded(
    ns: &Netns,
    args: &[&str],
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut run = start_xlb(ns, args);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = run.child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = run.child.kill();
            let _ = run.child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The reader thread ends with the pipe; collect what it saw.
    let lines = run.finish_lines(Duration::from_secs(2)).join("\n");
    (status, lines)
}

/// Two agents on one pin directory (a second instance started by mistake with its own socket
/// and state directory) must not both run: the second would adopt the first one's live maps
/// and rewrite them to its own configuration (with a smaller configuration it removed the
/// first agent's VIPs while that agent went on reporting them). The second is refused before
/// it touches the maps, naming the directory; the first keeps serving.
#[test]
fn a_second_agent_on_the_same_pin_directory_is_refused_and_the_first_keeps_serving() {
    let lab = lab(1);
    let _server = Server::start(&lab.backends[0], "backend0");
    let config = TempFile::new("xlb-lock-1.toml", &lab_config(&lab.dirs, 1, ""));
    let mut first = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    first.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert_eq!(answered_by(&connect_many(&lab.client, 10, "one"), 1), [10]);

    // Its own socket, state and metrics port; the same bpffs_dir; no VIPs at all.
    let other = AgentDirs::create("lb2");
    let second_config = format!(
        "[agent]\ninterface = \"eth0\"\nnext_hop_mac = \"auto\"\n\
         flow_table_entries = 65536\nmetrics_listen = \"127.0.0.1:9642\"\n\
         admin_socket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"{}\"\n",
        other.tmp.join("admin.sock").display(),
        other.tmp.join("state").display(),
        lab.dirs.bpffs.display()
    );
    let second_config = TempFile::new("xlb-lock-2.toml", &second_config);
    let (status, err) = run_bounded(
        &lab.lb,
        &["agent", "--config", second_config.0.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second agent must refuse to start ({status:?}):\n{err}"
    );
    assert!(
        err.contains(&format!(
            "another xlb agent is using {}",
            lab.dirs.bpffs.display()
        )),
        "{err}"
    );
    assert!(!err.contains("adopted the pinned maps"), "{err}");

    assert_eq!(
        answered_by(&connect_many(&lab.client, 10, "still"), 1),
        [10],
        "the first agent's VIP is still served"
    );
    // The lock goes with the first agent (kill -9 included): a restart adopts as before.
    first.child.kill().expect("kill -9");
    first.child.wait().expect("reap");
    let mut again = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    again.wait_for("adopted the pinned maps", Duration::from_secs(20));
    again.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert!(again.terminate().success());
}

/// The admin API outlives running out of file descriptors: accept failures used to end its
/// loop for good, leaving a running agent that `xlb` reported as "not running" (and whose
/// socket a second agent would then take over). With the agent's descriptor limit lowered, a
/// burst of clients makes accept fail; once they are gone, the API answers again.
#[test]
fn the_admin_api_survives_running_out_of_file_descriptors() {
    let lab = lab(1);
    let socket = lab.dirs.tmp.join("admin.sock");
    let config = TempFile::new("xlb-fds.toml", &lab_config(&lab.dirs, 1, ""));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert_eq!(xlb_cli(&lab.lb, &socket, &["status"]).0, 0);

    // `ip netns exec` execs the agent, so the child's pid is the agent's.
    let pid = agent.child.id() as i32;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let set_soft_limit = |soft: Option<u64>| {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads the agent's limit into a struct we own.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: soft.unwrap_or(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: sets the agent's soft limit from a struct we own (the hard one is kept).
        let rc = unsafe {
            libc::prlimit(
                pid,
                libc::RLIMIT_NOFILE,
                &raw const new,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set_soft_limit(Some(open_fds + 4));
    let clients: Vec<std::os::unix::net::UnixStream> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).expect("connect"))
        .collect();
    agent.wait_for(
        "admin API: accepting connections fails",
        Duration::from_secs(10),
    );
    drop(clients);
    set_soft_limit(None);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, err) = xlb_cli(&lab.lb, &socket, &["status"]);
        if code == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the admin API never answered again (exit {code}): {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(agent.terminate().success());
}

/// Deleting the balancer's interface detaches its program (the kernel does so with the
/// device). The agent says so once, and when an interface of that name is back it attaches
/// the balancer to it again: before, it went on running (and reporting itself attached) while
/// no VIP was served until someone restarted it.
#[test]
fn the_balancer_is_attached_again_when_its_interface_is_recreated() {
    let lab = lab(1);
    let _server = Server::start(&lab.backends[0], "backend0");
    let socket = lab.dirs.tmp.join("admin.sock");
    let config = TempFile::new("xlb-reattach.toml", &lab_config(&lab.dirs, 1, ""));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    assert_eq!(answered_by(&connect_many(&lab.client, 5, "before"), 1), [5]);

    lab.lb.run(&["ip", "link", "del", "eth0"]);
    agent.wait_for("interface eth0 is gone", Duration::from_secs(40));
    let status = xlb_json(&lab.lb, &socket, &["status", "--json"]);
    assert_eq!(status["agent"]["attach_mode"], "not attached", "{status}");

    // The link again, as the lab made it, with a pass program on the router's side.
    veth_pair(&lab.lb, "eth0", &lab._router, "l0");
    lab._router
        .run(&["ip", "addr", "add", "10.99.2.1/24", "dev", "l0"]);
    lab._router.run(&[
        "ip",
        "route",
        "replace",
        &format!("{LAB_VIP}/32"),
        "via",
        "10.99.2.2",
    ]);
    lab.lb
        .run(&["ip", "addr", "add", "10.99.2.2/24", "dev", "eth0"]);
    lab.lb
        .run(&["ip", "route", "add", "default", "via", "10.99.2.1"]);
    lab.lb.run(&["ping", "-c", "1", "-W", "2", "10.99.2.1"]);
    let mut router_xdp = start_xlb(
        &lab._router,
        &["agent", "--interface", "l0", "--xdp-mode", "native"],
    );
    router_xdp.wait_for("xlb_balancer attached", Duration::from_secs(20));

    agent.wait_for("attached it again", Duration::from_secs(40));
    let link = lab.lb.run(&["ip", "link", "show", "dev", "eth0"]);
    assert!(link.contains("xdp"), "{link}");
    // The new router MAC is followed too; give the maps a moment to take it.
    agent.wait_for("next hop MAC changed", Duration::from_secs(40));
    assert_eq!(answered_by(&connect_many(&lab.client, 5, "after"), 1), [5]);
    let status = xlb_json(&lab.lb, &socket, &["status", "--json"]);
    assert_eq!(status["agent"]["attach_mode"], "native", "{status}");
    assert!(agent.terminate().success());
    assert!(router_xdp.terminate().success());
}

/// A bpffs is shared by every network namespace of a host, and interface indexes repeat
/// across namespaces (`eth0` is index 2 in both hosts here). A link pinned by another
/// namespace must not be taken for this one's: `xlb decap attach` used to "replace" the other
/// namespace's decapsulator (with this host's addresses) and attach nothing here, and `decap
/// detach` removed it. Both now refuse and leave it alone. `detach` also removes only what
/// `attach` pins: not a directory holding other pins (the agent's), and never a path outside
/// `--bpffs-dir` (`--interface ../xlb`).
#[test]
fn decap_leaves_pins_of_other_namespaces_and_of_the_agent_alone() {
    let hosts = two_hosts();
    let dirs = AgentDirs::create("decap-ns");
    let bpffs = dirs.bpffs.to_str().unwrap().to_string();
    let xlb = |ns: &Netns, args: &[&str]| {
        let out = ns
            .command(xlb_bin().to_str().unwrap())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run xlb");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let prog = |ns: &Netns| {
        let link = ns.run(&["ip", "link", "show", "dev", "eth0"]);
        link.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .map(str::to_string)
    };
    let index = |ns: &Netns| ns.run(&["cat", "/sys/class/net/eth0/ifindex"]);
    assert_eq!(index(&hosts.lb), index(&hosts.client), "the premise");
    let attach = |ns: &Netns, addr: &str| {
        xlb(
            ns,
            &[
                "decap",
                "attach",
                "-i",
                "eth0",
                "--address",
                addr,
                "--xdp-mode",
                "native",
                "--bpffs-dir",
                &bpffs,
            ],
        )
    };
    let detach = |ns: &Netns, interface: &str, dir: &str| {
        xlb(
            ns,
            &["decap", "detach", "-i", interface, "--bpffs-dir", dir],
        )
    };

    let (code, err) = attach(&hosts.lb, "10.99.0.2");
    assert_eq!(code, Some(0), "{err}");
    let lb_prog = prog(&hosts.lb).expect("attached in lb");

    let (code, err) = attach(&hosts.client, "10.99.0.1");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another network namespace"), "{err}");
    assert_eq!(
        prog(&hosts.lb),
        Some(lb_prog.clone()),
        "lb's program untouched"
    );
    assert_eq!(prog(&hosts.client), None);

    let (code, err) = detach(&hosts.client, "eth0", &bpffs);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another network namespace"), "{err}");
    assert_eq!(prog(&hosts.lb), Some(lb_prog), "still attached in lb");

    // Paths outside the pin directory are not interface names.
    let (code, err) = detach(&hosts.lb, "../x", &bpffs);
    assert_eq!(code, Some(2), "{err}");
    // A directory with more than the link in it (the agent's pins: maps beside the link) is
    // not a decapsulator's.
    let maps = dirs.bpffs.join("eth0").join("maps-v2");
    std::fs::create_dir(&maps).expect("mkdir on bpffs");
    let (code, err) = detach(&hosts.lb, "eth0", &bpffs);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("holds more than a decapsulator's link"),
        "{err}"
    );
    assert!(maps.exists());
    assert!(prog(&hosts.lb).is_some(), "still attached");
    std::fs::remove_dir(&maps).expect("rmdir on bpffs");

    let (code, err) = detach(&hosts.lb, "eth0", &bpffs);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(prog(&hosts.lb), None);
}

/// Something other than an XDP link pinned where the agent pins its link (a per-CPU array
/// map here) used to be read as a link, because a map's info starts like a link's: the agent
/// took the map's size for an interface index, unpinned the map as "a link on another
/// interface" and went on. It is refused, and left where it is.
#[test]
fn the_agent_refuses_a_map_pinned_where_its_link_belongs() {
    let lab = lab(1);
    let config = TempFile::new("xlb-notalink.toml", &lab_config(&lab.dirs, 1, ""));
    // Pin maps (the agent's own layout) in a scratch directory and put a per-CPU array among
    // them at the link's path.
    let scratch = AgentDirs::create("scratch");
    {
        let (_b, _) = lb_userspace::loader::Balancer::load_pinned(
            lb_userspace::loader::LoadOptions { flow_entries: 1024 },
            &lb_userspace::pins::PinDir::new(&scratch.bpffs),
        )
        .expect("load pinned");
    }
    let counters = lb_userspace::pins::PinDir::new(&scratch.bpffs).map_path("XLB_COUNTERS");
    std::fs::create_dir_all(&lab.dirs.bpffs).expect("pin directory");
    aya::maps::MapData::from_pin(&counters)
        .expect("the counters map")
        .pin(lab.dirs.bpffs.join("link"))
        .expect("pin it as `link`");

    let (status, err) = run_bounded(
        &lab.lb,
        &["agent", "--config", config.0.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent must refuse to start ({status:?}):\n{err}"
    );
    assert!(
        err.contains("something other than an XDP link is pinned there"),
        "{err}"
    );
    assert!(lab.dirs.bpffs.join("link").exists(), "the map's pin stays");
}

/// A SIGHUP (a `systemctl reload`) while the agent is still filling the maps used to kill it
/// (the default action: the handlers came after the first reconcile), mid-write. It is taken
/// as a reload once the agent runs.
#[test]
fn a_sighup_during_the_start_is_a_reload_not_a_kill() {
    let lab = lab(1);
    let config = TempFile::new("xlb-hup.toml", &lab_config(&lab.dirs, 1, ""));
    let mut agent = start_xlb(&lab.lb, &["agent", "--config", config.0.to_str().unwrap()]);
    agent.wait_for("admin API listening", Duration::from_secs(20));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    agent.wait_for("configuration reloaded", Duration::from_secs(20));
    assert!(agent.child.try_wait().expect("wait").is_none(), "alive");
    assert!(agent.terminate().success());
}
