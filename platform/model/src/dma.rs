//! Heap-backed DMA memory. The only `unsafe` code of the model lives here.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_hal::{DmaAllocator, DmaError, DmaRegion};

/// A device access outside every live allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemError {
    /// Bus address of the first byte of the refused access.
    pub addr: u64,
    /// Length of the refused access, in bytes.
    pub len: usize,
}

#[derive(Default)]
struct Registry {
    /// start address -> layout of each live allocation.
    live: BTreeMap<u64, Layout>,
    allocs: u64,
}

/// Heap DMA allocator; the bus address of a byte is its host virtual address. Clones share the
/// registry, so a device model holding a clone can check every access it makes.
#[derive(Clone, Default)]
pub struct HostDma {
    reg: Arc<Mutex<Registry>>,
}

impl HostDma {
    /// An allocator with an empty registry of its own.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of allocations made so far.
    pub fn allocations(&self) -> u64 {
        self.lock().allocs
    }

    fn check(reg: &Registry, addr: u64, len: usize) -> Result<(), MemError> {
        let err = MemError { addr, len };
        let (start, layout) = reg.live.range(..=addr).next_back().ok_or(err)?;
        let end = addr.checked_add(len as u64).ok_or(err)?;
        if end <= start + layout.size() as u64 {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Device read of `buf.len()` bytes at bus address `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let reg = self.lock();
        Self::check(&reg, addr, buf.len())?;
        // SAFETY: `addr..addr+len` lies inside a live allocation made by `alloc` below (checked
        // under the registry lock, which `free` also takes, so it cannot be freed meanwhile);
        // `buf` is a distinct Rust allocation. Bytes may be concurrently written by the driver
        // only in multi-threaded tests that share a buffer, which the model's users avoid.
        unsafe {
            std::ptr::copy_nonoverlapping(addr as usize as *const u8, buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Device write of `data` at bus address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let reg = self.lock();
        Self::check(&reg, addr, data.len())?;
        // SAFETY: as in `read`: the destination is inside a live allocation, checked under the
        // lock; `data` does not overlap it (it is model-owned memory).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), addr as usize as *mut u8, data.len())
        };
        Ok(())
    }

    /// Live allocations (blocks not yet returned with `free`).
    pub fn live_allocations(&self) -> usize {
        self.lock().live.len()
    }

    /// Returns every live allocation to the heap (for fuzz loops and long test runs: the driver
    /// has no teardown for everything it allocates).
    ///
    /// # Safety
    ///
    /// No [`DmaRegion`] handed out by this allocator (or its clones) may be used afterwards, and
    /// no device model may access its memory any more.
    pub unsafe fn free_all(&self) {
        let mut reg = self.lock();
        for (bus, layout) in std::mem::take(&mut reg.live) {
            // SAFETY: every registered block came from `alloc_zeroed(layout)` in `alloc` and is
            // removed from the registry here, so it is freed once; the caller promises nothing
            // uses it any more.
            unsafe { dealloc(bus as usize as *mut u8, layout) };
        }
    }

    /// Device read of a little-endian `u64` at bus address `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Device read of a little-endian `u32` at bus address `addr`.
    pub fn read_u32(&self, addr: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Device write of `v` as a little-endian `u32` at bus address `addr`.
    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), MemError> {
        self.write(addr, &v.to_le_bytes())
    }
}

impl DmaAllocator for HostDma {
    fn alloc(&self, len: usize, align: usize) -> Result<DmaRegion, DmaError> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DmaError::BadRequest);
        }
        let layout =
            Layout::from_size_align(len, align.max(8)).map_err(|_| DmaError::BadRequest)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(DmaError::Exhausted)?;
        let bus = ptr.as_ptr() as usize as u64;
        let mut reg = self.lock();
        reg.live.insert(bus, layout);
        reg.allocs += 1;
        // SAFETY: the block is freshly allocated, `len` bytes, valid until `free`; the "device"
        // (a model holding this allocator) sees it at its virtual address, which is `bus`.
        Ok(unsafe { DmaRegion::from_raw(ptr, bus, len) })
    }

    fn free(&self, region: DmaRegion) {
        let (ptr, bus, len) = region.into_raw();
        let mut reg = self.lock();
        // Parts split off a block are leaked (allowed by the allocator contract); only a whole
        // block is returned to the heap.
        if let Some(layout) = reg.live.get(&bus).copied() {
            if layout.size() == len {
                reg.live.remove(&bus);
                // SAFETY: `ptr` came from `alloc_zeroed(layout)` above and is freed once (it was
                // still registered).
                unsafe { dealloc(ptr.as_ptr(), layout) };
            }
        }
    }
}
