//! The atomic free-slot bitmap.

use crate::sync::{AtomicU64, AtomicUsize, Ordering};
use crate::SlotError;

const BITS: usize = u64::BITS as usize;

/// How many `u64` words a bitmap of `slots` bits needs: use it for the `W` parameter, e.g.
/// `FreeBitmap<{ words_for(100) }>`.
pub const fn words_for(slots: usize) -> usize {
    slots.div_ceil(BITS)
}

/// The initial value of word `word` of a bitmap whose first `len` bits are free.
const fn initial_word(word: usize, len: usize) -> u64 {
    let start = word * BITS;
    if len >= start + BITS {
        u64::MAX
    } else if len <= start {
        0
    } else {
        (1u64 << (len - start)) - 1
    }
}

/// An atomic bitmap of free slots `0..len`, stored in `W` 64-bit words (a set bit = free).
///
/// * [`release`](Self::release) is a single `fetch_or`: it never loops or blocks, so it is safe
///   from an interrupt handler or a core that must never stall.
/// * [`acquire`](Self::acquire) claims a set bit with `fetch_and`, starting at the word where
///   the previous acquire succeeded, so a run of acquires does not rescan from zero. It is
///   lock-free: a claim only fails because another acquirer claimed that bit.
///
/// Untrusted words (seed 004): whatever the words and the hint hold, every operation is a
/// bounded number of atomic operations on words in range. Release is one `fetch_or` on a
/// range-checked index. A scan looks at each word once, plus once more each time another party
/// writes that word between the scan's load and its read-modify-write (with no such writer, at
/// most `W` looks). Bits past [`len`](Self::len) exist only in a corrupted word; a claim takes
/// them like any other bit, so the index it returns is then `>= len()` (but below
/// [`CAPACITY`](Self::CAPACITY)) and that bit is clear afterwards (it is never handed out
/// again). Consumers range-check before indexing: [`crate::SlotPool::acquire`] returns
/// [`SlotError::IndexOutOfRange`], `keel_aio` returns `BadIndex`.
#[derive(Debug)]
pub struct FreeBitmap<const W: usize> {
    words: [AtomicU64; W],
    len: usize,
    hint: AtomicUsize,
}

impl<const W: usize> FreeBitmap<W> {
    /// The most slots a bitmap of `W` words can track.
    pub const CAPACITY: usize = W * BITS;

    /// A bitmap tracking slots `0..len`, all free.
    ///
    /// # Errors
    /// [`SlotError::TooLarge`] if `len` exceeds [`Self::CAPACITY`].
    #[cfg(not(loom))]
    pub const fn new(len: usize) -> Result<Self, SlotError> {
        if len > Self::CAPACITY {
            return Err(SlotError::TooLarge {
                requested: len,
                max: Self::CAPACITY,
            });
        }
        let mut words = [const { AtomicU64::new(0) }; W];
        let mut i = 0;
        while i < W {
            words[i] = AtomicU64::new(initial_word(i, len));
            i += 1;
        }
        Ok(Self {
            words,
            len,
            hint: AtomicUsize::new(0),
        })
    }

    /// A bitmap tracking slots `0..len`, all free (loom build: not `const`).
    ///
    /// # Errors
    /// [`SlotError::TooLarge`] if `len` exceeds [`Self::CAPACITY`].
    #[cfg(loom)]
    pub fn new(len: usize) -> Result<Self, SlotError> {
        if len > Self::CAPACITY {
            return Err(SlotError::TooLarge {
                requested: len,
                max: Self::CAPACITY,
            });
        }
        Ok(Self {
            words: core::array::from_fn(|i| AtomicU64::new(initial_word(i, len))),
            len,
            hint: AtomicUsize::new(0),
        })
    }

    /// A bitmap tracking slots `0..min(len, CAPACITY)`, all free: infallible, for callers that
    /// checked `len` at compile time.
    #[cfg(not(loom))]
    pub const fn new_saturating(len: usize) -> Self {
        let len = if len > Self::CAPACITY {
            Self::CAPACITY
        } else {
            len
        };
        match Self::new(len) {
            Ok(b) => b,
            Err(_) => unreachable!(),
        }
    }

