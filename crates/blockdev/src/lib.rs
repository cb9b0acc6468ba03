//! The device layer: what a storage engine above Keel sees of a block device.
//!
//! The unit is a **queue pair** ([`BlockQueue`]): one submission/completion channel owned by one
//! core and driven without locks and without interrupts. Work is named by a caller-chosen `u32`
//! *tag*; every accepted tag is reported exactly once through [`BlockQueue::poll`]'s callback.
//! The NVMe driver (`keel-nvme`) implements it; an SPDK-backed queue pair could implement it too.
//!
//! Buffers are named by [`BufRef`]: a device-visible (bus) address and a length. No heap is
//! involved; the caller keeps the memory alive and untouched until the tag completes.
//!
//! **The completion hands the buffer back.** A tag is reported once the device is done with its
//! buffer, never earlier: a command that times out is announced as a [`TimedOut`] event
//! ([`BlockQueue::pop_timed_out`]) and its tag completes later — with the device's own status
//! when it completes late, `Aborted` when an abort of it is confirmed, `Timeout` when a reset
//! or queue deletion quiesced it. So a write is never reissued while its original may still
//! land, and a read never writes into memory its owner got back.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use keel_hal::DmaRegion;

/// A namespace (logical unit) identifier, as the device numbers them (NVMe: 1-based NSID).
pub type NsId = u32;

/// Device-visible memory for a data transfer: `len` bytes starting at bus address `bus`.
///
/// Built from a [`DmaRegion`] with [`BufRef::new`], which checks bounds. The memory must stay
/// allocated and must not be reused until the tag the buffer was submitted with completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BufRef {
    bus: u64,
    len: usize,
}

impl BufRef {
    /// `len` bytes at `offset` inside `region`.
    pub fn new(region: &DmaRegion, offset: usize, len: usize) -> Result<Self, BufError> {
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => {}
            _ => return Err(BufError::OutOfBounds),
        }
        let bus = region
            .bus_addr()
            .checked_add(offset as u64)
            .ok_or(BufError::OutOfBounds)?;
        Ok(Self { bus, len })
    }

    /// The whole region.
    pub fn whole(region: &DmaRegion) -> Self {
        Self {
            bus: region.bus_addr(),
            len: region.len(),
        }
    }

    /// From a raw bus address, for platforms that manage DMA memory themselves (for example an
    /// SPDK-style hugepage pool). The caller vouches that `bus..bus+len` is DMA-able.
    pub const fn from_bus(bus: u64, len: usize) -> Self {
        Self { bus, len }
    }

    /// The device-visible (bus) address of the first byte.
    pub const fn bus_addr(&self) -> u64 {
        self.bus
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// `true` for a zero-length buffer.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a [`BufRef`] could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BufError {
    /// `offset + len` lies outside the region.
    OutOfBounds,
}

/// One block operation. `lba` and `blocks` are in the namespace's logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlockOp {
    /// Read `blocks` blocks into `buf` (`buf.len()` must be `blocks * block_size`).
    Read {
        /// Namespace.
        ns: NsId,
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u32,
        /// Where the data goes.
        buf: BufRef,
    },
    /// Write `blocks` blocks from `buf` (`buf.len()` must be `blocks * block_size`).
    Write {
        /// Namespace.
        ns: NsId,
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u32,
        /// Where the data comes from.
        buf: BufRef,
    },
    /// Make all completed writes to `ns` durable.
    Flush {
        /// Namespace.
        ns: NsId,
    },
    /// Set `blocks` blocks to zero without a data transfer.
    WriteZeroes {
        /// Namespace.
        ns: NsId,
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u32,
    },
    /// Tell the device the blocks are no longer in use (TRIM / deallocate).
    Deallocate {
        /// Namespace.
        ns: NsId,
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u32,
    },
}

impl BlockOp {
    /// The namespace the operation addresses.
    pub fn ns(&self) -> NsId {
        match *self {
            BlockOp::Read { ns, .. }
            | BlockOp::Write { ns, .. }
            | BlockOp::Flush { ns }
            | BlockOp::WriteZeroes { ns, .. }
            | BlockOp::Deallocate { ns, .. } => ns,
        }
    }
}

