//! Per-core identity (GS base points at this core's [`CpuLocal`]), port I/O helpers, TSC.

use core::arch::asm;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Most cores this image supports.
pub const MAX_CORES: usize = 16;

/// The first field is read through `%gs:0`, so it must stay first.
#[repr(C)]
pub struct CpuLocal {
    index: usize,
    apic_id: AtomicUsize,
}

static LOCALS: [CpuLocal; MAX_CORES] = {
    let mut i = 0;
    let mut a = [const {
        CpuLocal {
            index: 0,
            apic_id: AtomicUsize::new(0),
        }
    }; MAX_CORES];
    while i < MAX_CORES {
        a[i].index = i;
        i += 1;
    }
    a
};

/// The local APIC id core `index` recorded in `init_local` (for inter-processor interrupts).
pub fn apic_id_of(index: usize) -> Option<u32> {
    LOCALS
        .get(index)
        .map(|l| l.apic_id.load(Ordering::Relaxed) as u32)
}

/// Records the APIC id core `index` will have (before it is started, for its wake-ups).
pub fn set_apic_id(index: usize, apic_id: u32) {
    if let Some(l) = LOCALS.get(index) {
        l.apic_id.store(apic_id as usize, Ordering::Relaxed);
    }
}

/// Points GS at core `index`'s block. Called first thing on every core.
pub fn init_local(index: usize, apic_id: u32) {
    let local = &LOCALS[index];
    local.apic_id.store(apic_id as usize, Ordering::Relaxed);
    // IA32_GS_BASE only affects %gs-relative accesses, which only `core_index` makes.
    x86_64::registers::model_specific::GsBase::write(x86_64::VirtAddr::new(
        local as *const _ as u64,
    ));
}

/// This core's index, `0..cores online`.
#[inline(always)]
pub fn core_index() -> usize {
    let i: usize;
    // SAFETY: GS base points at a CpuLocal (set by `init_local` before anything calls this; before
    // that GS base is 0 and the read returns whatever is at address 0, which is mapped RAM).
    unsafe { asm!("mov {}, gs:[0]", out(reg) i, options(nostack, readonly, preserves_flags)) };
    i.min(MAX_CORES - 1)
}

/// One step of a spin-wait. `pause` on hardware and under KVM; nothing under TCG, where
/// `pause` leaves translated code and takes QEMU's global lock on the way back in, which
/// stalls the emulated devices every core is waiting for.
#[inline(always)]
pub fn relax() {
    if !UNDER_TCG.load(core::sync::atomic::Ordering::Relaxed) {
        core::hint::spin_loop();
    }
}

/// Set at boot when CPUID says QEMU's TCG is running us (hypervisor leaf "TCGTCGTCGTCG").
pub static UNDER_TCG: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Whether CPUID reports QEMU's TCG as the hypervisor.
pub fn detect_tcg() -> bool {
    use core::arch::x86_64::__cpuid;
    // Leaf 1 ECX bit 31: running under a hypervisor; leaf 0x4000_0000 (which exists when
    // that bit is set): its signature.
    let hv = __cpuid(1).ecx & (1 << 31) != 0;
    if !hv {
        return false;
    }
    let l = __cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&l.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&l.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&l.edx.to_le_bytes());
    &sig == b"TCGTCGTCGTCG"
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: only used on the fixed legacy ports this platform owns (PIC, PIT, debug exit, PCI, fw_cfg).
    unsafe { x86_64::instructions::port::Port::new(port).write(v) }
}
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    // SAFETY: as `outb`.
    unsafe { x86_64::instructions::port::Port::new(port).read() }
}
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as `outb`.
    unsafe { x86_64::instructions::port::Port::new(port).write(v) }
}
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as `outb`.
    unsafe { x86_64::instructions::port::Port::new(port).write(v) }
}
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    // SAFETY: as `outb`.
    unsafe { x86_64::instructions::port::Port::new(port).read() }
}

/// Stops this core for good (interrupts off, `hlt` forever).
pub fn halt() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
