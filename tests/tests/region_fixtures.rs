//! Fixture packets for multi-region failover, through BPF_PROG_TEST_RUN against the real
//! balancer object with the standard world installed: flows another region's xlb host failed
//! over to this one (IPv4 and IPv6 outer headers, with and without VLAN tags) are stripped and
//! balanced exactly as if they had arrived directly; capacity probes reach the host stack;
//! anything else in such a tunnel is dropped and counted; the MTU check counts only the
//! overhead of the hop out (not both tunnels); a VIP's region split sends new flows to a remote
//! region's xlb host, always by encapsulation, and never sends a packet that came from another
//! region on to a region again. Needs root (CAP_BPF).

use lb_common::{
    counters::Counter::{self, *},
    flow::{flow_hash, region_point},
    types::{
        BACKEND_F_REGION, BACKEND_F_UP, Backend, FAMILY_V4, FAMILY_V6, REGION_LOCAL, REGION_SCALE,
        VIP_F_LAST_RESORT, proto,
    },
};
use lb_userspace::{loader::Balancer, maps::RegionSplit};
use xlb_tests::{
    fixture::{Case, Output, XdpAction, run_all, send},
    frames::{self, LB_MAC, ROUTER_MAC},
    world::{self, B1, B3, B4, V_ALLPORTS, V_L2, V_TCP, V6_TCP, V6_UDP, WorldBackend},
};

const VIP: [u8; 4] = [203, 0, 113, 10];
const NOT_VIP: [u8; 4] = [198, 51, 100, 99];

