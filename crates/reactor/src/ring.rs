//! The rings between cores: fixed-capacity single-producer/single-consumer queues in which the
//! two ends share no index.
//!
//! Each end keeps its own position in its own handle (the [`Producer`] the slot it writes next,
//! the [`Consumer`] the slot it reads next). What the ends share is one `full` flag per slot:
//! the producer sets it (Release) after writing the slot's value, the consumer clears it
//! (Release) after taking the value, and each end reads it (Acquire) before touching the value.
//! That flag hand-off alone orders every access to a value, whatever the other slots hold
//! (the FastForward queue, Giacomoni et al., PPoPP 2008).
//!
//! Why not a head/tail ring (heapless' `spsc`, seed 004's idea #2): there each end reads the
//! other's index and uses it to address the buffer, so a corrupted index is an out-of-bounds
//! access unless every use is range-checked (heapless uses `get_unchecked`), and a corrupted
//! tail makes the consumer read a slot nobody wrote. Here nothing shared is an index, and a
//! slot's value is an option (`Held`: never uninitialised memory). What a corrupted flag can do is
//! bounded and memory-safe:
//!
//! * a flag that reads "full" on a free slot: the producer stops there (backpressure), and the
//!   consumer, once it gets there, finds no value: [`Corrupt`], the flag is cleared, the
//!   consumer stays at that slot and the producer, which stopped at the same slot, fills it
//!   next. Nothing is lost or reordered;
//! * a flag cleared under a message: the consumer waits there and the producer overwrites the
//!   message when it comes round (that message is lost; nothing is delivered twice, since
//!   taking a value leaves the slot empty).
//!
//! Only a flag set by a stray write while the producer is writing that very slot could let
//! both ends touch one value at once; no ring without a lock can rule that out.
//!
//! Capacity is `N`: every slot can hold a value. (heapless' rings keep one slot empty to tell
//! full from empty by their indexes; here the flags say it.)
//!
//! Under `--cfg loom` the flags are loom atomics and the values loom cells, so the loom models
//! of the mesh check this code, including that every value access is ordered by its flag.

use crate::sync::{AtomicU8, Ordering, UnsafeCell};

/// A slot held a `full` flag but no value (a corrupted flag): reported once, then repaired
/// (the flag is cleared and the consumer stays at that slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corrupt {
    /// The slot.
    pub slot: usize,
}

/// A slot's value: `Option<T>` with a tag of its own, so an empty slot is all zero bytes.
///
/// `Option<T>` would hide "none" in a spare value of `T`'s own tag (7 for the reactor's `Msg`),
/// which makes every empty ring a non-zero constant: 32 KiB of them were copied out of
/// `.rodata` each time a job built a mesh. `repr(u8)` gives the enum a plain `u8` tag with
/// `Empty` = 0, so an empty ring is zeroed memory (`.bss`, or a `memset` on the stack).
#[repr(u8)]
enum Held<T> {
    Empty = 0,
    Full(T) = 1,
}

impl<T> Held<T> {
    fn take(&mut self) -> Option<T> {
        match core::mem::replace(self, Held::Empty) {
            Held::Empty => None,
            Held::Full(v) => Some(v),
        }
    }

    fn as_ref(&self) -> Option<&T> {
        match self {
            Held::Empty => None,
            Held::Full(v) => Some(v),
        }
    }
}

struct Slot<T> {
    /// Non-zero: the value is the consumer's. Zero: the slot is the producer's. (Any bit
    /// pattern is a valid `u8`, so even a corrupted flag can be loaded.)
    full: AtomicU8,
    value: UnsafeCell<Held<T>>,
}

// SAFETY: a slot's value is only ever touched by the one `Producer` (writes, while `full` reads
// zero) and the one `Consumer` (reads and takes, while `full` reads non-zero) of its ring, and
// each end's flag load (Acquire) synchronises with the other end's last flag store (Release),
// so the two never access a value concurrently; values move from the producer's thread to the
// consumer's, hence `T: Send`. `Ring` itself offers no access to values through `&self`
// (splitting takes `&mut self`), and `Consumer::peek_with` takes `&mut self`, so no `&T` is
// ever shared between threads.
unsafe impl<T: Send> Sync for Slot<T> {}

