//! Backend selection: VIP lookup, the connection table, and the VIP's Maglev table.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::warn;
use lb_common::{
    LogSite,
    counters::Counter,
    flow::{flow_hash, region_point},
    types::{
        BACKEND_F_REGION, BACKEND_F_UP, Backend, FlowKey, FlowValue, LocalAddr, MAX_VIP_REGIONS,
        REGION_LOCAL, Stats, VIP_ADDR_F_ANY_PORT, VIP_BLOOM_BITS, VIP_F_L7, VIP_F_LAST_RESORT,
        VIP_S_ACTIVE, VipKey, VipMeta, proto,
    },
};

use crate::{
    counters, log,
    maps::{
        XLB_BACKEND_STATS, XLB_BACKENDS, XLB_FLOWS, XLB_MAGLEV, XLB_VIP_ADDRS, XLB_VIP_BLOOM,
        XLB_VIP_STATE, XLB_VIP_STATS, XLB_VIPS,
    },
    parse::{Packet, TCP_ACK, TCP_SYN},
};

/// Finds the VIP a flow is addressed to: (address, port, protocol), then, when the address has
/// an every-port VIP, (address, 0, protocol).
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
    if vip_address_flags(flow) & VIP_ADDR_F_ANY_PORT == 0 {
        return None;
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

/// The backend `id` unless it stands for a remote region and the packet itself came from
/// another region (a flow crosses at most one region boundary).
#[inline(always)]
fn usable(id: u32, from_region: bool) -> Option<&'static Backend> {
    let b = backend(id)?;
    if from_region && b.flags & BACKEND_F_REGION != 0 {
        return None;
    }
    Some(b)
}

/// Picks the backend for flow `key` of `vip`: the connection table first (unless `syn`, or the
/// remembered backend is down), else the VIP's region split (a remote region's xlb host, or
/// this host's own region) and in this region the Maglev slot of the flow's hash. The choice
/// is remembered when `remember` (data packets; not ICMP errors, which must not create state).
/// A packet `from_region` (failed over to this host by another region) is never sent to a
/// region again. `None` means no backend can take it (counted).
#[inline(always)]
pub fn select(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &VipMeta,
    syn: bool,
    remember: bool,
    from_region: bool,
) -> Option<Selected> {
    if !syn {
        // SAFETY: the value is copied out immediately.
        if let Some(v) = unsafe { XLB_FLOWS.get(key) }.copied() {
            let id = v.backend_id;
            if let Some(b) = usable(id, from_region) {
                counters::add(Counter::CtHit, 1);
                if remember && (v.vip_id != vip.vip_id || v.generation != vip.generation) {
                    // Pinned under another VIP or an earlier generation (the VIP set changed):
                    // keep the backend, re-pin under the VIP that matches now so the next
                    // packets take the fast path again.
                    let _ = XLB_FLOWS.insert(
                        key,
                        FlowValue {
                            vip_id: vip.vip_id,
                            generation: vip.generation,
                            ..v
                        },
                        0,
                    );
                }
                return Some(Selected { id, backend: b });
            }
            counters::add(Counter::CtReselect, 1);
        } else {
            counters::add(Counter::CtMiss, 1);
        }
    } else {
        counters::add(Counter::CtMiss, 1);
    }

    let hash = flow_hash(key);
    if !from_region
        && vip.region_count != 0
        && let Some(id) = remote_region(vip, hash)
        && let Some(b) = backend(id)
    {
        // A remote region that went down since the agent's last split falls through to this
        // region's table rather than dropping the flow.
        if remember {
            pin(key, vip, id, hash);
        }
        counters::add(Counter::RegionForwarded, 1);
        return Some(Selected { id, backend: b });
    }
    if vip.table_size == 0 {
        counters::add(Counter::DropNoBackend, 1);
        return None;
    }
    let slot = hash % vip.table_size;
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
        pin(key, vip, id, hash);
        if vip.flags & VIP_F_LAST_RESORT != 0 {
            counters::add(Counter::RegionLastResort, 1);
        }
    }
    Some(Selected { id, backend: b })
}

/// The remote region's backend id the VIP's split gives a flow of this hash, or `None` for
/// this host's own region.
#[inline(always)]
fn remote_region(vip: &VipMeta, hash: u32) -> Option<u32> {
    let point = region_point(hash);
    let mut i = 0;
    while i < MAX_VIP_REGIONS {
        if (i as u32) < vip.region_count && point < vip.region_upto[i] {
            let id = vip.region_backend[i];
            return if id == REGION_LOCAL { None } else { Some(id) };
        }
        i += 1;
    }
    None
}

/// Remembers a new flow's backend and counts it.
#[inline(always)]
fn pin(key: &FlowKey, vip: &VipMeta, id: u32, hash: u32) {
    let _ = XLB_FLOWS.insert(
        key,
        FlowValue {
            backend_id: id,
            vip_id: vip.vip_id,
            generation: vip.generation,
            hash,
        },
        0,
    );
    bump_new_flow(vip.vip_id, id);
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

/// A flow the connection table can forward without the VIP lookup.
pub struct Established {
    /// The VIP's id.
    pub vip_id: u32,
    /// The VIP's `VIP_F_*` flags.
    pub vip_flags: u32,
    /// The backend's id.
    pub backend_id: u32,
    /// The backend.
    pub backend: &'static Backend,
    /// The flow hash, remembered at selection (it picks the outer source address).
    pub hash: u32,
}

/// The fast path for established flows: a connection-table hit whose VIP is still the one the
/// flow was pinned under (id active, same generation, not L7) and whose backend is up (and not
/// a remote region, for a packet `from_region`). Anything else returns `None` and the packet
/// takes the full path, which decides exactly as if this shortcut did not exist.
#[inline(always)]
pub fn established(key: &FlowKey, from_region: bool) -> Option<Established> {
    // SAFETY: the value is copied out immediately.
    let v = unsafe { XLB_FLOWS.get(key) }.copied()?;
    let st = XLB_VIP_STATE.get(v.vip_id)?;
    if st.flags & VIP_S_ACTIVE == 0 || st.flags & VIP_F_L7 != 0 || st.generation != v.generation {
        return None;
    }
    let b = usable(v.backend_id, from_region)?;
    counters::add(Counter::CtHit, 1);
    Some(Established {
        vip_id: v.vip_id,
        vip_flags: st.flags,
        backend_id: v.backend_id,
        backend: b,
        hash: v.hash,
    })
}

/// False when the address is certainly not a VIP address (its bloom bit is clear).
#[inline(always)]
pub fn maybe_vip_address(key: &FlowKey) -> bool {
    let h = lb_common::flow::addr_hash(&key.dst, key.family) % VIP_BLOOM_BITS;
    match XLB_VIP_BLOOM.get(h / 64) {
        Some(word) => word & (1u64 << (h % 64)) != 0,
        None => true,
    }
}

/// The `VIP_ADDR_F_*` flags of a flow's destination address (0: no VIP there).
#[inline(always)]
pub fn vip_address_flags(flow: &FlowKey) -> u32 {
    let addr = LocalAddr {
        addr: flow.dst,
        family: flow.family,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out immediately.
    unsafe { XLB_VIP_ADDRS.get(addr) }.copied().unwrap_or(0)
}
