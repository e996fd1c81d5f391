//! The "together" arrangement (issue 7, item 8) in network namespaces: the L4 fast path in front
//! of gateway instances, and a gateway whose upstream is itself an L4 VIP. Built on the
//! single-arm topology of [`crate::topology`] (clients, router, the front xlb host, backends
//! with `xlb decap`), plus two gateway hosts and an upstream host on the same router.
//!
//! ```text
//!   client<i> ─┐              ┌─ backend<j>  10.99.(3+j).2  xlb decap; W on lo; nginx :8080
//!              ├── router ────┼─ gateway<k>  10.99.(50+k).2, fd00:99:3(2+k)::2
//!              │     │        │     xlb agent: l7 VIPs V:80 (V on lo), tunnel_addresses = its own
//!              │     │        └─ upstream    10.99.60.2, upstream<k> 10.99.60.(10+k) nginx :8080
//!              │   front  10.99.2.2: xlb agent, dsr-ipip V:80 -> gateway0, gateway1
//!                                               dsr-ipip W:8080 -> backend0, backend1
//! ```
//!
//! - **L4 in front of gateways.** The router sends the gateway VIP [`VIP_V4`] (V) to the front
//!   host, whose agent balances V:80 (`dsr-ipip`) over the gateway hosts' own addresses. Each
//!   gateway host's agent lists its own address in `agent.tunnel_addresses`, so its XDP program
//!   strips the IPIP header and passes the inner packet (to V, an `l7` VIP there) to its stack,
//!   where its gateway listens on V:80; the reply goes from V straight to the client (DSR).
//!   The front checks each gateway host's agent by HTTP (`GET /metrics` on
//!   [`GATEWAY_METRICS_PORT`] of the gateway host's address; its `agent.metrics_listen` is
//!   `[::]:9641`): the gateway listens only on V:80, which a check to the gateway host's own
//!   address cannot reach. Gateway `k`'s default pool is its own nginx, `upstream<k>`, so a
//!   response names the gateway that served it.
//! - **Gateways in front of an L4 VIP.** [`W_V4`]:[`W_PORT`] (W) is a second `dsr-ipip` VIP of
//!   the front host over the backends, whose nginx answers `backend<j>` on port 8080 (W on their
//!   loopback, `xlb decap` on their NIC) and closes every connection after one response, so each
//!   request the gateway forwards is a new flow through the balancer. Each gateway routes
//!   [`W_PATH_PREFIX`] to a pool whose one server is W:8080: the request goes client -> gateway
//!   -> (TCP to W) -> front -> IPIP to a backend, whose answer goes straight to the gateway.
//!
//! The gateway VIP is served over IPv4 and IPv6 (IPIP and IP6IP6 from the front to the
//! gateway hosts' tunnel addresses); W over IPv4. Every namespace, process, pin and file goes
//! away when the [`TogetherTopology`] drops (also on panic); [`crate::netns::sweep_stale`]
//! removes what a killed run left.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    l7::{NginxServer, accepts},
    netns::{AgentDirs, Netns, in_netns},
    topology::{
        Daemon, Host, Options, Plan, Topology, VIP_V4, VIP_V6, attach, forwarding, xlb_bin,
    },
};

/// The L4 VIP the gateways forward to (W), routed to the front host.
pub const W_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// W's port, and the port every nginx here listens on.
pub const W_PORT: u16 = 8080;
/// Where each gateway host's agent serves its metrics (on every address, so also on the
/// host's own IPv4 and IPv6 addresses): the front's health check of that gateway.
pub const GATEWAY_METRICS_PORT: u16 = 9641;
/// The gateways' route to W: requests below this path go to the pool whose server is W.
pub const W_PATH_PREFIX: &str = "/w";
/// Number of gateway hosts.
pub const GATEWAYS: usize = 2;

/// The front's health check of its backends: HTTP every 300 ms, down after 2 failures, up
/// after 2 passes. `port` and `path` say what is checked.
fn health_check(port: u16, path: &str) -> String {
    format!(
        "[vip.health_check]\ntype = \"http\"\nport = {port}\npath = \"{path}\"\n\
         interval_ms = {HEALTH_INTERVAL_MS}\ntimeout_ms = 250\nrise = 2\nfall = {HEALTH_FALL}\n"
    )
}

/// The front's health-check interval.
pub const HEALTH_INTERVAL_MS: u64 = 300;
/// The front's health-check `fall`.
pub const HEALTH_FALL: u64 = 2;

/// One gateway host: its namespace and address, its agent's directories and the address of
/// its own upstream nginx.
#[derive(Debug)]
pub struct GatewayHost {
    /// The host (`eth0` toward the router; V on `lo`).
    pub host: Host,
    /// Admin socket, state and pin directories for its agent.
    pub dirs: AgentDirs,
    /// Its upstream's address (`upstream<k>` on the upstream host).
    pub upstream: Ipv4Addr,
}

