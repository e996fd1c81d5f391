//! The reconciler's plans applied to the real maps through the typed map layer: packets follow
//! each change, and re-applying the same desired state writes nothing. Needs root (CAP_BPF).

use lb_common::types::{FAMILY_V4, VipKey, proto};
use lb_userspace::{
    loader::Balancer,
    reconcile::{Desired, DesiredBackend, DesiredVip, Reconciler, apply},
};
use xlb_tests::{
    fixture::{XdpAction, pin_to_current_cpu, send},
    frames, world,
};

const VIP: [u8; 4] = [203, 0, 113, 50];

fn key() -> VipKey {
    let mut k = VipKey {
        port_be: 80u16.to_be(),
        proto: proto::TCP,
        family: FAMILY_V4,
        ..Default::default()
    };
    k.addr[..4].copy_from_slice(&VIP);
    k
}

fn backend(addr: &str, weight: u32) -> DesiredBackend {
    DesiredBackend {
        address: addr.parse().unwrap(),
        weight,
        healthy: true,
        mac: None,
    }
}

/// The outer destination of an IPIP frame from the balancer.
fn outer_dst(out: &[u8]) -> [u8; 4] {
    out[30..34].try_into().unwrap()
}

#[test]
fn plans_applied_to_the_maps_steer_traffic() {
    pin_to_current_cpu();
    let mut b = Balancer::load().expect("load");
    let mut r = Reconciler::new();
    let mut desired = Desired {
        config: world::config(),
        vips: vec![DesiredVip {
            key: key(),
            flags: 0,
            table_size: 251,
            panic_threshold: 0.5,
            backends: vec![backend("10.0.0.1", 1), backend("10.0.0.2", 1)],
        }],
    };
    let reconcile = |r: &mut Reconciler, b: &mut Balancer, d: &Desired| -> usize {
        let plan = r.plan(d).expect("plan");
        let n = plan.ops.len();
        apply(b, &plan).expect("apply");
        r.commit(plan);
        n
    };
    assert!(reconcile(&mut r, &mut b, &desired) > 0);
    assert_eq!(
        reconcile(&mut r, &mut b, &desired),
        0,
        "second apply writes nothing"
    );

    // Both backends get new flows.
    let mut seen = std::collections::HashSet::new();
    for sport in 30000..30064u16 {
        let (a, out) = send(&b, &frames::tcp4(VIP, sport, 80, true, b""));
        assert_eq!(a, XdpAction::Tx);
        seen.insert(outer_dst(&out));
    }
    assert_eq!(seen.len(), 2);

    // Drain 10.0.0.2: an established flow there stays, new flows avoid it.
    let mut established = None;
    for sport in 31000..31100u16 {
        let (_, out) = send(&b, &frames::tcp4(VIP, sport, 80, true, b""));
        if outer_dst(&out) == [10, 0, 0, 2] {
            established = Some(sport);
            break;
        }
    }
    let sport = established.expect("some flow lands on 10.0.0.2");
    desired.vips[0].backends[1].weight = 0;
    reconcile(&mut r, &mut b, &desired);
    let (_, out) = send(&b, &frames::tcp4(VIP, sport, 80, false, b"more"));
    assert_eq!(
        outer_dst(&out),
        [10, 0, 0, 2],
        "drained backend keeps its flow"
    );
    for s in 32000..32064u16 {
        let (_, out) = send(&b, &frames::tcp4(VIP, s, 80, true, b""));
        assert_eq!(
            outer_dst(&out),
            [10, 0, 0, 1],
            "no new flow on a drained backend"
        );
    }

    // Health: 10.0.0.1 fails while 10.0.0.2 is drained -> the only weighted backend is down,
    // which is below the panic threshold: it keeps serving rather than the VIP going dark.
    desired.vips[0].backends[0].healthy = false;
    reconcile(&mut r, &mut b, &desired);
    let (a, out) = send(&b, &frames::tcp4(VIP, 33000, 80, true, b""));
    assert_eq!(a, XdpAction::Tx);
    assert_eq!(outer_dst(&out), [10, 0, 0, 1]);

    // Removing the VIP: its traffic goes to the host stack.
    desired.vips.clear();
    reconcile(&mut r, &mut b, &desired);
    let (a, _) = send(&b, &frames::tcp4(VIP, 34000, 80, true, b""));
    assert_eq!(a, XdpAction::Pass);
}

/// `flows_per_backend` (what `xlb status` reports as active flows) counts every connection-table
/// entry by backend, across several lookup batches (20,000 flows, batches of 8,192).
#[test]
fn connection_table_entries_are_counted_per_backend() {
    pin_to_current_cpu();
    let mut b = Balancer::load().expect("load");
    let mut r = Reconciler::new();
    let desired = Desired {
        config: world::config(),
        vips: vec![DesiredVip {
            key: key(),
            flags: 0,
            table_size: 251,
            panic_threshold: 0.5,
            backends: vec![backend("10.0.0.1", 1), backend("10.0.0.2", 1)],
        }],
    };
    let plan = r.plan(&desired).expect("plan");
    apply(&mut b, &plan).expect("apply");
    r.commit(plan);
    assert!(b.flows_per_backend().expect("count").is_empty());
    let mut by_address = std::collections::HashMap::<[u8; 4], u64>::new();
    const FLOWS: u16 = 20_000;
    for sport in 1..=FLOWS {
        let (a, out) = send(&b, &frames::tcp4(VIP, sport, 80, true, b""));
        assert_eq!(a, XdpAction::Tx);
        *by_address.entry(outer_dst(&out)).or_default() += 1;
    }
    let counts = b.flows_per_backend().expect("count");
    assert_eq!(counts.values().sum::<u64>(), u64::from(FLOWS));
    for (addr, n) in by_address {
        let ip = std::net::IpAddr::from(addr);
        let id = r.backend_id(&key(), &ip).expect("an applied backend");
        assert_eq!(counts.get(&id), Some(&n), "{ip}");
    }
}
