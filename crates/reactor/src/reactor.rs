//! One core's run-to-completion loop, with every I/O carried by a `keel-aio` handle.
//!
//! Path of one I/O (PostgreSQL AIO's lifecycle, across cores):
//!
//! ```text
//! issuer core (owns the handle)        owner core (owns the queue pair)
//! acquire → … → submit ──Msg::Io──▶    (staged list) → queue pair → device
//!                                      device completion
//! complete → … → reclaim ◀─Msg::Done─┘   (local I/O: both halves on one core)
//! ```
//!
//! **Per-core state, shared state.** Everything a reactor holds is its core's own: its handle
//! array (`&Aio`, which is `!Sync`, so a `Reactor` is `!Send` and cannot leave its core), its
//! queue pair, its ends of the rings, its staged list and tables. Every handle transition is
//! made by the handle's own core: an I/O for another core's queue pair is `Submitted` when its
//! issuer sends the [`Msg::Io`], the owner keeps only the `IoRef` it was sent (to match the
//! device's tag and to answer), and the issuer completes and reclaims the handle when the
//! [`Msg::Done`] comes back. So no transition takes a lock or a critical section. The only
//! state two cores touch is the rings between them (SPSC, atomic indices, a mail flag; see
//! [`crate::mesh`], loom-checked); a queue pair changes cores only whole, while nothing is in
//! flight ([`Reactor::take_queue`] / [`Reactor::adopt_queue`]).
//!
//! Staged I/Os are submitted in one burst per poll pass with one doorbell. A local I/O issued
//! while nothing waits ahead of it takes a shorter path: acquire → … → submit in one critical
//! section, then straight onto the queue (the doorbell still rings once per pass). A request
//! that does not fit on the queue stays staged (never dropped). Device tags are untrusted: the owner keeps
//! the `IoRef` it submitted for each handle and accepts a completion only if the tag matches it.

use heapless::Deque;
use keel_aio::{Aio, IoDesc, IoOp, IoRef};
use keel_blockdev::{BlockOp, BlockQueue, IoError, SubmitError};

use crate::mesh::{Links, SendError};

/// What cores say to each other.
#[derive(Clone, Copy, Debug)]
pub enum Msg {
    /// Submit `op` (carried by staged handle `io`) on the receiver's queue pair for core `from`.
    Io {
        /// The operation to put on the queue pair.
        op: BlockOp,
        /// The issuer's handle, already `Staged`; its index and generation become the device tag.
        io: IoRef,
        /// The issuing core, which the [`Msg::Done`] goes back to.
        from: u8,
    },
    /// The I/O `io` that this core issued has completed on its owner.
    Done {
        /// The issuer's handle, as sent in the [`Msg::Io`]; now `CompletedShared`.
        io: IoRef,
        /// What the device (or the owner's refusal) reported.
        result: Result<(), IoError>,
    },
    /// Run `f(receiving core, arg)` inside the receiver's poll loop. (The one message the
    /// receiver cannot check: `f` is called as it is.)
    Call {
        /// The function, called with the receiving core's index and `arg`.
        f: fn(usize, usize),
        /// Passed through to `f` unchanged.
        arg: usize,
    },
}

/// Who issued an I/O a reactor submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This core's own code ([`Reactor::submit`]).
    Local,
    /// Another core, answered with a [`Msg::Done`].
    Remote {
        /// The issuing core's index.
        core: u8,
    },
}

/// A finished I/O, handed to this core's code by [`Reactor::next_completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The cookie the I/O was submitted with.
    pub cookie: u32,
    /// `Ok` when the device completed it successfully, else why it failed or was refused.
    pub result: Result<(), IoError>,
}

/// Counters; `submitted == completed_ok + failed + (in_flight() - staged())` (the I/Os on the
/// queue pair) holds at every poll boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// I/Os put on this core's queue pair (local and on behalf of other cores).
    pub submitted: u64,
    /// Device completions on this core's queue pair that reported success.
    pub completed_ok: u64,
    /// Device completions on this core's queue pair that reported an error.
    pub failed: u64,
    /// Of `submitted`, how many came from other cores.
    pub remote_served: u64,
    /// I/Os this core issued to other cores / answers it received for them.
    pub remote_sent: u64,
    /// [`Msg::Done`] answers received for I/Os this core sent to other cores.
    pub remote_answered: u64,
    /// Requests refused because a ring was full (returned to the caller as backpressure).
    pub backpressure: u64,
    /// Device completions whose tag named no live I/O (stale, duplicate or forged): dropped.
    pub bad_tags: u64,
    /// Lifecycle transitions the handle array refused (must stay 0).
    pub lifecycle_errors: u64,
    /// `Msg::Call`s run.
    pub calls: u64,
    /// Answers that could not be kept (must stay 0: the handle count bounds every queue).
    pub dropped: u64,
    /// Poll passes.
    pub passes: u64,
    /// Commands the queue pair announced as timed out ([`keel_blockdev::TimedOut`], counted on
    /// the next idle pass): their handles stay submitted, and their buffers the device's, until
    /// the device completes them or a reset quiesces them; then they complete like any other
    /// I/O. Non-zero means the queue pair needs recovery (an abort or a controller reset).
    pub timed_out: u64,
}

