//! Per-CPU event counters. No atomics are needed: each CPU owns its slot.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::counters::{Counter, MAX_COUNTERS};

/// Event counters, one `u64` per [`Counter`] per CPU.
#[btf_map]
pub static XLB_COUNTERS: PerCpuArray<u64, { MAX_COUNTERS as usize }> = PerCpuArray::new();

/// Adds `n` to `counter` on the current CPU.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = XLB_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array; the slot belongs
        // to this CPU and XDP programs are not preempted on it.
        unsafe { *slot += n };
    }
}
