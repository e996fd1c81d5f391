//! Deterministic frame generation for the differential test: a small seeded PRNG, well-formed
//! frames of every kind the balancer handles (built with [`crate::frames`] and edited at named
//! offsets), and mutations of them (bit flips, truncation, bad lengths, versions, protocols).
//!
//! Everything is a pure function of the seed, so a failing frame can be regenerated.

use lb_common::types::proto;

use crate::{
    frames::{self, CLIENT_V4, CLIENT_V6, L3, VIP_V6},
    world,
};

/// SplitMix64: tiny, fast, and good enough to spread test inputs; not for anything else.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` percent.
    pub fn percent(&mut self, p: u32) -> bool {
        self.below(100) < p as usize
    }

    /// One of `items` (non-empty), uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// A random 16-bit value.
    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// A generated frame and the name of the generator (or mutation) that made it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Short name of what was built ("tcp4", "frag6-later", "mut:truncate", ...).
    pub kind: &'static str,
    /// The frame, from the Ethernet header on.
    pub bytes: Vec<u8>,
}

/// A router sending ICMP errors.
pub const ROUTER_V4: [u8; 4] = [192, 0, 2, 1];
/// A router sending ICMPv6 errors.
pub const ROUTER_V6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// An IPv4 address with no VIP.
pub const NOT_VIP_V4: [u8; 4] = [198, 51, 100, 99];
/// An IPv6 address with no VIP.
pub const NOT_VIP_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];

/// Client ports: a small pool, so flows repeat and the connection table is exercised.
pub const CLIENT_PORTS: [u16; 12] = [
    40000, 40001, 40002, 40003, 40004, 40005, 40006, 40007, 40008, 40009, 40010, 40011,
];

fn v4(k: &lb_common::types::VipKey) -> [u8; 4] {
    [k.addr[0], k.addr[1], k.addr[2], k.addr[3]]
}

/// IPv4 destinations: every VIP address of the world (several twice, to weight them), one
/// address of the VIP range without a VIP and one outside it.
fn v4_dsts() -> [[u8; 4]; 10] {
    [
        v4(&world::V_TCP.key),
        v4(&world::V_TCP.key),
        v4(&world::V_ALLPORTS.key),
        v4(&world::V_L2.key),
        v4(&world::V_L7.key),
        v4(&world::V_EMPTY.key),
        v4(&world::V_PAIR.key),
        v4(&world::V_PAIR.key),
        [203, 0, 113, 16],
        NOT_VIP_V4,
    ]
}

const V6_DSTS: [[u8; 16]; 3] = [VIP_V6, VIP_V6, NOT_VIP_V6];

/// Destination ports: the world's VIP ports (weighted) and some that are not.
const DST_PORTS: [u16; 8] = [80, 80, 80, 53, 53, 443, 22, 8080];

const IPV4_FRAG_IDS: [u16; 3] = [0x4242, 0x4243, 0x4244];
const IPV6_FRAG_IDS: [u32; 3] = [7, 8, 0xdead_beef];

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_FLAGS: [u8; 10] = [
    TCP_SYN,
    TCP_SYN,
    TCP_SYN,
    TCP_ACK,
    TCP_ACK,
    TCP_ACK,
    TCP_ACK | 0x08,    // PSH ACK
    TCP_SYN | TCP_ACK, // SYN ACK
    TCP_ACK | 0x01,    // FIN ACK
    0x04,              // RST
];

fn dst_port(rng: &mut Rng) -> u16 {
    if rng.percent(4) {
        rng.u16()
    } else {
        rng.pick(&DST_PORTS)
    }
}

fn small_payload(rng: &mut Rng) -> Vec<u8> {
    let n = rng.range(0, 32);
    rng.bytes(n)
}

/// Sets the TCP flags of an untagged frame whose TCP header starts at `l4`.
fn set_tcp_flags(frame: &mut [u8], l4: usize, flags: u8) {
    frame[l4 + 13] = flags;
}

/// Clears IPv4 DF in an untagged frame (fragment field 0), fixing the header checksum.
fn clear_df(frame: &mut [u8]) {
    frames::set_ipv4_fragment(frame, false, 0);
    frames::fix_ipv4_checksum(frame);
}