/// Why a reactor refused a request (nothing was issued).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReactorError {
    /// This core owns no queue pair (never had one, handed it off, or shut it down).
    NoQueue,
    /// The queue pair refused the operation outright (bad range, namespace, buffer).
    Submit(SubmitError),
    /// No I/O handle is free: poll and retry.
    NoSlot,
    /// The ring to the owning core is full: retry after polling (backpressure).
    Backpressure,
    /// No such core.
    NoRoute,
    /// The reactor is shutting down or handing off its queue pair.
    NotAccepting,
    /// `take_queue` while I/O is in flight or staged.
    Busy {
        /// I/Os staged or on the queue pair at the time ([`Reactor::in_flight`]).
        in_flight: usize,
    },
}

/// An I/O waiting for room on this core's queue pair.
#[derive(Clone, Copy)]
struct Staged {
    io: IoRef,
    op: BlockOp,
    origin: Origin,
    /// Already `Submitted` in the handle array (the local fast path met a full queue); otherwise
    /// `Staged`, marked Submitted when it goes on the queue.
    marked: bool,
}

#[derive(Clone, Copy)]
struct Reply {
    to: u8,
    io: IoRef,
    result: Result<(), IoError>,
}

/// Device completions reaped per batch (bounds the stack `reap` needs).
pub const REAP_BATCH: usize = 32;

/// Most pollers one reactor runs.
pub const MAX_POLLERS: usize = 8;

/// A registered poller: `f(core, arg)` returns how much work it did.
pub type Poller = fn(usize, usize) -> usize;

fn desc(op: &BlockOp) -> IoDesc {
    match *op {
        BlockOp::Read { lba, blocks, .. } => IoDesc {
            op: IoOp::Read,
            lba,
            blocks,
        },
        BlockOp::Write { lba, blocks, .. }
        | BlockOp::WriteZeroes { lba, blocks, .. }
        | BlockOp::Deallocate { lba, blocks, .. } => IoDesc {
            op: IoOp::Write,
            lba,
            blocks,
        },
        BlockOp::Flush { .. } => IoDesc {
            op: IoOp::Flush,
            lba: 0,
            blocks: 0,
        },
    }
}

/// Hands a finished I/O (already back in the handle array) to this core's code.
#[inline(always)]
fn deliver_to<const N: usize>(k: &mut Books<N>, io: IoRef, result: Result<(), IoError>) {
    // Every delivered I/O was counted when it was issued (a diagnostic count: checked in
    // debug builds and tests, not clamped on the per-I/O path).
    debug_assert!(k.issued > 0, "delivered an I/O that was never issued");
    k.issued = k.issued.wrapping_sub(1);
    let cookie = k.cookies.get(io.index()).copied().unwrap_or(0);
    if k.done.push_back(Completion { cookie, result }).is_err() {
        k.stats.dropped += 1;
    }
}

/// Answers the issuing core `to`, in order behind any answers still owed to anyone.
fn answer_to<const C: usize, const N: usize>(
    links: &mut Links<'_, Msg, C>,
    replies: &mut Deque<Reply, N>,
    stats: &mut Stats,
    to: u8,
    io: IoRef,
    result: Result<(), IoError>,
) {
    if !replies.is_empty() || links.send(to as usize, Msg::Done { io, result }).is_err() {
        // At most N answers can be owed (one per handle), so this always fits.
        if replies.push_back(Reply { to, io, result }).is_err() {
            stats.dropped += 1;
        }
    }
}

/// A reactor's per-I/O bookkeeping, kept together so that a reaped completion reaches all of
/// it through one borrow (one pointer, not one per field).
struct Books<const N: usize> {
    /// Owner side, by handle index: the generation of the I/O submitted on this queue with that
    /// index (the whole `IoRef`, with its index) and who issued it.
    /// (How many: `stats.submitted - stats.completed_ok - stats.failed`, every entry set with
    /// a `submitted` and cleared with a `completed_ok` or `failed`.)
    on_queue: [Option<(u32, Origin)>; N],
    /// Issuer side, by handle index: the caller's cookie.
    cookies: [u32; N],
    issued: usize,
    done: Deque<Completion, N>,
    replies: Deque<Reply, N>,
    stats: Stats,
    /// Debug builds: the number of `on_queue` entries, counted apart from the counters, so
    /// that the count derived from them ([`Reactor::in_flight`]) is checked on every read.
    #[cfg(debug_assertions)]
    entries: usize,
}

impl<const N: usize> Books<N> {
    /// An `on_queue` entry was set (debug builds count it).
    #[inline(always)]
    fn entries_inc(&mut self) {
        #[cfg(debug_assertions)]
        {
            self.entries += 1;
        }
    }

