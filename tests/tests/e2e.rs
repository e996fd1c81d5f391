//! End to end: the real `xlb` agent on the xlb host of the namespace topology
//! (`xlb_tests::topology`), real nginx backends, real curl and wrk clients, a UDP responder.
//! Each scenario builds its own topology: weighted distribution, long-lived connections across
//! run-time changes and agent restarts, failure detection and recovery, UDP, IPv6, dsr-l2, path
//! MTU, and traffic to the xlb host itself. Needs root; run serially (about a minute in all).

use std::{
    collections::{BTreeSet, HashSet},
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xlb_tests::{
    netns::{Netns, in_netns, sockaddr, spawn_in_netns},
    servers::{Nginx, UdpEcho, curl},
    topology::{Daemon, Host, Options, Topology, VIP_V4, VIP_V6, run_cli, xlb_bin},
};

/// A configuration with one IPv4 and one IPv6 VIP on port 80, each over every backend.
fn config(t: &Topology) -> String {
    let mut text = t.agent_table();
    for (name, vip, family) in [
        ("web4", VIP_V4.to_string(), 4),
        ("web6", VIP_V6.to_string(), 6),
    ] {
        text.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n"
        ));
        for b in &t.backends {
            let addr = if family == 4 {
                b.v4.to_string()
            } else {
                b.v6.to_string()
            };
            text.push_str(&format!("[[vip.backend]]\naddress = \"{addr}\"\n"));
        }
    }
    text
}

/// curl to the IPv4 and the IPv6 VIP reach nginx on every backend, and the replies come
/// straight back (direct server return).
#[test]
fn curl_reaches_nginx_through_ipv4_and_ipv6_vips() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 2,
        xlb: xlb.clone(),
    });
    let _nginx: Vec<Nginx> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Nginx::start(&b.ns, &format!("backend{i}")))
        .collect();
    let file = t.dirs.tmp.join("xlb.toml");
    std::fs::write(&file, config(&t)).unwrap();
    let mut agent = Daemon::start(
        &t.lb.ns,
        &xlb,
        &["agent", "--config", file.to_str().unwrap()],
    );
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    for url in [format!("http://{VIP_V4}/"), format!("http://[{VIP_V6}]/")] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (code, body) = curl(&t.clients[0].ns, &[&url]);
            assert_eq!(code, 0, "curl {url}: {body}");
            seen.insert(body.trim().to_string());
        }
        assert_eq!(seen.len(), 2, "{url}: {seen:?}");
    }
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// Configuration, agent and CLI helpers
// ---------------------------------------------------------------------------------------------

/// One `[[vip]]` table: the VIP, its mode, an optional `[vip.health_check]` body, and its
/// backends with their weights.
fn vip_toml(
    name: &str,
    (address, port, protocol): (IpAddr, u16, &str),
    mode: &str,
    health: Option<&str>,
    backends: &[(IpAddr, u16)],
) -> String {
    let mut text = format!(
        "\n[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n\
         protocol = \"{protocol}\"\nmode = \"{mode}\"\n"
    );
    if let Some(h) = health {
        text.push_str(&format!("[vip.health_check]\n{h}\n"));
    }
    for (addr, weight) in backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    text
}

/// An HTTP check of `GET /` on port 80 with the given timing.
fn http_check(interval_ms: u64, rise: u8, fall: u8) -> String {
    format!(
        "type = \"http\"\nport = 80\ninterval_ms = {interval_ms}\ntimeout_ms = {}\nrise = {rise}\n\
         fall = {fall}\n",
        interval_ms / 2
    )
}

/// The IPv4 addresses of `hosts`, each with weight 100.
fn v4_backends(hosts: &[Host]) -> Vec<(IpAddr, u16)> {
    hosts.iter().map(|h| (IpAddr::V4(h.v4), 100)).collect()
}

/// The IPv6 addresses of `hosts`, each with weight 100.
fn v6_backends(hosts: &[Host]) -> Vec<(IpAddr, u16)> {
    hosts.iter().map(|h| (IpAddr::V6(h.v6), 100)).collect()
}

/// nginx on each host, answering `GET /` with `<prefix><i>`.
fn nginx_on(hosts: &[Host], prefix: &str) -> Vec<Nginx> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Nginx::start(&h.ns, &format!("{prefix}{i}")))
        .collect()
}

/// Writes `text` as the topology's `xlb.toml` (in its per-test directory) and returns the path.
fn write_config(t: &Topology, text: &str) -> PathBuf {
    let file = t.dirs.tmp.join("xlb.toml");
    std::fs::write(&file, text).expect("writing xlb.toml");
    file
}

/// Starts the agent on the xlb host with `file` and waits (bounded) until it is attached.
fn start_agent(t: &Topology, xlb: &Path, file: &Path) -> Daemon {
    let mut agent = Daemon::start(
        &t.lb.ns,
        xlb,
        &["agent", "--config", file.to_str().expect("utf-8 path")],
    );
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    agent
}

/// The run-time CLI against the topology's agent: exit code, stdout, stderr.
fn cli(t: &Topology, xlb: &Path, args: &[&str]) -> (i32, String, String) {
    run_cli(&t.lb.ns, xlb, &t.admin_socket(), args)
}

