//! Keel firmware for bare-metal x86_64 under QEMU.
//!
//! Boot path: PVH entry (`boot`) → long mode → [`keel_boot_main`]: per-core GDT/TSS/IDT, TSC
//! calibration, page tables from the boot memory map, local APIC + timer, PCI enumeration,
//! application processors, then the job named on the boot command line (`jobs`).
//!
//! Flash boot (`cargo xtask flash`): the reset stub in `flash` copies the image's segments to RAM
//! and enters the same PVH entry with a minimal start info; [`check_flash_image`] then verifies
//! the image's CRC32C as soon as the console, IDT and TSC are up, before anything else.
#![no_std]
#![no_main]
#![forbid(unsafe_op_in_unsafe_fn)]

mod apic;
mod arch;
mod boot;
mod console;
mod cost;
mod cpu;
mod cs;
mod exit;
mod flash;
mod hw;
mod jobs;
mod logger;
mod mem;
mod nvme_jobs;
mod paging;
mod pci;
mod pvh;
mod reactor_job;
mod smp;
mod storage;
mod time;
mod wal_jobs;

/// Most memory set aside for DMA (queues and data buffers).
const DMA_POOL_BYTES: u64 = 96 << 20;

/// Timer interrupt rate.
const TIMER_HZ: u32 = 100;

#[unsafe(no_mangle)]
extern "C" fn keel_boot_main(start_info: u32) -> ! {
    cpu::init_local(0, 0);
    console::init();
    arch::init_idt();
    arch::init_core(0);
    time::calibrate();
    println!("keel: x86_64-qemu firmware {}", env!("CARGO_PKG_VERSION"));
    check_flash_image();

    let info = match pvh::parse(start_info) {
        Ok(i) => i,
        Err(e) => {
            println!("keel: bad PVH start info: {:?}", e);
            exit::failure()
        }
    };
    let mut info = info;
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

    let line = match info.cmdline() {
        Ok(l) => l,
        Err(e) => {
            keel_log::error!("command line: {}", e);
            exit::failure()
        }
    };
    let cmdline = match keel_cmdline::Cmdline::parse(line, "boot") {
        Ok(c) => c,
        Err(e) => {
            report_cmdline_error(e);
            exit::failure()
        }
    };

    let ram_top = info
        .memmap
        .iter()
        .filter(|r| r.kind == 1 && r.addr < 1 << 32)
        .map(|r| r.addr + r.size)
        .max()
        .unwrap_or(0);
    let devices = pci::enumerate(ram_top);
    for d in devices.iter() {
        keel_log::info!(
            "pci {=u8:02x}:{=u8:02x}.{=u8} {=u16:04x}:{=u16:04x} class {=u8:02x}:{=u8:02x}:{=u8:02x} bar0 {=u64:#x} ({=u64} KiB){=str}",
            d.bus, d.dev, d.func, d.vendor, d.device, d.class, d.subclass, d.prog_if,
            d.bars[0].base, d.bars[0].size >> 10,
            if d.is_nvme() { " nvme" } else { "" }
        );
    }
    let wanted = pvh::cpu_count();
    let online = smp::start_aps(wanted);
    keel_log::info!("cores online: {=usize} of {=usize}", online, wanted);

    let Some(dma) = hw::DmaPool::from_memmap(&info.memmap, DMA_POOL_BYTES) else {
        keel_log::error!("no RAM for the DMA pool");
        exit::failure()
    };
    keel_log::info!("DMA pool: {=u64} MiB", dma.capacity() >> 20);
    let platform = jobs::Platform {
        devices,
        cores: online,
        dma,
    };
    match jobs::run(&cmdline, &platform) {
        Ok(()) => {
            keel_log::info!("job {=str}: PASS", cmdline.job());
            exit::success()
        }
        Err(jobs::JobError::Cmdline(e)) => {
            report_cmdline_error(e);
            if let keel_cmdline::CmdlineError::UnknownOption(_) = e {
                let asked = cmdline.asked();
                if !asked.is_empty() {
                    println!("keel: job '{}' takes: {}", cmdline.job(), Joined(&asked));
                }
            }
            exit::failure()
        }
        Err(e) => {
            keel_log::error!("job {=str}: FAIL: {}", cmdline.job(), e);
            exit::failure()
        }
    }
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

/// Words joined by spaces, for a message.
struct Joined<'a>(&'a [&'a str]);

impl core::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, w) in self.0.iter().enumerate() {
            write!(f, "{}{w}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

fn report_cmdline_error(e: keel_cmdline::CmdlineError<'_>) {
    println!("keel: command line rejected: {}", e);
    keel_log::error!("command line rejected: {}", defmt::Display2Format(&e));
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    println!("PANIC on core {}: {}", cpu::core_index(), info);
    keel_log::error!(
        "panic on core {=usize}: {}",
        cpu::core_index(),
        defmt::Display2Format(info)
    );
    exit::failure()
}