/// Why [`BlockQueue::submit`] refused an operation. Nothing was queued and the tag will not be
/// reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SubmitError {
    /// Not enough free queue slots right now: poll for completions and try again (backpressure).
    QueueFull,
    /// The operation needs more command slots than the queue has at all; split it.
    TooLarge,
    /// No such namespace on this device.
    InvalidNamespace,
    /// `lba + blocks` lies past the end of the namespace, or `blocks` is 0.
    OutOfRange,
    /// `buf.len()` is not `blocks * block_size`.
    BufferLength,
    /// The buffer's bus address is not aligned as the device requires (NVMe: 4 bytes).
    BufferAlignment,
    /// The device does not support this operation.
    Unsupported,
    /// The device has failed or is being reset; no new work is accepted until it recovers.
    DeviceUnavailable,
    /// The namespace keeps metadata in a separate buffer and this operation supplies none
    /// (sending it would let the device DMA metadata at bus address 0).
    MetadataRequired,
    /// The metadata buffer is shorter than the operation's metadata (`blocks * metadata size`).
    MetadataLength,
    /// The namespace's format (e.g. metadata interleaved with the data) is one this driver
    /// cannot do I/O on; the device's other namespaces are unaffected.
    UnsupportedFormat,
    /// The device is gone (surprise removal); the queue takes no work any more.
    Removed,
}

/// A device's completion status word, kept whole so policy above the driver can honour it.
///
/// The layout is NVMe's status field (NVMe 1.4 4.6.1) without the phase bit: bits 1..=8 the
/// Status Code, 9..=11 the Status Code Type, 12..=13 the Command Retry Delay index, 14 More,
/// 15 Do Not Retry. A device that is not NVMe maps its statuses onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DevStatus(u16);

impl DevStatus {
    /// From a raw status field (bit 0, the phase tag, is ignored).
    pub const fn from_field(field: u16) -> Self {
        Self(field & !1)
    }
    /// The raw status field (phase bit 0).
    pub const fn field(self) -> u16 {
        self.0
    }
    /// `SCT << 8 | SC`: the status code without its flags.
    pub const fn code(self) -> u16 {
        (((self.0 >> 9) & 0x7) << 8) | ((self.0 >> 1) & 0xFF)
    }
    /// Do Not Retry: the device says the same command will fail again. Never retry it.
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 15) != 0
    }
    /// More: the device has more about this failure in its error log.
    pub const fn more(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// Command Retry Delay index (0: retry at once; 1..=3 select CRDT1..3 from Identify
    /// Controller, in units of 100 ms).
    pub const fn crd(self) -> u8 {
        ((self.0 >> 12) & 0x3) as u8
    }
    /// Which end-to-end protection check failed, for a Media and Data Integrity status of one
    /// (SCT 2, SC 0x82..=0x84).
    pub const fn protection(self) -> Option<ProtectionCheck> {
        match self.code() {
            0x282 => Some(ProtectionCheck::Guard),
            0x283 => Some(ProtectionCheck::ApplicationTag),
            0x284 => Some(ProtectionCheck::ReferenceTag),
            _ => None,
        }
    }
    /// Which zoned-namespace rule the device refused an operation for, for a zoned command
    /// set status (SCT 1, SC 0xB8..=0xBF).
    pub const fn zone(self) -> Option<ZoneError> {
        match self.code() {
            0x1B8 => Some(ZoneError::Boundary),
            0x1B9 => Some(ZoneError::Full),
            0x1BA => Some(ZoneError::ReadOnly),
            0x1BB => Some(ZoneError::Offline),
            0x1BC => Some(ZoneError::InvalidWrite),
            0x1BD => Some(ZoneError::TooManyActive),
            0x1BE => Some(ZoneError::TooManyOpen),
            0x1BF => Some(ZoneError::InvalidTransition),
            _ => None,
        }
    }
}

/// A zoned-namespace rule the device refused an operation for (NVMe ZNS command set 1.1,
/// Figure 25: command specific statuses 0xB8..=0xBF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZoneError {
    /// Zone Boundary Error: the operation crosses the end of a zone (or its capacity).
    Boundary,
    /// Zone Is Full: no writable capacity left in the zone.
    Full,
    /// Zone Is Read Only.
    ReadOnly,
    /// Zone Is Offline.
    Offline,
    /// Zone Invalid Write: a write not at the zone's write pointer.
    InvalidWrite,
    /// Too Many Active Zones (the namespace's MAR).
    TooManyActive,
    /// Too Many Open Zones (the namespace's MOR).
    TooManyOpen,
    /// Invalid Zone State Transition (for example finishing or closing an empty zone).
    InvalidTransition,
}

/// An end-to-end protection check the device failed an operation on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ProtectionCheck {
    /// The guard (CRC of the data) did not match.
    Guard,
    /// The application tag did not match.
    ApplicationTag,
    /// The reference tag did not match (types 1 and 2: the LBA).
    ReferenceTag,
}