    /// An `on_queue` entry was cleared (debug builds count it).
    #[inline(always)]
    fn entries_dec(&mut self) {
        #[cfg(debug_assertions)]
        {
            self.entries -= 1;
        }
    }
}

/// What [`Reactor::reap_batch`] hands the queue: inside the batch's section, each
/// completion's lifecycle work and hand-off, with the reactor's state a reaped completion
/// touches (borrowed apart from the queue; each a pointer of its own here, not behind another).
struct Reap<'b, 'i, 'r, 'a, const C: usize, const N: usize, const W: usize> {
    b: &'b mut keel_aio::Batch<'i, N, W>,
    k: &'r mut Books<N>,
    links: &'r mut Links<'a, Msg, C>,
}

impl<const C: usize, const N: usize, const W: usize> keel_blockdev::OnDone
    for Reap<'_, '_, '_, '_, C, N, W>
{
    /// The tag came back from the device: range-check it and match it against what this core
    /// submitted for that handle. The common case (this core's own I/O, succeeded) is inlined
    /// into the queue's reaping loop; the rest is [`reaped_other`].
    #[inline(always)]
    fn done(&mut self, tag: u32, result: Result<(), IoError>) {
        let k = &mut *self.k;
        let index = (tag & 0xFFFF) as usize;
        if let (Some(entry), Ok(())) = (k.on_queue.get_mut(index), result) {
            if let Some((generation, Origin::Local)) = *entry {
                // `tag == tag_of(io)`: its index part is `index` already.
                if generation & 0xFFFF == tag >> 16 {
                    *entry = None;
                    k.entries_dec();
                    // `index < N` (checked above), so it fits.
                    let io = IoRef::new(index as u16, generation);
                    k.stats.completed_ok += 1;
                    if self.b.complete_and_reclaim(io, Ok(0)).is_err() {
                        k.stats.lifecycle_errors += 1;
                    }
                    deliver_to(k, io, result);
                    return;
                }
            }
        }
        reaped_other(self.b, self.k, self.links, tag, result);
    }
}

/// A reaped completion other than a local success: a failure, another core's I/O, or a tag
/// that names no I/O this core submitted (dropped and counted).
#[inline(never)]
fn reaped_other<const C: usize, const N: usize, const W: usize>(
    b: &mut keel_aio::Batch<'_, N, W>,
    k: &mut Books<N>,
    links: &mut Links<'_, Msg, C>,
    tag: u32,
    result: Result<(), IoError>,
) {
    let index = (tag & 0xFFFF) as usize;
    let Some(Some((generation, origin))) = k.on_queue.get(index).copied() else {
        k.stats.bad_tags += 1;
        return;
    };
    // `index < N` (checked above), so it fits.
    let io = IoRef::new(index as u16, generation);
    if tag_of(io) != tag {
        k.stats.bad_tags += 1;
        return;
    }
    k.on_queue[index] = None;
    k.entries_dec();
    let aio_result = aio_result(result);
    if result.is_ok() {
        k.stats.completed_ok += 1;
    } else {
        k.stats.failed += 1;
    }
    match origin {
        Origin::Local => {
            if b.complete_and_reclaim(io, aio_result).is_err() {
                k.stats.lifecycle_errors += 1;
            }
            deliver_to(k, io, result);
        }
        // The handle is the issuer's: it completes it when the answer arrives.
        Origin::Remote { core } => answer_to(links, &mut k.replies, &mut k.stats, core, io, result),
    }
}

/// What a queue's result records in the handle.
fn aio_result(result: Result<(), IoError>) -> keel_aio::IoResult {
    match result {
        Ok(()) => Ok(0),
        Err(IoError::Device { status } | IoError::Media { status }) => {
            Err(keel_aio::IoError::Device {
                status: status.field(),
            })
        }
        Err(_) => Err(keel_aio::IoError::Aborted),
    }
}

/// Marks `ios` (accepted by the queue, not yet rung) Submitted in one section.
fn mark_submitted<const N: usize, const W: usize>(
    aio: &Aio<N, W>,
    stats: &mut Stats,
    ios: &[IoRef],
) {
    if ios.is_empty() {
        return;
    }
    let errors = aio.batch(|b| ios.iter().filter(|&&io| b.submit(io).is_err()).count());
    stats.lifecycle_errors += errors as u64;
}

/// How a queue's refusal reaches the issuer.
fn submit_error(e: SubmitError) -> IoError {
    match e {
        SubmitError::OutOfRange => IoError::OutOfRange,
        SubmitError::DeviceUnavailable => IoError::DeviceReset,
        SubmitError::Removed => IoError::Removed,
        _ => IoError::Invalid,
    }
}

fn tag_of(io: IoRef) -> u32 {
    io.index() as u32 | (io.generation() & 0xFFFF) << 16
}

