//! Application-processor bring-up (INIT-SIPI-SIPI through a trampoline copied to 0x8000) and the
//! per-core poll loop that every AP enters. Work reaches an AP through its mailbox: the boot core
//! posts a function, the AP runs it to completion and marks it done.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::cpu::MAX_CORES;

const AP_STACK: usize = 256 * 1024;
/// Written at the bottom of every AP stack; checked after each piece of work (no guard pages:
/// the identity map uses 2 MiB pages), so an overflow is reported instead of going unnoticed.
const CANARY: u64 = 0x6b65_656c_5f53_544b;
const CANARY_WORDS: usize = 64;

#[repr(C, align(16))]
struct Stack([u8; AP_STACK]);
struct Stacks(core::cell::UnsafeCell<[Stack; MAX_CORES]>);
// SAFETY: AP i uses stack i and nothing else touches it; the boot core only takes its address.
unsafe impl Sync for Stacks {}
static STACKS: Stacks = Stacks(core::cell::UnsafeCell::new(
    [const { Stack([0; AP_STACK]) }; MAX_CORES],
));

static ONLINE: [AtomicBool; MAX_CORES] = [const { AtomicBool::new(false) }; MAX_CORES];
static ONLINE_COUNT: AtomicUsize = AtomicUsize::new(1);

/// A job for one core: `fn(core_index, arg)`.
pub type Work = fn(usize, usize);
static MAILBOX: [AtomicUsize; MAX_CORES] = [const { AtomicUsize::new(0) }; MAX_CORES];
static MAILBOX_ARG: [AtomicUsize; MAX_CORES] = [const { AtomicUsize::new(0) }; MAX_CORES];
static BUSY: [AtomicBool; MAX_CORES] = [const { AtomicBool::new(false) }; MAX_CORES];

pub fn online() -> usize {
    ONLINE_COUNT.load(Ordering::Acquire)
}

pub fn is_online(core: usize) -> bool {
    core < MAX_CORES && ONLINE[core].load(Ordering::Acquire)
}

/// Starts cores 1..wanted (APIC IDs equal core indices under QEMU). Returns how many are online.
pub fn start_aps(wanted: usize) -> usize {
    ONLINE[0].store(true, Ordering::Release);
    let wanted = wanted.min(MAX_CORES);
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
    #[allow(clippy::needless_range_loop)] // `core` is also the APIC ID and the stack index
    for core in 1..wanted {
        // SAFETY: only the address of AP `core`'s stack is taken; the AP alone uses it.
        let top = unsafe { (*STACKS.0.get()).as_ptr().add(core) } as u64 + AP_STACK as u64;
        patch(t.stack_offset, top);
        patch(t.arg_offset, core as u64);
        core::sync::atomic::fence(Ordering::SeqCst);
        let apic_id = core as u32;
        crate::apic::send_init(apic_id);
        crate::time::delay_us(10_000);
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
            keel_log::error!("core {=usize} did not come online", core);
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
    unsafe { (*STACKS.0.get()).as_mut_ptr().add(core) as *mut u64 }
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
            let arg = MAILBOX_ARG[core].load(Ordering::Relaxed);
            // SAFETY: only `post` stores into MAILBOX, and only values cast from a `Work`.
            let f: Work = unsafe { core::mem::transmute::<usize, Work>(w) };
            f(core, arg);
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

#[derive(Debug, defmt::Format, PartialEq, Eq)]
pub enum PostError {
    NotOnline,
    Busy,
}

/// Hands `work(core, arg)` to an application processor's poll loop.
pub fn post(core: usize, work: Work, arg: usize) -> Result<(), PostError> {
    if core == 0 || !is_online(core) {
        return Err(PostError::NotOnline);
    }
    if BUSY[core].swap(true, Ordering::AcqRel) {
        return Err(PostError::Busy);
    }
    MAILBOX_ARG[core].store(arg, Ordering::Relaxed);
    MAILBOX[core].store(work as usize, Ordering::Release);
    if let Some(id) = crate::cpu::apic_id_of(core) {
        crate::apic::send_fixed(id, crate::arch::WAKE_VECTOR);
    }
    Ok(())
}

/// `true` once the work last posted to `core` has returned.
pub fn done(core: usize) -> bool {
    core < MAX_CORES && !BUSY[core].load(Ordering::Acquire)
}
