//! Reactor behaviour: cross-core I/O, backpressure, untrusted tags, queue-pair handoff and
//! shutdown in the middle of I/O, and real threads. Every test ends by checking the invariant
//! the issue names: submitted == completed + failed, and every I/O slot back in its array.

mod common;

use std::collections::HashMap;

use common::{read, FakeQueue};
use keel_aio::Aio;
use keel_reactor::{split, Completion, MeshStorage, Msg, Reactor, ReactorError};
use keel_slots::{words_for, CloseDuty, Teardown};

/// Handle indexes of the three cores together: each core owns 32 of them.
const N: usize = 96;
const PER_CORE: usize = N / 3;
const W: usize = words_for(N);
type R = Reactor<'static, FakeQueue, 3, N, W>;

fn mesh<const RING: usize>() -> [keel_reactor::Links<'static, Msg, 3>; 3] {
    split(Box::leak(Box::new(MeshStorage::<Msg, 3, RING>::new())))
}

/// Each core's own handle array (its share of the indexes), as the jobs build them.
#[derive(Clone, Copy)]
struct Handles([&'static Aio<N, W>; 3]);

impl Handles {
    fn free_count(&self) -> usize {
        self.0.iter().map(|a| a.free_count()).sum()
    }
}

fn aio() -> Handles {
    Handles(core::array::from_fn(|c| {
        &*Box::leak(Box::new(Aio::for_range(c * PER_CORE..(c + 1) * PER_CORE)))
    }))
}

fn reactors<const RING: usize>(q: FakeQueue) -> (Vec<R>, Handles) {
    let [l0, l1, l2] = mesh::<RING>();
    let a = aio();
    (
        vec![
            Reactor::new(l0, a.0[0], Some(q)),
            Reactor::new(l1, a.0[1], None),
            Reactor::new(l2, a.0[2], None),
        ],
        a,
    )
}

fn collect(r: &mut R, into: &mut HashMap<(usize, u32), Result<(), keel_blockdev::IoError>>) {
    while let Some(Completion { cookie, result }) = r.next_completion() {
        assert!(
            into.insert((r.core(), cookie), result).is_none(),
            "cookie {cookie} on core {} completed twice",
            r.core()
        );
    }
}

fn invariant(r: &R) {
    let s = r.stats();
    assert_eq!(
        s.submitted,
        s.completed_ok + s.failed + (r.in_flight() - r.staged()) as u64,
        "core {}: {s:?}",
        r.core()
    );
    assert_eq!(s.dropped, 0);
}

#[test]
fn cross_core_requests_complete_exactly_once() {
    let (mut rs, a) = reactors::<8>(FakeQueue::new(16, 2));
    let _ = a;
    let mut done = HashMap::new();
    let mut next = [0u32; 3];
    let total = 500u32;
    let mut passes = 0;
    while done.len() < 3 * total as usize {
        for c in 0..3 {
            while next[c] < total {
                match rs[c].submit_to(0, read(next[c] as u64), next[c]) {
                    Ok(()) => next[c] += 1,
                    Err(
                        ReactorError::Backpressure | ReactorError::NoSlot | ReactorError::Submit(_),
                    ) => break,
                    Err(e) => panic!("core {c}: {e:?}"),
                }
            }
            rs[c].poll();
            collect(&mut rs[c], &mut done);
        }
        passes += 1;
        assert!(passes < 100_000, "no progress");
    }
    assert!(done.values().all(|r| r.is_ok()));
    let s0 = rs[0].stats();
    assert_eq!(s0.submitted, 3 * total as u64);
    assert_eq!(s0.remote_served, 2 * total as u64);
    assert_eq!(rs[1].stats().remote_answered, total as u64);
    for r in &rs {
        invariant(r);
        assert_eq!(r.issued(), 0);
    }
}

#[test]
fn full_ring_is_backpressure_not_loss() {
    // Ring capacity 4 (every slot of the ring holds a message); core 0 does not poll at first.
    let (mut rs, _a) = reactors::<4>(FakeQueue::new(64, 1));
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..10 {
        match rs[1].submit_to(0, read(i), i as u32) {
            Ok(()) => accepted += 1,
            Err(ReactorError::Backpressure) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((accepted, refused), (4, 6));
    assert_eq!(rs[1].stats().backpressure, 6);
    let mut done = HashMap::new();
    for _ in 0..10 {
        rs[0].poll();
        rs[1].poll();
        collect(&mut rs[1], &mut done);
    }
    assert_eq!(done.len(), 4, "every accepted request answered");
    assert!(
        rs[1].submit_to(0, read(99), 99).is_ok(),
        "room again once the owner polled"
    );
}

#[test]
fn local_io_past_queue_depth_waits_and_refusals_complete() {
    // Depth 4: the fifth local I/O meets a full queue on the fast path (its handle is already
    // Submitted) and waits staged; later ones queue behind it. LBA 1000+ is refused outright.
    let mut q = FakeQueue::new(4, 1);
    q.refuse_lba_from = 1000;
    let (mut rs, a) = reactors::<8>(q);
    for i in 0..10u32 {
        let lba = if i == 2 { 1000 } else { i as u64 };
        rs[0].submit(read(lba), i).unwrap();
    }
    assert_eq!(rs[0].staged(), 5, "4 on the queue, 1 refused, 5 waiting");
    assert_eq!(
        a.0[0].in_flight(),
        5,
        "fast-path handles are Submitted, queued ones Staged"
    );
    let mut done = HashMap::new();
    for _ in 0..20 {
        rs[0].poll();
        collect(&mut rs[0], &mut done);
        invariant(&rs[0]);
    }
    assert_eq!(done.len(), 10, "every I/O completed once");
    assert_eq!(
        done[&(0, 2)],
        Err(keel_blockdev::IoError::OutOfRange),
        "the refusal came back as a completion"
    );
    assert!(done.iter().all(|(&(_, c), r)| c == 2 || r.is_ok()));
    let s = rs[0].stats();
    assert_eq!((s.lifecycle_errors, s.dropped, s.bad_tags), (0, 0, 0));
    assert_eq!((rs[0].issued(), rs[0].in_flight()), (0, 0));
    assert_eq!(a.free_count(), N, "every handle back in the array");
}

#[test]
fn a_burst_past_queue_depth_keeps_its_order_and_every_handle() {
    // Depth 4, 32 handles. A burst of 10 (one refused outright) fills the queue, stages the
    // rest already Submitted, in order; a second burst queues behind it; a third finds too few
    // handles and is cut short.
    let mut q = FakeQueue::new(4, 0);
    q.refuse_lba_from = 1000;
    let (mut rs, a) = reactors::<8>(q);
    let burst = |from: u32, n: u32| -> Vec<(keel_blockdev::BlockOp, u32)> {
        (from..from + n)
            .map(|i| (read(if i == 3 { 1000 } else { i as u64 }), i))
            .collect()
    };
    assert_eq!(rs[0].submit_burst(&burst(0, 10)), Ok(10));
    assert_eq!(rs[0].staged(), 5, "4 on the queue, 1 refused, 5 waiting");
    assert_eq!(
        rs[0].submit_burst(&burst(10, 10)),
        Ok(10),
        "behind the first"
    );
    assert_eq!(rs[0].staged(), 15);
    // 32 handles; 19 hold I/O (the refused one completed): 13 left for a burst of 20.
    assert_eq!(rs[0].submit_burst(&burst(20, 20)), Ok(13));
    let mut order = vec![];
    for _ in 0..40 {
        rs[0].poll();
        while let Some(c) = rs[0].next_completion() {
            order.push((c.cookie, c.result));
        }
        invariant(&rs[0]);
    }
    assert_eq!(order.len(), 33, "every accepted I/O completed once");
    let cookies: Vec<u32> = order.iter().map(|o| o.0).filter(|&c| c != 3).collect();
    assert!(
        cookies.windows(2).all(|w| w[0] < w[1]),
        "in order: {cookies:?}"
    );
    assert!(order
        .iter()
        .all(|&(c, r)| (c == 3) == (r == Err(keel_blockdev::IoError::OutOfRange))));
    let s = rs[0].stats();
    assert_eq!((s.lifecycle_errors, s.dropped), (0, 0));
    assert_eq!(a.free_count(), N, "every handle back in the array");
    // No handles at all: NoSlot, nothing queued.
    let held: Vec<_> = (0..PER_CORE).map(|_| a.0[0].acquire().unwrap()).collect();
    assert_eq!(rs[0].submit_burst(&burst(50, 3)), Err(ReactorError::NoSlot));
    for h in held {
        a.0[0].release(h).unwrap();
    }
}

#[test]
fn one_doorbell_per_burst_none_when_idle() {
    let (mut rs, _a) = reactors::<8>(FakeQueue::new(64, 1));
    for _ in 0..50 {
        rs[0].poll();
    }
    let bells = |r: &mut R| r.with_queue(|q| q.doorbells).unwrap();
    assert_eq!(bells(&mut rs[0]), 0, "idle passes ring nothing");
    for i in 0..5 {
        rs[0].submit(read(i), i as u32).unwrap();
    }
    rs[0].flush();
    rs[0].poll();
    assert_eq!(bells(&mut rs[0]), 1, "a burst of five, one doorbell");
    let mut done = HashMap::new();
    for _ in 0..5 {
        rs[0].poll();
        collect(&mut rs[0], &mut done);
    }
    assert_eq!((done.len(), bells(&mut rs[0])), (5, 1));
}

#[test]
fn forged_and_stale_tags_are_counted_not_routed() {
    let (mut rs, a) = reactors::<8>(FakeQueue::new(8, 1));
    let r = &mut rs[0];
    r.submit(read(1), 7).unwrap();
    r.poll();
    assert_eq!(r.next_completion().map(|c| c.cookie), Some(7));
    r.submit(read(2), 8).unwrap(); // slot 0 again, now generation 1
                                   // From the device: the old tag of slot 0 (generation 0, stale), an index past the pool, and
                                   // a slot that was never handed out.
    r.with_queue(|q| q.forged = vec![0, 0xFFFF, 5]);
    r.poll();
    assert_eq!(r.stats().bad_tags, 3);
    assert_eq!(r.next_completion().map(|c| c.cookie), Some(8));
    assert_eq!(
        r.next_completion(),
        None,
        "no completion invented for a bad tag"
    );
    invariant(r);
    assert_eq!(a.free_count(), N, "every handle back in its array");
}

#[test]
fn handoff_in_the_middle_of_io() {
    let (mut rs, a) = reactors::<16>(FakeQueue::new(16, 3));
    let mut done = HashMap::new();
    for i in 0..8 {
        rs[1].submit_to(0, read(i), i as u32).unwrap();
        rs[0].submit(read(100 + i), 100 + i as u32).unwrap();
    }
    rs[1].poll();
    rs[0].poll(); // takes core 1's requests: 16 in flight on core 0
    assert!(rs[0].in_flight() > 0);
    // Core 0 hands its queue pair to core 2 while I/O is in flight: quiesce lets it finish.
    assert_eq!(rs[0].quiesce(100), 0);
    // New requests that reach core 0 now are answered Aborted, not lost.
    rs[1].submit_to(0, read(50), 50).unwrap();
    let q = rs[0].take_queue().unwrap();
    assert!(matches!(
        rs[0].submit(read(1), 1),
        Err(ReactorError::NotAccepting)
    ));
    rs[2].adopt_queue(q).unwrap();
    for i in 0..8 {
        rs[1].submit_to(2, read(200 + i), 200 + i as u32).unwrap();
    }
    for _ in 0..50 {
        for r in rs.iter_mut() {
            r.poll();
            collect(r, &mut done);
        }
    }
    let aborted = done.iter().filter(|(_, r)| r.is_err()).count();
    assert_eq!(done.len(), 8 + 8 + 1 + 8);
    assert_eq!(
        aborted, 1,
        "the request that raced the handoff failed cleanly"
    );
    for r in &rs {
        invariant(r);
    }
    assert_eq!(a.free_count(), N, "every handle back in its array");
    assert_eq!(rs[2].stats().remote_served, 8);
}

#[test]
fn shutdown_with_a_stalled_io_fails_it_and_deletes_the_queue_once() {
    let (mut rs, a) = reactors::<8>(FakeQueue::new(16, 1));
    let r = &mut rs[0];
    for i in 0..4 {
        r.submit(read(i), i as u32).unwrap();
    }
    assert!(matches!(
        r.take_queue(),
        Err(ReactorError::Busy { in_flight: 4 })
    ));
    r.poll(); // the four are on the queue now
    r.with_queue(|q| q.stall_next = true);
    r.submit(read(9), 9).unwrap(); // the device will never complete this one
    assert_eq!(
        r.quiesce(20),
        1,
        "quiesce completes the rest; the stalled I/O is still in flight"
    );
    assert!(matches!(
        r.submit(read(10), 10),
        Err(ReactorError::NotAccepting)
    ));
    // The driver's per-command timeout fires: the I/O fails, it is not lost.
    r.with_queue(|q| q.time_out_stalled());
    assert_eq!(r.quiesce(5), 0);
    let mut done = HashMap::new();
    collect(r, &mut done);
    assert_eq!(done.len(), 5);
    assert_eq!(
        done.get(&(0, 9)),
        Some(&Err(keel_blockdev::IoError::Timeout))
    );
    let q = r.take_queue().unwrap();
    invariant(r);
    assert_eq!(a.free_count(), N, "every handle back in its array");
    let s = r.stats();
    assert_eq!((s.submitted, s.completed_ok, s.failed), (5, 4, 1));

    // Deleting the queue pair: the owner's shutdown and a controller reset both try. The
    // must-close flag gives exactly one of them the duty (seed 002).
    let t = Teardown::new();
    let duties = [t.request_close(), t.request_close()];
    assert_eq!(
        duties.iter().filter(|d| **d == CloseDuty::RunClose).count(),
        1
    );
    drop(q);
}

#[test]
fn real_threads_hammer_one_owner() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let [l0, l1, l2] = mesh::<16>();
    let stop = Arc::new(AtomicBool::new(false));
    let per_core = 5_000u32;
    // Each thread builds its own core's handles (`&Aio` cannot be shared with another thread).
    let own = |c: usize| -> &'static Aio<N, W> {
        Box::leak(Box::new(Aio::for_range(c * PER_CORE..(c + 1) * PER_CORE)))
    };
    let owner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let a = own(0);
            let mut r: R = Reactor::new(l0, a, Some(FakeQueue::new(32, 1)));
            while !stop.load(Ordering::Acquire) {
                r.poll();
            }
            while r.quiesce(1000) != 0 {}
            (r.stats(), a.free_count())
        })
    };
    let clients: Vec<_> = [l1, l2]
        .into_iter()
        .enumerate()
        .map(|(c, l)| {
            std::thread::spawn(move || {
                let a = own(c + 1);
                let mut r: R = Reactor::new(l, a, None);
                let (mut sent, mut got) = (0u32, 0u32);
                let mut seen = vec![false; per_core as usize];
                while got < per_core {
                    if sent < per_core && r.submit_to(0, read(sent as u64), sent).is_ok() {
                        sent += 1;
                    }
                    r.poll();
                    while let Some(c) = r.next_completion() {
                        assert!(!seen[c.cookie as usize], "duplicate answer");
                        seen[c.cookie as usize] = true;
                        assert!(c.result.is_ok());
                        got += 1;
                    }
                }
                (r.stats(), a.free_count())
            })
        })
        .collect();
    let client_stats: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Release);
    let (s0, free0) = owner.join().unwrap();
    assert_eq!(s0.submitted, 2 * per_core as u64);
    assert_eq!(s0.completed_ok, 2 * per_core as u64);
    assert_eq!((s0.dropped, s0.lifecycle_errors), (0, 0));
    assert_eq!(free0, PER_CORE, "the owner's handles all free");
    for (s, free) in client_stats {
        assert_eq!(s.remote_answered, per_core as u64);
        assert_eq!(free, PER_CORE, "every handle back in its core's array");
    }
}

