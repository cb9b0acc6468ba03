//! Keel's board support for bare-metal x86_64 under QEMU: a library that boots the machine and
//! hands the application one [`QemuBoard`] (the `keel-hal` contract), after the shape of
//! Tock's `boards/*` crates and OpenVMM's `minimal_rt`.
//!
//! Boot path: PVH entry (`boot`) → long mode → `keel_boot_main`: per-core GDT/TSS/IDT, TSC
//! calibration, page tables from the boot memory map, local APIC + timer, PCI enumeration (BARs
//! assigned and mapped uncached), application processors, the DMA pool — then the
//! application's entry, declared with [`entry!`].
//!
//! Flash boot (`cargo xtask flash`): the reset stub in `flash` copies the image's segments to RAM
//! and enters the same PVH entry with a minimal start info; the image's CRC32C is checked as
//! soon as the console, IDT and TSC are up, before anything else.
//!
//! This crate is the only place that knows the machine, and the only place in the firmware
//! with `unsafe`: port and MMIO access, page tables, descriptor tables, the AP trampoline, and
//! raw memory becoming DMA regions.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]
#![allow(
    unsafe_code,
    reason = "the board touches hardware: ports, MMIO, page and descriptor tables, AP start-up, DMA memory"
)]
#![warn(missing_docs)]

mod apic;
mod arch;
mod boot;
pub mod console;
mod cpu;
mod cs;
mod exit;
mod flash;
mod hw;
mod logger;
mod mem;
mod paging;
mod pci;
mod pvh;
mod smp;
mod time;

use core::fmt;

use keel_hal::{Bar, BarError, CoresError, CpuException, Mmio, PciFunction};

pub use hw::{DmaPool, MmioWindow, TscClock};

/// Most memory set aside for DMA (queues and data buffers).
const DMA_POOL_BYTES: u64 = 96 << 20;

/// Timer interrupt rate.
const TIMER_HZ: u32 = 100;

/// Most cores this image supports.
pub const MAX_CORES: usize = cpu::MAX_CORES;

/// The machine, as the application sees it.
pub struct QemuBoard {
    info: pvh::BootInfo,
    functions: heapless::Vec<PciFunction, { pci::MAX_DEVICES }>,
    cores: SmpCores,
    dma: DmaPool,
}

/// The cores of this machine, started by INIT-SIPI-SIPI, each in its poll loop.
pub struct SmpCores {
    online: usize,
}

impl QemuBoard {
    /// The boot command line (`-append`, or the flash image's config area, or fw_cfg's
    /// `opt/keel/cmdline`).
    pub fn cmdline(&self) -> &str {
        self.info.cmdline().unwrap_or("")
    }

    /// Ends the run: QEMU exits with the status `cargo xtask` reads as success.
    pub fn exit_success(&self) -> ! {
        exit::success()
    }

    /// Ends the run as a failure.
    pub fn exit_failure(&self) -> ! {
        exit::failure()
    }
}

/// Reports a panic on the console and the log, then ends the run as a failure. For the
/// application's `#[panic_handler]`.
pub fn report_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    println!("PANIC on core {}: {}", cpu::core_index(), info);
    keel_log::error!(
        "panic on core {=usize}: {}",
        cpu::core_index(),
        defmt::Display2Format(info)
    );
    exit::failure()
}

/// Declares the application's entry point: `fn(&'static QemuBoard) -> !`, called on the boot
/// core once the board is up.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn keel_app_main(board: &'static $crate::QemuBoard) -> ! {
            let main: fn(&'static $crate::QemuBoard) -> ! = $main;
            main(board)
        }
    };
}

