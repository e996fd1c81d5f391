//! Map keys and values. All `#[repr(C)]` with explicit padding, so the layout the kernel sees is
//! the layout userspace writes, with no uninitialised bytes in keys.

/// Address family of a VIP, backend or flow: [`FAMILY_V4`] or [`FAMILY_V6`].
pub type Family = u8;
/// IPv4: the address occupies the first 4 bytes of a 16-byte address field, the rest are zero.
pub const FAMILY_V4: Family = 4;
/// IPv6: all 16 bytes.
pub const FAMILY_V6: Family = 6;

/// IP protocol numbers the balancer handles.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// IPv4-in-IP encapsulation.
    pub const IPIP: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6-in-IP encapsulation.
    pub const IPV6: u8 = 41;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Most VIPs one balancer serves.
pub const MAX_VIPS: u32 = 1024;
/// Most backends (ids 0..MAX_BACKENDS) over all VIPs.
pub const MAX_BACKENDS: u32 = 65536;
/// Entries of the Maglev outer map: two per VIP, so a new table can be written beside the live
/// one and switched in with one atomic VIP update.
pub const MAX_TABLES: u32 = 2 * MAX_VIPS;
/// Size of the inner-map template; real tables are created with their own (prime) size.
pub const TABLE_TEMPLATE_SIZE: u32 = 65537;
/// Default entries of the connection table (all CPUs together): about 110 MB of kernel memory.
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;
/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists for an LRU hash map.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_INNER_MAP`: lets inner maps of one map-of-maps have different `max_entries`.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the array can be mapped into the agent's memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every Maglev table (and of the outer map's template, which must match): tables of
/// different sizes in one outer map, filled by the agent through `mmap` (one memory copy instead
/// of one syscall per slot).
pub const TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// Identifies a VIP: destination address, destination port (0 = every port) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// Address bytes; IPv4 in the first 4, the rest zero.
    pub addr: [u8; 16],
    /// Destination port in network byte order; 0 matches every port.
    pub port_be: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: Family,
}

/// VIP flag: pass the VIP's traffic to the host stack (the L7 gateway serves it).
pub const VIP_F_L7: u32 = 1 << 0;
/// VIP flag: L2 direct server return (rewrite the destination MAC only, no encapsulation).
pub const VIP_F_DSR_L2: u32 = 1 << 1;
/// VIP flag: every region of the VIP is down and its new flows go to the last resort (the
/// local table in panic). The data path counts such flows (`region_last_resort`).
pub const VIP_F_LAST_RESORT: u32 = 1 << 2;

/// What the data path needs to know about a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Dense id, indexes the per-VIP counters.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Index of the VIP's live Maglev table in the outer map.
    pub table_index: u32,
    /// Number of slots in that table (prime).
    pub table_size: u32,
    /// Incarnation of `vip_id`: bumped whenever the id is given to a VIP anew, so
    /// connection-table entries of an earlier VIP with the same id are recognised as stale.
    pub generation: u32,
    /// Number of region levels in `region_upto` / `region_backend` (0..=[`MAX_VIP_REGIONS`]);
    /// 0: the VIP has no regions and every new flow is chosen from its table.
    pub region_count: u32,
    /// A digest of the table's contents, written by the agent and never read by the data
    /// path: an agent that adopts pinned maps after a restart learns from it whether a VIP's
    /// table already holds what it would build, without reading the table back.
    pub table_digest: u64,
    /// Region split of new flows, in priority order: level `i` takes the flows whose
    /// [`crate::flow::region_point`] is below `region_upto[i]` (and not below level `i - 1`'s
    /// bound), out of [`REGION_SCALE`]. Bounds never decrease; the last used one is
    /// `REGION_SCALE`. Kept in the VIP entry, so a new split and the table it goes with are
    /// seen together (one hash-map update).
    pub region_upto: [u32; MAX_VIP_REGIONS],
    /// Per level: [`REGION_LOCAL`] (this host's own region: the VIP's Maglev table) or the id
    /// of the backend entry that stands for a remote region (its xlb host's tunnel address,
    /// flagged [`BACKEND_F_REGION`]).
    pub region_backend: [u32; MAX_VIP_REGIONS],
}

/// Most region levels one VIP lists.
pub const MAX_VIP_REGIONS: usize = 4;
/// The region split's scale: a flow's region point is in `0..REGION_SCALE`.
pub const REGION_SCALE: u32 = 1 << 16;
/// `VipMeta::region_backend` value for this host's own region (choose from the Maglev table).
pub const REGION_LOCAL: u32 = u32::MAX;

/// VIP state flag: the VIP id is in use.
pub const VIP_S_ACTIVE: u32 = 1 << 31;

/// Per-VIP-id state, read on the connection-table fast path (an array lookup instead of the
/// VIP hash lookup): `flags` holds the VIP's `VIP_F_*` bits plus [`VIP_S_ACTIVE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipState {
    /// `VIP_F_*` | [`VIP_S_ACTIVE`].
    pub flags: u32,
    /// The live incarnation of the id (see [`VipMeta::generation`]).
    pub generation: u32,
}

/// Bits of the VIP-address prefilter (`XLB_VIP_BLOOM`): one bit per address hash.
pub const VIP_BLOOM_BITS: u32 = 1 << 16;
/// Its size in 64-bit words.
pub const VIP_BLOOM_WORDS: u32 = VIP_BLOOM_BITS / 64;

