//! The single-arm deployment, in network namespaces: client hosts, a router, the xlb host and
//! backend hosts, joined by veth pairs to the router, IPv4 and IPv6. Shared by the end-to-end
//! tests, `cargo xtask demo` and the benchmarks.
//!
//! ```text
//!   client0 ─┐                ┌─ backend0  (VIPs on lo, xlb decap on eth0)
//!   client1 ─┼── router ──────┼─ backend1
//!            │     │          └─ ...
//!            │   xlb host  (VIP routes point here; it sends encapsulated frames back through
//!                            the router: one arm, as Katran deploys)
//! ```
//!
//! Addresses: client `i` is 10.99.(100+i).2 / fd00:99:(100+i)::2, the xlb host 10.99.2.2 /
//! fd00:99:2::2, backend `i` 10.99.(3+i).2 / fd00:99:(3+i)::2; the router is `.1` / `::1` on
//! each link. The VIPs are [`VIP_V4`] and [`VIP_V6`]. For `dsr-l2`,
//! [`Topology::build_with_l2_segment`] adds backends on the xlb host's own link (a bridge in the
//! router), 10.99.2.(10+i) / fd00:99:2::(10+i). The root namespace is never a host or a
//! hop; every namespace, link, process and pin goes away when the [`Topology`] drops, and
//! [`crate::netns::sweep_stale`] removes what a killed run left. These are the addresses of
//! [`Plan::DEFAULT`]; [`Topology::build_with_plan`] numbers and names the same shape from
//! another [`Plan`] (one region of [`crate::regions::RegionTopology`]).

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::netns::{AgentDirs, Netns, sweep_stale, veth_pair};

/// The IPv4 VIP the router sends to the xlb host.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The IPv6 VIP the router sends to the xlb host.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);

/// One host: its namespace and addresses on its link to the router (`eth0`).
#[derive(Debug)]
pub struct Host {
    /// The namespace.
    pub ns: Netns,
    /// IPv4 address on eth0.
    pub v4: Ipv4Addr,
    /// IPv6 address on eth0.
    pub v6: Ipv6Addr,
}

/// Where the stderr lines of the [`Daemon`]s started from now on go, besides
/// [`Daemon::wait_for`] and [`Daemon::lines`]. Without [`set_daemon_logs`] they are echoed
/// (a failing test then shows them); a narrating program such as the demo keeps them in files.
#[derive(Debug, Clone)]
pub struct DaemonLogs {
    /// Echo each line to this process's stderr, indented and prefixed `[xlb]`.
    pub echo: bool,
    /// Append each daemon's lines to `<dir>/<role>-<subcommand>.log`, the role being the tag
    /// its namespace was created with (`lb-agent.log`, `backend0-decap.log`, ...).
    pub dir: Option<PathBuf>,
}

/// The setting of [`set_daemon_logs`]; `None` is the default, echo only.
static DAEMON_LOGS: Mutex<Option<DaemonLogs>> = Mutex::new(None);

/// Sets where the lines of daemons started after this call go (process-wide, since the
/// topology starts daemons of its own).
pub fn set_daemon_logs(logs: DaemonLogs) {
    *DAEMON_LOGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(logs);
}

