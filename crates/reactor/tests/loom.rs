//! Loom model checks for keel-reactor: the mesh (the firmware's own rings, [`keel_reactor::ring`],
//! which run on loom atomics and cells in this build, and the real [`Links`] and `MailFlag`),
//! two real [`Reactor`]s exchanging requests through it, and a queue-pair handoff between them.
//!
//! Run with (preemption bound 3, as CI does; each model is exhaustive up to that bound):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p keel-reactor --release --test loom
//! ```
//!
//! Per-core state: each core builds its own `Aio` (its share of the handle indexes,
//! `Aio::for_range`) on its own thread; `Aio` is `!Sync`, so nothing else can reach it while
//! that thread runs (the compiler refuses to share it), and only the mesh is shared: that is
//! what these models interleave, with the real code. Each model ends with a deterministic drain
//! (single-threaded, a fixed number of poll passes, after joining every thread, so everything
//! written before is visible): a message the concurrent phase lost shows as a completion that
//! never arrives, with no wall clock and no spin loop. For the drain a reactor (and its
//! handles) moves whole to the joining thread after its own thread has ended ([`Joined`]).
#![cfg(loom)]

use std::collections::{BTreeMap, VecDeque};

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use keel_aio::Aio;
use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, NsId, SubmitError};
use keel_reactor::{split, Completion, Links, MeshStorage, Msg, Reactor, ReactorError};
use keel_slots::MailFlag;

/// A queue pair that completes every command at the next poll (no data moves), holding at
/// most `depth` commands (a full queue is `QueueFull`: the reactor keeps the rest staged).
struct NullQueue {
    done: VecDeque<u32>,
    depth: usize,
}

impl NullQueue {
    fn new(depth: usize) -> Self {
        Self {
            done: VecDeque::new(),
            depth,
        }
    }
}

impl BlockQueue for NullQueue {
    fn submit(&mut self, _op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        if self.done.len() >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.done.push_back(tag);
        Ok(())
    }
    fn flush_submissions(&mut self) {}
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(tag) = self.done.pop_front() else {
                break;
            };
            on_done(tag, Ok(()));
            n += 1;
        }
        n
    }
    fn poll_due(&self) -> bool {
        !self.done.is_empty()
    }
    fn depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn block_size(&self, _ns: NsId) -> Option<u32> {
        Some(512)
    }
    fn num_blocks(&self, _ns: NsId) -> Option<u64> {
        Some(1 << 20)
    }
}

fn read(lba: u64) -> BlockOp {
    BlockOp::Read {
        ns: 1,
        lba,
        blocks: 1,
        buf: BufRef::from_bus(0x1000, 512),
    }
}

/// A reactor handed to the thread that joined the one it ran on, for the deterministic drain.
/// A `Reactor` is `!Send` (it holds its core's `!Sync` handle array): it must not be reached
/// from two threads at once. Here it is not: its thread has ended, and it moves whole, with the
/// only reference to its (leaked) handle array, as a core's state would if a core were
/// replaced.
struct Joined<T>(T);

// SAFETY: see the type's docs: the value is only ever reached from one thread at a time (the
// one that built it, then, after `join`, which orders everything that thread did before what
// the joiner does, the joiner), and nothing else holds a reference into its handle array.
#[allow(unsafe_code)]
unsafe impl<T> Send for Joined<T> {}

/// Core `core`'s handles of `N` indexes split evenly between `cores`, leaked for the execution.
fn handles<const N: usize, const W: usize>(core: usize, cores: usize) -> &'static Aio<N, W> {
    let per = N / cores;
    leak(Aio::for_range(core * per..(core + 1) * per))
}

/// Storage that lives for the whole execution (the links borrow it; loom threads need
/// `'static`). One small leak per explored execution.
fn leak<T>(v: T) -> &'static mut T {
    Box::leak(Box::new(v))
}

/// Takes every completion `r` has, recording each cookie once (a second one fails the model).
fn collect<Q: BlockQueue, const C: usize, const N: usize, const W: usize>(
    r: &mut Reactor<'static, Q, C, N, W>,
    into: &mut BTreeMap<u32, Result<(), IoError>>,
) {
    while let Some(Completion { cookie, result }) = r.next_completion() {
        assert!(
            into.insert(cookie, result).is_none(),
            "cookie {cookie} completed twice"
        );
    }
}