/// Seed 004: messages come from other cores' memory. Forged ones (a handle index past the
/// array, a sender that is no other core, an answer for an I/O that is not waiting for one)
/// are counted and dropped: nothing panics or indexes out of range, no completion is invented,
/// and the real traffic behind them goes on.
#[test]
fn forged_messages_from_other_cores_are_counted_not_followed() {
    use keel_aio::IoRef;
    let [l0, mut rogue, l2] = mesh::<8>();
    let a = aio();
    let mut r0: R = Reactor::new(l0, a.0[0], Some(FakeQueue::new(16, 1)));
    let mut r2: R = Reactor::new(l2, a.0[2], None);
    // A real request from core 2; its handle (core 2's first: index 64, generation 0) is now
    // Submitted and on its way to core 0.
    r2.submit_to(0, read(5), 55).unwrap();
    let mine = 2 * PER_CORE as u16;
    let forged = |io, from| Msg::Io {
        op: read(1),
        io,
        from,
    };
    for m in [
        forged(IoRef::new(0xFFFF, 0), 1), // no such handle
        forged(IoRef::new(3, 0), 200),    // no such core
        forged(IoRef::new(3, 0), 0),      // "from" the receiver itself
    ] {
        rogue.send(0, m).unwrap();
    }
    // Answers nobody is waiting for, ahead of the real one: for core 2's handle while it is
    // still in flight (its exact index and generation, but from core 1, to which it was not
    // sent: delivering it would hand out the buffer the device is still reading into), for a
    // handle past the array, and a stale generation.
    for io in [
        IoRef::new(mine, 0),
        IoRef::new(0xFFFF, 0),
        IoRef::new(mine, 7),
    ] {
        rogue.send(2, Msg::Done { io, result: Ok(()) }).unwrap();
    }
    // Core 2 reads the forged answers while its request is still away (core 0 has not run).
    r2.poll();
    let mut done = HashMap::new();
    collect(&mut r2, &mut done);
    assert!(done.is_empty(), "a forged answer was delivered: {done:?}");
    for _ in 0..10 {
        r0.poll();
        r2.poll();
        collect(&mut r2, &mut done);
    }
    assert_eq!(done.len(), 1, "only the real answer: {done:?}");
    assert_eq!(done[&(2, 55)], Ok(()));
    assert_eq!(r0.stats().lifecycle_errors, 3, "three forged requests");
    assert_eq!(r2.stats().lifecycle_errors, 3, "three forged answers");
    assert_eq!(r2.stats().remote_answered, 1);
    assert_eq!((r0.stats().dropped, r2.stats().dropped), (0, 0));
    assert_eq!(r2.issued(), 0);
    assert_eq!(a.free_count(), N, "every handle back in its array");
}