/// An IPv4 TCP segment from the client (random flags, port from the pool).
fn tcp4(rng: &mut Rng, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut f = frames::tcp4(dst, rng.pick(&CLIENT_PORTS), dst_port(rng), true, payload);
    set_tcp_flags(&mut f, L3 + 20, rng.pick(&TCP_FLAGS));
    f
}

/// An IPv6 TCP segment from the client.
fn tcp6(rng: &mut Rng, dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut f = frames::tcp6(dst, rng.pick(&CLIENT_PORTS), dst_port(rng), true, payload);
    set_tcp_flags(&mut f, L3 + 40, rng.pick(&TCP_FLAGS));
    f
}

fn udp4(rng: &mut Rng, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    frames::udp4(dst, rng.pick(&CLIENT_PORTS), dst_port(rng), payload)
}

fn udp6(rng: &mut Rng, dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    frames::udp6(dst, rng.pick(&CLIENT_PORTS), dst_port(rng), payload)
}

/// The IPv4 packet a VIP side sent to the client (what routers quote): header of `ihl_words`,
/// then `vport -> cport` and more bytes of protocol `p`.
fn quoted_v4(rng: &mut Rng, vip: [u8; 4], p: u8, ihl_words: usize) -> Vec<u8> {
    let hl = ihl_words * 4;
    let mut q = vec![0u8; hl];
    q[0] = 0x40 | ihl_words as u8;
    q[2..4].copy_from_slice(&((hl + 28) as u16).to_be_bytes());
    q[6] = 0x40;
    q[8] = 63;
    q[9] = p;
    q[12..16].copy_from_slice(&vip);
    q[16..20].copy_from_slice(&CLIENT_V4);
    for b in q.iter_mut().skip(20) {
        *b = 1; // NOP options
    }
    q.extend_from_slice(&rng.pick(&DST_PORTS).to_be_bytes());
    q.extend_from_slice(&rng.pick(&CLIENT_PORTS).to_be_bytes());
    q.extend(rng.bytes(24));
    q
}

/// The IPv6 packet a VIP side sent to the client: fixed header, `vport -> cport`, more bytes.
fn quoted_v6(rng: &mut Rng, vip: [u8; 16], p: u8) -> Vec<u8> {
    let mut q = vec![0x60, 0, 0, 0, 0, 60, p, 63];
    q.extend_from_slice(&vip);
    q.extend_from_slice(&CLIENT_V6);
    q.extend_from_slice(&rng.pick(&DST_PORTS).to_be_bytes());
    q.extend_from_slice(&rng.pick(&CLIENT_PORTS).to_be_bytes());
    q.extend(rng.bytes(56));
    q
}

fn icmp4_error(rng: &mut Rng) -> Vec<u8> {
    let dsts = v4_dsts();
    let vip = rng.pick(&dsts);
    let to = if rng.percent(85) {
        vip
    } else {
        rng.pick(&dsts)
    };
    let p = rng.pick(&[proto::TCP, proto::TCP, proto::UDP, proto::ICMP]);
    let ihl_words = if rng.percent(15) { rng.range(6, 8) } else { 5 };
    let full = quoted_v4(rng, vip, p, ihl_words);
    let min = ihl_words * 4 + 8;
    let len = if rng.percent(75) {
        rng.range(min, full.len())
    } else {
        rng.range(0, min - 1)
    };
    let (t, code) = match rng.below(10) {
        0..=6 => (3, rng.range(0, 5) as u8),
        7 | 8 => (11, rng.range(0, 1) as u8),
        _ => (rng.pick(&[0u8, 4, 5, 12]), 0),
    };
    let rest = if t == 3 && code == 4 {
        [0, 0, 0x05, 0x78]
    } else {
        [0; 4]
    };
    frames::icmp4_error(ROUTER_V4, to, t, code, rest, &full[..len])
}

