//! The handle lifecycle: legal and illegal transitions, generations, waits.
#![cfg(not(loom))]

use keel_aio::{
    Aio, AioError, Driver, HandleState, IoDesc, IoError, IoOp, IoRef, IoResult, WaitOutcome,
};

type Small = Aio<2, 1>;

const READ: IoDesc = IoDesc {
    op: IoOp::Read,
    lba: 8,
    blocks: 1,
};

fn submitted(aio: &Small) -> IoRef {
    let io = aio.acquire().unwrap();
    aio.define(io, READ).unwrap();
    aio.stage(io).unwrap();
    assert_eq!(aio.submit(io), Ok(READ));
    io
}

#[test]
fn full_cycle_bumps_generation_and_frees_the_handle() {
    let aio = Small::new();
    let io = submitted(&aio);
    assert_eq!(
        aio.snapshot(io.index()).unwrap().state,
        HandleState::Submitted
    );
    assert_eq!(aio.in_flight(), 1);
    aio.complete(io, Ok(512)).unwrap();
    aio.complete_shared(io).unwrap();
    aio.complete_local(io).unwrap();
    assert_eq!(aio.reclaim(io), Ok(Ok(512)));
    let now = aio.snapshot(io.index()).unwrap();
    assert_eq!(now.state, HandleState::Idle);
    assert_eq!(now.generation, io.generation() + 1);
    assert_eq!(aio.free_count(), 2);
    assert_eq!(aio.in_flight(), 0);
}

#[test]
fn release_from_handed_out() {
    let aio = Small::new();
    let io = aio.acquire().unwrap();
    assert_eq!(aio.free_count(), 1);
    aio.release(io).unwrap();
    assert_eq!(aio.free_count(), 2);
    assert!(matches!(aio.release(io), Err(AioError::Stale { .. })));
}

#[test]
fn illegal_transitions_are_typed_errors() {
    let aio = Small::new();
    let io = aio.acquire().unwrap();
    assert_eq!(
        aio.submit(io),
        Err(AioError::IllegalTransition {
            index: io.index(),
            from: HandleState::HandedOut,
            to: HandleState::Submitted
        })
    );
    assert!(matches!(
        aio.complete(io, Ok(0)),
        Err(AioError::IllegalTransition { .. })
    ));
    assert!(matches!(
        aio.reclaim(io),
        Err(AioError::IllegalTransition { .. })
    ));
    aio.define(io, READ).unwrap();
    // Defined cannot go back to Idle, nor be defined twice.
    assert!(matches!(
        aio.release(io),
        Err(AioError::IllegalTransition { .. })
    ));
    assert!(matches!(
        aio.define(io, READ),
        Err(AioError::IllegalTransition { .. })
    ));
    // The handle is unchanged by refused transitions.
    assert_eq!(
        aio.snapshot(io.index()).unwrap().state,
        HandleState::Defined
    );
    // The transition table itself.
    use HandleState::*;
    let all = [
        Idle,
        HandedOut,
        Defined,
        Staged,
        Submitted,
        CompletedIo,
        CompletedShared,
        CompletedLocal,
    ];
    let legal = all
        .iter()
        .flat_map(|&a| all.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| a.can_move_to(b))
        .collect::<Vec<_>>();
    // Exactly the lifecycle's edges (the check is a bit table; this pins it to the design).
    assert_eq!(
        legal,
        vec![
            (Idle, HandedOut),
            (HandedOut, Idle),
            (HandedOut, Defined),
            (Defined, Staged),
            (Staged, Submitted),
            (Submitted, CompletedIo),
            (CompletedIo, CompletedShared),
            (CompletedShared, CompletedLocal),
            (CompletedLocal, Idle),
        ]
    );
}

#[test]
fn untrusted_indexes_are_range_checked() {
    let aio = Small::new();
    assert_eq!(
        aio.complete_raw(7, Ok(0)),
        Err(AioError::BadIndex {
            index: 7,
            capacity: 2
        })
    );
    assert!(matches!(aio.snapshot(2), Err(AioError::BadIndex { .. })));
    assert!(matches!(
        aio.define(IoRef::new(9, 0), READ),
        Err(AioError::BadIndex { .. })
    ));
    // A spurious completion for a handle that is not submitted.
    assert!(matches!(
        aio.complete_raw(0, Ok(0)),
        Err(AioError::IllegalTransition { .. })
    ));
    let io = submitted(&aio);
    assert_eq!(
        aio.complete_raw(io.index() as u32, Err(IoError::Device { status: 2 })),
        Ok(io)
    );
    // A duplicate completion.
    assert!(matches!(
        aio.complete_raw(io.index() as u32, Ok(0)),
        Err(AioError::IllegalTransition { .. })
    ));
    assert_eq!(aio.finish(io), Ok(Err(IoError::Device { status: 2 })));
}

