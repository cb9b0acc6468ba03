//! DMA-able memory: bytes the CPU and a device both see, with the device's (bus) address.
//!
//! A [`DmaRegion`] is shared with a device that may write it at any time, so Rust references into
//! it are never handed out. All access is by volatile copies: a value read from device-writable
//! memory is read once into a local and only the local is used ("device memory is read once").
//! Every access is bounds-checked and returns a typed error instead of panicking.

use core::ptr::NonNull;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Errors from DMA memory access or allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// The access `[offset, offset+len)` does not lie within the region.
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Its length.
        len: usize,
        /// The region's length.
        region: usize,
    },
    /// The allocator has no block of that size and alignment left.
    Exhausted,
    /// Alignment was not a power of two, or size was zero.
    BadRequest,
}

/// A block of DMA-able memory.
///
/// Owning a `DmaRegion` means owning the block: it is not `Clone`, and the allocator gets it back
/// through [`DmaAllocator::free`].
#[derive(Debug)]
pub struct DmaRegion {
    ptr: NonNull<u8>,
    bus: u64,
    len: usize,
}

// SAFETY: a DmaRegion is an owned block of memory with no thread affinity; all access goes through
// volatile copies, so moving it to another core is sound.
unsafe impl Send for DmaRegion {}

impl DmaRegion {
    /// Wraps a block of DMA-able memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as the region (or anything
    /// split from it) lives, must not be accessed except through this region, and the device must
    /// see the same bytes at bus address `bus..bus+len`.
    pub unsafe fn from_raw(ptr: NonNull<u8>, bus: u64, len: usize) -> Self {
        Self { ptr, bus, len }
    }

