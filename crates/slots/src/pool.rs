//! Generation-checked slot allocation on top of [`FreeBitmap`].

use crate::handle::GENERATION_MASK;
use crate::sync::{AtomicU32, Ordering};
use crate::{FreeBitmap, Handle, SlotError, MAX_SLOTS};

/// `N` slots (tracked by a `W`-word [`FreeBitmap`], `W = words_for(N)`), each with an atomic
/// generation counter that is bumped when the slot is released. Hands out [`Handle`]s; every
/// lookup is O(1) and detects handles whose slot was released since ([`SlotError::Stale`]).
///
/// `N` must be in `1..=W * 64` and at most [`MAX_SLOTS`]; this is checked at compile time.
#[derive(Debug)]
pub struct SlotPool<const N: usize, const W: usize> {
    free: FreeBitmap<W>,
    generations: [AtomicU32; N],
}

impl<const N: usize, const W: usize> SlotPool<N, W> {
    const SIZE_OK: () = assert!(
        N > 0 && N <= W * 64 && N <= MAX_SLOTS,
        "SlotPool<N, W>: need 0 < N <= W * 64 (use words_for(N)) and N <= MAX_SLOTS"
    );

    /// A pool with all `N` slots free, every generation 0.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            generations: [const { AtomicU32::new(0) }; N],
        }
    }

    /// A pool with all `N` slots free, every generation 0 (loom build: not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            generations: core::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// A pool with all `N` slots free, every generation `generation` (masked to
    /// [`crate::GENERATION_BITS`]): for a pool rebuilt after a restart that must not hand out
    /// the generations of handles issued before it, and for tests at the wrap boundary.
    #[cfg(not(loom))]
    pub const fn with_generation(generation: u32) -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            generations: [const { AtomicU32::new(0) }; N],
        }
        .starting_at(generation & GENERATION_MASK)
    }

    /// As the `const` version (loom build: not `const`).
    #[cfg(loom)]
    pub fn with_generation(generation: u32) -> Self {
        let () = Self::SIZE_OK;
        Self {
            free: FreeBitmap::new_saturating(N),
            generations: core::array::from_fn(|_| AtomicU32::new(generation & GENERATION_MASK)),
        }
    }

    #[cfg(not(loom))]
    const fn starting_at(mut self, generation: u32) -> Self {
        let mut i = 0;
        while i < N {
            self.generations[i] = AtomicU32::new(generation);
            i += 1;
        }
        self
    }

    /// A pool in an arbitrary (e.g. corrupted) state, for the crate's tests.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn from_raw(free: FreeBitmap<W>, generations: [u32; N]) -> Self {
        Self {
            free,
            generations: generations.map(AtomicU32::new),
        }
    }

    /// The number of slots.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// How many slots are free (a snapshot).
    pub fn free_count(&self) -> usize {
        self.free.free_count()
    }

    /// Claims a free slot.
    ///
    /// # Errors
    /// [`SlotError::Full`] if no slot is free; [`SlotError::IndexOutOfRange`] if the bitmap
    /// held a bit past the last slot (a corrupted word; that bit is cleared, so retrying works).
    pub fn acquire(&self) -> Result<Handle, SlotError> {
        let index = self.free.acquire().ok_or(SlotError::Full)?;
        // Only a corrupted bitmap word has bits past the last slot: that bit is now clear
        // again (claimed), and the caller gets a typed error, never an out-of-range index.
        let Some(generation) = self.generations.get(index) else {
            return Err(SlotError::IndexOutOfRange { index, capacity: N });
        };
        // The generation was bumped before the slot's bit was set (release below), and our
        // Acquire `fetch_and` in the bitmap synchronises with that Release `fetch_or`.
        let generation = generation.load(Ordering::Acquire);
        Ok(Handle::new(index, generation))
    }

    /// Releases the slot `handle` refers to: bumps its generation (so every copy of `handle`
    /// becomes stale), then sets its free bit with one `fetch_or`. No loop, no wait.
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] for a foreign handle, [`SlotError::Stale`] if the slot was
    /// already released through this handle or a copy of it (double release),
    /// [`SlotError::NotAllocated`] for a forged handle to a free slot.
    pub fn release(&self, handle: Handle) -> Result<(), SlotError> {
        let index = self.check_index(handle.index())?;
        let current = handle.generation();
        let next = current.wrapping_add(1) & GENERATION_MASK;
        // One CAS, not a loop: exactly one holder of this generation can retire it.
        self.generations[index]
            .compare_exchange(current, next, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|actual| SlotError::Stale {
                index,
                handle_generation: current,
                current_generation: actual,
            })?;
        self.free.release(index)
    }

    /// Checks that `handle` still refers to a held slot (a snapshot: the holder may release it
    /// right after). O(1).
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`], [`SlotError::Stale`] or [`SlotError::NotAllocated`].
    pub fn validate(&self, handle: Handle) -> Result<(), SlotError> {
        let index = self.check_index(handle.index())?;
        let current = self.generations[index].load(Ordering::Acquire);
        if current != handle.generation() {
            return Err(SlotError::Stale {
                index,
                handle_generation: handle.generation(),
                current_generation: current,
            });
        }
        if self.free.is_free(index)? {
            return Err(SlotError::NotAllocated { index });
        }
        Ok(())
    }

    /// Decodes a raw handle from untrusted memory (device completion entry, message),
    /// range-checking its index against this pool. Does not check liveness: use
    /// [`Self::validate`] or the lookup you need next.
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] if the index is not below `N`.
    pub fn handle_from_raw(&self, raw: u32) -> Result<Handle, SlotError> {
        let (index, generation) = Handle::split_raw(raw);
        let index = self.check_index(index)?;
        Ok(Handle::new(index, generation))
    }

    /// The current generation of slot `index` (a snapshot).
    ///
    /// # Errors
    /// [`SlotError::IndexOutOfRange`] if `index >= N`.
    pub fn generation(&self, index: usize) -> Result<u32, SlotError> {
        let index = self.check_index(index)?;
        Ok(self.generations[index].load(Ordering::Acquire))
    }

    fn check_index(&self, index: usize) -> Result<usize, SlotError> {
        if index < N {
            Ok(index)
        } else {
            Err(SlotError::IndexOutOfRange { index, capacity: N })
        }
    }
}

impl<const N: usize, const W: usize> Default for SlotPool<N, W> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::words_for;

    type Pool = SlotPool<3, { words_for(3) }>;

    #[test]
    fn stale_and_double_release_are_detected() {
        let p = Pool::new();
        let h = p.acquire().unwrap();
        p.validate(h).unwrap();
        p.release(h).unwrap();
        assert!(matches!(p.validate(h), Err(SlotError::Stale { .. })));
        assert!(matches!(p.release(h), Err(SlotError::Stale { .. })));
        assert_eq!(p.free_count(), 3);
    }

    #[test]
    fn raw_round_trip_and_range_check() {
        let p = Pool::new();
        let h = p.acquire().unwrap();
        assert_eq!(p.handle_from_raw(h.to_raw()), Ok(h));
        assert_eq!(
            p.handle_from_raw(7),
            Err(SlotError::IndexOutOfRange {
                index: 7,
                capacity: 3
            })
        );
        // A forged raw handle naming a free slot with its current generation.
        let forged = p.handle_from_raw(2).unwrap();
        assert_eq!(
            p.validate(forged),
            Err(SlotError::NotAllocated { index: 2 })
        );
    }

    #[test]
    fn generation_wraps_within_its_bits() {
        let p = SlotPool::<1, 1>::new();
        let mut last = p.acquire().unwrap();
        for _ in 0..(1u32 << crate::GENERATION_BITS) {
            p.release(last).unwrap();
            last = p.acquire().unwrap();
        }
        assert_eq!(last.generation(), 0, "generation wrapped to 0");
        assert_eq!(p.free_count(), 0);
    }
}