const fn v4(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// This balancer's IPv4 region tunnel address.
const TUNNEL_V4: WorldBackend = WorldBackend {
    id: 0,
    addr: v4([192, 0, 2, 100]),
    family: FAMILY_V4,
    mac: [0; 6],
};
/// This balancer's IPv6 region tunnel address.
const TUNNEL_V6: WorldBackend = WorldBackend {
    id: 0,
    addr: [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64,
    ],
    family: FAMILY_V6,
    mac: [0; 6],
};
/// The remote region's xlb host, as a region backend entry.
const REMOTE: WorldBackend = WorldBackend {
    id: 20,
    addr: v4([198, 18, 0, 2]),
    family: FAMILY_V4,
    mac: [0x02, 0, 0, 0, 0x02, 0x02],
};

fn tunnel_addrs() -> Vec<std::net::IpAddr> {
    vec![
        std::net::IpAddr::from([192, 0, 2, 100]),
        std::net::IpAddr::from(TUNNEL_V6.addr),
    ]
}

/// `inner` (a frame as it would arrive directly) as it arrives from another region's xlb
/// host: wrapped in an outer header of `tunnel`'s family addressed to it, from the router.
fn arriving(inner: &[u8], vlans: usize, tunnel: &WorldBackend) -> Vec<u8> {
    let any = world::key_v4(VIP, 1, 1, proto::TCP);
    let mut f = world::encapsulated(inner, vlans, &any, tunnel);
    f[..6].copy_from_slice(&LB_MAC);
    f[6..12].copy_from_slice(&ROUTER_MAC);
    f
}

/// The per-layer counters of the outer header of a tunnel packet of `tunnel`'s family.
fn outer_layers(tunnel: &WorldBackend) -> [Counter; 2] {
    [
        if tunnel.family == FAMILY_V4 {
            L3Ipv4
        } else {
            L3Ipv6
        },
        L4Other,
    ]
}

fn with_regions(case: Case) -> Case {
    case.with_setup(|b: &mut Balancer| {
        b.set_region_addrs(&tunnel_addrs())
            .expect("region addresses");
    })
}

/// The region backend entry.
fn remote_entry(up: bool) -> Backend {
    let mut e = world::backend_entry(&REMOTE);
    e.flags = BACKEND_F_REGION | if up { BACKEND_F_UP } else { 0 };
    e
}

/// A split of `remote_share` (out of REGION_SCALE) to the remote region after this one.
fn split(remote_share: u32) -> RegionSplit {
    RegionSplit {
        count: 2,
        upto: [REGION_SCALE - remote_share, REGION_SCALE, 0, 0],
        backend: [REGION_LOCAL, REMOTE.id, 0, 0],
    }
}

/// Sets up the remote region (up or not) and gives V_TCP and V_L2 the split `remote_share`,
/// with `extra_flags` on V_TCP.
fn failed_over(remote_share: u32, up: bool, extra_flags: u32) -> impl Fn(&mut Balancer) {
    move |b: &mut Balancer| {
        b.set_region_addrs(&tunnel_addrs())
            .expect("region addresses");
        b.set_backend(REMOTE.id, &remote_entry(up)).expect("remote");
        b.set_vip_split(&V_TCP.key, V_TCP.flags | extra_flags, &split(remote_share))
            .expect("split");
        b.set_vip_split(&V_L2.key, V_L2.flags, &split(remote_share))
            .expect("split");
    }
}

fn ingress_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for tunnel in [TUNNEL_V4, TUNNEL_V6] {
        let outer = if tunnel.family == FAMILY_V4 {
            "v4"
        } else {
            "v6"
        };
        // (inner frame, its flow key, the backend it goes to, the forward counter, inner L3)
        let v4_syn = frames::tcp4(VIP, 40000, 80, true, b"");
        let v6_syn = frames::tcp6(V6_TCP.key.addr, 40000, 80, true, b"");
        let v6_udp = frames::udp6(V6_UDP.key.addr, 5353, 53, b"q6");
        let flows = [
            (
                "ipv4 tcp syn",
                v4_syn,
                world::key_v4(VIP, 40000, 80, proto::TCP),
                B1,
                FwdEncapV4,
                L3Ipv4,
                L4Tcp,
            ),
            (
                "ipv6 tcp syn",
                v6_syn,
                world::key_v6(V6_TCP.key.addr, 40000, 80, proto::TCP),
                B4,
                FwdEncapV6,
                L3Ipv6,
                L4Tcp,
            ),
            (
                "ipv6 udp",
                v6_udp,
                world::key_v6(V6_UDP.key.addr, 5353, 53, proto::UDP),
                B1,
                FwdEncapV4,
                L3Ipv6,
                L4Udp,
            ),
        ];
        for (what, inner, key, backend, fwd, l3, l4) in flows {
            for vlans in [0, 1] {
                let inner = if vlans == 1 {
                    frames::with_vlan_tag(&inner, 7)
                } else {
                    inner.clone()
                };
                let mut layers = outer_layers(&tunnel).to_vec();
                layers.extend([l3, l4, RegionDecap, CtMiss, fwd]);
                if vlans == 1 {
                    // Counted by the outer parse and again by the inner one.
                    layers.extend([Vlan1, Vlan1]);
                }
                cases.push(with_regions(Case::forwards(
                    format!(
                        "{outer} outer, {vlans} vlan tags: {what} balanced as if it came directly"
                    ),
                    arriving(&inner, vlans, &tunnel),
                    world::encapsulated(&inner, vlans, &key, &backend),
                    &layers,
                )));
            }
        }
        // A capacity probe: inner destination = the tunnel address; passed, stripped.
        let probe_dst = [
            tunnel.addr[0],
            tunnel.addr[1],
            tunnel.addr[2],
            tunnel.addr[3],
        ];
        let probe = if tunnel.family == FAMILY_V4 {
            frames::udp4(probe_dst, 40001, 9301, b"XLBC")
        } else {
            frames::udp6(tunnel.addr, 40001, 9301, b"XLBC")
        };
        let mut case = Case::passes(
            format!("{outer} outer: a capacity probe to the tunnel address reaches the stack"),
            arriving(&probe, 0, &tunnel),
            &outer_layers(&tunnel),
        );
        case.output = Output::Frame(probe);
        case.counters.push((RegionProbePassed, 1));
        cases.push(with_regions(case));
        // Nothing else comes through the tunnel.
        let mut layers = outer_layers(&tunnel).to_vec();
        layers.extend([L3Ipv4, L4Tcp, RegionDecap, DropRegionNotVip]);
        let stray = frames::tcp4(NOT_VIP, 40000, 80, true, b"");
        let mut case = Case::drops(
            format!("{outer} outer: an inner packet for no vip is dropped"),
            arriving(&stray, 0, &tunnel),
            &layers,
        );
        // Dropped after the outer header went.
        case.output = Output::Frame(stray);
        cases.push(with_regions(case));
        // The outer header announces IPv4 inside; the inner header says version 6.
        let mut bad = arriving(&frames::tcp4(VIP, 40000, 80, true, b""), 0, &tunnel);
        let inner_at = 14 + if tunnel.family == FAMILY_V4 { 20 } else { 40 };
        bad[inner_at] = 0x65;
        let mut layers = outer_layers(&tunnel).to_vec();
        layers.push(DropRegionNotVip);
        cases.push(with_regions(Case::drops(
            format!("{outer} outer: an inner header of the wrong version is dropped"),
            bad,
            &layers,
        )));
        // The outer header claims only 12 bytes of inner packet.
        let mut short = arriving(&frames::tcp4(VIP, 40000, 80, true, b""), 0, &tunnel);
        let outer_len = if tunnel.family == FAMILY_V4 { 20 } else { 40 };
        if tunnel.family == FAMILY_V4 {
            short[16..18].copy_from_slice(&((outer_len + 12) as u16).to_be_bytes());
            frames::fix_ipv4_checksum(&mut short);
        } else {
            short[18..20].copy_from_slice(&12u16.to_be_bytes());
        }
        short.truncate(14 + outer_len + 12);
        cases.push(with_regions(Case::drops(
            format!("{outer} outer: a truncated inner header is dropped"),
            short,
            &layers,
        )));
    }
    // Without region addresses, a tunnel packet to that address is ordinary host traffic.
    cases.push(Case::passes(
        "a tunnel packet to an address that is no region address is passed untouched",
        arriving(&frames::tcp4(VIP, 40000, 80, true, b""), 0, &TUNNEL_V4),
        &[L3Ipv4, L4Other, PassNotVip],
    ));
    cases
}

