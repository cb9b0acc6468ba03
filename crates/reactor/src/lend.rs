//! Lending queue pairs to the worker core for recovery (issue 16).
//!
//! A controller's recovery (abort, queue-pair reset, controller reset) needs every live queue
//! pair of that controller in one place, and it runs admin commands that wait: so it runs on
//! the dedicated worker core, never on a poller (seed 003: a poller never blocks waiting for
//! something that needs a poller). The pairs live in the reactors of other cores. A
//! [`Lender`] is the meeting point, one slot per core:
//!
//! ```text
//! worker                     slot of core c            reactor of core c (each pass)
//! recall(c)  ──────────────▶ Home → Wanted
//!                            Wanted → Lent(q)  ◀──────  service(): lend_queue(), put q
//! take(c) → q ◀───────────── Lent → Recovering
//! ... Controller::recover(&mut [q, ...]) ...
//! give_back(c, q) ─────────▶ Recovering → Back(q)
//!                            Back → Home      ──────▶  service(): return_queue(q)
//! ```
//!
//! Nothing in it blocks: the reactor checks its slot with one atomic load per pass and keeps
//! staging I/O while its pair is away; the worker polls the slots until every pair it recalled
//! is lent (the pollers make that progress on their own). A core with no queue pair answers a
//! recall by going back to `Home` at once ([`Lender::take`] then gives `None`). The queue
//! pair itself moves under a critical section (it is state shared across cores); the state
//! byte is an atomic so the common case, nothing wanted, costs one load.

use core::cell::RefCell;

use critical_section::Mutex;
use keel_blockdev::BlockQueue;

use crate::sync::{AtomicU8, Ordering};
use crate::Reactor;

const HOME: u8 = 0;
const WANTED: u8 = 1;
const LENT: u8 = 2;
const RECOVERING: u8 = 3;
const BACK: u8 = 4;

/// Where a core's queue pair is, as the [`Lender`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LendState {
    /// With its reactor (or the core has none).
    Home,
    /// Recalled; the reactor lends it on its next pass.
    Wanted,
    /// In the slot, for the worker to take.
    Lent,
    /// Taken by the worker.
    Recovering,
    /// Given back; the reactor takes it on its next pass.
    Back,
}

/// One slot per core, for cores `0..S`, for lending queue pairs of type `Q` to the worker. (A
/// slot holds a whole queue pair while it is lent: `S` is the number of cores that can lend,
/// which may be fewer than the mesh's.)
pub struct Lender<Q, const S: usize> {
    state: [AtomicU8; S],
    slot: [Mutex<RefCell<Option<Q>>>; S],
}

impl<Q, const S: usize> Default for Lender<Q, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Q, const S: usize> Lender<Q, S> {
    /// Every core's pair at home.
    pub fn new() -> Self {
        Self {
            state: core::array::from_fn(|_| AtomicU8::new(HOME)),
            slot: core::array::from_fn(|_| Mutex::new(RefCell::new(None))),
        }
    }

    /// Where core `core`'s pair is (`Home` for a core past `S`).
    pub fn state(&self, core: usize) -> LendState {
        match self.state.get(core).map(|s| s.load(Ordering::Acquire)) {
            Some(WANTED) => LendState::Wanted,
            Some(LENT) => LendState::Lent,
            Some(RECOVERING) => LendState::Recovering,
            Some(BACK) => LendState::Back,
            _ => LendState::Home,
        }
    }

    /// Worker: asks core `core` to lend its pair. `false` if it is not at home (already
    /// recalled, lent, or on its way back) or `core` is past `S`.
    pub fn recall(&self, core: usize) -> bool {
        self.state.get(core).is_some_and(|s| {
            s.compare_exchange(HOME, WANTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Worker: whether core `core` has answered its recall (its pair is in the slot, or it had
    /// none and is back at home).
    pub fn answered(&self, core: usize) -> bool {
        matches!(self.state(core), LendState::Lent | LendState::Home)
    }

    /// Worker: takes core `core`'s lent pair out of its slot. `None` if it is not lent (a core
    /// with no pair answers a recall with none).
    pub fn take(&self, core: usize) -> Option<Q> {
        let s = self.state.get(core)?;
        if s.load(Ordering::Acquire) != LENT {
            return None;
        }
        let q = critical_section::with(|cs| self.slot[core].borrow_ref_mut(cs).take());
        if q.is_some() {
            s.store(RECOVERING, Ordering::Release);
        }
        q
    }

    /// Worker: gives core `core`'s pair back after recovery. Hands `q` back if that core's
    /// pair is not out for recovery.
    pub fn give_back(&self, core: usize, q: Q) -> Result<(), Q> {
        let Some(s) = self.state.get(core) else {
            return Err(q);
        };
        if s.load(Ordering::Acquire) != RECOVERING {
            return Err(q);
        }
        critical_section::with(|cs| *self.slot[core].borrow_ref_mut(cs) = Some(q));
        s.store(BACK, Ordering::Release);
        Ok(())
    }

    /// Reactor of core `r.core()`, once per pass: lends its pair when recalled, takes it back
    /// when it is given back. Returns `true` when it did either. One atomic load when nothing
    /// is asked.
    #[inline]
    pub fn service<'a, const C: usize, const N: usize, const W: usize>(
        &self,
        r: &mut Reactor<'a, Q, C, N, W>,
    ) -> bool
    where
        Q: BlockQueue,
    {
        let core = r.core();
        let Some(s) = self.state.get(core) else {
            return false;
        };
        match s.load(Ordering::Acquire) {
            WANTED => {
                match r.lend_queue() {
                    Some(q) => {
                        critical_section::with(|cs| *self.slot[core].borrow_ref_mut(cs) = Some(q));
                        s.store(LENT, Ordering::Release);
                    }
                    None => s.store(HOME, Ordering::Release),
                }
                true
            }
            BACK => {
                let q = critical_section::with(|cs| self.slot[core].borrow_ref_mut(cs).take());
                if let Some(q) = q {
                    if let Err(q) = r.return_queue(q) {
                        // Not this reactor's to take: leave it in the slot, for the worker.
                        critical_section::with(|cs| {
                            *self.slot[core].borrow_ref_mut(cs) = Some(q);
                        });
                        return false;
                    }
                }
                s.store(HOME, Ordering::Release);
                true
            }
            _ => false,
        }
    }
}