    /// Gives the raw parts back (for an allocator's `free`).
    pub fn into_raw(self) -> (NonNull<u8>, u64, usize) {
        (self.ptr, self.bus, self.len)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for a zero-length region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits the region at `mid` into `[0, mid)` and `[mid, len)`, each owning its part (for
    /// example, per-queue slices of one shared doorbell page). Gives the region back unchanged
    /// when `mid > len`. An allocator's `free` may later receive such parts.
    pub fn split_at(self, mid: usize) -> Result<(DmaRegion, DmaRegion), DmaRegion> {
        if mid > self.len {
            return Err(self);
        }
        let Some(hi_ptr) = NonNull::new(self.ptr.as_ptr().wrapping_add(mid)) else {
            return Err(self);
        };
        let lo = DmaRegion {
            ptr: self.ptr,
            bus: self.bus,
            len: mid,
        };
        let hi = DmaRegion {
            ptr: hi_ptr,
            bus: self.bus.wrapping_add(mid as u64),
            len: self.len - mid,
        };
        Ok((lo, hi))
    }

    /// The device-visible address of byte 0.
    pub fn bus_addr(&self) -> u64 {
        self.bus
    }

    #[inline]
    fn check(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                region: self.len,
            }),
        }
    }

    /// Reads a `T` at `offset` with one volatile copy of its bytes.
    #[inline]
    pub fn read<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, DmaError> {
        let mut out = T::new_zeroed();
        self.read_bytes(offset, out.as_mut_bytes())?;
        Ok(out)
    }

    /// Writes `value` at `offset`.
    #[inline]
    pub fn write<T: IntoBytes + Immutable>(
        &self,
        offset: usize,
        value: &T,
    ) -> Result<(), DmaError> {
        self.write_bytes(offset, value.as_bytes())
    }

    /// Reads one `u16` with a single volatile load (for phase-bit polling). `offset` must be even.
    #[inline]
    pub fn read_u16(&self, offset: usize) -> Result<u16, DmaError> {
        self.check(offset, 2)?;
        if !offset.is_multiple_of(2) {
            return Err(DmaError::BadRequest);
        }
        // SAFETY: in bounds (checked), 2-aligned because the region base is at least 4-aligned by
        // the allocator contract and offset is even; valid per `from_raw`'s contract.
        Ok(unsafe { self.ptr.as_ptr().add(offset).cast::<u16>().read_volatile() })
    }

    /// Reads one little-endian `u64` with a single volatile load (a completion entry is two of
    /// them). The address must be 8-aligned ([`DmaError::BadRequest`] otherwise).
    #[inline]
    pub fn read_u64_le(&self, offset: usize) -> Result<u64, DmaError> {
        self.check(offset, 8)?;
        let p = self.ptr.as_ptr().wrapping_add(offset);
        if !(p as usize).is_multiple_of(8) {
            return Err(DmaError::BadRequest);
        }
        // SAFETY: in bounds (checked) and 8-aligned (checked); valid per `from_raw`'s contract.
        Ok(u64::from_le(unsafe { p.cast::<u64>().read_volatile() }))
    }

    /// Writes `N` little-endian `u64`s from `offset` with one volatile store each, straight from
    /// registers (a submission entry is eight of them). The address must be 8-aligned
    /// ([`DmaError::BadRequest`] otherwise).
    #[inline(always)]
    pub fn write_u64s_le<const N: usize>(
        &self,
        offset: usize,
        values: [u64; N],
    ) -> Result<(), DmaError> {
        self.check(offset, N * 8)?;
        let p = self.ptr.as_ptr().wrapping_add(offset);
        if !(p as usize).is_multiple_of(8) {
            return Err(DmaError::BadRequest);
        }
        // SAFETY: the `N * 8` bytes from `p` are in bounds (checked) and 8-aligned (checked);
        // valid per `from_raw`'s contract.
        unsafe { store_u64s_le(p.cast::<u64>(), values) };
        Ok(())
    }

    /// Writes one `u32` with a single volatile store. `offset` must be a multiple of 4.
    #[inline]
    pub fn write_u32(&self, offset: usize, value: u32) -> Result<(), DmaError> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(DmaError::BadRequest);
        }
        // SAFETY: in bounds and 4-aligned as checked; valid per `from_raw`'s contract.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Copies `dst.len()` bytes out of the region, starting at `offset`.
    #[inline]
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), DmaError> {
        self.check(offset, dst.len())?;
        // SAFETY: the source range is in bounds (checked) and valid per `from_raw`; `dst` is a
        // distinct Rust allocation, so the ranges do not overlap. The region is the device side
        // (`Device::Src`): only its bytes are read volatile, each once.
        unsafe {
            copy_device(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
                Device::Src,
            )
        };
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    #[inline]
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), DmaError> {
        self.check(offset, src.len())?;
        // SAFETY: the destination range is in bounds (checked) and valid per `from_raw`; `src`
        // is a distinct Rust allocation, so the ranges do not overlap. The region is the device
        // side (`Device::Dst`): only its bytes are written volatile, each once.
        unsafe {
            copy_device(
                src.as_ptr(),
                self.ptr.as_ptr().add(offset),
                src.len(),
                Device::Dst,
            )
        };
        Ok(())
    }

    /// Fills `[offset, offset+len)` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), DmaError> {
        self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: `offset + i < offset + len <= self.len` (checked above).
            unsafe { self.ptr.as_ptr().add(offset + i).write_volatile(byte) };
        }
        Ok(())
    }
}

/// A [`DmaRegion`] used as a ring of `entries` entries of `ES` bytes each (a queue shared with a
/// device: NVMe submission entries are 64 bytes, completion entries 16). Its length and
/// alignment are checked once, when it is made; an entry access then checks only its position
/// against `entries` (one compare), where a region access checks its byte range and alignment
/// each time. `ES` is a multiple of 8 and the base 8-aligned, so every quadword of every entry
/// is an aligned load or store.
#[derive(Debug)]
pub struct DmaRing<const ES: usize> {
    region: DmaRegion,
    entries: u16,
}

impl<const ES: usize> DmaRing<ES> {
    /// A ring of `entries` entries over `region`. Gives the region back with
    /// [`DmaError::OutOfBounds`] when it is shorter than `entries * ES` bytes (or `entries` is
    /// 0), with [`DmaError::BadRequest`] when its base is not 8-aligned (an allocator that broke
    /// the alignment contract).
    pub fn new(region: DmaRegion, entries: u16) -> Result<Self, (DmaRegion, DmaError)> {
        const {
            assert!(
                ES >= 8 && ES.is_multiple_of(8),
                "entries are whole quadwords"
            )
        };
        let len = entries as usize * ES;
        if entries == 0 || len > region.len {
            let region_len = region.len;
            return Err((
                region,
                DmaError::OutOfBounds {
                    offset: 0,
                    len,
                    region: region_len,
                },
            ));
        }
        if !(region.ptr.as_ptr() as usize).is_multiple_of(8) {
            return Err((region, DmaError::BadRequest));
        }
        Ok(Self { region, entries })
    }

