//! Loom models for keel-aio's per-core/shared split.
//!
//! Run with (preemption bound 3; each test is exhaustive up to that bound):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p keel-aio --release --test loom
//! ```
//!
//! An `Aio` is one core's handle array and is `!Sync`: the compiler refuses to let a second
//! thread (core) or an interrupt handler (a `static`) reach it, so there is no interleaving
//! *inside* it left to check (the crate docs have the compile-fail examples). What crosses
//! cores is a message: an `IoRef` sent to the core that owns the queue pair, and the result
//! sent back. These models interleave that, with the real `Aio` on each side:
//!
//! * [`handles_cross_cores_only_as_messages`]: Keel's design. Passes.
//! * [`control_naive_shared_handle_array_loses_a_transition`]: the design before it, minus
//!   the lock: one handle array both cores write (the owner completing the issuer's handle
//!   while the issuer reclaims another), as unsynchronised read-modify-writes of the shared
//!   state. Loom finds the lost transition. (Loom prints the failing interleaving's panic
//!   message; that output is expected.)
#![cfg(loom)]

use std::collections::VecDeque;

use loom::sync::atomic::{AtomicU8, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use keel_aio::{Aio, AioError, HandleState, IoDesc, IoError, IoOp, IoRef};

/// A one-way message ring between two cores (the mesh's role; the mesh itself is modelled
/// in keel-reactor's loom tests).
type Ring<T> = Arc<Mutex<VecDeque<T>>>;

fn recv<T>(ring: &Ring<T>) -> Option<T> {
    ring.lock().unwrap().pop_front()
}

fn read(lba: u64) -> IoDesc {
    IoDesc {
        op: IoOp::Read,
        lba,
        blocks: 1,
    }
}

/// The issuer core owns handles 2..4 of the index space (its `Aio::for_range`, built on its
/// own thread) and sends two I/Os to the owner core, which owns handles 0..2 and completes
/// them on its "device" (one fails), answering each; meanwhile the owner runs an I/O of its
/// own through its own array. A forged answer (right index, stale generation) and a duplicate
/// answer arrive too. Checks: each issuer I/O completes once with the owner's result; the
/// forged and duplicate answers are refused and change nothing; the owner's array never
/// sees the issuer's handles; every handle of both arrays is free at the end, with its
/// generation moved on. Bound: 3 preemptions.
#[test]
fn handles_cross_cores_only_as_messages() {
    loom::model(|| {
        let to_owner: Ring<IoRef> = Arc::new(Mutex::new(VecDeque::new()));
        let to_issuer: Ring<(IoRef, Result<u32, IoError>)> = Arc::new(Mutex::new(VecDeque::new()));
        let owner = {
            let (rx, tx) = (to_owner.clone(), to_issuer.clone());
            thread::spawn(move || {
                let aio: Aio<4, 1> = Aio::for_range(0..2);
                let mine = aio.start_submitted(read(7)).unwrap();
                let mut served = 0;
                while served < 2 {
                    let Some(io) = recv(&rx) else {
                        thread::yield_now();
                        continue;
                    };
                    // The owner only matches and answers: the handle is the issuer's.
                    assert!(io.index() >= 2, "{io:?} is not the issuer's");
                    let result = if io.index() == 2 {
                        Ok(4096)
                    } else {
                        Err(IoError::Device { status: 0x281 })
                    };
                    let mut q = tx.lock().unwrap();
                    q.push_back((io, result));
                    if served == 0 {
                        q.push_back((io, result)); // a duplicate answer
                        q.push_back((IoRef::new(io.index() as u16, 9), Ok(1))); // forged
                    }
                    served += 1;
                }
                aio.batch(|b| b.complete_and_reclaim(mine, Ok(512)))
                    .unwrap();
                assert_eq!(aio.free_count(), 2);
                assert_eq!(aio.in_flight(), 0);
            })
        };
        let aio: Aio<4, 1> = Aio::for_range(2..4);
        let sent: Vec<IoRef> = (0..2)
            .map(|k| {
                // Submitted as it is sent: the message is its submission.
                let io = aio.start_submitted(read(k)).unwrap();
                to_owner.lock().unwrap().push_back(io);
                io
            })
            .collect();
        let (mut got, mut refused) = (Vec::new(), 0);
        while got.len() < 2 || refused < 2 {
            let Some((io, result)) = recv(&to_issuer) else {
                thread::yield_now();
                continue;
            };
            match aio.batch(|b| b.complete_and_reclaim(io, result)) {
                Ok(()) => got.push((io, result)),
                Err(AioError::Stale { .. }) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        owner.join().unwrap();
        got.sort_by_key(|(io, _)| io.index());
        assert_eq!(
            got,
            [
                (sent[0], Ok(4096)),
                (sent[1], Err(IoError::Device { status: 0x281 }))
            ]
        );
        for io in sent {
            let now = aio.snapshot(io.index()).unwrap();
            assert_eq!(
                (now.state, now.generation),
                (HandleState::Idle, io.generation() + 1)
            );
        }
        assert_eq!(aio.free_count(), 2, "a handle was lost");
        assert!(recv(&to_issuer).is_none(), "an answer too many");
    });
}

/// The naive baseline: the old shared handle array without its lock. Two handles' states
/// packed in one shared word, as they sit side by side in one array: the owner core completes
/// the issuer's handle 1 (`Submitted -> CompletedShared`) while the issuer reclaims its
/// handle 0 (`CompletedLocal -> Idle`), each as a plain load and store of the state (what an
/// unsynchronised per-core cell reached from two cores does). Both transitions must be there
/// at the end; loom finds the interleaving where one is lost.
#[test]
fn control_naive_shared_handle_array_loses_a_transition() {
    const SUBMITTED: u8 = 4;
    const COMPLETED_SHARED: u8 = 6;
    const COMPLETED_LOCAL: u8 = 7;
    const IDLE: u8 = 0;
    fn set(word: u8, handle: u8, state: u8) -> u8 {
        (word & !(0xF << (4 * handle))) | state << (4 * handle)
    }
    let caught = std::panic::catch_unwind(|| {
        loom::model(|| {
            let states = Arc::new(AtomicU8::new(
                COMPLETED_LOCAL | SUBMITTED << 4, // handle 0, handle 1
            ));
            let owner = {
                let states = states.clone();
                thread::spawn(move || {
                    let w = states.load(Ordering::Acquire);
                    states.store(set(w, 1, COMPLETED_SHARED), Ordering::Release);
                })
            };
            let w = states.load(Ordering::Acquire);
            states.store(set(w, 0, IDLE), Ordering::Release);
            owner.join().unwrap();
            assert_eq!(
                states.load(Ordering::Acquire),
                IDLE | COMPLETED_SHARED << 4,
                "a transition was lost"
            );
        });
    });
    assert!(
        caught.is_err(),
        "loom should have found the lost transition"
    );
}
