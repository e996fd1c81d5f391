//! Differential test: thousands of generated frames (well-formed, and mutated into malformed)
//! run through the real XDP balancer (BPF_PROG_TEST_RUN, real object, real loader, the fixture
//! world) and through the userspace simulator (`lb_userspace::sim`), an independent model over
//! the same map contents. Both must agree on the action and, for forwarded frames, the backend
//! (read back from the output: the outer destination address, or the destination MAC for L2
//! DSR); frames passed or dropped must come out unchanged; and at the end every flow the
//! simulator pinned must be pinned to the same backend in the kernel's connection table.
//!
//! World changes are applied to both sides mid-run (a VIP republished with fewer backends,
//! backends going down and up, VIPs removed and re-added, an L7 VIP added on a port of an
//! every-port VIP), each followed by one more packet of every flow pinned so far. Every
//! disagreement fails the test. Needs root (CAP_BPF).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    time::Instant,
};

use lb_common::types::{BACKEND_F_UP, FAMILY_V4, FAMILY_V6, FlowKey, VIP_F_L7, VipKey, proto};
use lb_userspace::{
    loader::{Balancer, LoadOptions},
    sim::{Action, Reason, SimState, Verdict},
};
use xlb_tests::{
    fixture::{XdpAction, pin_to_current_cpu, send},
    frames,
    r#gen::{self, Frame, Rng},
    render,
    world::{self, B1, B2, B4, V_ALLPORTS, V_PAIR, V_UDP, WorldBackend, WorldVip},
};

/// Well-formed frames generated.
const VALID: usize = 6000;
/// Mutated frames generated (beside the exhaustive truncation sweep).
const MUTATED: usize = 6000;
/// Fixed seeds: the run is the same every time.
const SEED_FRAMES: u64 = 0x0d1f_f7e5_7000_0001;
const SEED_SWEEP: u64 = 0x0d1f_f7e5_7000_0002;
/// Disagreements listed in full before the test fails.
const SHOW: usize = 20;

/// What the XDP program did, read back from its verdict and output frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Observed {
    action: XdpAction,
    /// The world backend the output frame is addressed to; `Some(u32::MAX)` for a forwarded
    /// frame to an address or MAC that is no world backend's.
    backend: Option<u32>,
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Output equals the input.
    Unchanged,
    /// Input behind a new outer IPv4 / IPv6 header (VLAN tags kept).
    Encap,
    /// Input with the destination MAC of a backend (L2 DSR).
    L2,
    /// Anything else: a reply the balancer wrote (echo reply, ICMP too-big), or garbage.
    Other,
}

fn backend_by_addr(addr: &[u8], family: u8) -> u32 {
    world::BACKENDS
        .iter()
        .find(|b| {
            b.family == family
                && if family == FAMILY_V4 {
                    b.addr[..4] == *addr
                } else {
                    b.addr[..] == *addr
                }
        })
        .map_or(u32::MAX, |b| b.id)
}

/// Reads which backend (if any) the XDP program sent `input` to, from its `output`.
fn observe(input: &[u8], action: XdpAction, output: &[u8]) -> Observed {
    if output == input {
        return Observed {
            action,
            backend: None,
            shape: Shape::Unchanged,
        };
    }
    let other = Observed {
        action,
        backend: None,
        shape: Shape::Other,
    };
    if action != XdpAction::Tx {
        return other;
    }
    let l3 = r#gen::l3_offset(output);
    let ether_type = |f: &[u8]| f.get(l3 - 2..l3).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let inner_kept = |overhead: usize| {
        output.len() == input.len() + overhead
            && output.get(..12).is_some()
            && output.get(l3 + overhead..) == input.get(l3..)
            && output.get(12..l3 - 2) == input.get(12..l3 - 2)
    };
    if inner_kept(20) && ether_type(output) == Some(0x0800) {
        return Observed {
            action,
            backend: Some(backend_by_addr(&output[l3 + 16..l3 + 20], FAMILY_V4)),
            shape: Shape::Encap,
        };
    }
    if inner_kept(40) && ether_type(output) == Some(0x86dd) {
        return Observed {
            action,
            backend: Some(backend_by_addr(&output[l3 + 24..l3 + 40], FAMILY_V6)),
            shape: Shape::Encap,
        };
    }
    if output.len() == input.len() && output.get(12..) == input.get(12..) {
        let id = world::BACKENDS
            .iter()
            .find(|b| b.mac[..] == output[..6])
            .map_or(u32::MAX, |b| b.id);
        return Observed {
            action,
            backend: Some(id),
            shape: Shape::L2,
        };
    }
    other
}