/// Two levels of tunnel: the packet arrives with one outer header and leaves with another;
/// only the one it leaves with counts against the egress MTU (1500 in the world).
fn mtu_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for tunnel in [TUNNEL_V4, TUNNEL_V6] {
        let outer = if tunnel.family == FAMILY_V4 {
            "v4"
        } else {
            "v6"
        };
        let base = outer_layers(&tunnel);
        // IPv4 to an IPv4 backend: 20 bytes out.
        let fits = frames::tcp4_sized(VIP, 80, 1480);
        let key = world::key_v4(VIP, 40000, 80, proto::TCP);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, FwdEncapV4]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: 1480 bytes + 20 out fit exactly"),
            arriving(&fits, 0, &tunnel),
            world::encapsulated(&fits, 0, &key, &B1),
            &layers,
        )));
        let big = frames::tcp4_sized(VIP, 80, 1481);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, IcmpTooBigSent]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: 1481 bytes + 20 out: frag needed (mtu 1480) to the client"),
            arriving(&big, 0, &tunnel),
            world::frag_needed(&big, 0, 1480),
            &layers,
        )));
        // IPv4 to an IPv6 backend (every-port VIP): 40 bytes out.
        let dst = [
            V_ALLPORTS.key.addr[0],
            V_ALLPORTS.key.addr[1],
            V_ALLPORTS.key.addr[2],
            V_ALLPORTS.key.addr[3],
        ];
        let fits = frames::tcp4_sized(dst, 80, 1460);
        let key = world::key_v4(dst, 40000, 80, proto::TCP);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, FwdEncapV6]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: 1460 bytes + 40 out (ipv4 in ipv6) fit exactly"),
            arriving(&fits, 0, &tunnel),
            world::encapsulated(&fits, 0, &key, &B3),
            &layers,
        )));
        let big = frames::tcp4_sized(dst, 80, 1461);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, IcmpTooBigSent]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: 1461 bytes + 40 out: frag needed (mtu 1460)"),
            arriving(&big, 0, &tunnel),
            world::frag_needed(&big, 0, 1460),
            &layers,
        )));
        // IPv6 to an IPv6 backend: 40 bytes out; too big gets ICMPv6 packet too big.
        let fits = frames::tcp6_sized(V6_TCP.key.addr, 80, 1460);
        let key = world::key_v6(V6_TCP.key.addr, 40000, 80, proto::TCP);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv6, L4Tcp, RegionDecap, CtMiss, FwdEncapV6]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: ipv6 1460 bytes + 40 out fit exactly"),
            arriving(&fits, 0, &tunnel),
            world::encapsulated(&fits, 0, &key, &B4),
            &layers,
        )));
        let big = frames::tcp6_sized(V6_TCP.key.addr, 80, 1461);
        let mut layers = base.to_vec();
        layers.extend([L3Ipv6, L4Tcp, RegionDecap, CtMiss, IcmpTooBigSent]);
        cases.push(with_regions(Case::forwards(
            format!("{outer} outer: ipv6 1461 bytes + 40 out: packet too big (mtu 1460)"),
            arriving(&big, 0, &tunnel),
            world::packet_too_big(&big, 0, 1460),
            &layers,
        )));
    }
    cases
}

