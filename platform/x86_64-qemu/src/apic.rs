//! The local APIC (xAPIC, MMIO at the base in IA32_APIC_BASE): enable, EOI, the periodic timer,
//! and the INIT/SIPI inter-processor interrupts that start application processors.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1B;
const ID: usize = 0x20;
const EOI: usize = 0xB0;
const SVR: usize = 0xF0;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const TIMER_INIT: usize = 0x380;
const TIMER_CUR: usize = 0x390;
const TIMER_DIV: usize = 0x3E0;

static BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);

fn reg(off: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + off) as *mut u32
}
fn read(off: usize) -> u32 {
    // SAFETY: the APIC page is identity-mapped uncached (paging maps 0xFEC00000..4 GiB UC) and
    // `off` is one of the register offsets above.
    unsafe { reg(off).read_volatile() }
}
fn write(off: usize, v: u32) {
    // SAFETY: as `read`.
    unsafe { reg(off).write_volatile(v) }
}

/// Enables this core's local APIC (global enable bit + software enable in SVR).
pub fn enable() {
    let mut msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: reading/writing IA32_APIC_BASE only (re)enables the xAPIC at its current base.
    unsafe {
        let v = msr.read();
        BASE.store(v & 0xF_FFFF_F000, Ordering::Relaxed);
        msr.write(v | (1 << 11));
    }
    write(SVR, 0x100 | crate::arch::SPURIOUS_VECTOR as u32);
}

pub fn id() -> u32 {
    read(ID) >> 24
}

pub fn eoi() {
    write(EOI, 0);
}

/// Starts the periodic timer at `hz` interrupts per second on this core, calibrated against the TSC.
pub fn start_timer(hz: u32) {
    write(TIMER_DIV, 0x3); // divide by 16
    write(LVT_TIMER, 1 << 16); // masked, one-shot, for calibration
    write(TIMER_INIT, u32::MAX);
    crate::time::delay_us(1000);
    let per_ms = u32::MAX - read(TIMER_CUR);
    let count = (per_ms as u64 * 1000 / hz as u64).max(1) as u32;
    write(LVT_TIMER, (1 << 17) | crate::arch::TIMER_VECTOR as u32); // periodic
    write(TIMER_INIT, count);
}

/// Masks (or unmasks) this core's timer interrupt at its source, the LVT entry. Returns
/// whether it was masked before.
pub fn mask_timer(masked: bool) -> bool {
    const MASK: u32 = 1 << 16;
    let lvt = read(LVT_TIMER);
    write(LVT_TIMER, if masked { lvt | MASK } else { lvt & !MASK });
    lvt & MASK != 0
}

fn send_ipi(apic_id: u32, low: u32) {
    write(ICR_HIGH, apic_id << 24);
    write(ICR_LOW, low);
    while read(ICR_LOW) & (1 << 12) != 0 {
        crate::cpu::relax();
    }
}

/// A fixed-delivery interrupt with `vector` to one core.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x4000 | vector as u32);
}

/// INIT assert to one core.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x4500);
}

/// Start-up IPI: the core starts in real mode at `vector << 12`.
pub fn send_sipi(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x4600 | vector as u32);
}
