//! The I/O handle lifecycle, after PostgreSQL's AIO subsystem.
//!
//! A fixed array of `N` I/O handles ([`Aio`]). Each handle moves through
//!
//! ```text
//! Idle -> HandedOut -> Defined -> Staged -> Submitted -> CompletedIo
//!      -> CompletedShared -> CompletedLocal -> Idle        (and HandedOut -> Idle)
//! ```
//!
//! * **One legality table decides every transition.** The general path function checks each
//!   move against it at run time (an illegal one is [`AioError::IllegalTransition`], never a
//!   panic); the per-I/O fast paths ([`Aio::start`], [`Aio::start_submitted`],
//!   [`Batch::complete_and_reclaim`]) are fixed chains checked against it at compile time and
//!   check only the handle's current state and generation at run time.
//! * **An `Aio` is one core's handle array, and only that core reaches it.** `Aio` is `Send`
//!   (built, then moved to its core before use) but `!Sync`, so `&Aio` cannot be given to
//!   another core or thread, and no `static` (the only thing an interrupt handler can name) can
//!   hold one. A transition therefore needs no lock and no critical section: nothing else can
//!   run inside it (see "Per-core and shared state" below).
//! * **Generations.** A handle's generation is bumped each time it returns to `Idle`. Callers
//!   hold [`IoRef`]s (index + generation). Waiting on an `IoRef` whose handle was since
//!   reclaimed (and maybe reused) reports [`WaitOutcome::Recycled`] ("already done").
//! * **State and generation are read together**, in one section. PostgreSQL's bug
//!   (pgsql-hackers, "AIO v2.5", May 2025) read the state, then logged (which processed
//!   interrupts, which reclaimed and reused the handle), then read the generation: it waited on
//!   the new owner's unsubmitted I/O and PANICked. [`Aio::wait_for_free`] takes the
//!   `(index, generation)` pair in one section before its logging hook runs (which may poll and
//!   so reclaim and reuse the handle).
//! * The free handles are a [`keel_slots::FreeBitmap`]; acquiring a handle claims a bit,
//!   returning one to `Idle` sets it.
//!
//! # Per-core and shared state
//!
//! PostgreSQL's AIO handles live in shared memory, and any backend may run an I/O's shared
//! completion; its backends protect their own state with `HOLD_INTERRUPTS`, not a lock. Keel
//! keeps that split and makes it a type: every core has its own `Aio` (a range of the handle
//! index space, [`Aio::for_range`], so handle indexes stay unique across cores), and **every
//! transition of a handle is made by the core that owns it**. An I/O for another core's queue
//! pair leaves its issuer as a message (the handle is `Submitted` when the message is sent) and
//! its result comes back as one (the issuer takes the handle `Submitted -> ... -> Idle`); the
//! owner of the queue pair never touches the issuer's handles. What really crosses cores is
//! only the message rings between them (keel-reactor's mesh: SPSC rings with atomic indices
//! and a mail flag, loom-checked) and, in the jobs, the hand-over of a whole queue pair (in a
//! `critical_section::Mutex`, the one lock every core shares, kept for that). On the board,
//! `critical-section` is a global interrupt-masked spinlock; before this split every handle
//! transition of every core took it.
//!
//! ```
//! use keel_aio::{Aio, IoDesc, IoOp, WaitOutcome};
//! use keel_slots::words_for;
//!
//! let aio: Aio<64, { words_for(64) }> = Aio::new(); // this core's handles
//!
//! let io = aio.wait_for_free(&mut || true)?; // poll closure: drive completions
//! aio.define(io, IoDesc { op: IoOp::Read, lba: 0, blocks: 8 })?;
//! aio.stage(io)?;
//! let waiter = io; // references for waiters are taken before submission
//! let desc = aio.submit(io)?; // build the device command from `desc`, command id = io.index()
//! # assert_eq!(desc.blocks, 8);
//! // ...the completion, from the completion entry's command id:
//! aio.complete_raw(io.index() as u32, Ok(4096))?;
//! assert_eq!(aio.wait(waiter, &mut || true)?, WaitOutcome::Done(Ok(4096)));
//! assert_eq!(aio.finish(io)?, Ok(4096)); // back to Idle, generation bumped
//! assert_eq!(aio.wait(waiter, &mut || true)?, WaitOutcome::Recycled);
//! # Ok::<(), keel_aio::AioError>(())
//! ```
//!
//! Another core cannot reach a core's handles: sharing `&Aio` with another thread does not
//! compile,
//!
//! ```compile_fail,E0277
//! use keel_aio::Aio;
//! let aio: Aio<64, 1> = Aio::new();
//! std::thread::scope(|s| {
//!     s.spawn(|| aio.acquire()); // `RefCell` cannot be shared between threads safely
//! });
//! ```
//!
//! and neither does putting one in a `static`, where an interrupt handler (or any core) could
//! name it:
//!
//! ```compile_fail,E0277
//! use keel_aio::Aio;
//! static AIO: Aio<64, 1> = Aio::new(); // `RefCell` cannot be shared between threads safely
//! ```
//!
//! Moving a fresh array to the core that will own it is fine (`Aio` is `Send`):
//!
//! ```
//! use keel_aio::Aio;
//! let aio: Aio<64, 1> = Aio::new();
//! std::thread::spawn(move || aio.acquire().map(|io| io.index())).join().unwrap().unwrap();
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

mod sync;

use core::fmt;

use keel_slots::{FreeBitmap, SlotError};

use crate::sync::LocalCell;

/// Whether `path` is a chain of legal moves starting at `from`. Used in `const` assertions on
/// the fixed paths written out by hand.
const fn chain_ok(from: HandleState, path: &[HandleState]) -> bool {
    let mut state = from;
    let mut i = 0;
    while i < path.len() {
        if !state.can_move_to(path[i]) {
            return false;
        }
        state = path[i];
        i += 1;
    }
    true
}

/// The lifecycle state of an I/O handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleState {
    /// Free.
    Idle,
    /// Acquired by an issuer, nothing defined yet.
    HandedOut,
    /// The operation is described ([`Aio::define`]).
    Defined,
    /// Queued locally, not yet given to the device ([`Aio::stage`]).
    Staged,
    /// Given to the device ([`Aio::submit`]).
    Submitted,
    /// The device reported completion ([`Aio::complete`], usually from the interrupt handler).
    CompletedIo,
    /// Shared completion processing done ([`Aio::complete_shared`]).
    CompletedShared,
    /// Issuer-local completion processing done ([`Aio::complete_local`]); ready to reclaim.
    CompletedLocal,
}

