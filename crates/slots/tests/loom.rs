//! Loom model checks for keel-slots.
//!
//! Run with (preemption bound 3; every test here is exhaustive up to that bound):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p keel-slots --release --test loom
//! ```
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use keel_slots::{CloseDuty, MailFlag, Refused, SlotError, SlotPool, Teardown, UserId};

/// Two threads acquire, hold and release slots of a 2-slot pool, twice each (a third thread
/// takes loom past seven minutes on this machine). Bound: `LOOM_MAX_PREEMPTIONS` (3). Checks: a slot is never
/// held by two owners (a per-slot owner word is swapped in and must have been empty), and
/// after all threads finish no slot is lost (`free_count() == 2`).
#[test]
fn acquire_release_exclusive_and_lossless() {
    loom::model(|| {
        let pool = Arc::new(SlotPool::<2, 1>::new());
        let owners = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let worker = |me: usize, rounds: usize| {
            let pool = pool.clone();
            let owners = owners.clone();
            thread::spawn(move || {
                for _ in 0..rounds {
                    match pool.acquire() {
                        Ok(h) => {
                            let prev = owners[h.index()].swap(me, Ordering::Relaxed);
                            assert_eq!(prev, 0, "slot {} handed to {prev} and {me}", h.index());
                            assert_eq!(pool.validate(h), Ok(()));
                            owners[h.index()].store(0, Ordering::Relaxed);
                            pool.release(h).unwrap();
                        }
                        // Two slots, at most two holders: never full.
                        Err(e) => panic!("acquire failed: {e:?}"),
                    }
                }
            })
        };
        let a = worker(1, 2);
        let b = worker(2, 2);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(pool.free_count(), 2, "a slot was lost");
    });
}

