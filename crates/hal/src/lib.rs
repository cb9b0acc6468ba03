//! The platform contract.
//!
//! Everything in `crates/` reaches hardware only through these traits; a board (`platform/x86_64-qemu`)
//! or a software device model (`platform/model`) implements them. The only `unsafe` in this crate
//! is in [`dma`], where a platform hands over memory it promises is DMA-able.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod dma;

pub use dma::{DmaAllocator, DmaError, DmaRegion};

/// Register access to one device's MMIO window (for NVMe: BAR0).
///
/// Offsets are byte offsets from the start of the window. Implementations perform exactly one
/// volatile access of the stated width per call: callers rely on that to read device registers
/// once into a local copy.
pub trait Mmio {
    /// Length of the window in bytes. Accesses past it are a caller bug and return `0` / are dropped.
    fn len(&self) -> usize;
    /// `true` when the window is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    /// A 64-bit register read. Platforms without atomic 64-bit MMIO may split it low then high.
    fn read64(&self, offset: usize) -> u64;
    fn write64(&self, offset: usize, value: u64);
}

/// Monotonic time.
pub trait Clock {
    /// Nanoseconds since an arbitrary fixed point; never goes backwards.
    fn now_ns(&self) -> u64;
    /// Busy-wait at least `us` microseconds. The default spins on [`Clock::now_ns`].
    fn delay_us(&self, us: u64) {
        let end = self.now_ns().saturating_add(us.saturating_mul(1000));
        while self.now_ns() < end {
            core::hint::spin_loop();
        }
    }
}

/// Which core the caller runs on, `0..cores()`.
pub trait CoreInfo {
    fn current_core(&self) -> usize;
    fn cores(&self) -> usize;
}

impl<T: Mmio + ?Sized> Mmio for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
    fn delay_us(&self, us: u64) {
        (**self).delay_us(us)
    }
}