fn agrees(sim: &Verdict, xdp: &Observed) -> bool {
    let action = match sim.action {
        Action::Pass => XdpAction::Pass,
        Action::Drop => XdpAction::Drop,
        Action::Tx => XdpAction::Tx,
    };
    if action != xdp.action || sim.backend != xdp.backend {
        return false;
    }
    match sim.action {
        // Passed and dropped frames are left as they came.
        Action::Pass | Action::Drop => xdp.shape == Shape::Unchanged,
        Action::Tx => true,
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

struct Disagreement {
    index: usize,
    kind: &'static str,
    frame: Vec<u8>,
    sim: Verdict,
    xdp: Observed,
    output: Vec<u8>,
}

impl Disagreement {
    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "--- frame #{} ({}) ---", self.index, self.kind);
        let _ = writeln!(s, "  hex: {}", hex(&self.frame));
        s.push_str(&render::decode(&self.frame));
        let _ = writeln!(
            s,
            "  simulator: {:?} backend {:?} ({:?})",
            self.sim.action, self.sim.backend, self.sim.reason
        );
        let _ = writeln!(
            s,
            "  xdp:       {:?} backend {:?} (output {:?})",
            self.xdp.action, self.xdp.backend, self.xdp.shape
        );
        if self.xdp.shape != Shape::Unchanged {
            let _ = writeln!(s, "  xdp output:\n{}", render::decode(&self.output));
            let _ = writeln!(s, "  output hex: {}", hex(&self.output));
        }
        s
    }
}

