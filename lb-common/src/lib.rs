//! Definitions shared by the kernel side (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything a map key, a map value or a counter index means is defined here once, so the two
//! sides can never drift apart. Pure functions both sides must agree on bit for bit (the flow
//! hash) live here too.
#![no_std]

pub mod counters;
pub mod csum;
pub mod flow;
pub mod types;

/// Names of the maps in the balancer object, as the loader looks them up.
pub mod maps {
    /// Per-CPU array of `u64` counters, indexed by [`crate::counters::Counter`].
    pub const COUNTERS: &str = "XLB_COUNTERS";
    /// Per-CPU array holding the last time (ns, CLOCK_MONOTONIC) each rate-limited log was
    /// emitted, indexed by [`crate::LogSite`].
    pub const LOG_RATELIMIT: &str = "XLB_LOG_RL";
    /// Hash map [`crate::types::VipKey`] -> [`crate::types::VipMeta`].
    pub const VIPS: &str = "XLB_VIPS";
    /// Array of [`crate::types::Backend`], indexed by backend id.
    pub const BACKENDS: &str = "XLB_BACKENDS";
    /// Array of maps: each entry is one VIP's Maglev table (an array of backend ids).
    pub const MAGLEV: &str = "XLB_MAGLEV";
    /// Per-CPU LRU hash [`crate::types::FlowKey`] -> [`crate::types::FlowValue`].
    pub const FLOWS: &str = "XLB_FLOWS";
    /// Single-entry array holding [`crate::types::LbConfig`].
    pub const CONFIG: &str = "XLB_CONFIG";
    /// Per-CPU array of [`crate::types::Stats`], indexed by VIP id.
    pub const VIP_STATS: &str = "XLB_VIP_STATS";
    /// Per-CPU array of [`crate::types::Stats`], indexed by backend id.
    pub const BACKEND_STATS: &str = "XLB_BACKEND_STATS";
    /// Hash map [`crate::types::LocalAddr`] -> `VIP_ADDR_F_*` flags: every VIP address (for
    /// ICMP and later fragments, which carry no ports).
    pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS";
    /// Array of [`crate::types::VipState`] by VIP id.
    pub const VIP_STATE: &str = "XLB_VIP_STATE";
    /// Array of `u64` words: a one-hash bloom filter of VIP addresses, so traffic to other
    /// addresses is passed after one array lookup.
    pub const VIP_BLOOM: &str = "XLB_VIP_BLOOM";
    /// LRU hash [`crate::types::FragKey`] -> [`crate::types::FragValue`].
    pub const FRAGS: &str = "XLB_FRAGS";
    /// Decapsulator: hash set of [`crate::types::LocalAddr`] it strips tunnels for.
    pub const DECAP_ADDRS: &str = "XLB_DECAP_ADDRS";
    /// This balancer's region tunnel addresses: other regions' xlb hosts send failed-over
    /// flows (and capacity probes) there.
    pub const REGION_ADDRS: &str = "XLB_REGION_ADDRS";
}

/// Names of the programs in the balancer object.
pub mod programs {
    /// The XDP balancer attached to the LB host's NIC.
    pub const BALANCER: &str = "xlb_balancer";
    /// The backend-side decapsulator (a separate object, so backends carry none of the
    /// balancer's maps).
    pub const DECAP: &str = "xlb_decap";
}

/// Places in the XDP program that may log. Each is rate-limited separately, to at most one record
/// per [`LOG_INTERVAL_NS`] per CPU, so that logging never becomes per-packet work under attack.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSite {
    /// An IPv4 header with an impossible IHL or total length.
    MalformedIpv4 = 0,
    /// An IPv6 header whose payload length does not fit the frame.
    MalformedIpv6 = 1,
    /// A VIP's Maglev table is missing (the agent has not installed it yet).
    MissingTable = 2,
}

/// Number of [`LogSite`] slots in the rate-limit map.
pub const LOG_SITES: u32 = 8;

/// Minimum time between two records from one [`LogSite`] on one CPU: one second.
pub const LOG_INTERVAL_NS: u64 = 1_000_000_000;
