//! Application-processor bring-up (INIT-SIPI-SIPI through a trampoline copied to 0x8000) and the
//! per-core poll loop that every AP enters. Work reaches an AP through its mailbox: the boot core
//! posts a closure ([`run_on_each`]), the AP runs it to completion and marks it done, and the
//! boot core waits for every AP before it returns, so the closure may borrow its stack.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::cpu::MAX_CORES;

/// Each AP's stack: a core may run a reactor per drive (~66 KiB each) beside its queue pairs.
const AP_STACK: usize = 1024 * 1024;
/// Written at the bottom of every AP stack; checked after each piece of work (no guard pages:
/// the identity map uses 2 MiB pages), so an overflow is reported instead of going unnoticed.
const CANARY: u64 = 0x6b65_656c_5f53_544b;
const CANARY_WORDS: usize = 64;

#[repr(C, align(16))]
struct Stack([u8; AP_STACK]);
struct Stacks(core::cell::UnsafeCell<core::mem::MaybeUninit<[Stack; MAX_CORES]>>);
// SAFETY: AP i uses stack i and nothing else touches it; the boot core only takes its address.
unsafe impl Sync for Stacks {}
/// In `.uninit` (link.ld), which the boot does not zero: a stack is written before it is read,
/// and these 16 MiB were most of the `.bss` the boot zeroed (~8 ms under TCG).
#[link_section = ".uninit.ap_stacks"]
static STACKS: Stacks = Stacks(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit()));

static ONLINE: [AtomicBool; MAX_CORES] = [const { AtomicBool::new(false) }; MAX_CORES];
static ONLINE_COUNT: AtomicUsize = AtomicUsize::new(1);

/// Work for a core: `work(core)`.
type Work<'w> = &'w (dyn Fn(usize) + Sync);
/// The address of a [`Work`] that lives on the boot core's stack during [`run_on_each`] (0: none).
static MAILBOX: [AtomicUsize; MAX_CORES] = [const { AtomicUsize::new(0) }; MAX_CORES];
static BUSY: [AtomicBool; MAX_CORES] = [const { AtomicBool::new(false) }; MAX_CORES];

pub fn online() -> usize {
    ONLINE_COUNT.load(Ordering::Acquire)
}

pub fn is_online(core: usize) -> bool {
    core < MAX_CORES && ONLINE[core].load(Ordering::Acquire)
}

/// Time between INIT and the first SIPI.
const INIT_SETTLE_US: u64 = 10;

/// Starts the application processors: core `i` is the `i`-th processor the platform lists
/// (ACPI MADT order, the boot processor first), started at the local APIC id the platform
/// reports for it, so core numbers need not equal APIC ids. Without a MADT the ids are taken
/// to be `0..wanted`. Core numbers stay contiguous: a core that does not come online ends
/// the start-up. Returns how many are online.
pub fn start_aps(wanted: usize) -> usize {
    ONLINE[0].store(true, Ordering::Release);
    let bsp = crate::apic::id();
    let mut ids: heapless::Vec<u32, MAX_CORES> = heapless::Vec::new();
    let _ = ids.push(bsp);
    let listed: heapless::Vec<u32, 64> = crate::pvh::apic_ids();
    if listed.is_empty() {
        for id in (0..wanted as u32).filter(|&i| i != bsp) {
            let _ = ids.push(id);
        }
    } else {
        for &id in listed.iter().filter(|&&i| i != bsp) {
            let _ = ids.push(id);
        }
    }
    if listed.len() > MAX_CORES || wanted > MAX_CORES {
        keel_log::warn!(
            "{=usize} processors; this image drives at most {=usize}",
            listed.len().max(wanted),
            MAX_CORES
        );
    }
    let wanted = wanted.min(ids.len());
    if wanted <= 1 {
        return 1;
    }
    let t = crate::boot::trampoline();
    let dst = crate::boot::AP_TRAMPOLINE as *mut u8;
    // SAFETY: 0x8000.. is conventional RAM below the image (memory map type 1), identity-mapped
    // by paging and used by nothing else; the trampoline is a few hundred bytes.
    unsafe { core::ptr::copy_nonoverlapping(t.image.as_ptr(), dst, t.image.len()) };
    let patch = |off: usize, v: u64| {
        // SAFETY: the slot offsets come from the trampoline's own symbols, inside the copied image.
        unsafe { (dst.add(off) as *mut u64).write_volatile(v) }
    };
    patch(t.cr3_offset, crate::paging::root());
    #[allow(clippy::needless_range_loop)] // `core` indexes the ids and the stacks
    for core in 1..wanted {
        // SAFETY: only the address of AP `core`'s stack is taken; the AP alone uses it.
        let top = unsafe { (STACKS.0.get() as *const Stack).add(core) } as u64 + AP_STACK as u64;
        patch(t.stack_offset, top);
        patch(t.arg_offset, core as u64);
        core::sync::atomic::fence(Ordering::SeqCst);
        let apic_id = ids[core];
        crate::cpu::set_apic_id(core, apic_id);
        crate::apic::send_init(apic_id);
        // The MP spec's 10 ms between INIT and SIPI is for processors from before the
        // Pentium 4; like Linux on modern CPUs (`init_udelay = 0`) we give it only a moment.
        // It was 10 ms of every boot per core.
        crate::time::delay_us(INIT_SETTLE_US);
        for _ in 0..2 {
            crate::apic::send_sipi(apic_id, (crate::boot::AP_TRAMPOLINE >> 12) as u8);
            let start = crate::time::now_ns();
            while !ONLINE[core].load(Ordering::Acquire)
                && crate::time::now_ns() - start < 200_000_000
            {
                crate::cpu::relax();
            }
            if ONLINE[core].load(Ordering::Acquire) {
                break;
            }
        }
        if !ONLINE[core].load(Ordering::Acquire) {
            keel_log::error!(
                "core {=usize} (apic id {=u32}) did not come online; {=usize} cores in use",
                core,
                apic_id,
                core
            );
            break;
        }
    }
    online()
}