unsafe extern "Rust" {
    /// Defined by the application through [`entry!`].
    fn keel_app_main(board: &'static QemuBoard) -> !;
}

static BOARD: static_cell::StaticCell<QemuBoard> = static_cell::StaticCell::new();

#[unsafe(no_mangle)]
extern "C" fn keel_boot_main(start_info: u32) -> ! {
    // TSC at each step (QEMU starts the TSC at 0 at reset), for the boot-phase line.
    let t_entry = cpu::rdtsc();
    cpu::init_local(0, 0);
    console::init();
    arch::init_idt();
    arch::init_core(0);
    time::calibrate();
    let t_calibrated = cpu::rdtsc();
    println!("keel: x86_64-qemu firmware {}", env!("CARGO_PKG_VERSION"));
    check_flash_image();

    let mut info = match pvh::parse(start_info) {
        Ok(i) => i,
        Err(e) => {
            println!("keel: bad PVH start info: {:?}", e);
            exit::failure()
        }
    };
    if flash::image_base().is_some() {
        pvh::fw_cfg_cmdline_override(&mut info);
    }
    if let Err(e) = paging::init(&info.memmap) {
        println!("keel: paging: {:?}", e);
        exit::failure()
    }
    cpu::UNDER_TCG.store(cpu::detect_tcg(), core::sync::atomic::Ordering::Relaxed);
    arch::disable_pic();
    apic::enable();
    cpu::init_local(0, apic::id());
    apic::start_timer(TIMER_HZ);
    x86_64::instructions::interrupts::enable();
    keel_log::info!(
        "boot core up: tsc {=u64} MHz, {=u64} MiB RAM in {=usize} regions, timer {=u32} Hz, TCG {=bool}",
        time::tsc_hz() / 1_000_000,
        info.ram_bytes() >> 20,
        info.memmap.len(),
        TIMER_HZ,
        cpu::UNDER_TCG.load(core::sync::atomic::Ordering::Relaxed)
    );
    if let Err(e) = info.cmdline() {
        keel_log::error!("command line: {}", e);
        exit::failure()
    }

    let t_platform = cpu::rdtsc();
    let ram_top = info
        .memmap
        .iter()
        .filter(|r| r.kind == 1 && r.addr < 1 << 32)
        .map(|r| r.addr + r.size)
        .max()
        .unwrap_or(0);
    let mut functions = heapless::Vec::new();
    for d in pci::enumerate(ram_top).iter() {
        keel_log::info!(
            "pci {=u8:02x}:{=u8:02x}.{=u8} {=u16:04x}:{=u16:04x} class {=u8:02x}:{=u8:02x}:{=u8:02x} bar0 {=u64:#x} ({=u64} KiB){=str}",
            d.bus, d.dev, d.func, d.vendor, d.device, d.class, d.subclass, d.prog_if,
            d.bars[0].base, d.bars[0].size >> 10,
            if d.is_nvme() { " nvme" } else { "" }
        );
        let _ = functions.push(PciFunction {
            bus: d.bus,
            dev: d.dev,
            func: d.func,
            vendor: d.vendor,
            device: d.device,
            class: d.class,
            subclass: d.subclass,
            prog_if: d.prog_if,
            bars: d.bars.map(|b| Bar {
                base: b.base,
                size: b.size,
                // `pci` records only memory BARs (an I/O BAR reads as size 0).
                memory: b.size != 0,
            }),
        });
    }
    let t_pci = cpu::rdtsc();
    let wanted = pvh::cpu_count();
    let online = smp::start_aps(wanted);
    keel_log::info!("cores online: {=usize} of {=usize}", online, wanted);
    let t_cores = cpu::rdtsc();
    let us = |t: u64| time::ticks_to_ns(t) / 1000;
    keel_log::info!(
        "boot phases (us since reset): reset to Rust {=u64} (BIOS, loader), TSC calibration {=u64}, flash check + paging + APIC {=u64}, PCI {=u64}, application processors {=u64}",
        us(t_entry),
        us(t_calibrated - t_entry),
        us(t_platform - t_calibrated),
        us(t_pci - t_platform),
        us(t_cores - t_pci)
    );

    let Some(dma) = hw::DmaPool::from_memmap(&info.memmap, DMA_POOL_BYTES) else {
        keel_log::error!("no RAM for the DMA pool");
        exit::failure()
    };
    keel_log::info!("DMA pool: {=u64} MiB", dma.capacity() >> 20);
    let board = BOARD.init(QemuBoard {
        info,
        functions,
        cores: SmpCores { online },
        dma,
    });
    // SAFETY: `keel_app_main` is defined by the application through `entry!`, with exactly
    // this signature (the macro type-checks the function it is given).
    unsafe { keel_app_main(board) }
}

/// Booted from flash: refuse to run a corrupted image (COM1 and defmt, then a failure exit).
fn check_flash_image() {
    match flash::check() {
        Ok(None) => {}
        Ok(Some((base, h))) => {
            println!(
                "keel: booted from flash image at {:#x}: {} bytes, build id {:016x}, CRC32C {:#010x} ok",
                base, h.image_len, h.build_id, h.crc
            );
            keel_log::info!(
                "flash image at {=u32:#x}: {=u32} bytes, build id {=u64:016x}, crc ok",
                base,
                h.image_len,
                h.build_id
            );
        }
        Err(e) => {
            println!("keel: flash image rejected: {}; refusing to boot", e);
            keel_log::error!(
                "flash image rejected: {}; refusing to boot",
                defmt::Display2Format(&e)
            );
            exit::failure()
        }
    }
}

impl keel_hal::Cores for SmpCores {
    fn count(&self) -> usize {
        self.online
    }

    #[inline(always)]
    fn current(&self) -> usize {
        cpu::core_index()
    }

    fn run_on_each(&self, n: usize, work: &(dyn Fn(usize) + Sync)) -> Result<(), CoresError> {
        if n > self.online {
            return Err(CoresError::NotOnline {
                wanted: n,
                online: self.online,
            });
        }
        if cpu::core_index() != 0 {
            return Err(CoresError::Busy);
        }
        smp::run_on_each(n, work)
    }

    #[inline(always)]
    fn relax(&self) {
        cpu::relax()
    }

    fn polled<R>(&self, f: impl FnOnce() -> R) -> R {
        arch::polled(f)
    }

    fn interrupts_masked<R>(&self, f: impl FnOnce() -> R) -> R {
        x86_64::instructions::interrupts::without_interrupts(f)
    }

    fn interrupts_enabled(&self) -> bool {
        x86_64::instructions::interrupts::are_enabled()
    }
}

impl keel_hal::Board for QemuBoard {
    type Mmio = MmioWindow;
    type Clock = TscClock;
    type Dma = DmaPool;
    type Cores = SmpCores;

    fn name(&self) -> &'static str {
        "x86_64-qemu"
    }

    fn clock(&self) -> TscClock {
        TscClock
    }

    fn dma(&self) -> &DmaPool {
        &self.dma
    }

    fn cores(&self) -> &SmpCores {
        &self.cores
    }

    fn pci_functions(&self) -> &[PciFunction] {
        &self.functions
    }

    fn map_bar(&self, function: &PciFunction, bar: usize) -> Result<MmioWindow, BarError> {
        let f = self
            .functions
            .iter()
            .find(|f| (f.bus, f.dev, f.func) == (function.bus, function.dev, function.func))
            .ok_or(BarError::NoSuchBar)?;
        let b = f.bars.get(bar).ok_or(BarError::NoSuchBar)?;
        if b.size == 0 || b.base == 0 {
            return Err(BarError::Unassigned);
        }
        if !b.memory {
            return Err(BarError::NotMemory);
        }
        // SAFETY: a memory BAR of a function `pci::enumerate` found, assigned and mapped
        // uncached (identity), and that mapping is never changed afterwards.
        Ok(unsafe { MmioWindow::new(b.base, b.size) })
    }

    fn fault_remove(&self, function: &PciFunction) -> bool {
        let find = |want: &dyn Fn(&PciFunction) -> bool| self.functions.iter().find(|d| want(d));
        let Some(victim) =
            find(&|d| (d.bus, d.dev, d.func) == (function.bus, function.dev, function.func))
        else {
            return false;
        };
        let standin = find(&|d| (d.vendor, d.device) == pci::STANDIN);
        // SAFETY: BAR0 of a function the board enumerated and mapped uncached at boot (after
        // the cut, the stand-in's ROM or nothing decodes it); reads of CSTS, for the log.
        let bar0 = unsafe { MmioWindow::new(victim.bars[0].base, 0x20) };
        let csts = || bar0.read32(0x1C);
        match pci::cut_off(victim, standin, csts) {
            Ok((cmd, undecoded)) => {
                keel_log::warn!(
                    "pci {=u8:02x}:{=u8:02x}.{=u8}: FAULT INJECTION (surprise removal): memory space and bus mastering off (command {=u16:#06x}): CSTS reads {=u32:#010x} undecoded (QEMU), {=u32:#010x} with the all-ones ROM over bar0 {=u64:#x}",
                    victim.bus,
                    victim.dev,
                    victim.func,
                    cmd,
                    undecoded,
                    csts(),
                    victim.bars[0].base
                );
                true
            }
            Err(e) => {
                keel_log::error!(
                    "pci {=u8:02x}:{=u8:02x}.{=u8}: cannot fake a removal: {} (needs -device pci-testdev,romfile=<BAR0-sized file of 0xFF>)",
                    victim.bus,
                    victim.dev,
                    victim.func,
                    e
                );
                false
            }
        }
    }

    fn print(&self, line: fmt::Arguments<'_>) {
        console::print(format_args!("{}\n", line));
    }

    fn timer_ticks(&self) -> Option<u64> {
        Some(arch::TICKS.load(core::sync::atomic::Ordering::Relaxed))
    }

    fn raise(&self, kind: CpuException) {
        match kind {
            // SAFETY: deliberately raises #UD; the exception handler reports it and ends the run.
            CpuException::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
            CpuException::PageFault => {
                // An address no page table maps (256 GiB); the #PF handler reports it with CR2.
                let p = 0x40_0000_0000u64 as *mut u64;
                // SAFETY: deliberately faults; the page-fault handler never returns here.
                unsafe { p.write_volatile(0xdead) };
            }
            // SAFETY: loading a null selector into SS raises #GP; the handler ends the run.
            CpuException::GeneralProtection => unsafe {
                core::arch::asm!("mov ss, {0:x}", in(reg) 0x1234u16)
            },
        }
    }

    fn reset_machine(&self) {
        // The chipset's Reset Control Register (0xCF9, PIIX3 and ICH9 alike): SYS_RST then
        // RST_CPU set — a hard reset of the machine, devices included. QEMU reboots (with
        // `-action reboot=reset`) or exits (its default `-no-reboot` here).
        cpu::outb(0xCF9, 0x02);
        cpu::outb(0xCF9, 0x06);
        // It takes effect at once; if this machine has no such register, give up after 100 ms.
        keel_hal::Clock::delay_us(&TscClock, 100_000);
    }
}