fn split_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let syn = frames::tcp4(VIP, 40000, 80, true, b"");
    let key = world::key_v4(VIP, 40000, 80, proto::TCP);
    cases.push(
        Case::forwards(
            "every new flow to the remote region: encapsulated to its xlb host",
            syn.clone(),
            world::encapsulated(&syn, 0, &key, &REMOTE),
            &[L3Ipv4, L4Tcp, CtMiss, RegionForwarded, FwdEncapV4],
        )
        .with_setup(failed_over(REGION_SCALE, true, 0)),
    );
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, FwdEncapV4]);
    cases.push(
        Case::forwards(
            "a flow from another region stays in this one even when this one is failed over",
            arriving(&syn, 0, &TUNNEL_V4),
            world::encapsulated(&syn, 0, &key, &B1),
            &layers,
        )
        .with_setup(failed_over(REGION_SCALE, true, 0)),
    );
    cases.push(
        Case::forwards(
            "a remote region that is down falls back to this region's table",
            syn.clone(),
            world::encapsulated(&syn, 0, &key, &B1),
            &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
        )
        .with_setup(failed_over(REGION_SCALE, false, 0)),
    );
    cases.push(
        Case::forwards(
            "last resort: new flows counted",
            syn.clone(),
            world::encapsulated(&syn, 0, &key, &B1),
            &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4, RegionLastResort],
        )
        .with_setup(failed_over(0, true, VIP_F_LAST_RESORT)),
    );
    let l2 = frames::tcp4(
        [
            V_L2.key.addr[0],
            V_L2.key.addr[1],
            V_L2.key.addr[2],
            V_L2.key.addr[3],
        ],
        40000,
        80,
        true,
        b"",
    );
    let l2_key = world::key_v4(
        [
            V_L2.key.addr[0],
            V_L2.key.addr[1],
            V_L2.key.addr[2],
            V_L2.key.addr[3],
        ],
        40000,
        80,
        proto::TCP,
    );
    cases.push(
        Case::forwards(
            "a dsr-l2 vip reaches the remote region by encapsulation",
            l2.clone(),
            world::encapsulated(&l2, 0, &l2_key, &REMOTE),
            &[L3Ipv4, L4Tcp, CtMiss, RegionForwarded, FwdEncapV4],
        )
        .with_setup(failed_over(REGION_SCALE, true, 0)),
    );
    cases
}