/// Backend flag: the backend passes its health checks and may receive traffic, including
/// established flows. When clear, established flows are re-selected.
pub const BACKEND_F_UP: u8 = 1 << 0;
/// Backend flag: the entry stands for a remote region (the address is that region's xlb host):
/// always encapsulated, whatever the VIP's mode, and never chosen for a packet that itself
/// came from another region (one cross-region hop at most, so two regions failed over to each
/// other cannot bounce a packet between them).
pub const BACKEND_F_REGION: u8 = 1 << 1;

/// A backend (real server), indexed by its id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Address bytes; IPv4 in the first 4, the rest zero.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused id.
    pub family: Family,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// MAC address for L2 DSR VIPs (unused for encapsulation).
    pub mac: [u8; 6],
    /// Id of the VIP this backend belongs to. Never read by the data path: it lets an agent
    /// that adopts pinned maps after a restart rebuild which backend ids belong to which VIP.
    pub owner: u32,
    /// Explicit padding (always zero).
    pub _pad: [u8; 4],
}

/// A flow's identity: the 5-tuple as seen on the wire (client -> VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source (client) address; IPv4 in the first 4 bytes.
    pub src: [u8; 16],
    /// Destination (VIP) address.
    pub dst: [u8; 16],
    /// Source port, network byte order (0 for protocols without ports).
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: Family,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

/// What the connection table remembers about a flow: enough to forward its next packets
/// without looking the VIP up again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// The backend the flow is pinned to.
    pub backend_id: u32,
    /// The VIP it belongs to.
    pub vip_id: u32,
    /// That VIP's generation when the flow was pinned.
    pub generation: u32,
    /// The flow's hash ([`crate::flow::flow_hash`]), kept so established packets need not
    /// recompute it for their outer source address.
    pub hash: u32,
}

/// Balancer-wide settings, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// MAC of the interface the balancer is attached to (source of forwarded frames).
    pub lb_mac: [u8; 6],
    /// MAC of the next hop (router) that encapsulated frames are sent to.
    pub nexthop_mac: [u8; 6],
    /// Largest IP packet (bytes, outer header included) the egress link carries; 0 = no check.
    pub egress_mtu: u16,
    /// Prefix length of `encap_src_v4`: the host bits are filled per flow (32 = one address).
    pub encap_src_v4_prefix: u8,
    /// Prefix length of `encap_src_v6`.
    pub encap_src_v6_prefix: u8,
    /// Outer IPv4 source address (or prefix) for IPIP.
    pub encap_src_v4: [u8; 4],
    /// Outer IPv6 source address (or prefix) for IP6IP6 and IPv4-in-IPv6.
    pub encap_src_v6: [u8; 16],
    /// Explicit padding (always zero).
    pub _pad: [u8; 4],
}

/// A local address the decapsulator accepts tunnel packets for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalAddr {
    /// Address bytes; IPv4 in the first 4, the rest zero.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: Family,
    /// Explicit padding (always zero).
    pub _pad: [u8; 3],
}

/// `XLB_VIP_ADDRS` flag: the address has at least one L4 (forwarded) VIP.
pub const VIP_ADDR_F_L4: u32 = 1 << 0;
/// `XLB_VIP_ADDRS` flag: the address has at least one L7 VIP.
pub const VIP_ADDR_F_L7: u32 = 1 << 1;
/// `XLB_VIP_ADDRS` flag: the address has a VIP for every port (port 0), so a miss on the exact
/// port must be retried with port 0.
pub const VIP_ADDR_F_ANY_PORT: u32 = 1 << 2;
/// Most distinct VIP addresses.
pub const MAX_VIP_ADDRS: u32 = MAX_VIPS;

/// Identifies a fragmented datagram: addresses, IP identification and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Source address; IPv4 in the first 4 bytes.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// IP identification (IPv4: 16 bits; IPv6 fragment header: 32 bits).
    pub id: u32,
    /// The datagram's L4 protocol.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: Family,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

/// Where the first fragment of a datagram went, so the later ones follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    /// The backend chosen for the first fragment.
    pub backend_id: u32,
    /// The VIP it belongs to (for counters).
    pub vip_id: u32,
    /// The VIP's `VIP_F_*` flags (encapsulate or L2 DSR).
    pub vip_flags: u32,
    /// Explicit padding (always zero).
    pub _pad: u32,
}

/// Entries of the fragment table (shared by all CPUs, LRU).
pub const FRAG_ENTRIES: u32 = 65536;

/// Most local tunnel addresses one decapsulator accepts (and one balancer accepts
/// cross-region traffic on).
pub const MAX_LOCAL_ADDRS: u32 = 64;

/// Traffic counters of one VIP or backend on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (as received, before encapsulation).
    pub bytes: u64,
    /// Flows newly assigned a backend (connection-table misses and SYNs).
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    // Each impl: a plain `#[repr(C)]` struct of integers and byte arrays with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::VipMeta {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::LbConfig {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::Stats {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::LocalAddr {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::VipState {}
    // SAFETY: see above: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::FragValue {}
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipMeta>() == 64);
    assert!(core::mem::size_of::<VipState>() == 8);
    assert!(core::mem::size_of::<Backend>() == 32);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowValue>() == 16);
    assert!(core::mem::size_of::<LbConfig>() == 40);
    assert!(core::mem::size_of::<Stats>() == 24);
    assert!(core::mem::size_of::<LocalAddr>() == 20);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragValue>() == 16);
};
