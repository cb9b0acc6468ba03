//! The one place this crate takes its atomics and its `UnsafeCell` from: `core` normally,
//! loom's model-checked versions under `--cfg loom` (so the rings loom checks are the rings
//! the firmware runs). Nothing else in the crate names `core::sync::atomic` or
//! `core::cell::UnsafeCell` directly.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU8, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, Ordering};

/// `core::cell::UnsafeCell` with loom's closure-based access API, so the same ring code
/// compiles against both.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a pointer for reading the value.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a pointer for writing the value.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
