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
mod tunnel;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::HashMap,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    types::{FAMILY_V4, LocalAddr, MAX_LOCAL_ADDRS},
};

use crate::reader::PacketReader;

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
    if !tunnel::is_tunnel(pkt) {
        // Not a tunnel packet, or a fragment of one (the stack reassembles it; there is no
        // inner header to check here).
        counters::add(Counter::DecapPassthrough, 1);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: only presence is checked; the value is not read.
    if unsafe { XLB_DECAP_ADDRS.get(tunnel::destination(pkt)) }.is_none() {
        counters::add(Counter::DecapNotLocal, 1);
        return xdp_action::XDP_PASS;
    }
    let Some(inner) = tunnel::inner(&reader, pkt) else {
        counters::add(Counter::DecapMalformed, 1);
        return xdp_action::XDP_DROP;
    };
    if !tunnel::strip(ctx, &reader, pkt, &inner) {
        return xdp_action::XDP_DROP;
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
