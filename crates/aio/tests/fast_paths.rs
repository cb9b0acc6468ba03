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