    /// A bitmap tracking slots `0..min(len, CAPACITY)`, all free (loom build: not `const`).
    #[cfg(loom)]
    pub fn new_saturating(len: usize) -> Self {
        let len = len.min(Self::CAPACITY);
        Self {
            words: core::array::from_fn(|i| AtomicU64::new(initial_word(i, len))),
            len,
            hint: AtomicUsize::new(0),
        }
    }

    /// A bitmap tracking slots `0..len` whose words start as `words`, taken as they are: a set
    /// bit means free, and bits past `len` are kept (a corrupted word has them). Every
    /// operation stays bounded and in range whatever the words hold (see the type's docs); this
    /// is how a consumer tests that it copes with what such a bitmap hands out.
    ///
    /// # Errors
    /// [`SlotError::TooLarge`] if `len` exceeds [`Self::CAPACITY`].
    pub fn from_words(words: [u64; W], len: usize) -> Result<Self, SlotError> {
        if len > Self::CAPACITY {
            return Err(SlotError::TooLarge {
                requested: len,
                max: Self::CAPACITY,
            });
        }
        Ok(Self {
            words: words.map(AtomicU64::new),
            len,
            hint: AtomicUsize::new(0),
        })
    }

    /// A bitmap in an arbitrary (e.g. corrupted) state, hint included, for the crate's tests.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn from_raw(words: [u64; W], len: usize, hint: usize) -> Self {
        Self {
            words: words.map(AtomicU64::new),
            len,
            hint: AtomicUsize::new(hint),
        }
    }

    /// [`Self::acquire_many`] with a probe run at each look at a word (the race window), for
    /// the crate's tests.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn acquire_many_looking(&self, max: usize, look: impl FnMut()) -> Option<Claimed> {
        self.acquire_many_probed(max, look)
    }

    /// The number of slots tracked.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap tracks no slot at all.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Claims a free slot and returns its index, or `None` if none was free during the scan.
    #[inline]
    pub fn acquire(&self) -> Option<usize> {
        self.acquire_probed(|| {})
    }

    /// [`Self::acquire`] with `between` run after each read of a word and before the claim of
    /// a bit seen in it: the window where other parties may race. For deterministic
    /// interleaving tests; `acquire` passes a no-op.
    ///
    /// The word the hint names is tried inline with a one-bit claim (a `fetch_and` whose
    /// result is tested at that bit only: one `lock btr` on x86, no compare-exchange loop);
    /// the other words go through the bulk scan.
    #[inline(always)]
    fn acquire_probed(&self, mut between: impl FnMut()) -> Option<usize> {
        if W == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed) % W;
        match self.claim_one_in_word(start, &mut between) {
            Some(i) => Some(i),
            None => self
                .acquire_many_scan(start, 1, &mut between)
                .and_then(|mut c| c.next()),
        }
    }

    /// Claims the lowest free slot of word `w` (the word the hint names), as
    /// [`Self::claim_in_word`] with `max` 1.
    #[inline(always)]
    fn claim_one_in_word(&self, w: usize, mut between: impl FnMut()) -> Option<usize> {
        let word = self.words.get(w)?;
        let mut seen = word.load(Ordering::Relaxed);
        while seen != 0 {
            let bit = seen.trailing_zeros();
            let take = 1u64 << bit;
            between();
            // Acquire pairs with the Release `fetch_or` of the slot's last release. Only the
            // claimed bit of the old value is looked at.
            if word.fetch_and(!take, Ordering::Acquire) & take != 0 {
                // The hint moves on when this took the last free slot the word was seen with
                // (a hint only: a slot freed since is found by a later scan).
                if seen & !take == 0 {
                    let next = (w + 1) % W;
                    if next != w {
                        self.hint.store(next, Ordering::Relaxed);
                    }
                }
                return Some(w * BITS + bit as usize);
            }
            // Someone else claimed that bit first; look at what the word holds now.
            seen = word.load(Ordering::Relaxed);
        }
        None
    }

    /// Claims up to `max` free slots of **one** word with one atomic read-modify-write (a
    /// burst's worth of acquires for the price of one), starting where the previous acquire
    /// left off. Returns the claimed slots as a [`Claimed`] run (iterate it for the indices;
    /// give back what the caller does not use with [`Self::release_claimed`]), or `None` if
    /// `max` is 0 or no slot was free during the scan. May return fewer than `max` even when
    /// other words have free slots: call again for more.
    #[inline(always)]
    pub fn acquire_many(&self, max: usize) -> Option<Claimed> {
        self.acquire_many_probed(max, || {})
    }

    /// [`Self::acquire_many`] with `between` run after each read of a word and before the
    /// claim of the bits seen in it (the race window), for deterministic interleaving tests.
    ///
    /// The word the hint names is tried inline; the scan of the others is out of line, so the
    /// common case stays a few instructions in its caller (under emulation, code size and
    /// jumps between pages of code cost more than the instructions).
    #[inline(always)]
    fn acquire_many_probed(&self, max: usize, mut between: impl FnMut()) -> Option<Claimed> {
        if W == 0 || max == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed) % W;
        match self.claim_in_word(start, start, max, &mut between) {
            Some(c) => Some(c),
            None => self.acquire_many_scan(start, max, &mut between),
        }
    }

    /// The rest of [`Self::acquire_many_probed`]'s scan: every word after `start`, wrapping.
    #[inline(never)]
    fn acquire_many_scan(
        &self,
        start: usize,
        max: usize,
        between: &mut dyn FnMut(),
    ) -> Option<Claimed> {
        (1..W).find_map(|k| self.claim_in_word((start + k) % W, start, max, &mut *between))
    }

    /// Claims up to `max` of the free slots of word `w` (`start`: the word the hint named).
    #[inline(always)]
    fn claim_in_word(
        &self,
        w: usize,
        start: usize,
        max: usize,
        mut between: impl FnMut(),
    ) -> Option<Claimed> {
        let word = self.words.get(w)?;
        let mut seen = word.load(Ordering::Relaxed);
        while seen != 0 {
            let take = lowest_bits(seen, max);
            between();
            // Clearing a bit that someone else already cleared changes nothing, so the bits
            // this call owns are exactly those set in `prev`. Acquire pairs with the Release
            // `fetch_or` of each slot's last release.
            let prev = word.fetch_and(!take, Ordering::Acquire);
            let won = prev & take;
            if won != 0 {
                // Write the shared hint only when it moves: a store on every acquire would
                // bounce its cache line between cores for nothing.
                let next = if prev & !take == 0 { (w + 1) % W } else { w };
                if next != start {
                    self.hint.store(next, Ordering::Relaxed);
                }
                return Some(Claimed { word: w, bits: won });
            }
            // Every bit was claimed by others first; retry with what the word holds now.
            seen = prev & !take;
        }
        None
    }

    /// Gives back the slots of `c` not taken from it (one `fetch_or`).
    ///
    /// # Errors
    /// * [`SlotError::IndexOutOfRange`] if the run names slots this bitmap does not track (a
    ///   run from another bitmap): nothing is released.
    /// * [`SlotError::NotAllocated`] (for the lowest such slot) if any of them was already
    ///   free: a broken invariant, since a run holds its bits. The others are released.
    pub fn release_claimed(&self, c: Claimed) -> Result<(), SlotError> {
        let tracked = initial_word(c.word, self.len);
        let (Some(word), 0) = (self.words.get(c.word), c.bits & !tracked) else {
            return Err(SlotError::IndexOutOfRange {
                index: c.word * BITS + (c.bits & !tracked).trailing_zeros().min(63) as usize,
                capacity: self.len,
            });
        };
        if c.bits == 0 {
            return Ok(());
        }
        let prev = word.fetch_or(c.bits, Ordering::Release);
        let twice = prev & c.bits;
        if twice != 0 {
            return Err(SlotError::NotAllocated {
                index: c.word * BITS + twice.trailing_zeros() as usize,
            });
        }
        Ok(())
    }

    /// Marks `index` free with one `fetch_or` (no loop, no wait).
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] for an index `>= len`; [`SlotError::NotAllocated`] if the
    /// slot was already free (a double release; the bitmap is left unchanged).
    #[inline(always)]
    pub fn release(&self, index: usize) -> Result<(), SlotError> {
        self.check(index)?;
        let mask = 1u64 << (index % BITS);
        // Release: whatever the releaser wrote before is visible to the next acquirer.
        let prev = self.words[index / BITS].fetch_or(mask, Ordering::Release);
        if prev & mask != 0 {
            return Err(SlotError::NotAllocated { index });
        }
        Ok(())
    }

    /// Whether slot `index` is currently free (a snapshot).
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] for an index `>= len`.
    pub fn is_free(&self, index: usize) -> Result<bool, SlotError> {
        self.check(index)?;
        let mask = 1u64 << (index % BITS);
        Ok(self.words[index / BITS].load(Ordering::Acquire) & mask != 0)
    }

    /// How many slots are free (a snapshot; may be stale under concurrency).
    pub fn free_count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    fn check(&self, index: usize) -> Result<(), SlotError> {
        if index < self.len {
            Ok(())
        } else {
            Err(SlotError::IndexOutOfRange {
                index,
                capacity: self.len,
            })
        }
    }
}