/// The reactor of one core. `C` cores in the mesh; `aio` is this core's own array of I/O
/// handles (`N` handle indexes, `W = words_for(N)`, shared out between the cores with
/// [`Aio::for_range`] so that an index names one core's handle wherever it travels).
pub struct Reactor<'a, Q, const C: usize, const N: usize, const W: usize> {
    core: usize,
    queue: Option<Q>,
    links: Links<'a, Msg, C>,
    aio: &'a Aio<N, W>,
    /// Owner side: I/Os waiting for room on the queue.
    staged: Deque<Staged, N>,
    /// The per-I/O bookkeeping: what is on the queue, cookies, completions, answers, counters.
    books: Books<N>,
    /// Issuer side, by handle index: 1 + the core it was sent to and not answered by yet, or
    /// 0 (only that core's [`Msg::Done`] may complete it).
    away: [u8; N],
    pollers: heapless::Vec<(Poller, usize), MAX_POLLERS>,
    accepting: bool,
    /// The queue pair is lent out for recovery ([`Reactor::lend_queue`]): I/O is staged until
    /// it comes back.
    lent: bool,
    /// [`Reactor::fast_path_open`], kept by [`Reactor::refresh_fast`] (and cleared by
    /// [`Reactor::stage`]).
    fast: bool,
}

impl<'a, Q: BlockQueue, const C: usize, const N: usize, const W: usize> Reactor<'a, Q, C, N, W> {
    /// A reactor for the core `links` belong to, with that core's handles `aio`, owning `queue` if it has one
    /// (accepting I/O, no pollers).
    pub fn new(links: Links<'a, Msg, C>, aio: &'a Aio<N, W>, queue: Option<Q>) -> Self {
        let mut r = Self {
            core: links.core(),
            queue,
            links,
            aio,
            staged: Deque::new(),
            books: Books {
                on_queue: [None; N],
                cookies: [0; N],
                issued: 0,
                done: Deque::new(),
                replies: Deque::new(),
                stats: Stats::default(),
                #[cfg(debug_assertions)]
                entries: 0,
            },
            away: [0; N],
            pollers: heapless::Vec::new(),
            accepting: true,
            lent: false,
            fast: false,
        };
        r.refresh_fast();
        r
    }

    /// This reactor's core index in the mesh.
    pub fn core(&self) -> usize {
        self.core
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.books.stats
    }

