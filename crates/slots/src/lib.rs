//! Fixed-capacity, heap-free slot allocation for the Keel I/O path.
//!
//! * [`FreeBitmap`]: an atomic bitmap of free slot indexes. Release sets a bit with one
//!   `fetch_or` (never loops, never blocks); acquire claims a set bit with `fetch_and`, scanning
//!   from a hint so repeated acquires amortise.
//! * [`SlotPool`]: a [`FreeBitmap`] plus a per-slot generation counter, handing out
//!   [`Handle`]s (index + generation). Lookups are O(1); a handle whose slot has since been
//!   released (and maybe reused) is reported as [`SlotError::Stale`].
//! * [`SlotArray`]: a [`SlotPool`] with a typed, preallocated value per slot.
//! * [`Teardown`]: exactly-once close of an object shared by several cores (the HAProxy
//!   `FD_MUST_CLOSE` fix): the close is decided only by atomically clearing a must-close flag,
//!   never by "I seem to be the last user".
//! * [`MailFlag`]: "you have mail" for a consumer of several queues, so an idle poll is one
//!   load instead of one per queue.
//!
//! All atomics come from one internal `sync` module, which swaps in loom's under `--cfg loom`
//! (so under loom the constructors are not `const`).
//!
//! ```
//! use keel_slots::{words_for, SlotError, SlotPool};
//!
//! static POOL: SlotPool<100, { words_for(100) }> = SlotPool::new();
//!
//! let h = POOL.acquire()?;
//! let raw = h.to_raw(); // e.g. carried through a device or a message
//! let back = POOL.handle_from_raw(raw)?; // range-checked
//! POOL.release(back)?;
//! assert!(matches!(POOL.validate(h), Err(SlotError::Stale { .. })));
//! assert!(POOL.handle_from_raw(100).is_err()); // index 100 is out of range
//! # Ok::<(), SlotError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

mod array;
mod bitmap;
mod handle;
mod mail;
mod pool;
pub(crate) mod sync;
mod teardown;
#[cfg(all(test, not(loom)))]
mod untrusted;

pub use array::SlotArray;
pub use bitmap::{words_for, Claimed, FreeBitmap};
pub use handle::{Handle, SlotError, GENERATION_BITS, INDEX_BITS, MAX_SLOTS};
pub use mail::MailFlag;
pub use pool::SlotPool;
pub use teardown::{CloseDuty, Refused, Teardown, TeardownError, UserId, MAX_USERS};
