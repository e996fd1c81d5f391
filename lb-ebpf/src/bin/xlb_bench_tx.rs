//! Programs for `cargo xtask bench dataplane`, never shipped: the trivial baselines the balancer
//! is compared with, the peer's drop program, and the frame-restoring entry point that every
//! measured program is reached through.
//!
//! Why a restoring entry point: in `BPF_F_TEST_XDP_LIVE_FRAMES` mode the kernel recycles its
//! page-pool pages between repetitions and resets only the `data`/`data_end` pointers, not the
//! bytes (Documentation/bpf/bpf_prog_run.rst). A program that rewrites the frame (the balancer
//! prepends an outer header over the old Ethernet header, or turns the frame into an ICMP
//! error) would then see its own output on the next repetition and measure some other path.
//! `xlb_bench_restore` writes the input frame back before tail-calling the program under test,
//! so every repetition sees the original frame; the trivial baselines go through the same entry
//! point, so its cost is in both sides of the comparison.
#![no_std]
#![no_main]
#![expect(
    missing_docs,
    reason = "#[xdp] generates an undocumented extern entry point beside the documented fn"
)]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::generated::bpf_xdp_store_bytes,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Largest frame the restore program can write back. Mirrored by
/// `lb_userspace::bench::BENCH_FRAME_MAX`.
const FRAME_MAX: usize = 2048;

/// The frame under test, as userspace wrote it. Same layout as `lb_userspace::bench::BenchFrame`.
#[repr(C)]
pub struct BenchFrame {
    /// Length of the frame in `bytes`.
    pub len: u32,
    /// When non-zero: the offset of a 4-byte field (the client's IPv4 source address) that
    /// gets a fresh value on every repetition, so each repetition is a new flow.
    pub vary_offset: u32,
    /// The frame, from the Ethernet header on.
    pub bytes: [u8; FRAME_MAX],
}

/// The frame `xlb_bench_restore` writes back on every repetition (one entry).
#[btf_map]
pub static XLB_BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

/// Slot 0: the program under test (the balancer or a trivial baseline), set by userspace.
#[btf_map]
pub static XLB_BENCH_JUMP: ProgramArray<1> = ProgramArray::new();

/// Frames the peer's drop program received: proves the forwarded frames really left through
/// the veth rather than failing at the redirect (a cheaper path than the one being measured).
#[btf_map]
pub static XLB_BENCH_SEEN: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Sequence for `BenchFrame::vary_offset`.
#[btf_map]
pub static XLB_BENCH_SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Entry point of every measured run: writes the original frame back over whatever a previous
/// repetition left in this recycled page, then tail-calls the program under test.
#[xdp]
pub fn xlb_bench_restore(ctx: XdpContext) -> u32 {
    let Some(frame) = XLB_BENCH_FRAME.get_ptr(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a pointer from a successful array lookup; array values live as long as the map.
    let frame = unsafe { &*frame };
    // The mask gives the verifier an upper bound for the helper's size argument, the zero check
    // a lower one; frames longer than the packet make the helper fail, caught below.
    let len = frame.len & (FRAME_MAX as u32 - 1);
    if len == 0 {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the helper copies `len` bytes from the map value (at least that long) into the
    // packet, checking the packet bounds itself.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, frame.bytes.as_ptr() as *mut _, len) };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if frame.vary_offset != 0 {
        // A per-CPU sequence number as the varied field: every repetition is a flow the
        // connection table has not seen (until the sequence wraps).
        let Some(seq) = XLB_BENCH_SEQ.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: this CPU's slot of a per-CPU array.
        let value = unsafe {
            *seq = (*seq).wrapping_add(1);
            *seq
        };
        let bytes = value.to_be_bytes();
        let off = frame.vary_offset & 0x3ff;
        // SAFETY: the helper bounds-checks the write against the packet.
        let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, off, bytes.as_ptr() as *mut _, 4) };
        if rc != 0 {
            return xdp_action::XDP_ABORTED;
        }
    }
    // SAFETY: a tail call never returns on success; on failure (empty slot) we fall through.
    unsafe { XLB_BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The trivial baseline for forwarded classes: bounce the frame unchanged.
#[xdp]
pub fn xlb_bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The trivial baseline for passed classes: hand the frame to the stack unchanged.
#[xdp]
pub fn xlb_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Attached to the peer veth: takes the forwarded frames (a veth delivers XDP_TX / redirected
/// frames only when its peer has an XDP program), counts and drops them.
#[xdp]
pub fn xlb_bench_drop(_ctx: XdpContext) -> u32 {
    if let Some(seen) = XLB_BENCH_SEEN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP programs are not preempted on it.
        unsafe { *seen += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

/// The same licence as the balancer's object (these programs use no GPL-only helper).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
