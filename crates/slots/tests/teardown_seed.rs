//! Seed 002 (HAProxy `FD_MUST_CLOSE`) as deterministic, exhaustive interleavings.
//!
//! Every party is a list of steps; we run every interleaving of the parties' steps, single
//! threaded, on a fresh object. The naive "am I the last user?" protocol closes twice in some
//! interleaving; [`Teardown`] closes exactly once in all of them, and never while a user that
//! entered successfully is still inside.
#![cfg(not(loom))]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use keel_slots::{CloseDuty, Refused, Teardown, UserId};

/// All interleavings of parties with `lens[p]` steps each, as sequences of party numbers.
fn interleavings(lens: &[usize]) -> Vec<Vec<usize>> {
    fn go(left: &mut Vec<usize>, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if left.iter().all(|&l| l == 0) {
            out.push(cur.clone());
            return;
        }
        for p in 0..left.len() {
            if left[p] > 0 {
                left[p] -= 1;
                cur.push(p);
                go(left, cur, out);
                cur.pop();
                left[p] += 1;
            }
        }
    }
    let mut out = Vec::new();
    go(&mut lens.to_vec(), &mut Vec::new(), &mut out);
    out
}

/// Runs `schedule`: `step(party, step_index)` for each entry in order.
fn run(schedule: &[usize], parties: usize, mut step: impl FnMut(usize, usize)) {
    let mut next = vec![0; parties];
    for &p in schedule {
        step(p, next[p]);
        next[p] += 1;
    }
}

/// The pre-fix protocol: clear your running bit, then (separately) look whether anybody is
/// left; if not and the object is deleted, close it.
#[derive(Default)]
struct NaiveFd {
    running: AtomicU32,
    deleted: AtomicBool,
    closes: AtomicU32,
}

impl NaiveFd {
    fn set_running(&self, bit: u32) {
        self.running.fetch_or(bit, Ordering::AcqRel);
    }
    fn clr_running(&self, bit: u32) {
        self.running.fetch_and(!bit, Ordering::AcqRel);
    }
    fn close_if_last(&self) {
        if self.deleted.load(Ordering::Acquire) && self.running.load(Ordering::Acquire) == 0 {
            self.closes.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[test]
fn naive_last_user_check_closes_twice_in_some_interleaving() {
    // Deleter (bit 1): set running, mark deleted, clear running, check.
    // Poller  (bit 2): set running, clear running, check.
    let schedules = interleavings(&[4, 3]);
    let mut worst = 0;
    for s in &schedules {
        let fd = NaiveFd::default();
        run(s, 2, |p, i| match (p, i) {
            (0, 0) => fd.set_running(1),
            (0, 1) => fd.deleted.store(true, Ordering::Release),
            (0, 2) => fd.clr_running(1),
            (1, 0) => fd.set_running(2),
            (1, 1) => fd.clr_running(2),
            (_, _) => fd.close_if_last(),
        });
        worst = worst.max(fd.closes.load(Ordering::Acquire));
    }
    // The HAProxy race: both clear, both see running == 0, both close.
    assert_eq!(worst, 2, "the naive protocol was expected to double-close");
    // The exact interleaving from the commit message: D clears, P sets+clears+checks, D checks.
    let fd = NaiveFd::default();
    run(&[0, 0, 0, 1, 1, 1, 0], 2, |p, i| match (p, i) {
        (0, 0) => fd.set_running(1),
        (0, 1) => fd.deleted.store(true, Ordering::Release),
        (0, 2) => fd.clr_running(1),
        (1, 0) => fd.set_running(2),
        (1, 1) => fd.clr_running(2),
        (_, _) => fd.close_if_last(),
    });
    assert_eq!(fd.closes.load(Ordering::Acquire), 2);
}

#[test]
fn must_close_flag_closes_exactly_once_in_every_interleaving() {
    // Deleter (user 0): enter, request_close, leave. Users 1 and 2: enter, leave.
    let schedules = interleavings(&[3, 2, 2]);
    assert_eq!(schedules.len(), 210);
    for s in &schedules {
        let t = Teardown::new();
        let closes = Cell::new(0);
        let inside = Cell::new(0u32); // users that entered successfully and have not left
        let entered = [Cell::new(false), Cell::new(false), Cell::new(false)];
        let duty = |d: CloseDuty| {
            if d == CloseDuty::RunClose {
                assert_eq!(inside.get(), 0, "closed while in use: {s:?}");
                closes.set(closes.get() + 1);
            }
        };
        run(s, 3, |p, i| {
            let user = UserId::new(p as u8).unwrap();
            match (p, i) {
                (0, 1) => duty(t.request_close()),
                (_, 0) => match t.enter(user) {
                    Ok(()) => {
                        entered[p].set(true);
                        inside.set(inside.get() + 1);
                    }
                    Err(Refused::Closing(d)) => duty(d),
                    Err(Refused::AlreadyEntered) => panic!("fresh user already inside"),
                },
                (_, _) => {
                    if entered[p].get() {
                        inside.set(inside.get() - 1);
                        duty(t.leave(user).unwrap());
                    }
                }
            }
        });
        assert_eq!(closes.get(), 1, "schedule {s:?}");
        assert!(t.is_close_claimed());
        assert_eq!(t.users(), 0);
    }
}
