//! A deterministic clock for host tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Manual monotonic time shared by clones. Every `now_ns` call moves time on by 100 ns so
/// polling loops always make progress; `delay_us` jumps ahead instead of sleeping.
#[derive(Debug, Clone, Default)]
pub struct ModelClock {
    ns: Arc<AtomicU64>,
}

impl ModelClock {
    /// A clock at 0 ns, with its own time (not shared with any other clock).
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward by `ms` milliseconds, for this clock and every clone of it.
    pub fn advance_ms(&self, ms: u64) {
        self.ns.fetch_add(ms * 1_000_000, Ordering::SeqCst);
    }
}

impl keel_hal::Clock for ModelClock {
    fn now_ns(&self) -> u64 {
        self.ns.fetch_add(100, Ordering::SeqCst) + 100
    }

    fn delay_us(&self, us: u64) {
        self.ns.fetch_add(us.saturating_mul(1000), Ordering::SeqCst);
    }
}
