//! The one place this crate takes its atomics from: `core` normally, loom's model-checked
//! atomics under `--cfg loom`. Nothing else in the crate names `core::sync::atomic` directly.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
