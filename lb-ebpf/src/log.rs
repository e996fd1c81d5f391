//! Rate-limited logging for rare events, forwarded by aya-log to the agent's tracing output.
//!
//! A record costs a ring-buffer reservation and a format pass, so it must never be per-packet
//! work: each [`LogSite`] may emit at most once per [`LOG_INTERVAL_NS`] per CPU.

use aya_ebpf::{btf_maps::PerCpuArray, helpers::bpf_ktime_get_ns, macros::btf_map};
use lb_common::{LOG_INTERVAL_NS, LOG_SITES, LogSite};

/// Last emission time per [`LogSite`] per CPU.
#[btf_map]
pub static XLB_LOG_RL: PerCpuArray<u64, { LOG_SITES as usize }> = PerCpuArray::new();

/// True if `site` may log now; records the emission time when it may.
#[inline(always)]
pub fn allowed(site: LogSite) -> bool {
    let Some(last) = XLB_LOG_RL.get_ptr_mut(site as u32) else {
        return false;
    };
    // SAFETY: `bpf_ktime_get_ns` has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}
