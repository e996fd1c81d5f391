//! ICMP: the too-big replies the balancer writes itself ("fragmentation needed" for IPv4 with
//! DF, "packet too big" for IPv6) when a VIP packet would not fit the egress MTU once
//! encapsulated; echo replies for VIP addresses; and the classification of ICMP errors that
//! quote a VIP flow, which are forwarded to that flow's backend.
//!
//! The reply is built in place: the head grows by the new IP + ICMP headers, so the original
//! IP header (the start of the quote) is already where the quote belongs; the tail is then cut to
//! the quote's length. Only the new headers are written.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    csum::ipv4_header_checksum,
    types::{FAMILY_V4, FAMILY_V6, FlowKey, proto},
};

use crate::{counters, l2::L2, parse::Packet, reader::PacketReader};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Largest IPv6 packet an ICMPv6 error may be (RFC 4443 §2.4 (c)): the minimum IPv6 MTU.
const IPV6_MIN_MTU: usize = 1280;
/// Longest quote of an ICMPv6 packet-too-big: 1280 - 40 (IPv6) - 8 (ICMPv6).
const MAX_V6_QUOTE: usize = IPV6_MIN_MTU - 48;
/// Longest quote of an ICMPv4 error here: a 60-byte IPv4 header + 8 bytes.
const MAX_V4_QUOTE: usize = 68;

/// Turns the frame into a too-big error for its sender and returns XDP_TX (or a drop if the
/// frame cannot be reshaped). `mtu` is the largest inner packet the path takes.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, lb_mac: &[u8; 6], mtu: u16) -> u32 {
    let old = PacketReader::new(ctx);
    let Some(l2h) = L2::save(&old, pkt.vlans()) else {
        return xdp_action::XDP_ABORTED;
    };
    let v4 = pkt.key.family == FAMILY_V4;
    let added: usize = if v4 { 28 } else { 48 };
    let quote = if v4 {
        let ihl_len = pkt.l4() - pkt.l3();
        ihl_len + 8
    } else {
        let avail = old.len() - pkt.l3();
        if avail < MAX_V6_QUOTE {
            avail & !1
        } else {
            MAX_V6_QUOTE
        }
    };
    if quote > old.len() - pkt.l3() {
        counters::add(Counter::DropTooBig, 1);
        return xdp_action::XDP_DROP;
    }
    let l2 = pkt.l3();
    let new_len = l2 + added + quote;
    let old_len = old.len();

    // SAFETY: the helpers only move `data`/`data_end`; every later access re-derives bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(added as i32)) } != 0 {
        counters::add(Counter::DropAdjustFailed, 1);
        return xdp_action::XDP_DROP;
    }
    let delta = new_len as i32 - (old_len + added) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        counters::add(Counter::DropAdjustFailed, 1);
        return xdp_action::XDP_DROP;
    }
    let r = PacketReader::new(ctx);
    let ether_type = if v4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    // Back to the sender's MAC (the router that handed us the packet).
    if l2h.write(&r, l2h.src, *lb_mac, ether_type).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    let written = if v4 {
        write_frag_needed(&r, l2, pkt, mtu, quote)
    } else {
        write_packet_too_big(&r, l2, pkt, mtu, quote)
    };
    if !written {
        return xdp_action::XDP_ABORTED;
    }
    counters::add(Counter::IcmpTooBigSent, 1);
    xdp_action::XDP_TX
}

#[inline(always)]
fn write_frag_needed(r: &PacketReader, l2: usize, pkt: &Packet, mtu: u16, quote: usize) -> bool {
    let Some(p) = r.ptr_at::<[u8; 20]>(l2) else {
        return false;
    };
    // SAFETY: `ptr_at` proved the 20 bytes lie inside the frame.
    let h = unsafe { &mut *p };
    let total = ((20 + 8 + quote) as u16).to_be_bytes();
    *h = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        64,
        proto::ICMP,
        0,
        0,
        pkt.key.dst[0],
        pkt.key.dst[1],
        pkt.key.dst[2],
        pkt.key.dst[3],
        pkt.key.src[0],
        pkt.key.src[1],
        pkt.key.src[2],
        pkt.key.src[3],
    ];
    let c = ipv4_header_checksum(h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    let icmp = l2 + 20;
    let m = mtu.to_be_bytes();
    if r.write::<[u8; 8]>(icmp, [3, 4, 0, 0, 0, 0, m[0], m[1]])
        .is_none()
    {
        return false;
    }
    let Some(sum) = sum_words(r, icmp, 8 + quote, MAX_V4_QUOTE + 8) else {
        return false;
    };
    r.write(icmp + 2, fold(sum).to_be_bytes()).is_some()
}

