//! Two regions joined by a WAN link, for multi-region failover. Each region is the single-arm
//! deployment of [`crate::topology`] (clients, a router, an xlb host, backends with nginx, the
//! VIPs on loopback and `xlb decap`), numbered from its own [`Plan`]; the two routers are
//! joined by a veth pair (`w0` in each) and route the other region's prefixes over it.
//!
//! ```text
//!   a-client<i> ─┐                        ┌─ a-backend<i>  10.99.(3+i).2   nginx "a-backend<i>"
//!                ├── a-router ─── l0 ─────┤  a-lb         10.99.2.2      (VIP routes, tunnel addr)
//!                │   w0 10.97.0.1 / fd00:97::1
//!                │      │ WAN (cut_wan, block_tunnel: nft on a-router's forward hook)
//!                │   w0 10.97.0.2 / fd00:97::2
//!   b-client<i> ─┴── b-router ─── l0 ─────┬─ b-lb         10.98.2.2      (VIP routes, tunnel addr)
//!                                         └─ b-backend<i>  10.98.(3+i).2   nginx "b-backend<i>"
//! ```
//!
//! Region A is numbered as the single-region topology (10.99.net.host, fd00:99:net::host),
//! region B from 10.98.net.host, fd00:98:net::host: client `i` on net 100+i, the xlb host on
//! net 2, backend `i` on net 3+i, the router `.1` / `::1` of each link. Both regions serve the
//! same [`VIP_V4`] / [`VIP_V6`]: each router routes them to its own xlb host. An xlb host's
//! tunnel address (where the other region sends IPIP) is its own link address,
//! [`RegionTopology::tunnel_v4`] / [`RegionTopology::tunnel_v6`].
//!
//! The WAN needs no XDP program: tunnelled frames an xlb host bounces with XDP_TX enter its
//! router through `l0` (which has the pass program, as in one region) and cross the WAN as
//! ordinarily forwarded packets. Namespaces are named `xlbt-<pid>-<n>-a-router`,
//! `...-b-backend1` and so on; everything goes away when the [`RegionTopology`] drops.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::ExitStatus,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    frames,
    netns::{Netns, in_netns, sockaddr, veth_pair},
    servers::{Nginx, curl},
    topology::{Daemon, Options, Plan, Topology, VIP_V4, VIP_V6, run_cli},
};

/// The routers' interface on the WAN link (the same name in both).
pub const WAN_IF: &str = "w0";

/// The nftables table [`RegionTopology::block_tunnel`] adds to router A.
const BLOCK_TABLE: &str = "xlbt_tunnel";

/// One of the two regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// 10.99.x.x / fd00:99:..., the single-region plan; namespaces tagged `a-`.
    A,
    /// 10.98.x.x / fd00:98:...; namespaces tagged `b-`.
    B,
}

impl Region {
    /// Both, A first.
    pub const ALL: [Region; 2] = [Region::A, Region::B];

    fn index(self) -> usize {
        self as usize
    }

    /// The other region.
    pub fn other(self) -> Region {
        match self {
            Region::A => Region::B,
            Region::B => Region::A,
        }
    }

    /// The region's addresses and namespace tags.
    pub fn plan(self) -> Plan {
        match self {
            Region::A => Plan {
                site_v4: 99,
                site_v6: 0x99,
                tag: "a-",
            },
            Region::B => Plan {
                site_v4: 98,
                site_v6: 0x98,
                tag: "b-",
            },
        }
    }

    /// The region's router's address on the WAN link: 10.97.0.1 (A), 10.97.0.2 (B).
    pub fn wan_v4(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 97, 0, 1 + self as u8)
    }

    /// The same for IPv6: fd00:97::1 (A), fd00:97::2 (B).
    pub fn wan_v6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x97, 0, 0, 0, 0, 0, 1 + self as u16)
    }
}

/// What to build: hosts per region, and the `xlb` binary (pass programs, decapsulators, agents).
#[derive(Debug, Clone)]
pub struct RegionOptions {
    /// Client hosts in region A (at least one for most tests).
    pub clients_a: usize,
    /// Client hosts in region B (may be 0).
    pub clients_b: usize,
    /// Backend hosts in region A.
    pub backends_a: usize,
    /// Backend hosts in region B.
    pub backends_b: usize,
    /// The `xlb` binary.
    pub xlb: PathBuf,
}

