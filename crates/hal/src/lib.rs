//! The platform contract: what a board gives Keel.
//!
//! Everything in `crates/` reaches hardware only through these traits. A board
//! (`platform/x86_64-qemu`) or a software device model (`platform/model`) implements them, and
//! the portable application (`keel-jobs`) is generic over [`Board`]. The only `unsafe` in this
//! crate is in [`dma`], where a board hands over memory it promises is DMA-able.
//!
//! # Implementing a board
//!
//! A board is a library that boots the machine and then hands the application one value that
//! implements [`Board`]. It provides:
//!
//! * **MMIO** ([`Mmio`]): one register window per device BAR. Each call is exactly one volatile
//!   access of the stated width, so the driver can read a register once into a local. Windows
//!   come from [`Board::map_bar`]: the board has mapped the BAR uncached (device memory) before
//!   it hands the window out, which is why mapping is safe for the caller.
//! * **DMA-able memory** ([`DmaAllocator`], [`DmaRegion`]): blocks the CPU and the devices both
//!   see, each with its **bus address** (what goes into PRPs and queue base registers). On a
//!   cache-coherent machine with an identity map (x86_64 under QEMU) bus = physical = virtual.
//!   A board with an IOMMU or non-coherent DMA translates or maintains caches inside
//!   [`DmaRegion`]'s copies. A [`DmaRing`] is a region used as a ring of fixed-size entries
//!   (queues shared with a device), its length and alignment checked once when it is made.
//! * **A clock** ([`Clock`]): monotonic nanoseconds, plus an optional cheap raw tick counter
//!   ([`Clock::ticks`]) for hot-path timestamps.
//! * **Cores** ([`Cores`]): how many are online, which one the caller is on, and how work is
//!   started on them: [`Cores::run_on_each`] runs a closure on cores `0..n` at once and returns
//!   when every core has returned (a scoped spawn, so the closure may borrow the caller's
//!   stack). Pollers never block, so a board needs no scheduler: a core that is given no work
//!   halts until it is.
//! * **Device discovery** ([`Board::pci_functions`]): every PCI function the board enumerated,
//!   with its BARs assigned.
//! * **The `critical-section` Impl.** Its contract is one global section: on a multi-core
//!   board it masks interrupts on this core *and* takes a lock that excludes every other core
//!   (re-entrant on the same core). The board crate registers it with
//!   `critical_section::set_impl!`; a host build uses the crate's `std` feature.
//! * **Doorbell ordering** ([`Mmio::doorbell_barrier`]): before the driver writes a doorbell,
//!   every store it made to DMA memory (the submission queue entry, PRP lists, the data of a
//!   write) must be visible to the device. The driver calls `doorbell_barrier` between the two.
//!   On x86_64, stores to write-back memory are not reordered with a later store to uncached
//!   MMIO, so only the compiler must be stopped (`compiler_fence`). A weakly ordered CPU
//!   (Arm, RISC-V) must issue a store barrier that covers device memory there (Arm: `dmb
//!   oshst` or `dsb st`; RISC-V: `fence w,o`); the default is a full `fence(SeqCst)`, which is
//!   correct on x86_64 but **not sufficient** on Arm, so such a board must override it.
//!   Likewise, after reading a completion entry's phase bit the driver reads the rest of the
//!   entry: the loads are ordered by an `Acquire` fence inside the driver, which a weakly
//!   ordered CPU also needs for DMA memory (Arm: `dmb ishld` suffices for coherent DMA).
//!
//! * **Fault injection** (optional, for tests): [`Board::raise`] raises a CPU exception and
//!   [`Board::fault_remove`] makes a PCI function look surprise-removed (reads all ones,
//!   writes dropped, no DMA). Both default to "cannot"; a production board leaves them so.
//!
//! A second board follows `platform/x86_64-qemu`: a library (boot, paging, interrupts, SMP,
//! PCI, console, the critical-section Impl, time, DMA pool) with an entry point that builds the
//! board value and calls the application, plus a thin binary (`main`, the panic handler).
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]
#![allow(
    unsafe_code,
    reason = "DmaRegion::from_raw: a board vouches for DMA-able memory"
)]
#![warn(missing_docs)]

pub mod board;
pub mod dma;

pub use board::{Bar, BarError, Board, Cores, CoresError, CpuException, PciFunction};
pub use dma::{DmaAllocator, DmaError, DmaRegion, DmaRing};

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
    /// One 32-bit register read.
    fn read32(&self, offset: usize) -> u32;
    /// One 32-bit register write.
    fn write32(&self, offset: usize, value: u32);
    /// A 64-bit register read. Platforms without atomic 64-bit MMIO may split it low then high.
    fn read64(&self, offset: usize) -> u64;
    /// A 64-bit register write (may be split low then high, as [`Mmio::read64`]).
    fn write64(&self, offset: usize, value: u64);
    /// Makes every earlier store to DMA memory visible to the device before the next MMIO
    /// write (a doorbell). See the crate docs ("Doorbell ordering"): the default is a full
    /// fence, enough on x86_64; a weakly ordered CPU overrides it with a barrier that covers
    /// device memory, and x86_64 boards may reduce it to a compiler fence.
    #[inline(always)]
    fn doorbell_barrier(&self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
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
    /// A raw timestamp in ticks of [`Clock::ticks_per_sec`], as cheap as the platform has (the
    /// TSC on x86_64), for per-I/O timestamps. Default: nanoseconds.
    #[inline]
    fn ticks(&self) -> u64 {
        self.now_ns()
    }
    /// The rate of [`Clock::ticks`].
    fn ticks_per_sec(&self) -> u64 {
        1_000_000_000
    }
    /// Ticks to nanoseconds.
    #[inline]
    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let hz = self.ticks_per_sec();
        if hz == 1_000_000_000 {
            ticks
        } else {
            (ticks as u128 * 1_000_000_000 / hz.max(1) as u128) as u64
        }
    }
    /// Nanoseconds to ticks (for deadlines; not for hot paths).
    #[inline]
    fn ns_to_ticks(&self, ns: u64) -> u64 {
        let hz = self.ticks_per_sec();
        if hz == 1_000_000_000 {
            ns
        } else {
            (ns as u128 * hz as u128 / 1_000_000_000) as u64
        }
    }
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
    #[inline(always)]
    fn doorbell_barrier(&self) {
        (**self).doorbell_barrier()
    }
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
    fn delay_us(&self, us: u64) {
        (**self).delay_us(us)
    }
    #[inline]
    fn ticks(&self) -> u64 {
        (**self).ticks()
    }
    fn ticks_per_sec(&self) -> u64 {
        (**self).ticks_per_sec()
    }
    #[inline]
    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        (**self).ticks_to_ns(ticks)
    }
    #[inline]
    fn ns_to_ticks(&self, ns: u64) -> u64 {
        (**self).ns_to_ticks(ns)
    }
}
