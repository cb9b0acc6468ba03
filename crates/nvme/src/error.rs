//! Driver errors.

use crate::spec::Status;
use keel_hal::DmaError;

/// Which bring-up or admin step an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Step {
    /// Disabling the controller (CC.EN = 0, waiting for CSTS.RDY = 0).
    Disable,
    /// Enabling the controller (CC.EN = 1, waiting for CSTS.RDY = 1).
    Enable,
    /// Normal shutdown (CC.SHN, waiting for CSTS.SHST = complete).
    Shutdown,
    /// The admin command with this opcode.
    AdminCommand(u8),
}

/// Identify data the driver refuses to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BadIdentify {
    /// FLBAS selects a format past NLBAF.
    LbaFormatIndex,
    /// LBA data size outside 512 B ..= 64 KiB.
    LbaSize,
    /// Extended LBAs (metadata interleaved with data) are not supported. (No longer returned:
    /// such a namespace is kept with [`NsFormat::ExtendedMetadata`](crate::NsFormat).)
    ExtendedMetadata,
    /// DPS names a protection type past 3, or protection without metadata to hold it.
    ProtectionType,
    /// NSZE is 0, or NCAP > NSZE, or the byte size overflows.
    NamespaceSize,
    /// An active NSID is 0, above NN, or the list is not increasing.
    NamespaceId,
    /// A zoned namespace's zone size (ZSZE) is 0 or larger than the namespace, or its zoned
    /// Identify data could not be read.
    ZoneSize,
    /// A zoned namespace's limits are absurd (more open than active zones allowed, or no zone
    /// append possible).
    ZoneLimits,
    /// Identify Controller says SQ/CQ entries of 64/16 bytes are not supported.
    EntrySizes,
    /// A controller list (Identify CNS 0x12 / 0x13) counts more IDs than it holds, or its IDs
    /// do not increase.
    ControllerList,
}

/// Errors from controller bring-up, admin commands and queue creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NvmeError {
    /// DMA memory could not be allocated or accessed.
    DmaOutOfBounds {
        /// Offset of the access in the region.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// The DMA allocator has no memory left.
    DmaExhausted,
    /// A DMA request the allocator refuses (size or alignment).
    DmaBadRequest,
    /// The controller did not reach the wanted state (or complete an admin command) in time.
    Timeout(Step),
    /// CSTS.CFS is set: the controller needs a reset.
    ControllerFatal,
    /// The controller lacks something Keel requires (NVM command set, 4 KiB pages, ...).
    Unsupported(&'static str),
    /// An admin command failed with this status.
    AdminStatus {
        /// The command's opcode.
        opcode: u8,
        /// The completion status.
        status: Status,
    },
    /// Identify data is absurd.
    BadIdentify(BadIdentify),
    /// An argument is out of range (queue id, depth, ...).
    InvalidArgument(&'static str),
    /// That I/O queue id is already in use.
    QueueInUse(u16),
    /// `reset` was not given every live queue pair.
    MissingQueuePair(u16),
    /// The queue pair still has commands in flight.
    QueueBusy,
    /// The controller is failed (reset did not succeed); create a new one.
    Failed,
    /// A log page the device returned is short or absurd.
    BadLog(crate::health::LogError),
    /// The controller refused a Namespace Attachment (or a controller list for a namespace it
    /// does not have), typed.
    Attach(crate::ctrl::AttachError),
}

impl From<DmaError> for NvmeError {
    fn from(e: DmaError) -> Self {
        match e {
            DmaError::OutOfBounds { offset, len, .. } => NvmeError::DmaOutOfBounds { offset, len },
            DmaError::Exhausted => NvmeError::DmaExhausted,
            DmaError::BadRequest => NvmeError::DmaBadRequest,
        }
    }
}
