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
mod icmp;
mod log;
mod maps;
mod parse;
mod reader;
mod select;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    counters::Counter,
    flow::flow_hash,
    types::{VIP_F_DSR_L2, VIP_F_L7},
};

use crate::{maps::XLB_CONFIG, parse::Stop};

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
    let reader = reader::PacketReader::new(ctx);
    let frame_len = reader.len() as u64;
    counters::add(Counter::RxPackets, 1);
    counters::add(Counter::RxBytes, frame_len);
    let pkt = match parse::parse(ctx, &reader) {
        Ok(pkt) => pkt,
        Err(Stop::Pass) => return xdp_action::XDP_PASS,
        Err(Stop::Drop) => return xdp_action::XDP_DROP,
    };
    let Some(vip) = select::lookup_vip(&pkt) else {
        counters::add(Counter::PassNotVip, 1);
        return xdp_action::XDP_PASS;
    };
    if vip.flags & VIP_F_L7 != 0 {
        counters::add(Counter::PassL7, 1);
        return xdp_action::XDP_PASS;
    }
    if pkt.later_fragment {
        // Fragment tracking arrives with the fragment issue: until then a later fragment is
        // never sent anywhere its ports would have to be guessed.
        counters::add(Counter::DropFragUnknown, 1);
        return xdp_action::XDP_DROP;
    }
    let Some(chosen) = select::select(ctx, &pkt, &vip) else {
        return xdp_action::XDP_DROP;
    };
    let Some(cfg) = XLB_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    select::account(vip.vip_id, chosen.id, frame_len);
    if vip.flags & VIP_F_DSR_L2 != 0 {
        return forward::l2_dsr(&reader, cfg, chosen.backend);
    }
    forward::encapsulate(ctx, &pkt, cfg, chosen.backend, flow_hash(&pkt.key))
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
