//! Support for the data-plane benchmark (`cargo xtask bench dataplane`): the bench-only XDP
//! object (trivial baselines, the peer's drop program and the frame-restoring entry point, built
//! from `lb-ebpf/src/bin/xlb_bench_tx.rs`) and a small loader for it. Nothing here is used by
//! the agent.

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, ProgramArray},
    programs::{ProgramFd, Xdp, XdpMode, xdp::XdpLinkId},
};

use crate::loader::{LoaderError, load_xdp, xdp_mut};

/// The bench object built from `lb-ebpf` by this crate's build script.
pub static BENCH_TX_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-bench-tx"));

/// Largest frame the restoring entry point writes back (bytes, Ethernet header included).
pub const BENCH_FRAME_MAX: usize = 2048;

/// Entry point of every measured run: restores the frame, then tail-calls the program under test.
pub const PROG_RESTORE: &str = "xlb_bench_restore";
/// Trivial baseline returning `XDP_TX`.
pub const PROG_TX: &str = "xlb_bench_tx";
/// Trivial baseline returning `XDP_PASS`.
pub const PROG_PASS: &str = "xlb_bench_pass";
/// The peer veth's program: counts and drops.
pub const PROG_DROP: &str = "xlb_bench_drop";

const MAP_FRAME: &str = "XLB_BENCH_FRAME";
const MAP_JUMP: &str = "XLB_BENCH_JUMP";
const MAP_SEEN: &str = "XLB_BENCH_SEEN";

/// The frame the restoring entry point writes back; the layout of the eBPF side's `BenchFrame`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BenchFrame {
    /// Length of the frame in `bytes`.
    pub len: u32,
    /// When non-zero: offset of a 4-byte field rewritten with a per-CPU sequence number on every
    /// repetition (each repetition is then a new flow).
    pub vary_offset: u32,
    /// The frame, from the Ethernet header on; zero after `len`.
    pub bytes: [u8; BENCH_FRAME_MAX],
}

// SAFETY: `#[repr(C)]`, only integers and byte arrays, no implicit padding (4 + 4 + 2048).
unsafe impl aya::Pod for BenchFrame {}

/// The loaded bench object: every program verified and in the kernel.
pub struct BenchPrograms {
    ebpf: Ebpf,
}

impl BenchPrograms {
    /// Loads the embedded bench object and its four programs.
    pub fn load() -> Result<Self, LoaderError> {
        let mut ebpf = aya::EbpfLoader::new().load(BENCH_TX_OBJECT)?;
        for name in [PROG_RESTORE, PROG_TX, PROG_PASS, PROG_DROP] {
            load_xdp(&mut ebpf, name)?;
        }
        Ok(Self { ebpf })
    }

    /// One of the bench programs ([`PROG_RESTORE`], [`PROG_TX`], [`PROG_PASS`], [`PROG_DROP`]).
    pub fn program(&self, name: &'static str) -> Result<&Xdp, LoaderError> {
        let program = self.ebpf.program(name).ok_or(LoaderError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| LoaderError::Program { name, source })
    }

    /// The file descriptor of one of the bench programs, for [`BenchPrograms::set_target`].
    pub fn fd(&self, name: &'static str) -> Result<&ProgramFd, LoaderError> {
        self.program(name)?
            .fd()
            .map_err(|source| LoaderError::Program { name, source })
    }

    /// Makes `program` the one the restoring entry point tail-calls.
    pub fn set_target(&mut self, program: &ProgramFd) -> Result<(), LoaderError> {
        let name = MAP_JUMP;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(LoaderError::Missing { kind: "map", name })?;
        let mut jump =
            ProgramArray::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
        jump.set(0, program, 0)
            .map_err(|source| LoaderError::Map { name, source })
    }

    /// Sets the frame the restoring entry point writes back (see [`BenchFrame::vary_offset`]). Panics if it is longer than
    /// [`BENCH_FRAME_MAX`] - 1 (the eBPF side masks the length to that).
    pub fn set_frame(&mut self, frame: &[u8], vary_offset: u32) -> Result<(), LoaderError> {
        assert!(
            !frame.is_empty() && frame.len() < BENCH_FRAME_MAX,
            "bench frames are 1..{BENCH_FRAME_MAX} bytes"
        );
        let mut value = BenchFrame {
            len: frame.len() as u32,
            vary_offset,
            bytes: [0; BENCH_FRAME_MAX],
        };
        value.bytes[..frame.len()].copy_from_slice(frame);
        let name = MAP_FRAME;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(LoaderError::Missing { kind: "map", name })?;
        let mut array: Array<&mut MapData, BenchFrame> =
            Array::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
        array
            .set(0, value, 0)
            .map_err(|source| LoaderError::Map { name, source })
    }

    /// Frames the drop program has received so far, summed over CPUs.
    pub fn seen(&self) -> Result<u64, LoaderError> {
        let name = MAP_SEEN;
        let map = self
            .ebpf
            .map(name)
            .ok_or(LoaderError::Missing { kind: "map", name })?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
        let per_cpu = array
            .get(&0, 0)
            .map_err(|source| LoaderError::Map { name, source })?;
        Ok(per_cpu.iter().sum())
    }

    /// Attaches the drop program to `interface` in native mode (in the calling thread's network
    /// namespace); it stays attached until this object is dropped.
    pub fn attach_drop(&mut self, interface: &str) -> Result<XdpLinkId, LoaderError> {
        xdp_mut(&mut self.ebpf, PROG_DROP)?
            .attach(interface, XdpMode::Driver)
            .map_err(|source| LoaderError::Attach {
                interface: interface.to_string(),
                mode: crate::loader::AttachMode::Native,
                source,
                hint: "",
            })
    }
}
