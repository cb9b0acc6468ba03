//! One core's run-to-completion loop.

use heapless::Deque;
use keel_blockdev::{BlockOp, BlockQueue, IoError, SubmitError};
use keel_slots::SlotPool;

use crate::mesh::{Links, SendError};

/// What cores say to each other.
#[derive(Clone, Copy, Debug)]
pub enum Msg {
    /// Submit `op` on the receiver's queue pair on behalf of core `from`; answer with
    /// [`Msg::Done`] carrying `cookie`.
    Io { op: BlockOp, from: u8, cookie: u32 },
    /// The answer to an [`Msg::Io`] this core sent.
    Done {
        cookie: u32,
        result: Result<(), IoError>,
    },
    /// Run `f(receiving core, arg)` inside the receiver's poll loop.
    Call { f: fn(usize, usize), arg: usize },
}

/// Who is waiting for an I/O a reactor submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This core's own code ([`Reactor::submit`]).
    Local,
    /// Another core, answered with a [`Msg::Done`].
    Remote { core: u8 },
}

/// A finished I/O, handed to this core's code by [`Reactor::next_completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub cookie: u32,
    pub result: Result<(), IoError>,
}

/// Counters; `submitted == completed_ok + failed + in flight` holds at every poll boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// I/Os accepted onto this core's queue pair (local and on behalf of other cores).
    pub submitted: u64,
    pub completed_ok: u64,
    pub failed: u64,
    /// Of `submitted`, how many came from other cores.
    pub remote_served: u64,
    /// Requests this core sent to other cores / answers it received for them.
    pub remote_sent: u64,
    pub remote_answered: u64,
    /// Sends refused because a ring was full (returned to the caller as backpressure).
    pub backpressure: u64,
    /// Device completions whose tag named no live I/O (stale, duplicate or forged): dropped.
    pub bad_tags: u64,
    /// `Msg::Call`s run.
    pub calls: u64,
    /// Answers that could not be kept (must stay 0: the slot budget makes it impossible).
    pub dropped: u64,
    /// Poll passes.
    pub passes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReactorError {
    /// This core owns no queue pair (never had one, handed it off, or shut it down).
    NoQueue,
    /// The queue pair refused the operation.
    Submit(SubmitError),
    /// Every I/O slot of this reactor is in use: poll and retry.
    NoSlot,
    /// The ring to the owning core is full: retry after polling (backpressure).
    Backpressure,
    /// No such core.
    NoRoute,
    /// The reactor is shutting down or handing off its queue pair.
    NotAccepting,
    /// `take_queue` while I/O is in flight.
    Busy { in_flight: usize },
}

#[derive(Clone, Copy)]
struct Slot {
    origin: Origin,
    cookie: u32,
}

/// A deferred cross-core answer (the ring back was full).
#[derive(Clone, Copy)]
struct Reply {
    to: u8,
    cookie: u32,
    result: Result<(), IoError>,
}

/// Most pollers one reactor runs.
pub const MAX_POLLERS: usize = 8;

/// A registered poller: `f(core, arg)` returns how much work it did.
pub type Poller = fn(usize, usize) -> usize;

/// The reactor of one core. `C` cores in the mesh, `N` I/O slots (`W = words_for(N)`).
pub struct Reactor<'a, Q, const C: usize, const N: usize, const W: usize> {
    core: usize,
    queue: Option<Q>,
    links: Links<'a, Msg, C>,
    pool: SlotPool<N, W>,
    slots: [Slot; N],
    done: Deque<Completion, N>,
    replies: Deque<Reply, N>,
    /// An inbound request taken off a ring that the queue pair then refused as full.
    deferred: Option<(BlockOp, u8, u32)>,
    pollers: heapless::Vec<(Poller, usize), MAX_POLLERS>,
    remote_outstanding: usize,
    local_in_flight: usize,
    accepting: bool,
    stats: Stats,
}

impl<'a, Q: BlockQueue, const C: usize, const N: usize, const W: usize> Reactor<'a, Q, C, N, W> {
    pub fn new(links: Links<'a, Msg, C>, queue: Option<Q>) -> Self {
        Self {
            core: links.core(),
            queue,
            links,
            pool: SlotPool::new(),
            slots: [Slot {
                origin: Origin::Local,
                cookie: 0,
            }; N],
            done: Deque::new(),
            replies: Deque::new(),
            deferred: None,
            pollers: heapless::Vec::new(),
            remote_outstanding: 0,
            local_in_flight: 0,
            accepting: true,
            stats: Stats::default(),
        }
    }