/// Both regions, their WAN link, the backends' nginx and the agents started on the xlb hosts.
/// Field order is drop order: agents, then nginx, then the regions' processes and namespaces.
#[derive(Debug)]
pub struct RegionTopology {
    /// The agent on each region's xlb host, when started ([`RegionTopology::start_agent`]).
    agents: [Option<Daemon>; 2],
    /// nginx on each region's backends (`None` while stopped).
    nginx: [Vec<Option<Nginx>>; 2],
    /// Region A (hosts and namespaces are public: `t.a.router.run(&[...])` runs a command on
    /// router A, `t.a.backends[1].ns.exec(&[...])` on backend 1).
    pub a: Topology,
    /// Region B.
    pub b: Topology,
    xlb: PathBuf,
}

impl RegionTopology {
    /// Builds both regions, joins their routers over the WAN and starts nginx on every backend
    /// (answering `GET /` with [`RegionTopology::backend_name`]). No agents run yet: each
    /// router already has its pass program on `l0`, each backend its decapsulator.
    pub fn build(options: &RegionOptions) -> RegionTopology {
        let region = |r: Region, clients, backends| {
            let o = Options {
                clients,
                backends,
                xlb: options.xlb.clone(),
            };
            Topology::build_with_plan(&o, 0, r.plan())
        };
        let a = region(Region::A, options.clients_a, options.backends_a);
        let b = region(Region::B, options.clients_b, options.backends_b);
        veth_pair(&a.router, WAN_IF, &b.router, WAN_IF);
        let mut t = RegionTopology {
            agents: [None, None],
            nginx: [Vec::new(), Vec::new()],
            a,
            b,
            xlb: options.xlb.clone(),
        };
        t.restore_wan();
        for r in Region::ALL {
            t.nginx[r.index()] = (0..t.region(r).backends.len())
                .map(|i| Some(t.nginx_start(r, i)))
                .collect();
        }
        t
    }

    /// Region `r`.
    pub fn region(&self, r: Region) -> &Topology {
        match r {
            Region::A => &self.a,
            Region::B => &self.b,
        }
    }

    /// The IPv4 tunnel address of region `r`'s xlb host (its link address): where the other
    /// region sends encapsulated flows and capacity probes.
    pub fn tunnel_v4(&self, r: Region) -> Ipv4Addr {
        self.region(r).lb.v4
    }

    /// The IPv6 tunnel address of region `r`'s xlb host.
    pub fn tunnel_v6(&self, r: Region) -> Ipv6Addr {
        self.region(r).lb.v6
    }

    // -----------------------------------------------------------------------------------------
    // Agents
    // -----------------------------------------------------------------------------------------