impl<T> Slot<T> {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            full: AtomicU8::new(0),
            value: UnsafeCell::new(Held::Empty),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            full: AtomicU8::new(0),
            value: UnsafeCell::new(Held::Empty),
        }
    }
}

/// Storage for one ring of capacity `N`. Lives as long as the ends split from it.
pub struct Ring<T, const N: usize> {
    slots: [Slot<T>; N],
}

impl<T, const N: usize> Ring<T, N> {
    /// An empty ring (`N` must be at least 1).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        const { assert!(N > 0, "a ring needs at least one slot") };
        Self {
            slots: [const { Slot::new() }; N],
        }
    }

    /// An empty ring (loom build: not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        const { assert!(N > 0, "a ring needs at least one slot") };
        Self {
            slots: core::array::from_fn(|_| Slot::new()),
        }
    }

    /// How many values the ring holds at most.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The producer's end and the consumer's end. The ring is emptied first (values left by
    /// ends split earlier are dropped): each end starts at slot 0.
    pub fn split(&mut self) -> (Producer<'_, T>, Consumer<'_, T>) {
        for s in self.slots.iter_mut() {
            *s = Slot::new();
        }
        (
            Producer {
                slots: &self.slots,
                next: 0,
            },
            Consumer {
                slots: &self.slots,
                next: 0,
            },
        )
    }
}

impl<T, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The slot after `i` in a ring of `len` slots.
#[inline(always)]
fn after(i: usize, len: usize) -> usize {
    if i + 1 >= len {
        0
    } else {
        i + 1
    }
}

/// The producer's end of a ring. Never blocks, never loops.
pub struct Producer<'a, T> {
    slots: &'a [Slot<T>],
    /// The slot written next (this end's own; always `< slots.len()`).
    next: usize,
}

impl<T> Producer<'_, T> {
    /// Whether [`Producer::enqueue`] would accept a value now (it will until the consumer
    /// has less to do, never the other way round).
    #[inline]
    pub fn ready(&self) -> bool {
        self.slots
            .get(self.next)
            .is_some_and(|s| s.full.load(Ordering::Relaxed) == 0)
    }

    /// Appends `value`, or gives it back when the ring is full (backpressure).
    #[inline(always)]
    pub fn enqueue(&mut self, value: T) -> Result<(), T> {
        let Some(slot) = self.slots.get(self.next) else {
            return Err(value);
        };
        // Acquire: the consumer cleared this flag (Release) after its last access to the
        // value, so our write below comes after that access.
        if slot.full.load(Ordering::Acquire) != 0 {
            return Err(value);
        }
        slot.value.with_mut(|p| {
            // SAFETY: `full` read zero, so the consumer is done with this value (the Acquire
            // above orders its take before this write) and will not touch it until our
            // Release store below; this end is the only writer (`&mut self`). `p` comes from
            // the cell and is valid for the slot's lifetime.
            unsafe { *p = Held::Full(value) }
        });
        // Release: the value written above is visible to the consumer that sees the flag.
        slot.full.store(1, Ordering::Release);
        self.next = after(self.next, self.slots.len());
        Ok(())
    }
}

/// The consumer's end of a ring. Never blocks, never loops (except [`Consumer::len`], which
/// looks at each slot at most once).
pub struct Consumer<'a, T> {
    slots: &'a [Slot<T>],
    /// The slot read next (this end's own; always `< slots.len()`).
    next: usize,
}

