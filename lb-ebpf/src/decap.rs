//! `xlb_decap`, the backend-side program: strips the outer IPv4/IPv6 header of tunnel packets
//! (IPIP, IPv6-in-IP) addressed to one of this host's tunnel addresses and passes the inner
//! packet to the stack, where the VIP on loopback takes it and replies straight to the client.
//! Everything else passes untouched. Built as its own object so backend hosts load none of the
//! balancer's maps.
#![no_std]
#![no_main]
#![expect(
    missing_docs,
    reason = "#[xdp] generates an undocumented extern entry point beside the documented fn"
)]

mod counters;
mod l2;
mod log;
#[expect(
    dead_code,
    reason = "shared with the balancer, which uses all of the parsed fields"
)]
mod parse;
mod reader;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::HashMap,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    types::{FAMILY_V4, LocalAddr, MAX_LOCAL_ADDRS, proto},
};

use crate::{l2::L2, reader::PacketReader};

/// The addresses this host accepts tunnel packets for (written by `xlb decap`).
#[btf_map]
static XLB_DECAP_ADDRS: HashMap<LocalAddr, u8, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();

/// Strips the outer header of tunnel packets for this host; passes everything else.
#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let action = decap(&ctx);
    counters::add(
        if action == xdp_action::XDP_PASS {
            Counter::ActionPass
        } else {
            Counter::ActionDrop
        },
        1,
    );
    action
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> u32 {
    let reader = PacketReader::new(ctx);
    counters::add(Counter::RxPackets, 1);
    counters::add(Counter::RxBytes, reader.len() as u64);
    let Some(pkt) = parse::scratch() else {
        return xdp_action::XDP_ABORTED;
    };
    if parse::parse(ctx, &reader, pkt).is_err() {
        // The stack judges what the balancer's parser would drop: a backend host's own traffic
        // is not ours to police.
        return xdp_action::XDP_PASS;
    }
    let pkt: &parse::Packet = pkt;
    let inner_v4 = match pkt.key.proto {
        proto::IPIP => true,
        proto::IPV6 => false,
        _ => {
            counters::add(Counter::DecapPassthrough, 1);
            return xdp_action::XDP_PASS;
        }
    };
    if pkt.later_fragment {
        // A fragmented tunnel packet: the stack reassembles it (no inner header to check here).
        counters::add(Counter::DecapPassthrough, 1);
        return xdp_action::XDP_PASS;
    }
    let local = LocalAddr {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is checked; the value is not read.
    if unsafe { XLB_DECAP_ADDRS.get(local) }.is_none() {
        counters::add(Counter::DecapNotLocal, 1);
        return xdp_action::XDP_PASS;
    }
    let inner = pkt.l4();
    let outer_end = pkt.l3() + pkt.ip_len();
    let inner_min = if inner_v4 { 20 } else { 40 };
    // A 20-byte read (the smallest inner header) rather than one byte: LLVM turns a one-byte
    // bounds check into a form the verifier does not track.
    let version_ok = inner + inner_min <= outer_end
        && match reader.read::<[u8; 20]>(inner) {
            Some(h) => (h[0] >> 4) == if inner_v4 { 4 } else { 6 },
            None => false,
        };
    if !version_ok {
        counters::add(Counter::DecapMalformed, 1);
        return xdp_action::XDP_DROP;
    }

    // Keep the MACs and VLAN tags; they move forward by the outer header's length.
    let Some(l2) = L2::save(&reader, pkt.vlans()) else {
        return xdp_action::XDP_ABORTED;
    };
    let strip = inner - pkt.l3();
    // SAFETY: the helper only moves `data`; all later accesses re-derive bounds from `ctx`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        counters::add(Counter::DropAdjustFailed, 1);
        return xdp_action::XDP_DROP;
    }
    let ether_type: u16 = if inner_v4 { 0x0800 } else { 0x86dd };
    if l2
        .write(&PacketReader::new(ctx), l2.dst, l2.src, ether_type)
        .is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    counters::add(
        if pkt.key.family == FAMILY_V4 {
            Counter::DecapV4
        } else {
            Counter::DecapV6
        },
        1,
    );
    xdp_action::XDP_PASS
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