/// The log file of a daemon started in `ns` with `args`, when [`set_daemon_logs`] asked for
/// files: named after the role in the namespace's name (`xlbt-<pid>-<n>-<role>`).
fn daemon_log_file(dir: &Path, ns: &Netns, args: &[&str]) -> std::fs::File {
    let role = ns.name().splitn(4, '-').nth(3).unwrap_or(ns.name());
    let what = args.first().copied().unwrap_or("xlb");
    let path = dir.join(format!("{role}-{what}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// A long-running `xlb` process in a namespace whose stderr lines are collected (and echoed,
/// indented, so a failing test shows them, unless [`set_daemon_logs`] says otherwise); killed
/// on drop if still running.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    /// Starts `xlb args...` in `ns` with `RUST_LOG=info`.
    pub fn start(ns: &Netns, xlb: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_log_filter(ns, xlb, args, "info")
    }

    /// Starts `xlb args...` in `ns` with `RUST_LOG=filter` (e.g. `info,xlb::access=off`: no
    /// per-request access log lines, for a benchmark).
    pub fn start_with_log_filter(ns: &Netns, xlb: &Path, args: &[&str], filter: &str) -> Daemon {
        let mut cmd = ns.command(xlb.to_str().expect("utf-8 path"));
        cmd.args(args)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning xlb");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let logs = DAEMON_LOGS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let echo = logs.as_ref().is_none_or(|l| l.echo);
        let mut file = logs
            .and_then(|l| l.dir)
            .map(|dir| daemon_log_file(&dir, ns, args));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("    [xlb] {line}");
                }
                if let Some(f) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`; panics with everything seen.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "xlb never printed {needle:?} within {timeout:?}; it printed:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits (bounded) for a line that contains every one of `needles` among the lines not yet
    /// seen by [`Daemon::wait_for`], [`Daemon::lines`] or this method (so an event that
    /// happens twice is waited for afresh), and returns it with the moment it was read; `None`
    /// when none arrived in time ([`Daemon::lines`] then shows what did).
    pub fn wait_for_new(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let line = self.lines.recv_timeout(left).ok()?;
            let at = Instant::now();
            self.seen.push(line.clone());
            if needles.iter().all(|n| line.contains(n)) {
                return Some((line, at));
            }
        }
        None
    }

    /// Every line seen so far (after draining what arrived).
    pub fn lines(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Every line, once the process has exited and its stderr closed (waiting at most
    /// `timeout` for the last ones).
    pub fn finish_lines(&mut self, timeout: Duration) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(timeout) {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Sends SIGTERM and waits (bounded, 10 s) for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "xlb did not exit within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `xlb` binary under test: `$XLB_BIN`, else the workspace's debug build (which must exist).
pub fn xlb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xlb");
    assert!(
        p.is_file(),
        "{} not found; build it first (`cargo build -p lb-userspace --bin xlb`, which \
         `cargo xtask test` does) or set XLB_BIN",
        p.display()
    );
    p
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of client hosts.
    pub clients: usize,
    /// Number of backend hosts.
    pub backends: usize,
    /// The `xlb` binary (for the router's XDP pass program and the backends' decapsulators).
    pub xlb: PathBuf,
}

/// The built topology. Field order is drop order: processes first, then namespaces, then the
/// agent's directories.
#[derive(Debug)]
pub struct Topology {
    /// The backends' decapsulators (`xlb decap run`), one per backend.
    pub decaps: Vec<Daemon>,
    /// The XDP pass program on the router's side of the xlb host's link: frames the balancer
    /// sends with XDP_TX into a veth are delivered only when the peer has an XDP program.
    pub router_xdp: Daemon,
    /// Client hosts.
    pub clients: Vec<Host>,
    /// The xlb host (its link to the router is `eth0`).
    pub lb: Host,
    /// Backend hosts.
    pub backends: Vec<Host>,
    /// Backend hosts on the xlb host's L2 segment, for `dsr-l2` VIPs (empty unless built with
    /// [`Topology::build_with_l2_segment`]).
    pub l2_backends: Vec<Host>,
    /// The router (links `c<i>` to clients, `l0` to the xlb host, `b<i>` to backends).
    pub router: Netns,
    /// Admin socket, state and pin directories for the xlb host's agent.
    pub dirs: AgentDirs,
    /// The addresses and names it was built with.
    pub plan: Plan,
}

/// Where a topology's addresses and names come from: every link is numbered
/// 10.`site`.net.0/24 and fd00:`site`:net::/64, and every namespace's tag starts with `tag`.
/// [`Plan::DEFAULT`] is the single-region plan (10.99.x.x / fd00:99:...); the two-region
/// topology ([`crate::regions`]) numbers region B from another site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Second octet of every IPv4 address: 10.`site_v4`.net.host.
    pub site_v4: u8,
    /// Second group of every IPv6 address: fd00:`site_v6`:net::host.
    pub site_v6: u16,
    /// Prefix of every namespace's tag (`"a-"` names the router `a-router`); also the role in
    /// daemon log file names.
    pub tag: &'static str,
}

impl Plan {
    /// The single-region plan: 10.99.x.x, fd00:99:..., bare tags.
    pub const DEFAULT: Plan = Plan {
        site_v4: 99,
        site_v6: 0x99,
        tag: "",
    };

    /// IPv4 address `host` on link `net` (the router is `.1`, the host `.2`).
    pub fn v4(&self, net: usize, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            self.site_v4,
            u8::try_from(net).expect("net < 256"),
            host,
        )
    }

    /// The same for IPv6: fd00:site:net::host.
    pub fn v6(&self, net: usize, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, self.site_v6, net as u16, 0, 0, 0, 0, host)
    }

    /// Every IPv4 address of the plan: 10.site.0.0/16.
    pub fn prefix_v4(&self) -> String {
        format!("10.{}.0.0/16", self.site_v4)
    }

    /// Every IPv6 address of the plan: fd00:site::/32.
    pub fn prefix_v6(&self) -> String {
        format!("fd00:{:x}::/32", self.site_v6)
    }

    /// A namespace named after `role` under this plan.
    pub(crate) fn netns(&self, role: &str) -> Netns {
        Netns::create(&format!("{}{role}", self.tag))
    }
}

/// Joins `host` to the router over `eth0` <-> `router_if` on link `net`, with a default route.
pub(crate) fn attach(
    plan: &Plan,
    router: &Netns,
    host: Netns,
    router_if: &str,
    net: usize,
) -> Host {
    attach_via(plan, router, host, router_if, router_if, net)
}

/// As [`attach`], with the router's addresses on `router_l3` (`router_if` itself, or a bridge
/// that `router_if` is then made a port of).
fn attach_via(
    plan: &Plan,
    router: &Netns,
    host: Netns,
    router_if: &str,
    router_l3: &str,
    net: usize,
) -> Host {
    veth_pair(&host, "eth0", router, router_if);
    if router_l3 != router_if {
        router.run(&["ip", "link", "set", router_if, "master", router_l3]);
    }
    let (h4, h6, r4, r6) = (
        plan.v4(net, 2),
        plan.v6(net, 2),
        plan.v4(net, 1),
        plan.v6(net, 1),
    );
    router.run(&["ip", "addr", "add", &format!("{r4}/24"), "dev", router_l3]);
    router.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{r6}/64"),
        "dev",
        router_l3,
        "nodad",
    ]);
    host_addresses(&host, h4, h6, r4, r6);
    Host {
        ns: host,
        v4: h4,
        v6: h6,
    }
}

/// `host`'s addresses on eth0 and its default routes via the router.
fn host_addresses(host: &Netns, h4: Ipv4Addr, h6: Ipv6Addr, r4: Ipv4Addr, r6: Ipv6Addr) {
    host.run(&["ip", "addr", "add", &format!("{h4}/24"), "dev", "eth0"]);
    host.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{h6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    host.run(&["ip", "route", "add", "default", "via", &r4.to_string()]);
    host.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        &r6.to_string(),
    ]);
}

/// The bridge in the router that makes the xlb host's link an L2 segment (with
/// [`Topology::build_with_l2_segment`]).
const SEGMENT_BRIDGE: &str = "br2";

/// Puts the VIPs on `ns`'s loopback (how a DSR backend accepts VIP traffic).
fn vips_on_loopback(ns: &Netns) {
    ns.run(&["ip", "addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"]);
    ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{VIP_V6}/128"),
        "dev",
        "lo",
        "nodad",
    ]);
}

/// Forwarding on, reverse-path filtering off (decapsulated packets arrive with the client's
/// source on a link that is not the client's route).
pub(crate) fn forwarding(ns: &Netns) {
    ns.run(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/ip_forward; \
         echo 1 > /proc/sys/net/ipv6/conf/all/forwarding; \
         for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
    ]);
}

impl Topology {
    /// Builds the topology: namespaces, links, addresses, routes, the VIPs on the backends'
    /// loopback, and the decapsulators, ready for an agent on the xlb host.
    pub fn build(options: &Options) -> Topology {
        Topology::build_with_l2_segment(options, 0)
    }

    /// [`Topology::build`], plus `l2_backends` backends on the xlb host's own L2 segment, for
    /// `dsr-l2` VIPs (which rewrite only the destination MAC, so the backend must be a
    /// neighbour of the xlb host). With `l2_backends > 0` the router's side of the xlb host's
    /// link (`l0`) becomes a port of a bridge (`br2`, which takes the router's addresses on
    /// that link); each L2 backend joins the bridge through its own port `s<i>`. L2 backend
    /// `i` is 10.99.2.(10+i) / fd00:99:2::(10+i), with the VIPs on loopback, ARP for them
    /// suppressed (`arp_ignore` 1, `arp_announce` 2, as a DSR backend needs) and no
    /// decapsulator. The XDP pass program stays on `l0`, the peer of the xlb host's `eth0`.
    pub fn build_with_l2_segment(options: &Options, l2_backends: usize) -> Topology {
        Topology::build_with_plan(options, l2_backends, Plan::DEFAULT)
    }

    /// [`Topology::build_with_l2_segment`] numbered and named by `plan` (one region of
    /// [`crate::regions::RegionTopology`]).
    pub fn build_with_plan(options: &Options, l2_backends: usize, plan: Plan) -> Topology {
        sweep_stale();
        let router = plan.netns("router");
        forwarding(&router);
        let clients: Vec<Host> = (0..options.clients)
            .map(|i| {
                attach(
                    &plan,
                    &router,
                    plan.netns(&format!("client{i}")),
                    &format!("c{i}"),
                    100 + i,
                )
            })
            .collect();
        let lb = if l2_backends == 0 {
            attach(&plan, &router, plan.netns("lb"), "l0", 2)
        } else {
            // No multicast snooping: without a querier it could starve IPv6 neighbour
            // discovery between the hosts on the segment.
            router.run(&[
                "ip",
                "link",
                "add",
                SEGMENT_BRIDGE,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
            router.run(&["ip", "link", "set", SEGMENT_BRIDGE, "up"]);
            attach_via(&plan, &router, plan.netns("lb"), "l0", SEGMENT_BRIDGE, 2)
        };
        for (vip, via) in [
            (format!("{VIP_V4}/32"), lb.v4.to_string()),
            (format!("{VIP_V6}/128"), lb.v6.to_string()),
        ] {
            let family = if vip.contains(':') { "-6" } else { "-4" };
            router.run(&["ip", family, "route", "add", &vip, "via", &via]);
        }
        let backends: Vec<Host> = (0..options.backends)
            .map(|i| {
                let b = attach(
                    &plan,
                    &router,
                    plan.netns(&format!("backend{i}")),
                    &format!("b{i}"),
                    3 + i,
                );
                forwarding(&b.ns);
                vips_on_loopback(&b.ns);
                b
            })
            .collect();
        let l2_backends: Vec<Host> = (0..l2_backends)
            .map(|i| {
                let ns = plan.netns(&format!("l2backend{i}"));
                let port = format!("s{i}");
                veth_pair(&ns, "eth0", &router, &port);
                router.run(&["ip", "link", "set", &port, "master", SEGMENT_BRIDGE]);
                let host = u8::try_from(10 + i).expect("fewer than 246 L2 backends");
                let (h4, h6) = (plan.v4(2, host), plan.v6(2, u16::from(host)));
                host_addresses(&ns, h4, h6, plan.v4(2, 1), plan.v6(2, 1));
                forwarding(&ns);
                // The VIP is on loopback, so without these the backend would answer ARP for
                // it on the segment and announce it as a source, stealing the VIP from the
                // xlb host.
                ns.run(&[
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore; \
                     echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce",
                ]);
                vips_on_loopback(&ns);
                Host { ns, v4: h4, v6: h6 }
            })
            .collect();
        // Every host knows the router's MACs before anything is measured (the agent resolves
        // the next hop itself; this only makes the first packets of a test deterministic).
        for h in clients
            .iter()
            .chain(std::iter::once(&lb))
            .chain(&backends)
            .chain(&l2_backends)
        {
            let gw4 = format!("{}.1", h.v4.to_string().rsplit_once('.').expect("v4").0);
            h.ns.run(&["ping", "-c", "1", "-W", "2", &gw4]);
        }
        let xlb = options.xlb.as_path();
        let mut router_xdp = Daemon::start(
            &router,
            xlb,
            &["agent", "--interface", "l0", "--xdp-mode", "native"],
        );
        router_xdp.wait_for("xlb_balancer attached", Duration::from_secs(20));
        let decaps = backends
            .iter()
            .map(|b| {
                let (a4, a6) = (b.v4.to_string(), b.v6.to_string());
                let mut d = Daemon::start(
                    &b.ns,
                    xlb,
                    &[
                        "decap",
                        "run",
                        "--interface",
                        "eth0",
                        "--address",
                        &a4,
                        "--address",
                        &a6,
                        "--xdp-mode",
                        "native",
                    ],
                );
                d.wait_for("xlb_decap attached", Duration::from_secs(20));
                d
            })
            .collect();
        Topology {
            decaps,
            router_xdp,
            clients,
            lb,
            backends,
            l2_backends,
            router,
            dirs: AgentDirs::create(&format!("{}lb", plan.tag)),
            plan,
        }
    }

    /// The `[agent]` table for the xlb host: its interface, tunnel sources (its own addresses),
    /// per-topology socket, state and pin directories, and a small connection table.
    pub fn agent_table(&self) -> String {
        format!(
            "[agent]\ninterface = \"eth0\"\nxdp_mode = \"native\"\nnext_hop_mac = \"auto\"\n\
             encap_source_v4 = \"{}/32\"\nencap_source_v6 = \"{}/128\"\negress_mtu = 1500\n\
             flow_table_entries = 65536\n{}",
            self.lb.v4,
            self.lb.v6,
            self.dirs.agent_keys()
        )
    }

    /// The agent's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dirs.tmp.join("admin.sock")
    }

    /// Runs the run-time CLI on the xlb host as an operator would, `xlb --socket <the agent's
    /// admin socket> args...`, and returns its output whatever the exit status.
    pub fn cli(&self, xlb: &Path, args: &[&str]) -> Output {
        let socket = self.admin_socket();
        let mut cmd = self.lb.ns.command(xlb.to_str().expect("utf-8 path"));
        cmd.arg("--socket")
            .arg(&socket)
            .args(args)
            .env("NO_COLOR", "1");
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run xlb {args:?} in {}: {e}", self.lb.ns.name()))
    }
}

/// Runs the `xlb` CLI in `ns` against the admin socket `socket`: its exit code, stdout and
/// stderr, echoed (indented) so a failing test shows what the CLI said.
pub fn run_cli(ns: &Netns, xlb: &Path, socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = ns
        .command(xlb.to_str().expect("utf-8 path"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running the xlb CLI");
    let code = out.status.code().expect("the CLI exited");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("    $ xlb {} -> {code}\n{stdout}{stderr}", args.join(" "));
    (code, stdout, stderr)
}
