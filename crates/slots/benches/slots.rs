//! acquire + release of one slot: keel-slots' bitmap pool against a `Mutex<Vec<usize>>` free
//! list, crossbeam-queue's `ArrayQueue` and heapless's `mpmc::Queue`, uncontended and with two
//! threads hammering the same free set.
//!
//! `cargo bench -p keel-slots --bench slots -- --warm-up-time 1 --measurement-time 2`
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use crossbeam_queue::ArrayQueue;
use keel_slots::{words_for, SlotPool};

const SLOTS: usize = 64;

/// A free set of slot indexes.
trait FreeSet: Sync {
    fn take(&self) -> Option<usize>;
    fn give(&self, index: usize);
}

impl FreeSet for SlotPool<SLOTS, { words_for(SLOTS) }> {
    fn take(&self) -> Option<usize> {
        self.acquire().ok().map(|h| h.to_raw() as usize)
    }
    fn give(&self, raw: usize) {
        let h = self.handle_from_raw(raw as u32).unwrap();
        self.release(h).unwrap();
    }
}

impl FreeSet for Mutex<Vec<usize>> {
    fn take(&self) -> Option<usize> {
        self.lock().unwrap().pop()
    }
    fn give(&self, index: usize) {
        self.lock().unwrap().push(index);
    }
}

impl FreeSet for ArrayQueue<usize> {
    fn take(&self) -> Option<usize> {
        self.pop()
    }
    fn give(&self, index: usize) {
        self.push(index).unwrap();
    }
}

/// Slots heapless's queue failed to take back (see below).
static HEAPLESS_LOST: AtomicUsize = AtomicUsize::new(0);

impl FreeSet for heapless::mpmc::Queue<usize, SLOTS> {
    fn take(&self) -> Option<usize> {
        self.dequeue()
    }
    fn give(&self, index: usize) {
        // heapless 0.9 documents that `enqueue` can fail when another thread is preempted
        // mid-operation (the queue is not truly lock-free; its positions are 8-bit). Under two
        // threads on this 2-core box, retrying forever hung the bench, so retry a bounded
        // number of times and count the slot as lost: a free list must never do that.
        let mut item = index;
        for _ in 0..1000 {
            match self.enqueue(item) {
                Ok(()) => return,
                Err(back) => item = back,
            }
            std::thread::yield_now();
        }
        HEAPLESS_LOST.fetch_add(1, Ordering::Relaxed);
    }
}

fn cycle(set: &impl FreeSet) {
    if let Some(i) = set.take() {
        set.give(black_box(i));
    }
}

/// Time per acquire+release on each of `threads` threads running `iters` cycles at once.
fn contended(set: &impl FreeSet, threads: usize, iters: u64) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        cycle(set);
                    }
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap()
    })
}

fn bench(c: &mut Criterion) {
    let pool = SlotPool::<SLOTS, { words_for(SLOTS) }>::new();
    let mutex = Mutex::new((0..SLOTS).collect::<Vec<_>>());
    let array_queue = ArrayQueue::new(SLOTS);
    #[allow(deprecated)] // heapless 0.9 deprecates `new` (not lock-free under preemption)
    let mpmc = heapless::mpmc::Queue::<usize, SLOTS>::new();
    for i in 0..SLOTS {
        array_queue.push(i).unwrap();
        mpmc.enqueue(i).unwrap();
    }

    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("acquire_release/{threads}_thread"));
        macro_rules! one {
            ($name:literal, $set:expr) => {
                g.bench_function($name, |b| {
                    if threads == 1 {
                        b.iter(|| cycle($set))
                    } else {
                        b.iter_custom(|iters| contended($set, threads, iters))
                    }
                });
            };
        }
        one!("keel_slots_bitmap", &pool);
        one!("mutex_vec", &mutex);
        one!("crossbeam_array_queue", &array_queue);
        one!("heapless_mpmc", &mpmc);
        g.finish();
    }
    assert_eq!(pool.free_count(), SLOTS, "bench lost a slot");
    let lost = HEAPLESS_LOST.load(Ordering::Relaxed);
    println!("heapless mpmc: {lost} slot(s) lost (enqueue kept failing)");
}

criterion_group!(benches, bench);
criterion_main!(benches);