impl<T> Consumer<'_, T> {
    /// Takes the oldest value, if there is one.
    ///
    /// # Errors
    /// [`Corrupt`] when the next slot is flagged full but holds nothing: the flag is cleared
    /// and the consumer stays at that slot (the next call carries on normally).
    #[inline]
    pub fn dequeue(&mut self) -> Result<Option<T>, Corrupt> {
        let Some(slot) = self.slots.get(self.next) else {
            return Ok(None);
        };
        // Acquire: pairs with the producer's Release store after it wrote the value.
        if slot.full.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let value = slot.value.with_mut(|p| {
            // SAFETY: `full` read non-zero, so the producer finished writing this value (the
            // Acquire above orders its write before this take) and will not touch it until
            // our Release store below; this end is the only reader (`&mut self`). `p` comes
            // from the cell and is valid for the slot's lifetime.
            unsafe { (*p).take() }
        });
        // Release: the producer's next write of this slot comes after our take.
        slot.full.store(0, Ordering::Release);
        match value {
            Some(v) => {
                self.next = after(self.next, self.slots.len());
                Ok(Some(v))
            }
            None => Err(Corrupt { slot: self.next }),
        }
    }

    /// Runs `f` on the oldest value without taking it; `None` if there is none.
    ///
    /// # Errors
    /// [`Corrupt`] as for [`Consumer::dequeue`] (the flag is repaired the same way).
    #[inline]
    pub fn peek_with<R>(&mut self, f: impl FnOnce(&T) -> R) -> Result<Option<R>, Corrupt> {
        let Some(slot) = self.slots.get(self.next) else {
            return Ok(None);
        };
        if slot.full.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let seen = slot.value.with(|p| {
            // SAFETY: as in `dequeue`: the flag handed the value to this end, and the producer
            // leaves it alone until this end clears the flag; `&mut self` keeps this the only
            // access from the consumer's side while `f` runs.
            unsafe { (*p).as_ref().map(f) }
        });
        match seen {
            Some(r) => Ok(Some(r)),
            None => {
                slot.full.store(0, Ordering::Release);
                Err(Corrupt { slot: self.next })
            }
        }
    }

    /// How many values are waiting (a snapshot: the flags of consecutive full slots from this
    /// end's position, each looked at once).
    pub fn len(&self) -> usize {
        let len = self.slots.len();
        let mut i = self.next;
        let mut n = 0;
        while n < len {
            match self.slots.get(i) {
                Some(s) if s.full.load(Ordering::Acquire) != 0 => n += 1,
                _ => break,
            }
            i = after(i, len);
        }
        n
    }

    /// Whether nothing is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec::Vec;

    #[test]
    fn fifo_with_capacity_n() {
        let mut r = Ring::<u32, 3>::new();
        assert_eq!(r.capacity(), 3);
        let (mut p, mut c) = r.split();
        assert_eq!(c.dequeue(), Ok(None));
        for round in 0..5 {
            for i in 0..3 {
                assert!(p.ready());
                p.enqueue(round * 10 + i).unwrap();
            }
            assert!(!p.ready());
            assert_eq!(p.enqueue(99), Err(99), "full at N");
            assert_eq!(c.len(), 3);
            assert_eq!(c.peek_with(|v| *v), Ok(Some(round * 10)));
            for i in 0..3 {
                assert_eq!(c.dequeue(), Ok(Some(round * 10 + i)));
            }
            assert!(c.is_empty());
        }
    }

    #[test]
    fn split_empties_the_ring() {
        let mut r = Ring::<u32, 3>::new();
        {
            let (mut p, _c) = r.split();
            p.enqueue(1).unwrap();
        }
        let (_p, mut c) = r.split();
        assert_eq!(c.dequeue(), Ok(None));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push,
        Pop,
        Peek,
        /// A stray write of `byte` into the flag of slot `slot % N`.
        Stray(usize, u8),
    }

    fn op(stray: bool) -> impl Strategy<Value = Op> {
        let w = if stray { 1 } else { 0 };
        prop_oneof![
            4 => Just(Op::Push),
            4 => Just(Op::Pop),
            1 => Just(Op::Peek),
            w => (any::<usize>(), any::<u8>()).prop_map(|(s, b)| Op::Stray(s, b)),
        ]
    }

    const N: usize = 5;

    /// Runs `ops` on a fresh ring whose flags start as `flags`; returns (accepted values in
    /// order, delivered values in order, corrupt reports). Checks on every step that no
    /// position leaves `0..N` and `len` stays within `0..=N` (nothing loops or indexes out of
    /// range: every operation is a fixed number of flag accesses, `len` at most N).
    fn run(flags: &[u8], ops: &[Op]) -> (Vec<u32>, Vec<u32>, usize) {
        let mut r = Ring::<u32, N>::new();
        let (mut p, mut c) = r.split();
        for (slot, f) in p.slots.iter().zip(flags) {
            slot.full.store(*f, Ordering::Relaxed);
        }
        let (mut accepted, mut delivered, mut faults) = (Vec::new(), Vec::new(), 0);
        for (k, op) in ops.iter().enumerate() {
            match *op {
                Op::Push => {
                    if p.enqueue(k as u32).is_ok() {
                        accepted.push(k as u32);
                    }
                }
                Op::Pop => match c.dequeue() {
                    Ok(Some(v)) => delivered.push(v),
                    Ok(None) => {}
                    Err(Corrupt { slot }) => {
                        assert!(slot < N);
                        faults += 1;
                    }
                },
                Op::Peek => {
                    if let Err(Corrupt { slot }) = c.peek_with(|v| *v) {
                        assert!(slot < N);
                        faults += 1;
                    }
                }
                Op::Stray(slot, byte) => p.slots[slot % N].full.store(byte, Ordering::Relaxed),
            }
            assert!(p.next < N && c.next < N && c.len() <= N);
        }
        (accepted, delivered, faults)
    }

    proptest! {
        /// Seed 004, the ring's shared words corrupted before use: whatever the flags hold,
        /// the ring stays a FIFO that loses nothing (a flag claiming a value that is not there
        /// stops the producer at that slot and is repaired when the consumer gets there), and
        /// each corrupt flag is reported at most once.
        #[test]
        fn corrupted_flags_never_lose_or_reorder(
            flags in proptest::collection::vec(any::<u8>(), N),
            ops in proptest::collection::vec(op(false), 0..60),
        ) {
            let (accepted, delivered, faults) = run(&flags, &ops);
            prop_assert!(faults <= flags.iter().filter(|&&f| f != 0).count());
            prop_assert_eq!(&delivered[..], &accepted[..delivered.len()], "FIFO, nothing lost");
        }

        /// Seed 004, stray writes into the flags at any time: no panic, no loop, no position
        /// out of range (checked in `run`), and nothing is delivered that was not sent or is
        /// delivered twice.
        #[test]
        fn stray_writes_never_duplicate_or_invent(
            flags in proptest::collection::vec(any::<u8>(), N),
            ops in proptest::collection::vec(op(true), 0..80),
        ) {
            let (accepted, delivered, _) = run(&flags, &ops);
            let mut seen = std::collections::BTreeSet::new();
            for v in &delivered {
                prop_assert!(accepted.contains(v), "delivered {} that was never sent", v);
                prop_assert!(seen.insert(*v), "delivered {} twice", v);
            }
        }

        /// Without corruption the ring is exactly a bounded FIFO of capacity N.
        #[test]
        fn matches_a_bounded_fifo(ops in proptest::collection::vec(op(false), 0..80)) {
            let mut r = Ring::<u32, N>::new();
            let (mut p, mut c) = r.split();
            let mut model = VecDeque::new();
            for (k, op) in ops.iter().enumerate() {
                match op {
                    Op::Push => {
                        prop_assert_eq!(p.ready(), model.len() < N);
                        let got = p.enqueue(k as u32);
                        if model.len() < N {
                            prop_assert_eq!(got, Ok(()));
                            model.push_back(k as u32);
                        } else {
                            prop_assert_eq!(got, Err(k as u32));
                        }
                    }
                    Op::Pop => prop_assert_eq!(c.dequeue(), Ok(model.pop_front())),
                    Op::Peek => prop_assert_eq!(c.peek_with(|v| *v), Ok(model.front().copied())),
                    Op::Stray(..) => {}
                }
                prop_assert_eq!(c.len(), model.len());
            }
        }
    }
}
