//! Loom model checks for keel-slots: the free bitmap (one word, and across words with the scan
//! hint and its wrap), slot generations (and their wrap), the mail flag on a stand-in
//! publication (the real mesh is modelled in keel-reactor), and teardown: the close race, a
//! hand-over-hand takeover with re-entry, and seed 002's takeover race in the seed's own design
//! (naive order must fail, fixed order passes). Each model's doc says the bug it catches.
//!
//! Run with (preemption bound 3; every test here is exhaustive up to that bound):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p keel-slots --release --test loom
//! ```
#![allow(
    unsafe_code,
    reason = "loom cells: the models write shared payloads through UnsafeCell::with_mut, which is what loom checks"
)]
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

/// The free bitmap across words, its scan hint and the hint's wrap from the last word to the
/// first: a 66-slot bitmap (two words; the second tracks slots 64 and 65). At the start every
/// slot is held except 65, and the hint names word 1 (where the last acquire left off). Thread
/// A makes two bulk claims (`acquire_many(2)`: the first empties word 1, which moves the hint
/// past the last word, back to word 0). Thread B (an interrupt handler on another core) writes
/// the payload of slot 63, which it holds, releases it, then `acquire`s. Each slot's payload is
/// a loom cell, written by whoever holds the slot, so a claim that does not synchronise with
/// the release before it is a data race loom reports.
///
/// Catches: a slot handed out twice or lost across words (owner words); a scan that does not
/// wrap to word 0 when the hint names the last word (B, starting at the hint's word 1 after A
/// emptied it, then misses the slot it has just released itself); a claim that is not Acquire
/// or a release that is not Release (payload race). Bound: 3 preemptions.
#[test]
fn bitmap_across_words_with_hint_wrap() {
    use keel_slots::FreeBitmap;
    use loom::cell::UnsafeCell;
    loom::model(|| {
        const LEN: usize = 66;
        let b = Arc::new(FreeBitmap::<2>::new(LEN).unwrap());
        // Everything held but 65: 0..64 in one claim (which empties word 0 and moves the hint
        // to word 1), then 64 (word 1 keeps a free slot, so the hint stays there). Slot 63 is
        // B's; the others stay held by the setup until the end.
        let mut all: Vec<usize> = b.acquire_many(64).unwrap().collect();
        assert_eq!(all.len(), 64);
        all.retain(|&i| i != 63);
        assert_eq!(b.acquire(), Some(64));
        assert_eq!(b.free_count(), 1);
        // Payloads of the slots that change hands (63, 65); the holder writes its id.
        let payload = Arc::new([UnsafeCell::new(0usize), UnsafeCell::new(0usize)]);
        fn cell(i: usize) -> usize {
            match i {
                63 => 0,
                65 => 1,
                other => panic!("slot {other} was held all along"),
            }
        }
        fn hold(payload: &[UnsafeCell<usize>; 2], i: usize, me: usize) {
            // Read what the previous holder wrote, then write ours: both need the claim to
            // synchronise with the previous release.
            payload[cell(i)].with_mut(|p| {
                // SAFETY: loom checks that this access is ordered after the previous
                // holder's (that is what the model tests); the cell lives in the Arc.
                unsafe { *p = me };
            });
        }
        let owners = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        fn take(owners: &[AtomicUsize; 2], i: usize, me: usize) {
            let prev = owners[cell(i)].swap(me, Ordering::Relaxed);
            assert_eq!(prev, 0, "slot {i} held by {prev} and {me}");
        }
        owners[0].store(2, Ordering::Relaxed); // B holds 63 at the start
        let a = {
            let (b, payload, owners) = (b.clone(), payload.clone(), owners.clone());
            thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..2 {
                    if let Some(run) = b.acquire_many(2) {
                        for i in run {
                            take(&owners, i, 1);
                            hold(&payload, i, 1);
                            got.push(i);
                        }
                    }
                }
                got
            })
        };
        let bt = {
            let (b, payload, owners) = (b.clone(), payload.clone(), owners.clone());
            thread::spawn(move || {
                hold(&payload, 63, 2);
                owners[0].store(0, Ordering::Relaxed);
                b.release(63).unwrap();
                let got = b.acquire();
                if let Some(i) = got {
                    take(&owners, i, 2);
                    hold(&payload, i, 2);
                }
                got
            })
        };
        let got_a = a.join().unwrap();
        let got_b = bt.join().unwrap();
        // B's own release is visible to B's scan (program order), so B finds a slot unless A
        // took both: from the hint's word, wrapping to word 0. (A may miss B's release: it is
        // concurrent with A's scan, and nothing orders it before A's loads.)
        assert!(
            got_b.is_some() || got_a.len() == 2,
            "B's scan missed the slot it had just released: A {got_a:?}, B {got_b:?}"
        );
        for i in got_a.into_iter().chain(got_b).chain(all) {
            b.release(i).unwrap();
        }
        b.release(64).unwrap();
        assert_eq!(b.free_count(), LEN, "a slot was lost");
    });
}