/// Tunnel packets built to confuse the decapsulation: odd outer headers, inner packets that
/// are not ordinary VIP flows, lengths that disagree. Each states the verdict, the frame left
/// behind and the counters that say why.
fn hostile_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let syn = frames::tcp4(VIP, 40000, 80, true, b"");
    let key = world::key_v4(VIP, 40000, 80, proto::TCP);
    let v4_layers = || {
        let mut l = outer_layers(&TUNNEL_V4).to_vec();
        l.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, FwdEncapV4]);
        l
    };

    // Outer IPv4 header with 4 bytes of options (IHL 6): stripped whole, balanced.
    let plain = arriving(&syn, 0, &TUNNEL_V4);
    let mut opts = plain[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&plain[34..]);
    frames::set_ipv4_ihl(&mut opts, 6);
    let len = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    frames::set_ipv4_total_len(&mut opts, len);
    frames::fix_ipv4_checksum(&mut opts);
    cases.push(with_regions(Case::forwards(
        "v4 outer with ip options: the options go with the outer header",
        opts,
        world::encapsulated(&syn, 0, &key, &B1),
        &v4_layers(),
    )));

    // Outer IPv6 header with a destination-options extension header.
    let plain6 = arriving(&syn, 0, &TUNNEL_V6);
    let ext = frames::with_ipv6_ext(&plain6, 60, &frames::ext_8n(0));
    let mut layers = outer_layers(&TUNNEL_V6).to_vec();
    layers.extend([L3Ipv4, L4Tcp, RegionDecap, CtMiss, FwdEncapV4]);
    cases.push(with_regions(Case::forwards(
        "v6 outer with an extension header: the whole chain goes",
        ext,
        world::encapsulated(&syn, 0, &key, &B1),
        &layers,
    )));

    // Ethernet padding after the outer packet: balanced; the padding rides along at the end
    // (the new outer header's length is the inner packet's, so receivers ignore it).
    let mut padded = arriving(&syn, 0, &TUNNEL_V4);
    padded.extend_from_slice(&[0; 6]);
    let mut out = world::encapsulated(&syn, 0, &key, &B1);
    out.extend_from_slice(&[0; 6]);
    cases.push(with_regions(Case::forwards(
        "v4 outer followed by ethernet padding: balanced",
        padded,
        out,
        &v4_layers(),
    )));

    // Inner TTL 0 and 1: the balancer is no router hop; the inner packet is forwarded as is.
    for ttl in [0u8, 1] {
        let mut inner = syn.clone();
        inner[22] = ttl;
        frames::fix_ipv4_checksum(&mut inner);
        cases.push(with_regions(Case::forwards(
            format!("inner ttl {ttl}: forwarded unchanged"),
            arriving(&inner, 0, &TUNNEL_V4),
            world::encapsulated(&inner, 0, &key, &B1),
            &v4_layers(),
        )));
    }

    // The inner packet claims 20 bytes more than the outer header carries; those 20 bytes
    // are in the frame (after the outer packet), but are not part of the tunnel packet: a
    // kernel tunnel drops this (the outer length trims the frame first), and so must XDP:
    // nothing outside the outer packet may be forwarded as part of a VIP flow.
    let long = frames::tcp4(VIP, 40000, 80, true, &[0xaa; 20]);
    let mut f = arriving(&long, 0, &TUNNEL_V4);
    let outer_len = u16::from_be_bytes([f[16], f[17]]) - 20;
    f[16..18].copy_from_slice(&outer_len.to_be_bytes());
    frames::fix_ipv4_checksum(&mut f);
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.push(DropRegionNotVip);
    cases.push(with_regions(Case::drops(
        "an inner packet longer than the outer one carries is dropped",
        f,
        &layers,
    )));
    // The same with an IPv6 outer header and an IPv6 inner one.
    let inner6 = frames::tcp6(V6_TCP.key.addr, 40000, 80, true, &[0xaa; 20]);
    let mut f = arriving(&inner6, 0, &TUNNEL_V6);
    let payload = u16::from_be_bytes([f[18], f[19]]) - 20;
    f[18..20].copy_from_slice(&payload.to_be_bytes());
    let mut layers = outer_layers(&TUNNEL_V6).to_vec();
    layers.push(DropRegionNotVip);
    cases.push(with_regions(Case::drops(
        "v6 outer: an inner packet longer than the outer one carries is dropped",
        f,
        &layers,
    )));

    // The inner packet is shorter than the outer payload: the rest is trailing bytes, forwarded
    // behind the inner packet (as padding would be).
    let mut f = arriving(&syn, 0, &TUNNEL_V4);
    f.extend_from_slice(&[0xbb; 8]);
    let outer_len = u16::from_be_bytes([f[16], f[17]]) + 8;
    f[16..18].copy_from_slice(&outer_len.to_be_bytes());
    frames::fix_ipv4_checksum(&mut f);
    let mut out = world::encapsulated(&syn, 0, &key, &B1);
    out.extend_from_slice(&[0xbb; 8]);
    cases.push(with_regions(Case::forwards(
        "an inner packet shorter than the outer payload: balanced, the rest trails",
        f,
        out,
        &v4_layers(),
    )));

    // A nested tunnel: IPIP to the tunnel address inside IPIP to the tunnel address. It is no
    // capacity probe (not UDP) and no VIP flow: dropped after one strip, never balanced.
    let nested = arriving(&syn, 0, &TUNNEL_V4);
    let mut twice = arriving(&nested, 0, &TUNNEL_V4);
    twice[6..12].copy_from_slice(&ROUTER_MAC);
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([L3Ipv4, L4Other, RegionDecap, DropRegionNotVip]);
    let mut case = Case::drops(
        "ipip in ipip to the tunnel address: stripped once, dropped",
        twice,
        &layers,
    );
    case.output = Output::Frame(nested);
    cases.push(with_regions(case));
    // Any other inner packet to the tunnel address (here TCP to port 22): no probe, dropped.
    let ssh = frames::tcp4([192, 0, 2, 100], 40000, 22, true, b"");
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([L3Ipv4, L4Tcp, RegionDecap, DropRegionNotVip]);
    let mut case = Case::drops(
        "inner tcp to the tunnel address is no capacity probe: dropped",
        arriving(&ssh, 0, &TUNNEL_V4),
        &layers,
    );
    case.output = Output::Frame(ssh);
    cases.push(with_regions(case));

    // A later fragment of a datagram for no VIP: nothing but VIP flows comes through the
    // tunnel, so it is dropped, not handed to the stack.
    let mut frag = frames::udp4(NOT_VIP, 5000, 53, &[0; 16]);
    frames::set_ipv4_fragment(&mut frag, false, 10);
    frames::fix_ipv4_checksum(&mut frag);
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([L3Ipv4, L4Fragment, RegionDecap, DropRegionNotVip]);
    let mut case = Case::drops(
        "a later fragment for no vip through the tunnel is dropped",
        arriving(&frag, 0, &TUNNEL_V4),
        &layers,
    );
    case.output = Output::Frame(frag);
    cases.push(with_regions(case));

    // An inner packet to an L7 VIP: handed to this host's gateway (the VIP is served here).
    let l7 = frames::tcp4([203, 0, 113, 13], 40000, 443, true, b"");
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([L3Ipv4, L4Tcp, RegionDecap, PassL7]);
    let mut case = Case::passes(
        "an inner packet to an l7 vip reaches this host's gateway",
        arriving(&l7, 0, &TUNNEL_V4),
        &layers,
    );
    case.output = Output::Frame(l7);
    cases.push(with_regions(case));

    // An inner ICMP error quoting a VIP flow goes to that flow's backend in this region.
    let reply = {
        // The quoted packet: VIP -> client, as the client's router would quote it.
        let mut q = frames::tcp4(VIP, 40000, 80, false, b"")[14..42].to_vec();
        q[12..16].copy_from_slice(&VIP);
        q[16..20].copy_from_slice(&frames::CLIENT_V4);
        q[20..22].copy_from_slice(&80u16.to_be_bytes());
        q[22..24].copy_from_slice(&40000u16.to_be_bytes());
        frames::icmp4_error([198, 51, 100, 1], VIP, 3, 4, [0, 0, 5, 0xdc], &q)
    };
    let mut layers = outer_layers(&TUNNEL_V4).to_vec();
    layers.extend([
        L3Ipv4,
        L4Other,
        RegionDecap,
        CtMiss,
        IcmpErrorForwarded,
        FwdEncapV4,
    ]);
    cases.push(with_regions(Case::forwards(
        "an inner icmp error quoting a vip flow goes to that flow's backend",
        arriving(&reply, 0, &TUNNEL_V4),
        world::encapsulated(&reply, 0, &key, &B1),
        &layers,
    )));

    cases
}

