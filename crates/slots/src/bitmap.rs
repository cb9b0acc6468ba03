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

    /// A bitmap of `min(len, CAPACITY)` free slots, for callers that checked `len` at compile time.
    #[cfg(not(loom))]
    pub(crate) const fn new_clamped(len: usize) -> Self {
        let len = if len > Self::CAPACITY { Self::CAPACITY } else { len };
        match Self::new(len) {
            Ok(b) => b,
            Err(_) => unreachable!(),
        }
    }

    /// Loom build of [`Self::new_clamped`].
    #[cfg(loom)]
    pub(crate) fn new_clamped(len: usize) -> Self {
        let len = len.min(Self::CAPACITY);
        Self {
            words: core::array::from_fn(|i| AtomicU64::new(initial_word(i, len))),
            len,
            hint: AtomicUsize::new(0),
        }
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
    pub fn acquire(&self) -> Option<usize> {
        if W == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed) % W;
        for k in 0..W {
            let w = (start + k) % W;
            let mut seen = self.words[w].load(Ordering::Relaxed);
            while seen != 0 {
                let bit = seen.trailing_zeros() as usize;
                let mask = 1u64 << bit;
                // Acquire pairs with the Release `fetch_or` of the slot's last release.
                let prev = self.words[w].fetch_and(!mask, Ordering::Acquire);
                if prev & mask != 0 {
                    let rest = prev & !mask;
                    let next = if rest == 0 { (w + 1) % W } else { w };
                    self.hint.store(next, Ordering::Relaxed);
                    return Some(w * BITS + bit);
                }
                // Somebody else claimed that bit; retry with what the word holds now.
                seen = prev & !mask;
            }
        }
        None
    }

    /// Marks `index` free with one `fetch_or` (no loop, no wait).
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] for an index `>= len`; [`SlotError::NotAllocated`] if the
    /// slot was already free (a double release; the bitmap is left unchanged).
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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

    #[test]
    fn const_construction() {
        static B: FreeBitmap<1> = match FreeBitmap::new(5) {
            Ok(b) => b,
            Err(_) => panic!("len fits"),
        };
        assert_eq!(B.free_count(), 5);
        assert!(B.is_free(4).unwrap());
    }
}
