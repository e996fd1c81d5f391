//! The L7 gateway's deployment in network namespaces, for end-to-end tests of `l7` VIPs and the
//! `l7` benchmark: a client host, the xlb host (the gateway's VIPs on its loopback, the agent's
//! XDP program on its client-facing link) and an upstream host running nginx servers that say
//! who they are and echo what the gateway sent them.
//!
//! ```text
//!   client (eth0) ─── (eth0) xlb host (eth1) ─── (eth0) upstream host
//!   10.97.1.2          10.97.1.1   10.97.2.1          10.97.2.2, upstream i: 10.97.2.(10+i)
//!   fd00:97:1::2       fd00:97:1::1 fd00:97:2::1      fd00:97:2::2, upstream i: fd00:97:2::(10+i)
//!                      VIPs on lo: [`L7_VIP_V4`], [`L7_VIP_V6`]
//! ```
//!
//! The agent attaches to the xlb host's `eth0` ([`AGENT_INTERFACE`]); its XDP program passes
//! l7 VIP traffic to the stack, where the gateway listens on VIP:port. The xlb host also routes
//! between its two links, so the client can reach an upstream directly too (how the harness
//! tests itself, and how a test compares a direct answer with a proxied one).
//!
//! Upstream `i` is one nginx (`upstream<i>`) on its own addresses, with three listeners:
//! [`UPSTREAM_HTTP_PORT`] (HTTP/1.1), [`UPSTREAM_H2C_PORT`] (HTTP/2 with prior knowledge only:
//! nginx's plaintext `http2` listener speaks no HTTP/1.1 and no `Upgrade: h2c`) and
//! [`UPSTREAM_TLS_PORT`] (TLS, ALPN h2 and http/1.1, with a certificate from
//! [`self_signed_cert`] for `upstream<i>.test` and its addresses). Every response carries
//! `X-Upstream: upstream<i>`. Paths:
//!
//! - any path not below: `200`, the echo body ([`ECHO_FIELDS`] and [`L7Options::echo_headers`],
//!   one `key=value` line each; an absent header echoes as an empty value);
//! - `/fixed`: `200` with [`FIXED_BODY`] (100 bytes), the benchmark's response;
//! - `/status/{404,500,502,503}`: that status, body `upstream<i> <status>`;
//! - `/upload`: reads the request body (up to 64 MiB) and answers `upstream=<name>` and
//!   `received=<bytes>` (nginx passes the body to a second server, which sees its length);
//! - `/big/file` (1 MiB), `/slow/file` (the same, sent at 64 KiB/s).
//!
//! WebSocket upgrades cannot be tested against these upstreams (stock nginx has no WebSocket
//! endpoint); such a test needs a small upgrade-speaking server of its own.
//!
//! Every namespace, process and file goes away when the [`L7Topology`] drops (also on panic);
//! [`crate::netns::sweep_stale`] removes what a killed run left.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    netns::{AgentDirs, Netns, in_netns, sweep_stale, veth_pair},
    topology::Daemon,
};

/// The IPv4 VIP on the xlb host's loopback.
pub const L7_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 80);
/// The IPv6 VIP on the xlb host's loopback.
pub const L7_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x7, 0, 0, 0, 0, 0x80);
/// The xlb host's interface toward the client, where the agent attaches (`agent.interface`).
pub const AGENT_INTERFACE: &str = "eth0";
/// Where the agent's Prometheus endpoint listens (inside the xlb host's namespace).
pub const METRICS_LISTEN: &str = "127.0.0.1:9100";
/// Each upstream's HTTP/1.1 port.
pub const UPSTREAM_HTTP_PORT: u16 = 8080;
/// Each upstream's cleartext HTTP/2 port (prior knowledge only).
pub const UPSTREAM_H2C_PORT: u16 = 8081;
/// Each upstream's TLS port (ALPN h2 and http/1.1).
pub const UPSTREAM_TLS_PORT: u16 = 8443;
/// The body of `GET /fixed` on every upstream: 100 bytes, the benchmark's small response.
pub const FIXED_BODY: &str = "xlb-l7-fixed-response-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz--ok\n";

/// What the echo body reports, as `key=value` lines in this order (after `upstream=<name>`):
/// the nginx variable behind each key. Headers the gateway adds or must strip are here, so a
/// test sees what reached the upstream.
pub const ECHO_FIELDS: &[(&str, &str)] = &[
    ("protocol", "$server_protocol"),
    ("method", "$request_method"),
    ("uri", "$request_uri"),
    ("host", "$http_host"),
    ("remote-addr", "$remote_addr"),
    ("x-forwarded-for", "$http_x_forwarded_for"),
    ("x-forwarded-proto", "$http_x_forwarded_proto"),
    ("forwarded", "$http_forwarded"),
    ("x-request-id", "$http_x_request_id"),
    ("x-xlb-identity", "$http_x_xlb_identity"),
    ("authorization", "$http_authorization"),
    ("x-api-key", "$http_x_api_key"),
    ("connection", "$http_connection"),
    ("keep-alive", "$http_keep_alive"),
    ("te", "$http_te"),
    ("upgrade", "$http_upgrade"),
    ("transfer-encoding", "$http_transfer_encoding"),
    ("content-length", "$http_content_length"),
    ("cookie", "$http_cookie"),
];

