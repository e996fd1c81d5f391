//! The one bounds-checked way to touch packet memory.
//!
//! Every header access in the programs goes through [`PacketReader::ptr_at`], which checks
//! `data + offset + size_of::<T>() <= data_end` immediately before returning the pointer, in the
//! form the verifier tracks. No slices are ever made over packet memory.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Maximum offset the programs ever read at. Bounding offsets explicitly keeps the verifier's
/// range tracking simple even when they come from packet fields (IHL, extension lengths).
pub const MAX_OFFSET: usize = 2048;

/// A view of the frame between `data` and `data_end`. Re-create it after any head adjustment.
pub struct PacketReader {
    start: usize,
    end: usize,
}

impl PacketReader {
    /// Captures the frame bounds of `ctx`.
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// Frame length in bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// A pointer to a `T` at `offset`, or `None` if any byte of it lies past the frame or the
    /// offset exceeds [`MAX_OFFSET`].
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        if offset > MAX_OFFSET {
            return None;
        }
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }

    /// Copies a `T` out of the packet at `offset` (see [`Self::ptr_at`] for the bounds rule).
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let ptr = self.ptr_at::<T>(offset)?;
        // SAFETY: `ptr_at` proved that `size_of::<T>()` bytes at `ptr` lie inside the frame;
        // packet memory has no alignment guarantee, hence the unaligned read.
        Some(unsafe { core::ptr::read_unaligned(ptr) })
    }

    /// Writes `value` into the packet at `offset`; `None` (and nothing written) if it does not
    /// fit (see [`Self::ptr_at`]).
    #[inline(always)]
    pub fn write<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        let ptr = self.ptr_at::<T>(offset)?;
        // SAFETY: as for `read`; the frame is writable packet memory in XDP.
        unsafe { core::ptr::write_unaligned(ptr, value) };
        Some(())
    }
}
