//! A fixed-capacity FIFO of `Copy` values for one core's own queues (staged I/O, finished I/O,
//! answers owed): a head index and a length.
//!
//! Why not `heapless::Deque`: it keeps a front, a back and a `full` flag, so "is it empty?"
//! is three loads and a compare of two of them, and every push and pop moves an index with a
//! compare-and-wrap. On the reactor's per-I/O path (two emptiness checks at submission, a push
//! at completion, a pop when the caller takes it) that was ~35 instructions per I/O
//! (`cargo xtask instr`). Here emptiness is one compare of the length, and a position is
//! `(head + k) % N`, which for a power-of-two `N` is a mask the compiler also knows to be in
//! range (no bounds check). No `unsafe`: slots hold `Option<T>`; a slot past the length is
//! never read as a value.

/// A FIFO holding at most `N` values.
pub(crate) struct Fifo<T: Copy, const N: usize> {
    slots: [Option<T>; N],
    /// Position of the oldest value, `< N`.
    head: usize,
    /// Values held, `<= N`.
    len: usize,
}

impl<T: Copy, const N: usize> Fifo<T, N> {
    /// Empty.
    pub(crate) const fn new() -> Self {
        Self {
            slots: [None; N],
            head: 0,
            len: 0,
        }
    }

    /// `x % N` for `x < 2 * N` (a mask when `N` is a power of two).
    #[inline(always)]
    fn wrap(x: usize) -> usize {
        if N.is_power_of_two() {
            x & (N - 1)
        } else if x >= N {
            x - N
        } else {
            x
        }
    }

    /// Values held.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    #[inline(always)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `v`; gives it back when full.
    #[inline(always)]
    pub(crate) fn push_back(&mut self, v: T) -> Result<(), T> {
        if self.len >= N {
            return Err(v);
        }
        match self.slots.get_mut(Self::wrap(self.head + self.len)) {
            Some(s) => *s = Some(v),
            None => return Err(v),
        }
        self.len += 1;
        Ok(())
    }

    /// The oldest value, not removed.
    #[inline(always)]
    pub(crate) fn front(&self) -> Option<&T> {
        if self.len == 0 {
            return None;
        }
        self.slots.get(self.head).and_then(Option::as_ref)
    }

    /// Removes and returns the oldest value.
    #[inline(always)]
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.slots.get(self.head).copied().flatten();
        self.head = Self::wrap(self.head + 1);
        self.len -= 1;
        v
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::Fifo;
    use std::collections::VecDeque;

    /// Against `VecDeque`, for a power-of-two capacity (the mask) and another (the compare).
    fn against_model<const N: usize>(seed: u64) {
        let mut f: Fifo<u32, N> = Fifo::new();
        let mut m: VecDeque<u32> = VecDeque::new();
        let mut x = seed;
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 3 {
                0 | 1 if x % 7 != 0 => {
                    let r = f.push_back(i);
                    if m.len() < N {
                        assert_eq!(r, Ok(()), "push {i} with {} held", m.len());
                        m.push_back(i);
                    } else {
                        assert_eq!(r, Err(i), "push {i} when full");
                    }
                }
                _ => assert_eq!(f.pop_front(), m.pop_front(), "pop at step {i}"),
            }
            assert_eq!(f.len(), m.len());
            assert_eq!(f.is_empty(), m.is_empty());
            assert_eq!(f.front(), m.front());
        }
    }

    #[test]
    fn behaves_as_a_bounded_vecdeque() {
        for seed in [1, 0x9E37_79B9_7F4A_7C15, 42] {
            against_model::<8>(seed);
            against_model::<5>(seed);
            against_model::<1>(seed);
        }
    }

    #[test]
    fn fills_to_capacity_wraps_and_keeps_order() {
        let mut f: Fifo<u32, 3> = Fifo::new();
        for round in 0..5u32 {
            for k in 0..3 {
                assert_eq!(f.push_back(round * 10 + k), Ok(()));
            }
            assert_eq!(f.push_back(99), Err(99));
            assert_eq!(f.len(), 3);
            for k in 0..3 {
                assert_eq!(f.pop_front(), Some(round * 10 + k));
            }
            assert_eq!(f.pop_front(), None);
            // Leave one behind so the next round starts at another head.
            assert_eq!(f.push_back(7), Ok(()));
            assert_eq!(f.pop_front(), Some(7));
        }
    }
}
