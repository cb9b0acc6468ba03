//! The board as one value: its clock, DMA memory, cores and devices.
//!
//! The application (`keel-jobs`) is generic over [`Board`], so the same selftest, bench,
//! reactor and log code runs on the firmware under QEMU and in `cargo test` against the
//! software model.

use core::fmt;

use crate::{Clock, DmaAllocator, Mmio};

/// One base address register of a PCI function, as the board assigned it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bar {
    /// Bus address of the window (0: unassigned or not implemented).
    pub base: u64,
    /// Size in bytes (0: not implemented).
    pub size: u64,
    /// A memory BAR (I/O-port BARs cannot be mapped as MMIO).
    pub memory: bool,
}

/// A PCI function the board enumerated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciFunction {
    /// Bus number.
    pub bus: u8,
    /// Device number on the bus.
    pub dev: u8,
    /// Function number.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// BAR0..BAR5 (a 64-bit BAR occupies its slot; the next slot is then empty).
    pub bars: [Bar; 6],
}

impl PciFunction {
    /// Class 01:08:02: an NVM Express controller.
    pub fn is_nvme(&self) -> bool {
        (self.class, self.subclass, self.prog_if) == (0x01, 0x08, 0x02)
    }
}

/// Why [`Board::map_bar`] gave no window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BarError {
    /// No such function on this board, or the BAR index is past 5.
    NoSuchBar,
    /// The BAR is not implemented or was never assigned an address.
    Unassigned,
    /// An I/O-port BAR.
    NotMemory,
}

impl fmt::Display for BarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoSuchBar => "no such BAR",
            Self::Unassigned => "BAR not assigned",
            Self::NotMemory => "not a memory BAR",
        })
    }
}

/// Why [`Cores::run_on_each`] could not start the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CoresError {
    /// More cores asked for than are online.
    NotOnline {
        /// Cores asked for.
        wanted: usize,
        /// Cores online.
        online: usize,
    },
    /// Called from a core other than the one that received the board (core 0), or while
    /// another `run_on_each` is running.
    Busy,
}

impl fmt::Display for CoresError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOnline { wanted, online } => {
                write!(f, "{wanted} cores wanted, {online} online")
            }
            Self::Busy => f.write_str("cores busy (run_on_each is only for core 0, one at a time)"),
        }
    }
}

/// The cores of a board and how work is started on them.
pub trait Cores: Sync {
    /// Cores online, numbered `0..count()`. Core numbers are the board's, not interrupt
    /// controller ids.
    fn count(&self) -> usize;
    /// The calling core's number.
    fn current(&self) -> usize;
    /// Runs `work(core)` on cores `0..n` at once — the caller runs `work(0)` itself — and
    /// returns when every core has returned from it. The closure may borrow from the caller's
    /// stack: nothing it borrows is touched after this returns.
    fn run_on_each(&self, n: usize, work: &(dyn Fn(usize) + Sync)) -> Result<(), CoresError>;
    /// One step of a spin-wait (`pause` where that is cheap).
    #[inline(always)]
    fn relax(&self) {
        core::hint::spin_loop();
    }
    /// Runs `f` with this core's interrupts masked at their source and in the CPU, so a
    /// polled loop is not interrupted (benchmarks). Default: just runs `f`.
    fn polled<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
    /// Runs `f` with this core's interrupts masked in the CPU only.
    fn interrupts_masked<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
    /// Whether this core takes interrupts now (a critical section must restore it).
    fn interrupts_enabled(&self) -> bool {
        true
    }
}

/// A CPU exception the `fault` job raises on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuException {
    /// Invalid opcode (`ud2`).
    InvalidOpcode,
    /// Page fault (an unmapped address).
    PageFault,
    /// General protection fault.
    GeneralProtection,
}

/// Everything the application gets from a board.
pub trait Board: Sync {
    /// A device register window ([`Board::map_bar`]).
    type Mmio: Mmio + Clone + Send;
    /// The board's clock; cheap to clone, usable on every core.
    type Clock: Clock + Clone + Send + Sync;
    /// DMA-able memory, shared by every core.
    type Dma: DmaAllocator + Sync;
    /// The cores.
    type Cores: Cores;

    /// A short name for logs (`x86_64-qemu`, `model`).
    fn name(&self) -> &'static str;
    /// The clock.
    fn clock(&self) -> Self::Clock;
    /// DMA-able memory.
    fn dma(&self) -> &Self::Dma;
    /// The cores.
    fn cores(&self) -> &Self::Cores;
    /// Every PCI function the board found, BARs assigned.
    fn pci_functions(&self) -> &[PciFunction];
    /// The register window of BAR `bar` of `function` (one of [`Board::pci_functions`]),
    /// mapped uncached.
    fn map_bar(&self, function: &PciFunction, bar: usize) -> Result<Self::Mmio, BarError>;
    /// Writes one line of text to the board's console (not the binary log).
    fn print(&self, line: fmt::Arguments<'_>);
    /// Timer interrupts taken since boot, if the board has a periodic timer.
    fn timer_ticks(&self) -> Option<u64> {
        None
    }
    /// **Fault injection** (tests only, never on a production path): makes `function` look
    /// as if its slot went away (surprise removal) — from now on its register reads return
    /// all ones, its register writes are dropped and it can no longer DMA. Returns `false`
    /// where the board cannot do that (the default). Nothing brings the function back.
    ///
    /// On a real machine a removed device's memory reads complete with all ones (the root
    /// port's master abort); a board emulates it as closely as it can (QEMU: Memory Space
    /// and Bus Master Enable cleared in the function's PCI command register).
    fn fault_remove(&self, function: &PciFunction) -> bool {
        let _ = function;
        false
    }
    /// Raises `kind` on purpose (the `fault` job); returns only where the board cannot.
    fn raise(&self, kind: CpuException) {
        let _ = kind;
    }
    /// Resets the whole machine now, as a reset button would, without telling any device (the
    /// `zlog` job's crash with I/O in flight); returns only where the board cannot.
    fn reset_machine(&self) {}
}