/// What to build.
#[derive(Debug, Clone)]
pub struct L7Options {
    /// Number of nginx upstreams. Default 2.
    pub upstreams: usize,
    /// nginx worker processes per upstream. Default 1.
    pub upstream_workers: usize,
    /// Further request headers the echo body reports (lower case, e.g. `"x-tenant"`), after
    /// [`ECHO_FIELDS`]. Default none.
    pub echo_headers: Vec<String>,
}

impl Default for L7Options {
    fn default() -> Self {
        L7Options {
            upstreams: 2,
            upstream_workers: 1,
            echo_headers: Vec::new(),
        }
    }
}

/// One upstream server: an nginx on the upstream host with addresses of its own.
#[derive(Debug)]
pub struct Upstream {
    /// `upstream<i>`: the `X-Upstream` header and the echo body's `upstream=` line.
    pub name: String,
    /// Its IPv4 address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
    /// The nginx serving it.
    pub server: NginxServer,
}

impl Upstream {
    /// Its HTTP/1.1 listener (IPv4).
    pub fn http(&self) -> SocketAddr {
        SocketAddr::from((self.v4, UPSTREAM_HTTP_PORT))
    }

    /// A `[[vip.backend]]` table for this upstream's IPv4 address and `port`.
    pub fn backend_toml(&self, port: u16) -> String {
        format!(
            "[[vip.backend]]\naddress = \"{}\"\nport = {port}\n",
            self.v4
        )
    }
}

/// The built topology. Field order is drop order: the upstreams' processes, then the
/// namespaces, then the agent's directories and the scratch directory.
#[derive(Debug)]
pub struct L7Topology {
    /// The nginx upstreams, `upstreams[i]` named `upstream<i>`.
    pub upstreams: Vec<Upstream>,
    /// The client host (`eth0`: 10.97.1.2, fd00:97:1::2).
    pub client: Netns,
    /// The xlb host (`eth0` toward the client, `eth1` toward the upstreams; VIPs on `lo`).
    pub lb: Netns,
    /// The upstream host.
    pub upstream_host: Netns,
    /// Admin socket, state and pin directories for the xlb host's agent.
    pub dirs: AgentDirs,
    /// Certificate for the upstreams' TLS listeners (also a CA file for curl).
    pub upstream_cert: SelfSigned,
    /// Scratch files (curl's headers and bodies, configurations), removed on drop.
    pub scratch: ScratchDir,
}

