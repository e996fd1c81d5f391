//! xlb's XDP programs. Built for `bpfel-unknown-none` and embedded in the `xlb` binary.
//!
//! The entry points only route; parsing, selection, forwarding, counting and logging live in
//! their own modules.
#![no_std]
#![no_main]
#![expect(
    missing_docs,
    reason = "#[xdp] generates an undocumented extern entry point beside the documented fn"
)]

mod counters;
mod forward;
mod frag;
mod icmp;
mod l2;
mod log;
mod maps;
mod parse;
mod reader;
mod select;
mod tunnel;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    counters::Counter,
    flow::flow_hash,
    types::{BACKEND_F_REGION, Backend, LbConfig, VIP_F_DSR_L2, VIP_F_L7, VipMeta, proto},
};

use crate::{
    maps::{XLB_CONFIG, XLB_REGION_ADDRS},
    parse::Stop,
};

/// The balancer: VIP traffic is sent to a backend chosen by the connection table or Maglev
/// (encapsulated, or by L2 DSR); everything else goes to the host stack untouched.
#[xdp]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    let action = balance(&ctx);
    counters::add(
        match action {
            xdp_action::XDP_PASS => Counter::ActionPass,
            xdp_action::XDP_TX => Counter::ActionTx,
            _ => Counter::ActionDrop,
        },
        1,
    );
    action
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let mut reader = reader::PacketReader::new(ctx);
    let frame_len = reader.len() as u64;
    counters::add(Counter::RxPackets, 1);
    counters::add(Counter::RxBytes, frame_len);
    let Some(pkt) = parse::scratch() else {
        return xdp_action::XDP_ABORTED;
    };
    match parse::parse(ctx, &reader, pkt) {
        Ok(()) => {}
        Err(Stop::Pass) => return xdp_action::XDP_PASS,
        Err(Stop::Drop) => return xdp_action::XDP_DROP,
    }
    let Some(cfg) = XLB_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };

    // A flow another region's xlb host failed over to this one (or that host's capacity
    // probe) arrives in a tunnel to one of this host's region addresses: the outer header goes,
    // and the inner packet is balanced as if it had arrived directly, except that it may not
    // leave for yet another region.
    let mut from_region = false;
    // SAFETY: only presence is checked; the value is not read.
    if tunnel::is_tunnel(pkt) && unsafe { XLB_REGION_ADDRS.get(tunnel::destination(pkt)) }.is_some()
    {
        let Some(inner) = tunnel::inner(&reader, pkt) else {
            counters::add(Counter::DropRegionNotVip, 1);
            return xdp_action::XDP_DROP;
        };
        if !tunnel::strip(ctx, &reader, pkt, &inner) {
            return xdp_action::XDP_DROP;
        }
        if inner.to_outer_dst {
            counters::add(Counter::RegionProbePassed, 1);
            return xdp_action::XDP_PASS;
        }
        reader = reader::PacketReader::new(ctx);
        match parse::parse(ctx, &reader, pkt) {
            Ok(()) => {}
            Err(Stop::Pass) => return not_vip(true),
            Err(Stop::Drop) => return xdp_action::XDP_DROP,
        }
        counters::add(Counter::RegionDecap, 1);
        from_region = true;
    }

    // A later fragment follows its first fragment's record even if its address has lost its
    // VIPs since: the datagram is completed where it started.
    if pkt.later_fragment {
        return later_fragment(ctx, pkt, cfg, from_region);
    }

    // Traffic to addresses that are certainly not VIPs (ordinary host traffic) is settled by
    // one array lookup; the rest by one hash lookup on the address (no ports needed, so it
    // also covers ICMP and later fragments).
    if !select::maybe_vip_address(&pkt.key) {
        return not_vip(from_region);
    }
    // Established TCP / UDP flows go straight from the connection table to their backend.
    let p = pkt.key.proto;
    if !pkt.fragmented
        && (p == proto::UDP || (p == proto::TCP && !select::opens_connection(pkt)))
        && let Some(est) = select::established(&pkt.key, from_region)
    {
        select::account(est.vip_id, est.backend_id, frame_len);
        return send(ctx, &reader, pkt, cfg, est.vip_flags, est.backend, est.hash);
    }

    // The flow a packet belongs to: its own, or for an ICMP error the quoted one.
    let is_icmp = pkt.is_icmp();
    let icmp_error = if is_icmp && !pkt.fragmented {
        if select::vip_address_flags(&pkt.key) == 0 {
            return not_vip(from_region);
        }
        match icmp::classify(&reader, pkt) {
            icmp::IcmpAction::EchoReply => return icmp::echo_reply(ctx, pkt, &cfg.lb_mac),
            icmp::IcmpAction::Pass => return not_vip(from_region),
            icmp::IcmpAction::Drop => return xdp_action::XDP_DROP,
            icmp::IcmpAction::Forward => true,
        }
    } else {
        false
    };
    let pkt: &parse::Packet = pkt;
    let (flow, syn) = if icmp_error {
        (&pkt.quoted, false)
    } else {
        (&pkt.key, select::opens_connection(pkt))
    };

    let Some(vip) = select::lookup_vip(flow) else {
        return not_vip(from_region);
    };
    if vip.flags & VIP_F_L7 != 0 {
        counters::add(Counter::PassL7, 1);
        return xdp_action::XDP_PASS;
    }
    // ICMP errors must not create connection-table entries.
    let Some(chosen) = select::select(ctx, flow, &vip, syn, !icmp_error, from_region) else {
        return xdp_action::XDP_DROP;
    };
    let hash = if pkt.fragmented {
        first_fragment(pkt, &vip, chosen.id)
    } else {
        flow_hash(flow)
    };
    if icmp_error {
        counters::add(Counter::IcmpErrorForwarded, 1);
    }
    select::account(vip.vip_id, chosen.id, frame_len);
    send(ctx, &reader, pkt, cfg, vip.flags, chosen.backend, hash)
}