/// Why an accepted operation failed.
///
/// The completion that carries an `IoError` is also what hands the operation's buffer back to
/// its owner: a queue reports it only once the device is done with the buffer (it completed the
/// command, an abort of it was confirmed, or a reset or queue deletion quiesced it). A command
/// that merely ran past its timeout is announced through [`BlockQueue::pop_timed_out`] instead,
/// and its buffer stays the device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IoError {
    /// The device did not complete the operation in time, and it was then quiesced (controller
    /// reset or queue deletion): the device no longer owns the buffer.
    Timeout,
    /// The operation was aborted (by an abort request or a queue deletion).
    Aborted,
    /// The device was reset and the operation could not be resubmitted.
    DeviceReset,
    /// Unrecoverable media error (read or write fault, integrity check failure).
    Media {
        /// The device's status, DNR and More bits included.
        status: DevStatus,
    },
    /// The device rejected the LBA range.
    OutOfRange,
    /// The device rejected the command as invalid (opcode, field, namespace).
    Invalid,
    /// The device reports the namespace or medium as write-protected.
    WriteProtected,
    /// The device reported success with a result that cannot be true: a zone append whose
    /// returned LBA lies outside the zone or the namespace, or does not leave room for the
    /// blocks written. Where the data went is unknown; the caller must not trust the zone's
    /// contents until it has read its state back.
    BadResult,
    /// Any other device status (also an abort status the device marked Do Not Retry).
    Device {
        /// The device's status, DNR and More bits included (`status.code()` is `SCT << 8 | SC`).
        status: DevStatus,
    },
    /// The device is gone (surprise removal: its registers read all ones). It can no longer
    /// DMA, so the buffer is the owner's again; the outcome on the media is unknown.
    Removed,
}

impl IoError {
    /// The device status behind the error, where one was kept.
    pub const fn status(&self) -> Option<DevStatus> {
        match *self {
            IoError::Media { status } | IoError::Device { status } => Some(status),
            _ => None,
        }
    }

    /// The end-to-end protection check the device failed, if that is what this is.
    pub const fn protection(&self) -> Option<ProtectionCheck> {
        match self.status() {
            Some(s) => s.protection(),
            None => None,
        }
    }

    /// The zoned-namespace rule the device refused the operation for, if that is what this is.
    pub const fn zone(&self) -> Option<ZoneError> {
        match self.status() {
            Some(s) => s.zone(),
            None => None,
        }
    }

    /// `true` when the device marked the status Do Not Retry.
    pub const fn dnr(&self) -> bool {
        match self.status() {
            Some(s) => s.dnr(),
            None => false,
        }
    }
}

/// A command that ran past its queue's timeout while the device still owns it. **Not a
/// completion**: the tag stays in flight and its buffer stays the device's until the tag is
/// reported through [`BlockQueue::poll`] (late completion with the device's status, a confirmed
/// abort, or a reset that quiesced it). Read events soon after the `poll` that produced them:
/// one read after the tag has completed (late) describes a tag that may be in use again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TimedOut {
    /// The tag the operation was submitted with.
    pub tag: u32,
}

/// Receives the finished tags of [`BlockQueue::poll_with`]. Any
/// `FnMut(u32, Result<(), IoError>)` is one; a type of its own can mark [`OnDone::done`]
/// `#[inline(always)]`, which a closure cannot, so that its work is inlined into the queue's
/// reaping loop.
pub trait OnDone {
    /// `tag` finished with `result`.
    fn done(&mut self, tag: u32, result: Result<(), IoError>);
}

impl<F: FnMut(u32, Result<(), IoError>) + ?Sized> OnDone for F {
    #[inline(always)]
    fn done(&mut self, tag: u32, result: Result<(), IoError>) {
        self(tag, result)
    }
}

