//! Loom model checks for keel-aio: the reactor's fast paths (`start_submitted_burst` across
//! bitmap words, a reap `batch` with `complete_and_reclaim` and `complete_and_share`, the
//! issuer's `complete_local_and_reclaim`, a duplicate completion) and the slow paths (`wait`,
//! `wait_for_free`, seed 000's separate reads as a control that must fail).
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

/// The reactor's fast paths on a handle array of two bitmap words (66 handles), racing another
/// core's reap. At the start handles 0..=64 are in flight (a burst of 64, which empties word 0
/// and moves the bitmap's hint to word 1, then one more) and 65 is free.
///
/// * The task (a reactor's `submit_burst`) starts a burst of two with
///   `start_submitted_burst`: 65 from word 1 (emptying it wraps the hint to word 0), and a
///   second handle from word 0 if the reap freed one before the burst's section.
/// * The interrupt (the owner core's `reap_batch`) reaps in one `batch`: 63 is a local
///   success (`complete_and_reclaim`: back to Idle, generation bumped, bit released), 62 a
///   remote one (`complete_and_share`). It then tells the issuer (the `Msg::Done`), and the
///   device reports 63's tag again (a duplicate completion, in a batch of its own).
/// * The task, as 62's issuer, takes the answer and runs `complete_local_and_reclaim`.
///
/// Checks: the burst starts one or two handles, none twice and none still in flight; a reused
/// 63 carries a new generation; the duplicate completion is refused and leaves the new owner's
/// I/O Submitted; 62's issuer gets the device's result; the next burst starts every free
/// handle, each of them Idle before; once everything is completed, all 66 handles are free.
///
/// Catches: a reclaim that does not bump the generation (the duplicate completion then
/// completes the burst's new I/O); a completion path that frees the bitmap bit before checking
/// generation and state (the duplicate then frees the bit of a handle in use, and the burst
/// claims a Submitted handle: `IllegalTransition`); a reclaim that frees the bit without
/// moving the handle to Idle (same); a burst that loses the rest of a bulk claim, or a reclaim
/// that does not free the bit (handles missing at the end). Bound: 3 preemptions.
#[test]
fn burst_and_batch_reap_race_across_words() {
    use keel_aio::{HandleState, IoError};
    use loom::sync::atomic::{AtomicBool, Ordering};
    type Two = Aio<66, 2>;
    fn desc(k: usize) -> IoDesc {
        IoDesc {
            op: IoOp::Read,
            lba: k as u64,
            blocks: 1,
        }
    }
    loom::model(|| {
        let aio = Arc::new(Two::new());
        let mut held = Vec::new();
        let (n, r) = aio.start_submitted_burst(64, desc, |_, io| held.push(io));
        assert_eq!((n, r), (64, Ok(())));
        let (n, r) = aio.start_submitted_burst(1, |_| desc(64), |_, io| held.push(io));
        assert_eq!((n, r), (1, Ok(())));
        assert_eq!(aio.free_count(), 1);
        let (io62, io63) = (held[62], held[63]);
        let done = Arc::new(AtomicBool::new(false));
        let irq = {
            let (aio, done) = (aio.clone(), done.clone());
            thread::spawn(move || {
                aio.batch(|b| {
                    b.complete_and_reclaim(io63, Ok(4096)).unwrap();
                    b.complete_and_share(io62, Ok(512)).unwrap();
                });
                done.store(true, Ordering::Release);
                let dup = aio.batch(|b| b.complete_and_reclaim(io63, Ok(4096)));
                assert!(
                    matches!(dup, Err(AioError::Stale { .. })),
                    "duplicate completion accepted: {dup:?}"
                );
            })
        };
        let mut started = Vec::new();
        let (n, r) = aio.start_submitted_burst(2, |k| desc(100 + k), |_, io| started.push(io));
        assert_eq!(r, Ok(()), "burst refused");
        assert!(
            (1..=2).contains(&n) && n == started.len(),
            "{n} {started:?}"
        );
        assert_eq!(started[0].index(), 65, "word 1's free handle first");
        while !done.load(Ordering::Acquire) {
            thread::yield_now();
        }
        assert_eq!(aio.complete_local_and_reclaim(io62), Ok(Ok(512)));
        irq.join().unwrap();
        for (k, &io) in started.iter().enumerate() {
            assert_ne!(io.index(), 62, "62 was still in flight when the burst ran");
            if io.index() == 63 {
                assert_eq!(
                    io.generation(),
                    io63.generation() + 1,
                    "reused 63: new generation"
                );
            }
            let now = aio.snapshot(io.index()).unwrap();
            assert_eq!(
                (now.state, now.generation),
                (HandleState::Submitted, io.generation()),
                "the burst's I/O {k} was disturbed"
            );
        }
        // The reactor's next pass: a burst of two gets every free handle (62, and 63 unless
        // the burst above reused it), each Idle before (a bit freed for a handle in use would
        // hand out a Submitted one: the burst stops with IllegalTransition).
        let free = aio.free_count();
        let mut next = Vec::new();
        let (n, r) = aio.start_submitted_burst(2, |k| desc(200 + k), |_, io| next.push(io));
        assert_eq!((n, r), (free, Ok(())), "the next burst: {next:?}");
        started.extend(next);
        // Complete everything still in flight; every handle must come back.
        for io in held.iter().chain(&started) {
            if *io == io62 || *io == io63 {
                continue;
            }
            aio.batch(|b| b.complete_and_reclaim(*io, Err(IoError::Aborted)))
                .unwrap();
        }
        assert_eq!(aio.free_count(), 66, "a handle was lost");
        assert_eq!(aio.in_flight(), 0);
    });
}
