//! Definitions shared by the kernel side (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything a map key, a map value or a counter index means is defined here once, so the two
//! sides can never drift apart.
#![no_std]

pub mod counters;

/// Names of the maps in the balancer object, as the loader looks them up.
pub mod maps {
    /// Per-CPU array of `u64` counters, indexed by [`crate::counters::Counter`].
    pub const COUNTERS: &str = "XLB_COUNTERS";
    /// Per-CPU array holding the last time (ns, CLOCK_MONOTONIC) each rate-limited log was
    /// emitted, indexed by [`crate::LogSite`].
    pub const LOG_RATELIMIT: &str = "XLB_LOG_RL";
}

/// Names of the programs in the balancer object.
pub mod programs {
    /// The XDP balancer attached to the LB host's NIC.
    pub const BALANCER: &str = "xlb_balancer";
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
}

/// Number of [`LogSite`] slots in the rate-limit map.
pub const LOG_SITES: u32 = 8;

/// Minimum time between two records from one [`LogSite`] on one CPU: one second.
pub const LOG_INTERVAL_NS: u64 = 1_000_000_000;
