//! Fragments: the first fragment of a datagram selects a backend by its 5-tuple like any
//! packet, and is recorded by (source, destination, identification, protocol); later fragments,
//! which carry no ports, follow the record. A later fragment to a VIP address without a record
//! is dropped and counted, never sent to a guessed backend.

use lb_common::{
    counters::Counter,
    types::{FragKey, FragValue, VIP_ADDR_F_L4, VipMeta},
};

use crate::{counters, maps::XLB_FRAGS, parse::Packet};

/// The fragment-table key of a packet.
#[inline(always)]
pub fn key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.key.src,
        dst: pkt.key.dst,
        id: pkt.frag_id,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: [0; 2],
    }
}

/// Records where the first fragment of a datagram went.
#[inline(always)]
pub fn track_first(pkt: &Packet, vip: &VipMeta, backend_id: u32) {
    let value = FragValue {
        backend_id,
        vip_id: vip.vip_id,
        vip_flags: vip.flags,
        _pad: 0,
    };
    if XLB_FRAGS.insert(key(pkt), value, 0).is_ok() {
        counters::add(Counter::FragTracked, 1);
    }
}

/// What to do with a later fragment.
pub enum Later {
    /// Follow the first fragment.
    Follow(FragValue),
    /// Not for a forwarded VIP: hand to the host stack.
    Pass,
    /// For a forwarded VIP, but the first fragment is unknown: drop.
    Drop,
}

/// Looks up a later fragment: its record first, then whether its address has a forwarded VIP.
#[inline(always)]
pub fn later(pkt: &Packet) -> Later {
    // SAFETY: the value is copied out immediately.
    if let Some(v) = unsafe { XLB_FRAGS.get(key(pkt)) } {
        return Later::Follow(*v);
    }
    if crate::select::vip_address_flags(&pkt.key) & VIP_ADDR_F_L4 != 0 {
        counters::add(Counter::DropFragUnknown, 1);
        return Later::Drop;
    }
    // Not counted here: the caller counts it (pass for the stack, or a drop when the fragment
    // came through another region's tunnel, where nothing but VIP flows may arrive).
    Later::Pass
}
