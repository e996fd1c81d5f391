//! The two-region topology (`xlb_tests::regions`) routes what multi-region failover needs:
//! clients in A reach every backend of both regions, the xlb hosts reach each other's tunnel
//! address, B's backends reach A's clients (the direct-server-return path of a failed-over
//! flow), the tunnel block drops IPIP but not plain traffic, the WAN cut separates the
//! regions and its restoration joins them again; and an agent in each region balances its own
//! VIP over its own backends. Needs root; run serially.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use xlb_tests::{
    regions::{Region, RegionOptions, RegionTopology, ping},
    topology::{VIP_V4, VIP_V6, xlb_bin},
};

fn build() -> RegionTopology {
    RegionTopology::build(&RegionOptions {
        clients_a: 1,
        clients_b: 1,
        backends_a: 2,
        backends_b: 2,
        xlb: xlb_bin(),
    })
}

/// `GET /` from region `r`'s client 0 to `url`: the body, trimmed, or the curl failure.
fn get(t: &RegionTopology, r: Region, url: &str) -> Result<String, String> {
    match t.curl(r, 0, &[url]) {
        (0, body) => Ok(body.trim().to_string()),
        (code, body) => Err(format!("curl {url} exited {code}: {body}")),
    }
}

/// The URL of nginx on `addr`.
fn url(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}/"),
        IpAddr::V6(a) => format!("http://[{a}]/"),
    }
}

/// Every backend of both regions answers region `from`'s client on its own addresses, IPv4
/// and IPv6, with its own name.
fn assert_every_backend_reachable(t: &RegionTopology, from: Region) {
    for r in Region::ALL {
        for (i, b) in t.region(r).backends.iter().enumerate() {
            for addr in [IpAddr::V4(b.v4), IpAddr::V6(b.v6)] {
                assert_eq!(
                    get(t, from, &url(addr)),
                    Ok(t.backend_name(r, i)),
                    "client in {from:?} to backend {i} of {r:?}"
                );
            }
        }
    }
}

/// The xlb hosts ping each other's tunnel addresses, IPv4 and IPv6.
fn tunnel_addresses_reachable(t: &RegionTopology) -> bool {
    Region::ALL.iter().all(|&r| {
        let far = r.other();
        let from = &t.region(r).lb.ns;
        ping(from, IpAddr::V4(t.tunnel_v4(far))) && ping(from, IpAddr::V6(t.tunnel_v6(far)))
    })
}

#[test]
fn two_regions_route_plain_and_tunnelled_traffic() {
    let t = build();
    assert_every_backend_reachable(&t, Region::A);
    assert_every_backend_reachable(&t, Region::B);
    assert!(tunnel_addresses_reachable(&t), "xlb hosts reach each other");
    // Direct server return after failover: a B backend answers A's client straight back.
    let client_a = &t.a.clients[0];
    for b in &t.b.backends {
        assert!(
            ping(&b.ns, IpAddr::V4(client_a.v4)),
            "B backend to A client"
        );
        assert!(
            ping(&b.ns, IpAddr::V6(client_a.v6)),
            "B backend to A client (v6)"
        );
    }

    // IPIP from A's xlb host reaches B's tunnel address until the tunnel is blocked; plain
    // traffic still flows while it is.
    let wait = Duration::from_secs(2);
    let ipip = |ipv6| t.ipip_arrives(Region::A, Region::B, ipv6, wait);
    assert!(ipip(false) && ipip(true), "IPIP and IPv6-in-IPv6 A -> B");
    t.block_tunnel();
    assert!(!ipip(false), "IPIP A -> B blocked");
    let dropped = t.tunnel_drops();
    assert!(dropped > 0, "the drop rule counted the IPIP packets");
    assert!(!ipip(true), "IPv6-in-IPv6 A -> B blocked");
    assert!(t.tunnel_drops() > dropped, "and counted them");
    assert!(tunnel_addresses_reachable(&t), "ping still crosses");
    assert_every_backend_reachable(&t, Region::A);
    t.unblock_tunnel();
    assert!(ipip(false) && ipip(true), "tunnels A -> B again");

    // Cutting the WAN separates the regions (each still works inside); restoring it rejoins.
    t.cut_wan();
    assert!(!ping(&t.a.lb.ns, IpAddr::V4(t.tunnel_v4(Region::B))));
    assert!(!ping(&t.b.lb.ns, IpAddr::V6(t.tunnel_v6(Region::A))));
    assert!(get(&t, Region::A, &url(IpAddr::V4(t.b.backends[0].v4))).is_err());
    assert_eq!(
        get(&t, Region::A, &url(IpAddr::V4(t.a.backends[0].v4))),
        Ok(t.backend_name(Region::A, 0))
    );
    t.restore_wan();
    assert!(tunnel_addresses_reachable(&t), "rejoined");
    assert_every_backend_reachable(&t, Region::A);
}

/// With an agent in each region balancing the shared VIPs over its own backends, each
/// region's client reaches every backend of its own region through the VIP and none of the
/// other's; stopping a backend's nginx and starting it again works per region.
#[test]
fn an_agent_per_region_balances_its_own_backends() {
    let mut t = build();
    for r in Region::ALL {
        let config = t.plain_config(r);
        t.start_agent(r, &config);
    }
    for r in Region::ALL {
        let expected: BTreeSet<String> = (0..2).map(|i| t.backend_name(r, i)).collect();
        for vip in [url(IpAddr::V4(VIP_V4)), url(IpAddr::V6(VIP_V6))] {
            let seen: BTreeSet<String> = (0..20)
                .map(|_| get(&t, r, &vip).unwrap_or_else(|e| panic!("{r:?}: {e}")))
                .collect();
            assert_eq!(seen, expected, "client in {r:?} through {vip}");
        }
    }
    t.stop_backend(Region::B, 1);
    let url_b1 = url(IpAddr::V4(t.b.backends[1].v4));
    assert!(
        get(&t, Region::A, &url_b1).is_err(),
        "stopped nginx refuses"
    );
    t.start_backend(Region::B, 1);
    assert_eq!(
        get(&t, Region::A, &url_b1),
        Ok(t.backend_name(Region::B, 1))
    );
    for r in Region::ALL {
        assert!(t.stop_agent(r).expect("an agent ran").success());
    }
}
