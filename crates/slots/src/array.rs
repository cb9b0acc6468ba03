//! A typed, preallocated value per slot on top of [`SlotPool`].

use crate::{Handle, SlotError, SlotPool};

/// `N` preallocated values of type `T`, one per slot of a [`SlotPool<N, W>`]
/// (`W = words_for(N)`). No heap: values are built once and live as long as the array.
///
/// Values are shared (`&T`), so per-slot mutable state uses interior mutability that suits the
/// caller (atomics, a `critical_section::Mutex`, ...). A `&T` obtained through [`Self::get`]
/// stays memory-safe after the slot is released; it is only logically stale, which the next
/// [`Self::get`] with the same handle reports.
#[derive(Debug)]
pub struct SlotArray<T, const N: usize, const W: usize> {
    pool: SlotPool<N, W>,
    items: [T; N],
}

impl<T, const N: usize, const W: usize> SlotArray<T, N, W> {
    /// An array whose slot `i` holds `items[i]`, all slots free.
    #[cfg(not(loom))]
    pub const fn new(items: [T; N]) -> Self {
        Self {
            pool: SlotPool::new(),
            items,
        }
    }

    /// An array whose slot `i` holds `items[i]`, all slots free (loom build: not `const`).
    #[cfg(loom)]
    pub fn new(items: [T; N]) -> Self {
        Self {
            pool: SlotPool::new(),
            items,
        }
    }

    /// An array whose slot `i` holds `f(i)`.
    pub fn from_fn(f: impl FnMut(usize) -> T) -> Self {
        Self::new(core::array::from_fn(f))
    }

    /// Claims a free slot; its value is then reachable through [`Self::get`].
    ///
    /// # Errors
    /// [`SlotError::Full`] if no slot is free.
    pub fn acquire(&self) -> Result<Handle, SlotError> {
        self.pool.acquire()
    }

    /// The value of the slot `handle` refers to, if the handle is still current. O(1).
    ///
    /// # Errors
    /// As [`SlotPool::validate`].
    pub fn get(&self, handle: Handle) -> Result<&T, SlotError> {
        self.pool.validate(handle)?;
        Ok(&self.items[handle.index()])
    }

    /// Releases the slot (see [`SlotPool::release`]).
    ///
    /// # Errors
    /// As [`SlotPool::release`].
    pub fn release(&self, handle: Handle) -> Result<(), SlotError> {
        self.pool.release(handle)
    }

    /// The underlying pool (raw-handle decoding, generations, free count).
    pub const fn pool(&self) -> &SlotPool<N, W> {
        &self.pool
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::{AtomicU32, Ordering};

    #[test]
    fn values_follow_handles() {
        let a = SlotArray::<AtomicU32, 2, 1>::from_fn(|i| AtomicU32::new(i as u32 * 10));
        let h = a.acquire().unwrap();
        a.get(h).unwrap().fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            a.get(h).unwrap().load(Ordering::Relaxed),
            h.index() as u32 * 10 + 1
        );
        a.release(h).unwrap();
        assert!(matches!(a.get(h), Err(SlotError::Stale { .. })));
    }
}