#[unsafe(no_mangle)]
extern "C" fn keel_ap_main(core: u64) -> ! {
    let core = core as usize;
    crate::cpu::init_local(core, 0);
    crate::arch::init_core(core);
    crate::apic::enable();
    crate::cpu::init_local(core, crate::apic::id());
    x86_64::instructions::interrupts::enable();
    ONLINE_COUNT.fetch_add(1, Ordering::AcqRel);
    keel_log::info!(
        "core {=usize} online (apic id {=u32}), entering its poll loop",
        core,
        crate::apic::id()
    );
    ONLINE[core].store(true, Ordering::Release);
    poll_loop(core)
}

fn canary(core: usize) -> *mut u64 {
    // SAFETY: only the address is computed; the AP owns its stack.
    unsafe { (STACKS.0.get() as *mut Stack).add(core) as *mut u64 }
}

fn canary_intact(core: usize) -> bool {
    // SAFETY: the lowest CANARY_WORDS words of this core's own stack, which it only reaches by
    // overflowing.
    (0..CANARY_WORDS).all(|i| unsafe { canary(core).add(i).read_volatile() } == CANARY)
}

fn poll_loop(core: usize) -> ! {
    for i in 0..CANARY_WORDS {
        // SAFETY: as `canary_intact`; this core's stack is far above its bottom here.
        unsafe { canary(core).add(i).write_volatile(CANARY) };
    }
    loop {
        let w = MAILBOX[core].load(Ordering::Acquire);
        if w != 0 {
            // SAFETY: only `run_on_each` stores into MAILBOX: the address of a `Work` on the
            // boot core's stack, which stays alive (and its closure borrowed) until this core
            // clears BUSY below, because `run_on_each` waits for that before returning.
            let work: Work<'_> = unsafe { *(w as *const Work<'_>) };
            work(core);
            if !canary_intact(core) {
                keel_log::error!(
                    "core {=usize}: stack overflow detected (canary overwritten)",
                    core
                );
                crate::exit::failure();
            }
            MAILBOX[core].store(0, Ordering::Relaxed);
            BUSY[core].store(false, Ordering::Release);
        }
        // Idle: halt until `post` sends the wake interrupt, so an idle core gives its host CPU
        // back (under emulation a spinning vCPU competes with QEMU's device thread). The check
        // runs with interrupts masked and `sti; hlt` opens them only in the instruction shadow
        // of `sti`, so a wake sent after the check still ends this `hlt`.
        x86_64::instructions::interrupts::disable();
        if MAILBOX[core].load(Ordering::Acquire) == 0 {
            x86_64::instructions::interrupts::enable_and_hlt();
        } else {
            x86_64::instructions::interrupts::enable();
        }
    }
}

/// Runs `work(core)` on cores `0..n` (this, the boot core, runs `work(0)`) and returns when
/// every core has returned from it. The caller checked `n` against the cores online.
pub fn run_on_each(n: usize, work: &(dyn Fn(usize) + Sync)) -> Result<(), keel_hal::CoresError> {
    let n = n.min(MAX_CORES);
    let slot: Work<'_> = work;
    let addr = &slot as *const Work<'_> as usize;
    let mut posted = 0;
    for core in 1..n {
        if !is_online(core) || BUSY[core].swap(true, Ordering::AcqRel) {
            break;
        }
        MAILBOX[core].store(addr, Ordering::Release);
        if let Some(id) = crate::cpu::apic_id_of(core) {
            crate::apic::send_fixed(id, crate::arch::WAKE_VECTOR);
        }
        posted = core;
    }
    if posted + 1 == n.max(1) {
        work(0);
    }
    // Wait for every core that took the work, even when one could not be posted: they
    // borrow `slot` and what `work` borrows.
    while !(1..=posted).all(|c| !BUSY[c].load(Ordering::Acquire)) {
        crate::cpu::relax();
    }
    if posted + 1 == n.max(1) {
        Ok(())
    } else {
        Err(keel_hal::CoresError::Busy)
    }
}
