//! The combined transitions: the same lifecycle, fewer critical sections, and a refused path
//! leaves the handle exactly as it was.

use keel_aio::{Aio, AioError, HandleState, IoDesc, IoOp};
use keel_slots::words_for;

const N: usize = 8;
type A = Aio<N, { words_for(N) }>;

fn desc() -> IoDesc {
    IoDesc {
        op: IoOp::Read,
        lba: 7,
        blocks: 1,
    }
}

#[test]
fn start_submit_complete_reclaim() {
    let aio = A::new();
    let io = aio.start(desc()).unwrap();
    assert_eq!(aio.snapshot(io.index()).unwrap().state, HandleState::Staged);
    assert_eq!(aio.submit(io).unwrap(), desc());
    aio.complete_and_share(io, Ok(512)).unwrap();
    assert_eq!(
        aio.snapshot(io.index()).unwrap().state,
        HandleState::CompletedShared
    );
    assert_eq!(aio.complete_local_and_reclaim(io).unwrap(), Ok(512));
    let snap = aio.snapshot(io.index()).unwrap();
    assert_eq!(
        (snap.state, snap.generation),
        (HandleState::Idle, io.generation() + 1)
    );
    assert_eq!(aio.free_count(), N);
}

#[test]
fn refused_paths_change_nothing() {
    let aio = A::new();
    let io = aio.start(desc()).unwrap();
    // Not submitted yet: a completion (e.g. forged by a device) is refused, the handle stays Staged.
    assert!(matches!(
        aio.complete_and_share(io, Ok(0)),
        Err(AioError::IllegalTransition { .. })
    ));
    assert_eq!(aio.snapshot(io.index()).unwrap().state, HandleState::Staged);
    aio.submit(io).unwrap();
    aio.complete_and_share(io, Ok(1)).unwrap();
    // A duplicate completion is refused and does not overwrite the first result.
    assert!(aio
        .complete_and_share(io, Err(keel_aio::IoError::Aborted))
        .is_err());
    assert_eq!(aio.complete_local_and_reclaim(io).unwrap(), Ok(1));
    // The handle was recycled: the old reference is stale for every path.
    assert!(matches!(
        aio.complete_local_and_reclaim(io),
        Err(AioError::Stale { .. })
    ));
    assert!(matches!(
        aio.complete_and_share(io, Ok(0)),
        Err(AioError::Stale { .. })
    ));
    assert_eq!(aio.free_count(), N);
}

#[test]
fn start_reports_exhaustion() {
    let aio = A::new();
    let held: Vec<_> = (0..N).map(|_| aio.start(desc()).unwrap()).collect();
    assert_eq!(aio.start(desc()), Err(AioError::NoFreeHandle));
    assert_eq!(held.len(), N);
}

#[test]
fn batch_applies_each_transition_with_the_same_checks() {
    let aio = A::new();
    let a = aio.start(desc()).unwrap();
    let b = aio.start(desc()).unwrap();
    // One critical section: submit both, complete one fully, refuse a bogus completion.
    let (sa, sb, bogus) = aio.batch(|t| (t.submit(a), t.submit(b), t.complete_and_share(a, Ok(3))));
    assert_eq!((sa.unwrap(), sb.unwrap()), (desc(), desc()));
    assert!(bogus.is_ok());
    aio.batch(|t| {
        assert!(
            t.complete_and_reclaim(a, Ok(0)).is_err(),
            "a is past Submitted: refused"
        );
        t.complete_and_reclaim(b, Ok(4)).unwrap();
        assert!(t.submit(b).is_err(), "b was reclaimed: stale");
    });
    assert_eq!(aio.complete_local_and_reclaim(a).unwrap(), Ok(3));
    assert_eq!(aio.free_count(), N);
}

#[test]
fn start_submitted_is_start_then_submit() {
    let aio = A::new();
    let io = aio.start_submitted(desc()).unwrap();
    let snap = aio.snapshot(io.index()).unwrap();
    assert_eq!(
        (snap.state, snap.generation, snap.result),
        (HandleState::Submitted, io.generation(), None)
    );
    // Already submitted: a second submit is refused and changes nothing.
    assert!(matches!(
        aio.submit(io),
        Err(AioError::IllegalTransition { .. })
    ));
    // Counted as in flight (waiters may wait on it), and completes like any submitted I/O.
    assert_eq!(aio.in_flight(), 1);
    assert_eq!(
        aio.wait(io, &mut || {
            aio.complete(io, Ok(9)).unwrap();
            true
        })
        .unwrap(),
        keel_aio::WaitOutcome::Done(Ok(9))
    );
    assert_eq!(aio.finish(io).unwrap(), Ok(9));
    assert_eq!(aio.free_count(), N);
    // Exhaustion is reported, not a panic, and the held handles are all Submitted.
    let held: Vec<_> = (0..N)
        .map(|_| aio.start_submitted(desc()).unwrap())
        .collect();
    assert_eq!(aio.start_submitted(desc()), Err(AioError::NoFreeHandle));
    assert_eq!(aio.in_flight(), held.len());
}

#[test]
fn start_submitted_burst_starts_what_it_can_in_order() {
    let aio = A::new();
    let descs: Vec<IoDesc> = (0..5)
        .map(|i| IoDesc {
            op: IoOp::Read,
            lba: i,
            blocks: 1,
        })
        .collect();
    let mut out = vec![];
    let burst = |out: &mut Vec<(usize, keel_aio::IoRef)>| {
        out.clear();
        aio.start_submitted_burst(5, |k| descs[k], |k, io| out.push((k, io)))
    };
    assert_eq!(burst(&mut out), (5, Ok(())));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    let mut indexes: Vec<usize> = out.iter().map(|o| o.1.index()).collect();
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 5, "five distinct handles");
    for &(_, io) in &out {
        let snap = aio.snapshot(io.index()).unwrap();
        assert_eq!(
            (snap.state, snap.generation),
            (HandleState::Submitted, io.generation())
        );
        assert_eq!(aio.batch(|b| b.complete_and_share(io, Ok(0))), Ok(()));
    }
    assert_eq!(aio.in_flight(), 5);
    // Only 3 handles left: a burst of 5 starts 3; then none are free.
    assert_eq!(burst(&mut out), (3, Ok(())));
    assert_eq!(out.len(), 3);
    assert_eq!(burst(&mut out), (0, Err(AioError::NoFreeHandle)));
    assert!(out.is_empty());
    // An empty burst is not an error.
    assert_eq!(
        aio.start_submitted_burst(0, |k| descs[k], |_, _| {}),
        (0, Ok(()))
    );
    assert_eq!(aio.free_count(), 0);
}