/// A packet for no VIP: the host stack's, unless it came through another region's tunnel
/// (nothing but VIP flows and probes may arrive that way; the rest is dropped, counted).
#[inline(always)]
fn not_vip(from_region: bool) -> u32 {
    if from_region {
        counters::add(Counter::DropRegionNotVip, 1);
        xdp_action::XDP_DROP
    } else {
        counters::add(Counter::PassNotVip, 1);
        xdp_action::XDP_PASS
    }
}

/// A fragment without ports follows its datagram's first fragment, or is passed or dropped.
/// One that came `from_region` is never handed to the stack nor sent to a region again.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, pkt: &parse::Packet, cfg: &LbConfig, from_region: bool) -> u32 {
    match frag::later(pkt) {
        frag::Later::Follow(rec) => {
            let Some(backend) = select::backend(rec.backend_id) else {
                counters::add(Counter::DropNoBackend, 1);
                return xdp_action::XDP_DROP;
            };
            if from_region && backend.flags & BACKEND_F_REGION != 0 {
                // A flow crosses at most one region boundary, fragments included.
                counters::add(Counter::DropNoBackend, 1);
                return xdp_action::XDP_DROP;
            }
            counters::add(Counter::FragForwarded, 1);
            let reader = reader::PacketReader::new(ctx);
            select::account(rec.vip_id, rec.backend_id, reader.len() as u64);
            send(
                ctx,
                &reader,
                pkt,
                cfg,
                rec.vip_flags,
                backend,
                fragment_hash(pkt),
            )
        }
        frag::Later::Pass => not_vip(from_region),
        frag::Later::Drop => xdp_action::XDP_DROP,
    }
}

/// Sends the packet to `backend` the VIP's way: L2 DSR or encapsulation. A remote region's xlb
/// host is always reached by encapsulation.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    reader: &reader::PacketReader,
    pkt: &parse::Packet,
    cfg: &LbConfig,
    vip_flags: u32,
    backend: &Backend,
    hash: u32,
) -> u32 {
    if vip_flags & VIP_F_DSR_L2 != 0 && backend.flags & BACKEND_F_REGION == 0 {
        return forward::l2_dsr(reader, cfg, backend);
    }
    forward::encapsulate(ctx, pkt, cfg, backend, hash)
}

/// Records a first fragment and returns its datagram's hash.
#[inline(always)]
fn first_fragment(pkt: &parse::Packet, vip: &VipMeta, backend_id: u32) -> u32 {
    frag::track_first(pkt, vip, backend_id);
    fragment_hash(pkt)
}

/// The hash of a fragmented datagram (addresses, identification, protocol): every fragment of
/// it, first or later, gets the same outer source.
#[inline(always)]
fn fragment_hash(pkt: &parse::Packet) -> u32 {
    let mut key = pkt.key;
    key.sport_be = pkt.frag_id as u16;
    key.dport_be = (pkt.frag_id >> 16) as u16;
    flow_hash(&key)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

/// Kernel helpers used by the programs (ktime, ring buffer for logs) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