#[inline(always)]
fn write_packet_too_big(r: &PacketReader, l2: usize, pkt: &Packet, mtu: u16, quote: usize) -> bool {
    let Some(p) = r.ptr_at::<[u8; 40]>(l2) else {
        return false;
    };
    // SAFETY: `ptr_at` proved the 40 bytes lie inside the frame.
    let h = unsafe { &mut *p };
    let payload = ((8 + quote) as u16).to_be_bytes();
    h[0] = 0x60;
    h[1] = 0;
    h[2] = 0;
    h[3] = 0;
    h[4] = payload[0];
    h[5] = payload[1];
    h[6] = proto::ICMPV6;
    h[7] = 64;
    h[8..24].copy_from_slice(&pkt.key.dst);
    h[24..40].copy_from_slice(&pkt.key.src);
    let icmp = l2 + 40;
    let m = (mtu as u32).to_be_bytes();
    if r.write::<[u8; 8]>(icmp, [2, 0, 0, 0, m[0], m[1], m[2], m[3]])
        .is_none()
    {
        return false;
    }
    // Pseudo-header: source, destination, upper-layer length, next header.
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 16 {
        sum += u16::from_be_bytes([pkt.key.dst[i], pkt.key.dst[i + 1]]) as u32;
        sum += u16::from_be_bytes([pkt.key.src[i], pkt.key.src[i + 1]]) as u32;
        i += 2;
    }
    sum += (8 + quote) as u32;
    sum += proto::ICMPV6 as u32;
    let Some(body) = sum_words(r, icmp, 8 + quote, MAX_V6_QUOTE + 8) else {
        return false;
    };
    r.write(icmp + 2, fold(sum + body).to_be_bytes()).is_some()
}