/// Two copies of one handle race to release it while a third thread re-acquires: exactly
/// one release succeeds, the other is refused as stale, and the old handle is stale for
/// good. Bound: 3 preemptions.
#[test]
fn stale_handles_always_detected() {
    loom::model(|| {
        let pool = Arc::new(SlotPool::<1, 1>::new());
        let h = pool.acquire().unwrap();
        let successes = Arc::new(AtomicUsize::new(0));
        let releaser = || {
            let pool = pool.clone();
            let successes = successes.clone();
            thread::spawn(move || match pool.release(h) {
                Ok(()) => {
                    successes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => assert!(matches!(e, SlotError::Stale { .. }), "{e:?}"),
            })
        };
        let r1 = releaser();
        let r2 = releaser();
        let reacquirer = {
            let pool = pool.clone();
            thread::spawn(move || {
                if let Ok(h2) = pool.acquire() {
                    assert_ne!(h2, h, "a recycled slot must carry a new generation");
                    assert!(matches!(pool.validate(h), Err(SlotError::Stale { .. })));
                    pool.release(h2).unwrap();
                }
            })
        };
        r1.join().unwrap();
        r2.join().unwrap();
        reacquirer.join().unwrap();
        assert_eq!(
            successes.load(Ordering::Relaxed),
            1,
            "double release went through"
        );
        assert!(matches!(pool.validate(h), Err(SlotError::Stale { .. })));
        assert_eq!(pool.free_count(), 1);
    });
}

/// A deleter and two users race; the close runs exactly once, and never while a user that
/// entered successfully is inside. Bound: 3 preemptions.
#[test]
fn teardown_closes_exactly_once() {
    loom::model(|| {
        let t = Arc::new(Teardown::new());
        let closes = Arc::new(AtomicUsize::new(0));
        let inside = Arc::new(AtomicUsize::new(0));
        let on_duty = {
            let closes = closes.clone();
            let inside = inside.clone();
            move |d: CloseDuty| {
                if d == CloseDuty::RunClose {
                    assert_eq!(inside.load(Ordering::Relaxed), 0, "closed while in use");
                    closes.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let user = |id: u8| {
            let t = t.clone();
            let inside = inside.clone();
            let on_duty = on_duty.clone();
            thread::spawn(move || {
                let me = UserId::new(id).unwrap();
                match t.enter(me) {
                    Ok(()) => {
                        inside.fetch_add(1, Ordering::Relaxed);
                        inside.fetch_sub(1, Ordering::Relaxed);
                        on_duty(t.leave(me).unwrap());
                    }
                    Err(Refused::Closing(d)) => on_duty(d),
                    Err(Refused::AlreadyEntered) => panic!("fresh user already inside"),
                }
            })
        };
        let u1 = user(1);
        let u2 = user(2);
        let deleter = {
            let t = t.clone();
            let on_duty = on_duty.clone();
            thread::spawn(move || on_duty(t.request_close()))
        };
        u1.join().unwrap();
        u2.join().unwrap();
        deleter.join().unwrap();
        assert_eq!(closes.load(Ordering::Relaxed), 1);
        assert!(t.is_close_claimed());
    });
}

/// Two producers each publish one message (a per-producer "queue" word, Release) and notify;
/// the consumer polls with the mail-flag protocol while they run, then once more after they
/// finish, scanning only when `take` says there is mail. Checks: no message is ever missed
/// (every publication was seen by a scan `take` allowed). With `notify` as a plain store this
/// fails: the consumer can read the second producer's flag write, which does not carry the
/// first producer's publication. Bound: 3 preemptions.
#[test]
fn mail_flag_never_misses_a_message() {
    loom::model(|| {
        let flag = Arc::new(MailFlag::new());
        let queues = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let producer = |i: usize| {
            let flag = flag.clone();
            let queues = queues.clone();
            thread::spawn(move || {
                queues[i].store(1, Ordering::Release);
                flag.notify();
            })
        };
        let p0 = producer(0);
        let p1 = producer(1);
        // The consumer's scan: take each published message once (a queue word goes 1 -> 2).
        let mut seen = [false; 2];
        let scan = |queues: &[AtomicUsize; 2], seen: &mut [bool; 2]| {
            for (q, s) in queues.iter().zip(seen.iter_mut()) {
                if !*s && q.load(Ordering::Acquire) == 1 {
                    *s = true;
                }
            }
        };
        for _ in 0..2 {
            if flag.take() {
                scan(&queues, &mut seen);
            }
        }
        p0.join().unwrap();
        p1.join().unwrap();
        if flag.take() {
            scan(&queues, &mut seen);
        }
        assert_eq!(seen, [true, true], "a published message was never scanned");
    });
}

/// A bulk claim (`acquire_many`, one read-modify-write for several slots) races a single
/// `acquire` and a `release` of a held slot, on a 3-slot bitmap with slot 2 held at the start.
/// Checks: no slot is owned twice (per-slot owner words, swapped in empty), the bulk claim
/// holds at least one slot (one is always free to it), and once everyone gives back what
/// they hold every slot is free again (nothing lost). Bound: 3 preemptions.
#[test]
fn bulk_claims_are_exclusive_and_lossless() {
    use keel_slots::FreeBitmap;
    loom::model(|| {
        let b = Arc::new(FreeBitmap::<1>::new(3).unwrap());
        assert_eq!(b.acquire(), Some(0));
        assert_eq!(b.acquire(), Some(1));
        assert_eq!(b.acquire(), Some(2));
        b.release(0).unwrap();
        b.release(1).unwrap();
        let owners = Arc::new([
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(3),
        ]);
        let take = |owners: &[AtomicUsize; 3], i: usize, me: usize| {
            let prev = owners[i].swap(me, Ordering::Relaxed);
            assert_eq!(prev, 0, "slot {i} held by {prev} and {me}");
        };
        let single = {
            let (b, owners) = (b.clone(), owners.clone());
            thread::spawn(move || {
                let got = b.acquire();
                if let Some(i) = got {
                    take(&owners, i, 1);
                }
                got
            })
        };
        let releaser = {
            let (b, owners) = (b.clone(), owners.clone());
            thread::spawn(move || {
                owners[2].store(0, Ordering::Relaxed);
                b.release(2).unwrap();
            })
        };
        let c = b.acquire_many(3);
        let mine: Vec<usize> = c.into_iter().flatten().collect();
        for &i in &mine {
            take(&owners, i, 2);
        }
        let got = single.join().unwrap();
        releaser.join().unwrap();
        // Two slots were free at the start and the single acquirer takes at most one.
        assert!(!mine.is_empty(), "the bulk claim found nothing");
        for i in mine.into_iter().chain(got) {
            owners[i].store(0, Ordering::Relaxed);
            b.release(i).unwrap();
        }
        assert_eq!(b.free_count(), 3, "a slot was lost");
    });
}
