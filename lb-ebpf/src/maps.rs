//! Every map of the balancer object. Names and value layouts come from `lb-common`.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::{LOG_SITES, counters::MAX_COUNTERS};

/// Event counters, one `u64` per [`lb_common::counters::Counter`] per CPU.
#[btf_map]
pub static XLB_COUNTERS: PerCpuArray<u64, { MAX_COUNTERS as usize }> = PerCpuArray::new();

/// Last emission time per [`lb_common::LogSite`] per CPU, for rate-limited logging.
#[btf_map]
pub static XLB_LOG_RL: PerCpuArray<u64, { LOG_SITES as usize }> = PerCpuArray::new();