/// Generations at the wrap boundary: a 1-slot pool whose generation is the last one
/// (`2^GENERATION_BITS - 1`). Two copies of the held handle race to release it while a third
/// thread re-acquires: the release wraps the generation to 0. Exactly one release succeeds,
/// the re-acquired handle carries generation 0 and is valid, the old handle is stale for good,
/// and a release of the new handle then moves the generation to 1.
///
/// Catches: a generation stored unmasked at the wrap (the pool would then hold 2^16 while
/// handles carry 0: the new handle is refused as stale and the slot can never be released
/// again); a release that is not a single compare-and-swap on the generation (double release);
/// a re-acquired slot that still carries the old generation. Bound: 3 preemptions.
#[test]
fn generation_wrap_keeps_stale_handles_stale() {
    use keel_slots::GENERATION_BITS;
    loom::model(|| {
        let last = (1u32 << GENERATION_BITS) - 1;
        let pool = Arc::new(SlotPool::<1, 1>::with_generation(last));
        let h = pool.acquire().unwrap();
        assert_eq!(h.generation(), last);
        let successes = Arc::new(AtomicUsize::new(0));
        let releaser = || {
            let (pool, successes) = (pool.clone(), successes.clone());
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
                    assert_eq!(h2.generation(), 0, "the generation wraps to 0");
                    assert_eq!(pool.validate(h2), Ok(()));
                    assert!(matches!(pool.validate(h), Err(SlotError::Stale { .. })));
                    pool.release(h2).unwrap();
                    assert_eq!(pool.generation(0), Ok(1));
                }
            })
        };
        r1.join().unwrap();
        r2.join().unwrap();
        reacquirer.join().unwrap();
        assert_eq!(successes.load(Ordering::Relaxed), 1, "double release");
        assert!(matches!(pool.validate(h), Err(SlotError::Stale { .. })));
        assert_eq!(pool.free_count(), 1);
        let h3 = pool.acquire().unwrap();
        assert!(h3.generation() <= 1 && h3 != h);
        pool.release(h3).unwrap();
    });
}