    /// The region under the ring (for byte-level access, its bus address, `fill`).
    pub fn region(&self) -> &DmaRegion {
        &self.region
    }

    /// Gives the region back (for the allocator's `free`).
    pub fn into_region(self) -> DmaRegion {
        self.region
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Reads quadword `word` (0 = bytes 0..8) of entry `pos`, little-endian, with one volatile
    /// load. [`DmaError::OutOfBounds`] for a position or quadword past the ring.
    #[inline(always)]
    pub fn read_u64_le(&self, pos: u16, word: usize) -> Result<u64, DmaError> {
        if pos >= self.entries || word >= ES / 8 {
            return Err(self.out_of_bounds(pos));
        }
        let off = pos as usize * ES + word * 8;
        // SAFETY: `pos < entries` and `word < ES / 8`, so `off + 8 <= entries * ES <= len`
        // (checked in `new`); the base is 8-aligned (checked in `new`) and `ES` and `word * 8`
        // are multiples of 8, so the load is aligned; valid per `from_raw`'s contract.
        let v = unsafe {
            self.region
                .ptr
                .as_ptr()
                .add(off)
                .cast::<u64>()
                .read_volatile()
        };
        Ok(u64::from_le(v))
    }

    /// Writes `N` little-endian quadwords from the start of entry `pos` (`N * 8 <= ES`), one
    /// volatile store each, straight from registers. [`DmaError::OutOfBounds`] for a position
    /// past the ring.
    #[inline(always)]
    pub fn write_u64s_le<const N: usize>(
        &self,
        pos: u16,
        values: [u64; N],
    ) -> Result<(), DmaError> {
        const { assert!(N * 8 <= ES, "the values fit one entry") };
        if pos >= self.entries {
            return Err(self.out_of_bounds(pos));
        }
        let p = self.region.ptr.as_ptr().wrapping_add(pos as usize * ES);
        // SAFETY: `pos < entries` and `N * 8 <= ES`: the stores are inside entry `pos`, which
        // lies within the region (checked in `new`); 8-aligned as in `read_u64_le`; valid per
        // `from_raw`'s contract.
        unsafe { store_u64s_le(p.cast::<u64>(), values) };
        Ok(())
    }

    #[cold]
    fn out_of_bounds(&self, pos: u16) -> DmaError {
        DmaError::OutOfBounds {
            offset: pos as usize * ES,
            len: ES,
            region: self.entries as usize * ES,
        }
    }
}

/// Stores `values` from `p` on, little-endian, one volatile store each, straight from
/// registers. An index loop, not an iterator: built for size, the iterator adapters stay calls
/// (two per value) where this stays `N` stores.
///
/// # Safety
/// `p..p + N` valid for writes and 8-aligned.
#[inline(always)]
unsafe fn store_u64s_le<const N: usize>(p: *mut u64, values: [u64; N]) {
    let mut i = 0;
    while i < N {
        // SAFETY: `i < N`, so `p + i` lies in `p..p + N`, valid and aligned per the caller.
        unsafe { p.add(i).write_volatile(values[i].to_le()) };
        i += 1;
    }
}

/// Which side of a copy is device-visible memory.
#[derive(Clone, Copy)]
enum Device {
    Src,
    Dst,
}

/// Copies `len` bytes with volatile accesses on the device's side only (8 bytes at a time when
/// that side is 8-aligned): the compiler neither elides them nor turns them into a `memcpy`
/// call, and each device byte is read or written exactly once. The other side is the caller's
/// memory, accessed plainly, so a value just built is stored straight from registers and a
/// value just read can stay in them. `device` is a constant at every call, so the branches on
/// it fold away.
///
/// # Safety
/// `src..src+len` readable, `dst..dst+len` writable, not overlapping.
#[inline(always)]
unsafe fn copy_device(src: *const u8, dst: *mut u8, len: usize, device: Device) {
    let device_side = match device {
        Device::Src => src as usize,
        Device::Dst => dst as usize,
    };
    let mut i = 0;
    if device_side.is_multiple_of(8) {
        while i + 8 <= len {
            // SAFETY: `i + 8 <= len`, both ranges valid per the caller; the device side is
            // 8-aligned, the caller's side is accessed unaligned.
            unsafe {
                let (s, d) = (src.add(i).cast::<u64>(), dst.add(i).cast::<u64>());
                match device {
                    Device::Src => d.write_unaligned(s.read_volatile()),
                    Device::Dst => d.write_volatile(s.read_unaligned()),
                }
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: `i < len`, both ranges valid per the caller; byte accesses need no alignment.
        // Volatile on the device side only, as in the loop above.
        unsafe {
            match device {
                Device::Src => *dst.add(i) = src.add(i).read_volatile(),
                Device::Dst => dst.add(i).write_volatile(*src.add(i)),
            }
        }
        i += 1;
    }
}

/// A source of DMA-able memory. Allocation happens at set-up time (queues, buffer pools), never
/// on the I/O path.
pub trait DmaAllocator {
    /// A zeroed block of at least `len` bytes, aligned to `align` (a power of two, at least 4).
    fn alloc(&self, len: usize, align: usize) -> Result<DmaRegion, DmaError>;
    /// Returns a block. Allocators may leak instead of reusing (bump allocators do).
    fn free(&self, region: DmaRegion);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;

    /// A leaked, zeroed, 8-aligned block of 256 bytes: an access a ring wrongly let past its
    /// region still lands in memory the test owns, where the test can see it.
    fn block() -> NonNull<u8> {
        let block: &'static mut [u64; 32] = Box::leak(Box::new([0u64; 32]));
        NonNull::new(block.as_mut_ptr().cast::<u8>()).unwrap()
    }

    /// A region over bytes `offset..offset + len` of `block`.
    fn region_of(block: NonNull<u8>, offset: usize, len: usize) -> DmaRegion {
        assert!(offset + len <= 256);
        let ptr = NonNull::new(block.as_ptr().wrapping_add(offset)).unwrap();
        // SAFETY: `ptr..ptr + len` lies in a leaked (never freed) block; the test's regions
        // over it are only read and written through volatile copies, one thread; the
        // "device" is the test, which sees the same bytes.
        unsafe { DmaRegion::from_raw(ptr, 0x1000 + offset as u64, len) }
    }

    fn region(offset: usize, len: usize) -> DmaRegion {
        region_of(block(), offset, len)
    }

    #[test]
    fn a_ring_checks_its_region_when_made() {
        let ok = DmaRing::<16>::new(region(0, 64), 4).expect("4 entries of 16 bytes fit 64");
        assert_eq!((ok.entries(), ok.region().len()), (4, 64));
        let (back, e) = DmaRing::<16>::new(region(0, 64), 5).unwrap_err();
        assert_eq!(back.len(), 64, "the region comes back");
        assert!(
            matches!(
                e,
                DmaError::OutOfBounds {
                    len: 80,
                    region: 64,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            DmaRing::<16>::new(region(0, 64), 0),
            Err((_, DmaError::OutOfBounds { .. }))
        ));
        assert!(matches!(
            DmaRing::<64>::new(region(4, 128), 2),
            Err((_, DmaError::BadRequest))
        ));
    }

    #[test]
    fn ring_entries_round_trip_and_positions_past_the_ring_are_refused() {
        let b = block();
        let ring = DmaRing::<16>::new(region_of(b, 0, 64), 4).unwrap();
        ring.write_u64s_le(2, [0x1111, 0x2222]).unwrap();
        assert_eq!(ring.region().read_u64_le(32), Ok(0x1111));
        assert_eq!(ring.region().read_u64_le(40), Ok(0x2222));
        assert_eq!(ring.read_u64_le(2, 0), Ok(0x1111));
        assert_eq!(ring.read_u64_le(2, 1), Ok(0x2222));
        assert_eq!(ring.read_u64_le(3, 0), Ok(0));
        assert!(matches!(
            ring.read_u64_le(4, 0),
            Err(DmaError::OutOfBounds { offset: 64, .. })
        ));
        assert!(matches!(
            ring.read_u64_le(0, 2),
            Err(DmaError::OutOfBounds { .. })
        ));
        assert!(matches!(
            ring.write_u64s_le(4, [7u64]),
            Err(DmaError::OutOfBounds { .. })
        ));
        assert!(matches!(
            ring.write_u64s_le(u16::MAX, [7u64]),
            Err(DmaError::OutOfBounds { .. })
        ));
        // Nothing was written past the ring (the block goes on after it).
        let whole = region_of(b, 0, 128);
        for off in (64..128).step_by(8) {
            assert_eq!(whole.read_u64_le(off), Ok(0), "byte {off}");
        }
    }
}
