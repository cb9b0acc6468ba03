//! Slot handles (index + generation) and the crate's error type.

use core::fmt;

/// Bits of a raw handle that hold the slot index (the low bits).
pub const INDEX_BITS: u32 = 16;
/// Bits of a raw handle that hold the generation (the high bits). Generations wrap modulo
/// `2^GENERATION_BITS`: a handle kept across 65 536 reuses of its slot is not detected as stale.
pub const GENERATION_BITS: u32 = 32 - INDEX_BITS;
/// The most slots one pool can have (every index must fit in [`INDEX_BITS`]).
pub const MAX_SLOTS: usize = 1 << INDEX_BITS;

const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;
pub(crate) const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;

/// A reference to one use of one slot: the slot index plus the slot's generation when it was
/// acquired. The generation changes every time the slot is released, so a handle kept after its
/// slot was released is detected as stale.
///
/// Encodes losslessly to a `u32` ([`Handle::to_raw`]): index in the low [`INDEX_BITS`],
/// generation in the high bits. A raw value read back from untrusted memory (a device
/// completion entry, a message) must go through [`crate::SlotPool::handle_from_raw`], which
/// range-checks the index against that pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle {
    index: u16,
    generation: u16,
}

impl Handle {
    pub(crate) const fn new(index: usize, generation: u32) -> Self {
        Self {
            index: (index as u32 & INDEX_MASK) as u16,
            generation: (generation & GENERATION_MASK) as u16,
        }
    }

    /// The slot index (always below the owning pool's capacity for handles it issued).
    pub const fn index(self) -> usize {
        self.index as usize
    }

    /// The slot generation this handle refers to.
    pub const fn generation(self) -> u32 {
        self.generation as u32
    }

    /// Encodes the handle as a `u32`: index in the low bits, generation in the high bits.
    pub const fn to_raw(self) -> u32 {
        ((self.generation as u32) << INDEX_BITS) | self.index as u32
    }

    /// Splits a raw value into (index, generation) without any range check.
    pub(crate) const fn split_raw(raw: u32) -> (usize, u32) {
        ((raw & INDEX_MASK) as usize, raw >> INDEX_BITS)
    }
}

/// Why a slot operation was refused. Never a panic: every bad input maps to one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// No free slot.
    Full,
    /// The index is not below the pool's capacity (e.g. a corrupt raw value from a device).
    IndexOutOfRange {
        /// The offending index.
        index: usize,
        /// The pool's capacity.
        capacity: usize,
    },
    /// The slot was released since the handle was issued (and may have been reused).
    Stale {
        /// The slot index.
        index: usize,
        /// The generation the handle carries.
        handle_generation: u32,
        /// The slot's current generation.
        current_generation: u32,
    },
    /// The slot is free: the handle's generation is current but nobody holds the slot
    /// (a forged raw handle).
    NotAllocated {
        /// The slot index.
        index: usize,
    },
    /// A requested length exceeds what the bitmap can hold.
    TooLarge {
        /// The requested number of slots.
        requested: usize,
        /// The most this bitmap can hold.
        max: usize,
    },
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Full => f.write_str("no free slot"),
            Self::IndexOutOfRange { index, capacity } => {
                write!(f, "slot index {index} out of range (capacity {capacity})")
            }
            Self::Stale {
                index,
                handle_generation,
                current_generation,
            } => write!(
                f,
                "stale handle for slot {index}: generation {handle_generation}, slot is at {current_generation}"
            ),
            Self::NotAllocated { index } => write!(f, "slot {index} is not allocated"),
            Self::TooLarge { requested, max } => {
                write!(f, "{requested} slots requested, at most {max}")
            }
        }
    }
}