/// The lowest `n` set bits of `x` (all of them if it has fewer).
#[inline(always)]
fn lowest_bits(x: u64, n: usize) -> u64 {
    if n == 1 {
        return x & x.wrapping_neg();
    }
    if n >= x.count_ones() as usize {
        return x;
    }
    let mut rest = x;
    for _ in 0..n {
        rest &= rest - 1;
    }
    x & !rest
}

/// Slots claimed together by [`FreeBitmap::acquire_many`], all in one word; the caller holds
/// each one as if [`FreeBitmap::acquire`] had returned it. Iterating yields their indices in
/// ascending order and takes them out of the run; what is left must be given back with
/// [`FreeBitmap::release_claimed`] (a run dropped with slots in it leaks them). Neither `Copy`
/// nor `Clone`: a copy iterated apart from the original would let the same slots be used and
/// given back.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "claimed slots are held until released"]
pub struct Claimed {
    word: usize,
    bits: u64,
}

impl Claimed {
    /// How many slots the run still holds.
    pub const fn len(&self) -> usize {
        self.bits.count_ones() as usize
    }

    /// Whether the run holds no slot.
    pub const fn is_empty(&self) -> bool {
        self.bits == 0
    }
}

impl Iterator for Claimed {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.bits == 0 {
            return None;
        }
        let bit = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.word * BITS + bit)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len(), Some(self.len()))
    }
}

