//! The `critical-section` implementation: mask interrupts on this core *and* take a global lock
//! keyed by core, so a critical section excludes interrupt handlers on this core and every other
//! core. Re-entrant on the same core (nested sections, or an exception inside one). The restore
//! token records whether interrupts were enabled and whether this acquire took the lock.

use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::instructions::interrupts;

const NO_OWNER: usize = usize::MAX;
static OWNER: AtomicUsize = AtomicUsize::new(NO_OWNER);

const IF_WAS_SET: u8 = 1;
const TOOK_LOCK: u8 = 2;

struct KeelCs;
critical_section::set_impl!(KeelCs);

// SAFETY: acquire masks interrupts before taking the lock and release drops the lock before
// unmasking, so no interrupt on this core and no other core can be inside a section with us.
unsafe impl critical_section::Impl for KeelCs {
    unsafe fn acquire() -> u8 {
        let if_was = interrupts::are_enabled();
        interrupts::disable();
        let me = crate::cpu::core_index();
        let mut token = if if_was { IF_WAS_SET } else { 0 };
        // Only this core ever stores `me`, and with interrupts masked nothing on this core can
        // change OWNER under us: reading `me` here means we already hold it (nested section).
        if OWNER.load(Ordering::Relaxed) != me {
            while OWNER
                .compare_exchange_weak(NO_OWNER, me, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                while OWNER.load(Ordering::Relaxed) != NO_OWNER {
                    crate::cpu::relax();
                }
            }
            token |= TOOK_LOCK;
        }
        token
    }

    unsafe fn release(token: u8) {
        if token & TOOK_LOCK != 0 {
            OWNER.store(NO_OWNER, Ordering::Release);
        }
        if token & IF_WAS_SET != 0 {
            interrupts::enable();
        }
    }
}