/// Runs the CLI, expects exit 0, returns stdout.
fn cli_ok(t: &Topology, xlb: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = cli(t, xlb, args);
    assert_eq!(code, 0, "xlb {args:?}: {stdout}{stderr}");
    stdout
}

/// Runs the CLI with `--json`, expects exit 0, parses stdout.
fn cli_json(t: &Topology, xlb: &Path, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let stdout = cli_ok(t, xlb, &args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A data-path counter, from `xlb stats --json`.
fn counter(t: &Topology, xlb: &Path, name: &str) -> u64 {
    let stats = cli_json(t, xlb, &["stats"]);
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

/// The `xlb status --json` entry of backend `address` of VIP `vip`.
fn backend_status(status: &serde_json::Value, vip: &str, address: IpAddr) -> serde_json::Value {
    let v = status["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .find(|v| v["name"] == vip)
        .unwrap_or_else(|| panic!("no VIP {vip} in {status}"));
    v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == address.to_string())
        .unwrap_or_else(|| panic!("no backend {address} of {vip} in {status}"))
        .clone()
}

/// The agent's metrics (its default endpoint, 127.0.0.1:9641 in the xlb host's namespace).
fn scrape_metrics(lb: &Netns) -> String {
    in_netns(lb, || {
        let at: SocketAddr = ([127, 0, 0, 1], 9641).into();
        let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(3))
            .expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    })
}

/// The value of one sample (`name{labels}`) of a scrape.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Waits (bounded) until one stderr line of `daemon` contains every one of `needles`.
fn wait_for_line(daemon: &mut Daemon, needles: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = daemon
            .lines()
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needles:?} within {timeout:?}:\n{}",
            daemon.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status, body).
fn read_response(r: &mut impl BufRead) -> Result<(u16, String), String> {
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("reading the status line: {e}"))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("odd status line {line:?}"))?;
    let mut length = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)
            .map_err(|e| format!("reading headers: {e}"))?;
        if h.is_empty() {
            return Err("connection closed inside the headers".into());
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.ok_or("no Content-Length")?];
    r.read_exact(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What one new connection got: the backend that answered `GET /`, and the client port.
#[derive(Debug)]
struct Answer {
    backend: String,
    port: u16,
}

/// Source ports for [`connect_from`]: below the kernel's ephemeral range (32768..), never the
/// same twice in a test run.
static NEXT_PORT: AtomicU16 = AtomicU16::new(10_000);

/// The next source port from [`NEXT_PORT`].
fn next_port() -> u16 {
    let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    assert!(p < 32_768, "out of source ports");
    p
}

/// A TCP connection to `to` from source port `port`, within `timeout`. Bound explicitly
/// because the kernel hands a closed connection's ephemeral port out again (3,000 connections
/// saw about 30 reused), and a reused port is the same flow, not a new sample.
fn connect_from(port: u16, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let (family, any) = match to {
        SocketAddr::V4(_) => (libc::AF_INET, SocketAddr::from(([0u8; 4], port))),
        SocketAddr::V6(_) => (libc::AF_INET6, SocketAddr::from(([0u16; 8], port))),
    };
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain syscalls; the fd is owned by the TcpStream (closed on every error path);
    // the sockaddrs and the timeval outlive the calls that read them.
    unsafe {
        let fd = check(libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let stream = TcpStream::from_raw_fd(fd);
        // Bounds connect(2) too (it fails with EINPROGRESS when the time is up).
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let (local, local_len) = sockaddr(any);
        check(libc::bind(fd, (&raw const local).cast(), local_len))?;
        let (remote, remote_len) = sockaddr(to);
        check(libc::connect(fd, (&raw const remote).cast(), remote_len))?;
        Ok(stream)
    }
}

/// `GET /` on a new TCP connection to `vip` from a source port of its own (from the calling
/// thread's namespace).
fn get_on_new_connection(vip: SocketAddr) -> Result<Answer, String> {
    let port = next_port();
    let s = connect_from(port, vip, Duration::from_secs(3))
        .map_err(|e| format!("connect from port {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    (&s).write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write (port {port}): {e}"))?;
    let (status, body) =
        read_response(&mut BufReader::new(&s)).map_err(|e| format!("port {port}: {e}"))?;
    if status != 200 {
        return Err(format!("port {port}: status {status}"));
    }
    Ok(Answer {
        backend: body.trim().to_string(),
        port,
    })
}

/// `count` new connections from `ns` to `vip`, four at a time, each asking `GET /` once.
fn new_connections(ns: &Netns, vip: SocketAddr, count: usize) -> Vec<Result<Answer, String>> {
    const THREADS: usize = 4;
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let n = count / THREADS + usize::from(i < count % THREADS);
            spawn_in_netns(ns, move || {
                (0..n)
                    .map(|_| get_on_new_connection(vip))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect()
}

/// How many of `answers` each of `names` gave; panics on a failed connection or an answer
/// from a name not listed.
fn tally(answers: &[Result<Answer, String>], names: &[String]) -> Vec<usize> {
    let mut per = vec![0; names.len()];
    for a in answers {
        let a = a
            .as_ref()
            .unwrap_or_else(|e| panic!("a new connection failed: {e}"));
        let i = names
            .iter()
            .position(|n| *n == a.backend)
            .unwrap_or_else(|| panic!("answer from {:?}, not one of {names:?}", a.backend));
        per[i] += 1;
    }
    per
}

/// `<prefix>0 .. <prefix>{n-1}`: the names nginx answers with.
fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Percentages of a tally, for messages.
fn percent(per: &[usize]) -> Vec<f64> {
    let total: usize = per.iter().sum();
    per.iter()
        .map(|&n| (1000.0 * n as f64 / total as f64).round() / 10.0)
        .collect()
}

/// What a [`KeepAlive`] client saw: every answer in order, and the failure that ended it.
#[derive(Debug, Default)]
struct KeepAliveLog {
    answers: Vec<String>,
    failure: Option<String>,
}

/// A client issuing `GET /` on one kept-alive connection in a loop (every 10 ms) until it is
/// finished, recording each answer. A failed request ends the loop and is recorded.
struct KeepAlive {
    /// The backend that answered the first request.
    backend: String,
    /// The client's port.
    port: u16,
    log: Arc<Mutex<KeepAliveLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeepAlive {
    /// Connects from `ns` to `vip`, asks once, and starts the loop.
    fn start(ns: &Netns, vip: SocketAddr) -> KeepAlive {
        let stream = in_netns(ns, move || {
            TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("keep-alive connection to {vip}: {e}"))
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let port = stream.local_addr().expect("local address").port();
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut ask = move || -> Result<String, String> {
            writer
                .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
                .map_err(|e| format!("write: {e}"))?;
            match read_response(&mut reader)? {
                (200, body) => Ok(body.trim().to_string()),
                (status, body) => Err(format!("status {status}: {body}")),
            }
        };
        let backend = ask().unwrap_or_else(|e| panic!("first keep-alive request: {e}"));
        let log = Arc::new(Mutex::new(KeepAliveLog {
            answers: vec![backend.clone()],
            failure: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let result = ask();
                    let mut log = log.lock().expect("log");
                    match result {
                        Ok(b) => log.answers.push(b),
                        Err(e) => {
                            log.failure = Some(e);
                            return;
                        }
                    }
                    drop(log);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        KeepAlive {
            backend,
            port,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until `n` more requests were answered; panics if the loop failed.
    fn progressed(&self, n: usize, what: &str) {
        let from = self.log.lock().expect("log").answers.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log.lock().expect("log");
            assert!(
                log.failure.is_none(),
                "keep-alive request {} failed {what}: {:?}",
                log.answers.len() + 1,
                log.failure
            );
            if log.answers.len() >= from + n {
                return;
            }
            drop(log);
            assert!(
                Instant::now() < deadline,
                "keep-alive connection stalled {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the loop and returns what it saw.
    fn finish(mut self) -> KeepAliveLog {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("keep-alive thread");
        }
        std::mem::take(&mut *self.log.lock().expect("log"))
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process (curl) killed and reaped on drop.
struct ChildGuard(Child);

impl ChildGuard {
    /// Waits (bounded) for the exit; returns the exit code and stdout.
    fn finish(mut self, timeout: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut o) = self.0.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code().unwrap_or(-1), out, err);
            }
            assert!(Instant::now() < deadline, "still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while the process runs.
    fn running(&mut self) -> bool {
        self.0.try_wait().expect("wait").is_none()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Local ports of `ns`'s established TCP connections to `peer` owned by a process named
/// `process` (from `ss -p`).
fn ports_of(ns: &Netns, peer: SocketAddr, process: &str) -> Vec<u16> {
    let out = ns.run(&["ss", "-Htnp", "state", "established"]);
    out.lines()
        .filter(|l| l.contains(&format!("\"{process}\"")))
        .filter_map(|l| {
            let mut cols = l.split_whitespace().skip(2);
            let (local, remote) = (cols.next()?, cols.next()?);
            (remote == peer.to_string())
                .then(|| local.rsplit_once(':')?.1.parse().ok())
                .flatten()
        })
        .collect()
}

/// The index of the host in `hosts` that has an established connection from `client:port`.
fn host_with_connection(hosts: &[Host], client: SocketAddr) -> Option<usize> {
    hosts.iter().position(|h| {
        h.ns.run(&["ss", "-Htn", "state", "established"])
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(&client.to_string()))
    })
}

// ---------------------------------------------------------------------------------------------
// a. Weighted distribution
// ---------------------------------------------------------------------------------------------

/// Three backends weighted 1:1:2 get 25/25/50% of 3,000 new connections (each from its own
/// source port), within 5 points each; the agent's per-backend new-flow counters agree.
#[test]
fn weights_1_1_2_split_3000_new_connections_25_25_50() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 3,
        xlb: xlb.clone(),
    });
    let _nginx = nginx_on(&t.backends, "backend");
    let weights = [100, 100, 200];
    let backends: Vec<(IpAddr, u16)> = t
        .backends
        .iter()
        .zip(weights)
        .map(|(b, w)| (IpAddr::V4(b.v4), w))
        .collect();
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "web",
                (VIP_V4.into(), 80, "tcp"),
                "dsr-ipip",
                None,
                &backends,
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);

    const CONNECTIONS: usize = 3000;
    let started = Instant::now();
    let answers = new_connections(
        &t.clients[0].ns,
        SocketAddr::new(VIP_V4.into(), 80),
        CONNECTIONS,
    );
    let took = started.elapsed();
    let ports: HashSet<u16> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().map(|a| a.port))
        .collect();
    let per = tally(&answers, &names("backend", 3));
    assert_eq!(
        ports.len(),
        CONNECTIONS,
        "every connection had its own port"
    );
    let shares = percent(&per);
    eprintln!("{CONNECTIONS} new connections in {took:?}: {per:?} = {shares:?}%");
    for (share, want) in shares.iter().zip([25.0, 25.0, 50.0]) {
        assert!(
            (share - want).abs() <= 5.0,
            "shares {shares:?}% against 25/25/50"
        );
    }

    // The agent counted the same new flows per backend (a retransmitted SYN would count
    // twice, so at least as many).
    let status = cli_json(&t, &xlb, &["status"]);
    for ((addr, _), n) in backends.iter().zip(&per) {
        let counted = backend_status(&status, "web", *addr)["new_flows"]
            .as_u64()
            .expect("new_flows");
        assert!(counted >= *n as u64, "{addr}: counted {counted}, saw {n}");
        assert!(
            counted <= *n as u64 + 10,
            "{addr}: counted {counted}, saw {n}"
        );
    }
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// b. Long-lived connections across run-time changes and restarts
// ---------------------------------------------------------------------------------------------

/// Bytes of `/big/file` the slow download fetches (a range: nginx sends 64 KiB/s, so the whole
/// 4 MiB file would take 64 s; 16 s of this outlasts every change below, about 4 s, with room for
/// a loaded machine, and the test checks it did).
const DOWNLOAD_BYTES: u64 = 1024 * 1024;

/// Long-lived TCP connections (a slow, rate-limited curl download and a keep-alive client
/// issuing requests in a loop) survive, with no failed request: a backend added at run time,
/// another one removed, a drain, `xlb reload`, an agent SIGTERM + restart and a kill -9 +
/// restart. The download completes with every byte and every keep-alive request is answered
/// by the backend that answered the first.
#[test]
fn long_lived_connections_survive_changes_reloads_and_agent_restarts() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 4,
        xlb: xlb.clone(),
    });
    let _nginx = nginx_on(&t.backends, "backend");
    // backend3 is not in the file: it is added at run time.
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "web",
                (VIP_V4.into(), 80, "tcp"),
                "dsr-ipip",
                Some(&http_check(500, 2, 3)),
                &v4_backends(&t.backends[..3]),
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);
    let client = &t.clients[0];
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let names = names("backend", 4);

    let mut download = ChildGuard(
        client
            .ns
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "120",
                "-r",
                &format!("0-{}", DOWNLOAD_BYTES - 1),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &format!("http://{VIP_V4}/big/file"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning curl"),
    );
    let keep_alive = KeepAlive::start(&client.ns, vip);
    let ka = names
        .iter()
        .position(|n| *n == keep_alive.backend)
        .expect("a known backend");
    let deadline = Instant::now() + Duration::from_secs(5);
    let dl_port = loop {
        if let [p] = ports_of(&client.ns, vip, "curl")[..] {
            break p;
        }
        assert!(Instant::now() < deadline, "the download never connected");
        std::thread::sleep(Duration::from_millis(20));
    };
    let dl = host_with_connection(&t.backends, SocketAddr::new(client.v4.into(), dl_port))
        .expect("a backend serves the download");
    eprintln!(
        "keep-alive (port {}) on backend{ka}, download (port {dl_port}) on backend{dl}",
        keep_alive.port
    );
    keep_alive.progressed(10, "before any change");
    let started = Instant::now();
    let new_ones = |what: &str| {
        let per = tally(&new_connections(&client.ns, vip, 60), &names);
        eprintln!("new connections {what}: {per:?}");
        per
    };

    // Added at run time: new connections reach it, the established ones stay put.
    let added = IpAddr::V4(t.backends[3].v4);
    cli_ok(&t, &xlb, &["backend", "add", "web", &added.to_string()]);
    keep_alive.progressed(20, "after adding a backend");
    assert!(new_ones("after the add")[3] > 0, "backend3 takes new flows");

    // Removed: a backend neither long-lived connection is on. Removing the one a connection
    // is on necessarily breaks that connection (its backend is gone, and any other backend
    // answers a foreign TCP segment with a reset), so it is not a survival case.
    let removed = (0..3)
        .find(|&i| i != ka && i != dl)
        .expect("three file backends, two connections");
    let removed_addr = t.backends[removed].v4.to_string();
    cli_ok(&t, &xlb, &["backend", "remove", "web", &removed_addr]);
    keep_alive.progressed(20, "after removing a backend");
    assert_eq!(new_ones("after the remove")[removed], 0);

    // Drained: the keep-alive client's own backend. A drain keeps established flows by
    // design, so that is the backend worth draining.
    let drained_addr = t.backends[ka].v4.to_string();
    cli_ok(&t, &xlb, &["backend", "drain", "web", &drained_addr]);
    keep_alive.progressed(20, "after draining its backend");
    let per = new_ones("after the drain");
    assert_eq!((per[removed], per[ka]), (0, 0), "{per:?}");

    // Reload (the file is unchanged; the run-time changes are re-applied over it).
    let out = cli_ok(&t, &xlb, &["reload"]);
    assert!(out.contains("configuration reloaded"), "{out}");
    keep_alive.progressed(20, "after the reload");

    // SIGTERM: the program stays attached; the next agent adopts the pinned maps.
    assert!(agent.terminate().success());
    drop(agent);
    keep_alive.progressed(20, "while no agent runs (after SIGTERM)");
    let mut agent = start_agent(&t, &xlb, &file);
    agent.wait_for("adopted the pinned maps", Duration::from_secs(5));
    keep_alive.progressed(20, "after the restart that followed SIGTERM");

    // kill -9: nothing runs on exit; the next agent adopts all the same.
    agent.kill();
    drop(agent);
    keep_alive.progressed(20, "while no agent runs (after kill -9)");
    let mut agent = start_agent(&t, &xlb, &file);
    agent.wait_for("adopted the pinned maps", Duration::from_secs(5));
    keep_alive.progressed(20, "after the restart that followed kill -9");
    let per = new_ones("after both restarts");
    assert_eq!(
        (per[removed], per[ka]),
        (0, 0),
        "run-time changes kept: {per:?}"
    );
    let changes_took = started.elapsed();

    assert!(
        download.running(),
        "the download must outlast every change ({changes_took:?}); raise DOWNLOAD_BYTES"
    );
    let log = keep_alive.finish();
    assert_eq!(log.failure, None);
    let foreign: BTreeSet<&String> = log.answers.iter().filter(|a| **a != names[ka]).collect();
    assert!(
        foreign.is_empty(),
        "every keep-alive request answered by {}: {foreign:?}",
        names[ka]
    );
    let (code, out, err) = download.finish(Duration::from_secs(90));
    eprintln!(
        "changes done in {changes_took:?}; {} keep-alive requests, all answered by {}; \
         download: {out} after {:?}",
        log.answers.len(),
        names[ka],
        started.elapsed()
    );
    assert_eq!(code, 0, "curl: {err}");
    assert_eq!(out, format!("206 {DOWNLOAD_BYTES}"), "status and bytes");
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// c. Failure detection and recovery
// ---------------------------------------------------------------------------------------------

/// A backend whose nginx is stopped is marked down within fall x interval + one interval of
/// the stop (measured to the agent's `backend down` line, and shown by `xlb status`); after
/// that no new connection fails (nor any of wrk's); when nginx comes back the backend rejoins
/// after `rise` checks.
#[test]
fn a_killed_backend_is_marked_down_in_time_and_rejoins_after_rise_checks() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 3,
        xlb: xlb.clone(),
    });
    let mut nginx = nginx_on(&t.backends, "backend");
    // Long enough that scheduling noise on a busy machine is small against the bounds.
    let (interval, rise, fall) = (500u64, 2u8, 3u8);
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "web",
                (VIP_V4.into(), 80, "tcp"),
                "dsr-ipip",
                Some(&http_check(interval, rise, fall)),
                &v4_backends(&t.backends),
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);
    let client = &t.clients[0].ns;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let names = names("backend", 3);
    let victim = IpAddr::V4(t.backends[1].v4);
    let per = tally(&new_connections(client, vip, 90), &names);
    assert!(per.iter().all(|&n| n > 0), "{per:?}");

    let stopped = Instant::now();
    drop(nginx.remove(1));
    let gone = stopped.elapsed();
    let line = agent.wait_for("backend down", Duration::from_secs(10));
    let detected = stopped.elapsed();
    let bound = Duration::from_millis(interval * (u64::from(fall) + 1));
    eprintln!(
        "backend1 marked down {detected:?} after nginx was stopped (bound {bound:?}; nginx took \
         {gone:?} to exit)"
    );
    assert!(line.contains(&victim.to_string()), "{line}");
    assert!(detected <= bound, "took {detected:?}, bound {bound:?}");
    let status = cli_json(&t, &xlb, &["status"]);
    assert_eq!(backend_status(&status, "web", victim)["health"], "down");
    for b in [&t.backends[0], &t.backends[2]] {
        assert_eq!(backend_status(&status, "web", b.v4.into())["health"], "up");
    }

    // No new connection fails: each goes to a live backend.
    let per = tally(&new_connections(client, vip, 300), &names);
    assert_eq!(per[1], 0, "{per:?}");
    // Nor under load: wrk opening a new connection per request for two seconds.
    let out = client.run(&[
        "timeout",
        "20",
        "wrk",
        "-t",
        "2",
        "-c",
        "8",
        "-d",
        "2s",
        "--timeout",
        "2s",
        "-H",
        "Connection: close",
        &format!("http://{VIP_V4}/"),
    ]);
    let requests: u64 = out
        .lines()
        .find_map(|l| l.split_once(" requests in")?.0.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{out}"));
    eprintln!("wrk: {requests} requests on new connections, no errors");
    assert!(requests >= 200, "{out}");
    assert!(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "{out}"
    );

    let starting = Instant::now();
    nginx.insert(1, Nginx::start(&t.backends[1].ns, "backend1"));
    let serving = Instant::now();
    let line = agent.wait_for("backend up", Duration::from_secs(10));
    let (since_start, since_serving) = (starting.elapsed(), serving.elapsed());
    eprintln!(
        "backend1 back up {since_serving:?} after nginx served again ({since_start:?} after \
         it was started)"
    );
    assert!(line.contains(&victim.to_string()), "{line}");
    // `rise` passed checks an interval apart: the first no earlier than nginx's start, the
    // last within rise x interval + one interval of nginx serving.
    let earliest = Duration::from_millis(interval * (u64::from(rise) - 1));
    let latest = Duration::from_millis(interval * (u64::from(rise) + 1));
    assert!(since_start >= earliest, "up after {since_start:?}");
    assert!(
        since_serving <= latest,
        "up {since_serving:?} after, bound {latest:?}"
    );
    let status = cli_json(&t, &xlb, &["status"]);
    assert_eq!(backend_status(&status, "web", victim)["health"], "up");
    let per = tally(&new_connections(client, vip, 90), &names);
    assert!(per[1] > 0, "backend1 takes new connections again: {per:?}");
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// d. UDP
// ---------------------------------------------------------------------------------------------

/// A UDP VIP over three backends: many flows (each its own source port) spread over all of
/// them, and each flow stays on its backend for every datagram.
#[test]
fn udp_flows_spread_over_backends_and_each_stays_on_its_own() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 3,
        xlb: xlb.clone(),
    });
    const PORT: u16 = 7000;
    // On the VIP (the traffic) and on the backend's own address (the health check).
    let _echo: Vec<UdpEcho> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            UdpEcho::start(
                &b.ns,
                &format!("backend{i}"),
                &[
                    SocketAddr::new(VIP_V4.into(), PORT),
                    SocketAddr::new(b.v4.into(), PORT),
                ],
            )
        })
        .collect();
    let check = "type = \"udp\"\nsend = \"ping\"\nexpect = \"ping\"\ninterval_ms = 500\n\
                 timeout_ms = 250\n";
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "echo",
                (VIP_V4.into(), PORT, "udp"),
                "dsr-ipip",
                Some(check),
                &v4_backends(&t.backends),
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);

    const FLOWS: usize = 300;
    const DATAGRAMS: usize = 5;
    let vip = SocketAddr::new(VIP_V4.into(), PORT);
    // Round by round, so each flow's datagrams are apart in time, with other flows' between.
    let (ports, replies) = in_netns(&t.clients[0].ns, move || {
        let sockets: Vec<UdpSocket> = (0..FLOWS)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.connect(vip).expect("connect");
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .expect("timeout");
                s
            })
            .collect();
        let ports: HashSet<u16> = sockets
            .iter()
            .map(|s| s.local_addr().expect("local").port())
            .collect();
        let mut replies = vec![Vec::new(); FLOWS];
        for round in 0..DATAGRAMS {
            for (flow, s) in sockets.iter().enumerate() {
                let msg = format!("flow {flow} datagram {round}");
                let mut buf = [0u8; 512];
                // A datagram may be lost (a UDP fact, not a balancer one): up to 3 tries.
                let reply = (0..3).find_map(|_| {
                    s.send(msg.as_bytes()).ok()?;
                    let n = s.recv(&mut buf).ok()?;
                    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
                });
                let reply = reply.unwrap_or_else(|| panic!("no reply to {msg:?}"));
                let (backend, echoed) = reply.split_once(' ').expect("<name> <datagram>");
                assert_eq!(echoed, msg);
                replies[flow].push(backend.to_string());
            }
        }
        (ports, replies)
    });
    assert_eq!(ports.len(), FLOWS, "every flow has its own source port");
    let names = names("backend", 3);
    let mut per = vec![0; 3];
    for (flow, seen) in replies.iter().enumerate() {
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "flow {flow} moved: {seen:?}"
        );
        per[names.iter().position(|n| *n == seen[0]).expect("known")] += 1;
    }
    let shares = percent(&per);
    eprintln!("{FLOWS} UDP flows x {DATAGRAMS} datagrams: {per:?} = {shares:?}%");
    for s in &shares {
        assert!((s - 100.0 / 3.0).abs() <= 10.0, "{shares:?}%");
    }
    // The flows were new once and then hit the connection table.
    assert!(counter(&t, &xlb, "ct_hit") >= (FLOWS * (DATAGRAMS - 1)) as u64);
    // The UDP checks pass against the responder on each backend's own address.
    let deadline = Instant::now() + Duration::from_secs(5);
    for b in &t.backends {
        let series = |result: &str| {
            format!(
                "xlb_health_check_duration_seconds_count{{vip=\"echo\",backend=\"{}\",\
                 result=\"{result}\"}}",
                b.v4
            )
        };
        loop {
            let m = scrape_metrics(&t.lb.ns);
            assert_eq!(sample(&m, &series("fail")), 0.0, "{m}");
            if sample(&m, &series("ok")) >= 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "{} never checked: {m}", b.v4);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// e. IPv6 and dsr-l2
// ---------------------------------------------------------------------------------------------

/// An IPv6 VIP over IPv6 backends: curl -6 gets answers through it, and 600 new connections
/// spread evenly (each backend within 8 points of a third).
#[test]
fn an_ipv6_vip_spreads_connections_over_ipv6_backends() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 3,
        xlb: xlb.clone(),
    });
    let _nginx = nginx_on(&t.backends, "backend");
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "web6",
                (VIP_V6.into(), 80, "tcp"),
                "dsr-ipip",
                Some(&http_check(500, 2, 3)),
                &v6_backends(&t.backends),
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);
    let client = &t.clients[0].ns;
    let names = names("backend", 3);
    let mut seen = BTreeSet::new();
    for _ in 0..15 {
        let (code, body) = curl(client, &["-6", &format!("http://[{VIP_V6}]/")]);
        assert_eq!(code, 0, "curl -6: {body}");
        seen.insert(body.trim().to_string());
    }
    assert_eq!(seen.len(), 3, "curl -6 reached every backend: {seen:?}");

    let per = tally(
        &new_connections(client, SocketAddr::new(VIP_V6.into(), 80), 600),
        &names,
    );
    let shares = percent(&per);
    eprintln!("600 IPv6 connections: {per:?} = {shares:?}%");
    for s in &shares {
        assert!((s - 100.0 / 3.0).abs() <= 8.0, "{shares:?}%");
    }
    assert!(counter(&t, &xlb, "fwd_encap_v6") >= 3 * 600);
    assert_eq!(counter(&t, &xlb, "fwd_encap_v4"), 0);
    assert!(agent.terminate().success());
}

