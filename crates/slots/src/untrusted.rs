//! Seed 004 (PostgreSQL's postmaster and its free-slot list in shared memory that backends may
//! corrupt): whoever hands out or takes back slots must never get stuck or index out of range
//! because of what the shared words hold.
//!
//! The baseline is the seed's own idea #1, a CAS-based linked free list of 16-bit slot indexes
//! (head index and an ABA tag in one 32-bit word, the links next to the slots). Fed corrupted
//! shared words it indexes out of range (a corrupted head or link) or hands the same slots out
//! forever (a corrupted link that makes a cycle). Keel's [`FreeBitmap`] and [`SlotPool`], fed
//! any words at all, do neither: every call is a bounded number of operations on words in
//! range, and what a corrupted word holds comes back as a typed error.
//!
//! The same property runs against both: drain the free set (take slots until it says it has
//! none) with a step budget, and check that it ends, that no index leaves range, and that no
//! slot comes out twice. (The rings' shared words are checked the same way in
//! `keel_reactor::ring`.)

extern crate std;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::vec::Vec;

use proptest::prelude::*;

use crate::sync::{AtomicU32, Ordering};
use crate::{FreeBitmap, SlotError, SlotPool};

/// What went wrong while draining a free set.
#[derive(Debug, PartialEq, Eq)]
enum Violation {
    /// The structure indexed its own memory out of range (a panic in Rust; a wild read in C).
    OutOfRange,
    /// More takes than there are slots (or past the step budget): it does not end.
    Unbounded,
    /// The same slot came out twice without being given back.
    Twice(usize),
    /// An index outside `0..capacity` was handed to the caller.
    Handed(usize),
}

/// Drains `take` (one slot per call, `None` when empty) with a budget of `capacity + 1` takes,
/// each allowed `step_budget` steps (`take` counts its own steps).
fn drain(
    capacity: usize,
    step_budget: usize,
    mut take: impl FnMut(&mut usize) -> Option<usize>,
) -> Result<usize, Violation> {
    let mut seen = BTreeSet::new();
    for _ in 0..=capacity {
        let mut steps = 0;
        let got = catch_unwind(AssertUnwindSafe(|| take(&mut steps)))
            .map_err(|_| Violation::OutOfRange)?;
        if steps > step_budget {
            return Err(Violation::Unbounded);
        }
        match got {
            None => return Ok(seen.len()),
            Some(i) if i >= capacity => return Err(Violation::Handed(i)),
            Some(i) if !seen.insert(i) => return Err(Violation::Twice(i)),
            Some(_) => {}
        }
    }
    Err(Violation::Unbounded)
}

const NIL: u32 = 0xFFFF;

/// Seed 004's idea #1, written as the seed describes it: a lock-free LIFO free list of 16-bit
/// slot indexes. `head` packs an ABA tag (high half) and the first free index (low half);
/// `next[i]` is the free slot after `i`. Both live in shared memory.
struct CasFreeList<const N: usize> {
    head: AtomicU32,
    next: [AtomicU32; N],
}

impl<const N: usize> CasFreeList<N> {
    /// Every slot free: 0 -> 1 -> ... -> N-1.
    fn new() -> Self {
        Self {
            head: AtomicU32::new(0),
            next: core::array::from_fn(|i| {
                AtomicU32::new(if i + 1 < N { i as u32 + 1 } else { NIL })
            }),
        }
    }

    /// Pops the first free slot (the CAS loop the seed worries about).
    fn pop(&self, steps: &mut usize) -> Option<usize> {
        loop {
            // Single-threaded here, so the CAS never fails and this runs once per pop.
            *steps += 1;
            let head = self.head.load(Ordering::Acquire);
            let first = head & 0xFFFF;
            if first == NIL {
                return None;
            }
            // The seed's structure trusts the head: this is where a corrupted one indexes out
            // of range.
            let after = self.next[first as usize].load(Ordering::Acquire) & 0xFFFF;
            let new = (head & 0xFFFF_0000).wrapping_add(1 << 16) | after;
            if self
                .head
                .compare_exchange(head, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(first as usize);
            }
        }
    }
}

#[test]
fn baseline_cas_free_list_drains_when_sane() {
    let l = CasFreeList::<8>::new();
    assert_eq!(drain(8, 1, |s| l.pop(s)), Ok(8));
}