fn icmp6_error(rng: &mut Rng) -> Vec<u8> {
    let vip = rng.pick(&V6_DSTS);
    let to = if rng.percent(85) {
        vip
    } else {
        rng.pick(&V6_DSTS)
    };
    let p = rng.pick(&[proto::TCP, proto::TCP, proto::UDP, proto::ICMPV6]);
    let full = quoted_v6(rng, vip, p);
    let len = if rng.percent(70) {
        rng.range(48, full.len())
    } else {
        rng.range(0, 47)
    };
    let (t, code) = match rng.below(10) {
        0..=3 => (1, rng.range(0, 4) as u8),
        4..=6 => (2, 0),
        7 | 8 => (3, rng.range(0, 1) as u8),
        _ => (rng.pick(&[4u8, 129, 135]), 0),
    };
    let rest = if t == 2 { [0, 0, 0x05, 0x00] } else { [0; 4] };
    frames::icmp6_error(ROUTER_V6, to, t, code, rest, &full[..len])
}

/// An IPv6 extension header of a random kind and length (never a fragment header).
fn random_ext(rng: &mut Rng) -> (u8, Vec<u8>) {
    match rng.pick(&[0u8, 43, 60, 51]) {
        51 => (51, frames::ext_ah(rng.range(1, 4) as u8)),
        t => (t, frames::ext_8n(rng.range(0, 2) as u8)),
    }
}

fn with_random_exts(rng: &mut Rng, mut f: Vec<u8>, n: usize) -> Vec<u8> {
    for _ in 0..n {
        let (t, e) = random_ext(rng);
        f = frames::with_ipv6_ext(&f, t, &e);
    }
    f
}

fn frag4(rng: &mut Rng, first: bool) -> Vec<u8> {
    let dsts = v4_dsts();
    let dst = rng.pick(&dsts);
    let udp = rng.percent(60);
    let id = rng.pick(&IPV4_FRAG_IDS);
    let big = rng.percent(8);
    let payload_len = if big {
        rng.range(1430, 1480)
    } else {
        rng.range(16, 64)
    };
    let payload = rng.bytes(payload_len);
    let mut f = if udp {
        udp4(rng, dst, &payload)
    } else {
        tcp4(rng, dst, &payload)
    };
    frames::set_ipv4_id(&mut f, id);
    if first {
        frames::set_ipv4_fragment(&mut f, true, 0);
    } else {
        frames::set_ipv4_fragment(&mut f, rng.percent(50), rng.range(1, 185) as u16);
    }
    if big && rng.percent(30) {
        f[L3 + 6] |= 0x40; // DF on a fragment: only a mutated sender does this
    }
    frames::fix_ipv4_checksum(&mut f);
    f
}

fn frag6(rng: &mut Rng, first: bool) -> Vec<u8> {
    let dst = rng.pick(&V6_DSTS);
    let id = rng.pick(&IPV6_FRAG_IDS);
    let big = rng.percent(8);
    let payload_len = if big {
        rng.range(1400, 1450)
    } else {
        rng.range(16, 64)
    };
    let payload = rng.bytes(payload_len);
    let base = if rng.percent(60) {
        udp6(rng, dst, &payload)
    } else {
        tcp6(rng, dst, &payload)
    };
    let ext = if first {
        frames::ext_fragment(0, true, id)
    } else {
        frames::ext_fragment(rng.range(1, 180) as u16, rng.percent(50), id)
    };
    let f = frames::with_ipv6_ext(&base, 44, &ext);
    // Sometimes a per-fragment header before the fragment header.
    if rng.percent(25) {
        with_random_exts(rng, f, 1)
    } else {
        f
    }
}

/// A frame sized so the IP packet is around the egress MTU minus each outer header.
fn mtu_sized(rng: &mut Rng) -> Vec<u8> {
    let ip_len = rng.range(1440, 1500);
    if rng.percent(60) {
        let dsts = v4_dsts();
        let dst = rng.pick(&dsts);
        let mut f = if rng.percent(60) {
            tcp4(rng, dst, &vec![0x5a; ip_len - 40])
        } else {
            udp4(rng, dst, &vec![0x5a; ip_len - 28])
        };
        if rng.percent(35) {
            clear_df(&mut f);
        }
        f
    } else {
        let dst = rng.pick(&V6_DSTS);
        if rng.percent(60) {
            tcp6(rng, dst, &vec![0x5a; ip_len - 60])
        } else {
            udp6(rng, dst, &vec![0x5a; ip_len - 48])
        }
    }
}