/// dsr-l2 VIPs (IPv4 and IPv6) over backends on the xlb host's own L2 segment: the agent
/// resolves the backends' MACs itself, the balancer rewrites only the destination MAC, and
/// curl reaches every backend (which have the VIPs on loopback and no decapsulator).
#[test]
fn dsr_l2_vips_reach_backends_on_the_xlb_hosts_segment() {
    let xlb = xlb_bin();
    let t = Topology::build_with_l2_segment(
        &Options {
            clients: 1,
            backends: 0,
            xlb: xlb.clone(),
        },
        2,
    );
    let _nginx = nginx_on(&t.l2_backends, "l2backend");
    let health = http_check(500, 2, 3);
    let file = write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "l2v4",
                (VIP_V4.into(), 80, "tcp"),
                "dsr-l2",
                Some(&health),
                &v4_backends(&t.l2_backends),
            )
            + &vip_toml(
                "l2v6",
                (VIP_V6.into(), 80, "tcp"),
                "dsr-l2",
                Some(&health),
                &v6_backends(&t.l2_backends),
            )),
    );
    let mut agent = start_agent(&t, &xlb, &file);
    // The lb host has never talked to the backends: the agent prompts the kernel to resolve
    // each one, and writes its MAC once the neighbour table has it.
    for b in &t.l2_backends {
        for addr in [IpAddr::V4(b.v4), IpAddr::V6(b.v6)] {
            let needle = format!("backend={addr} ");
            let unresolved = agent
                .lines()
                .iter()
                .any(|l| l.contains("has no MAC") && l.contains(&needle));
            if unresolved {
                wait_for_line(
                    &mut agent,
                    &["dsr-l2 backend MAC changed", &needle],
                    Duration::from_secs(10),
                );
            }
        }
    }
    // The MAC line is logged just before the maps are rewritten; the agent answers admin
    // requests in the same loop, so once this one is answered the maps hold the MACs.
    cli_json(&t, &xlb, &["status"]);
    let client = &t.clients[0].ns;
    for (flag, url) in [
        ("-4", format!("http://{VIP_V4}/")),
        ("-6", format!("http://[{VIP_V6}]/")),
    ] {
        let mut seen = BTreeSet::new();
        for _ in 0..15 {
            let (code, body) = curl(client, &[flag, &url]);
            assert_eq!(code, 0, "curl {url}: {body}");
            seen.insert(body.trim().to_string());
        }
        assert_eq!(
            seen,
            names("l2backend", 2).into_iter().collect(),
            "curl {flag}"
        );
    }
    assert!(counter(&t, &xlb, "fwd_l2") >= 2 * 15 * 3);
    assert_eq!(counter(&t, &xlb, "drop_no_backend"), 0, "no SYN was lost");
    assert_eq!(counter(&t, &xlb, "fwd_encap_v4"), 0);
    assert_eq!(counter(&t, &xlb, "fwd_encap_v6"), 0);

    // Backends whose MAC cannot be resolved (nobody has their address on the segment) can
    // never be reached, so they stay out of the table even when they are enough of the pool
    // to put the VIP in panic. Panic sends new flows to backends failing their checks, which
    // may yet answer; a frame for a MAC nobody has reaches nobody. No health check here: the
    // missing MAC is the only reason they count as down.
    let ghosts = (30..33).map(|i| (IpAddr::from([10, 99, 2, i]), 100));
    write_config(
        &t,
        &(t.agent_table()
            + &vip_toml(
                "l2v4",
                (VIP_V4.into(), 80, "tcp"),
                "dsr-l2",
                None,
                &v4_backends(&t.l2_backends)
                    .into_iter()
                    .chain(ghosts)
                    .collect::<Vec<_>>(),
            )),
    );
    let seen_before = agent.lines().len();
    cli_ok(&t, &xlb, &["reload"]);
    assert!(
        agent.lines()[seen_before..]
            .iter()
            .any(|l| l.contains("VIP in PANIC") && l.contains("vip=l2v4")),
        "2 of 5 backends reachable: the VIP is in panic"
    );
    let per = tally(
        &new_connections(client, SocketAddr::new(VIP_V4.into(), 80), 40),
        &names("l2backend", 2),
    );
    eprintln!("dsr-l2 VIP in panic with 3 unresolvable backends: {per:?}");
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// f. Path MTU
// ---------------------------------------------------------------------------------------------