#[test]
fn wait_reports_done_recycled_and_refuses_unsubmitted() {
    let aio = Small::new();
    let io = submitted(&aio);
    let mut polls = 0;
    let out = aio.wait(io, &mut || {
        polls += 1;
        aio.complete(io, Ok(4096)).unwrap();
        true
    });
    assert_eq!(out, Ok(WaitOutcome::Done(Ok(4096))));
    assert_eq!(polls, 1);
    assert_eq!(aio.finish(io), Ok(Ok(4096)));
    assert_eq!(
        aio.wait(io, &mut || panic!("no poll needed")),
        Ok(WaitOutcome::Recycled)
    );
    let fresh = aio.acquire().unwrap();
    assert_eq!(
        aio.wait(fresh, &mut || true),
        Err(AioError::NotSubmitted {
            state: HandleState::HandedOut
        })
    );
    let io = {
        aio.define(fresh, READ).unwrap();
        aio.stage(fresh).unwrap();
        aio.submit(fresh).unwrap();
        fresh
    };
    assert_eq!(aio.wait(io, &mut || false), Err(AioError::GaveUp));
}

/// Completes everything submitted, in index order, when polled; records what it saw.
struct Completer<'a> {
    aio: &'a Small,
    reclaimed: Vec<(IoRef, IoResult)>,
    waited: Vec<IoRef>,
}

impl Driver for Completer<'_> {
    fn poll(&mut self) -> bool {
        for i in 0..2u32 {
            let _ = self.aio.complete_raw(i, Ok(i));
        }
        true
    }
    fn on_reclaim(&mut self, io: IoRef, result: IoResult) {
        self.reclaimed.push((io, result));
    }
    fn on_wait(&mut self, io: IoRef, _in_flight: usize) {
        self.waited.push(io);
    }
}

#[test]
fn wait_for_free_reclaims_first_then_waits_for_the_oldest() {
    let aio = Small::new();
    let first = submitted(&aio);
    let second = submitted(&aio);
    // Complete the second: wait_for_free reclaims it without waiting.
    aio.complete(second, Ok(2)).unwrap();
    let mut d = Completer {
        aio: &aio,
        reclaimed: vec![],
        waited: vec![],
    };
    let got = aio.wait_for_free(&mut d).unwrap();
    assert_eq!(got.index(), second.index());
    assert_eq!(d.reclaimed, vec![(second, Ok(2))]);
    assert!(d.waited.is_empty());
    // Now nothing is complete: it waits for the oldest in flight (`first`).
    let _ = submitted_from(&aio, got);
    let mut d = Completer {
        aio: &aio,
        reclaimed: vec![],
        waited: vec![],
    };
    let again = aio.wait_for_free(&mut d).unwrap();
    assert_eq!(d.waited, vec![first], "waited for the oldest");
    assert!(d.reclaimed.contains(&(first, Ok(first.index() as u32))));
    assert!(aio.snapshot(again.index()).unwrap().state == HandleState::HandedOut);
}

fn submitted_from(aio: &Small, io: IoRef) -> IoRef {
    aio.define(io, READ).unwrap();
    aio.stage(io).unwrap();
    aio.submit(io).unwrap();
    io
}

#[test]
fn no_free_handle_and_nothing_in_flight_is_an_error_not_a_hang() {
    let aio = Small::new();
    let _a = aio.acquire().unwrap();
    let _b = aio.acquire().unwrap();
    assert_eq!(aio.acquire(), Err(AioError::NoFreeHandle));
    assert_eq!(
        aio.wait_for_free(&mut || panic!("must not poll")),
        Err(AioError::NothingInFlight)
    );
}

#[test]
fn const_construction() {
    // Const, so a core can build its array in place; not `Sync`, so never a `static`.
    let aio = const { Aio::<100, { keel_slots::words_for(100) }>::new() };
    assert_eq!(aio.capacity(), 100);
    assert_eq!(aio.free_count(), 100);
}

#[test]
fn a_range_hands_out_only_its_own_handles() {
    // Core 1 of 4 sharing 100 handle indexes: 25..50, and nothing else, however many it asks.
    let aio: Aio<100, { keel_slots::words_for(100) }> = Aio::for_range(25..50);
    assert_eq!(aio.free_count(), 25);
    let mut got: Vec<usize> = (0..25).map(|_| aio.acquire().unwrap().index()).collect();
    assert_eq!(aio.acquire(), Err(AioError::NoFreeHandle));
    got.sort();
    assert_eq!(got, (25..50).collect::<Vec<_>>());
    // A range past the end is cut at N.
    let aio: Aio<100, { keel_slots::words_for(100) }> = Aio::for_range(90..200);
    assert_eq!(aio.free_count(), 10);
}
