//! The balancer's maps (the counter and log rate-limit maps, shared with the decapsulator, live
//! in `counters.rs` and `log.rs`). Names, key and value layouts come from `lb-common`; the
//! agent's typed map layer is their only writer.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::types::{
    BPF_F_NO_COMMON_LRU, Backend, DEFAULT_FLOW_ENTRIES, FRAG_ENTRIES, FlowKey, FlowValue, FragKey,
    FragValue, LbConfig, LocalAddr, MAX_BACKENDS, MAX_LOCAL_ADDRS, MAX_TABLES, MAX_VIP_ADDRS,
    MAX_VIPS, Stats, TABLE_FLAGS, TABLE_TEMPLATE_SIZE, VIP_BLOOM_WORDS, VipKey, VipMeta, VipState,
};

/// VIPs. A hash map, so the agent's update of a VIP (new table index and size together) is seen
/// by packets either wholly or not at all.
#[btf_map]
pub static XLB_VIPS: HashMap<VipKey, VipMeta, { MAX_VIPS as usize }> = HashMap::new();

/// Backends by id. Ids are never reused for a different address while flows may point at them.
#[btf_map]
pub static XLB_BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The Maglev tables: each entry is one table (an array of backend ids of its own prime size).
#[btf_map]
pub static XLB_MAGLEV: ArrayOfMaps<
    Array<u32, { TABLE_TEMPLATE_SIZE as usize }, { TABLE_FLAGS as usize }>,
    { MAX_TABLES as usize },
> = ArrayOfMaps::new();

/// The connection table: 5-tuple -> backend. An LRU hash with per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`): inserts and evictions never contend across CPUs, and entries are
/// shared, so a flow whose packets reach another CPU (RSS change, CPU hot-plug) keeps its
/// backend.
#[btf_map]
pub static XLB_FLOWS: LruHashMap<
    FlowKey,
    FlowValue,
    { DEFAULT_FLOW_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Balancer-wide settings (one entry).
#[btf_map]
pub static XLB_CONFIG: Array<LbConfig, 1> = Array::new();

/// Per-VIP traffic counters.
#[btf_map]
pub static XLB_VIP_STATS: PerCpuArray<Stats, { MAX_VIPS as usize }> = PerCpuArray::new();

/// Per-backend traffic counters.
#[btf_map]
pub static XLB_BACKEND_STATS: PerCpuArray<Stats, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// Every VIP address with `VIP_ADDR_F_*` flags: ICMP and later fragments carry no ports, so
/// they are matched by address alone.
#[btf_map]
pub static XLB_VIP_ADDRS: HashMap<LocalAddr, u32, { MAX_VIP_ADDRS as usize }> = HashMap::new();

/// Fragmented datagrams: where the first fragment went. Shared by all CPUs, because a NIC may
/// hash a datagram's fragments to different queues than its first one.
#[btf_map]
pub static XLB_FRAGS: LruHashMap<FragKey, FragValue, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// Per-VIP-id state for the connection-table fast path.
#[btf_map]
pub static XLB_VIP_STATE: Array<VipState, { MAX_VIPS as usize }> = Array::new();

/// One-hash bloom filter of VIP addresses: a clear bit proves "not a VIP address" with one
/// array lookup, so ordinary host traffic skips every hash-map lookup.
#[btf_map]
pub static XLB_VIP_BLOOM: Array<u64, { VIP_BLOOM_WORDS as usize }> = Array::new();

/// This balancer's region tunnel addresses: tunnel packets addressed to one of them come from
/// another region's xlb host (failed-over flows, capacity probes) and are stripped here.
#[btf_map]
pub static XLB_REGION_ADDRS: HashMap<LocalAddr, u8, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();