impl HandleState {
    /// Whether `self -> to` is a legal transition.
    #[inline(always)]
    pub const fn can_move_to(self, to: Self) -> bool {
        // One table row per state, a bit per legal successor: a load and a shift, where a
        // `match` on the pair compiles to a jump table (an indirect jump per check, which
        // costs a translated-block lookup under emulation).
        const fn bit(s: HandleState) -> u8 {
            1 << s as u8
        }
        use HandleState::*;
        const NEXT: [u8; 8] = [
            bit(HandedOut),           // Idle
            bit(Defined) | bit(Idle), // HandedOut
            bit(Staged),              // Defined
            bit(Submitted),           // Staged
            bit(CompletedIo),         // Submitted
            bit(CompletedShared),     // CompletedIo
            bit(CompletedLocal),      // CompletedShared
            bit(Idle),                // CompletedLocal
        ];
        NEXT[self as usize] & bit(to) != 0
    }

    /// Whether the device has reported completion (any `Completed*` state).
    pub const fn is_completed(self) -> bool {
        matches!(
            self,
            Self::CompletedIo | Self::CompletedShared | Self::CompletedLocal
        )
    }

    /// Whether the I/O was submitted and the handle not yet reclaimed.
    pub const fn is_in_flight(self) -> bool {
        matches!(self, Self::Submitted) || self.is_completed()
    }
}

/// What an I/O does. The reactor keeps the buffer for each handle index itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read `blocks` blocks at `lba`.
    Read,
    /// Write `blocks` blocks at `lba`.
    Write,
    /// Flush the volatile write cache.
    Flush,
}

/// The description of one I/O, set by [`Aio::define`] and returned by [`Aio::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoDesc {
    /// The operation.
    pub op: IoOp,
    /// First logical block.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u32,
}

/// Why an I/O failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoError {
    /// The device reported an error status.
    Device {
        /// The device's whole status field, flags included (NVMe layout, as
        /// `keel_blockdev::DevStatus::field`: SC, SCT, CRD, More, DNR).
        status: u16,
    },
    /// The I/O was aborted (queue deleted, controller reset).
    Aborted,
}

/// The outcome of an I/O: bytes transferred (or a command-specific value), or the failure.
pub type IoResult = Result<u32, IoError>;

/// A reference to one use of one handle: index + generation, taken before submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoRef {
    index: u16,
    generation: u32,
}

impl IoRef {
    /// A reference from its parts (e.g. rebuilt from a message). Nothing is checked here;
    /// every [`Aio`] operation range-checks the index and compares the generation.
    pub const fn new(index: u16, generation: u32) -> Self {
        Self { index, generation }
    }

    /// The handle index.
    pub const fn index(self) -> usize {
        self.index as usize
    }

    /// The handle generation this reference is for.
    pub const fn generation(self) -> u32 {
        self.generation
    }
}

/// A consistent view of one handle: everything read in one section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The state.
    pub state: HandleState,
    /// The current generation.
    pub generation: u32,
    /// The result, once the I/O completed (until the handle is reclaimed).
    pub result: Option<IoResult>,
}

/// The result of [`Aio::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The I/O has completed with this result; the handle is not reclaimed yet.
    Done(IoResult),
    /// The handle was reclaimed (and maybe reused) since the reference was taken: the I/O is
    /// already done, and its result went to whoever reclaimed it.
    Recycled,
}

/// Why an [`Aio`] operation was refused. Never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioError {
    /// No handle is free ([`Aio::acquire`]).
    NoFreeHandle,
    /// No handle is free and none is in flight, so waiting cannot help ([`Aio::wait_for_free`]):
    /// every handle is held by an issuer that has not submitted.
    NothingInFlight,
    /// The index is not below the number of handles (e.g. a corrupt completion entry).
    BadIndex {
        /// The offending index.
        index: usize,
        /// The number of handles.
        capacity: usize,
    },
    /// The reference's handle was reclaimed since the reference was taken.
    Stale {
        /// The handle index.
        index: usize,
        /// The generation the reference carries.
        expected: u32,
        /// The handle's current generation.
        current: u32,
    },
    /// The requested transition is not legal from the handle's current state.
    IllegalTransition {
        /// The handle index.
        index: usize,
        /// Its current state.
        from: HandleState,
        /// The requested state.
        to: HandleState,
    },
    /// Waiting on an I/O that has not been submitted (it can never complete by waiting).
    NotSubmitted {
        /// The handle's state.
        state: HandleState,
    },
    /// The [`Driver::poll`] gave up.
    GaveUp,
    /// The free bitmap disagreed with the handle states (an internal invariant broke).
    Slots(SlotError),
}

impl fmt::Display for AioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFreeHandle => f.write_str("no free I/O handle"),
            Self::NothingInFlight => f.write_str("no free I/O handle and none in flight"),
            Self::BadIndex { index, capacity } => {
                write!(
                    f,
                    "I/O handle index {index} out of range ({capacity} handles)"
                )
            }
            Self::Stale {
                index,
                expected,
                current,
            } => write!(
                f,
                "I/O handle {index} recycled: reference generation {expected}, now {current}"
            ),
            Self::IllegalTransition { index, from, to } => {
                write!(
                    f,
                    "I/O handle {index}: illegal transition {from:?} -> {to:?}"
                )
            }
            Self::NotSubmitted { state } => write!(f, "waiting for an unsubmitted I/O ({state:?})"),
            Self::GaveUp => f.write_str("gave up waiting"),
            Self::Slots(e) => write!(f, "free bitmap: {e}"),
        }
    }
}

/// What the waiting functions call back into. A closure `FnMut() -> bool` is a `Driver` whose
/// `poll` is the closure.
pub trait Driver {
    /// Makes progress on completions (poll the completion queue, or sleep until an interrupt).
    /// Return `false` to give up waiting ([`AioError::GaveUp`]).
    fn poll(&mut self) -> bool;

