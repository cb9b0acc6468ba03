//! A "you have mail" flag: lets a consumer of several queues skip scanning them when nothing
//! was published since its last look (one atomic swap instead of a load per queue).

use crate::sync::{AtomicBool, Ordering};

/// Set by producers after they publish, cleared by the consumer before it looks.
///
/// Protocol: a producer publishes (e.g. enqueues on a ring), then calls [`MailFlag::notify`].
/// The consumer calls [`MailFlag::take`]; only when it returns `true` does it scan, and if the
/// scan leaves anything behind (it took one message of several, or declined one) it calls
/// `notify` itself. No message is ever missed: a producer's `notify` either comes before the
/// consumer's `take` in the flag's modification order (then `take` synchronises with it, so the
/// scan sees the publication) or after it (then the flag stays set for the next `take`).
/// Checked with loom on a stand-in publication here (`tests/loom.rs`), and on the real mesh
/// (`keel_reactor::Links` over the firmware's rings) in keel-reactor's `tests/loom.rs`, where
/// a control built with [`MailFlag::plain_store_control`] (loom build only) must lose a
/// message and does.
pub struct MailFlag {
    set: AtomicBool,
    /// Loom build only: `notify` is a plain store (see [`MailFlag::plain_store_control`]).
    #[cfg(loom)]
    plain_store: bool,
}

impl MailFlag {
    /// A flag with no mail. (Under loom, not `const`.)
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            set: AtomicBool::new(false),
        }
    }

    /// A flag with no mail.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            set: AtomicBool::new(false),
            plain_store: false,
        }
    }

    /// Loom build only: a flag whose `notify` is a plain `store(true, Release)` instead of a
    /// read-modify-write. It exists only so the models can show that they catch that mistake
    /// (a control that must fail); nothing else may use it.
    #[cfg(loom)]
    pub fn plain_store_control() -> Self {
        Self {
            set: AtomicBool::new(false),
            plain_store: true,
        }
    }

    /// Producer side, after publishing: there is mail.
    #[inline]
    pub fn notify(&self) {
        #[cfg(loom)]
        if self.plain_store {
            self.set.store(true, Ordering::Release);
            return;
        }
        // A read-modify-write, not a store: with two producers, the consumer's `take` may read
        // the second producer's write, and only an RMW carries the first producer's release
        // along with it (a plain store would break the release sequence and the consumer could
        // scan without seeing the first publication; loom finds that interleaving).
        self.set.swap(true, Ordering::Release);
    }

    /// Whether there may be mail, without clearing the flag (a hint for skipping work).
    #[inline]
    pub fn peek(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    /// Consumer side, before scanning: whether there may be mail (and the flag is now clear).
    #[inline]
    pub fn take(&self) -> bool {
        // A plain load first keeps the idle case to a read; the swap orders the scan after it.
        self.set.load(Ordering::Relaxed) && self.set.swap(false, Ordering::AcqRel)
    }
}

impl Default for MailFlag {
    fn default() -> Self {
        Self::new()
    }
}
