//! The reconciler's plans applied to the real maps through the typed map layer: packets follow
//! each change, and re-applying the same desired state writes nothing. Needs root (CAP_BPF).

use lb_common::{
    counters::Counter,
    types::{FAMILY_V4, REGION_SCALE, VipKey, proto},
};
use lb_userspace::{
    loader::Balancer,
    reconcile::{
        Desired, DesiredBackend, DesiredLevel, DesiredRegions, DesiredVip, MapOp, Reconciler, apply,
    },
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
            regions: Default::default(),
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
            regions: Default::default(),
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

/// What an agent killed in the middle of a publish or a removal leaves in pinned maps, written
/// straight into them: the VIP entry is there, but its id is not active, its address has no
/// entry and its bloom bit is clear (the writes that follow the VIP entry never ran); and a VIP
/// that is gone still has its address entry, bloom bit and active id. The VIP's packets would
/// be passed to the host as non-VIP traffic and its pings go unanswered, and the reconciler
/// (which compares VIP entries, tables and backends) would never notice. `repair_derived`, run
/// by an agent that adopts pinned maps, puts every derived entry back in line; and removing a
/// VIP whose address entry is already missing succeeds (it once failed on the kernel's ENOENT
/// forever, wedging every later reconcile).
#[test]
fn entries_derived_from_the_vips_are_repaired_after_an_interrupted_agent() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use lb_common::types::{LocalAddr, VipState};
    use lb_userspace::{
        loader::LoadOptions,
        pins::{PinDir, pinned_map_names},
    };

    pin_to_current_cpu();
    let dirs = xlb_tests::netns::AgentDirs::create("repair");
    let pins = PinDir::new(&dirs.bpffs);
    let (mut b, _) =
        Balancer::load_pinned(LoadOptions { flow_entries: 1024 }, &pins).expect("load pinned");
    let mut r = Reconciler::new();
    let other = VipKey {
        addr: {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[203, 0, 113, 51]);
            a
        },
        ..key()
    };
    let vip = |key| DesiredVip {
        key,
        flags: 0,
        table_size: 251,
        panic_threshold: 0.5,
        backends: vec![backend("10.0.0.1", 1)],
        regions: Default::default(),
    };
    let mut desired = Desired {
        config: world::config(),
        vips: vec![vip(key()), vip(other)],
    };
    let plan = r.plan(&desired).expect("plan");
    apply(&mut b, &plan).expect("apply");
    r.commit(plan);
    assert_eq!(b.repair_derived().expect("repair"), 0, "consistent maps");

    let open = |name: &str| {
        assert!(pinned_map_names().contains(&name));
        let data = MapData::from_pin(pins.map_path(name)).expect("pinned map");
        Map::from_map_data(data).expect("map")
    };
    let addr = |a: [u8; 4]| {
        let mut l = LocalAddr {
            family: FAMILY_V4,
            ..Default::default()
        };
        l.addr[..4].copy_from_slice(&a);
        l
    };
    let id = b.vip(&key()).expect("lookup").expect("published").vip_id;
    let break_vip = || {
        let mut state: Array<MapData, VipState> =
            Array::try_from(open(lb_common::maps::VIP_STATE)).unwrap();
        state.set(id, VipState::default(), 0).unwrap();
        let mut addrs: HashMap<MapData, LocalAddr, u32> =
            HashMap::try_from(open(lb_common::maps::VIP_ADDRS)).unwrap();
        addrs.remove(&addr(VIP)).unwrap();
        let mut bloom: Array<MapData, u64> =
            Array::try_from(open(lb_common::maps::VIP_BLOOM)).unwrap();
        for i in 0..bloom.len() {
            bloom.set(i, 0, 0).unwrap();
        }
    };
    // A VIP that is gone from the VIP map but whose derived entries stayed.
    let ghost = [203, 0, 113, 99];
    let ghost_id = 700;
    let leave_ghost = || {
        let mut state: Array<MapData, VipState> =
            Array::try_from(open(lb_common::maps::VIP_STATE)).unwrap();
        state
            .set(
                ghost_id,
                VipState {
                    flags: lb_common::types::VIP_S_ACTIVE,
                    generation: 1,
                },
                0,
            )
            .unwrap();
        let mut addrs: HashMap<MapData, LocalAddr, u32> =
            HashMap::try_from(open(lb_common::maps::VIP_ADDRS)).unwrap();
        addrs
            .insert(addr(ghost), lb_common::types::VIP_ADDR_F_L4, 0)
            .unwrap();
        // Stale bloom bits (every one, the ghost's among them).
        let mut bloom: Array<MapData, u64> =
            Array::try_from(open(lb_common::maps::VIP_BLOOM)).unwrap();
        for i in 0..bloom.len() {
            bloom.set(i, u64::MAX, 0).unwrap();
        }
    };

    break_vip();
    let (a, _) = send(&b, &frames::tcp4(VIP, 40000, 80, true, b""));
    assert_eq!(a, XdpAction::Pass, "the damage: the VIP reads as no VIP");
    leave_ghost();
    let (a, _) = send(&b, &frames::icmp4_echo(ghost));
    assert_eq!(
        a,
        XdpAction::Tx,
        "the damage: a gone VIP's address answers pings"
    );

    let fixed = b.repair_derived().expect("repair");
    assert!(
        fixed >= 4,
        "state, address entries and bloom words rewritten: {fixed}"
    );
    let (a, out) = send(&b, &frames::tcp4(VIP, 40001, 80, true, b""));
    assert_eq!(a, XdpAction::Tx, "the VIP is served again");
    assert_eq!(outer_dst(&out), [10, 0, 0, 1]);
    let (a, _) = send(&b, &frames::icmp4_echo(VIP));
    assert_eq!(a, XdpAction::Tx, "its address answers pings again");
    let (a, _) = send(&b, &frames::icmp4_echo(ghost));
    assert_eq!(
        a,
        XdpAction::Pass,
        "the gone VIP's address is no VIP's any more"
    );
    let (a, _) = send(&b, &frames::tcp4([203, 0, 113, 51], 40002, 80, true, b""));
    assert_eq!(a, XdpAction::Tx, "the other VIP was never disturbed");
    assert_eq!(b.repair_derived().expect("repair"), 0, "nothing left to do");

    // Removing a VIP whose address entry is missing (the same interrupted publish, without a
    // repair) is not an error: the entry is already as the removal wants it.
    break_vip();
    desired.vips.remove(0);
    let plan = r.plan(&desired).expect("plan");
    apply(&mut b, &plan).expect("removal with the address entry already gone");
    r.commit(plan);
    let (a, _) = send(&b, &frames::tcp4(VIP, 40003, 80, true, b""));
    assert_eq!(a, XdpAction::Pass);
    let (a, _) = send(&b, &frames::tcp4([203, 0, 113, 51], 40004, 80, true, b""));
    assert_eq!(a, XdpAction::Tx);
    // Removing it again (a retried plan after a partial apply) finds nothing and is fine too.
    b.remove_vip(&key())
        .expect("removing a VIP that is already gone");
    drop(b);
}