fn echo(rng: &mut Rng, v6: bool) -> Vec<u8> {
    let mut f = if v6 {
        frames::icmp6_echo(rng.pick(&V6_DSTS))
    } else {
        let dsts = v4_dsts();
        frames::icmp4_echo(rng.pick(&dsts))
    };
    let l4 = if v6 { L3 + 40 } else { L3 + 20 };
    match rng.below(10) {
        0 => f[l4 + 1] = 1, // a code echo requests do not have
        1 => {
            f[l4] = rng.pick(if v6 {
                &[129u8, 135, 136]
            } else {
                &[0u8, 13, 17]
            })
        }
        _ => {}
    }
    f
}

fn non_ip(rng: &mut Rng) -> Vec<u8> {
    if rng.percent(50) {
        frames::arp_request()
    } else {
        let mut f = frames::arp_request();
        f[12..14].copy_from_slice(&0x88ccu16.to_be_bytes()); // LLDP
        f
    }
}

/// Inserts VLAN tags (`tpids`, outermost first) after the MAC addresses.
pub fn with_tags(frame: &[u8], tpids: &[u16], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for t in tpids {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

fn tag(rng: &mut Rng, frame: Vec<u8>) -> (Vec<u8>, usize) {
    let n = match rng.below(100) {
        0..=59 => 0,
        60..=84 => 1,
        85..=97 => 2,
        _ => 3,
    };
    let tpids: Vec<u16> = (0..n).map(|_| rng.pick(&[0x8100u16, 0x88a8])).collect();
    let vid = rng.range(1, 4094) as u16;
    (with_tags(&frame, &tpids, vid), n)
}

/// A well-formed frame of a random kind (0-2 VLAN tags, now and then 3), to a random mix of
/// VIP and non-VIP addresses and ports, from the pooled client ports.
pub fn valid(rng: &mut Rng) -> Frame {
    let dsts = v4_dsts();
    let (kind, untagged) = match rng.below(100) {
        0..=13 => {
            let p = small_payload(rng);
            let dst = rng.pick(&dsts);
            ("tcp4", tcp4(rng, dst, &p))
        }
        14..=21 => {
            let p = small_payload(rng);
            let dst = rng.pick(&V6_DSTS);
            ("tcp6", tcp6(rng, dst, &p))
        }
        22..=29 => {
            let p = small_payload(rng);
            let dst = rng.pick(&dsts);
            ("udp4", udp4(rng, dst, &p))
        }
        30..=34 => {
            let p = small_payload(rng);
            let dst = rng.pick(&V6_DSTS);
            ("udp6", udp6(rng, dst, &p))
        }
        35..=38 => ("echo4", echo(rng, false)),
        39..=41 => ("echo6", echo(rng, true)),
        42..=49 => ("icmp4-error", icmp4_error(rng)),
        50..=55 => ("icmp6-error", icmp6_error(rng)),
        56..=62 => {
            let p = small_payload(rng);
            let dst = rng.pick(&V6_DSTS);
            let base = if rng.percent(60) {
                tcp6(rng, dst, &p)
            } else {
                udp6(rng, dst, &p)
            };
            let n = rng.range(1, 8);
            ("ipv6-ext", with_random_exts(rng, base, n))
        }
        63..=67 => ("frag4-first", frag4(rng, true)),
        68..=73 => ("frag4-later", frag4(rng, false)),
        74..=77 => ("frag6-first", frag6(rng, true)),
        78..=82 => ("frag6-later", frag6(rng, false)),
        83..=87 => {
            let words = rng.range(1, 10);
            let mut f = frames::tcp_v4_with_options(words, rng.pick(&CLIENT_PORTS), 80);
            set_tcp_flags(&mut f, L3 + 20 + 4 * words, rng.pick(&TCP_FLAGS));
            frames::fix_ipv4_checksum(&mut f);
            ("ipv4-options", f)
        }
        88..=95 => ("mtu-sized", mtu_sized(rng)),
        _ => ("non-ip", non_ip(rng)),
    };
    let untagged = if rng.percent(20) {
        frames::pad_to_min(untagged)
    } else {
        untagged
    };
    let (bytes, tags) = tag(rng, untagged);
    Frame {
        kind: if tags == 3 { "vlan-3" } else { kind },
        bytes,
    }
}

/// The offset of the IP header: after up to two VLAN tags (as the balancer counts them).
pub fn l3_offset(frame: &[u8]) -> usize {
    let tpid = |off: usize| {
        frame
            .get(off..off + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .is_some_and(|t| t == 0x8100 || t == 0x88a8)
    };
    if !tpid(12) {
        14
    } else if !tpid(16) {
        18
    } else {
        22
    }
}

/// Protocol numbers mutations pick from: the handled ones, extension headers, and others.
const PROTOS: [u8; 16] = [0, 1, 4, 6, 6, 17, 17, 41, 43, 44, 47, 50, 51, 58, 60, 255];

/// One mutation of `frame`, named. The result is at least 14 bytes (an Ethernet header: the
/// kernel's test run refuses shorter frames).
pub fn mutate(rng: &mut Rng, frame: &[u8]) -> Frame {
    let mut f = frame.to_vec();
    let l3 = l3_offset(&f);
    let v4 = f.get(l3).is_some_and(|b| b >> 4 == 4);
    let header_end = f.len().min(l3 + 110);
    let kind = match rng.below(13) {
        0 => {
            for _ in 0..rng.range(1, 3) {
                let i = rng.below(header_end);
                f[i] ^= 1 << rng.below(8);
            }
            "mut:bit-flip"
        }
        1 => {
            for _ in 0..rng.range(1, 2) {
                let i = rng.below(header_end);
                f[i] = rng.byte();
            }
            "mut:byte"
        }
        2 | 3 if f.len() > 14 => {
            let len = rng.range(14, f.len() - 1);
            f.truncate(len);
            "mut:truncate"
        }
        4 => {
            if let Some(b) = f.get_mut(l3) {
                *b = (*b & 0xf0) | rng.below(16) as u8;
            }
            "mut:ihl"
        }
        5 => {
            if let Some(b) = f.get_mut(l3) {
                *b = (*b & 0x0f) | ((rng.pick(&[0u8, 4, 4, 5, 6, 6, 7, 15])) << 4);
            }
            "mut:version"
        }
        6 | 7 => {
            // IPv4 total length or IPv6 payload length: off by a little, or anything.
            let off = if v4 { l3 + 2 } else { l3 + 4 };
            if let Some(b) = f.get_mut(off..off + 2) {
                let cur = u16::from_be_bytes([b[0], b[1]]);
                let new = match rng.below(4) {
                    0 => rng.u16(),
                    1 => 0,
                    _ => cur.wrapping_add(rng.range(0, 16) as u16).wrapping_sub(8),
                };
                b.copy_from_slice(&new.to_be_bytes());
            }
            "mut:ip-length"
        }
        8 => {
            let off = if v4 { l3 + 9 } else { l3 + 6 };
            if let Some(b) = f.get_mut(off) {
                *b = rng.pick(&PROTOS);
            }
            "mut:protocol"
        }
        9 => {
            if v4 {
                if let Some(b) = f.get_mut(l3 + 6..l3 + 8) {
                    b[0] = rng.byte();
                    b[1] = rng.byte();
                }
            } else if let Some(b) = f.get_mut(l3 + 40..l3 + 44) {
                // The first extension header's next-header / length, or its fragment field.
                let i = rng.below(4);
                b[i] = rng.byte();
            }
            "mut:frag-or-ext"
        }
        10 => {
            if let Some(b) = f.get_mut(l3 - 2..l3) {
                let t: u16 = rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x1234]);
                b.copy_from_slice(&t.to_be_bytes());
            }
            "mut:ethertype"
        }
        11 => {
            let n = rng.range(1, 40);
            f.extend(rng.bytes(n));
            "mut:trailing-bytes"
        }
        _ => {
            // Bytes after the first 28 of the IP packet: ICMP quotes, TCP flags, ports.
            let lo = (l3 + 20).min(f.len() - 1);
            let hi = f.len().min(l3 + 110);
            for _ in 0..rng.range(1, 3) {
                let i = rng.range(lo, hi.max(lo + 1) - 1);
                f[i] = rng.byte();
            }
            "mut:l4-bytes"
        }
    };
    Frame { kind, bytes: f }
}

/// Base frames for the exhaustive truncation sweep: one of each header layout.
pub fn truncation_bases(rng: &mut Rng) -> Vec<Frame> {
    let vip = v4(&world::V_TCP.key);
    let mut tagged_tcp = frames::tcp4(vip, 40000, 80, true, b"");
    tagged_tcp = with_tags(&tagged_tcp, &[0x88a8, 0x8100], 5);
    let mut opt = frames::tcp_v4_with_options(3, 40001, 80);
    frames::fix_ipv4_checksum(&mut opt);
    let ext6 = with_random_exts(rng, frames::udp6(VIP_V6, 40002, 53, b"q"), 3);
    let err4 = frames::icmp4_error(
        ROUTER_V4,
        vip,
        3,
        4,
        [0, 0, 5, 0x78],
        &quoted_v4(rng, vip, proto::TCP, 5)[..28],
    );
    let err6 = frames::icmp6_error(
        ROUTER_V6,
        VIP_V6,
        2,
        0,
        [0, 0, 5, 0],
        &quoted_v6(rng, VIP_V6, proto::TCP)[..48],
    );
    let later6 = frames::with_ipv6_ext(
        &frames::udp6(VIP_V6, 1, 2, &[7; 16]),
        44,
        &frames::ext_fragment(3, false, 7),
    );
    let mut later4 = frames::udp4(v4(&world::V_UDP.key), 1, 2, &[7; 16]);
    frames::set_ipv4_fragment(&mut later4, false, 5);
    frames::set_ipv4_id(&mut later4, IPV4_FRAG_IDS[0]);
    frames::fix_ipv4_checksum(&mut later4);
    vec![
        Frame {
            kind: "tcp4 2 tags",
            bytes: tagged_tcp,
        },
        Frame {
            kind: "tcp4 options",
            bytes: opt,
        },
        Frame {
            kind: "udp6 ext chain",
            bytes: ext6,
        },
        Frame {
            kind: "icmp4 error",
            bytes: err4,
        },
        Frame {
            kind: "icmp6 error",
            bytes: err6,
        },
        Frame {
            kind: "echo6",
            bytes: with_tags(&frames::icmp6_echo(VIP_V6), &[0x8100], 9),
        },
        Frame {
            kind: "frag6 later",
            bytes: later6,
        },
        Frame {
            kind: "frag4 later",
            bytes: later4,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_frames() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..200 {
            let (fa, fb) = (valid(&mut a), valid(&mut b));
            assert_eq!((fa.kind, &fa.bytes), (fb.kind, &fb.bytes));
            let (ma, mb) = (mutate(&mut a, &fa.bytes), mutate(&mut b, &fb.bytes));
            assert_eq!((ma.kind, &ma.bytes), (mb.kind, &mb.bytes));
        }
    }

    #[test]
    fn mutations_keep_an_ethernet_header() {
        let mut rng = Rng::new(1);
        for _ in 0..2000 {
            let f = valid(&mut rng);
            assert!(f.bytes.len() >= 14, "{}", f.kind);
            let m = mutate(&mut rng, &f.bytes);
            assert!(m.bytes.len() >= 14, "{}", m.kind);
        }
    }

    #[test]
    fn l3_offset_counts_at_most_two_tags() {
        let f = frames::tcp4(NOT_VIP_V4, 1, 2, true, b"");
        assert_eq!(l3_offset(&f), 14);
        assert_eq!(l3_offset(&with_tags(&f, &[0x8100], 1)), 18);
        assert_eq!(l3_offset(&with_tags(&f, &[0x88a8, 0x8100], 1)), 22);
        assert_eq!(l3_offset(&with_tags(&f, &[0x88a8, 0x8100, 0x8100], 1)), 22);
    }
}