    /// A plain single-region configuration for region `r`'s agent: its `[agent]` table
    /// ([`Topology::agent_table`]: eth0, native XDP, its own addresses as encap sources, the
    /// region's own directories) and two `dsr-ipip` VIPs, [`VIP_V4`] and [`VIP_V6`] port 80
    /// over the region's own backends. Tests append or replace what they need.
    pub fn plain_config(&self, r: Region) -> String {
        let t = self.region(r);
        let mut text = t.agent_table();
        for (name, vip, v4) in [
            ("web4", IpAddr::V4(VIP_V4), true),
            ("web6", IpAddr::V6(VIP_V6), false),
        ] {
            text.push_str(&format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\n\
                 protocol = \"tcp\"\nmode = \"dsr-ipip\"\n"
            ));
            for b in &t.backends {
                let addr = if v4 {
                    IpAddr::V4(b.v4)
                } else {
                    IpAddr::V6(b.v6)
                };
                text.push_str(&format!("[[vip.backend]]\naddress = \"{addr}\"\n"));
            }
        }
        text
    }

    /// Writes `config` as region `r`'s `xlb.toml` (in its own temporary directory), starts
    /// `xlb agent --config` on its xlb host (stopping the one running there first) and waits
    /// (bounded, 20 s) until the balancer is attached.
    pub fn start_agent(&mut self, r: Region, config: &str) -> &mut Daemon {
        self.stop_agent(r);
        let t = self.region(r);
        let file = t.dirs.tmp.join("xlb.toml");
        std::fs::write(&file, config).expect("writing xlb.toml");
        let args = ["agent", "--config", file.to_str().expect("utf-8 path")];
        let mut agent = Daemon::start(&t.lb.ns, &self.xlb, &args);
        agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
        self.agents[r.index()].insert(agent)
    }

    /// Stops region `r`'s agent (SIGTERM, bounded) and returns its exit status; `None` when
    /// none was running.
    pub fn stop_agent(&mut self, r: Region) -> Option<ExitStatus> {
        self.agents[r.index()].take().map(|mut a| a.terminate())
    }

    /// Region `r`'s running agent (its log lines, `wait_for`, `kill`); panics when none runs.
    pub fn agent(&mut self, r: Region) -> &mut Daemon {
        self.agents[r.index()]
            .as_mut()
            .unwrap_or_else(|| panic!("no agent runs in region {r:?}"))
    }

    /// The run-time CLI against region `r`'s agent: exit code, stdout, stderr.
    pub fn cli(&self, r: Region, args: &[&str]) -> (i32, String, String) {
        let t = self.region(r);
        run_cli(&t.lb.ns, &self.xlb, &t.admin_socket(), args)
    }

    // -----------------------------------------------------------------------------------------
    // Backends and clients
    // -----------------------------------------------------------------------------------------

    /// What region `r`'s backend `i` answers to `GET /`: `a-backend0`, `b-backend1`, ...
    pub fn backend_name(&self, r: Region, i: usize) -> String {
        format!("{}backend{i}", r.plan().tag)
    }

    fn nginx_start(&self, r: Region, i: usize) -> Nginx {
        Nginx::start(&self.region(r).backends[i].ns, &self.backend_name(r, i))
    }

    /// Stops nginx on region `r`'s backend `i` (its port 80 then refuses connections; the
    /// host itself stays up).
    pub fn stop_backend(&mut self, r: Region, i: usize) {
        self.nginx[r.index()][i] = None;
    }

    /// Starts nginx on region `r`'s backend `i` again (a no-op when it runs).
    pub fn start_backend(&mut self, r: Region, i: usize) {
        if self.nginx[r.index()][i].is_none() {
            let n = self.nginx_start(r, i);
            self.nginx[r.index()][i] = Some(n);
        }
    }

    /// Runs `curl -sS --max-time 5 args...` on region `r`'s client `i`: exit code, stdout.
    pub fn curl(&self, r: Region, client: usize, args: &[&str]) -> (i32, String) {
        curl(&self.region(r).clients[client].ns, args)
    }

    // -----------------------------------------------------------------------------------------
    // The WAN
    // -----------------------------------------------------------------------------------------

    /// Takes the WAN link down at both ends: nothing crosses between the regions.
    pub fn cut_wan(&self) {
        for r in Region::ALL {
            self.region(r)
                .router
                .run(&["ip", "link", "set", WAN_IF, "down"]);
        }
    }

    /// Brings the WAN link up at both ends with its addresses and the routes to the other
    /// region's prefixes (idempotent; a link taken down loses its routes and IPv6 addresses).
    pub fn restore_wan(&self) {
        for r in Region::ALL {
            self.region(r)
                .router
                .run(&["ip", "link", "set", WAN_IF, "up"]);
        }
        for r in Region::ALL {
            let (router, far) = (&self.region(r).router, r.other());
            let v4 = format!("{}/30", r.wan_v4());
            let v6 = format!("{}/64", r.wan_v6());
            router.run(&["ip", "addr", "replace", &v4, "dev", WAN_IF]);
            router.run(&["ip", "-6", "addr", "replace", &v6, "dev", WAN_IF, "nodad"]);
            for (family, prefix, via) in [
                ("-4", far.plan().prefix_v4(), far.wan_v4().to_string()),
                ("-6", far.plan().prefix_v6(), far.wan_v6().to_string()),
            ] {
                router.run(&["ip", family, "route", "replace", &prefix, "via", &via]);
            }
        }
        // Returns once the routers reach each other over the WAN, both families (bounded).
        let (a, b) = (&self.a.router, Region::B);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(ping(a, IpAddr::V4(b.wan_v4())) && ping(a, IpAddr::V6(b.wan_v6()))) {
            assert!(
                Instant::now() < deadline,
                "the WAN did not come up within 10 s:\n{}{}",
                a.run(&["ip", "addr", "show", WAN_IF]),
                a.run(&["ip", "-6", "route"])
            );
        }
    }

    /// Adds an nftables rule on router A's forward hook that drops (and counts) IPIP and
    /// IPv6-in-IP packets (IP protocol / next header 4 and 41, IPv4 and IPv6 outer headers)
    /// leaving for region B over the WAN: plain traffic still flows, tunnelled traffic does not.
    pub fn block_tunnel(&self) {
        let router = &self.a.router;
        router.run(&["nft", "add", "table", "inet", BLOCK_TABLE]);
        router.run(&[
            "nft",
            &format!(
                "add chain inet {BLOCK_TABLE} forward \
                 {{ type filter hook forward priority 0 ; policy accept ; }}"
            ),
        ]);
        router.run(&[
            "nft",
            &format!(
                "add rule inet {BLOCK_TABLE} forward oifname \"{WAN_IF}\" \
                 meta l4proto {{ 4, 41 }} counter drop"
            ),
        ]);
    }

    /// Packets the [`RegionTopology::block_tunnel`] rule has dropped so far; panics when the
    /// tunnel is not blocked.
    pub fn tunnel_drops(&self) -> u64 {
        let listing = self
            .a
            .router
            .run(&["nft", "list", "chain", "inet", BLOCK_TABLE, "forward"]);
        listing
            .split_once("counter packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in:\n{listing}"))
    }

    /// Removes the [`RegionTopology::block_tunnel`] rule (and its counter); a no-op when the
    /// tunnel is not blocked.
    pub fn unblock_tunnel(&self) {
        let _ = self
            .a
            .router
            .exec(&["nft", "delete", "table", "inet", BLOCK_TABLE]);
    }

    /// Sends a raw tunnelled packet from `from`'s xlb host to `to`'s tunnel address a few
    /// times within `timeout` and reports whether `to`'s xlb host received it (a raw socket
    /// there sees it whatever the stack then does with it). IPv4 (`ipv6` false): IPIP, outer
    /// IPv4 (protocol 4), inner a UDP datagram to [`VIP_V4`] port 80; IPv6: outer IPv6 with
    /// next header 41, inner a UDP datagram to [`VIP_V6`]. The inner datagram carries a fresh
    /// token. Meaningful while no balancer on `to`'s xlb host takes such packets first.
    pub fn ipip_arrives(&self, from: Region, to: Region, ipv6: bool, timeout: Duration) -> bool {
        static TOKENS: AtomicU32 = AtomicU32::new(0);
        let token = format!(
            "xlbt-ipip-{}-{}",
            std::process::id(),
            TOKENS.fetch_add(1, Ordering::Relaxed)
        );
        let (frame, dst, family, protocol) = if ipv6 {
            (
                frames::udp6(VIP_V6.octets(), 40_000, 80, token.as_bytes()),
                SocketAddr::from((self.tunnel_v6(to), 0)),
                libc::AF_INET6,
                libc::IPPROTO_IPV6,
            )
        } else {
            (
                frames::udp4(VIP_V4.octets(), 40_000, 80, token.as_bytes()),
                SocketAddr::from((self.tunnel_v4(to), 0)),
                libc::AF_INET,
                libc::IPPROTO_IPIP,
            )
        };
        let inner = &frame[frames::L3..];
        let receiver = in_netns(&self.region(to).lb.ns, move || {
            raw_socket(family, protocol, true)
        });
        let sender = in_netns(&self.region(from).lb.ns, move || {
            raw_socket(family, protocol, false)
        });
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                send_raw(&sender, inner, dst);
                next_send = Instant::now() + Duration::from_millis(300);
            }
            // SAFETY: recv(2) into a buffer we own, on a socket we own (100 ms timeout).
            let n =
                unsafe { libc::recv(receiver.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && contains(&buf[..n as usize], token.as_bytes()) {
                return true;
            }
        }
        false
    }
}

/// Whether `from` (any namespace) gets an answer to one ping of `to` within 2 s.
pub fn ping(from: &Netns, to: IpAddr) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "2", &to.to_string()])
        .status
        .success()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A raw socket of `family` for IP protocol `protocol`, in the calling thread's namespace;
/// with a 100 ms receive timeout when it is for `receiving`.
fn raw_socket(family: i32, protocol: i32, receiving: bool) -> OwnedFd {
    // SAFETY: socket(2) and setsockopt(2) with valid arguments; the fd is checked and owned.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_RAW, protocol);
        assert!(
            fd >= 0,
            "raw socket for protocol {protocol}: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        if receiving {
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let rc = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        }
        fd
    }
}

/// Sends `payload` (the inner packet; the kernel adds the outer header) to `dst`.
fn send_raw(socket: &OwnedFd, payload: &[u8], dst: SocketAddr) {
    let (addr, len) = sockaddr(dst);
    // SAFETY: sendto(2) from a buffer we own to a valid sockaddr, on a socket we own.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const addr).cast(),
            len,
        )
    };
    assert_eq!(
        sent,
        payload.len() as isize,
        "sendto {dst}: {}",
        std::io::Error::last_os_error()
    );
}