/// A change of the world, applied to the kernel maps and to the simulator alike.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// Republish a VIP with these backends.
    Publish(&'static WorldVip, &'static [WorldBackend]),
    /// Mark a backend down (or up again).
    BackendUp(&'static WorldBackend, bool),
    /// Remove a VIP.
    Remove(&'static WorldVip),
}

fn apply(change: Change, balancer: &mut Balancer, sim: &mut SimState) {
    match change {
        Change::Publish(vip, backends) => {
            let table = world::table(backends);
            let meta = balancer
                .publish_vip(&vip.key, vip.id, vip.flags, &table)
                .expect("publishing a VIP");
            sim.set_vip(vip.key, meta, table);
        }
        Change::BackendUp(b, up) => {
            let mut entry = world::backend_entry(b);
            if !up {
                entry.flags &= !BACKEND_F_UP;
            }
            balancer
                .set_backend(b.id, &entry)
                .expect("writing a backend");
            sim.set_backend(b.id, entry);
        }
        Change::Remove(vip) => {
            balancer.remove_vip(&vip.key).expect("removing a VIP");
            sim.remove_vip(&vip.key);
        }
    }
}

/// An L7 VIP added late on one port (443) of the every-port VIP's address: from then on that
/// port's packets, established flows' included, go to the host stack.
const V_ALLPORTS_443_L7: WorldVip = WorldVip {
    id: 10,
    key: VipKey {
        port_be: 443u16.to_be(),
        ..V_ALLPORTS.key
    },
    flags: VIP_F_L7,
    backends: &[B1],
};

/// The world changes and the step (out of the whole run) before which each applies.
fn schedule(total: usize) -> Vec<(usize, Change)> {
    const ONLY_B2: &[WorldBackend] = &[B2];
    const PAIR_BOTH: &[WorldBackend] = &[B1, B2];
    const ONLY_B1: &[WorldBackend] = &[B1];
    let at = |percent: usize| total * percent / 100;
    vec![
        // The pair VIP loses B1 from its table: B1's flows stay (drained), new ones go to B2.
        (at(12), Change::Publish(&V_PAIR, ONLY_B2)),
        // B1 down: its flows are re-selected; then back up.
        (at(24), Change::BackendUp(&B1, false)),
        (at(36), Change::BackendUp(&B1, true)),
        // The only backend of the IPv6 TCP VIP down: its traffic is dropped; then back up.
        (at(46), Change::BackendUp(&B4, false)),
        (at(54), Change::BackendUp(&B4, true)),
        (at(54), Change::Publish(&V_PAIR, PAIR_BOTH)),
        // The UDP VIP removed (its address keeps the TCP VIP), then back with another backend.
        (at(62), Change::Remove(&V_UDP)),
        (at(70), Change::Publish(&V_UDP, ONLY_B1)),
        // An L7 VIP on one port of the every-port VIP's address.
        (at(76), Change::Publish(&V_ALLPORTS_443_L7, ONLY_B1)),
        // The pair VIP's address loses its only VIP (fragments may be in flight), then back.
        (at(84), Change::Remove(&V_PAIR)),
        (at(92), Change::Publish(&V_PAIR, PAIR_BOTH)),
    ]
}

#[test]
fn xdp_and_simulator_agree_on_every_frame() {
    let started = Instant::now();
    // The connection table is per CPU; BPF_PROG_TEST_RUN runs on the caller's CPU.
    pin_to_current_cpu();
    let mut balancer = Balancer::load_with(LoadOptions {
        flow_entries: 65536,
    })
    .expect("loading the balancer object (run as root)");
    world::install(&mut balancer);
    let mut sim = SimState::new(world::config());
    for b in world::BACKENDS {
        sim.set_backend(b.id, world::backend_entry(b));
    }
    for v in world::VIPS {
        let meta = balancer
            .vip(&v.key)
            .expect("reading a VIP")
            .expect("the world's VIP is installed");
        sim.set_vip(v.key, meta, world::table(v.backends));
    }

    // The exhaustive truncation sweep: every length from the Ethernet header up, of one frame
    // per header layout. Interleaved with the random frames.
    let mut sweep_rng = Rng::new(SEED_SWEEP);
    let mut sweep: Vec<Frame> = Vec::new();
    for base in r#gen::truncation_bases(&mut sweep_rng) {
        for len in 14..base.bytes.len() {
            sweep.push(Frame {
                kind: "mut:truncation-sweep",
                bytes: base.bytes[..len].to_vec(),
            });
        }
    }
    let planned = VALID + MUTATED + sweep.len();
    let mut changes = schedule(planned).into_iter().peekable();
    let mut rng = Rng::new(SEED_FRAMES);
    let (mut valid_left, mut mutated_left) = (VALID, MUTATED);
    let mut sweep = sweep.into_iter();
    let mut last_valid = r#gen::valid(&mut rng);

    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut disagreements: Vec<Disagreement> = Vec::new();
    // Connection-table paths the run must reach: forwards of a flow seen before, of a flow to
    // a backend no longer in its VIP's table (drained, kept), and of a flow that moved.
    let (mut repeat_flow_forwards, mut drained_forwards, mut moved_forwards) = (0, 0, 0);
    let mut last_backend: HashMap<FlowKey, u32> = HashMap::new();

    let mut replay: VecDeque<Frame> = VecDeque::new();
    let (mut step, mut total) = (0, 0);
    for index in 0.. {
        // After each world change, one more packet of every flow pinned so far: established
        // flows must meet the change.
        let mut changed = false;
        while let Some((_, change)) = changes.next_if(|(at, _)| *at <= step) {
            apply(change, &mut balancer, &mut sim);
            changed = true;
        }
        if changed {
            replay.extend(replay_frames(&sim, &mut rng));
        }
        let frame = if let Some(f) = replay.pop_front() {
            f
        } else if step == planned {
            break;
        } else {
            // Mostly random (valid or mutated, in proportion to what is left); every so often
            // the next frame of the sweep.
            step += 1;
            let left = valid_left + mutated_left;
            if step % 8 == 0 || left == 0 {
                match sweep.next() {
                    Some(f) => f,
                    None => next_random(
                        &mut rng,
                        &mut valid_left,
                        &mut mutated_left,
                        &mut last_valid,
                    ),
                }
            } else {
                next_random(
                    &mut rng,
                    &mut valid_left,
                    &mut mutated_left,
                    &mut last_valid,
                )
            }
        };

        total += 1;
        let (action, output) = send(&balancer, &frame.bytes);
        let xdp = observe(&frame.bytes, action, &output);
        let verdict = sim.decide(&frame.bytes);
        *kinds.entry(frame.kind).or_default() += 1;
        *reasons.entry(verdict.reason).or_default() += 1;
        if verdict.reason == Reason::Forwarded
            && let (Some(key), Some(id)) = (verdict.key, verdict.backend)
        {
            match last_backend.insert(key, id) {
                Some(before) if before == id => repeat_flow_forwards += 1,
                Some(_) => moved_forwards += 1,
                None => {}
            }
            if !in_live_table(&sim, &key, id) {
                drained_forwards += 1;
            }
        }
        if agrees(&verdict, &xdp) {
            continue;
        }
        let d = Disagreement {
            index,
            kind: frame.kind,
            frame: frame.bytes,
            sim: verdict,
            xdp,
            output,
        };
        disagreements.push(d);
    }

    // The connection table the simulator kept is the kernel's (every flow it pinned is pinned
    // to the same backend there).
    let mut table_mismatches = Vec::new();
    for (key, id) in sim.flows() {
        let kernel = balancer.flow_backend(key).expect("reading the flow table");
        if kernel != Some(*id) {
            table_mismatches.push(format!(
                "  flow {key:?}: simulator backend {id}, kernel {kernel:?}"
            ));
        }
    }

    let elapsed = started.elapsed();
    let valid_total: usize = kinds
        .iter()
        .filter(|(k, _)| !k.starts_with("mut:"))
        .map(|(_, n)| n)
        .sum();
    let mut summary = format!(
        "{total} frames ({valid_total} well-formed, {} mutated) in {elapsed:.2?}; \
         {} flows pinned; forwards of a known flow: {repeat_flow_forwards} to the same \
         backend ({drained_forwards} drained), {moved_forwards} moved\n  kinds:",
        total - valid_total,
        sim.flows().len()
    );
    for (k, n) in &kinds {
        let _ = write!(summary, " {k}={n}");
    }
    summary.push_str("\n  simulator reasons:");
    for (r, n) in &reasons {
        let _ = write!(summary, " {r:?}={n}");
    }
    eprintln!("{summary}");

    if !disagreements.is_empty() || !table_mismatches.is_empty() {
        let mut msg = format!(
            "{} of {total} frames: the XDP program and the simulator disagree \
             ({} listed); {} connection-table mismatches\n",
            disagreements.len(),
            disagreements.len().min(SHOW),
            table_mismatches.len()
        );
        for d in disagreements.iter().take(SHOW) {
            msg.push_str(&d.render());
        }
        for m in table_mismatches.iter().take(SHOW) {
            msg.push_str(m);
            msg.push('\n');
        }
        panic!("{msg}");
    }

    // The run is only meaningful if it reached every path.
    for reason in [
        Reason::L2Truncated,
        Reason::VlanTooMany,
        Reason::NonIp,
        Reason::Malformed,
        Reason::L4Truncated,
        Reason::NotVip,
        Reason::L7,
        Reason::NoBackend,
        Reason::TooBigIcmp,
        Reason::TooBigDrop,
        Reason::EchoReply,
        Reason::IcmpErrorForwarded,
        Reason::IcmpQuoteShort,
        Reason::FragFollow,
        Reason::FragUnknown,
        Reason::Forwarded,
    ] {
        assert!(
            reasons.get(&reason).copied().unwrap_or(0) > 0,
            "no frame took the {reason:?} path\n{summary}"
        );
    }
    assert!(
        valid_total >= 5000 && total - valid_total >= 5000,
        "{summary}"
    );
    assert!(repeat_flow_forwards > 500, "flows must repeat\n{summary}");
    assert!(drained_forwards > 0 && moved_forwards > 0, "{summary}");
}