/// Every reactor's bookkeeping at a poll boundary: nothing dropped, no refused transition, no
/// unknown device tag, no corrupt ring slot, and the submitted/completed/in-flight balance.
fn sane<Q: BlockQueue, const C: usize, const N: usize, const W: usize>(
    r: &Reactor<'static, Q, C, N, W>,
) {
    let s = r.stats();
    assert_eq!(
        (s.dropped, s.lifecycle_errors, s.bad_tags),
        (0, 0, 0),
        "core {}: {s:?}",
        r.core()
    );
    assert_eq!(
        s.submitted,
        s.completed_ok + s.failed + (r.in_flight() - r.staged()) as u64,
        "core {}: {s:?}",
        r.core()
    );
}

/// Two producers, cores 0 and 1, each send one message to core 2 with the real
/// [`Links::send`]; core 2 looks twice with the real [`Links::recv`] while they run, and again
/// (a bounded number of times) after both finished. Every message must arrive exactly once.
/// Rings of one slot each.
///
/// Catches: a `MailFlag::notify` that is a plain store (the second producer's store breaks the
/// release sequence of the first one's, so core 2 can clear the flag, find core 0's ring
/// empty and never look again: see the control below); a `take` that is a load then a store of
/// `false` (a notify between the two is wiped out); a ring whose flag store is not Release or
/// whose flag load is not Acquire (loom reports the value cell's access as a data race).
fn two_senders_one_receiver(mail: fn() -> [MailFlag; 3]) {
    loom::model(move || {
        let [l0, l1, mut l2] = split(leak(MeshStorage::<u32, 3, 1>::with_mail(mail())));
        let sender = |mut l: Links<'static, u32, 3>, v: u32| {
            thread::spawn(move || l.send(2, v).expect("an empty ring of one slot"))
        };
        let s0 = sender(l0, 10);
        let s1 = sender(l1, 11);
        let mut got = Vec::new();
        for _ in 0..2 {
            got.extend(l2.recv());
        }
        s0.join().unwrap();
        s1.join().unwrap();
        for _ in 0..3 {
            got.extend(l2.recv());
        }
        got.sort_unstable();
        assert_eq!(got, [10, 11], "a message was never received");
        assert_eq!(l2.ring_faults(), 0);
    });
}

/// Runs `model`, which must fail, and checks it failed with a panic message containing
/// `needle` (so a control cannot pass by failing for some other reason).
fn must_fail(model: impl FnOnce() + std::panic::UnwindSafe, needle: &str) {
    let err = std::panic::catch_unwind(model).expect_err("loom should have found the bug");
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("");
    assert!(
        msg.contains(needle),
        "failed, but not with {needle:?}: {msg}"
    );
}

/// See [`two_senders_one_receiver`]. Bound: `LOOM_MAX_PREEMPTIONS` (3 in CI).
#[test]
fn mesh_two_senders_never_lose_mail() {
    two_senders_one_receiver(|| core::array::from_fn(|_| MailFlag::new()));
}

/// Control for [`mesh_two_senders_never_lose_mail`]: the same model with every core's mail
/// flag built to notify with a plain store must fail (loom finds the lost message), which
/// shows the model can tell the RMW from the store. (Loom prints the failing interleaving's
/// panic message; that output is expected.)
#[test]
fn control_plain_store_notify_loses_mail() {
    must_fail(
        || two_senders_one_receiver(|| core::array::from_fn(|_| MailFlag::plain_store_control())),
        "a message was never received",
    );
}