    /// Called (outside any section) with the result of each I/O that
    /// [`Aio::reclaim_completed`] or [`Aio::wait_for_free`] reclaimed on the issuer's behalf.
    fn on_reclaim(&mut self, io: IoRef, result: IoResult) {
        let _ = (io, result);
    }

    /// Called by [`Aio::wait_for_free`] just before it waits for `io`, the oldest in-flight I/O
    /// (`in_flight` in all), e.g. to log. It may run interrupt processing: `io` was taken as an
    /// (index, generation) pair beforehand, so that cannot confuse the wait.
    fn on_wait(&mut self, io: IoRef, in_flight: usize) {
        let _ = (io, in_flight);
    }
}

impl<F: FnMut() -> bool> Driver for F {
    fn poll(&mut self) -> bool {
        self()
    }
}

#[derive(Clone, Copy)]
struct Slot {
    state: HandleState,
    generation: u32,
    desc: Option<IoDesc>,
    result: Option<IoResult>,
    /// Submission order, for "oldest in flight".
    seq: u64,
}

impl Slot {
    const IDLE: Self = Self {
        state: HandleState::Idle,
        generation: 0,
        desc: None,
        result: None,
        seq: 0,
    };
}

struct Inner<const N: usize> {
    slots: [Slot; N],
    next_seq: u64,
}

/// What a transition records besides the new state.
#[derive(Clone, Copy)]
enum Effect {
    None,
    Define(IoDesc),
    Complete(IoResult),
}

/// What a transition saw: the reference it applied to, and what the caller asked to see of
/// the handle just before it applied (only that is copied out of the section).
struct Moved<T> {
    io: IoRef,
    seen: T,
}

/// Transitions made inside one section: see [`Aio::batch`].
pub struct Batch<'a, const N: usize, const W: usize> {
    aio: &'a Aio<N, W>,
    inner: &'a mut Inner<N>,
}

impl<const N: usize, const W: usize> Batch<'_, N, W> {
    /// A completion path, which always starts from `Submitted`.
    #[inline(always)]
    fn complete_path(&mut self, io: IoRef, path: &[(HandleState, Effect)]) -> Result<(), AioError> {
        self.aio
            .apply_path(
                self.inner,
                io.index(),
                Some(io.generation()),
                Some(HandleState::Submitted),
                path,
                |_| (),
            )
            .map(|_| ())
    }

    /// As [`Aio::submit`].
    #[inline(always)]
    pub fn submit(&mut self, io: IoRef) -> Result<IoDesc, AioError> {
        let path = [(HandleState::Submitted, Effect::None)];
        let moved = self.aio.apply_path(
            self.inner,
            io.index(),
            Some(io.generation()),
            Some(HandleState::Staged),
            &path,
            |s| (s.state, s.desc),
        )?;
        let (from, desc) = moved.seen;
        desc.ok_or(AioError::IllegalTransition {
            index: io.index(),
            from,
            to: HandleState::Submitted,
        })
    }

    /// As [`Aio::complete_and_share`].
    #[inline(always)]
    pub fn complete_and_share(&mut self, io: IoRef, result: IoResult) -> Result<(), AioError> {
        let path = [
            (HandleState::CompletedIo, Effect::Complete(result)),
            (HandleState::CompletedShared, Effect::None),
        ];
        self.complete_path(io, &path)
    }

    /// For an I/O completing on the core that issued it: the whole completion path
    /// (`Submitted -> CompletedIo -> CompletedShared -> CompletedLocal -> Idle`) at once. The
    /// result goes to the caller, who already has it, so the handle records none.
    ///
    /// Like [`Aio::start`], a fixed path checked at compile time and written out (a generation
    /// and state check, then the stores of the final state): it runs once per I/O.
    #[inline(always)]
    pub fn complete_and_reclaim(&mut self, io: IoRef, result: IoResult) -> Result<(), AioError> {
        use HandleState::*;
        const PATH: [HandleState; 4] = [CompletedIo, CompletedShared, CompletedLocal, Idle];
        const _: () = assert!(chain_ok(Submitted, &PATH));
        let _ = result;
        let index = io.index();
        let slot = self
            .inner
            .slots
            .get_mut(index)
            .ok_or(AioError::BadIndex { index, capacity: N })?;
        if slot.generation != io.generation() {
            return Err(AioError::Stale {
                index,
                expected: io.generation(),
                current: slot.generation,
            });
        }
        if slot.state != Submitted {
            return Err(AioError::IllegalTransition {
                index,
                from: slot.state,
                to: PATH[0],
            });
        }
        slot.state = PATH[PATH.len() - 1];
        slot.generation = slot.generation.wrapping_add(1);
        // Nothing else to clear: a result is recorded only in the `Completed*` states (this
        // path records none), and a description is read only from `Staged`, which every path
        // into it writes first (`define`, `start`), so what a handle keeps of its last use
        // is never seen.
        debug_assert!(slot.result.is_none(), "a Submitted handle holds no result");
        // Invariant: a set bit means Idle. The bit was clear (the handle was held).
        self.aio.free.release(index).map_err(AioError::Slots)
    }
}

/// `N` I/O handles (`W = keel_slots::words_for(N)` words of free bitmap; `N` is checked
/// against `W` at compile time and must be at most 65 536).
pub struct Aio<const N: usize, const W: usize> {
    free: FreeBitmap<W>,
    inner: LocalCell<Inner<N>>,
}

impl<const N: usize, const W: usize> Aio<N, W> {
    const SIZE_OK: () = assert!(
        N > 0 && N <= W * 64 && N <= 1 << 16,
        "Aio<N, W>: need 0 < N <= W * 64 (use keel_slots::words_for(N)) and N <= 65536"
    );