/// A polled, tag-based queue pair on a block device.
///
/// Typical loop: several [`submit`](Self::submit)s, one [`flush_submissions`](Self::flush_submissions)
/// (one doorbell for the burst), then [`poll`](Self::poll) until the tags come back. `poll` also
/// flushes pending submissions, so forgetting `flush_submissions` delays work but never loses it.
pub trait BlockQueue {
    /// Queues `op` under `tag`. Does not notify the device. On `Err`, nothing was queued.
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError>;
    /// Tells the device about everything queued since the last flush (one doorbell write), and
    /// does nothing when nothing was queued: callers may call it on every pass.
    fn flush_submissions(&mut self);
    /// Reaps up to `max` device completions and reports finished tags through `on_done`, each
    /// accepted tag exactly once. Returns how many tags were reported.
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize;
    /// [`poll`](Self::poll) with a receiver known at compile time: a queue that overrides it
    /// runs `on_done` inline in its reaping loop instead of through an indirect call per
    /// completion (under emulation, each call and its return cost a translated-block lookup).
    /// Same contract as `poll`; the default simply calls it.
    #[inline]
    fn poll_with<D: OnDone>(&mut self, max: usize, on_done: &mut D) -> usize
    where
        Self: Sized,
    {
        self.poll(max, &mut |tag, result| on_done.done(tag, result))
    }
    /// Whether [`poll`](Self::poll) has anything to do now: a completion to reap, a result
    /// to report, a flush or a timeout scan due. A hint that reaps and reports nothing (a
    /// queue may count it as one of its timeout checks), for callers that wrap `poll` in
    /// costlier work (a critical section, say) and would skip it when idle; `true` when
    /// unsure, which is always correct. Once it says `true`, the next `poll` does the work.
    fn poll_due(&self) -> bool {
        true
    }
    /// The next timeout event, oldest first: a tag whose command ran past the queue's timeout
    /// and that the device still owns (see [`TimedOut`]). Each timed-out tag is announced once,
    /// by the `poll` that noticed it; a queue keeps at least its depth of events and drops the
    /// oldest beyond that. A queue without timeouts keeps the default (none).
    fn pop_timed_out(&mut self) -> Option<TimedOut> {
        None
    }
    /// How long the device asks the host to wait before retrying a command that failed with
    /// `status`, in microseconds (NVMe: the status's CRD selects CRDT1..3 from Identify
    /// Controller, 100 ms units; 0 for CRD = 0). A retry policy waits at least this long.
    fn retry_delay_us(&self, status: DevStatus) -> u64 {
        let _ = status;
        0
    }
    /// How many device commands the queue can hold at once.
    fn depth(&self) -> usize;
    /// Tags accepted and not yet reported.
    fn in_flight(&self) -> usize;
    /// Logical block size of namespace `ns` in bytes, if it exists.
    fn block_size(&self, ns: NsId) -> Option<u32>;
    /// Number of logical blocks of namespace `ns`, if it exists.
    fn num_blocks(&self, ns: NsId) -> Option<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Media and Data Integrity statuses 0x82..=0x84 name the protection check; others none.
    #[test]
    fn protection_checks_decoded() {
        let st = |sct: u16, sc: u16| DevStatus::from_field(sc << 1 | sct << 9 | 1 << 15);
        assert_eq!(st(2, 0x82).protection(), Some(ProtectionCheck::Guard));
        assert_eq!(
            st(2, 0x83).protection(),
            Some(ProtectionCheck::ApplicationTag)
        );
        assert_eq!(
            st(2, 0x84).protection(),
            Some(ProtectionCheck::ReferenceTag)
        );
        assert_eq!(st(2, 0x81).protection(), None);
        assert_eq!(st(0, 0x82).protection(), None);
        let e = IoError::Media {
            status: st(2, 0x82),
        };
        assert_eq!(e.protection(), Some(ProtectionCheck::Guard));
        assert_eq!(IoError::Timeout.protection(), None);
    }

    /// Every zoned command set status decodes to its rule; neighbours and other types do not.
    #[test]
    fn zone_errors_decoded() {
        let st = |sct: u16, sc: u16| DevStatus::from_field(sc << 1 | sct << 9 | 1 << 15);
        let want = [
            ZoneError::Boundary,
            ZoneError::Full,
            ZoneError::ReadOnly,
            ZoneError::Offline,
            ZoneError::InvalidWrite,
            ZoneError::TooManyActive,
            ZoneError::TooManyOpen,
            ZoneError::InvalidTransition,
        ];
        for (i, w) in want.iter().enumerate() {
            let e = IoError::Device {
                status: st(1, 0xB8 + i as u16),
            };
            assert_eq!(e.zone(), Some(*w), "sc {:#x}", 0xB8 + i);
        }
        assert_eq!(st(1, 0xB7).zone(), None);
        assert_eq!(st(1, 0xC0).zone(), None);
        assert_eq!(st(0, 0xB9).zone(), None);
        assert_eq!(IoError::BadResult.zone(), None);
    }

    #[test]
    fn bufref_bounds_and_ops() {
        let b = BufRef::from_bus(0x1000, 512);
        assert_eq!((b.bus_addr(), b.len(), b.is_empty()), (0x1000, 512, false));
        let op = BlockOp::Read {
            ns: 3,
            lba: 0,
            blocks: 1,
            buf: b,
        };
        assert_eq!(op.ns(), 3);
        assert_eq!(BlockOp::Flush { ns: 9 }.ns(), 9);
    }
}
