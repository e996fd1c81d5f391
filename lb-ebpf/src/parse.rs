//! Header parsing: Ethernet with up to two VLAN tags, IPv4 (any IHL), IPv6 with a bounded walk
//! over extension headers, TCP, UDP, ICMP, ICMPv6. Every read goes through [`PacketReader`]; a
//! header that does not fit is counted, never read.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::XdpContext};
use aya_log_ebpf::warn;
use lb_common::{
    LogSite,
    counters::Counter,
    types::{FAMILY_V4, FAMILY_V6, FlowKey, proto},
};

use crate::{counters, log, reader::PacketReader};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IPv6 extension headers the walk steps over.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;
/// Most extension headers walked before the packet counts as malformed.
pub const MAX_IPV6_EXT: usize = 8;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_SYN: u8 = 0x02;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// What parsing decided when it did not produce a [`Packet`].
pub enum Stop {
    /// Not for the balancer (not IP, too many VLAN tags): hand to the host stack.
    Pass,
    /// Malformed: drop.
    Drop,
}

/// The parsed headers of one IP packet.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Packet {
    // Offsets and lengths are stored in the narrowest unsigned type that holds them: a value
    // loaded back from the scratch map is then bounded for the verifier (a u64 would not be).
    /// Number of VLAN tags (0..=2).
    pub vlans: u8,
    /// Offset of the IP header.
    pub l3: u16,
    /// Offset of the L4 header (after IPv4 options or IPv6 extension headers).
    pub l4: u16,
    /// Length of the IP packet (IPv4 total length; IPv6 40 + payload length).
    pub ip_len: u32,
    /// IPv4 TOS / IPv6 traffic class (DSCP and ECN).
    pub tos: u8,
    /// IPv4 don't-fragment bit (always true for IPv6, which routers never fragment).
    pub dont_fragment: bool,
    /// A fragment with offset > 0: it holds no L4 header, and `sport`/`dport` are zero.
    pub later_fragment: bool,
    /// Part of a fragmented datagram (first or later fragment).
    pub fragmented: bool,
    /// The datagram's fragment identification (IPv4: 16 bits; IPv6: 32 bits), if fragmented.
    pub frag_id: u32,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP / ICMPv6 type (0 for other protocols).
    pub icmp_type: u8,
    /// ICMP / ICMPv6 code.
    pub icmp_code: u8,
    /// The flow: addresses, ports (0 without ports), L4 protocol (the last next-header of an
    /// IPv6 chain) and family.
    pub key: FlowKey,
    /// For an ICMP error about a VIP flow: that flow (client -> VIP), read from the quote.
    pub quoted: FlowKey,
}

impl Packet {
    /// Number of VLAN tags.
    #[inline(always)]
    pub fn vlans(&self) -> usize {
        self.vlans as usize
    }
    /// Offset of the IP header, as one of three constants (14, 18, 22) rather than a loaded
    /// value: packet writes at constant offsets are the ones LLVM keeps in a form the verifier
    /// can prove in bounds.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        match self.vlans {
            0 => 14,
            1 => 18,
            _ => 22,
        }
    }
    /// Offset of the L4 header.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4 as usize
    }
    /// Length of the IP packet.
    #[inline(always)]
    pub fn ip_len(&self) -> usize {
        self.ip_len as usize
    }
    /// ICMP in IPv4 or ICMPv6 in IPv6 (protocol 58 in IPv4, or 1 in IPv6, is neither).
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        (self.key.family == FAMILY_V4 && self.key.proto == proto::ICMP)
            || (self.key.family == FAMILY_V6 && self.key.proto == proto::ICMPV6)
    }
}

#[inline(always)]
fn be16(reader: &PacketReader, off: usize) -> Option<u16> {
    reader.read::<[u8; 2]>(off).map(u16::from_be_bytes)
}

/// Per-CPU scratch space for the parsed packet: a [`Packet`] is too large to copy around on the
/// 512-byte BPF stack, so parsing fills this slot in place and the rest of the program borrows it.
#[btf_map]
static XLB_SCRATCH: PerCpuArray<Packet, 1> = PerCpuArray::new();

/// This CPU's scratch [`Packet`]. Only one program runs per CPU at a time, so the slot is never
/// shared.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Packet> {
    let p = XLB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array slot; XDP programs are not preempted on their CPU.
    Some(unsafe { &mut *p })
}

