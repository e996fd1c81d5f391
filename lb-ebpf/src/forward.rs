//! Forwarding: IPIP / IP6IP6 / IPv4-in-IPv6 (and IPv6-in-IPv4) encapsulation towards the next
//! hop, and L2 direct server return. Both send the frame back out with XDP_TX.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    csum::ipv4_header_checksum,
    flow::{source_v4, source_v6},
    types::{Backend, FAMILY_V4, FAMILY_V6, LbConfig, proto},
};

use crate::{counters, icmp, l2::L2, parse::Packet, reader::PacketReader};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Outer TTL / hop limit of encapsulated packets.
pub const OUTER_TTL: u8 = 64;

/// L2 DSR: the frame goes to the backend's MAC unchanged otherwise.
#[inline(always)]
pub fn l2_dsr(reader: &PacketReader, cfg: &LbConfig, backend: &Backend) -> u32 {
    if reader.write(0, backend.mac).is_none() || reader.write(6, cfg.lb_mac).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    counters::add(Counter::FwdL2, 1);
    xdp_action::XDP_TX
}

/// Wraps the IP packet in an outer header of the backend's family, addressed from the configured
/// source (host bits from the flow hash) to the backend, and sends it to the next hop. VLAN tags
/// of the received frame are kept. Packets that would exceed the egress MTU are dropped and
/// counted.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    cfg: &LbConfig,
    backend: &Backend,
    hash: u32,
) -> u32 {
    let outer_v6 = backend.family == FAMILY_V6;
    let overhead: usize = if outer_v6 { 40 } else { 20 };
    if cfg.egress_mtu != 0 && pkt.ip_len() + overhead > cfg.egress_mtu as usize {
        if pkt.key.family == FAMILY_V4 && !pkt.dont_fragment {
            counters::add(Counter::DropTooBig, 1);
            return xdp_action::XDP_DROP;
        }
        return icmp::too_big(ctx, pkt, &cfg.lb_mac, cfg.egress_mtu - overhead as u16);
    }

    // The VLAN tags (TCI + inner TPID) must survive the move of the L2 header.
    let Some(l2) = L2::save(&PacketReader::new(ctx), pkt.vlans()) else {
        return xdp_action::XDP_ABORTED;
    };

    // SAFETY: the helper only moves `data`; all later accesses re-derive bounds from `ctx`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        counters::add(Counter::DropAdjustFailed, 1);
        return xdp_action::XDP_DROP;
    }
    let r = PacketReader::new(ctx);
    let ether_type = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IPV4 };
    if l2
        .write(&r, cfg.nexthop_mac, cfg.lb_mac, ether_type)
        .is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    let l3 = pkt.l3();
    let inner_proto = if pkt.key.family == FAMILY_V4 {
        proto::IPIP
    } else {
        proto::IPV6
    };
    let written = if outer_v6 {
        write_outer_v6(&r, l3, pkt, cfg, backend, hash, inner_proto)
    } else {
        write_outer_v4(&r, l3, pkt, cfg, backend, hash, inner_proto)
    };
    if !written {
        return xdp_action::XDP_ABORTED;
    }
    counters::add(
        if outer_v6 {
            Counter::FwdEncapV6
        } else {
            Counter::FwdEncapV4
        },
        1,
    );
    xdp_action::XDP_TX
}

/// Writes an outer IPv4 header in place at `l3` (no copy through the stack: the BPF stack is
/// 512 bytes for the whole program).
#[inline(always)]
fn write_outer_v4(
    r: &PacketReader,
    l3: usize,
    pkt: &Packet,
    cfg: &LbConfig,
    backend: &Backend,
    hash: u32,
    inner_proto: u8,
) -> bool {
    let Some(p) = r.ptr_at::<[u8; 20]>(l3) else {
        return false;
    };
    // SAFETY: `ptr_at` proved the 20 bytes lie inside the (adjusted) frame.
    let h = unsafe { &mut *p };
    h[0] = 0x45;
    h[1] = pkt.tos;
    let len = ((pkt.ip_len() + 20) as u16).to_be_bytes();
    h[2] = len[0];
    h[3] = len[1];
    h[4] = 0;
    h[5] = 0;
    h[6] = 0;
    h[7] = 0;
    h[8] = OUTER_TTL;
    h[9] = inner_proto;
    h[10] = 0;
    h[11] = 0;
    let src = source_v4(cfg.encap_src_v4, cfg.encap_src_v4_prefix, hash);
    h[12] = src[0];
    h[13] = src[1];
    h[14] = src[2];
    h[15] = src[3];
    h[16] = backend.addr[0];
    h[17] = backend.addr[1];
    h[18] = backend.addr[2];
    h[19] = backend.addr[3];
    let csum = ipv4_header_checksum(h).to_be_bytes();
    h[10] = csum[0];
    h[11] = csum[1];
    true
}

/// Writes an outer IPv6 header in place at `l3`. The flow label carries the flow hash so
/// routers' and NICs' hashing spread encapsulated flows.
#[inline(always)]
fn write_outer_v6(
    r: &PacketReader,
    l3: usize,
    pkt: &Packet,
    cfg: &LbConfig,
    backend: &Backend,
    hash: u32,
    inner_proto: u8,
) -> bool {
    let Some(p) = r.ptr_at::<[u8; 40]>(l3) else {
        return false;
    };
    // SAFETY: `ptr_at` proved the 40 bytes lie inside the (adjusted) frame.
    let h = unsafe { &mut *p };
    let label = hash & 0x000f_ffff;
    h[0] = 0x60 | (pkt.tos >> 4);
    h[1] = (pkt.tos << 4) | ((label >> 16) as u8 & 0x0f);
    h[2] = (label >> 8) as u8;
    h[3] = label as u8;
    let len = (pkt.ip_len() as u16).to_be_bytes();
    h[4] = len[0];
    h[5] = len[1];
    h[6] = inner_proto;
    h[7] = OUTER_TTL;
    let src = source_v6(cfg.encap_src_v6, cfg.encap_src_v6_prefix, hash);
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&backend.addr);
    true
}