    pub fn core(&self) -> usize {
        self.core
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// I/Os on this core's queue pair not yet completed.
    pub fn in_flight(&self) -> usize {
        N - self.pool.free_count()
    }

    /// Requests sent to other cores not yet answered.
    pub fn remote_outstanding(&self) -> usize {
        self.remote_outstanding
    }

    /// Free I/O slots (every slot is back when this equals `N` and nothing is in flight).
    pub fn free_slots(&self) -> usize {
        self.pool.free_count()
    }

    pub fn has_queue(&self) -> bool {
        self.queue.is_some()
    }

    /// Registers a poller run on every pass.
    pub fn add_poller(&mut self, f: Poller, arg: usize) -> Result<(), ReactorError> {
        self.pollers
            .push((f, arg))
            .map_err(|_| ReactorError::NoSlot)
    }

    /// Completions this core may still receive plus those waiting in `done`: kept at most `N`
    /// so `done` can never overflow and no answer is ever dropped.
    fn owed(&self) -> usize {
        self.done.len() + self.remote_outstanding + self.local_in_flight
    }

    /// Submits `op` on this core's own queue pair; its completion comes back through
    /// [`Reactor::next_completion`] with `cookie`. Call [`Reactor::poll`] to ring the doorbell.
    pub fn submit(&mut self, op: BlockOp, cookie: u32) -> Result<(), ReactorError> {
        if !self.accepting {
            return Err(ReactorError::NotAccepting);
        }
        if self.owed() >= N {
            return Err(ReactorError::NoSlot);
        }
        self.submit_on_queue(op, Origin::Local, cookie)?;
        self.local_in_flight += 1;
        Ok(())
    }

    /// Submits `op` on the queue pair of core `owner`: directly when that is this core, else as a
    /// message. The answer arrives as a [`Completion`] with `cookie` either way.
    pub fn submit_to(
        &mut self,
        owner: usize,
        op: BlockOp,
        cookie: u32,
    ) -> Result<(), ReactorError> {
        if owner == self.core {
            return self.submit(op, cookie);
        }
        if self.owed() >= N {
            return Err(ReactorError::NoSlot);
        }
        match self.links.send(
            owner,
            Msg::Io {
                op,
                from: self.core as u8,
                cookie,
            },
        ) {
            Ok(()) => {
                self.remote_outstanding += 1;
                self.stats.remote_sent += 1;
                Ok(())
            }
            Err(SendError::Full(_)) => {
                self.stats.backpressure += 1;
                Err(ReactorError::Backpressure)
            }
            Err(SendError::NoRoute(_)) => Err(ReactorError::NoRoute),
        }
    }

    /// Sends a function call to another core's poll loop.
    pub fn call(&mut self, to: usize, f: fn(usize, usize), arg: usize) -> Result<(), ReactorError> {
        self.links
            .send(to, Msg::Call { f, arg })
            .map_err(|e| match e {
                SendError::Full(_) => {
                    self.stats.backpressure += 1;
                    ReactorError::Backpressure
                }
                SendError::NoRoute(_) => ReactorError::NoRoute,
            })
    }

    fn submit_on_queue(
        &mut self,
        op: BlockOp,
        origin: Origin,
        cookie: u32,
    ) -> Result<(), ReactorError> {
        let q = self.queue.as_mut().ok_or(ReactorError::NoQueue)?;
        let h = self.pool.acquire().map_err(|_| ReactorError::NoSlot)?;
        match q.submit(op, h.to_raw()) {
            Ok(()) => {
                self.slots[h.index()] = Slot { origin, cookie };
                self.stats.submitted += 1;
                if let Origin::Remote { .. } = origin {
                    self.stats.remote_served += 1;
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.pool.release(h);
                Err(ReactorError::Submit(e))
            }
        }
    }

    /// The next finished I/O for this core's code.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    /// One run-to-completion pass: answers owed to other cores, inbound messages, device
    /// completions, registered pollers. Never blocks. Returns how much work it found.
    pub fn poll(&mut self) -> usize {
        self.stats.passes += 1;
        let mut work = self.flush_replies();
        work += self.drain_inbox(4 * N);
        work += self.reap();
        for i in 0..self.pollers.len() {
            let (f, arg) = self.pollers[i];
            work += f(self.core, arg);
        }
        work
    }

    fn answer(&mut self, to: u8, cookie: u32, result: Result<(), IoError>) {
        let r = Reply { to, cookie, result };
        if !self.replies.is_empty()
            || self
                .links
                .send(to as usize, Msg::Done { cookie, result })
                .is_err()
        {
            // Keep order and never drop: requests are only taken while
            // replies + in flight < N, so this always fits.
            if self.replies.push_back(r).is_err() {
                self.stats.dropped += 1;
            }
        }
    }

    fn flush_replies(&mut self) -> usize {
        let mut n = 0;
        while let Some(r) = self.replies.front().copied() {
            if self
                .links
                .send(
                    r.to as usize,
                    Msg::Done {
                        cookie: r.cookie,
                        result: r.result,
                    },
                )
                .is_err()
            {
                self.stats.backpressure += 1;
                break;
            }
            self.replies.pop_front();
            n += 1;
        }
        n
    }

    fn drain_inbox(&mut self, budget: usize) -> usize {
        let mut n = 0;
        if let Some((op, from, cookie)) = self.deferred.take() {
            match self.submit_on_queue(op, Origin::Remote { core: from }, cookie) {
                Ok(()) => n += 1,
                Err(ReactorError::Submit(SubmitError::QueueFull)) | Err(ReactorError::NoSlot) => {
                    self.deferred = Some((op, from, cookie));
                    return n;
                }
                Err(_) => self.answer(from, cookie, Err(IoError::Aborted)),
            }
        }
        while n < budget {
            // An I/O request is taken off its ring only when a slot is free: otherwise it stays
            // there and the sender sees a full ring (backpressure), nothing is dropped.
            let can_take_io = self.replies.len() + self.in_flight() < N && self.deferred.is_none();
            let Some(m) = self
                .links
                .recv_if(|m| !matches!(m, Msg::Io { .. }) || can_take_io)
            else {
                break;
            };
            n += 1;
            match m {
                Msg::Io { op, from, cookie } => {
                    if !self.accepting || self.queue.is_none() {
                        self.answer(from, cookie, Err(IoError::Aborted));
                        continue;
                    }
                    match self.submit_on_queue(op, Origin::Remote { core: from }, cookie) {
                        Ok(()) => {}
                        Err(ReactorError::Submit(SubmitError::QueueFull)) => {
                            self.deferred = Some((op, from, cookie))
                        }
                        Err(ReactorError::Submit(SubmitError::DeviceUnavailable)) => {
                            self.answer(from, cookie, Err(IoError::DeviceReset))
                        }
                        Err(_) => self.answer(from, cookie, Err(IoError::Invalid)),
                    }
                }
                Msg::Done { cookie, result } => {
                    self.remote_outstanding = self.remote_outstanding.saturating_sub(1);
                    self.stats.remote_answered += 1;
                    if self.done.push_back(Completion { cookie, result }).is_err() {
                        self.stats.dropped += 1;
                    }
                }
                Msg::Call { f, arg } => {
                    self.stats.calls += 1;
                    f(self.core, arg);
                }
            }
        }
        n
    }

    fn reap(&mut self) -> usize {
        let Some(q) = self.queue.as_mut() else {
            return 0;
        };
        q.flush_submissions();
        let (pool, slots, stats) = (&self.pool, &self.slots, &mut self.stats);
        let mut finished: heapless::Vec<(Slot, Result<(), IoError>), N> = heapless::Vec::new();
        q.poll(N, &mut |tag, result| {
            // The tag is untrusted (it came back from the device): range- and generation-check it.
            let Ok(h) = pool.handle_from_raw(tag) else {
                stats.bad_tags += 1;
                return;
            };
            let slot = slots[h.index()];
            if pool.release(h).is_err() {
                stats.bad_tags += 1;
                return;
            }
            let _ = finished.push((slot, result));
        });
        let n = finished.len();
        for (slot, result) in finished {
            if result.is_ok() {
                self.stats.completed_ok += 1;
            } else {
                self.stats.failed += 1;
            }
            match slot.origin {
                Origin::Local => {
                    self.local_in_flight -= 1;
                    if self
                        .done
                        .push_back(Completion {
                            cookie: slot.cookie,
                            result,
                        })
                        .is_err()
                    {
                        self.stats.dropped += 1;
                    }
                }
                Origin::Remote { core } => self.answer(core, slot.cookie, result),
            }
        }
        n
    }

    /// Stops accepting new I/O (local and remote; remote requests are answered `Aborted`) and
    /// polls until everything in flight has completed or `max_passes` passes have run.
    /// Returns the number still in flight (0 on success).
    pub fn quiesce(&mut self, max_passes: usize) -> usize {
        self.accepting = false;
        if let Some((_, from, cookie)) = self.deferred.take() {
            self.answer(from, cookie, Err(IoError::Aborted));
        }
        for _ in 0..max_passes {
            if self.in_flight() == 0 && self.replies.is_empty() {
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
        self.queue.take().ok_or(ReactorError::NoQueue)
    }

    /// Adopts a queue pair handed over by another core and starts accepting I/O.
    pub fn adopt_queue(&mut self, q: Q) -> Result<(), Q> {
        if self.queue.is_some() {
            return Err(q);
        }
        self.queue = Some(q);
        self.accepting = true;
        Ok(())
    }

    /// Runs `f` on the queue pair this core owns (device-specific control: timeouts, stats).
    pub fn with_queue<T>(&mut self, f: impl FnOnce(&mut Q) -> T) -> Option<T> {
        self.queue.as_mut().map(f)
    }
}
