//! Seed 003: a page server's handler took the page-cache lock, then waited (blocking) for WAL
//! redo; redo needed work that only the blocked handlers could do; every handler ended up
//! waiting on the lock or on redo: deadlock.
//!
//! Here: core 0 is a poller that owns the queue pair. A "get page" miss needs redo on the worker
//! core; the worker must read the base page, which is I/O on core 0's queue pair. The naive
//! poller waits for the worker while holding the cache lock and without polling: it deadlocks
//! (detected by a deadline). Ours hands the request over, keeps polling, and finishes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{read, FakeQueue};
use keel_reactor::worker::Channel;
use keel_reactor::{split, MeshStorage, Msg, Reactor};
use keel_slots::words_for;

const N: usize = 16;
type R = Reactor<'static, FakeQueue, 2, N, { words_for(N) }>;

#[derive(Debug, PartialEq)]
enum Outcome {
    Finished,
    Deadlocked,
}

/// Runs one get-page miss; `naive` picks the poller's behaviour while redo is pending.
fn get_page_miss(naive: bool) -> Outcome {
    let [l0, l1] = split(Box::leak(Box::new(MeshStorage::<Msg, 2, 8>::new())));
    let (poller_end, mut worker_end) = Box::leak(Box::new(Channel::<u64, u64, 4>::new())).split();
    let stop = Arc::new(AtomicBool::new(false));
    let aio: &'static keel_aio::Aio<N, { words_for(N) }> =
        Box::leak(Box::new(keel_aio::Aio::new()));

    // The worker core: serves redo requests; each needs a base-page read on core 0's queue.
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut io: R = Reactor::new(l1, aio, None);
            while !stop.load(Ordering::Acquire) {
                worker_end.serve(|page| {
                    io.submit_to(0, read(page), page as u32)
                        .expect("ring has room");
                    loop {
                        io.poll();
                        if let Some(c) = io.next_completion() {
                            assert!(c.result.is_ok());
                            return page + 1000; // the "redone" page
                        }
                        if stop.load(Ordering::Acquire) {
                            return u64::MAX;
                        }
                        std::hint::spin_loop();
                    }
                });
            }
        })
    };

    let cache = Mutex::new(());
    let mut poller: R = Reactor::new(l0, aio, Some(FakeQueue::new(8, 1)));
    let mut chan = poller_end;
    let deadline = Instant::now() + Duration::from_millis(500);
    let outcome = if naive {
        // Take the lock, ask for redo, and wait for the answer without polling.
        let _guard = cache.lock().unwrap();
        chan.request(42).unwrap();
        loop {
            if chan.try_response().is_some() {
                break Outcome::Finished;
            }
            if Instant::now() > deadline {
                break Outcome::Deadlocked;
            }
            std::thread::yield_now();
        }
    } else {
        // Ask for redo with no lock held, and keep running the poll loop until it answers.
        chan.request(42).unwrap();
        loop {
            poller.poll();
            if let Some(page) = chan.try_response() {
                assert_eq!(page, 1042);
                let _guard = cache.lock().unwrap(); // install the page: a short critical section
                break Outcome::Finished;
            }
            if Instant::now() > deadline {
                break Outcome::Deadlocked;
            }
        }
    };
    stop.store(true, Ordering::Release);
    worker.join().unwrap();
    outcome
}

#[test]
fn naive_poller_deadlocks() {
    assert_eq!(get_page_miss(true), Outcome::Deadlocked);
}

#[test]
fn polling_while_waiting_does_not_deadlock() {
    assert_eq!(get_page_miss(false), Outcome::Finished);
}