impl L7Topology {
    /// Builds the namespaces and links, starts the upstreams and waits until each accepts
    /// connections. Sweeps leftovers of killed runs first.
    pub fn build(options: &L7Options) -> L7Topology {
        sweep_stale();
        assert!((1..=100).contains(&options.upstreams), "1 to 100 upstreams");
        let scratch = ScratchDir::create("l7");
        let client = Netns::create("l7client");
        let lb = Netns::create("l7lb");
        let upstream_host = Netns::create("l7upstream");
        veth_pair(&client, "eth0", &lb, AGENT_INTERFACE);
        veth_pair(&lb, "eth1", &upstream_host, "eth0");
        let addr = |ns: &Netns, dev: &str, a: &str| {
            let family = if a.contains(':') { "-6" } else { "-4" };
            let mut args = vec!["ip", family, "addr", "add", a, "dev", dev];
            if family == "-6" {
                args.push("nodad");
            }
            ns.run(&args);
        };
        addr(&client, "eth0", "10.97.1.2/24");
        addr(&client, "eth0", "fd00:97:1::2/64");
        addr(&lb, AGENT_INTERFACE, "10.97.1.1/24");
        addr(&lb, AGENT_INTERFACE, "fd00:97:1::1/64");
        addr(&lb, "eth1", "10.97.2.1/24");
        addr(&lb, "eth1", "fd00:97:2::1/64");
        addr(&lb, "lo", &format!("{L7_VIP_V4}/32"));
        addr(&lb, "lo", &format!("{L7_VIP_V6}/128"));
        addr(&upstream_host, "eth0", "10.97.2.2/24");
        addr(&upstream_host, "eth0", "fd00:97:2::2/64");
        for (ns, v4, v6) in [
            (&client, "10.97.1.1", "fd00:97:1::1"),
            (&upstream_host, "10.97.2.1", "fd00:97:2::1"),
        ] {
            ns.run(&["ip", "-4", "route", "add", "default", "via", v4]);
            ns.run(&["ip", "-6", "route", "add", "default", "via", v6]);
        }
        // The xlb host's uplink is the client's link, as a host's default route points at its
        // uplink; the agent resolves its next hop (`next_hop_mac = "auto"`) from this route
        // and will not start without one.
        lb.run(&["ip", "-4", "route", "add", "default", "via", "10.97.1.2"]);
        lb.run(&["ip", "-6", "route", "add", "default", "via", "fd00:97:1::2"]);
        lb.run(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward; \
             echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
        ]);
        let addresses: Vec<(Ipv4Addr, Ipv6Addr)> = (0..options.upstreams)
            .map(|i| {
                let host = u8::try_from(10 + i).expect("at most 100 upstreams");
                (
                    Ipv4Addr::new(10, 97, 2, host),
                    Ipv6Addr::new(0xfd00, 0x97, 2, 0, 0, 0, 0, u16::from(host)),
                )
            })
            .collect();
        for (v4, v6) in &addresses {
            addr(&upstream_host, "eth0", &format!("{v4}/24"));
            addr(&upstream_host, "eth0", &format!("{v6}/64"));
        }
        // Neighbours resolved before anything is measured or timed.
        client.run(&["ping", "-c", "1", "-W", "2", "10.97.1.1"]);
        lb.run(&["ping", "-c", "1", "-W", "2", "10.97.1.2"]);
        upstream_host.run(&["ping", "-c", "1", "-W", "2", "10.97.2.1"]);
        let mut sans = vec!["DNS:localhost".to_string()];
        for (i, (v4, v6)) in addresses.iter().enumerate() {
            sans.push(format!("DNS:upstream{i}.test"));
            sans.push(format!("IP:{v4}"));
            sans.push(format!("IP:{v6}"));
        }
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let upstream_cert = self_signed_cert(&scratch.path.join("upstream-tls"), "upstream", &sans);
        let upstreams = addresses
            .iter()
            .enumerate()
            .map(|(i, &(v4, v6))| {
                let name = format!("upstream{i}");
                let conf = upstream_conf(&name, v4, v6, options, &upstream_cert);
                let server = NginxServer::start(
                    &upstream_host,
                    &name,
                    &conf,
                    SocketAddr::from((v4, UPSTREAM_HTTP_PORT)),
                );
                Upstream {
                    name,
                    v4,
                    v6,
                    server,
                }
            })
            .collect();
        L7Topology {
            upstreams,
            client,
            lb,
            upstream_host,
            dirs: AgentDirs::create("l7lb"),
            upstream_cert,
            scratch,
        }
    }

    /// `http://<IPv4 VIP>:<port><path>`.
    pub fn vip_url(&self, port: u16, path: &str) -> String {
        format!("http://{L7_VIP_V4}:{port}{path}")
    }

    /// `http://[<IPv6 VIP>]:<port><path>`.
    pub fn vip6_url(&self, port: u16, path: &str) -> String {
        format!("http://[{L7_VIP_V6}]:{port}{path}")
    }

    /// The `[agent]` table for the xlb host's agent: the client-facing interface, this
    /// topology's socket, state and pin directories, and the metrics endpoint.
    pub fn agent_table(&self) -> String {
        format!(
            "[agent]\ninterface = \"{AGENT_INTERFACE}\"\n{}metrics_listen = \"{METRICS_LISTEN}\"\n",
            self.dirs.agent_keys()
        )
    }

    /// A whole agent configuration: [`L7Topology::agent_table`] followed by `vips` (the
    /// caller's `[[vip]]` tables).
    pub fn agent_config(&self, vips: &str) -> String {
        format!("{}\n{vips}", self.agent_table())
    }

    /// Writes [`L7Topology::agent_config`] to `agent.toml` in the agent's directory (replacing
    /// it: a test that reloads rewrites it) and returns the path.
    pub fn write_agent_config(&self, vips: &str) -> PathBuf {
        let path = self.dirs.tmp.join("agent.toml");
        std::fs::write(&path, self.agent_config(vips))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// The simplest l7 VIP: `name` on `address:port`, one HTTP/1.1 round-robin pool `default`
    /// over every upstream's `upstream_port`, no routes. The shape the benchmark uses.
    pub fn basic_vip(&self, name: &str, address: IpAddr, port: u16, upstream_port: u16) -> String {
        self.vip_toml(name, address, port, "", "http1", upstream_port)
    }

    /// An l7 VIP as [`L7Topology::basic_vip`], with `tables` (e.g. `[vip.gateway.tls]` and its
    /// keys, or `[[vip.route]]` tables) after the VIP's keys and the pool speaking
    /// `pool_protocol` (`"http1"` or `"http2"`) to each upstream's `upstream_port`.
    pub fn vip_toml(
        &self,
        name: &str,
        address: IpAddr,
        port: u16,
        tables: &str,
        pool_protocol: &str,
        upstream_port: u16,
    ) -> String {
        let mut text = format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n\
             protocol = \"tcp\"\nmode = \"l7\"\n\n{tables}\n\
             [[vip.pool]]\nname = \"default\"\nbalance = \"round_robin\"\n\
             protocol = \"{pool_protocol}\"\n\n"
        );
        for u in &self.upstreams {
            text.push_str(&u.backend_toml(upstream_port));
        }
        text
    }

    /// Writes the configuration with `vips` and starts `xlb agent --config FILE` on the xlb
    /// host, waiting (20 s at most) for its XDP program to attach. Extra arguments go after
    /// the config file (e.g. `--detach-on-exit`). Keep the returned [`Daemon`] alive for as
    /// long as the gateway should serve; it is killed when dropped.
    pub fn start_agent(&self, xlb: &Path, vips: &str, extra: &[&str]) -> Daemon {
        let config = self.write_agent_config(vips);
        let mut args = vec!["agent", "--config", config.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        let mut agent = Daemon::start(&self.lb, xlb, &args);
        agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
        agent
    }

    /// Waits until the gateway accepts TCP connections on `addr` from the client, at most
    /// `timeout`. An error says why (the agent exited, or nothing listened in time) with the
    /// agent's last lines.
    pub fn wait_gateway(
        &self,
        agent: &mut Daemon,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(format!(
                    "the agent exited ({status}) before listening on {addr}; it printed:\n{}",
                    tail(agent.finish_lines(Duration::from_millis(500)), 30)
                ));
            }
            if accepts(&self.client, addr, Duration::from_millis(200)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "nothing accepted connections on {addr} within {timeout:?} of the agent's \
                     start (does this build's gateway serve l7 VIPs?); it printed:\n{}",
                    tail(agent.lines(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `request` with curl from the client host.
    pub fn curl(&self, request: &Curl) -> HttpResponse {
        request.run(&self.client, &self.scratch.path)
    }
}

/// Whether something in `ns` accepts a TCP connection to `addr` within `timeout`.
pub fn accepts(ns: &Netns, addr: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
}

/// The last `n` of `lines`, joined.
fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The nginx configuration of upstream `name`.
fn upstream_conf(
    name: &str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    options: &L7Options,
    cert: &SelfSigned,
) -> impl Fn(&Path) -> String + use<> {
    let mut echo = format!("upstream={name}\\n");
    for (key, var) in ECHO_FIELDS {
        echo.push_str(&format!("{key}={var}\\n"));
    }
    for header in &options.echo_headers {
        let var = header.to_ascii_lowercase().replace('-', "_");
        echo.push_str(&format!("{header}=$http_{var}\\n"));
    }
    let (name, workers) = (name.to_string(), options.upstream_workers);
    let (cert, key) = (cert.cert.clone(), cert.key.clone());
    move |dir: &Path| {
        let dir = dir.display();
        let status: String = [404, 500, 502, 503]
            .iter()
            .map(|s| {
                format!("        location = /status/{s} {{ return {s} \"{name} {s}\\n\"; }}\n")
            })
            .collect();
        let listen = |port: u16, extra: &str| {
            format!("        listen {v4}:{port}{extra};\n        listen [{v6}]:{port}{extra};\n")
        };
        format!(
            r#"
daemon off;
worker_processes {workers};
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
    http2_max_requests 1000000;
    client_max_body_size 64m;
    default_type text/plain;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
{http}{h2c}{tls}
        add_header X-Upstream {name} always;
        location / {{ return 200 "{echo}"; }}
        location = /fixed {{ return 200 "{fixed}"; }}
{status}
        location = /upload {{
            client_body_buffer_size 1m;
            proxy_pass http://unix:{dir}/received.sock:/received;
        }}
        location /big/ {{ alias {dir}/big/; }}
        location /slow/ {{ limit_rate 64k; alias {dir}/big/; }}
    }}
    server {{
        listen unix:{dir}/received.sock;
        location = /received {{ return 200 "upstream={name}\nreceived=$content_length\n"; }}
    }}
}}
"#,
            cert = cert.display(),
            key = key.display(),
            http = listen(UPSTREAM_HTTP_PORT, ""),
            h2c = listen(UPSTREAM_H2C_PORT, " http2"),
            tls = listen(UPSTREAM_TLS_PORT, " ssl http2"),
            fixed = FIXED_BODY.trim_end_matches('\n').to_string() + "\\n",
        )
    }
}

