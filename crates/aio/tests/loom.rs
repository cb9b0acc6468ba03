//! Loom model checks for keel-aio.
//!
//! Run with (preemption bound 3; each test is exhaustive up to that bound):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p keel-aio --release --test loom
//! ```
//!
//! Interrupts: under loom the crate's critical section is a loom mutex, and the "interrupt"
//! thread below only touches handles through `Aio`'s methods, which all run inside it. So the
//! interrupt can run whenever the task has interrupts enabled (between critical sections,
//! including between the task's state and generation reads if they were separate), but never
//! inside one: the same constraint as `critical_section::with` on the board.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;

use keel_aio::{Aio, AioError, IoDesc, IoOp, IoRef, WaitOutcome};

type One = Aio<1, 1>;

const READ: IoDesc = IoDesc {
    op: IoOp::Read,
    lba: 0,
    blocks: 1,
};

fn submit(aio: &One) -> IoRef {
    let io = aio.acquire().unwrap();
    aio.define(io, READ).unwrap();
    aio.stage(io).unwrap();
    assert_eq!(aio.submit(io), Ok(READ));
    io
}

/// Polling = letting the other thread run.
fn poll() -> bool {
    thread::yield_now();
    true
}

/// The task submits an I/O and waits; the interrupt completes it from the raw command id
/// (spinning until the I/O is submitted). The task sees exactly the device's result, then
/// reclaims the handle, whose generation moves on. Bound: 3 preemptions.
#[test]
fn submit_complete_wait_reclaim() {
    loom::model(|| {
        let aio = Arc::new(One::new());
        let irq = {
            let aio = aio.clone();
            thread::spawn(move || loop {
                match aio.complete_raw(0, Ok(512)) {
                    Ok(_) => break,
                    // Not submitted yet: interrupts come later.
                    Err(AioError::IllegalTransition { .. }) => thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            })
        };
        let io = submit(&aio);
        assert_eq!(aio.wait(io, &mut poll), Ok(WaitOutcome::Done(Ok(512))));
        assert_eq!(aio.finish(io), Ok(Ok(512)));
        irq.join().unwrap();
        let now = aio.snapshot(0).unwrap();
        assert_eq!(now.generation, io.generation() + 1);
        assert_eq!(aio.free_count(), 1);
    });
}

/// Seed 000 under loom: while the task waits for a free handle, interrupt processing
/// completes the in-flight I/O, reclaims it, and reuses (acquires and releases) the handle.
/// Whatever the interleaving, the task never waits on the reused handle in a wrong state
/// (no `NotSubmitted`), never reports "nothing in flight" while it can still get the handle,
/// and ends up owning the handle with a newer generation. Bound: 3 preemptions.
#[test]
fn wait_for_free_survives_interrupt_reclaim_and_reuse() {
    loom::model(|| {
        let aio = Arc::new(One::new());
        let first = submit(&aio);
        let irq = {
            let aio = aio.clone();
            thread::spawn(move || {
                aio.complete(first, Ok(4096)).unwrap();
                // The barrier handler: drain and reclaim it, unless the task already did.
                match aio.finish(first) {
                    Ok(r) => assert_eq!(r, Ok(4096)),
                    Err(AioError::Stale { .. }) => return,
                    // The task is mid-way through reclaiming it (a step it already took).
                    Err(AioError::IllegalTransition { .. }) => return,
                    Err(e) => panic!("{e:?}"),
                }
                // Reuse: somebody acquires and releases the handle again.
                if let Ok(again) = aio.acquire() {
                    aio.release(again).unwrap();
                }
            })
        };
        let got = loop {
            match aio.wait_for_free(&mut poll) {
                Ok(io) => break io,
                // The interrupt holds the reused handle and nothing is in flight: a correct
                // answer; try again once it released it.
                Err(AioError::NothingInFlight) => thread::yield_now(),
                Err(e) => panic!("wrong-state wait or other error: {e:?}"),
            }
        };
        irq.join().unwrap();
        assert!(got.generation() > first.generation());
        assert_eq!(aio.wait(first, &mut poll), Ok(WaitOutcome::Recycled));
        aio.release(got).unwrap();
        assert_eq!(aio.free_count(), 1);
    });
}

/// Control: the naive seed-000 wait (state and generation read in two critical sections, so
/// the interrupt can run between them) is caught by loom, which shows the model really does
/// interleave the interrupt between critical sections. Bound: 3 preemptions. (Loom prints
/// the failing interleaving's panic message; that output is expected.)
#[test]
fn loom_catches_the_naive_separate_reads() {
    let caught = std::panic::catch_unwind(|| {
        loom::model(|| {
            let aio = Arc::new(One::new());
            let first = submit(&aio);
            let irq = {
                let aio = aio.clone();
                thread::spawn(move || {
                    aio.complete(first, Ok(1)).unwrap();
                    assert_eq!(aio.finish(first), Ok(Ok(1)));
                    // Reused, and held by its new owner.
                    let _held = aio.acquire().unwrap();
                })
            };
            let state = aio.snapshot(0).unwrap().state;
            if state.is_in_flight() {
                let generation = aio.snapshot(0).unwrap().generation; // too late
                let got = aio.wait(IoRef::new(0, generation), &mut poll);
                assert!(
                    !matches!(got, Err(AioError::NotSubmitted { .. })),
                    "waiting for own IO in wrong state"
                );
            }
            irq.join().unwrap();
        });
    });
    assert!(caught.is_err(), "loom should have found the interleaving");
}