/// Parses one frame layer by layer into `pkt`, bumping the counter of each layer it reached.
#[inline(always)]
pub fn parse(ctx: &XdpContext, reader: &PacketReader, pkt: &mut Packet) -> Result<(), Stop> {
    let Some(mut ether_type) = be16(reader, 12) else {
        counters::add(Counter::L2Truncated, 1);
        return Err(Stop::Drop);
    };
    let mut vlans = 0;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        vlans = 1;
        ether_type = be16(reader, 16).ok_or_else(truncated_l2)?;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            vlans = 2;
            ether_type = be16(reader, 20).ok_or_else(truncated_l2)?;
            if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
                counters::add(Counter::VlanTooMany, 1);
                return Err(Stop::Pass);
            }
        }
    }
    match vlans {
        1 => counters::add(Counter::Vlan1, 1),
        2 => counters::add(Counter::Vlan2, 1),
        _ => {}
    }
    let l3 = 14 + 4 * vlans;
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, reader, vlans, l3, pkt),
        ETH_P_IPV6 => parse_ipv6(ctx, reader, vlans, l3, pkt),
        _ => {
            counters::add(Counter::L3Other, 1);
            Err(Stop::Pass)
        }
    }
}

#[inline(always)]
fn truncated_l2() -> Stop {
    counters::add(Counter::L2Truncated, 1);
    Stop::Drop
}

#[inline(always)]
fn malformed_l3() -> Stop {
    counters::add(Counter::L3Malformed, 1);
    Stop::Drop
}

/// IPv4: the L4 offset comes from IHL; IHL < 5, a total length shorter than the header or longer
/// than the frame make the packet malformed.
#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    reader: &PacketReader,
    vlans: usize,
    l3: usize,
    pkt: &mut Packet,
) -> Result<(), Stop> {
    let Some(p) = reader.ptr_at::<[u8; 20]>(l3) else {
        return Err(malformed_l3());
    };
    // SAFETY: `ptr_at` proved the 20 bytes lie inside the frame; read in place, not copied.
    let h = unsafe { &*p };
    let version = h[0] >> 4;
    let ihl = (h[0] & 0x0f) as usize;
    let header_len = ihl * 4;
    let total_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if version != 4 || ihl < 5 || total_len < header_len || l3 + total_len > reader.len() {
        if log::allowed(LogSite::MalformedIpv4) {
            warn!(
                ctx,
                "malformed IPv4 header: version {} ihl {} total length {} frame length {}",
                version,
                ihl,
                total_len,
                reader.len()
            );
        }
        return Err(malformed_l3());
    }
    counters::add(Counter::L3Ipv4, 1);
    let frag = u16::from_be_bytes([h[6], h[7]]);
    pkt.vlans = vlans as u8;
    pkt.l3 = l3 as u16;
    pkt.l4 = (l3 + header_len) as u16;
    pkt.ip_len = total_len as u32;
    pkt.tos = h[1];
    pkt.dont_fragment = frag & 0x4000 != 0;
    // Later fragments start mid-datagram: what follows the header is payload, not ports.
    pkt.later_fragment = frag & 0x1fff != 0;
    pkt.fragmented = frag & 0x3fff != 0;
    pkt.frag_id = u16::from_be_bytes([h[4], h[5]]) as u32;
    pkt.key = FlowKey::default();
    pkt.key.proto = h[9];
    pkt.key.family = FAMILY_V4;
    pkt.key.src[..4].copy_from_slice(&h[12..16]);
    pkt.key.dst[..4].copy_from_slice(&h[16..20]);
    parse_l4(reader, pkt)
}