/// With 1500-byte links everywhere, a 2 MB upload through the VIP completes: the client's
/// full-size segments do not fit once encapsulated, xlb answers them with ICMP too-big, and
/// the client lowers its path MTU to the VIP (IPv4: 1480; IPv6: 1460).
#[test]
fn uploads_complete_because_icmp_too_big_lowers_the_clients_path_mtu() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 1,
        xlb: xlb.clone(),
    });
    let _nginx = nginx_on(&t.backends, "backend");
    let file = write_config(&t, &config(&t));
    let mut agent = start_agent(&t, &xlb, &file);
    let client = &t.clients[0].ns;
    const BYTES: usize = 2_000_000;
    let body = t.dirs.tmp.join("upload.bin");
    // Not compressible and not all one byte, in case anything on the way looks.
    let data: Vec<u8> = (0..BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&body, data).expect("writing the upload");
    for (family, url, vip, mtu) in [
        (
            "-4",
            format!("http://{VIP_V4}/upload"),
            VIP_V4.to_string(),
            1480,
        ),
        (
            "-6",
            format!("http://[{VIP_V6}]/upload"),
            VIP_V6.to_string(),
            1460,
        ),
    ] {
        let before = counter(&t, &xlb, "icmp_too_big_sent");
        let started = Instant::now();
        let out = client
            .command("curl")
            .args(["-sS", "--max-time", "30", family, "--data-binary"])
            .arg(format!("@{}", body.display()))
            .args([
                "-H",
                "Content-Type: application/octet-stream",
                "-w",
                "\n%{http_code} %{size_upload}",
                &url,
            ])
            .output()
            .expect("running curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{family} upload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, format!("backend0 received\n\n200 {BYTES}"));
        let after = counter(&t, &xlb, "icmp_too_big_sent");
        let route = client.run(&["ip", family, "route", "get", &vip]);
        eprintln!(
            "{family}: {BYTES} bytes uploaded in {:?}; icmp_too_big_sent {before} -> {after}; \
             {}",
            started.elapsed(),
            route.trim()
        );
        assert!(after > before, "no ICMP too-big sent");
        assert!(
            route.contains(&format!("mtu {mtu}")),
            "the client learned the path MTU: {route}"
        );
    }
    assert!(agent.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// g. Non-VIP traffic
// ---------------------------------------------------------------------------------------------

/// Traffic to the xlb host's own addresses is untouched while the agent runs with VIPs: pings
/// (IPv4 and IPv6) and TCP connections to a server on the host, 256 KiB echoed intact.
#[test]
fn traffic_to_the_xlb_hosts_own_addresses_is_untouched() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 1,
        xlb: xlb.clone(),
    });
    let _nginx = nginx_on(&t.backends, "backend");
    let file = write_config(&t, &config(&t));
    let mut agent = start_agent(&t, &xlb, &file);
    let client = &t.clients[0].ns;
    let passed_before = counter(&t, &xlb, "pass_not_vip");

    client.run(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        &t.lb.v4.to_string(),
    ]);
    client.run(&[
        "ping",
        "-6",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        &t.lb.v6.to_string(),
    ]);

    const PORT: u16 = 7777;
    const BYTES: usize = 256 * 1024;
    for addr in [IpAddr::V4(t.lb.v4), IpAddr::V6(t.lb.v6)] {
        let at = SocketAddr::new(addr, PORT);
        let listener = in_netns(&t.lb.ns, move || {
            TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"))
        });
        // Echoes one connection back, then ends.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = s.try_clone().expect("clone");
            std::io::copy(&mut r, &mut s).expect("echo");
        });
        let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let echoed = in_netns(client, move || {
            let s = TcpStream::connect_timeout(&at, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connect {at}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut w = s.try_clone().expect("clone");
            // Written from another thread: the echo comes back while we write.
            let writer = std::thread::spawn(move || {
                w.write_all(&sent).expect("write");
                w.shutdown(std::net::Shutdown::Write).expect("shutdown");
            });
            let mut back = Vec::new();
            (&s).read_to_end(&mut back).expect("read the echo");
            writer.join().expect("writer");
            back
        });
        server.join().expect("server");
        assert!(echoed == data, "{addr}: the echo differs");
    }
    let passed = counter(&t, &xlb, "pass_not_vip") - passed_before;
    eprintln!("pass_not_vip moved by {passed}");
    assert!(passed >= 12, "passed {passed}");
    assert!(agent.terminate().success());
}