impl ExactSizeIterator for Claimed {}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    #[test]
    fn initial_words_cover_exactly_len() {
        assert_eq!(initial_word(0, 0), 0);
        assert_eq!(initial_word(0, 3), 0b111);
        assert_eq!(initial_word(0, 64), u64::MAX);
        assert_eq!(initial_word(1, 64), 0);
        assert_eq!(initial_word(1, 70), 0b11_1111);
        assert_eq!(words_for(0), 0);
        assert_eq!(words_for(64), 1);
        assert_eq!(words_for(65), 2);
    }

    #[test]
    fn acquires_every_slot_once_then_reports_empty() {
        let b = FreeBitmap::<2>::new(70).unwrap();
        let mut seen = [false; 70];
        for _ in 0..70 {
            let i = b.acquire().unwrap();
            assert!(!seen[i], "slot {i} handed out twice");
            seen[i] = true;
        }
        assert_eq!(b.acquire(), None);
        assert_eq!(b.free_count(), 0);
        b.release(69).unwrap();
        assert_eq!(b.acquire(), Some(69));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let b = FreeBitmap::<1>::new(10).unwrap();
        assert_eq!(
            b.release(10),
            Err(SlotError::IndexOutOfRange {
                index: 10,
                capacity: 10
            })
        );
        assert_eq!(b.release(3), Err(SlotError::NotAllocated { index: 3 }));
        assert!(matches!(
            FreeBitmap::<1>::new(65),
            Err(SlotError::TooLarge {
                requested: 65,
                max: 64
            })
        ));
        assert_eq!(FreeBitmap::<0>::new(0).unwrap().acquire(), None);
    }

    /// Seed 004 / issue 3 (c): the naive free-slot scan reads a word, picks a bit, and writes
    /// the word back without it (load + store instead of a read-modify-write).
    struct NaiveBitmap {
        word: AtomicU64,
    }

    impl NaiveBitmap {
        fn acquire_probed(&self, mut between: impl FnMut()) -> Option<usize> {
            let seen = self.word.load(Ordering::Relaxed);
            if seen == 0 {
                return None;
            }
            let bit = seen.trailing_zeros();
            between();
            self.word.store(seen & !(1 << bit), Ordering::Release);
            Some(bit as usize)
        }

        fn release(&self, index: usize) {
            self.word.fetch_or(1 << index, Ordering::Release);
        }

        fn is_free(&self, index: usize) -> bool {
            self.word.load(Ordering::Relaxed) & (1 << index) != 0
        }
    }

    /// Every slot is either free or held by exactly one owner.
    fn accounted(held: &[usize], is_free: impl Fn(usize) -> bool, len: usize) -> bool {
        (0..len).all(|i| usize::from(is_free(i)) + held.iter().filter(|&&h| h == i).count() == 1)
    }

    #[test]
    fn scan_under_concurrent_release_never_loses_a_slot() {
        // Slots 0 and 3 held elsewhere, 1 and 2 free. Our scan reads the word; before it
        // claims, another core releases slot 3.
        let naive = NaiveBitmap {
            word: AtomicU64::new(0b0110),
        };
        let got = naive.acquire_probed(|| naive.release(3)).unwrap();
        assert!(
            !accounted(&[0, got], |i| naive.is_free(i), 4),
            "the naive scan was expected to lose slot 3"
        );
        assert!(!naive.is_free(3));

        let ours = FreeBitmap::<1>::new(4).unwrap();
        for _ in 0..4 {
            ours.acquire().unwrap();
        }
        ours.release(1).unwrap();
        ours.release(2).unwrap();
        let mut released = false;
        let got = ours
            .acquire_probed(|| {
                if !released {
                    released = true;
                    ours.release(3).unwrap();
                }
            })
            .unwrap();
        assert_eq!(got, 1);
        assert!(accounted(&[0, got], |i| ours.is_free(i).unwrap(), 4));
        assert!(ours.is_free(3).unwrap(), "the concurrent release survived");
    }

    #[test]
    fn scan_under_concurrent_acquire_never_hands_a_slot_out_twice() {
        // Slots 1 and 2 free; between our read and our claim another core takes slot 1.
        let naive = NaiveBitmap {
            word: AtomicU64::new(0b0110),
        };
        let mut other = None;
        let got = naive
            .acquire_probed(|| other = naive.acquire_probed(|| {}))
            .unwrap();
        assert_eq!(
            Some(got),
            other,
            "the naive scan was expected to double-allocate"
        );

        let ours = FreeBitmap::<1>::new(4).unwrap();
        for _ in 0..4 {
            ours.acquire().unwrap();
        }
        ours.release(1).unwrap();
        ours.release(2).unwrap();
        let mut other = None;
        let got = ours
            .acquire_probed(|| {
                if other.is_none() {
                    other = ours.acquire();
                }
            })
            .unwrap();
        assert_eq!(other, Some(1));
        assert_eq!(got, 2, "ours retried with the next free bit");
        assert!(accounted(&[0, 3, 1, 2], |i| ours.is_free(i).unwrap(), 4));
    }

    #[test]
    fn acquire_many_takes_the_lowest_bits_of_one_word_up_to_max() {
        let b = FreeBitmap::<2>::new(70).unwrap();
        let c = b.acquire_many(5).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        // One word per call: 59 left in word 0 even when asked for 100.
        let c = b.acquire_many(100).unwrap();
        assert_eq!(c.collect::<Vec<_>>(), (5..64).collect::<Vec<_>>());
        let c = b.acquire_many(100).unwrap();
        assert_eq!(c.collect::<Vec<_>>(), (64..70).collect::<Vec<_>>());
        assert_eq!(b.acquire_many(1), None, "all 70 held");
        assert_eq!(b.free_count(), 0);
        assert_eq!(b.acquire_many(0), None);
        assert_eq!(FreeBitmap::<0>::new(0).unwrap().acquire_many(3), None);
        assert_eq!(lowest_bits(0b1011_0100, 2), 0b0001_0100);
        assert_eq!(lowest_bits(0b1011_0100, 9), 0b1011_0100);
        assert_eq!(lowest_bits(u64::MAX, 64), u64::MAX);
        assert_eq!(lowest_bits(u64::MAX, 0), 0);
    }

    #[test]
    fn acquire_many_gives_back_what_is_not_used() {
        let b = FreeBitmap::<1>::new(8).unwrap();
        let mut c = b.acquire_many(6).unwrap();
        assert_eq!((c.next(), c.next()), (Some(0), Some(1)));
        b.release_claimed(c).unwrap();
        assert_eq!(b.free_count(), 6, "2..6 back, 0 and 1 still held");
        assert!(!b.is_free(0).unwrap() && !b.is_free(1).unwrap());
        // Giving back a run whose slots are already free is a broken invariant, reported.
        let c = b.acquire_many(1).unwrap();
        assert_eq!((c.len(), c.size_hint()), (1, (1, Some(1))));
        b.release(2).unwrap();
        assert_eq!(
            b.release_claimed(c),
            Err(SlotError::NotAllocated { index: 2 })
        );
        // A run from another bitmap is refused and releases nothing here.
        let free = b.free_count();
        let other = FreeBitmap::<2>::new(128).unwrap();
        let first = other.acquire_many(10).unwrap(); // slots 0..10 of word 0
        assert!(matches!(
            b.release_claimed(first),
            Err(SlotError::IndexOutOfRange { index: 8, .. })
        ));
        let _ = other.acquire_many(64).unwrap();
        let second = other.acquire_many(3).unwrap(); // word 1
        assert!(matches!(
            b.release_claimed(second),
            Err(SlotError::IndexOutOfRange { .. })
        ));
        assert_eq!(b.free_count(), free);
    }

    #[test]
    fn acquire_many_under_races_never_hands_out_twice_or_loses_a_slot() {
        // Slots 1, 2 and 5 free. Between our read and our claim another core takes slot 1 and
        // releases slot 3 (held elsewhere): we own exactly 2 and 5, slot 3 stays free.
        let b = FreeBitmap::<1>::new(8).unwrap();
        for _ in 0..8 {
            b.acquire().unwrap();
        }
        for i in [1, 2, 5] {
            b.release(i).unwrap();
        }
        let mut other = None;
        let got: Vec<usize> = b
            .acquire_many_probed(4, || {
                if other.is_none() {
                    other = b.acquire();
                    b.release(3).unwrap();
                }
            })
            .unwrap()
            .collect();
        assert_eq!(other, Some(1));
        assert_eq!(got, vec![2, 5]);
        assert!(b.is_free(3).unwrap(), "the concurrent release survived");
        assert!(accounted(
            &[0, 4, 6, 7, 1, 2, 5],
            |i| b.is_free(i).unwrap(),
            8
        ));
        // Every bit seen was taken by others first: the call retries with what is left.
        let b = FreeBitmap::<1>::new(4).unwrap();
        for _ in 0..4 {
            b.acquire().unwrap();
        }
        b.release(0).unwrap();
        b.release(2).unwrap();
        let mut stolen = vec![];
        let got: Vec<usize> = b
            .acquire_many_probed(1, || {
                if stolen.is_empty() {
                    stolen.push(b.acquire().unwrap());
                }
            })
            .unwrap()
            .collect();
        assert_eq!((stolen, got), (vec![0], vec![2]));
    }

    #[test]
    fn const_construction() {
        static B: FreeBitmap<1> = match FreeBitmap::new(5) {
            Ok(b) => b,
            Err(_) => panic!("len fits"),
        };
        assert_eq!(B.free_count(), 5);
        assert!(B.is_free(4).unwrap());
    }

    /// A second view of a run's slots, without taking them out of it.
    fn peek(c: &Claimed) -> Claimed {
        Claimed {
            word: c.word,
            bits: c.bits,
        }
    }

    /// Seed 004: whatever the words and the hint hold, no operation panics or leaves range, a
    /// scan looks at each word at most once (no concurrent writer), no slot is handed out
    /// twice without a release in between, bits past `len` are handed out at most once (then
    /// gone), and draining ends.
    #[test]
    fn corrupted_words_are_bounded_and_never_leave_range() {
        use proptest::prelude::*;
        use std::collections::BTreeSet;
        const CAP: usize = FreeBitmap::<3>::CAPACITY;
        /// Who has what: slots handed out (singly or still in a run), corrupted bits seen.
        #[derive(Default)]
        struct Book {
            held: BTreeSet<usize>,
            in_runs: BTreeSet<usize>,
            past_len: BTreeSet<usize>,
        }
        impl Book {
            fn take(&mut self, i: usize, len: usize, into_run: bool) {
                assert!(i < CAP, "index {i} out of range");
                if i >= len {
                    assert!(
                        self.past_len.insert(i),
                        "corrupted bit {i} handed out twice"
                    );
                    return;
                }
                assert!(
                    !self.held.contains(&i) && !self.in_runs.contains(&i),
                    "slot {i} handed out twice"
                );
                if into_run {
                    self.in_runs.insert(i);
                } else {
                    self.held.insert(i);
                }
            }
        }
        proptest!(|(words in any::<[u64; 3]>(), len in 0usize..=CAP, hint in any::<usize>(),
                    ops in proptest::collection::vec((0u8..4, any::<usize>()), 0..120))| {
            let b = FreeBitmap::<3>::from_raw(words, len, hint);
            let mut book = Book::default();
            let mut runs: Vec<Claimed> = Vec::new();
            for (op, x) in ops {
                match op {
                    0 | 1 => {
                        let mut looks = 0;
                        let max = if op == 0 { 1 } else { x % 70 };
                        let got = b.acquire_many_looking(max, || looks += 1);
                        prop_assert!(looks <= 3, "{} looks at 3 words", looks);
                        let Some(mut run) = got else { continue };
                        prop_assert!(run.len() <= max);
                        if op == 1 && x % 2 == 0 {
                            // Use the first, keep the rest in the run to give back later.
                            if let Some(i) = run.next() {
                                book.take(i, len, false);
                            }
                            for i in peek(&run) {
                                book.take(i, len, true);
                            }
                            runs.push(run);
                        } else {
                            for i in run {
                                book.take(i, len, false);
                            }
                        }
                    }
                    2 => {
                        let i = x % 256;
                        if book.in_runs.contains(&i) {
                            continue;
                        }
                        match b.release(i) {
                            Ok(()) => prop_assert!(i < len),
                            Err(SlotError::IndexOutOfRange { .. }) => prop_assert!(i >= len),
                            Err(SlotError::NotAllocated { .. }) => {
                                prop_assert!(i < len && !book.held.contains(&i));
                            }
                            Err(e) => prop_assert!(false, "{:?}", e),
                        }
                        book.held.remove(&i);
                    }
                    _ => {
                        let Some(run) = runs.pop() else { continue };
                        let ids: Vec<usize> = peek(&run).collect();
                        let r = b.release_claimed(run);
                        if ids.iter().all(|&i| i < len) {
                            prop_assert_eq!(r, Ok(()));
                        } else {
                            let refused = matches!(r, Err(SlotError::IndexOutOfRange { .. }));
                            prop_assert!(refused, "{:?}", r);
                        }
                        for i in ids {
                            book.in_runs.remove(&i);
                        }
                    }
                }
                prop_assert!(b.free_count() <= CAP);
            }
            // Draining ends: at most CAPACITY claims, each index once, then None.
            let mut drained = 0;
            while let Some(run) = b.acquire_many(64) {
                for i in run {
                    book.take(i, len, false);
                    drained += 1;
                }
                prop_assert!(drained <= CAP);
            }
            prop_assert_eq!(b.free_count(), 0);
        });
    }

    /// Seed 004 with a hostile writer: another party stores an arbitrary value into the word
    /// each time a scan is between its load and its claim, `k` times in all. The scan still
    /// ends, after at most one look per word plus one per hostile write.
    #[test]
    fn a_hostile_writer_costs_one_look_per_write() {
        use proptest::prelude::*;
        proptest!(|(words in any::<[u64; 2]>(), hint in any::<usize>(),
                    hostile in proptest::collection::vec(any::<u64>(), 0..20), max in 1usize..70)| {
            let b = FreeBitmap::<2>::from_raw(words, 128, hint);
            let mut writes = hostile.clone().into_iter();
            let mut looks = 0;
            let got = b.acquire_many_probed(max, || {
                looks += 1;
                if let Some(v) = writes.next() {
                    // Hostile: overwrite both words (we do not know which one is being read).
                    b.words[0].store(v, Ordering::Relaxed);
                    b.words[1].store(v.rotate_left(17), Ordering::Relaxed);
                }
            });
            prop_assert!(looks <= 2 + hostile.len(), "{} looks, {} hostile writes", looks, hostile.len());
            if let Some(run) = got {
                prop_assert!(run.len() <= max);
                for i in run {
                    prop_assert!(i < 128);
                }
            }
        });
    }
}
