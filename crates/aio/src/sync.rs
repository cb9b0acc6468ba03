//! The crate's only synchronisation primitive: state guarded by a critical section.
//!
//! Normally this is `critical_section::with` (interrupts masked on the board), so interrupt
//! handlers can never run in the middle of an update. Under `--cfg loom` the `critical-section`
//! std implementation is not loom-aware, so "interrupts masked" is modelled with a loom
//! `Mutex`: a thread standing in for the interrupt handler cannot interleave inside it.

#[cfg(not(loom))]
use core::cell::RefCell;

/// A value that is only ever touched inside a critical section.
pub(crate) struct CsCell<T> {
    #[cfg(not(loom))]
    inner: critical_section::Mutex<RefCell<T>>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

impl<T> CsCell<T> {
    #[cfg(not(loom))]
    pub(crate) const fn new(value: T) -> Self {
        Self {
            inner: critical_section::Mutex::new(RefCell::new(value)),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new(value: T) -> Self {
        Self {
            inner: loom::sync::Mutex::new(value),
        }
    }

    /// Runs `f` on the value with interrupts masked. `f` must not call back into `with` on the
    /// same cell (it would panic on the second borrow). The hooks callers pass into a section
    /// ([`crate::Aio::batch`], `start_submitted_burst`'s `desc` and `started`) run inside it,
    /// so they must not call into the same `Aio`.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        critical_section::with(|cs| f(&mut self.inner.borrow_ref_mut(cs)))
    }

    /// Loom model of the critical section: one mutex.
    #[cfg(loom)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }
}