/// The built topology. Field order is drop order: agents, then nginx, then the hosts and the
/// base topology (namespaces, decapsulators, directories).
#[derive(Debug)]
pub struct TogetherTopology {
    front_agent: Option<Daemon>,
    gateway_agents: Vec<Option<Daemon>>,
    /// The gateways' upstreams: `upstreams[k]`, named `upstream<k>`, is gateway `k`'s.
    pub upstreams: Vec<NginxServer>,
    /// W's servers: `w_servers[j]` on backend `j`, named `backend<j>`.
    pub w_servers: Vec<NginxServer>,
    /// The gateway hosts.
    pub gateways: Vec<GatewayHost>,
    /// The host of the gateways' upstreams.
    pub upstream_host: Host,
    /// Clients, router, the front xlb host (`base.lb`) and W's backends.
    pub base: Topology,
    xlb: PathBuf,
}

/// An nginx answering `GET` anything on `listen` with `<name>\n`, its access log off; with
/// `close` every connection is closed after one response (`keepalive_timeout 0`).
fn nginx_conf(name: &str, listen: &str, close: bool) -> impl Fn(&Path) -> String + use<> {
    let (name, listen) = (name.to_string(), listen.to_string());
    let keepalive = if close { "0" } else { "60s" };
    move |dir: &Path| {
        let dir = dir.display();
        format!(
            r#"
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout {keepalive};
    server {{
        listen {listen};
        location / {{ default_type text/plain; return 200 "{name}\n"; }}
    }}
}}
"#
        )
    }
}