#[test]
fn every_region_fixture_case() {
    let mut cases = ingress_cases();
    cases.extend(mtu_cases());
    cases.extend(split_cases());
    cases.extend(hostile_cases());
    run_all(world::install, world::reset, &cases);
}

/// With 30% of the split to the remote region, each of 3,000 flows goes exactly where its
/// region point says, the share is 30% within what chance allows, established flows stay with
/// the remote region, and when it goes down they come back to this region.
#[test]
fn a_partial_split_follows_each_flows_region_point() {
    xlb_tests::fixture::pin_to_current_cpu();
    let mut b = Balancer::load_with(lb_userspace::loader::LoadOptions {
        flow_entries: xlb_tests::fixture::FIXTURE_FLOW_ENTRIES,
    })
    .expect("loading the balancer object (run as root)");
    world::install(&mut b);
    let remote_share = REGION_SCALE * 3 / 10;
    failed_over(remote_share, true, 0)(&mut b);
    let local_upto = REGION_SCALE - remote_share;
    let flows = 3000u16;
    let mut remote = 0;
    for sport in 10_000..10_000 + flows {
        let key = world::key_v4(VIP, sport, 80, proto::TCP);
        let (action, out) = send(&b, &frames::tcp4(VIP, sport, 80, true, b""));
        assert_eq!(action, XdpAction::Tx, "flow {sport}");
        let to_remote = out[30..34] == REMOTE.addr[..4];
        let expected_remote = region_point(flow_hash(&key)) >= local_upto;
        assert_eq!(
            to_remote, expected_remote,
            "flow {sport}: region point disagrees"
        );
        if to_remote {
            remote += 1;
            // Its next packet follows the connection table to the same region.
            let (_, next) = send(&b, &frames::tcp4(VIP, sport, 80, false, b"x"));
            assert_eq!(next[30..34], REMOTE.addr[..4], "flow {sport} stays remote");
        }
    }
    let share = remote as f64 / flows as f64;
    assert!(
        (share - 0.3).abs() < 0.03,
        "remote share {share:.3} of {flows} flows, expected 0.30"
    );
    // The remote region goes down: its established flows come back to this region.
    b.set_backend(REMOTE.id, &remote_entry(false))
        .expect("down");
    let moved = (10_000..10_000 + flows)
        .filter(|&sport| {
            let key = world::key_v4(VIP, sport, 80, proto::TCP);
            region_point(flow_hash(&key)) >= local_upto
        })
        .take(50)
        .all(|sport| {
            let (_, out) = send(&b, &frames::tcp4(VIP, sport, 80, false, b"y"));
            out[30..34] == B1.addr[..4]
        });
    assert!(
        moved,
        "flows of a region that went down are re-selected in this region"
    );
}