    /// `N` idle handles, every generation 0.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            inner: LocalCell::new(Inner {
                slots: [Slot::IDLE; N],
                next_seq: 0,
            }),
        }
    }

    /// `N` idle handles, every generation 0 (loom build: not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            inner: LocalCell::new(Inner {
                slots: [Slot::IDLE; N],
                next_seq: 0,
            }),
        }
    }

    /// An array of `N` handle slots of which only the handles `range` are ever handed out:
    /// one core's share of a handle index space that several cores divide among them (each
    /// core builds its own with its own range), so a handle index names one core's handle
    /// wherever it travels. The other slots stay `Idle` and are never claimed. A range past
    /// `N` is cut at `N`.
    pub fn for_range(range: core::ops::Range<usize>) -> Self {
        let mut aio = Self::new();
        let mut words = [0u64; W];
        for i in range.start..range.end.min(N) {
            if let Some(w) = words.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
        if let Ok(free) = FreeBitmap::from_words(words, N) {
            aio.free = free;
        }
        aio
    }

    /// The number of handles.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// How many handles are free (a snapshot).
    pub fn free_count(&self) -> usize {
        self.free.free_count()
    }

    /// **The** transition function: every state change of every handle goes through here.
    /// In one section it range-checks `index`, compares the generation (if
    /// `expect` is given), checks the current state is `from` (if given; `Idle` has two
    /// predecessors) and that every step of `path` is legal from the state before it, then
    /// applies the steps' effects; a return to `Idle` bumps the generation and frees the
    /// bitmap bit (one `fetch_or`). A refused transition changes nothing: legality of the
    /// whole path is checked before anything is written. Multi-step paths (e.g. `Submitted ->
    /// CompletedIo -> CompletedShared` on the completing core) cost one section.
    #[inline(always)]
    fn apply_path<T>(
        &self,
        inner: &mut Inner<N>,
        index: usize,
        expect: Option<u32>,
        from: Option<HandleState>,
        path: &[(HandleState, Effect)],
        see: impl FnOnce(&Slot) -> T,
    ) -> Result<Moved<T>, AioError> {
        {
            let next_seq = &mut inner.next_seq;
            let slot = inner
                .slots
                .get_mut(index)
                .ok_or(AioError::BadIndex { index, capacity: N })?;
            if let Some(expected) = expect {
                if expected != slot.generation {
                    return Err(AioError::Stale {
                        index,
                        expected,
                        current: slot.generation,
                    });
                }
            }
            let mut state = slot.state;
            for (i, &(to, _)) in path.iter().enumerate() {
                if !state.can_move_to(to) || (i == 0 && from.is_some_and(|f| f != state)) {
                    return Err(AioError::IllegalTransition {
                        index,
                        from: state,
                        to,
                    });
                }
                state = to;
            }
            let generation = slot.generation;
            let seen = see(slot);
            for &(to, effect) in path {
                slot.state = to;
                match effect {
                    Effect::None => {}
                    Effect::Define(desc) => slot.desc = Some(desc),
                    Effect::Complete(result) => slot.result = Some(result),
                }
                if to == HandleState::Submitted {
                    slot.seq = *next_seq;
                    *next_seq = next_seq.wrapping_add(1);
                }
                if to == HandleState::Idle {
                    slot.generation = slot.generation.wrapping_add(1);
                    slot.desc = None;
                    slot.result = None;
                    // Invariant: a set bit means Idle. The bit was clear (the handle was held).
                    self.free.release(index).map_err(AioError::Slots)?;
                }
            }
            Ok(Moved {
                // `index < N <= 65536`, so it fits.
                io: IoRef::new(index as u16, generation),
                seen,
            })
        }
    }

    #[inline(always)]
    fn transition_path<T>(
        &self,
        index: usize,
        expect: Option<u32>,
        from: Option<HandleState>,
        path: &[(HandleState, Effect)],
        see: impl FnOnce(&Slot) -> T,
    ) -> Result<Moved<T>, AioError> {
        self.apply_path(&mut self.inner.borrow(), index, expect, from, path, see)
    }

    /// Runs several transitions inside **one** section (a submission burst, a batch
    /// of completions). Each goes through the same checked path function as a single call;
    /// `f` must not call into this `Aio` (the cell is borrowed: that would panic).
    #[inline(always)]
    pub fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_, N, W>) -> R) -> R {
        self.inner.with(|inner| f(&mut Batch { aio: self, inner }))
    }

    /// One step of [`Aio::transition_path`].
    fn transition<T>(
        &self,
        index: usize,
        expect: Option<u32>,
        from: Option<HandleState>,
        to: HandleState,
        effect: Effect,
        see: impl FnOnce(&Slot) -> T,
    ) -> Result<Moved<T>, AioError> {
        self.transition_path(index, expect, from, &[(to, effect)], see)
    }

    /// Takes a free handle (`Idle -> HandedOut`). Lock-free.
    ///
    /// # Errors
    /// [`AioError::NoFreeHandle`]; see [`Self::wait_for_free`] to wait for one.
    pub fn acquire(&self) -> Result<IoRef, AioError> {
        let index = self.free.acquire().ok_or(AioError::NoFreeHandle)?;
        Ok(self
            .transition(
                index,
                None,
                None,
                HandleState::HandedOut,
                Effect::None,
                |_| (),
            )?
            .io)
    }

    /// The issuer's fast path: acquire a handle, define it and stage it
    /// (`Idle -> HandedOut -> Defined -> Staged`) in one section.
    ///
    /// This path is fixed, so its legality is checked at compile time ([`chain_ok`]); at run
    /// time the handle must be `Idle` (its free bit was just claimed). It is written out rather
    /// than run through the general path walker so it compiles to a state check and three
    /// stores: it runs once per I/O, and under emulation the general walker cost ~3x as much.
    ///
    /// # Errors
    /// [`AioError::NoFreeHandle`] when every handle is in use.
    #[inline(always)]
    pub fn start(&self, desc: IoDesc) -> Result<IoRef, AioError> {
        let index = self.free.acquire().ok_or(AioError::NoFreeHandle)?;
        self.start_claimed(&mut self.inner.borrow(), index, desc, false)
    }

    /// The issuer's path when it gives the I/O to its device at once (a reactor's local fast
    /// path): [`Aio::start`] and [`Aio::submit`] together
    /// (`Idle -> HandedOut -> Defined -> Staged -> Submitted`) in one section.
    ///
    /// The caller makes the I/O visible to the device only after this returns (write the
    /// command, then ring the doorbell). If the device layer then refuses it, it completes
    /// like any submitted I/O ([`Aio::complete_and_share`] with the error). Fixed path,
    /// checked at compile time like [`Aio::start`].
    ///
    /// # Errors
    /// [`AioError::NoFreeHandle`] when every handle is in use.
    #[inline(always)]
    pub fn start_submitted(&self, desc: IoDesc) -> Result<IoRef, AioError> {
        let index = self.free.acquire().ok_or(AioError::NoFreeHandle)?;
        self.start_claimed(&mut self.inner.borrow(), index, desc, true)
    }

    /// [`Aio::start_submitted`] for a burst of `n`: in **one** section, claims a
    /// handle for each and takes it `Idle -> ... -> Submitted` with description `desc(k)`,
    /// reporting it as `started(k, io)`. Both hooks run inside the section: never call into
    /// this `Aio` from them (the section's cell is borrowed: that would panic). Handles are
    /// claimed from the free bitmap a word at a time ([`keel_slots::FreeBitmap::acquire_many`]).
    /// Returns how many started, in order `0..`: fewer than `n` when handles run out. Same
    /// compile-time-checked path as the single call.
    ///
    /// # Errors
    /// With the count of those that did start: [`AioError::NoFreeHandle`] if none was free,
    /// [`AioError::IllegalTransition`] / [`AioError::BadIndex`] if the bitmap and the handles
    /// disagree (a corrupted bitmap word: the burst stops there, that bit stays clear, so the
    /// next burst does not meet it again).
    pub fn start_submitted_burst(
        &self,
        n: usize,
        mut desc: impl FnMut(usize) -> IoDesc,
        mut started: impl FnMut(usize, IoRef),
    ) -> (usize, Result<(), AioError>) {
        if n == 0 {
            return (0, Ok(()));
        }
        self.inner.with(|inner| {
            let mut k = 0;
            while k < n {
                // The bitmap is lock-free; claiming inside the section keeps the burst to one.
                // Handles are claimed a word at a time: one atomic operation for up to 64.
                let Some(mut run) = self.free.acquire_many(n - k) else {
                    let r = if k == 0 {
                        Err(AioError::NoFreeHandle)
                    } else {
                        Ok(())
                    };
                    return (k, r);
                };
                while let Some(index) = run.next() {
                    match self.start_claimed(inner, index, desc(k), true) {
                        Ok(io) => started(k, io),
                        Err(e) => {
                            self.give_back_idle(inner, run);
                            return (k, Err(e));
                        }
                    }
                    k += 1;
                }
            }
            (n, Ok(()))
        })
    }

    /// The rest of a burst's run after a bit that named no handle or a handle in use (a
    /// corrupted bitmap word; `start_claimed` kept that bit clear): gives back the bits of the
    /// Idle handles, and keeps clear those that are corrupted too (past the last handle, or of
    /// a handle in use), so no later claim meets them again. Cold: one `fetch_or` per bit.
    #[inline(never)]
    fn give_back_idle(&self, inner: &Inner<N>, run: keel_slots::Claimed) {
        for index in run {
            if inner
                .slots
                .get(index)
                .is_some_and(|s| s.state == HandleState::Idle)
            {
                // The run held this bit, so it was clear: the release cannot fail.
                let given_back = self.free.release(index);
                debug_assert!(given_back.is_ok(), "{given_back:?}");
            }
        }
    }

    /// The start paths' one step, inside their section: handle `index`, whose free
    /// bit the caller just claimed, goes `Idle -> HandedOut -> Defined -> Staged` (and on to
    /// `Submitted` with `submit`). Both chains are checked against the legality table at
    /// compile time; at run time only the handle's state is.
    #[inline(always)]
    fn start_claimed(
        &self,
        inner: &mut Inner<N>,
        index: usize,
        desc: IoDesc,
        submit: bool,
    ) -> Result<IoRef, AioError> {
        use HandleState::*;
        const STAGED: [HandleState; 3] = [HandedOut, Defined, Staged];
        const SUBMITTED: [HandleState; 4] = [HandedOut, Defined, Staged, Submitted];
        const _: () = assert!(chain_ok(Idle, &STAGED) && chain_ok(Idle, &SUBMITTED));
        let next_seq = &mut inner.next_seq;
        let slot = match inner.slots.get_mut(index) {
            Some(slot) if slot.state == Idle => slot,
            other => {
                // The bitmap said free but there is no such handle, or it is not Idle (a
                // corrupted bitmap word): report it and keep the bit clear. Clearing it restores
                // "a set bit means Idle"; a handle in use gets its bit back from its own return
                // to Idle, and giving the bit back here would have the next claim meet the
                // same handle again (every burst cut short at it for as long as it is in use).
                let from = other.map_or(Idle, |s| s.state);
                return Err(match from {
                    Idle => AioError::BadIndex { index, capacity: N },
                    from => AioError::IllegalTransition {
                        index,
                        from,
                        to: HandedOut,
                    },
                });
            }
        };
        if submit {
            // Not kept: a description is read only on the way out of `Staged` (`submit`), and
            // this handle is past it already (the caller builds its command from `desc`).
            slot.state = SUBMITTED[SUBMITTED.len() - 1];
            slot.seq = *next_seq;
            *next_seq = next_seq.wrapping_add(1);
        } else {
            slot.desc = Some(desc);
            slot.state = STAGED[STAGED.len() - 1];
        }
        // `index < N <= 65536`, so it fits.
        Ok(IoRef::new(index as u16, slot.generation))
    }

    /// The completing core's path: record the device's result and do the shared completion
    /// work (`Submitted -> CompletedIo -> CompletedShared`) in one section.
    ///
    /// # Errors
    /// [`AioError::Stale`] / [`AioError::IllegalTransition`] for a recycled or unsubmitted
    /// handle (e.g. a duplicate completion from the device).
    pub fn complete_and_share(&self, io: IoRef, result: IoResult) -> Result<(), AioError> {
        self.batch(|b| b.complete_and_share(io, result))
    }

    /// The issuer's end: local completion work and reclaim
    /// (`CompletedShared -> CompletedLocal -> Idle`) in one section. Returns the result.
    ///
    /// # Errors
    /// As [`Aio::reclaim`].
    #[inline(always)]
    pub fn complete_local_and_reclaim(&self, io: IoRef) -> Result<IoResult, AioError> {
        let path = [
            (HandleState::CompletedLocal, Effect::None),
            (HandleState::Idle, Effect::None),
        ];
        let moved = self.transition_path(
            io.index(),
            Some(io.generation()),
            Some(HandleState::CompletedShared),
            &path,
            |s| s.result,
        )?;
        Ok(moved.seen.unwrap_or(Err(IoError::Aborted)))
    }

    /// Gives back a handle that was never defined (`HandedOut -> Idle`).
    ///
    /// # Errors
    /// [`AioError::Stale`], [`AioError::BadIndex`], [`AioError::IllegalTransition`].
    pub fn release(&self, io: IoRef) -> Result<(), AioError> {
        self.transition(
            io.index(),
            Some(io.generation()),
            Some(HandleState::HandedOut),
            HandleState::Idle,
            Effect::None,
            |_| (),
        )
        .map(|_| ())
    }

    /// Describes the I/O (`HandedOut -> Defined`).
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn define(&self, io: IoRef, desc: IoDesc) -> Result<(), AioError> {
        self.step(io, HandleState::Defined, Effect::Define(desc), |_| ())
            .map(|_| ())
    }

    /// Queues the I/O locally (`Defined -> Staged`).
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn stage(&self, io: IoRef) -> Result<(), AioError> {
        self.step(io, HandleState::Staged, Effect::None, |_| ())
            .map(|_| ())
    }

    /// Marks the I/O as given to the device (`Staged -> Submitted`) and returns its
    /// description, to build the device command from. Take any [`IoRef`] copies for waiters
    /// before this.
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn submit(&self, io: IoRef) -> Result<IoDesc, AioError> {
        let moved = self.step(io, HandleState::Submitted, Effect::None, |s| {
            (s.state, s.desc)
        })?;
        // Defined before Staged before Submitted, so the description is there.
        let (from, desc) = moved.seen;
        desc.ok_or(AioError::IllegalTransition {
            index: io.index(),
            from,
            to: HandleState::Submitted,
        })
    }

    /// Records the device's completion (`Submitted -> CompletedIo`). Interrupt-handler safe.
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn complete(&self, io: IoRef, result: IoResult) -> Result<(), AioError> {
        self.step(
            io,
            HandleState::CompletedIo,
            Effect::Complete(result),
            |_| (),
        )
        .map(|_| ())
    }

    /// Records a completion identified only by a raw index from untrusted memory (e.g. an
    /// NVMe completion entry's command id): range-checked, and legal only if that handle is
    /// `Submitted`. Returns the reference the completion applied to.
    ///
    /// # Errors
    /// [`AioError::BadIndex`] for an index `>= N`, [`AioError::IllegalTransition`] if that
    /// handle is not `Submitted` (a spurious or duplicate completion).
    pub fn complete_raw(&self, raw_index: u32, result: IoResult) -> Result<IoRef, AioError> {
        let index = raw_index as usize;
        Ok(self
            .transition(
                index,
                None,
                None,
                HandleState::CompletedIo,
                Effect::Complete(result),
                |_| (),
            )?
            .io)
    }

    /// Shared completion processing is done (`CompletedIo -> CompletedShared`).
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn complete_shared(&self, io: IoRef) -> Result<(), AioError> {
        self.step(io, HandleState::CompletedShared, Effect::None, |_| ())
            .map(|_| ())
    }

    /// Issuer-local completion processing is done (`CompletedShared -> CompletedLocal`).
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn complete_local(&self, io: IoRef) -> Result<(), AioError> {
        self.step(io, HandleState::CompletedLocal, Effect::None, |_| ())
            .map(|_| ())
    }

    /// Returns the handle to the free set (`CompletedLocal -> Idle`), bumping its generation,
    /// and hands back the I/O's result.
    ///
    /// # Errors
    /// As [`Self::release`].
    pub fn reclaim(&self, io: IoRef) -> Result<IoResult, AioError> {
        let moved = self.transition(
            io.index(),
            Some(io.generation()),
            Some(HandleState::CompletedLocal),
            HandleState::Idle,
            Effect::None,
            |s| s.result,
        )?;
        Ok(moved.seen.unwrap_or(Err(IoError::Aborted)))
    }

    /// Drives a completed I/O the rest of the way (`CompletedIo`/`CompletedShared`/
    /// `CompletedLocal` -> ... -> `Idle`) and returns its result.
    ///
    /// # Errors
    /// As [`Self::release`]; [`AioError::IllegalTransition`] if the I/O has not completed.
    pub fn finish(&self, io: IoRef) -> Result<IoResult, AioError> {
        let state = self.snapshot_ref(io)?.state;
        if state == HandleState::CompletedIo {
            self.complete_shared(io)?;
        }
        if matches!(
            state,
            HandleState::CompletedIo | HandleState::CompletedShared
        ) {
            self.complete_local(io)?;
        }
        self.reclaim(io)
    }

    /// State, generation and result of handle `index`, read together in one section.
    ///
    /// # Errors
    /// [`AioError::BadIndex`] for an index `>= N`.
    pub fn snapshot(&self, index: usize) -> Result<Snapshot, AioError> {
        self.inner.with(|inner| {
            let slot = inner
                .slots
                .get(index)
                .ok_or(AioError::BadIndex { index, capacity: N })?;
            Ok(Snapshot {
                state: slot.state,
                generation: slot.generation,
                result: slot.result,
            })
        })
    }

    /// How many I/Os are submitted and not yet reclaimed (a snapshot).
    pub fn in_flight(&self) -> usize {
        self.inner.with(|inner| {
            inner
                .slots
                .iter()
                .filter(|s| s.state.is_in_flight())
                .count()
        })
    }

    /// Waits until the I/O `io` refers to has completed, calling `driver.poll()` while it is
    /// in flight. The handle's state and generation are always read together.
    ///
    /// # Errors
    /// [`AioError::NotSubmitted`] if that I/O is not submitted (waiting could never end),
    /// [`AioError::GaveUp`] if the driver gave up, [`AioError::BadIndex`].
    pub fn wait(&self, io: IoRef, driver: &mut impl Driver) -> Result<WaitOutcome, AioError> {
        loop {
            let now = self.snapshot(io.index())?;
            if now.generation != io.generation() {
                return Ok(WaitOutcome::Recycled);
            }
            match now.state {
                s if s.is_completed() => {
                    return Ok(WaitOutcome::Done(
                        now.result.unwrap_or(Err(IoError::Aborted)),
                    ))
                }
                HandleState::Submitted => {
                    if !driver.poll() {
                        return Err(AioError::GaveUp);
                    }
                }
                state => return Err(AioError::NotSubmitted { state }),
            }
        }
    }

    /// Reclaims every completed I/O, passing each result to `driver.on_reclaim`. Returns how
    /// many it reclaimed.
    pub fn reclaim_completed(&self, driver: &mut impl Driver) -> usize {
        let mut reclaimed = 0;
        for index in 0..N {
            let Ok(now) = self.snapshot(index) else {
                continue;
            };
            if !now.state.is_completed() {
                continue;
            }
            let io = IoRef::new(index as u16, now.generation);
            // Fails only if someone else reclaimed it meanwhile: then it is not ours to report.
            if let Ok(result) = self.finish(io) {
                driver.on_reclaim(io, result);
                reclaimed += 1;
            }
        }
        reclaimed
    }

    /// Acquires a handle, waiting for one if none is free: reclaims completed I/Os first (their
    /// results go to `driver.on_reclaim`), then waits for the oldest in-flight I/O, and
    /// repeats.
    ///
    /// # Errors
    /// [`AioError::NothingInFlight`] if no handle is free and none is in flight (waiting could
    /// never end), [`AioError::GaveUp`] if the driver gave up.
    pub fn wait_for_free(&self, driver: &mut impl Driver) -> Result<IoRef, AioError> {
        loop {
            self.reclaim_completed(driver);
            match self.acquire() {
                Err(AioError::NoFreeHandle) => {}
                other => return other,
            }
            // Index and generation of the oldest in-flight I/O, taken in one section.
            let Some((oldest, in_flight)) = self.oldest_in_flight() else {
                // Interrupt processing may have freed a handle since the acquire above.
                return self.acquire().map_err(|e| match e {
                    AioError::NoFreeHandle => AioError::NothingInFlight,
                    e => e,
                });
            };
            // May run interrupt processing, which may reclaim and reuse `oldest`: harmless,
            // the wait below then sees a new generation and reports Recycled.
            driver.on_wait(oldest, in_flight);
            match self.wait(oldest, driver)? {
                WaitOutcome::Done(_) | WaitOutcome::Recycled => {}
            }
        }
    }

    /// The oldest in-flight I/O (as an index + generation pair) and the in-flight count.
    fn oldest_in_flight(&self) -> Option<(IoRef, usize)> {
        self.inner.with(|inner| {
            let mut count = 0;
            let mut oldest: Option<(usize, &Slot)> = None;
            for (index, slot) in inner.slots.iter().enumerate() {
                if !slot.state.is_in_flight() {
                    continue;
                }
                count += 1;
                // Sequence numbers wrap; compare by distance from the next one to hand out.
                let age = inner.next_seq.wrapping_sub(slot.seq);
                if oldest.is_none_or(|(_, o)| age > inner.next_seq.wrapping_sub(o.seq)) {
                    oldest = Some((index, slot));
                }
            }
            oldest.map(|(index, slot)| (IoRef::new(index as u16, slot.generation), count))
        })
    }

    /// A generation-checked transition of the handle `io` refers to.
    fn step<T>(
        &self,
        io: IoRef,
        to: HandleState,
        effect: Effect,
        see: impl FnOnce(&Slot) -> T,
    ) -> Result<Moved<T>, AioError> {
        self.transition(io.index(), Some(io.generation()), None, to, effect, see)
    }

    /// [`Self::snapshot`], but [`AioError::Stale`] if `io`'s generation is not current.
    fn snapshot_ref(&self, io: IoRef) -> Result<Snapshot, AioError> {
        let now = self.snapshot(io.index())?;
        if now.generation != io.generation() {
            return Err(AioError::Stale {
                index: io.index(),
                expected: io.generation(),
                current: now.generation,
            });
        }
        Ok(now)
    }
}

