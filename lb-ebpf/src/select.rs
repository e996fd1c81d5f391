//! Backend selection: VIP lookup, the connection table, and the VIP's Maglev table.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::warn;
use lb_common::{
    LogSite,
    counters::Counter,
    flow::flow_hash,
    types::{BACKEND_F_UP, Backend, FlowKey, FlowValue, Stats, VipKey, VipMeta, proto},
};

use crate::{
    counters, log,
    maps::{XLB_BACKEND_STATS, XLB_BACKENDS, XLB_FLOWS, XLB_MAGLEV, XLB_VIP_STATS, XLB_VIPS},
    parse::{Packet, TCP_ACK, TCP_SYN},
};

/// Finds the VIP a flow is addressed to: (address, port, protocol), then (address, 0,
/// protocol) for VIPs that take every port.
#[inline(always)]
pub fn lookup_vip(flow: &FlowKey) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: flow.dst,
        port_be: flow.dport_be,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: the value is copied out immediately; hash map values stay valid during the
    // program's RCU read section.
    if let Some(meta) = unsafe { XLB_VIPS.get(key) } {
        return Some(*meta);
    }
    key.port_be = 0;
    // SAFETY: as above.
    unsafe { XLB_VIPS.get(key) }.copied()
}

/// The chosen backend and its id.
pub struct Selected {
    /// Backend id.
    pub id: u32,
    /// The backend entry, in the map (array values live as long as the map).
    pub backend: &'static Backend,
}

/// The backend entry of `id` if it exists and is up.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    let b = XLB_BACKENDS.get(id)?;
    if b.family == 0 || b.flags & BACKEND_F_UP == 0 {
        return None;
    }
    Some(b)
}

/// True when the packet opens a TCP connection (SYN without ACK): it is always a new flow, even
/// if its tuple is in the connection table.
#[inline(always)]
pub fn opens_connection(pkt: &Packet) -> bool {
    pkt.key.proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Picks the backend for flow `key` of `vip`: the connection table first (unless `syn`, or the
/// remembered backend is down), else the Maglev slot of the flow's hash, which is remembered
/// when `remember` (data packets; not ICMP errors, which must not create state). `None` means
/// no backend can take it (counted).
#[inline(always)]
pub fn select(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &VipMeta,
    syn: bool,
    remember: bool,
) -> Option<Selected> {
    if !syn {
        // SAFETY: the value is copied out immediately.
        if let Some(v) = unsafe { XLB_FLOWS.get(key) } {
            let id = v.backend_id;
            if let Some(b) = backend(id) {
                counters::add(Counter::CtHit, 1);
                return Some(Selected { id, backend: b });
            }
            counters::add(Counter::CtReselect, 1);
        } else {
            counters::add(Counter::CtMiss, 1);
        }
    } else {
        counters::add(Counter::CtMiss, 1);
    }

    if vip.table_size == 0 {
        counters::add(Counter::DropNoBackend, 1);
        return None;
    }
    let slot = flow_hash(key) % vip.table_size;
    let Some(id) = XLB_MAGLEV.get_value(vip.table_index, &slot).copied() else {
        counters::add(Counter::DropNoTable, 1);
        if log::allowed(LogSite::MissingTable) {
            warn!(
                ctx,
                "VIP {} has no Maglev table at index {}", vip.vip_id, vip.table_index
            );
        }
        return None;
    };
    let Some(b) = backend(id) else {
        counters::add(Counter::DropNoBackend, 1);
        return None;
    };
    if remember {
        let _ = XLB_FLOWS.insert(
            key,
            FlowValue {
                backend_id: id,
                _pad: 0,
            },
            0,
        );
        bump_new_flow(vip.vip_id, id);
    }
    Some(Selected { id, backend: b })
}

#[inline(always)]
fn bump_new_flow(vip_id: u32, backend_id: u32) {
    if let Some(s) = XLB_VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*s).new_flows += 1 };
    }
    if let Some(s) = XLB_BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*s).new_flows += 1 };
    }
}

/// Counts a forwarded packet against its VIP and backend.
#[inline(always)]
pub fn account(vip_id: u32, backend_id: u32, bytes: u64) {
    bump(XLB_VIP_STATS.get_ptr_mut(vip_id), bytes);
    bump(XLB_BACKEND_STATS.get_ptr_mut(backend_id), bytes);
}

#[inline(always)]
fn bump(stats: Option<*mut Stats>, bytes: u64) {
    if let Some(s) = stats {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}