    /// I/Os staged or submitted on this core's queue pair and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.on_queue_count() + self.staged()
    }

    /// I/Os on this core's queue pair (entries of `on_queue`), from the counters kept anyway.
    fn on_queue_count(&self) -> usize {
        let s = &self.books.stats;
        // At most N (one entry per handle index), so it fits.
        let n = s
            .submitted
            .wrapping_sub(s.completed_ok)
            .wrapping_sub(s.failed) as usize;
        #[cfg(debug_assertions)]
        debug_assert_eq!(
            n, self.books.entries,
            "on_queue count drifted from the counters"
        );
        n
    }

    /// I/Os waiting for room on this core's queue pair.
    pub fn staged(&self) -> usize {
        // The fast-path flag implies an empty list: one load, not the list's length
        // arithmetic (callers poll this in their loops).
        if self.fast {
            0
        } else {
            self.staged.len()
        }
    }

    /// I/Os this core issued (anywhere) whose completion it has not yet handed out.
    pub fn issued(&self) -> usize {
        self.books.issued
    }

    /// Whether this core owns a queue pair now.
    pub fn has_queue(&self) -> bool {
        self.queue.is_some()
    }

    /// Registers a poller run on every pass.
    pub fn add_poller(&mut self, f: Poller, arg: usize) -> Result<(), ReactorError> {
        self.pollers
            .push((f, arg))
            .map_err(|_| ReactorError::NoSlot)
    }

    /// Issues `op` on this core's own queue pair. Its completion comes back through
    /// [`Reactor::next_completion`] with `cookie`; the doorbell rings on the next poll pass.
    #[inline]
    pub fn submit(&mut self, op: BlockOp, cookie: u32) -> Result<(), ReactorError> {
        if self.fast_path_open() {
            return self.submit_now(op, cookie);
        }
        let core = self.core;
        self.submit_to(core, op, cookie)
    }

    /// Issues a burst of I/Os (`(op, cookie)` pairs) on this core's own queue pair, as
    /// [`Reactor::submit`] would one by one, but with one section for the whole burst
    /// when nothing is staged ahead of it. Returns how many were accepted, in order: fewer than
    /// `ops.len()` only when I/O handles run out ([`ReactorError::NoSlot`] if none was), or,
    /// with something staged ahead, when [`Reactor::submit`] refuses one. An operation the
    /// queue pair refuses outright (range, namespace, buffer) counts as accepted and comes
    /// back through [`Reactor::next_completion`] with its error, as with `submit`.
    ///
    /// A chunk of up to 32 operations is started and written to the submission queue in one
    /// pass over this core's handle array: that is the point of a burst.
    pub fn submit_burst(&mut self, ops: &[(BlockOp, u32)]) -> Result<usize, ReactorError> {
        if !self.fast_path_open() {
            let mut n = 0;
            for &(op, cookie) in ops {
                match self.submit(op, cookie) {
                    Ok(()) => n += 1,
                    Err(e) if n == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            return Ok(n);
        }
        // No special case for a burst of one: under emulation every inlined copy of the
        // submission path is code the hot loop jumps across (one copy less measured +3% at
        // QD32), and a chunk of one costs what `submit_now` does.
        const CHUNK: usize = 32;
        let mut total = 0;
        for chunk in ops.chunks(CHUNK) {
            // acquire -> define -> stage -> submit for the whole chunk in one section,
            // each I/O put on the queue as soon as its handle is Submitted (the device sees the
            // commands only at the doorbell). Refusals are completed after the section: that
            // takes the handle array again. `k < chunk.len()` always; the fallbacks only keep
            // the lookups panic-free.
            let mut refused: heapless::Vec<(IoRef, SubmitError), CHUNK> = heapless::Vec::new();
            let aio = self.aio;
            let (started, r) = aio.start_submitted_burst(
                chunk.len(),
                |k| {
                    chunk
                        .get(k)
                        .map_or(desc(&BlockOp::Flush { ns: 0 }), |(op, _)| desc(op))
                },
                |k, io| {
                    if let Some(&(op, cookie)) = chunk.get(k) {
                        // The fast-path flag says whether an earlier I/O of this burst met a
                        // full queue and was staged (`stage` clears it; nothing else changes
                        // it inside the burst).
                        let none_staged = self.fast;
                        if let Err(e) = self.place_submitted(io, op, cookie, none_staged) {
                            // Room for every I/O of the chunk: `refused` holds CHUNK.
                            let kept = refused.push((io, e));
                            debug_assert!(kept.is_ok());
                        }
                    }
                },
            );
            for &(io, e) in &refused {
                self.refuse(io, Origin::Local, submit_error(e), true);
            }
            if r.is_err() && started == 0 {
                if total == 0 {
                    return Err(ReactorError::NoSlot);
                }
                break;
            }
            total += started;
            if started < chunk.len() {
                break;
            }
        }
        Ok(total)
    }

    /// Issues `op` on the queue pair of core `owner` (this core or another: then as a message).
    pub fn submit_to(
        &mut self,
        owner: usize,
        op: BlockOp,
        cookie: u32,
    ) -> Result<(), ReactorError> {
        let local = owner == self.core;
        if local && (!self.accepting || (self.queue.is_none() && !self.lent)) {
            return Err(if self.accepting {
                ReactorError::NoQueue
            } else {
                ReactorError::NotAccepting
            });
        }
        if !local {
            if owner >= C {
                return Err(ReactorError::NoRoute);
            }
            // This core is the only producer of that ring, so room now means room at send.
            if !self.links.can_send(owner) {
                self.books.stats.backpressure += 1;
                return Err(ReactorError::Backpressure);
            }
        }
        if local && self.fast_path_open() {
            return self.submit_now(op, cookie);
        }
        if local {
            // acquire -> define -> stage, in one section.
            let io = self
                .aio
                .start(desc(&op))
                .map_err(|_| ReactorError::NoSlot)?;
            self.books.cookies[io.index()] = cookie;
            self.books.issued += 1;
            self.stage(Staged {
                io,
                op,
                origin: Origin::Local,
                marked: false,
            });
            return Ok(());
        }
        // acquire -> ... -> submit in one section: sending it is this handle's submission (the
        // owner never touches it; the answer completes it here).
        let io = self
            .aio
            .start_submitted(desc(&op))
            .map_err(|_| ReactorError::NoSlot)?;
        self.books.cookies[io.index()] = cookie;
        self.books.issued += 1;
        match self.links.send(
            owner,
            Msg::Io {
                op,
                io,
                from: self.core as u8,
            },
        ) {
            Ok(()) => {
                if let Some(away) = self.away.get_mut(io.index()) {
                    // `owner < C`, checked above; the mesh has at most 255 cores.
                    *away = owner as u8 + 1;
                }
                self.books.stats.remote_sent += 1;
                Ok(())
            }
            Err(SendError::Full(_) | SendError::NoRoute(_)) => {
                // Unreachable (checked above); never leak the handle if it happens.
                self.books.stats.lifecycle_errors += 1;
                self.refuse(io, Origin::Local, IoError::Aborted, true);
                Err(ReactorError::Backpressure)
            }
        }
    }

    /// Whether a local I/O may take the fast path: this core accepts I/O, owns a queue pair,
    /// and nothing is staged ahead of it.
    /// (Read once per submission: the flag [`Reactor::refresh_fast`] keeps, not the three
    /// fields.)
    #[inline(always)]
    fn fast_path_open(&self) -> bool {
        debug_assert_eq!(self.fast, self.fast_path_now(), "stale fast-path flag");
        self.fast
    }

    /// [`Reactor::fast_path_open`] from the fields it depends on.
    fn fast_path_now(&self) -> bool {
        self.accepting && self.queue.is_some() && self.staged.is_empty()
    }

    /// Recomputes the fast-path flag: after every change of `accepting`, `queue` or `staged`.
    fn refresh_fast(&mut self) {
        self.fast = self.fast_path_now();
    }

    /// The local fast path (see [`Reactor::fast_path_open`]):
    /// the I/O goes on the queue now. acquire -> define -> stage -> submit in one critical
    /// section, before the command is written (the device sees it only at the doorbell, which
    /// rings once per pass).
    #[inline(always)]
    fn submit_now(&mut self, op: BlockOp, cookie: u32) -> Result<(), ReactorError> {
        let io = self
            .aio
            .start_submitted(desc(&op))
            .map_err(|_| ReactorError::NoSlot)?;
        // Nothing is staged (`fast_path_open`), and the handle array section cannot stage.
        if let Err(e) = self.place_submitted(io, op, cookie, true) {
            self.refuse(io, Origin::Local, submit_error(e), true);
        }
        Ok(())
    }

    /// Puts a local I/O whose handle is already Submitted on the queue (or, when the queue is
    /// full, first in line on the staged list). When the queue refuses it outright, returns why:
    /// the caller completes it with [`Reactor::refuse`] (outside any handle-array section).
    /// `none_staged`: whether the staged list is empty, which the caller knows (saves reading
    /// the list again after the handle array's atomic claim, which the compiler cannot see
    /// past); debug-checked.
    #[inline(always)]
    fn place_submitted(
        &mut self,
        io: IoRef,
        op: BlockOp,
        cookie: u32,
        none_staged: bool,
    ) -> Result<(), SubmitError> {
        self.books.cookies[io.index()] = cookie;
        self.books.issued += 1;
        let origin = Origin::Local;
        // Nothing goes on the queue ahead of what is already waiting (a burst's earlier I/O
        // that met a full queue).
        debug_assert_eq!(none_staged, self.staged.is_empty(), "none_staged is wrong");
        let nothing_ahead = none_staged;
        if let Some(q) = self.queue.as_mut().filter(|_| nothing_ahead) {
            match q.submit(op, tag_of(io)) {
                Ok(()) => {
                    self.books.on_queue[io.index()] = Some((io.generation(), origin));
                    self.books.entries_inc();
                    self.books.stats.submitted += 1;
                    return Ok(());
                }
                Err(SubmitError::QueueFull) => {}
                // Refused outright: completes like any submitted I/O (by the caller).
                Err(e) => return Err(e),
            }
        }
        self.stage(Staged {
            io,
            op,
            origin,
            marked: true,
        });
        Ok(())
    }

    /// Queues an I/O behind the others waiting for room on the queue.
    fn stage(&mut self, s: Staged) {
        // Room is guaranteed: `staged` holds N and there are only N handles.
        if self.staged.push_back(s).is_err() {
            self.books.stats.dropped += 1;
        }
        self.fast = false;
    }

    /// Sends a function call to another core's poll loop.
    pub fn call(&mut self, to: usize, f: fn(usize, usize), arg: usize) -> Result<(), ReactorError> {
        self.links
            .send(to, Msg::Call { f, arg })
            .map_err(|e| match e {
                SendError::Full(_) => {
                    self.books.stats.backpressure += 1;
                    ReactorError::Backpressure
                }
                SendError::NoRoute(_) => ReactorError::NoRoute,
            })
    }

    /// The next finished I/O for this core's code.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.books.done.pop_front()
    }

    /// One run-to-completion pass: staged I/O (one doorbell), device completions, answers
    /// owed to other cores, inbound messages (and what they staged), registered pollers.
    /// Never blocks.
    #[inline]
    pub fn poll(&mut self) -> usize {
        self.books.stats.passes += 1;
        // This core's own submissions first, then completions (found as early in the pass as
        // possible: the caller's next submission waits on them), then other cores' traffic.
        let mut work = self.submit_staged();
        work += self.reap();
        work += self.flush_replies();
        let inbound = if self.links.has_mail() {
            self.drain_inbox(4 * N)
        } else {
            0
        };
        if inbound > 0 {
            // Requests from other cores that just arrived go out in this pass too.
            work += inbound + self.submit_staged();
        }
        for i in 0..self.pollers.len() {
            let (f, arg) = self.pollers[i];
            work += f(self.core, arg);
        }
        work
    }

    /// Puts what this core queued since the last pass on the device now (submits what is
    /// staged, rings the doorbell) instead of at the next [`Reactor::poll`]: for a caller that
    /// just finished a burst and wants its latency. Returns how many went out from the staged
    /// list (fast-path submissions are already on the queue and only get the doorbell).
    pub fn flush(&mut self) -> usize {
        self.submit_staged()
    }

    /// Issuer-side end of the lifecycle: local completion work, reclaim, hand to the caller.
    fn finish_local(&mut self, io: IoRef, result: Result<(), IoError>) {
        // complete_local -> reclaim, in one section.
        if self.aio.complete_local_and_reclaim(io).is_err() {
            self.books.stats.lifecycle_errors += 1;
        }
        self.deliver(io, result);
    }

    /// Hands a finished I/O (already back in the handle array) to this core's code.
    fn deliver(&mut self, io: IoRef, result: Result<(), IoError>) {
        deliver_to(&mut self.books, io, result);
    }

    /// Owner-side: an I/O of `origin` finished (on the device or refused before it).
    fn route(&mut self, io: IoRef, origin: Origin, result: Result<(), IoError>) {
        match origin {
            Origin::Local => self.finish_local(io, result),
            Origin::Remote { core } => self.answer(core, io, result),
        }
    }

    fn answer(&mut self, to: u8, io: IoRef, result: Result<(), IoError>) {
        answer_to(
            &mut self.links,
            &mut self.books.replies,
            &mut self.books.stats,
            to,
            io,
            result,
        );
    }

    fn flush_replies(&mut self) -> usize {
        let mut n = 0;
        while let Some(r) = self.books.replies.front().copied() {
            if self
                .links
                .send(
                    r.to as usize,
                    Msg::Done {
                        io: r.io,
                        result: r.result,
                    },
                )
                .is_err()
            {
                break;
            }
            self.books.replies.pop_front();
            n += 1;
        }
        n
    }

    fn drain_inbox(&mut self, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            let Some((sender, m)) = self.links.recv_from() else {
                break;
            };
            n += 1;
            match m {
                // Messages come from other cores' memory (seed 004): a handle index past the
                // array, or a sender that is no other core, is counted and dropped, never
                // indexed with or answered (an answer with no route would also hold up every
                // answer queued behind it).
                Msg::Io { io, from, .. }
                    if io.index() >= N || from as usize != sender || sender == self.core =>
                {
                    self.books.stats.lifecycle_errors += 1;
                }
                Msg::Io { op, io, from } => {
                    let origin = Origin::Remote { core: from };
                    if !self.accepting || (self.queue.is_none() && !self.lent) {
                        self.refuse(io, origin, IoError::Aborted, false);
                    } else {
                        self.stage(Staged {
                            io,
                            op,
                            origin,
                            marked: false,
                        });
                    }
                }
                Msg::Done { io, result } => {
                    // Only the answer of the core an I/O of this core's was sent to, while it
                    // waits for one, reaches the caller: a duplicate or forged `Done` (from
                    // another core, for an I/O not sent away, a stale generation, an index
                    // past the array) is counted, never delivered (it would hand out the
                    // cookie, and the buffer, of an I/O still in flight).
                    let away = self.away.get(io.index()).copied().unwrap_or(0);
                    let completed = usize::from(away) == sender + 1
                        && self
                            .aio
                            .batch(|b| b.complete_and_reclaim(io, aio_result(result)))
                            .is_ok();
                    if completed {
                        if let Some(a) = self.away.get_mut(io.index()) {
                            *a = 0;
                        }
                        self.books.stats.remote_answered += 1;
                        self.deliver(io, result);
                    } else {
                        self.books.stats.lifecycle_errors += 1;
                    }
                }
                Msg::Call { f, arg } => {
                    self.books.stats.calls += 1;
                    f(self.core, arg);
                }
            }
        }
        n
    }

    /// Refusal of an I/O that never reached a device (`submitted`: already marked Submitted):
    /// it still goes through submit/complete so the issuer sees an ordinary completion. Another
    /// core's I/O is only answered: its handle is its issuer's.
    fn refuse(&mut self, io: IoRef, origin: Origin, e: IoError, submitted: bool) {
        if let Origin::Remote { core } = origin {
            self.answer(core, io, Err(e));
            return;
        }
        let marked = if submitted {
            Ok(())
        } else {
            self.aio.submit(io).map(|_| ())
        };
        let r = marked.and_then(|()| {
            self.aio
                .complete_and_share(io, Err(keel_aio::IoError::Aborted))
        });
        if r.is_err() {
            self.books.stats.lifecycle_errors += 1;
        }
        self.route(io, origin, Err(e));
    }

    #[inline(always)]
    fn submit_staged(&mut self) -> usize {
        if self.staged.is_empty() {
            // Fast-path submissions (already marked Submitted) only need the doorbell.
            if let Some(q) = self.queue.as_mut() {
                q.flush_submissions();
            }
            return 0;
        }
        self.submit_staged_list()
    }

    #[inline(never)]
    fn submit_staged_list(&mut self) -> usize {
        let mut n = 0;
        // Handles accepted by the queue, marked Submitted together in one section
        // before the doorbell (the device cannot see them earlier).
        let mut accepted: heapless::Vec<IoRef, REAP_BATCH> = heapless::Vec::new();
        while let Some(&Staged {
            io,
            op,
            origin,
            marked,
        }) = self.staged.front()
        {
            let Some(q) = self.queue.as_mut() else { break };
            match q.submit(op, tag_of(io)) {
                Ok(()) => {
                    self.staged.pop_front();
                    self.books.on_queue[io.index()] = Some((io.generation(), origin));
                    self.books.entries_inc();
                    self.books.stats.submitted += 1;
                    if let Origin::Remote { .. } = origin {
                        self.books.stats.remote_served += 1;
                    }
                    n += 1;
                    // Another core's handle is its issuer's (already Submitted there).
                    if marked || origin != Origin::Local {
                        continue;
                    }
                    if accepted.push(io).is_err() {
                        mark_submitted(self.aio, &mut self.books.stats, &accepted);
                        accepted.clear();
                        let _ = accepted.push(io);
                    }
                }
                Err(SubmitError::QueueFull) => break, // stays staged
                Err(e) => {
                    self.staged.pop_front();
                    self.refuse(io, origin, submit_error(e), marked);
                }
            }
        }
        mark_submitted(self.aio, &mut self.books.stats, &accepted);
        self.refresh_fast();
        if let Some(q) = self.queue.as_mut() {
            q.flush_submissions();
        }
        n
    }

    /// Reaps device completions in batches of [`REAP_BATCH`], so the stack holds one batch, not
    /// one entry per handle.
    fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            let n = self.reap_batch();
            total += n;
            if n < REAP_BATCH {
                return total;
            }
        }
    }

    fn reap_batch(&mut self) -> usize {
        let Some(q) = self.queue.as_mut() else {
            return 0;
        };
        // Idle passes skip the handle array.
        if !q.poll_due() {
            // Timeout events (rare) are looked for on idle passes only, which a queue with a
            // stuck command soon has: the success path does no work for them.
            while q.pop_timed_out().is_some() {
                self.books.stats.timed_out += 1;
            }
            return 0;
        }
        // The whole batch's lifecycle work in one section of this core's handle array: for
        // this core's own I/O the completion and the reclaim, each handed on as it is reaped
        // (no intermediate batch copy); another core's I/O is answered (its handle is its
        // issuer's). One bounded queue poll: at most `REAP_BATCH` completion entries, plus the
        // queue's own periodic timeout scan over its command slots.
        let (k, links) = (&mut self.books, &mut self.links);
        self.aio
            .batch(|b| q.poll_with(REAP_BATCH, &mut Reap { b, k, links }))
    }

    /// Stops accepting new I/O (local callers get `NotAccepting`; requests from other cores
    /// are completed `Aborted`) and polls until everything on this queue pair has completed or
    /// `max_passes` passes have run. Returns the number still in flight (0 on success).
    pub fn quiesce(&mut self, max_passes: usize) -> usize {
        self.accepting = false;
        self.refresh_fast();
        for _ in 0..max_passes {
            if self.in_flight() == 0 && self.books.replies.is_empty() {
                break;
            }
            self.poll();
        }
        self.in_flight()
    }

    /// Gives up the queue pair (to hand it to another core, or to delete it). Only when nothing
    /// is in flight: call [`Reactor::quiesce`] first.
    pub fn take_queue(&mut self) -> Result<Q, ReactorError> {
        let in_flight = self.in_flight();
        if in_flight != 0 {
            return Err(ReactorError::Busy { in_flight });
        }
        let q = self.queue.take().ok_or(ReactorError::NoQueue);
        self.refresh_fast();
        q
    }

    /// Lends the queue pair out for recovery, with whatever is on it: unlike
    /// [`Reactor::take_queue`] nothing needs to drain first. Until [`Reactor::return_queue`]
    /// brings it back, the reactor keeps running: its own I/O and other cores' requests are
    /// staged (not refused), and the I/O on the pair stays in flight, accounted to this core.
    /// Whoever holds the pair meanwhile must not report completions from it (the NVMe
    /// driver's `Controller::recover` leaves every outcome on the pair for its owner), so each
    /// still reaches its issuer exactly once, on this core's next polls after the return.
    pub fn lend_queue(&mut self) -> Option<Q> {
        let q = self.queue.take()?;
        self.lent = true;
        self.refresh_fast();
        Some(q)
    }

    /// Takes back the queue pair lent with [`Reactor::lend_queue`]; what was staged meanwhile
    /// goes out on the next pass. Gives `q` back if this reactor already has a queue pair or
    /// lent none.
    pub fn return_queue(&mut self, q: Q) -> Result<(), Q> {
        if self.queue.is_some() || !self.lent {
            return Err(q);
        }
        self.queue = Some(q);
        self.lent = false;
        self.refresh_fast();
        Ok(())
    }

    /// Whether this core's queue pair is lent out for recovery.
    pub fn is_lent(&self) -> bool {
        self.lent
    }

    /// Adopts a queue pair handed over by another core and starts accepting I/O.
    pub fn adopt_queue(&mut self, q: Q) -> Result<(), Q> {
        if self.queue.is_some() || self.lent {
            return Err(q);
        }
        self.queue = Some(q);
        self.accepting = true;
        self.refresh_fast();
        Ok(())
    }

    /// Runs `f` on the queue pair this core owns (device-specific control: timeouts, stats).
    pub fn with_queue<T>(&mut self, f: impl FnOnce(&mut Q) -> T) -> Option<T> {
        self.queue.as_mut().map(f)
    }
}