/// Teardown with re-entry and a takeover (seed 002's two races, on Keel's protocol). User A
/// owns the object (entered during setup) and hands it over to user B hand over hand: B
/// enters, and only if B got in does A leave (a takeover that might let the running set go
/// empty between the two owners would let the close in). A refused B leaves A the owner, and A
/// leaves. Then A re-enters once (re-entry after leaving; it may be refused) and leaves again.
/// A deleter asks for the close concurrently. Each party honours the duty it is handed.
///
/// Checks: the close runs exactly once, and never while a user that entered successfully is
/// still inside (a counter of users inside, B's ownership included).
///
/// Catches: a claim of the close that is a load then a store instead of one read-modify-write
/// (two parties close: the HAProxy close race); a refusal of a late enter that forgets it may
/// be the last one out (nobody closes); a deleter that decides from its first snapshot of the
/// running set (nobody closes). Bound: 3 preemptions.
#[test]
fn teardown_takeover_and_reentry_close_exactly_once() {
    loom::model(|| {
        let t = Arc::new(Teardown::new());
        let closes = Arc::new(AtomicUsize::new(0));
        let inside = Arc::new(AtomicUsize::new(0));
        let on_duty = {
            let (closes, inside) = (closes.clone(), inside.clone());
            move |d: CloseDuty| {
                if d == CloseDuty::RunClose {
                    assert_eq!(inside.load(Ordering::Relaxed), 0, "closed while in use");
                    closes.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let a = UserId::new(0).unwrap();
        let b = UserId::new(1).unwrap();
        t.enter(a).unwrap();
        inside.fetch_add(1, Ordering::Relaxed);
        // B's side of the takeover: B enters; whether it got in goes to A's thread.
        let tx = Arc::new(AtomicUsize::new(0));
        let taker = {
            let (t, inside, on_duty, tx) = (t.clone(), inside.clone(), on_duty.clone(), tx.clone());
            thread::spawn(move || match t.enter(b) {
                Ok(()) => {
                    inside.fetch_add(1, Ordering::Relaxed);
                    tx.store(1, Ordering::Release);
                    // B uses the object, then gives it up.
                    inside.fetch_sub(1, Ordering::Relaxed);
                    on_duty(t.leave(b).unwrap());
                }
                Err(Refused::Closing(d)) => {
                    tx.store(2, Ordering::Release);
                    on_duty(d);
                }
                Err(Refused::AlreadyEntered) => panic!("B was not inside"),
            })
        };
        let deleter = {
            let (t, on_duty) = (t.clone(), on_duty.clone());
            thread::spawn(move || on_duty(t.request_close()))
        };
        // A: wait for B's answer (hand over hand), then leave; then re-enter once.
        while tx.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        inside.fetch_sub(1, Ordering::Relaxed);
        on_duty(t.leave(a).unwrap());
        match t.enter(a) {
            Ok(()) => {
                inside.fetch_add(1, Ordering::Relaxed);
                inside.fetch_sub(1, Ordering::Relaxed);
                on_duty(t.leave(a).unwrap());
            }
            Err(Refused::Closing(d)) => on_duty(d),
            Err(Refused::AlreadyEntered) => panic!("A left before re-entering"),
        }
        taker.join().unwrap();
        deleter.join().unwrap();
        assert_eq!(
            closes.load(Ordering::Relaxed),
            1,
            "closed {} times",
            closes.load(Ordering::Relaxed)
        );
        assert!(t.is_close_claimed());
        assert_eq!(t.users(), 0);
    });
}

/// Seed 002's *first* race, the takeover (HAProxy, "close a race on closing connections after
/// takeover"), in the seed's own design: an FD has an owner mask and a running mask. A poller
/// (the owner) checks it owns the FD, marks itself running and handles the event; another
/// thread takes the FD over (marks itself running, only if nobody is, replaces the owner mask,
/// drops its running bit) and then uses it as its own. `fixed` picks the protocol:
///
/// * naive (before the fix): the poller checks the owner mask, then sets its running bit and
///   goes ahead. A takeover that runs entirely between the check and the set leaves both
///   threads believing the FD is theirs.
/// * fixed: the poller sets its running bit (only when nobody else is running) and checks the
///   owner mask *after* that; a takeover holds its running bit while it replaces the owner.
///
/// Checks: never two users of the FD at once (a counter of threads using it as its owner).
fn seed_002_takeover(fixed: bool) {
    const POLLER: u32 = 1 << 1;
    const TAKER: u32 = 1 << 2;
    loom::model(move || {
        let owner = Arc::new(AtomicUsize::new(POLLER as usize));
        let running = Arc::new(AtomicUsize::new(0));
        let users = Arc::new(AtomicUsize::new(0));
        let use_it = |users: &AtomicUsize, who: &str| {
            let before = users.fetch_add(1, Ordering::AcqRel);
            assert_eq!(
                before, 0,
                "both believe the FD is theirs ({who} is the second)"
            );
            users.fetch_sub(1, Ordering::AcqRel);
        };
        let taker = {
            let (owner, running, users) = (owner.clone(), running.clone(), users.clone());
            thread::spawn(move || {
                // fd_takeover: only if nobody is running on the FD.
                if running
                    .compare_exchange(0, TAKER as usize, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return;
                }
                owner.store(TAKER as usize, Ordering::Release);
                running.fetch_and(!(TAKER as usize), Ordering::AcqRel);
                // From now on it is ours.
                use_it(&users, "the taker");
            })
        };
        // fd_update_events on the poller.
        let p = POLLER as usize;
        if fixed {
            loop {
                if owner.load(Ordering::Acquire) & p == 0 {
                    break;
                }
                if running
                    .compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    thread::yield_now();
                    continue;
                }
                // Running now: was it taken over meanwhile?
                if owner.load(Ordering::Acquire) & p != 0 {
                    use_it(&users, "the poller");
                }
                running.fetch_and(!p, Ordering::AcqRel);
                break;
            }
        } else if owner.load(Ordering::Acquire) & p != 0 {
            running.fetch_or(p, Ordering::AcqRel);
            use_it(&users, "the poller");
            running.fetch_and(!p, Ordering::AcqRel);
        }
        taker.join().unwrap();
    });
}

/// The seed's takeover race, fixed order: never two owners. Bound: 3 preemptions.
#[test]
fn seed_002_takeover_fixed_never_two_owners() {
    seed_002_takeover(true);
}

/// The seed's takeover race, naive order: loom finds the interleaving where both threads
/// believe the FD is theirs (the control for the model above; loom prints the failing
/// interleaving's panic message, that output is expected).
#[test]
fn seed_002_takeover_naive_finds_two_owners() {
    let err = std::panic::catch_unwind(|| seed_002_takeover(false))
        .expect_err("loom should have found two owners");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("both believe the FD is theirs"), "{msg}");
}