/// An nginx process in a namespace, with a configuration of the caller's, stopped when
/// dropped (and startable again with [`NginxServer::start_again`], for tests of upstreams that
/// fail and come back). Its directory holds the configuration, logs and temporary files.
#[derive(Debug)]
pub struct NginxServer {
    child: Option<Child>,
    /// nginx's prefix directory (`nginx.conf`, `error.log`, `big/file`).
    pub dir: PathBuf,
    ns_name: String,
    probe: SocketAddr,
}

impl NginxServer {
    /// Writes `conf(dir)` as `dir/nginx.conf`, starts nginx in `ns` and waits (10 s at most)
    /// until `probe` accepts connections from inside `ns`. `dir` also has `big/file` (1 MiB).
    pub fn start(
        ns: &Netns,
        name: &str,
        conf: &dyn Fn(&Path) -> String,
        probe: SocketAddr,
    ) -> NginxServer {
        let dir = std::env::temp_dir().join(format!(
            "{}{}-nginx-{name}-{}",
            crate::netns::PREFIX,
            std::process::id(),
            ns.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("big")).expect("nginx directory");
        std::fs::write(dir.join("big/file"), vec![b'x'; 1 << 20]).expect("nginx big/file");
        std::fs::write(dir.join("nginx.conf"), conf(&dir)).expect("writing nginx.conf");
        let mut server = NginxServer {
            child: None,
            dir,
            ns_name: ns.name().to_string(),
            probe,
        };
        server.start_again(ns);
        server
    }

    /// Starts nginx again with the same configuration (after [`NginxServer::stop`]) and waits
    /// until it accepts connections.
    pub fn start_again(&mut self, ns: &Netns) {
        assert_eq!(
            ns.name(),
            self.ns_name,
            "nginx restarted in another namespace"
        );
        assert!(self.child.is_none(), "nginx is running already");
        let log = std::fs::File::create(self.dir.join("stderr.log")).expect("nginx stderr log");
        let child = ns
            .command("nginx")
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .arg("-p")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning nginx (installed by `cargo xtask setup`)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepts(ns, self.probe, Duration::from_millis(200)) {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let err = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                self.stop();
                panic!(
                    "nginx in {} did not listen on {} ({}): {err}\nsee {}",
                    self.ns_name,
                    self.probe,
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    self.dir.join("error.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The master's pid while running (`ip netns exec` execs nginx in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops nginx, master and workers: SIGTERM (nginx's fast shutdown, in which the master
    /// stops its workers), then after 5 s SIGKILL to the master and each worker by pid.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(child.try_wait(), Ok(None)) {
            for worker in crate::procs::children(pid) {
                // SAFETY: kill(2) on a worker of the nginx we started, found by its parent.
                unsafe { libc::kill(worker as i32, libc::SIGKILL) };
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A temporary directory named `xlbt-<pid>-<n>-<tag>` (so a sweep removes it after a killed
/// run), removed when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    /// The directory.
    pub path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh one.
    pub fn create(tag: &str) -> ScratchDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{}{}-s{}-{tag}",
            crate::netns::PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        ScratchDir { path }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A self-signed certificate and its key (PEM files). The certificate is its own CA, so it is
/// also the file to give curl's `--cacert`.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// The certificate (`cert.pem`).
    pub cert: PathBuf,
    /// The private key (`key.pem`, PKCS#8, P-256).
    pub key: PathBuf,
}

/// Creates `dir/cert.pem` and `dir/key.pem`: a P-256 key and a self-signed certificate for
/// `/CN=<cn>` valid for 7 days, with `sans` as its subjectAltName entries (`"DNS:api.test"`,
/// `"IP:198.51.100.80"`).
pub fn self_signed_cert(dir: &Path, cn: &str, sans: &[&str]) -> SelfSigned {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let cert = SelfSigned {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "7"])
        .arg("-keyout")
        .arg(&cert.key)
        .arg("-out")
        .arg(&cert.cert)
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", &format!("subjectAltName={}", sans.join(","))])
        .output()
        .expect("running openssl (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cert
}

/// One curl request: which HTTP version, the URL and options. Run with
/// [`L7Topology::curl`] (from the client) or [`Curl::run`].
#[derive(Debug, Clone)]
pub struct Curl {
    args: Vec<String>,
}

impl Curl {
    /// HTTP/1.1 to `url`.
    pub fn http1(url: &str) -> Curl {
        Curl {
            args: vec!["--http1.1".into(), url.into()],
        }
    }

    /// Cleartext HTTP/2 with prior knowledge (no upgrade) to `url`.
    pub fn h2c(url: &str) -> Curl {
        Curl {
            args: vec!["--http2-prior-knowledge".into(), url.into()],
        }
    }

    /// HTTPS to `https://<host>:<port><path>`, HTTP/2 by ALPN (falling back to HTTP/1.1 only
    /// if the server does not offer h2), with `host:port` resolved to `address` and the
    /// server's certificate checked against `ca`.
    pub fn h2_tls(host: &str, port: u16, path: &str, address: IpAddr, ca: &Path) -> Curl {
        let resolve = match address {
            IpAddr::V4(a) => format!("{host}:{port}:{a}"),
            IpAddr::V6(a) => format!("{host}:{port}:[{a}]"),
        };
        Curl {
            args: vec![
                "--http2".into(),
                "--cacert".into(),
                ca.display().to_string(),
                "--resolve".into(),
                resolve,
                format!("https://{host}:{port}{path}"),
            ],
        }
    }

    /// HTTPS as [`Curl::h2_tls`] but HTTP/1.1 only (ALPN http/1.1).
    pub fn http1_tls(host: &str, port: u16, path: &str, address: IpAddr, ca: &Path) -> Curl {
        let mut c = Curl::h2_tls(host, port, path, address, ca);
        c.args[0] = "--http1.1".into();
        c
    }

    /// Adds a request header (`"Name: value"`; `"Name:"` removes one curl would send).
    pub fn header(mut self, header: &str) -> Curl {
        self.args
            .splice(0..0, ["-H".to_string(), header.to_string()]);
        self
    }

    /// Sets the method (`-X`).
    pub fn method(mut self, method: &str) -> Curl {
        self.args
            .splice(0..0, ["-X".to_string(), method.to_string()]);
        self
    }

    /// Sends `body` as the request body (POST unless [`Curl::method`] says otherwise).
    pub fn data(mut self, body: &str) -> Curl {
        self.args
            .splice(0..0, ["--data-binary".to_string(), body.to_string()]);
        self
    }

    /// Adds any other curl argument(s) before the URL.
    pub fn arg(mut self, arg: &str) -> Curl {
        self.args.insert(0, arg.to_string());
        self
    }

    /// Runs curl in `ns` (at most 5 s for the transfer; files in `scratch`) and returns what
    /// came back. A transfer error is not a panic: see [`HttpResponse::exit`].
    pub fn run(&self, ns: &Netns, scratch: &Path) -> HttpResponse {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (head_file, body_file) = (
            scratch.join(format!("curl-{n}.head")),
            scratch.join(format!("curl-{n}.body")),
        );
        let out = ns
            .command("curl")
            .args(["-sS", "--max-time", "5", "-D"])
            .arg(&head_file)
            .arg("-o")
            .arg(&body_file)
            .args(["-w", "%{http_code} %{http_version}"])
            .args(&self.args)
            .output()
            .expect("running curl");
        let head = std::fs::read_to_string(&head_file).unwrap_or_default();
        let body = std::fs::read(&body_file).unwrap_or_default();
        let _ = std::fs::remove_file(&head_file);
        let _ = std::fs::remove_file(&body_file);
        let written = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = written.split_whitespace();
        let status = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let version = words.next().unwrap_or_default().to_string();
        HttpResponse {
            exit: out.status.code().unwrap_or(-1),
            status,
            version,
            headers: last_header_block(&head),
            body: String::from_utf8_lossy(&body).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The headers of the final response in curl's `-D` output (which holds 1xx responses, and
/// with redirects followed, earlier responses, before it).
fn last_header_block(head: &str) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for line in head.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("HTTP/") {
            headers.clear();
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    headers
}

/// What curl got.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// curl's exit code: 0, or e.g. 7 (connection refused), 28 (timed out), 52 (empty reply),
    /// 56 (connection reset).
    pub exit: i32,
    /// The final response's status; 0 when there was none.
    pub status: u16,
    /// The HTTP version curl used: `"1.1"`, `"2"`, or `"0"` when there was no response.
    pub version: String,
    /// The final response's headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
    /// What curl printed on stderr (its error message).
    pub stderr: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (any case).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A field of an upstream's echo body (`"x-forwarded-for"`, `"uri"`, ...); `None` when the
    /// body has no such line, `Some("")` when the header was absent or empty.
    pub fn echo(&self, key: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
    }

    /// The upstream that answered (its `X-Upstream` header).
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_body_is_100_bytes() {
        assert_eq!(FIXED_BODY.len(), 100);
    }

    #[test]
    fn the_final_response_headers_follow_1xx_ones() {
        let head = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Upstream: a\r\n\
                    Set-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n";
        let r = HttpResponse {
            exit: 0,
            status: 200,
            version: "1.1".into(),
            headers: last_header_block(head),
            body: "upstream=a\nx-forwarded-for=\nuri=/x?y=1\n".into(),
            stderr: String::new(),
        };
        assert_eq!(r.upstream(), Some("a"));
        assert_eq!(r.header_all("SET-COOKIE"), ["a=1", "b=2"]);
        assert_eq!(r.echo("uri"), Some("/x?y=1"));
        assert_eq!(r.echo("x-forwarded-for"), Some(""));
        assert_eq!(r.echo("forwarded"), None);
    }
}

// ---------------------------------------------------------------------------------------------
// For tests/gateway.rs: a recording upstream that speaks raw HTTP/1.1 (and echoes WebSocket
// frames), raw client exchanges for requests curl will not send, and small encoders.

/// One request head a [`RecordingUpstream`] received, with the body it read after it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request line and header fields, exactly as received (without the blank line).
    pub head: String,
    /// The body (Content-Length or chunked, decoded); empty when none or not read whole.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The request line, e.g. `GET /admin HTTP/1.1`.
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    /// The request target of the request line.
    pub fn target(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or_default()
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }
}

#[derive(Debug, Default)]
struct Recorded {
    requests: std::sync::Mutex<Vec<RecordedRequest>>,
}

/// A raw HTTP/1.1 server on a thread inside a namespace: records every request head it gets
/// (exactly as the gateway sent it: what a proxy forwards, strips and adds), answers each with
/// `status`, `X-Upstream: recorder` and the head as the body, keeps connections alive, and
/// answers a WebSocket upgrade with 101 and then echoes every frame (unmasked, as a server
/// sends them). Stops, with its connections, when dropped.
#[derive(Debug)]
pub struct RecordingUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    recorded: std::sync::Arc<Recorded>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl RecordingUpstream {
    /// Listens on `addr` inside `ns` (an address of that namespace) and answers `status`.
    pub fn start(ns: &Netns, addr: SocketAddr, status: u16) -> RecordingUpstream {
        use std::sync::{Arc, atomic::AtomicBool};
        let recorded = Arc::new(Recorded::default());
        let stop = Arc::new(AtomicBool::new(false));
        let listener = in_netns(ns, move || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("recording upstream cannot listen on {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let (rec, halt) = (recorded.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (rec, halt) = (rec.clone(), halt.clone());
                        conns.push(std::thread::spawn(move || {
                            let _ = serve_recorded(stream, status, &rec, &halt);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        RecordingUpstream {
            addr,
            recorded,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorded
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many request heads arrived.
    pub fn count(&self) -> usize {
        self.recorded
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// A `[[vip.backend]]` table for this server in pool `pool`.
    pub fn backend_toml(&self, pool: &str) -> String {
        format!(
            "[[vip.backend]]\naddress = \"{}\"\nport = {}\npool = \"{pool}\"\n",
            self.addr.ip(),
            self.addr.port()
        )
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Reads more bytes into `buf`; `Ok(false)` on EOF or when told to stop. Polls `stop` every
/// 100 ms while waiting.
fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<bool> {
    use std::io::Read as _;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Where the head ends in `buf` (the index after the blank line).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A chunked body at the start of `buf`: `Some((body, consumed))` when complete, `None` when
/// more bytes are needed; `Err` when it is not valid chunking.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + eol]).map_err(|_| ())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ())?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn serve_recorded(
    mut stream: TcpStream,
    status: u16,
    rec: &Recorded,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::Write as _;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = head_end(&buf) {
                break end;
            }
            if !read_more(&mut stream, &mut buf, stop)? {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
        buf.drain(..end);
        let index = {
            let mut requests = rec.requests.lock().unwrap_or_else(|e| e.into_inner());
            requests.push(RecordedRequest {
                head: head.clone(),
                body: Vec::new(),
            });
            requests.len() - 1
        };
        let request = RecordedRequest {
            head: head.clone(),
            body: Vec::new(),
        };
        let has_token = |name: &str, token: &str| {
            request
                .header_all(name)
                .iter()
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        let body = if has_token("transfer-encoding", "chunked") {
            loop {
                match parse_chunked(&buf) {
                    Ok(Some((body, used))) => {
                        buf.drain(..used);
                        break body;
                    }
                    Ok(None) => {
                        if !read_more(&mut stream, &mut buf, stop)? {
                            return Ok(());
                        }
                    }
                    Err(()) => return Ok(()),
                }
            }
        } else {
            let length: usize = request
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < length {
                if !read_more(&mut stream, &mut buf, stop)? {
                    return Ok(());
                }
            }
            buf.drain(..length).collect()
        };
        rec.requests.lock().unwrap_or_else(|e| e.into_inner())[index]
            .body
            .clone_from(&body);
        if has_token("upgrade", "websocket") && has_token("connection", "upgrade") {
            let key = request.header("sec-websocket-key").unwrap_or_default();
            stream.write_all(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\
                     X-Upstream: recorder\r\n\r\n",
                    websocket_accept(key)
                )
                .as_bytes(),
            )?;
            return echo_websocket(stream, buf, stop);
        }
        let reason = match status {
            200 => "OK",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let close = has_token("connection", "close");
        stream.write_all(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n\
                 X-Upstream: recorder\r\nContent-Length: {}\r\n{}\r\n{head}",
                head.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        )?;
        if close {
            return Ok(());
        }
    }
}

/// Echoes WebSocket frames (RFC 6455 5.2) until a close frame or the end of the connection.
fn echo_websocket(
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::Write as _;
    loop {
        match parse_ws_frame(&buf) {
            Some((opcode, payload, used)) => {
                buf.drain(..used);
                stream.write_all(&ws_frame(opcode, &payload, None))?;
                if opcode == 8 {
                    return Ok(());
                }
            }
            None => {
                if !read_more(&mut stream, &mut buf, stop)? {
                    return Ok(());
                }
            }
        }
    }
}

/// One whole WebSocket frame at the start of `buf`: (opcode, unmasked payload, bytes used).
pub fn parse_ws_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let payload = buf.get(at..at + len)?;
    let payload = match mask {
        Some(m) => payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ m[i % 4])
            .collect(),
        None => payload.to_vec(),
    };
    Some((opcode, payload, at + len))
}

/// A final WebSocket frame with `opcode` and `payload`, masked with `mask` (clients must mask,
/// servers must not).
pub fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            frame.extend_from_slice(&m);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(digest.as_ref(), false)
}

/// Base64 (RFC 4648): the standard alphabet with padding, or base64url without (JWTs, JWKs).
pub fn base64(data: &[u8], url: bool) -> String {
    let alphabet: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[(n >> (18 - 6 * i)) as usize & 63]));
        }
        if !url {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// Lowercase hex of SHA-256 of `data` (what an API key file stores).
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One HTTP/1.x response as bytes on the wire showed it.
#[derive(Debug, Clone, Default)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header fields, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body (by Content-Length, chunked decoded, or up to the end of the connection).
    pub body: String,
}

impl RawResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a raw exchange got back: every response the bytes held, and how the connection ended.
#[derive(Debug, Clone)]
pub struct RawExchange {
    /// The responses, in order (several when the server answered pipelined requests).
    pub responses: Vec<RawResponse>,
    /// Every byte received.
    pub raw: String,
    /// Whether the server closed the connection (EOF or reset) within the timeout.
    pub closed: bool,
    /// How long from connecting to the close (or the timeout).
    pub elapsed: Duration,
}

impl RawExchange {
    /// The status of the first response; 0 without one.
    pub fn status(&self) -> u16 {
        self.responses.first().map_or(0, |r| r.status)
    }

    /// The first response; panics (with what came back) when there was none.
    pub fn response(&self) -> &RawResponse {
        self.responses
            .first()
            .unwrap_or_else(|| panic!("no response; got {:?}", self.raw))
    }
}

/// Parses every whole response in `raw`.
pub fn parse_responses(raw: &[u8]) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    let mut rest = raw;
    while let Some(end) = head_end(rest) {
        let head = String::from_utf8_lossy(&rest[..end - 4]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: String::new(),
        };
        rest = &rest[end..];
        if (100..200).contains(&status) {
            responses.push(response);
            if status == 101 {
                break;
            }
            continue;
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            match parse_chunked(rest) {
                Ok(Some((body, used))) => {
                    response.body = String::from_utf8_lossy(&body).into_owned();
                    rest = &rest[used..];
                }
                _ => {
                    responses.push(response);
                    break;
                }
            }
        } else if let Some(len) = response
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let len = len.min(rest.len());
            response.body = String::from_utf8_lossy(&rest[..len]).into_owned();
            rest = &rest[len..];
        } else {
            response.body = String::from_utf8_lossy(rest).into_owned();
            rest = &[];
        }
        responses.push(response);
    }
    responses
}

/// Connects from `ns` to `addr`, writes `request` (write errors after the server closed are
/// not failures: the server may refuse before reading it all) and reads until the server
/// closes the connection or `timeout` passes. Send `Connection: close` to make an ordinary
/// request end quickly.
pub fn raw_exchange(
    ns: &Netns,
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> RawExchange {
    let request = request.to_vec();
    in_netns(ns, move || {
        use std::io::{Read as _, Write as _};
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let _ = stream.write_all(&request);
        let mut raw = Vec::new();
        let mut closed = false;
        let deadline = started + timeout;
        let mut chunk = [0u8; 16 * 1024];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        RawExchange {
            responses: parse_responses(&raw),
            raw: String::from_utf8_lossy(&raw).into_owned(),
            closed,
            elapsed: started.elapsed(),
        }
    })
}
