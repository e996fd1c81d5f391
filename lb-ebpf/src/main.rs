//! xlb's XDP programs. Built for `bpfel-unknown-none` and embedded in the `xlb` binary.
//!
//! The entry points only route; parsing, counting and logging live in their own modules.
#![no_std]
#![no_main]
#![expect(
    missing_docs,
    reason = "#[xdp] generates an undocumented extern entry point beside the documented fn"
)]

mod counters;
mod log;
mod maps;
mod parse;
mod reader;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::counters::Counter;

/// The balancer. Today it parses and counts, then passes every frame to the host stack; the
/// L4 fast path replaces the verdict.
#[xdp]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    match try_balance(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn try_balance(ctx: &XdpContext) -> Result<u32, ()> {
    let reader = reader::PacketReader::new(ctx);
    counters::add(Counter::RxPackets, 1);
    counters::add(Counter::RxBytes, reader.len() as u64);
    parse::classify(ctx, &reader);
    counters::add(Counter::ActionPass, 1);
    Ok(xdp_action::XDP_PASS)
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
