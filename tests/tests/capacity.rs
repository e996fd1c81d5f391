//! The capacity prober and endpoint (`lb_userspace::capacity`) on real veth links in
//! namespaces this test creates. Needs root (raw sockets, XDP). Run serially
//! (`--test-threads=1`).
//!
//! ```text
//!   prober (10.98.0.1, fd00:98::1) -- router -- remote (10.98.1.2, fd00:98:1::2)
//!                                                 xlb decap run on eth0 + capacity endpoint
//! ```
//! The remote host's decapsulator stands in for the balancer's probe path: it strips the
//! IPIP / IP6IP6 header of a packet to its tunnel address and passes the inner packet to the
//! stack, where the endpoint answers. Then the router drops tunnel packets (protocol 4 and 41):
//! the prober must report the region down while plain UDP to the same endpoint still works,
//! which proves the check really goes through the tunnel.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::types::{FAMILY_V4, FAMILY_V6, VipKey, proto};
use lb_userspace::capacity::{self, RegionProbeConfig, RegionReport, ServerStats};
use tokio::sync::{mpsc, oneshot, watch};
use xlb_tests::{
    netns::{Netns, in_netns, spawn_in_netns, sweep_stale, veth_pair},
    topology::{Daemon, xlb_bin},
};

const REMOTE_V4: &str = "10.98.1.2";
const REMOTE_V6: &str = "fd00:98:1::2";
const PORT: u16 = capacity::DEFAULT_PORT;

fn vip(addr: [u8; 4], port: u16) -> VipKey {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&addr);
    VipKey {
        addr: a,
        port_be: port.to_be(),
        proto: proto::TCP,
        family: FAMILY_V4,
    }
}

/// The VIP the remote region knows (share 0.75) and one it does not.
fn known() -> VipKey {
    vip([203, 0, 113, 10], 80)
}
fn unknown() -> VipKey {
    VipKey {
        addr: "2001:db8::99"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        port_be: 443u16.to_be(),
        proto: proto::UDP,
        family: FAMILY_V6,
    }
}

struct Lab {
    // Field order is drop order: the decapsulator and the endpoint go before the namespaces.
    decap: Daemon,
    server_stop: Option<oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<Arc<ServerStats>>>,
    prober: Netns,
    router: Netns,
    remote: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.server_stop.take());
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

fn lab() -> Lab {
    sweep_stale();
    let prober = Netns::create("cap-prober");
    let router = Netns::create("cap-router");
    let remote = Netns::create("cap-remote");
    veth_pair(&prober, "eth0", &router, "r0");
    veth_pair(&router, "r1", &remote, "eth0");
    let addr = |ns: &Netns, a: &str, dev: &str| {
        if a.contains(':') {
            ns.run(&["ip", "-6", "addr", "add", a, "dev", dev, "nodad"]);
        } else {
            ns.run(&["ip", "addr", "add", a, "dev", dev]);
        }
    };
    addr(&prober, "10.98.0.1/24", "eth0");
    addr(&prober, "fd00:98::1/64", "eth0");
    addr(&router, "10.98.0.254/24", "r0");
    addr(&router, "fd00:98::fe/64", "r0");
    addr(&router, "10.98.1.254/24", "r1");
    addr(&router, "fd00:98:1::fe/64", "r1");
    addr(&remote, "10.98.1.2/24", "eth0");
    addr(&remote, "fd00:98:1::2/64", "eth0");
    prober.run(&["ip", "route", "add", "default", "via", "10.98.0.254"]);
    prober.run(&["ip", "-6", "route", "add", "default", "via", "fd00:98::fe"]);
    remote.run(&["ip", "route", "add", "default", "via", "10.98.1.254"]);
    remote.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:98:1::fe",
    ]);
    router.run(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/ip_forward; \
         echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
    ]);

    // Neighbour discovery and link-local DAD take a moment on fresh links: the first probe
    // must test the tunnel, not race the links coming up. Both directions, both families.
    for (ns, dst) in [
        (&prober, REMOTE_V4),
        (&prober, REMOTE_V6),
        (&remote, "10.98.0.1"),
        (&remote, "fd00:98::1"),
    ] {
        ns.run(&["ping", "-c", "1", "-w", "10", dst]);
    }

    let mut decap = Daemon::start(
        &remote,
        &xlb_bin(),
        &[
            "decap",
            "run",
            "--interface",
            "eth0",
            "--address",
            REMOTE_V4,
            "--address",
            REMOTE_V6,
            "--xdp-mode",
            "native",
        ],
    );
    decap.wait_for("xlb_decap attached", Duration::from_secs(20));

    // The endpoint, on a current-thread runtime inside the remote namespace.
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let server = spawn_in_netns(&remote, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stats = Arc::new(ServerStats::default());
        let s = stats.clone();
        rt.block_on(async move {
            let socket = capacity::bind_server(PORT).expect("binding the capacity endpoint");
            ready_tx.send(()).expect("ready");
            let k = known();
            tokio::select! {
                _ = capacity::serve(socket, move |v| (*v == k).then_some(0.75), s) => {}
                _ = stopped => {}
            }
        });
        stats
    });
    ready
        .recv_timeout(Duration::from_secs(5))
        .expect("the endpoint did not start");
    Lab {
        decap,
        server_stop: Some(stop),
        server: Some(server),
        prober,
        router,
        remote,
    }
}