impl<const N: usize, const W: usize> Default for Aio<N, W> {
    fn default() -> Self {
        Self::new()
    }
}

/// Seed 004 for the handle array: the free bitmap is shared memory every core writes, so its
/// words may be corrupted (bits past the last handle, bits of handles in use). No fast path may
/// then panic, loop, index out of range, or keep failing on the same corrupted bit.
#[cfg(all(test, not(loom)))]
mod untrusted {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;
    use std::vec::Vec;

    fn desc(k: usize) -> IoDesc {
        IoDesc {
            op: IoOp::Read,
            lba: k as u64,
            blocks: 1,
        }
    }

    /// An array of `N` handles whose bitmap (tracking the `N` handles) has every bit of its
    /// words set: bits `N..W * 64` are corruption (no such handles).
    fn with_bits_past_the_end<const N: usize, const W: usize>() -> Aio<N, W> {
        Aio {
            free: FreeBitmap::from_words([u64::MAX; W], N).unwrap(),
            inner: LocalCell::new(Inner {
                slots: [Slot::IDLE; N],
                next_seq: 0,
            }),
        }
    }

    #[test]
    fn bits_past_the_last_handle_are_typed_errors_and_go_away() {
        let aio = with_bits_past_the_end::<70, 2>();
        let mut started = Vec::new();
        let mut bad = 0;
        // Bursts straddle the end: started handles come first (a run is in ascending order),
        // then BadIndex, and the rest of that run is refused and stays clear.
        for _ in 0..200 {
            let (n, r) = aio.start_submitted_burst(16, desc, |_, io| started.push(io));
            assert!(n <= 16);
            match r {
                Ok(()) => {}
                Err(AioError::BadIndex {
                    index,
                    capacity: 70,
                }) => {
                    assert!((70..128).contains(&index));
                    bad += 1;
                }
                Err(AioError::NoFreeHandle) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(started.len(), 70, "every real handle started once");
        let distinct: BTreeSet<usize> = started.iter().map(|io| io.index()).collect();
        assert_eq!(distinct.len(), 70);
        assert!(bad >= 1);
        assert_eq!(aio.free_count(), 0, "the corrupted bits are gone");
        assert_eq!(aio.start_submitted(desc(0)), Err(AioError::NoFreeHandle));
        for io in started {
            aio.batch(|b| b.complete_and_reclaim(io, Ok(0))).unwrap();
        }
        assert_eq!(aio.free_count(), 70);
        // Singly, too: `start` and `acquire` meet a corrupted bit once each.
        let aio = with_bits_past_the_end::<2, 1>();
        let mut got = 0;
        for _ in 0..70 {
            match aio.start(desc(0)).or_else(|_| aio.acquire()) {
                Ok(io) => {
                    assert!(io.index() < 2);
                    got += 1;
                }
                Err(AioError::BadIndex { .. }) => {}
                Err(AioError::NoFreeHandle) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!((got, aio.free_count()), (2, 0));
    }

    #[test]
    fn a_corrupted_bit_of_a_handle_in_use_is_met_once() {
        let aio = Aio::<8, 1>::new();
        let held = aio.start_submitted(desc(0)).unwrap();
        // A stray write sets the free bit of handle 0, which is in flight.
        aio.free.release(held.index()).unwrap();
        let mut started = Vec::new();
        let (n, r) = aio.start_submitted_burst(4, desc, |_, io| started.push(io));
        assert_eq!(n, 0);
        assert!(matches!(
            r,
            Err(AioError::IllegalTransition {
                index: 0,
                from: HandleState::Submitted,
                ..
            })
        ));
        assert_eq!(
            aio.snapshot(0).unwrap().state,
            HandleState::Submitted,
            "the handle in use is untouched"
        );
        // The bit stayed clear: the next burst starts all four it asks for.
        let (n, r) = aio.start_submitted_burst(4, desc, |_, io| started.push(io));
        assert_eq!((n, r), (4, Ok(())));
        assert!(started.iter().all(|io| io.index() != 0));
        // And the handle in use returns to the free set normally.
        aio.batch(|b| b.complete_and_reclaim(held, Ok(0))).unwrap();
        for io in started {
            aio.batch(|b| b.complete_and_reclaim(io, Ok(0))).unwrap();
        }
        assert_eq!(aio.free_count(), 8);
    }

    #[test]
    fn a_burst_cut_short_gives_back_the_handles_left_in_its_run() {
        // 70 handles, every bit of both words set (70..128 are corruption).
        let aio = with_bits_past_the_end::<70, 2>();
        let mut held = Vec::new();
        let (n, _) = aio.start_submitted_burst(64, desc, |_, io| held.push(io));
        assert_eq!(n, 64);
        let in_use = aio.start_submitted(desc(64)).unwrap();
        assert_eq!(in_use.index(), 64);
        // A stray write sets the bit of handle 64, in flight. The next burst claims 64..72 in
        // one run, meets 64 first and stops: 65..70 are Idle and must go back, 70 and 71 are
        // corruption and stay clear.
        aio.free.release(64).unwrap();
        let (n, r) = aio.start_submitted_burst(8, desc, |_, io| held.push(io));
        assert_eq!(n, 0);
        assert!(matches!(
            r,
            Err(AioError::IllegalTransition { index: 64, .. })
        ));
        let mut next = Vec::new();
        let (n, r) = aio.start_submitted_burst(8, desc, |_, io| next.push(io.index()));
        assert_eq!(
            next,
            [65, 66, 67, 68, 69],
            "the handles left in the run came back"
        );
        assert_eq!(n, 5);
        assert!(matches!(r, Err(AioError::BadIndex { index: 72, .. })));
    }

    #[test]
    fn random_corruption_never_panics_or_hands_a_handle_out_twice() {
        use proptest::prelude::*;
        proptest!(|(words in any::<[u64; 2]>(),
                    ops in proptest::collection::vec((0u8..5, 0usize..70), 0..150))| {
            // Any words at all: bits of handles that do not exist, bits of handles in use.
            let mut aio = with_bits_past_the_end::<70, 2>();
            aio.free = FreeBitmap::from_words(words, 70).unwrap();
            let mut live: Vec<IoRef> = Vec::new();
            // Handles free at the start, and every handle started later: none may be lost.
            let mut ever: BTreeSet<usize> =
                (0..70).filter(|&i| words[i / 64] >> (i % 64) & 1 == 1).collect();
            for (op, x) in ops {
                match op {
                    0 => {
                        let mut got = Vec::new();
                        let (n, _) = aio.start_submitted_burst(x % 20 + 1, desc, |_, io| got.push(io));
                        prop_assert_eq!(n, got.len());
                        live.extend(got);
                    }
                    1 => {
                        if let Ok(io) = aio.start_submitted(desc(x)) {
                            live.push(io);
                        }
                    }
                    2 => {
                        if !live.is_empty() {
                            let io = live.swap_remove(x % live.len());
                            // A stray write may have set its bit already: reported, and the
                            // handle is back in the free set either way.
                            let r = aio.batch(|b| b.complete_and_reclaim(io, Ok(0)));
                            let ok = matches!(r, Ok(()) | Err(AioError::Slots(SlotError::NotAllocated { .. })));
                            prop_assert!(ok, "{:?}", r);
                            prop_assert_eq!(aio.snapshot(io.index()).unwrap().state, HandleState::Idle);
                        }
                    }
                    3 => {
                        // A stray write: the free bit of some handle, in use or not.
                        let _ = aio.free.release(x);
                    }
                    _ => {
                        // A duplicate completion of something long gone: refused.
                        let io = IoRef::new((x % 70) as u16, u32::MAX);
                        prop_assert!(aio.batch(|b| b.complete_and_reclaim(io, Ok(0))).is_err());
                    }
                }
                let indexes: BTreeSet<usize> = live.iter().map(|io| io.index()).collect();
                prop_assert_eq!(indexes.len(), live.len(), "a handle in flight was started again");
                prop_assert!(live.iter().all(|io| io.index() < 70));
                ever.extend(indexes);
            }
            // Nothing is lost: once everything completes, every handle that was free at the
            // start or started since is Idle and free again (a burst cut short by a corrupted
            // bit gives the rest of its run back).
            for io in live {
                let _ = aio.batch(|b| b.complete_and_reclaim(io, Ok(0)));
            }
            for i in ever {
                prop_assert_eq!(aio.snapshot(i).unwrap().state, HandleState::Idle);
                prop_assert!(aio.free.is_free(i).unwrap(), "handle {} lost", i);
            }
        });
    }
}
