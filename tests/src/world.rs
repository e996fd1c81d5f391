//! The standard fixture world: one balancer configuration, a handful of backends and VIPs, and
//! builders of the exact frames the balancer must emit for them. Expected frames are built here
//! independently of the XDP code (outer checksums by etherparse), sharing only the documented
//! contract: the flow hash and the source-address rule from `lb-common`.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{Ipv4Header, Ipv6Header};
use lb_common::{
    flow::{flow_hash, source_v4, source_v6},
    types::{
        BACKEND_F_UP, Backend, FAMILY_V4, FAMILY_V6, FlowKey, LbConfig, VIP_F_DSR_L2, VIP_F_L7,
        VipKey, VipMeta, proto,
    },
};
use lb_userspace::{loader::Balancer, maglev};

use crate::frames::{LB_MAC, ROUTER_MAC};

/// Outer IPv4 source prefix (host bits from the flow hash).
pub const ENCAP_SRC_V4: [u8; 4] = [10, 255, 0, 0];
/// Its length.
pub const ENCAP_SRC_V4_PREFIX: u8 = 16;
/// Outer IPv6 source prefix.
pub const ENCAP_SRC_V6: [u8; 16] = [0xfd, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// Its length.
pub const ENCAP_SRC_V6_PREFIX: u8 = 112;
/// Egress MTU of the world.
pub const EGRESS_MTU: u16 = 1500;

/// A backend of the world.
#[derive(Debug, Clone, Copy)]
pub struct WorldBackend {
    /// Its id.
    pub id: u32,
    /// Its address: IPv4 in the first 4 bytes when `family == FAMILY_V4`.
    pub addr: [u8; 16],
    /// Its family.
    pub family: u8,
    /// Its MAC (for L2 DSR).
    pub mac: [u8; 6],
}

const fn v4(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// IPv4 backend 10.0.0.1.
pub const B1: WorldBackend = WorldBackend {
    id: 1,
    addr: v4([10, 0, 0, 1]),
    family: FAMILY_V4,
    mac: [0x02, 0, 0, 0, 0x01, 0x01],
};
/// IPv4 backend 10.0.0.2.
pub const B2: WorldBackend = WorldBackend {
    id: 2,
    addr: v4([10, 0, 0, 2]),
    family: FAMILY_V4,
    mac: [0x02, 0, 0, 0, 0x01, 0x02],
};
/// IPv6 backend fd00::3.
pub const B3: WorldBackend = WorldBackend {
    id: 3,
    addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
    family: FAMILY_V6,
    mac: [0x02, 0, 0, 0, 0x01, 0x03],
};
/// IPv6 backend fd00::4.
pub const B4: WorldBackend = WorldBackend {
    id: 4,
    addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4],
    family: FAMILY_V6,
    mac: [0x02, 0, 0, 0, 0x01, 0x04],
};

/// A VIP of the world.
#[derive(Debug, Clone, Copy)]
pub struct WorldVip {
    /// Its id.
    pub id: u32,
    /// Its key.
    pub key: VipKey,
    /// `VIP_F_*` flags.
    pub flags: u32,
    /// Backends in its table.
    pub backends: &'static [WorldBackend],
}

const fn vip4(
    id: u32,
    a: [u8; 4],
    port: u16,
    p: u8,
    flags: u32,
    b: &'static [WorldBackend],
) -> WorldVip {
    WorldVip {
        id,
        key: VipKey {
            addr: v4(a),
            port_be: port.to_be(),
            proto: p,
            family: FAMILY_V4,
        },
        flags,
        backends: b,
    }
}

const fn vip6(
    id: u32,
    a: [u8; 16],
    port: u16,
    p: u8,
    flags: u32,
    b: &'static [WorldBackend],
) -> WorldVip {
    WorldVip {
        id,
        key: VipKey {
            addr: a,
            port_be: port.to_be(),
            proto: p,
            family: FAMILY_V6,
        },
        flags,
        backends: b,
    }
}

/// 203.0.113.10:80/tcp -> B1 (IPIP).
pub const V_TCP: WorldVip = vip4(1, [203, 0, 113, 10], 80, proto::TCP, 0, &[B1]);
/// 203.0.113.10:53/udp -> B2 (IPIP).
pub const V_UDP: WorldVip = vip4(2, [203, 0, 113, 10], 53, proto::UDP, 0, &[B2]);
/// 203.0.113.11, every TCP port -> B3 (IPv4-in-IPv6).
pub const V_ALLPORTS: WorldVip = vip4(3, [203, 0, 113, 11], 0, proto::TCP, 0, &[B3]);
/// [2001:db8:2::10]:80/tcp -> B4 (IP6IP6).
pub const V6_TCP: WorldVip = vip6(4, crate::frames::VIP_V6, 80, proto::TCP, 0, &[B4]);
/// [2001:db8:2::10]:53/udp -> B1 (IPv6-in-IPv4).
pub const V6_UDP: WorldVip = vip6(5, crate::frames::VIP_V6, 53, proto::UDP, 0, &[B1]);
/// 203.0.113.12:80/tcp -> B2 by L2 DSR.
pub const V_L2: WorldVip = vip4(6, [203, 0, 113, 12], 80, proto::TCP, VIP_F_DSR_L2, &[B2]);
/// 203.0.113.13:443/tcp: L7 (passed to the host stack).
pub const V_L7: WorldVip = vip4(7, [203, 0, 113, 13], 443, proto::TCP, VIP_F_L7, &[B1]);
/// 203.0.113.14:80/tcp with no backend.
pub const V_EMPTY: WorldVip = vip4(8, [203, 0, 113, 14], 80, proto::TCP, 0, &[]);
/// 203.0.113.15:80/tcp -> B1 and B2 (Maglev decides).
pub const V_PAIR: WorldVip = vip4(9, [203, 0, 113, 15], 80, proto::TCP, 0, &[B1, B2]);

/// Every VIP of the world.
pub const VIPS: &[WorldVip] = &[
    V_TCP, V_UDP, V_ALLPORTS, V6_TCP, V6_UDP, V_L2, V_L7, V_EMPTY, V_PAIR,
];
/// Every backend of the world.
pub const BACKENDS: &[WorldBackend] = &[B1, B2, B3, B4];

/// Maglev table size used in fixtures (prime; small so set-up is fast).
pub const TABLE_SIZE: u32 = 251;

/// The world's balancer configuration.
pub fn config() -> LbConfig {
    LbConfig {
        lb_mac: LB_MAC,
        nexthop_mac: ROUTER_MAC,
        egress_mtu: EGRESS_MTU,
        encap_src_v4_prefix: ENCAP_SRC_V4_PREFIX,
        encap_src_v6_prefix: ENCAP_SRC_V6_PREFIX,
        encap_src_v4: ENCAP_SRC_V4,
        encap_src_v6: ENCAP_SRC_V6,
        _pad: [0; 4],
    }
}

/// The map entry of a world backend (up).
pub fn backend_entry(b: &WorldBackend) -> Backend {
    Backend {
        addr: b.addr,
        family: b.family,
        flags: BACKEND_F_UP,
        mac: b.mac,
        ..Default::default()
    }
}

/// The Maglev table of a set of backends (all weight 1).
pub fn table(backends: &[WorldBackend]) -> Vec<u32> {
    let input: Vec<maglev::MaglevBackend> = backends
        .iter()
        .map(|b| maglev::MaglevBackend {
            id: b.id,
            key: b.addr.to_vec(),
            weight: 1,
        })
        .collect();
    maglev::build(&input, TABLE_SIZE).expect("world table")
}

/// What [`install`] put in place, so [`reset`] can restore only what a case changed
/// (publishing a table costs an RCU grace period in the kernel, tens of milliseconds).
#[derive(Debug, Default)]
pub struct Installed {
    vips: Vec<(VipKey, VipMeta)>,
}

/// Installs the world into a freshly loaded balancer.
pub fn install(b: &mut Balancer) -> Installed {
    b.set_config(&config()).expect("config");
    for be in BACKENDS {
        b.set_backend(be.id, &backend_entry(be)).expect("backend");
    }
    let vips = VIPS
        .iter()
        .map(|v| {
            let meta = b
                .publish_vip(&v.key, v.id, v.flags, &table(v.backends))
                .expect("vip");
            (v.key, meta)
        })
        .collect();
    Installed { vips }
}

/// Brings the world back to what [`install`] made: config and backends rewritten, and every VIP
/// whose live entry differs from the recorded one republished with its world table.
pub fn reset(b: &mut Balancer, installed: &mut Installed) {
    b.set_config(&config()).expect("config");
    b.set_region_addrs(&[]).expect("region addresses");
    for be in BACKENDS {
        b.set_backend(be.id, &backend_entry(be)).expect("backend");
    }
    for (i, v) in VIPS.iter().enumerate() {
        let live = b.vip(&v.key).expect("vip lookup");
        if live != Some(installed.vips[i].1) {
            let meta = b
                .publish_vip(&v.key, v.id, v.flags, &table(v.backends))
                .expect("vip");
            installed.vips[i] = (v.key, meta);
        }
    }
}

/// The flow key of an IPv4 packet from the fixture client.
pub fn key_v4(dst: [u8; 4], sport: u16, dport: u16, p: u8) -> FlowKey {
    FlowKey {
        src: v4(crate::frames::CLIENT_V4),
        dst: v4(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: p,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The flow key of an IPv6 packet from the fixture client.
pub fn key_v6(dst: [u8; 16], sport: u16, dport: u16, p: u8) -> FlowKey {
    FlowKey {
        src: crate::frames::CLIENT_V6,
        dst,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: p,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

/// The frame the balancer must emit when it encapsulates `input` (with `vlans` tags) for
/// `backend`: new MACs (LB -> router), tags kept, an outer header of the backend's family, then
/// the inner IP packet and whatever trailed it unchanged.
pub fn encapsulated(input: &[u8], vlans: usize, key: &FlowKey, backend: &WorldBackend) -> Vec<u8> {
    let l3 = 14 + 4 * vlans;
    let inner = &input[l3..];
    let inner_v4 = inner[0] >> 4 == 4;
    let (ip_len, tos) = if inner_v4 {
        (u16::from_be_bytes([inner[2], inner[3]]) as usize, inner[1])
    } else {
        (
            40 + u16::from_be_bytes([inner[4], inner[5]]) as usize,
            (inner[0] << 4) | (inner[1] >> 4),
        )
    };
    let hash = flow_hash(key);
    let mut out = Vec::new();
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&input[12..12 + 4 * vlans]);
    let inner_proto = if inner_v4 { proto::IPIP } else { proto::IPV6 };
    if backend.family == FAMILY_V4 {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let src = source_v4(ENCAP_SRC_V4, ENCAP_SRC_V4_PREFIX, hash);
        let mut h = Ipv4Header::new(
            ip_len as u16,
            64,
            etherparse::IpNumber(inner_proto),
            src,
            [
                backend.addr[0],
                backend.addr[1],
                backend.addr[2],
                backend.addr[3],
            ],
        )
        .expect("outer v4");
        h.dont_fragment = false;
        h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
        h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
        h.header_checksum = h.calc_header_checksum();
        out.extend_from_slice(&h.to_bytes());
    } else {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        let src = source_v6(ENCAP_SRC_V6, ENCAP_SRC_V6_PREFIX, hash);
        let h = Ipv6Header {
            traffic_class: tos,
            flow_label: etherparse::Ipv6FlowLabel::try_new(hash & 0xf_ffff).expect("label"),
            payload_length: ip_len as u16,
            next_header: etherparse::IpNumber(inner_proto),
            hop_limit: 64,
            source: src,
            destination: backend.addr,
        };
        out.extend_from_slice(&h.to_bytes());
    }
    out.extend_from_slice(inner);
    out
}

/// The frame the balancer must emit for an L2 DSR VIP: MACs rewritten, nothing else.
pub fn l2_rewritten(input: &[u8], backend: &WorldBackend) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&backend.mac);
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

/// Printable address of a world backend (for messages).
pub fn addr_string(b: &WorldBackend) -> String {
    if b.family == FAMILY_V4 {
        Ipv4Addr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]).to_string()
    } else {
        Ipv6Addr::from(b.addr).to_string()
    }
}

/// The ICMP "fragmentation needed" reply the balancer must send for an IPv4 `input` (with
/// `vlans` tags) that does not fit: back to the sender's MAC, from the VIP, quoting the IP
/// header and 8 bytes, next-hop MTU `mtu`. Checksums by etherparse.
pub fn frag_needed(input: &[u8], vlans: usize, mtu: u16) -> Vec<u8> {
    let l3 = 14 + 4 * vlans;
    let ihl = (input[l3] & 0x0f) as usize * 4;
    let quote = &input[l3..l3 + ihl + 8];
    let src: [u8; 4] = input[l3 + 16..l3 + 20].try_into().unwrap();
    let dst: [u8; 4] = input[l3 + 12..l3 + 16].try_into().unwrap();
    let icmp = etherparse::Icmpv4Header::with_checksum(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ),
        quote,
    );
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        etherparse::IpNumber::ICMP,
        src,
        dst,
    )
    .expect("ip");
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&input[6..12]);
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&input[12..12 + 4 * vlans]);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}

/// The ICMPv6 "packet too big" reply for an IPv6 `input` that does not fit: quoting as much of
/// the packet as keeps the reply within 1280 bytes.
pub fn packet_too_big(input: &[u8], vlans: usize, mtu: u32) -> Vec<u8> {
    let l3 = 14 + 4 * vlans;
    let avail = (input.len() - l3) & !1;
    let quote = &input[l3..l3 + avail.min(1280 - 48)];
    let src: [u8; 16] = input[l3 + 24..l3 + 40].try_into().unwrap();
    let dst: [u8; 16] = input[l3 + 8..l3 + 24].try_into().unwrap();
    let icmp = etherparse::Icmpv6Header::with_checksum(
        etherparse::Icmpv6Type::PacketTooBig { mtu },
        src,
        dst,
        quote,
    )
    .expect("icmpv6");
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (8 + quote.len()) as u16,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: src,
        destination: dst,
    };
    let mut out = Vec::new();
    out.extend_from_slice(&input[6..12]);
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&input[12..12 + 4 * vlans]);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}