/// Sums `len` bytes (even) of the packet from `off` as big-endian 16-bit words, reading at most
/// `max` bytes so the verifier sees a bounded loop.
#[inline(always)]
fn sum_words(r: &PacketReader, off: usize, len: usize, max: usize) -> Option<u32> {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < max {
        if i >= len {
            break;
        }
        let w = r.read::<[u8; 2]>(off + i)?;
        sum += u16::from_be_bytes(w) as u32;
        i += 2;
    }
    Some(sum)
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it. Sums here stay below
/// 2^22, so two folds leave no carry.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// What to do with an ICMP / ICMPv6 packet.
pub enum IcmpAction {
    /// An echo request to a VIP address: answer it.
    EchoReply,
    /// Not about a VIP: hand to the host stack.
    Pass,
    /// Malformed (counted): drop.
    Drop,
    /// An error quoting a VIP flow: send it to that flow's backend. The flow (client -> VIP) is
    /// in [`Packet::quoted`].
    Forward,
}

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// Classifies an ICMP packet to a VIP address (see [`IcmpAction`]); the caller has checked
/// that the destination is one.
#[inline(always)]
pub fn classify(reader: &PacketReader, pkt: &mut Packet) -> IcmpAction {
    let v4 = pkt.key.family == FAMILY_V4;
    if v4 {
        match pkt.icmp_type {
            ICMP_ECHO_REQUEST if pkt.icmp_code == 0 => IcmpAction::EchoReply,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => quoted_flow_v4(reader, pkt),
            _ => IcmpAction::Pass,
        }
    } else {
        match pkt.icmp_type {
            ICMPV6_ECHO_REQUEST if pkt.icmp_code == 0 => IcmpAction::EchoReply,
            ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED => {
                quoted_flow_v6(reader, pkt)
            }
            _ => IcmpAction::Pass,
        }
    }
}

#[inline(always)]
fn quote_short() -> IcmpAction {
    counters::add(Counter::DropIcmpQuoteShort, 1);
    IcmpAction::Drop
}

/// The quote of an ICMPv4 error is the IP header and at least 8 bytes of the packet the VIP side
/// sent (VIP -> client); the flow is that packet's, reversed.
#[inline(always)]
fn quoted_flow_v4(reader: &PacketReader, pkt: &mut Packet) -> IcmpAction {
    let q = pkt.l4() + 8;
    let end = pkt.l3() + pkt.ip_len();
    let Some(p) = reader.ptr_at::<[u8; 20]>(q) else {
        return quote_short();
    };
    // SAFETY: `ptr_at` proved the 20 bytes lie inside the frame.
    let qh = unsafe { &*p };
    let qihl = (qh[0] & 0x0f) as usize * 4;
    if q + 20 > end || qihl < 20 || q + qihl + 8 > end {
        return quote_short();
    }
    let Some(ports) = reader.read::<[u8; 4]>(q + qihl) else {
        return quote_short();
    };
    let proto = qh[9];
    if proto != proto::TCP && proto != proto::UDP {
        return IcmpAction::Pass;
    }
    let flow = &mut pkt.quoted;
    *flow = FlowKey::default();
    flow.sport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    flow.dport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    flow.proto = proto;
    flow.family = FAMILY_V4;
    flow.src[..4].copy_from_slice(&qh[16..20]);
    flow.dst[..4].copy_from_slice(&qh[12..16]);
    IcmpAction::Forward
}

/// As [`quoted_flow_v4`], for an ICMPv6 error quoting an IPv6 header (no extension headers in
/// the quote: the VIP side sends none).
#[inline(always)]
fn quoted_flow_v6(reader: &PacketReader, pkt: &mut Packet) -> IcmpAction {
    let q = pkt.l4() + 8;
    let end = pkt.l3() + pkt.ip_len();
    let Some(p) = reader.ptr_at::<[u8; 48]>(q) else {
        return quote_short();
    };
    if q + 48 > end {
        return quote_short();
    }
    // SAFETY: `ptr_at` proved the 48 bytes lie inside the frame.
    let qh = unsafe { &*p };
    let proto = qh[6];
    if proto != proto::TCP && proto != proto::UDP {
        return IcmpAction::Pass;
    }
    let flow = &mut pkt.quoted;
    *flow = FlowKey::default();
    flow.sport_be = u16::from_ne_bytes([qh[42], qh[43]]);
    flow.dport_be = u16::from_ne_bytes([qh[40], qh[41]]);
    flow.proto = proto;
    flow.family = FAMILY_V6;
    flow.src.copy_from_slice(&qh[24..40]);
    flow.dst.copy_from_slice(&qh[8..24]);
    IcmpAction::Forward
}

/// Answers an echo request to a VIP address in place: MACs and addresses swapped, TTL / hop
/// limit 64, type changed to echo reply; checksums updated incrementally (RFC 1624).
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, pkt: &Packet, lb_mac: &[u8; 6]) -> u32 {
    let r = PacketReader::new(ctx);
    let Some(peer) = r.read::<[u8; 6]>(6) else {
        return xdp_action::XDP_ABORTED;
    };
    if r.write(0, peer).is_none() || r.write(6, *lb_mac).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    let l3 = pkt.l3();
    let l4 = pkt.l4();
    if pkt.key.family == FAMILY_V4 {
        let Some(p) = r.ptr_at::<[u8; 20]>(l3) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: `ptr_at` proved the 20 bytes lie inside the frame.
        let h = unsafe { &mut *p };
        let old_ttl_word = u16::from_be_bytes([h[8], h[9]]);
        h[8] = 64;
        let new_ttl_word = u16::from_be_bytes([h[8], h[9]]);
        let c = csum_replace(
            u16::from_be_bytes([h[10], h[11]]),
            old_ttl_word,
            new_ttl_word,
        );
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let src = [h[12], h[13], h[14], h[15]];
        h.copy_within(16..20, 12);
        h[16..20].copy_from_slice(&src);
        let Some(ip) = r.ptr_at::<[u8; 4]>(l4) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: as above, 4 bytes of the ICMP header.
        let i = unsafe { &mut *ip };
        let old = u16::from_be_bytes([i[0], i[1]]);
        i[0] = 0; // echo reply
        let c = csum_replace(
            u16::from_be_bytes([i[2], i[3]]),
            old,
            u16::from_be_bytes([i[0], i[1]]),
        );
        i[2..4].copy_from_slice(&c.to_be_bytes());
    } else {
        let Some(p) = r.ptr_at::<[u8; 40]>(l3) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: `ptr_at` proved the 40 bytes lie inside the frame.
        let h = unsafe { &mut *p };
        h[7] = 64;
        let mut src = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        h.copy_within(24..40, 8);
        h[24..40].copy_from_slice(&src);
        let Some(ip) = r.ptr_at::<[u8; 4]>(l4) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: as above, 4 bytes of the ICMPv6 header. The pseudo-header sum does not change
        // when source and destination swap.
        let i = unsafe { &mut *ip };
        let old = u16::from_be_bytes([i[0], i[1]]);
        i[0] = 129; // echo reply
        let c = csum_replace(
            u16::from_be_bytes([i[2], i[3]]),
            old,
            u16::from_be_bytes([i[0], i[1]]),
        );
        i[2..4].copy_from_slice(&c.to_be_bytes());
    }
    counters::add(Counter::IcmpEchoReplied, 1);
    xdp_action::XDP_TX
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changes from `old` to `new`.
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