#[test]
fn io_issued_while_the_queue_is_lent_waits_and_completes_after_its_return() {
    // While the queue pair is lent out, local I/O is staged (the fast path is closed); once it
    // is back, what waited goes out, and new I/O takes the fast path (nothing staged) again.
    let (mut rs, a) = reactors::<8>(FakeQueue::new(8, 1));
    rs[0].submit(read(0), 0).unwrap();
    let q = rs[0].lend_queue().expect("lent");
    for i in 1..4u32 {
        rs[0].submit(read(i as u64), i).unwrap();
    }
    assert_eq!(rs[0].staged(), 3, "nothing goes on a lent queue pair");
    rs[0].poll();
    assert_eq!(rs[0].next_completion(), None, "a lent pair reports nothing");
    rs[0].return_queue(q).map_err(|_| ()).expect("returned");
    let mut done = HashMap::new();
    for _ in 0..5 {
        rs[0].poll();
        collect(&mut rs[0], &mut done);
        invariant(&rs[0]);
    }
    assert_eq!(rs[0].staged(), 0);
    // Lent and returned with nothing issued meanwhile: the fast path is open right after the
    // return (no poll in between) and the next I/O goes on the queue at once, not staged.
    let q = rs[0].lend_queue().expect("lent");
    rs[0].return_queue(q).map_err(|_| ()).expect("returned");
    rs[0].submit(read(9), 9).unwrap();
    assert_eq!(
        rs[0].staged(),
        0,
        "after the return the fast path is open again"
    );
    for _ in 0..5 {
        rs[0].poll();
        collect(&mut rs[0], &mut done);
        invariant(&rs[0]);
    }
    assert_eq!(done.len(), 5, "every I/O completed once");
    assert!(done.values().all(|r| r.is_ok()));
    assert_eq!(a.free_count(), N, "every handle back in the array");
}