/// One more packet (UDP, or TCP with mostly ACK, sometimes SYN+ACK, FIN, RST or a bare SYN) of
/// every flow from the world's client the simulator has pinned, in a fixed order.
fn replay_frames(sim: &SimState, rng: &mut Rng) -> Vec<Frame> {
    let mut flows: Vec<FlowKey> = sim
        .flows()
        .keys()
        .filter(|k| {
            (k.family == FAMILY_V4 && k.src[..4] == frames::CLIENT_V4)
                || (k.family == FAMILY_V6 && k.src == frames::CLIENT_V6)
        })
        .copied()
        .collect();
    flows.sort_by_key(|k| (k.family, k.dst, k.proto, k.dport_be, k.sport_be));
    flows
        .iter()
        .filter_map(|k| {
            let (sport, dport) = (u16::from_be(k.sport_be), u16::from_be(k.dport_be));
            let n = rng.range(0, 16);
            let payload = rng.bytes(n);
            // Mostly ACK; SYN+ACK, FIN+ACK and RST must keep the flow's backend, a bare SYN
            // re-selects it.
            let flags = rng.pick(&[0x10u8, 0x10, 0x10, 0x10, 0x10, 0x12, 0x12, 0x11, 0x04, 0x02]);
            let bytes = match (k.family, k.proto) {
                (FAMILY_V4, proto::TCP) => {
                    let dst = [k.dst[0], k.dst[1], k.dst[2], k.dst[3]];
                    let mut f = frames::tcp4(dst, sport, dport, false, &payload);
                    f[frames::L3 + 20 + 13] = flags;
                    f
                }
                (FAMILY_V4, proto::UDP) => {
                    let dst = [k.dst[0], k.dst[1], k.dst[2], k.dst[3]];
                    frames::udp4(dst, sport, dport, &payload)
                }
                (FAMILY_V6, proto::TCP) => {
                    let mut f = frames::tcp6(k.dst, sport, dport, false, &payload);
                    f[frames::L3 + 40 + 13] = flags;
                    f
                }
                (FAMILY_V6, proto::UDP) => frames::udp6(k.dst, sport, dport, &payload),
                _ => return None,
            };
            Some(Frame {
                kind: "replay-flow",
                bytes,
            })
        })
        .collect()
}

