//! The crate's only interior mutability: state owned by one core.
//!
//! An [`crate::Aio`] is a core's own handle array: only code running on that core reaches it.
//! That is a type-level fact, not a run-time one: [`LocalCell`] is a `RefCell`, so it is `!Sync`
//! and `&Aio` cannot cross to another core (or thread), and a `static` (the only thing an
//! interrupt handler can name) cannot hold one. No lock, no critical section and no interrupt
//! masking is needed for a transition: nothing else can run inside it. (Loom builds use the
//! same cell: a `!Sync` value is never shared between loom threads either.)

use core::cell::RefCell;

/// A value only ever touched by the core that owns it (`!Sync`).
pub(crate) struct LocalCell<T> {
    inner: RefCell<T>,
}

impl<T> LocalCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self {
            inner: RefCell::new(value),
        }
    }

    /// Runs `f` on the value. `f` must not call back into `with` on the same cell (it would
    /// panic on the second borrow). The hooks callers pass into a section
    /// ([`crate::Aio::batch`], `start_submitted_burst`'s `desc` and `started`) run inside it, so
    /// they must not call into the same `Aio`.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.inner.borrow_mut())
    }

    /// The value, for as long as the guard lives (the same rule as [`Self::with`]). For the
    /// per-I/O paths: built for size, the closure `with` takes stays a call of its own.
    #[inline(always)]
    pub(crate) fn borrow(&self) -> core::cell::RefMut<'_, T> {
        self.inner.borrow_mut()
    }
}
