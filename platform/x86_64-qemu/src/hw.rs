//! This platform's implementations of the `keel-hal` contract: a PCI BAR as an MMIO window, a
//! DMA pool carved from RAM the boot memory map reports, and the TSC clock. The only `unsafe`
//! here is where raw physical memory becomes a register window or a `DmaRegion`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use keel_hal::{Clock, DmaAllocator, DmaError, DmaRegion, Mmio};

use crate::pvh::MemRegion;

/// A memory BAR, identity-mapped uncached by `pci::enumerate`. Copy: every queue pair holds one.
#[derive(Clone, Copy, Debug)]
pub struct MmioWindow {
    base: usize,
    len: usize,
}

impl MmioWindow {
    /// # Safety
    /// `[base, base+len)` must be a device register window, mapped uncached, and stay so.
    pub(crate) unsafe fn new(base: u64, len: u64) -> Self {
        Self {
            base: base as usize,
            len: len as usize,
        }
    }

    fn ok(&self, off: usize, width: usize) -> bool {
        off.is_multiple_of(width) && off.checked_add(width).is_some_and(|e| e <= self.len)
    }
}

impl Mmio for MmioWindow {
    fn len(&self) -> usize {
        self.len
    }
    fn read32(&self, off: usize) -> u32 {
        if !self.ok(off, 4) {
            return 0;
        }
        // SAFETY: in bounds and aligned (checked); the window is mapped uncached per `new`.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }
    fn write32(&self, off: usize, v: u32) {
        if self.ok(off, 4) {
            // SAFETY: as `read32`.
            unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
        }
    }
    fn read64(&self, off: usize) -> u64 {
        if !self.ok(off, 8) {
            return 0;
        }
        // SAFETY: as `read32`; x86_64 performs an aligned 8-byte MMIO read as one access.
        unsafe { ((self.base + off) as *const u64).read_volatile() }
    }
    fn write64(&self, off: usize, v: u64) {
        if self.ok(off, 8) {
            // SAFETY: as `read64`.
            unsafe { ((self.base + off) as *mut u64).write_volatile(v) }
        }
    }
    /// x86_64 does not reorder stores to write-back memory (queue entries, PRP lists, data)
    /// with a later store to uncached MMIO (the doorbell): stopping the compiler is enough.
    #[inline(always)]
    fn doorbell_barrier(&self) {
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}

/// A bump allocator over one RAM range (identity-mapped write-back; x86 DMA is cache-coherent,
/// so bus address = physical = virtual). `free` leaks: allocations happen at set-up time only.
pub struct DmaPool {
    next: AtomicU64,
    end: u64,
    start: u64,
}

unsafe extern "C" {
    static __image_end: u8;
}

impl DmaPool {
    /// Takes up to `max` bytes from the largest RAM region, above the firmware image.
    pub fn from_memmap(memmap: &[MemRegion], max: u64) -> Option<Self> {
        let image_end = (&raw const __image_end as u64).next_multiple_of(2 << 20);
        let r = memmap
            .iter()
            .filter(|r| r.kind == 1)
            .max_by_key(|r| r.size)?;
        let start = r.addr.max(image_end).next_multiple_of(4096);
        let end = (r.addr + r.size).min(start.saturating_add(max));
        (end > start).then(|| Self {
            next: AtomicU64::new(start),
            end,
            start,
        })
    }

    /// Bytes in the pool.
    pub fn capacity(&self) -> u64 {
        self.end - self.start
    }
}

impl DmaAllocator for DmaPool {
    fn alloc(&self, len: usize, align: usize) -> Result<DmaRegion, DmaError> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DmaError::BadRequest);
        }
        let align = align.max(64) as u64;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let base = cur.next_multiple_of(align);
            let new = base.checked_add(len as u64).ok_or(DmaError::Exhausted)?;
            if new > self.end {
                return Err(DmaError::Exhausted);
            }
            match self
                .next
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    // SAFETY: [base, base+len) is RAM from the memory map above the image, mapped
                    // write-back, and handed out exactly once by the bump pointer.
                    unsafe { core::ptr::write_bytes(base as *mut u8, 0, len) };
                    let ptr = NonNull::new(base as *mut u8).ok_or(DmaError::Exhausted)?;
                    // SAFETY: as above; identity mapping makes the bus address the pointer value.
                    return Ok(unsafe { DmaRegion::from_raw(ptr, base, len) });
                }
                Err(c) => cur = c,
            }
        }
    }

    fn free(&self, _region: DmaRegion) {}
}

/// The TSC as `keel_hal::Clock`.
#[derive(Clone, Copy, Default)]
pub struct TscClock;

impl Clock for TscClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        crate::time::now_ns()
    }
    fn delay_us(&self, us: u64) {
        crate::time::delay_us(us)
    }
    #[inline(always)]
    fn ticks(&self) -> u64 {
        crate::cpu::rdtsc()
    }
    fn ticks_per_sec(&self) -> u64 {
        crate::time::tsc_hz()
    }
    #[inline]
    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        crate::time::ticks_to_ns(ticks)
    }
    #[inline]
    fn ns_to_ticks(&self, ns: u64) -> u64 {
        crate::time::ns_to_ticks(ns)
    }
}