/// Runs `f` on a current-thread runtime inside `ns` (so every socket it opens, also those of
/// tasks it spawns, lives there).
fn block_in<T: Send + 'static, F: Future<Output = T> + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

fn counter(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    line.replace("counters=", "")
        .split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn capacity_probes_go_through_the_tunnel_and_a_broken_tunnel_counts_as_down() {
    let started = Instant::now();
    let mut lab = lab();
    let vips = vec![known(), unknown()];

    // 1. One probe per outer family: the share comes back through the tunnel.
    for tunnel in [REMOTE_V4, REMOTE_V6] {
        let tunnel: IpAddr = tunnel.parse().unwrap();
        let vips = vips.clone();
        let out = block_in(&lab.prober, move || async move {
            capacity::probe(tunnel, PORT, &vips, Duration::from_secs(2)).await
        })
        .unwrap_or_else(|e| panic!("probe through the tunnel to {tunnel}: {e}"));
        assert_eq!(out.shares, vec![Some(0.75), None], "{tunnel}");
        assert!(out.rtt < Duration::from_secs(2));
    }

    // 2. The periodic task, both families at once; then the router drops tunnel packets.
    let (tx_block, rx_block) = std::sync::mpsc::channel::<()>();
    let router = lab.router.name().to_owned();
    let (reports, plain): (Vec<(RegionReport, bool)>, _) =
        block_in(&lab.prober, move || async move {
            let (tx, mut rx) = mpsc::channel(64);
            let (_vips_tx, vips_rx) = watch::channel(vec![known(), unknown()]);
            let handles: Vec<_> = [("v4", REMOTE_V4), ("v6", REMOTE_V6)]
                .into_iter()
                .map(|(region, tunnel)| {
                    capacity::spawn_region_prober(
                        RegionProbeConfig {
                            region: region.to_owned(),
                            tunnel: tunnel.parse().unwrap(),
                            port: PORT,
                            interval: Duration::from_millis(200),
                            timeout: Duration::from_millis(300),
                            rise: 2,
                            fall: 3,
                            start_up: false,
                        },
                        vips_rx.clone(),
                        tx.clone(),
                    )
                })
                .collect();
            let mut out = Vec::new();
            let mut blocked = false;
            let mut up = HashSet::new();
            let mut down = HashSet::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while down.len() < 2 {
                let report: RegionReport = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("the probers reported within 20 s")
                    .expect("report channel open");
                if report.up {
                    up.insert(report.region.clone());
                } else {
                    up.remove(&report.region);
                    if blocked {
                        down.insert(report.region.clone());
                    }
                }
                out.push((report, blocked));
                if !blocked && up.len() == 2 {
                    // Both regions are up: break the tunnel on the router.
                    let ok = std::process::Command::new("ip")
                        .args(["netns", "exec", &router, "sh", "-c"])
                        .arg(
                            "nft add table inet xlbt && \
                             nft add chain inet xlbt tunnels \
                               '{ type filter hook forward priority 0; policy accept; }' && \
                             nft add rule inet xlbt tunnels meta l4proto '{ 4, 41 }' counter drop",
                        )
                        .status()
                        .expect("running nft")
                        .success();
                    assert!(ok, "adding the nft rule on the router");
                    blocked = true;
                    let _ = tx_block.send(());
                }
            }
            for h in handles {
                h.abort();
            }
            // 3. With the tunnel broken, plain UDP to the same endpoint is still answered.
            let plain = capacity::query_plain(
                REMOTE_V4.parse().unwrap(),
                PORT,
                &[known(), unknown()],
                Duration::from_secs(2),
            )
            .await
            .map_err(|e| e.to_string());
            (out, plain)
        });
    rx_block.try_recv().expect("the tunnel was blocked");

    for (report, blocked) in &reports {
        eprintln!(
            "[capacity] blocked={blocked} region={} up={} ok={} {:?} detail={} rtt={:?}",
            report.region, report.up, report.probe_ok, report.transition, report.detail, report.rtt
        );
    }
    for region in ["v4", "v6"] {
        let of: Vec<_> = reports.iter().filter(|(r, _)| r.region == region).collect();
        // Before the block: it came up after `rise` = 2 passed probes, with the shares.
        let first_up = of
            .iter()
            .position(|(r, _)| r.up)
            .unwrap_or_else(|| panic!("{region} never came up"));
        assert!(first_up >= 1, "{region}: up only after rise=2 probes");
        let (r, blocked) = of[first_up];
        assert!(!blocked);
        assert_eq!(r.detail, "ok");
        assert!(r.rtt.is_some());
        assert_eq!(r.shares.len(), 2);
        assert_eq!(
            (r.shares[0].vip, r.shares[0].known, r.shares[0].share),
            (known(), true, 0.75)
        );
        assert_eq!(
            (r.shares[1].vip, r.shares[1].known, r.shares[1].share),
            (unknown(), false, 0.0)
        );
        // After the block: exactly `fall` = 3 failed probes take it down (at most one probe
        // was already in flight when the rule went in), shares 0.
        let after: Vec<_> = of.iter().filter(|(_, b)| *b).collect();
        let down_at = after
            .iter()
            .position(|(r, _)| !r.up)
            .unwrap_or_else(|| panic!("{region} never went down"));
        let failed_before = after[..down_at].iter().filter(|(r, _)| !r.probe_ok).count();
        assert_eq!(failed_before, 2, "{region}: down at the third failure");
        let (r, _) = after[down_at];
        assert!(!r.probe_ok);
        assert!(r.detail.starts_with("timeout after"), "{}", r.detail);
        assert!(r.shares.iter().all(|s| s.share == 0.0));
    }
    assert_eq!(
        plain.expect("plain UDP still answered").shares,
        vec![Some(0.75), None]
    );

    // The router dropped tunnel packets, and the decapsulator stripped both families.
    let nft = lab.router.run(&["nft", "list", "table", "inet", "xlbt"]);
    assert!(
        !nft.contains("packets 0 "),
        "the rule dropped nothing: {nft}"
    );
    lab.decap.terminate();
    let lines = lab.decap.finish_lines(Duration::from_secs(5)).join("\n");
    assert!(counter(&lines, "decap_v4") >= 3, "{lines}");
    assert!(counter(&lines, "decap_v6") >= 3, "{lines}");
    drop(lab.server_stop.take());
    let stats = lab.server.take().unwrap().join().expect("endpoint thread");
    assert!(stats.requests.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    assert_eq!(
        stats.malformed.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let _ = &lab.remote;
    assert!(started.elapsed() < Duration::from_secs(60));
}