/// One producer sends three messages through a ring of **one** slot, so the slot is reused
/// twice; it retries on backpressure (`Full`), the consumer receives with the real `recv`
/// (yielding when there is nothing), until all three arrived, in order.
///
/// Catches: a consumer whose flag clear is not Release, or a producer whose flag check is
/// not Acquire (the producer's next write of the slot races the consumer's take of the
/// previous value: loom reports the cell access). (A `recv_if` that does not re-arm the flag
/// cannot fail here, one slot never leaves a message behind: the exchange model catches it.)
#[test]
fn mesh_slot_reuse_is_ordered_by_the_flags() {
    loom::model(|| {
        let [mut l0, mut l1] = split(leak(MeshStorage::<u32, 2, 1>::new()));
        let producer = thread::spawn(move || {
            for v in 1..=3 {
                let mut m = v;
                loop {
                    match l0.send(1, m) {
                        Ok(()) => break,
                        Err(keel_reactor::SendError::Full(back)) => {
                            m = back;
                            thread::yield_now();
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match l1.recv() {
                Some(v) => got.push(v),
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(l1.ring_faults(), 0);
    });
}

type Exchange = Reactor<'static, NullQueue, 2, 4, 1>;

/// Two real reactors exchange requests through the real mesh: core 1 (no queue pair) issues
/// two reads to core 0 (which owns a queue pair) and polls once; core 0 polls twice and also
/// does a local read of its own. Each core has its own two handles. Then both reactors are
/// drained deterministically (four passes each). Checks: each read completes exactly once,
/// successfully, on its issuer; every handle is back in its core's array; no refused
/// transition, unknown tag, drop or corrupt slot.
///
/// Catches: a lost `Msg::Io` or `Msg::Done` (a mail flag cleared with a message behind it: a
/// `take` made of a load and a store, a `recv_if` that does not re-arm when it leaves a
/// message behind, a plain-store `notify` with core 0 re-arming its own flag); a reap or
/// submission path that leaves a handle out of the array (core 1's two requests use both its
/// handles exactly); a handle reused while still on a queue.
/// Bound: 3 preemptions.
fn exchange(mail: fn() -> [MailFlag; 2]) {
    loom::model(move || {
        let [l0, l1] = split(leak(MeshStorage::<Msg, 2, 2>::with_mail(mail())));
        let owner = thread::spawn(move || {
            let aio = handles(0, 2);
            let mut r: Exchange = Reactor::new(l0, aio, Some(NullQueue::new(64)));
            r.submit(read(9), 9).expect("its own handle");
            for _ in 0..2 {
                r.poll();
            }
            Joined((r, aio))
        });
        let issuer = thread::spawn(move || {
            let aio = handles(1, 2);
            let mut r: Exchange = Reactor::new(l1, aio, None);
            for i in 1..=2 {
                r.submit_to(0, read(i), i as u32).expect("room for two");
            }
            r.poll();
            Joined((r, aio))
        });
        let Joined((mut r0, a0)) = owner.join().unwrap();
        let Joined((mut r1, a1)) = issuer.join().unwrap();
        let (mut done, mut own) = (BTreeMap::new(), BTreeMap::new());
        for _ in 0..4 {
            r0.poll();
            r1.poll();
            collect(&mut r1, &mut done);
            collect(&mut r0, &mut own);
        }
        assert_eq!(
            done,
            BTreeMap::from([(1, Ok(())), (2, Ok(()))]),
            "each request answered once"
        );
        assert_eq!(own, BTreeMap::from([(9, Ok(()))]), "core 0's own read");
        for r in [&r0, &r1] {
            sane(r);
        }
        assert_eq!(r0.stats().remote_served, 2);
        assert_eq!(r1.stats().remote_answered, 2);
        assert_eq!(r1.issued(), 0);
        assert_eq!(
            (a0.free_count(), a1.free_count()),
            (2, 2),
            "a handle was lost"
        );
    });
}

/// See [`exchange`].
#[test]
fn two_reactors_exchange_requests() {
    exchange(|| core::array::from_fn(|_| MailFlag::new()));
}

/// Control for [`two_reactors_exchange_requests`]: with plain-store mail flags, loom finds a
/// request or an answer that is never seen (core 0's own re-arm of its flag is a second writer
/// that breaks the release sequence of core 1's notify).
#[test]
fn control_reactors_with_plain_store_notify_lose_a_message() {
    must_fail(
        || exchange(|| core::array::from_fn(|_| MailFlag::plain_store_control())),
        "each request answered once",
    );
}

loom::lazy_static! {
    /// Raised by [`adopt_call`] on the core that is to adopt the queue pair (the firmware's
    /// `ADOPT_PENDING`).
    static ref ADOPT: AtomicBool = AtomicBool::new(false);
}

/// The `Msg::Call` core 0 sends after parking its queue pair: it runs inside core 1's poll
/// pass, which holds core 1's reactor, so it only raises a flag (as the firmware's does).
fn adopt_call(_core: usize, _arg: usize) {
    ADOPT.store(true, Ordering::Release);
}

type Handoff = Reactor<'static, NullQueue, 2, 6, 1>;

/// Queue-pair handoff from core 0 to core 1, the firmware's protocol: core 0 owns the queue
/// pair, of depth one; core 1 sends it two reads (so one can be staged behind the other).
/// Core 0 polls once, quiesces (with `quiesce_first`; without,
/// it relies on `take_queue` refusing while busy), takes its queue pair (polling while it is
/// busy), parks it in a handoff cell (a mutex, the firmware's critical section),
/// and tells core 1 with a `Msg::Call`; then it keeps polling (answering whatever still comes
/// in). Core 1 polls, and adopts the queue pair when the call has run, then issues a read of
/// its own on it. A deterministic drain finishes the job.
///
/// Checks: each read sent to core 0 completes exactly once, `Ok` (served before the handoff)
/// or `Aborted` (it reached core 0 after it stopped accepting); core 1's own read completes `Ok`
/// on the adopted queue pair; no device tag is unknown to the core that reaps it (nothing was
/// on the queue pair when it changed hands), no refused transition; every handle back.
///
/// Catches: a reactor without a queue pair that stages an inbound request instead of refusing
/// it (it would never be submitted: the read never completes); `take_queue` that does not
/// count staged I/O as in flight (same); a queue pair handed over with I/O on it (core 1
/// reaps a tag it never submitted: `bad_tags`, and core 0's I/O never completes; the variant
/// without quiesce catches this one). Bound: 3 preemptions.
fn handoff(quiesce_first: bool) {
    loom::model(move || {
        // Rings of three: core 0 may owe two answers and the call at once.
        let [l0, l1] = split(leak(MeshStorage::<Msg, 2, 3>::new()));
        let cell: Arc<Mutex<Option<NullQueue>>> = Arc::new(Mutex::new(None));
        let old = {
            let cell = cell.clone();
            thread::spawn(move || {
                let aio = handles(0, 2);
                let mut r: Handoff = Reactor::new(l0, aio, Some(NullQueue::new(1)));
                r.poll();
                if quiesce_first {
                    r.quiesce(3);
                }
                let mut q = None;
                for _ in 0..4 {
                    match r.take_queue() {
                        Ok(taken) => {
                            q = Some(taken);
                            break;
                        }
                        Err(ReactorError::Busy { .. }) => {
                            r.poll();
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                *cell.lock().unwrap() = Some(q.expect("quiesced"));
                r.call(1, adopt_call, 0).expect("room for the call");
                r.poll();
                Joined((r, aio))
            })
        };
        let adopt = |r: &mut Handoff, cell: &Mutex<Option<NullQueue>>| -> bool {
            if !r.has_queue() && ADOPT.load(Ordering::Acquire) {
                let q = cell.lock().unwrap().take().expect("parked before the call");
                assert!(r.adopt_queue(q).is_ok());
                r.submit(read(2), 2).expect("its own queue pair now");
                return true;
            }
            false
        };
        let new = {
            let cell = cell.clone();
            thread::spawn(move || {
                let aio = handles(1, 2);
                let mut r: Handoff = Reactor::new(l1, aio, None);
                r.submit_to(0, read(1), 1).expect("room");
                r.submit_to(0, read(3), 3).expect("room");
                for _ in 0..2 {
                    r.poll();
                    adopt(&mut r, &cell);
                }
                Joined((r, aio))
            })
        };
        let Joined((mut r0, a0)) = old.join().unwrap();
        let Joined((mut r1, a1)) = new.join().unwrap();
        let mut done = BTreeMap::new();
        for _ in 0..4 {
            r0.poll();
            r1.poll();
            adopt(&mut r1, &cell);
            collect(&mut r1, &mut done);
        }
        assert!(
            !r0.has_queue() && r1.has_queue(),
            "the queue pair moved once"
        );
        assert_eq!(done.len(), 3, "every read completed: {done:?}");
        for c in [1, 3] {
            assert!(
                matches!(done[&c], Ok(()) | Err(IoError::Aborted)),
                "{:?}",
                done[&c]
            );
        }
        assert_eq!(done[&2], Ok(()));
        for r in [&r0, &r1] {
            sane(r);
        }
        assert_eq!(
            (a0.free_count(), a1.free_count()),
            (3, 3),
            "a handle was lost"
        );
    });
}

/// See [`handoff`]: the firmware's order (quiesce, then take).
#[test]
fn queue_pair_handoff_between_reactors() {
    handoff(true);
}

/// See [`handoff`]: no quiesce; `take_queue`'s refusal while busy is all that keeps the queue
/// pair from changing hands with I/O on it.
#[test]
fn queue_pair_handoff_relies_on_take_queue_refusing_while_busy() {
    handoff(false);
}