/// Whether backend `id` is in the live Maglev table of the VIP `flow` goes to.
fn in_live_table(sim: &SimState, flow: &FlowKey, id: u32) -> bool {
    let mut key = VipKey {
        addr: flow.dst,
        port_be: flow.dport_be,
        proto: flow.proto,
        family: flow.family,
    };
    let meta = sim.vip(&key).or_else(|| {
        key.port_be = 0;
        sim.vip(&key)
    });
    meta.and_then(|m| sim.table(m.table_index))
        .is_some_and(|t| t.contains(&id))
}

fn next_random(
    rng: &mut Rng,
    valid_left: &mut usize,
    mutated_left: &mut usize,
    last_valid: &mut Frame,
) -> Frame {
    let pick_valid = *mutated_left == 0
        || (*valid_left > 0 && rng.below(*valid_left + *mutated_left) < *valid_left);
    if pick_valid {
        *valid_left -= 1;
        let f = r#gen::valid(rng);
        *last_valid = f.clone();
        f
    } else {
        *mutated_left -= 1;
        // Mutate a fresh frame most of the time, sometimes the last one sent (so a mutated
        // copy of a real flow's packet follows it), sometimes twice.
        let base = if rng.percent(70) {
            r#gen::valid(rng)
        } else {
            last_valid.clone()
        };
        let once = r#gen::mutate(rng, &base.bytes);
        if rng.percent(20) {
            let twice = r#gen::mutate(rng, &once.bytes);
            Frame {
                kind: twice.kind,
                bytes: twice.bytes,
            }
        } else {
            once
        }
    }
}
