//! Tunnel packets (IPIP, IPv6-in-IP) addressed to this host: the inner header checked and the
//! outer one stripped. Shared by the backend-side decapsulator and by the balancer, which
//! accepts flows another region's xlb host failed over to it.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    counters::Counter,
    types::{FAMILY_V4, FAMILY_V6, LocalAddr, proto},
};

use crate::{counters, l2::L2, parse::Packet, reader::PacketReader};

/// A tunnel packet's inner header, checked.
pub struct Inner {
    /// The inner packet is IPv4 (else IPv6).
    pub v4: bool,
    /// The inner packet is UDP and its destination address is the outer one (IPv4 in the
    /// first 4 bytes): a packet for this host itself rather than for something behind it (a
    /// capacity probe).
    #[allow(
        dead_code,
        reason = "read by the balancer only; `expect` would fail in the crate root that uses it"
    )]
    pub to_outer_dst: bool,
}

/// Whether `pkt` is an unfragmented tunnel packet (a fragment of one only the stack can
/// reassemble; it holds no complete inner header to check).
#[inline(always)]
pub fn is_tunnel(pkt: &Packet) -> bool {
    (pkt.key.proto == proto::IPIP || pkt.key.proto == proto::IPV6) && !pkt.fragmented
}

/// The local-address key of a packet's destination.
#[inline(always)]
pub fn destination(pkt: &Packet) -> LocalAddr {
    LocalAddr {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    }
}

/// The inner header of a tunnel packet ([`is_tunnel`]): `None` when it is missing, cut short,
/// not of the version the outer protocol announces, or longer than the outer packet carries.
#[inline(always)]
pub fn inner(reader: &PacketReader, pkt: &Packet) -> Option<Inner> {
    let v4 = pkt.key.proto == proto::IPIP;
    let at = pkt.l4();
    let outer_end = pkt.l3() + pkt.ip_len();
    let min = if v4 { 20 } else { 40 };
    if at + min > outer_end {
        return None;
    }
    // A 20-byte read (the smallest inner header) rather than one byte: LLVM turns a one-byte
    // bounds check into a form the verifier does not track.
    let h = reader.read::<[u8; 20]>(at)?;
    if (h[0] >> 4) != if v4 { 4 } else { 6 } {
        return None;
    }
    // The inner packet must end inside the outer one: bytes after the outer packet (padding,
    // or anything a sender appended) are not part of the tunnel packet and must not be
    // forwarded as part of a VIP flow. A kernel tunnel drops such a packet too (the outer
    // length trims the frame before the inner header is read).
    let inner_len = if v4 {
        u16::from_be_bytes([h[2], h[3]]) as usize
    } else {
        40 + u16::from_be_bytes([h[4], h[5]]) as usize
    };
    if at + inner_len > outer_end {
        return None;
    }
    // A capacity probe is UDP (the port is the endpoint's business): any other inner packet to
    // this host's own address (a nested tunnel, TCP to a local service) is no probe and is
    // dropped after the strip like every other non-VIP packet.
    let udp = (if v4 { h[9] } else { h[6] }) == proto::UDP;
    let to_outer_dst = udp
        && if v4 {
            pkt.key.family == FAMILY_V4 && h[16..20] == pkt.key.dst[..4]
        } else {
            pkt.key.family == FAMILY_V6 && reader.read::<[u8; 16]>(at + 24)? == pkt.key.dst
        };
    Some(Inner { v4, to_outer_dst })
}

/// Removes the outer header, keeping the MACs and VLAN tags in front of the inner packet.
/// Returns false when the frame could not be changed (counted); the caller drops it.
#[inline(always)]
pub fn strip(ctx: &XdpContext, reader: &PacketReader, pkt: &Packet, inner: &Inner) -> bool {
    let Some(l2) = L2::save(reader, pkt.vlans()) else {
        return false;
    };
    let strip = pkt.l4() - pkt.l3();
    // SAFETY: the helper only moves `data`; all later accesses re-derive bounds from `ctx`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        counters::add(Counter::DropAdjustFailed, 1);
        return false;
    }
    let ether_type: u16 = if inner.v4 { 0x0800 } else { 0x86dd };
    l2.write(&PacketReader::new(ctx), l2.dst, l2.src, ether_type)
        .is_some()
}