#[test]
fn baseline_cas_free_list_indexes_out_of_range_on_a_corrupted_head() {
    let l = CasFreeList::<8>::new();
    l.head.store(0x0000_1234, Ordering::Relaxed); // a stray write into the head word
    assert_eq!(drain(8, 1, |s| l.pop(s)), Err(Violation::OutOfRange));
    let l = CasFreeList::<8>::new();
    l.next[3].store(200, Ordering::Relaxed); // a stray write into a link
    assert_eq!(drain(8, 1, |s| l.pop(s)), Err(Violation::OutOfRange));
}

#[test]
fn baseline_cas_free_list_hands_slots_out_forever_on_a_cycle() {
    let l = CasFreeList::<8>::new();
    l.next[2].store(0, Ordering::Relaxed); // 0 -> 1 -> 2 -> 0 -> ...
    assert_eq!(drain(8, 1, |s| l.pop(s)), Err(Violation::Twice(0)));
}

proptest! {
    /// Keel's free bitmap over arbitrary shared words (every word, the hint, a length that may
    /// leave part of the last word untracked): draining ends after at most one take per bit,
    /// each take looks at each word at most once, and no bit is handed out twice. Indexes
    /// past `len` (bits only a corrupted word has) come back at most once each and stay below
    /// `CAPACITY`; the [`SlotPool`] test below shows the consumer turning them into errors.
    #[test]
    fn free_bitmap_never_loops_or_leaves_range(words in any::<[u64; 3]>(), hint in any::<usize>(), len in 0usize..=192) {
        let b = FreeBitmap::<3>::from_raw(words, len, hint);
        let drained = drain(FreeBitmap::<3>::CAPACITY, 3, |steps| {
            b.acquire_many_looking(1, || *steps += 1).and_then(|mut c| c.next())
        });
        let expected = words.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        prop_assert_eq!(drained, Ok(expected));
        prop_assert_eq!(b.free_count(), 0);
        // Releases of any index: typed answers, nothing out of range.
        for i in 0..256 {
            match b.release(i) {
                Ok(()) => prop_assert!(i < len),
                Err(SlotError::IndexOutOfRange { .. }) => prop_assert!(i >= len),
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }
    }

    /// Keel's slot pool over a corrupted bitmap and corrupted generations: `acquire` never
    /// hands out an index past its slots (a corrupted bit past them is a typed
    /// `IndexOutOfRange`, and is gone afterwards), nothing panics, draining ends, and every
    /// handle it did hand out can be released.
    #[test]
    fn slot_pool_turns_corrupted_words_into_typed_errors(words in any::<[u64; 2]>(), hint in any::<usize>(), gens in any::<[u16; 70]>()) {
        let p = SlotPool::<70, 2>::from_raw(FreeBitmap::from_raw(words, 70, hint), gens.map(u32::from));
        let mut handles = Vec::new();
        let mut refused = 0;
        for _ in 0..=FreeBitmap::<2>::CAPACITY {
            match p.acquire() {
                Ok(h) => {
                    prop_assert!(h.index() < 70);
                    prop_assert!(!handles.iter().any(|o: &crate::Handle| o.index() == h.index()));
                    handles.push(h);
                }
                Err(SlotError::IndexOutOfRange { index, capacity: 70 }) => {
                    prop_assert!((70..128).contains(&index));
                    refused += 1;
                }
                Err(SlotError::Full) => break,
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }
        prop_assert_eq!(p.acquire(), Err(SlotError::Full));
        prop_assert_eq!(refused, (words[1] >> 6).count_ones() as usize);
        for h in handles {
            prop_assert_eq!(p.release(h), Ok(()));
        }
        prop_assert!(p.free_count() <= 70);
    }
}

/// How often the baseline breaks over a fixed sample of corrupted states, and that Keel's
/// bitmap, on the same states, never does.
#[test]
fn baseline_breaks_where_the_bitmap_does_not() {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut broke, trials) = (0, 1000);
    for _ in 0..trials {
        let l = CasFreeList::<8>::new();
        // One stray write, into the head or a link, of a value a 16-bit index could hold.
        let v = (next() & 0xFFFF) as u32 % 24;
        match next() % 9 {
            8 => l.head.store(v, Ordering::Relaxed),
            k => l.next[k as usize].store(v, Ordering::Relaxed),
        }
        if drain(8, 1, |s| l.pop(s)).is_err() {
            broke += 1;
        }
        let words = [next(), next(), next()];
        let b = FreeBitmap::<3>::from_raw(words, 192, next() as usize);
        let drained = drain(192, 3, |steps| {
            b.acquire_many_looking(1, || *steps += 1)
                .and_then(|mut c| c.next())
        });
        assert!(drained.is_ok(), "{drained:?}");
    }
    assert!(
        broke > trials / 4,
        "one stray write broke the CAS list in only {broke} of {trials} states"
    );
}