/// A VIP with a remote region: the split sends new flows to the region's xlb host or keeps them
/// here; moving the split writes one VIP entry and builds no table; a flow pinned to the region
/// stays there when the VIP fails back, and is re-selected here when the region goes down; the
/// last resort counts its flows; dropping the region frees its entry.
#[test]
fn region_splits_applied_to_the_maps_steer_new_flows() {
    pin_to_current_cpu();
    let mut b = Balancer::load().expect("load");
    let mut r = Reconciler::new();
    let remote: std::net::IpAddr = "198.18.0.2".parse().unwrap();
    let regions = |remote_up: bool, local_upto: u32, last_resort: bool| DesiredRegions {
        levels: vec![
            DesiredLevel::Local,
            DesiredLevel::Remote {
                address: remote,
                up: remote_up,
            },
        ],
        upto: vec![local_upto, REGION_SCALE],
        last_resort,
    };
    let mut desired = Desired {
        config: world::config(),
        vips: vec![DesiredVip {
            key: key(),
            flags: 0,
            table_size: 251,
            panic_threshold: 0.5,
            backends: vec![backend("10.0.0.1", 1)],
            regions: regions(true, 0, false),
        }],
    };
    let reconcile = |r: &mut Reconciler, b: &mut Balancer, d: &Desired| {
        let plan = r.plan(d).expect("plan");
        let ops = plan.ops.clone();
        let built = plan.tables_built;
        apply(b, &plan).expect("apply");
        r.commit(plan);
        (ops, built)
    };
    reconcile(&mut r, &mut b, &desired);
    // Failed over: new flows go to the region's xlb host.
    let (a, out) = send(&b, &frames::tcp4(VIP, 40000, 80, true, b""));
    assert_eq!(a, XdpAction::Tx);
    assert_eq!(outer_dst(&out), [198, 18, 0, 2]);

    // Failing back moves only the split.
    desired.vips[0].regions = regions(true, REGION_SCALE, false);
    let (ops, built) = reconcile(&mut r, &mut b, &desired);
    assert_eq!(built, 0, "no table for a split change");
    assert!(
        matches!(ops.as_slice(), [MapOp::SetVipSplit { .. }]),
        "one VIP entry written: {ops:?}"
    );
    let (_, out) = send(&b, &frames::tcp4(VIP, 40001, 80, true, b""));
    assert_eq!(outer_dst(&out), [10, 0, 0, 1], "new flows stay home");
    let (_, out) = send(&b, &frames::tcp4(VIP, 40000, 80, false, b"more"));
    assert_eq!(
        outer_dst(&out),
        [198, 18, 0, 2],
        "an established flow stays in the region it went to"
    );

    // The region goes down: its flows come home.
    desired.vips[0].regions = regions(false, REGION_SCALE, false);
    reconcile(&mut r, &mut b, &desired);
    let (_, out) = send(&b, &frames::tcp4(VIP, 40000, 80, false, b"again"));
    assert_eq!(outer_dst(&out), [10, 0, 0, 1]);

    // Every region down: the last resort uses the down backend, and counts.
    desired.vips[0].backends[0].healthy = false;
    desired.vips[0].regions = regions(false, REGION_SCALE, true);
    reconcile(&mut r, &mut b, &desired);
    let before = b.counters().expect("counters");
    let (a, out) = send(&b, &frames::tcp4(VIP, 40002, 80, true, b""));
    assert_eq!(a, XdpAction::Tx);
    assert_eq!(outer_dst(&out), [10, 0, 0, 1]);
    let after = b.counters().expect("counters");
    assert_eq!(
        after.get(Counter::RegionLastResort) - before.get(Counter::RegionLastResort),
        1
    );

    // With a healthy remote region, a down local backend is not panicked into the table.
    desired.vips[0].regions = regions(true, 0, false);
    reconcile(&mut r, &mut b, &desired);
    let (_, out) = send(&b, &frames::tcp4(VIP, 40003, 80, true, b""));
    assert_eq!(outer_dst(&out), [198, 18, 0, 2]);

    // Re-planning the same state writes nothing; dropping the region frees its entry.
    assert!(reconcile(&mut r, &mut b, &desired).0.is_empty());
    desired.vips[0].regions = DesiredRegions::default();
    desired.vips[0].backends[0].healthy = true;
    let (ops, _) = reconcile(&mut r, &mut b, &desired);
    assert!(
        ops.iter()
            .any(|op| matches!(op, MapOp::SetBackend(_, e) if e.family == 0)),
        "the region's entry is freed: {ops:?}"
    );
}