/// IPv6: the fixed header and its payload must fit the frame; extension headers are walked (at
/// most [`MAX_IPV6_EXT`]), each with its own length rule, and must end inside the payload.
#[inline(always)]
fn parse_ipv6(
    ctx: &XdpContext,
    reader: &PacketReader,
    vlans: usize,
    l3: usize,
    pkt: &mut Packet,
) -> Result<(), Stop> {
    let Some(p) = reader.ptr_at::<[u8; 40]>(l3) else {
        return Err(malformed_l3());
    };
    // SAFETY: `ptr_at` proved the 40 bytes lie inside the frame; read in place, not copied.
    let h = unsafe { &*p };
    let version = h[0] >> 4;
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
    let end = l3 + 40 + payload_len;
    if version != 6 || end > reader.len() {
        if log::allowed(LogSite::MalformedIpv6) {
            warn!(
                ctx,
                "malformed IPv6 header: version {} payload length {} frame length {}",
                version,
                payload_len,
                reader.len()
            );
        }
        return Err(malformed_l3());
    }
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut later_fragment = false;
    let mut fragmented = false;
    let mut frag_id = 0u32;
    let mut done = false;
    // One more round than headers allowed: the last round finds the upper-layer header.
    for _ in 0..=MAX_IPV6_EXT {
        match next {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let Some(e) = reader.read::<[u8; 2]>(off) else {
                    return Err(malformed_l3());
                };
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            NH_AH => {
                let Some(e) = reader.read::<[u8; 2]>(off) else {
                    return Err(malformed_l3());
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            NH_FRAGMENT => {
                let Some(e) = reader.read::<[u8; 8]>(off) else {
                    return Err(malformed_l3());
                };
                next = e[0];
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    later_fragment = true;
                }
                fragmented = true;
                frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                off += 8;
            }
            _ => {
                done = true;
                break;
            }
        }
        if off > end {
            return Err(malformed_l3());
        }
    }
    if !done {
        // A chain longer than the walk allows: no sane sender produces one.
        return Err(malformed_l3());
    }
    counters::add(Counter::L3Ipv6, 1);
    pkt.vlans = vlans as u8;
    pkt.l3 = l3 as u16;
    pkt.l4 = off as u16;
    pkt.ip_len = (40 + payload_len) as u32;
    pkt.tos = (h[0] << 4) | (h[1] >> 4);
    pkt.dont_fragment = true;
    pkt.later_fragment = later_fragment;
    pkt.fragmented = fragmented;
    pkt.frag_id = frag_id;
    pkt.key = FlowKey::default();
    pkt.key.proto = next;
    pkt.key.family = FAMILY_V6;
    pkt.key.src.copy_from_slice(&h[8..24]);
    pkt.key.dst.copy_from_slice(&h[24..40]);
    parse_l4(reader, pkt)
}

/// TCP, UDP and ICMP headers must lie inside both the frame and the IP packet.
#[inline(always)]
fn parse_l4(reader: &PacketReader, pkt: &mut Packet) -> Result<(), Stop> {
    pkt.tcp_flags = 0;
    pkt.icmp_type = 0;
    pkt.icmp_code = 0;
    if pkt.later_fragment {
        counters::add(Counter::L4Fragment, 1);
        return Ok(());
    }
    let l3_end = pkt.l3 as usize + pkt.ip_len as usize;
    let l4 = pkt.l4 as usize;
    match pkt.key.proto {
        proto::TCP => {
            let Some(t) = reader.read::<[u8; 14]>(l4) else {
                return Err(truncated_l4());
            };
            if l4 + 20 > l3_end || reader.ptr_at::<[u8; 20]>(l4).is_none() {
                return Err(truncated_l4());
            }
            pkt.key.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.key.dport_be = u16::from_ne_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            counters::add(Counter::L4Tcp, 1);
        }
        proto::UDP => {
            let Some(u) = reader.read::<[u8; 8]>(l4) else {
                return Err(truncated_l4());
            };
            if l4 + 8 > l3_end {
                return Err(truncated_l4());
            }
            pkt.key.sport_be = u16::from_ne_bytes([u[0], u[1]]);
            pkt.key.dport_be = u16::from_ne_bytes([u[2], u[3]]);
            counters::add(Counter::L4Udp, 1);
        }
        // ICMP belongs to IPv4 and ICMPv6 to IPv6; the other pairing is just "another protocol".
        proto::ICMP | proto::ICMPV6 if pkt.is_icmp() => {
            let Some(i) = reader.read::<[u8; 8]>(l4) else {
                return Err(truncated_l4());
            };
            if l4 + 8 > l3_end {
                return Err(truncated_l4());
            }
            pkt.icmp_type = i[0];
            pkt.icmp_code = i[1];
            counters::add(Counter::L4Other, 1);
        }
        _ => counters::add(Counter::L4Other, 1),
    }
    Ok(())
}

#[inline(always)]
fn truncated_l4() -> Stop {
    counters::add(Counter::L4Truncated, 1);
    Stop::Drop
}