impl TogetherTopology {
    /// Builds everything and starts the nginx servers; no agent runs yet
    /// ([`TogetherTopology::start_gateway`], [`TogetherTopology::start_front`]).
    pub fn build(clients: usize) -> TogetherTopology {
        let xlb = xlb_bin();
        let base = Topology::build(&Options {
            clients,
            backends: 2,
            xlb: xlb.clone(),
        });
        let plan = Plan::DEFAULT;
        // W: routed to the front host, on every backend's loopback.
        base.router.run(&[
            "ip",
            "route",
            "add",
            &format!("{W_V4}/32"),
            "via",
            &base.lb.v4.to_string(),
        ]);
        for b in &base.backends {
            b.ns.run(&["ip", "addr", "add", &format!("{W_V4}/32"), "dev", "lo"]);
        }
        let upstream_host = attach(&plan, &base.router, plan.netns("upstream"), "u0", 60);
        let gateways: Vec<GatewayHost> = (0..GATEWAYS)
            .map(|k| {
                let host = attach(
                    &plan,
                    &base.router,
                    plan.netns(&format!("gateway{k}")),
                    &format!("g{k}"),
                    50 + k,
                );
                // rp_filter off (decapsulated packets carry the client's source), V on
                // loopback without answering ARP for it or announcing it as a source.
                forwarding(&host.ns);
                host.ns.run(&[
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore; \
                     echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce",
                ]);
                host.ns
                    .run(&["ip", "addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"]);
                host.ns.run(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{VIP_V6}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ]);
                // Both families' neighbours resolved before any agent or check runs.
                for router in [
                    plan.v4(50 + k, 1).to_string(),
                    plan.v6(50 + k, 1).to_string(),
                ] {
                    host.ns.run(&["ping", "-c", "1", "-W", "2", &router]);
                }
                let upstream = plan.v4(60, 10 + k as u8);
                upstream_host.ns.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{upstream}/24"),
                    "dev",
                    "eth0",
                ]);
                GatewayHost {
                    host,
                    dirs: AgentDirs::create(&format!("gateway{k}")),
                    upstream,
                }
            })
            .collect();
        upstream_host
            .ns
            .run(&["ping", "-c", "1", "-W", "2", &plan.v4(60, 1).to_string()]);
        let upstreams = gateways
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let name = format!("upstream{k}");
                let listen = SocketAddr::from((g.upstream, W_PORT));
                let conf = nginx_conf(&name, &listen.to_string(), false);
                NginxServer::start(&upstream_host.ns, &name, &conf, listen)
            })
            .collect();
        let w_servers = base
            .backends
            .iter()
            .enumerate()
            .map(|(j, b)| {
                let name = format!("backend{j}");
                let conf = nginx_conf(&name, &W_PORT.to_string(), true);
                NginxServer::start(&b.ns, &name, &conf, SocketAddr::from((b.v4, W_PORT)))
            })
            .collect();
        TogetherTopology {
            front_agent: None,
            gateway_agents: (0..GATEWAYS).map(|_| None).collect(),
            upstreams,
            w_servers,
            gateways,
            upstream_host,
            base,
            xlb,
        }
    }

    /// Gateway `k`'s agent configuration: its NIC, its own addresses as its tunnel addresses,
    /// its metrics endpoint on every address (port [`GATEWAY_METRICS_PORT`]), and the l7 VIPs
    /// V:80 (`api4`, [`VIP_V4`]) and `api6` ([`VIP_V6`]) with two routes each:
    /// [`W_PATH_PREFIX`] to the pool `l4`, whose one server is W:8080, and everything else to
    /// the default pool, gateway `k`'s own upstream. The pool `l4` has more retries (each is a
    /// new connection, which the L4 balancer may send to another of W's backends) and no
    /// passive outlier ejection: its one "server" is a whole L4 pool whose failed backends the
    /// L4 layer's health checks take out, and a few refused connections to one of them must
    /// not eject all of W.
    pub fn gateway_config(&self, k: usize) -> String {
        let g = &self.gateways[k];
        let (a4, a6) = (g.host.v4, g.host.v6);
        let mut text = format!(
            "[agent]\ninterface = \"eth0\"\nxdp_mode = \"native\"\n{keys}\
             metrics_listen = \"[::]:{GATEWAY_METRICS_PORT}\"\n\
             tunnel_addresses = [\"{a4}\", \"{a6}\"]\n",
            keys = g.dirs.agent_keys(),
        );
        for (name, vip) in [("api4", IpAddr::V4(VIP_V4)), ("api6", IpAddr::V6(VIP_V6))] {
            text.push_str(&format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\n\
                 protocol = \"tcp\"\nmode = \"l7\"\n\n\
                 [[vip.route]]\nname = \"to-w\"\npath_prefix = \"{W_PATH_PREFIX}\"\npool = \"l4\"\n\n\
                 [[vip.route]]\nname = \"rest\"\npath_prefix = \"/\"\npool = \"default\"\n\n\
                 [[vip.pool]]\nname = \"l4\"\nretries = 5\noutlier_consecutive_5xx = 0\n\
                 outlier_consecutive_failures = 0\n\n\
                 [[vip.backend]]\naddress = \"{up}\"\nport = {W_PORT}\n\n\
                 [[vip.backend]]\naddress = \"{W_V4}\"\nport = {W_PORT}\npool = \"l4\"\n",
                up = g.upstream,
            ));
        }
        text
    }

    /// The front host's configuration: [`Topology::agent_table`] and two `dsr-ipip` VIPs, V:80
    /// over the gateway hosts (checked on their agents' metrics endpoints) and W:8080 over the
    /// backends (checked on their nginx).
    pub fn front_config(&self) -> String {
        let mut text = self.base.agent_table();
        for (name, vip, v4) in [
            ("gateways", IpAddr::V4(VIP_V4), true),
            ("gateways6", IpAddr::V6(VIP_V6), false),
        ] {
            text.push_str(&format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\n\
                 protocol = \"tcp\"\nmode = \"dsr-ipip\"\n{}",
                health_check(GATEWAY_METRICS_PORT, "/metrics")
            ));
            for g in &self.gateways {
                let a = if v4 {
                    IpAddr::V4(g.host.v4)
                } else {
                    IpAddr::V6(g.host.v6)
                };
                text.push_str(&format!("[[vip.backend]]\naddress = \"{a}\"\n"));
            }
        }
        text.push_str(&format!(
            "\n[[vip]]\nname = \"w\"\naddress = \"{W_V4}\"\nport = {W_PORT}\n\
             protocol = \"tcp\"\nmode = \"dsr-ipip\"\n{}",
            health_check(W_PORT, "/")
        ));
        for b in &self.base.backends {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", b.v4));
        }
        text
    }

    /// Starts gateway `k`'s agent with [`TogetherTopology::gateway_config`] and waits (20 s at
    /// most) until its balancer is attached and its gateway accepts on V:80 (from its own host:
    /// V is routed to the front).
    pub fn start_gateway(&mut self, k: usize) {
        let g = &self.gateways[k];
        let file = g.dirs.tmp.join("xlb.toml");
        std::fs::write(&file, self.gateway_config(k)).expect("writing the gateway's xlb.toml");
        let args = ["agent", "--config", file.to_str().expect("utf-8 path")];
        let mut agent = Daemon::start(&g.host.ns, &self.xlb, &args);
        agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
        let listen = SocketAddr::from((VIP_V4, 80));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepts(&g.host.ns, listen, Duration::from_millis(200)) {
            assert!(
                Instant::now() < deadline,
                "gateway{k}'s agent does not listen on {listen}; it printed:\n{}",
                agent.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.gateway_agents[k] = Some(agent);
    }

    /// Kills gateway `k`'s agent (SIGKILL: its listener and metrics endpoint die with it; its
    /// XDP program stays attached, pinned, as after any crash).
    pub fn kill_gateway(&mut self, k: usize) {
        if let Some(mut a) = self.gateway_agents[k].take() {
            a.kill();
        }
    }

    /// Gateway `k`'s running agent (its log lines); panics when none runs.
    pub fn gateway_agent(&mut self, k: usize) -> &mut Daemon {
        self.gateway_agents[k]
            .as_mut()
            .unwrap_or_else(|| panic!("gateway{k}'s agent is not running"))
    }

    /// Starts the front host's agent with [`TogetherTopology::front_config`] and waits (20 s
    /// at most) until its balancer is attached.
    pub fn start_front(&mut self) -> &mut Daemon {
        let file = self.base.dirs.tmp.join("xlb.toml");
        std::fs::write(&file, self.front_config()).expect("writing the front's xlb.toml");
        let args = ["agent", "--config", file.to_str().expect("utf-8 path")];
        let mut agent = Daemon::start(&self.base.lb.ns, &self.xlb, &args);
        agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
        let agent = self.front_agent.insert(agent);
        // Traffic starts only once the front has seen every running gateway pass `rise`
        // checks in both families: a check that times out at start (a first neighbour
        // resolution racing it) would otherwise take a gateway out and back while the test's
        // first connections are on it, resetting them (the front re-selects flows of a down
        // backend), which is the documented behaviour and not what these tests measure.
        let front = SocketAddr::from(([127, 0, 0, 1], 9641));
        let deadline = Instant::now() + Duration::from_secs(15);
        for (k, g) in self.gateways.iter().enumerate() {
            if self.gateway_agents[k].is_none() {
                continue;
            }
            for (vip, backend) in [
                ("gateways", IpAddr::V4(g.host.v4)),
                ("gateways6", IpAddr::V6(g.host.v6)),
            ] {
                let labels = format!("vip=\"{vip}\",backend=\"{backend}\"");
                loop {
                    let ok = metric(
                        &self.base.lb.ns,
                        front,
                        &format!(
                            "xlb_health_check_duration_seconds_count{{{labels},result=\"ok\"}}"
                        ),
                    );
                    let up = metric(
                        &self.base.lb.ns,
                        front,
                        &format!("xlb_backend_up{{{labels}}}"),
                    );
                    if ok >= 2 && up == 1 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the front's checks of gateway{k} ({vip}, {backend}) did not pass \
                         within 15 s: {ok} passed, up {up}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        agent
    }

    /// The front host's running agent; panics when none runs.
    pub fn front_agent(&mut self) -> &mut Daemon {
        self.front_agent
            .as_mut()
            .expect("the front agent is not running")
    }
}

/// What one request got: the status and body, or why there was none.
pub type Answer = Result<(u16, String), String>;

/// Sends `GET path` with `X-Request-Id: <id_prefix><n>` to `addr` from `ns`, `count` times in
/// a row, each on a new TCP connection (a new source port, so a new flow for a balancer) with
/// `Connection: close`; every connect, write and read bounded (3 s).
pub fn get_each_on_a_new_connection(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    id_prefix: &str,
    count: usize,
) -> Vec<Answer> {
    let (path, id_prefix) = (path.to_string(), id_prefix.to_string());
    in_netns(ns, move || {
        (0..count)
            .map(|n| get_on_a_new_connection(addr, &path, &format!("{id_prefix}{n}")))
            .collect()
    })
}

/// One `GET path` with `X-Request-Id: id` on a new connection to `addr`, as
/// [`get_each_on_a_new_connection`] sends it, from the calling thread's namespace (call it on a
/// thread inside the client's, e.g. from [`crate::netns::spawn_in_netns`]).
pub fn get_on_a_new_connection(addr: SocketAddr, path: &str, id: &str) -> Answer {
    let limit = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: api.test\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response head: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok((status, body.trim().to_string()))
}

/// The value of the Prometheus sample `sample` (its name and labels, exactly as rendered, e.g.
/// `xlb_datapath_events_total{event="region_decap"}`) scraped from `addr` in `ns`; panics when
/// the scrape fails or has no such sample.
pub fn metric(ns: &Netns, addr: SocketAddr, sample: &str) -> u64 {
    let text = match in_netns(ns, move || {
        get_on_a_new_connection(addr, "/metrics", "scrape")
    }) {
        Ok((200, text)) => text,
        other => panic!("scraping {addr} in {}: {other:?}", ns.name()),
    };
    let prefix = format!("{sample} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sample {sample} at {addr}:\n{text}")) as u64
}
