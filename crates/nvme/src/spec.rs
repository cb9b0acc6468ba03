//! NVMe 1.4 data structures and register layout, with compile-time layout checks.
//!
//! All multi-byte fields are little-endian on the wire; Keel only targets little-endian CPUs
//! (checked below), so native integers are used for queue entries.

use bitfield_struct::{bitenum, bitfield};
use core::mem::{offset_of, size_of};
use static_assertions::const_assert_eq;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[cfg(target_endian = "big")]
compile_error!("keel-nvme assumes a little-endian CPU (NVMe structures are little-endian)");

/// Memory page size the driver programs (CC.MPS = 0): 4 KiB.
pub const PAGE_SIZE: usize = 4096;
/// log2 of the SQ entry size (CC.IOSQES).
pub const SQES_LOG2: u32 = 6;
/// log2 of the CQ entry size (CC.IOCQES).
pub const CQES_LOG2: u32 = 4;

/// Controller register offsets in BAR0 (NVMe 1.4, 3.1). The registers' contents are the typed
/// [`Cap`], [`Vs`], [`Cc`], [`Csts`] and [`Aqa`].
pub mod reg {
    /// Controller Capabilities ([`Cap`](super::Cap), 64 bits).
    pub const CAP: usize = 0x00;
    /// Version ([`Vs`](super::Vs)).
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0C;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration ([`Cc`](super::Cc)).
    pub const CC: usize = 0x14;
    /// Controller Status ([`Csts`](super::Csts)).
    pub const CSTS: usize = 0x1C;
    /// NVM Subsystem Reset.
    pub const NSSR: usize = 0x20;
    /// Admin Queue Attributes ([`Aqa`](super::Aqa)).
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address (64 bits).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address (64 bits).
    pub const ACQ: usize = 0x30;
    /// Controller Ready Timeouts (NVMe 2.0; valid when CAP.CRWMS or CAP.CRIMS is set):
    /// CRWMT in bits 15:0 and CRIMT in bits 31:16, both in 500 ms units.
    pub const CRTO: usize = 0x68;
    /// First doorbell (admin SQ tail).
    pub const DOORBELL_BASE: usize = 0x1000;
}

// The controller registers as bitfield types (`bitfield-struct`): each field is named as in the
// specification, with a getter, and (for registers the host writes) `with_`/`set_` methods.
// Only bring-up, reset, shutdown and the fatal-status check touch them; the completion path
// decodes CQ entries by hand (see `CqEntry`, `IoQueuePair::handle`).

/// CAP, Controller Capabilities (offset 0x00, NVMe 1.4 Figure 69). Read-only.
#[bitfield(u64, defmt = cfg(feature = "defmt"))]
#[derive(PartialEq, Eq)]
pub struct Cap {
    /// MQES: maximum entries per I/O queue, 0-based (see [`Cap::max_queue_entries`]).
    #[bits(16, access = RO)]
    pub mqes: u16,
    /// CQR: I/O queues must be physically contiguous.
    #[bits(1, access = RO)]
    pub cqr: bool,
    /// AMS: optional arbitration mechanisms (bit 0 weighted round robin, bit 1 vendor).
    #[bits(2, access = RO)]
    pub ams: u8,
    #[bits(5)]
    __rsvd19: u8,
    /// TO: worst-case time for CSTS.RDY to change, in 500 ms units (see [`Cap::timeout_ms`]).
    #[bits(8, access = RO)]
    pub to: u8,
    /// DSTRD: doorbell stride, `4 << DSTRD` bytes (see [`Cap::doorbell_stride`]).
    #[bits(4, access = RO)]
    pub dstrd: u8,
    /// NSSRS: NVM subsystem reset supported.
    #[bits(1, access = RO)]
    pub nssrs: bool,
    /// CSS: command sets supported (bit 0 NVM, bit 6 one or more I/O command sets, bit 7
    /// admin only).
    #[bits(8, access = RO)]
    pub css: u8,
    /// BPS: boot partitions supported.
    #[bits(1, access = RO)]
    pub bps: bool,
    #[bits(2)]
    __rsvd46: u8,
    /// MPSMIN: minimum memory page size, `2 ^ (12 + MPSMIN)` bytes.
    #[bits(4, access = RO)]
    pub mpsmin: u8,
    /// MPSMAX: maximum memory page size, `2 ^ (12 + MPSMAX)` bytes.
    #[bits(4, access = RO)]
    pub mpsmax: u8,
    /// PMRS: persistent memory region supported.
    #[bits(1, access = RO)]
    pub pmrs: bool,
    /// CMBS: controller memory buffer supported.
    #[bits(1, access = RO)]
    pub cmbs: bool,
    /// NSSS: NVM subsystem shutdown supported.
    #[bits(1, access = RO)]
    pub nsss: bool,
    /// CRWMS: Controller Ready With Media Support (the CRTO register's CRWMT is valid).
    #[bits(1, access = RO)]
    pub crwms: bool,
    /// CRIMS: Controller Ready Independent of Media Support (CRTO's CRIMT is valid).
    #[bits(1, access = RO)]
    pub crims: bool,
    #[bits(3)]
    __rsvd61: u8,
}

impl Cap {
    /// Maximum queue entries supported, 1-based (MQES is 0-based).
    pub fn max_queue_entries(&self) -> u32 {
        self.mqes() as u32 + 1
    }
    /// Worst-case time to become ready, in milliseconds (CAP.TO is in 500 ms units).
    pub fn timeout_ms(&self) -> u64 {
        self.to() as u64 * 500
    }
    /// Doorbell stride in bytes: `4 << DSTRD`.
    pub fn doorbell_stride(&self) -> usize {
        4usize << self.dstrd()
    }
    /// NVM command set supported (CSS bit 0).
    pub fn css_nvm(&self) -> bool {
        self.css() & 1 != 0
    }
    /// One or more I/O command sets supported (CSS bit 6): CC.CSS = [`Cc::CSS_IO_SETS`]
    /// enables the sets of the selected I/O Command Set Profile (zoned namespaces among them).
    pub fn css_io_sets(&self) -> bool {
        self.css() & (1 << 6) != 0
    }
    /// Minimum memory page size in bytes.
    pub fn mps_min(&self) -> usize {
        1usize << (12 + self.mpsmin())
    }
    /// Maximum memory page size in bytes.
    pub fn mps_max(&self) -> usize {
        1usize << (12 + self.mpsmax())
    }
}

/// VS, Version (offset 0x08, NVMe 1.4 Figure 70). Read-only.
#[bitfield(u32, defmt = cfg(feature = "defmt"))]
#[derive(PartialEq, Eq)]
pub struct Vs {
    /// TER: tertiary version.
    #[bits(8, access = RO)]
    pub ter: u8,
    /// MNR: minor version.
    #[bits(8, access = RO)]
    pub mnr: u8,
    /// MJR: major version.
    #[bits(16, access = RO)]
    pub mjr: u16,
}

impl Vs {
    /// `true` when the controller implements version `major.minor` or later.
    pub fn at_least(&self, major: u16, minor: u8) -> bool {
        (self.mjr(), self.mnr()) >= (major, minor)
    }
}

/// CC.SHN, the shutdown notification the host writes.
#[bitenum]
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Shn {
    /// No notification; no effect.
    #[fallback]
    None = 0,
    /// Normal shutdown notification.
    Normal = 1,
    /// Abrupt shutdown notification.
    Abrupt = 2,
    /// Reserved.
    Reserved = 3,
}

/// CC, Controller Configuration (offset 0x14, NVMe 1.4 Figure 73).
#[bitfield(u32, defmt = cfg(feature = "defmt"))]
#[derive(PartialEq, Eq)]
pub struct Cc {
    /// EN: enable; 1 -> 0 resets the controller.
    #[bits(1)]
    pub en: bool,
    #[bits(3)]
    __rsvd1: u8,
    /// CSS: I/O command set selected ([`Cc::CSS_NVM`]).
    #[bits(3)]
    pub css: u8,
    /// MPS: memory page size, `2 ^ (12 + MPS)` bytes.
    #[bits(4)]
    pub mps: u8,
    /// AMS: arbitration mechanism selected ([`Cc::AMS_ROUND_ROBIN`]).
    #[bits(3)]
    pub ams: u8,
    /// SHN: shutdown notification.
    #[bits(2)]
    pub shn: Shn,
    /// IOSQES: I/O submission queue entry size, log2 bytes.
    #[bits(4)]
    pub iosqes: u8,
    /// IOCQES: I/O completion queue entry size, log2 bytes.
    #[bits(4)]
    pub iocqes: u8,
    #[bits(8)]
    __rsvd24: u8,
}

impl Cc {
    /// CC.CSS: the NVM command set.
    pub const CSS_NVM: u8 = 0;
    /// CC.CSS: all I/O command sets the controller supports (those of the I/O Command Set
    /// Profile selected with Set Features 0x19; needs CAP.CSS bit 6).
    pub const CSS_IO_SETS: u8 = 6;
    /// CC.AMS: round robin.
    pub const AMS_ROUND_ROBIN: u8 = 0;
}

/// CSTS.SHST, the shutdown status the controller reports.
#[bitenum]
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Shst {
    /// Normal operation, no shutdown requested.
    #[fallback]
    Normal = 0,
    /// Shutdown processing occurring.
    Occurring = 1,
    /// Shutdown processing complete.
    Complete = 2,
    /// Reserved.
    Reserved = 3,
}

/// CSTS, Controller Status (offset 0x1C, NVMe 1.4 Figure 74). Read-only here (NSSRO is
/// write-1-to-clear and not used by Keel).
#[bitfield(u32, defmt = cfg(feature = "defmt"))]
#[derive(PartialEq, Eq)]
pub struct Csts {
    /// RDY: ready to process commands.
    #[bits(1, access = RO)]
    pub rdy: bool,
    /// CFS: controller fatal status.
    #[bits(1, access = RO)]
    pub cfs: bool,
    /// SHST: shutdown status.
    #[bits(2, access = RO)]
    pub shst: Shst,
    /// NSSRO: an NVM subsystem reset occurred.
    #[bits(1, access = RO)]
    pub nssro: bool,
    /// PP: processing paused.
    #[bits(1, access = RO)]
    pub pp: bool,
    #[bits(26)]
    __rsvd6: u32,
}

impl Csts {
    /// All ones: reads of a device that fell off the bus return this.
    pub fn device_gone(&self) -> bool {
        self.0 == u32::MAX
    }
    /// Fatal: CFS set, or the device is gone.
    pub fn fatal(&self) -> bool {
        self.device_gone() || self.cfs()
    }
}

/// AQA, Admin Queue Attributes (offset 0x24, NVMe 1.4 Figure 76).
#[bitfield(u32, defmt = cfg(feature = "defmt"))]
#[derive(PartialEq, Eq)]
pub struct Aqa {
    /// ASQS: admin submission queue size, 0-based entries.
    #[bits(12)]
    pub asqs: u16,
    #[bits(4)]
    __rsvd12: u8,
    /// ACQS: admin completion queue size, 0-based entries.
    #[bits(12)]
    pub acqs: u16,
    #[bits(4)]
    __rsvd28: u8,
}

/// Offset of the SQ `qid` tail doorbell.
pub fn sq_doorbell(qid: u16, stride: usize) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize) * stride
}

/// Offset of the CQ `qid` head doorbell.
pub fn cq_doorbell(qid: u16, stride: usize) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize + 1) * stride
}

/// Submission queue entry (64 bytes, NVMe 1.4 4.2).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SqEntry {
    /// Opcode (7:0), FUSE (9:8), PSDT (15:14, 0 = PRPs), CID (31:16).
    pub cdw0: u32,
    /// Namespace ID (0 for most admin commands).
    pub nsid: u32,
    /// Command dword 2 (command specific).
    pub cdw2: u32,
    /// Command dword 3 (command specific).
    pub cdw3: u32,
    /// Metadata pointer (unused by Keel).
    pub mptr: u64,
    /// PRP entry 1: the first data page (or the whole buffer).
    pub prp1: u64,
    /// PRP entry 2: the second page, or the bus address of a PRP list.
    pub prp2: u64,
    /// Command dword 10 (for reads and writes: SLBA bits 31:0).
    pub cdw10: u32,
    /// Command dword 11 (for reads and writes: SLBA bits 63:32).
    pub cdw11: u32,
    /// Command dword 12 (for reads and writes: NLB, 0-based, in bits 15:0).
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}
const_assert_eq!(size_of::<SqEntry>(), 64);
const_assert_eq!(offset_of!(SqEntry, prp1), 24);
const_assert_eq!(offset_of!(SqEntry, cdw10), 40);
const_assert_eq!(offset_of!(SqEntry, cdw15), 60);

impl SqEntry {
    /// An entry with `opcode`, command id `cid` and `nsid`; everything else zero.
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Self {
        Self {
            cdw0: opcode as u32 | ((cid as u32) << 16),
            nsid,
            ..Self::default()
        }
    }
    /// A read or write (`opcode`) of `nlb` blocks (at least 1) at `slba`, data at PRP1/PRP2.
    #[inline]
    pub fn read_write(
        opcode: u8,
        cid: u16,
        nsid: u32,
        slba: u64,
        nlb: u32,
        prp: (u64, u64),
    ) -> Self {
        Self {
            prp1: prp.0,
            prp2: prp.1,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: nlb - 1,
            ..Self::new(opcode, cid, nsid)
        }
    }
    /// The entry as its eight little-endian quadwords, for a store from registers
    /// (`DmaRegion::write_u64s_le`).
    #[inline(always)]
    pub fn to_qwords(&self) -> [u64; 8] {
        let pair = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        [
            pair(self.cdw0, self.nsid),
            pair(self.cdw2, self.cdw3),
            self.mptr,
            self.prp1,
            self.prp2,
            pair(self.cdw10, self.cdw11),
            pair(self.cdw12, self.cdw13),
            pair(self.cdw14, self.cdw15),
        ]
    }
    /// The opcode (CDW0 bits 7:0).
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// The command identifier (CDW0 bits 31:16).
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xFFFF) | ((cid as u32) << 16);
    }
}

/// Completion queue entry (16 bytes, NVMe 1.4 4.6).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CqEntry {
    /// Command specific result.
    pub dw0: u32,
    /// Dword 1 (reserved or command specific).
    pub dw1: u32,
    /// SQ head pointer: how far the controller has consumed the submission queue.
    pub sq_head: u16,
    /// The submission queue the command came from.
    pub sq_id: u16,
    /// The command identifier of the completed command.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (15:1).
    pub status: u16,
}
const_assert_eq!(size_of::<CqEntry>(), 16);
const_assert_eq!(offset_of!(CqEntry, sq_head), 8);
const_assert_eq!(offset_of!(CqEntry, cid), 12);
/// Byte offset of the status/phase word inside a CQ entry.
pub const CQE_STATUS_OFFSET: usize = 14;
const_assert_eq!(offset_of!(CqEntry, status), CQE_STATUS_OFFSET);
/// Byte offset of the command identifier in a completion entry.
pub const CQE_CID_OFFSET: usize = 12;
const_assert_eq!(offset_of!(CqEntry, cid), CQE_CID_OFFSET);

impl CqEntry {
    /// The entry from its two little-endian quadwords (bytes 0..8 and 8..16), as read with
    /// two loads: built in registers, not through a copy in memory.
    #[inline(always)]
    pub fn from_qwords(lo: u64, hi: u64) -> Self {
        Self {
            dw0: lo as u32,
            dw1: (lo >> 32) as u32,
            sq_head: hi as u16,
            sq_id: (hi >> 16) as u16,
            cid: (hi >> 32) as u16,
            status: (hi >> 48) as u16,
        }
    }
    /// The phase tag (status bit 0).
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }
    /// The status field, decoded (phase bit ignored).
    pub fn status(&self) -> Status {
        Status::from_field(self.status)
    }
}

/// Admin opcodes.
pub mod admin_op {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Doorbell Buffer Config (shadow doorbells).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7C;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Namespace Attachment.
    pub const NS_ATTACHMENT: u8 = 0x15;
}

/// NVM command set opcodes.
pub mod io_op {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate).
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Zone Management Send (zoned command set): close, finish, open, reset, offline.
    pub const ZONE_MGMT_SEND: u8 = 0x79;
    /// Zone Management Receive (zoned command set): report zones.
    pub const ZONE_MGMT_RECV: u8 = 0x7A;
    /// Zone Append (zoned command set): write at the zone's write pointer, the LBA written
    /// returned in completion DW0/DW1.
    pub const ZONE_APPEND: u8 = 0x7D;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace (for one NSID).
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u32 = 0x02;
    /// Namespace Identification Descriptor list (for one NSID; NVMe 1.3+).
    pub const NS_DESCRIPTORS: u32 = 0x03;
    /// I/O command set specific Identify Namespace (CSI in CDW11 31:24; zoned: ZSZE, MAR, MOR).
    pub const CS_NAMESPACE: u32 = 0x05;
    /// I/O command set specific Identify Controller (CSI in CDW11 31:24; zoned: ZASL).
    pub const CS_CONTROLLER: u32 = 0x06;
    /// I/O Command Set data structure: 512 command set vectors of 8 bytes (bit n = CSI n).
    pub const IO_COMMAND_SETS: u32 = 0x1C;
}

/// Namespace Identification Descriptor types (NIDT).
pub mod nidt {
    /// Command Set Identifier (CSI), one byte: 0 = NVM, 2 = Zoned Namespace.
    pub const CSI: u8 = 0x04;
}

/// I/O command set identifiers (CSI).
pub mod csi {
    /// The NVM command set.
    pub const NVM: u8 = 0x00;
    /// The Zoned Namespace command set.
    pub const ZONED: u8 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues (I/O SQs and CQs, 0-based, in CDW11).
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
    /// Host Behavior Support (a 512-byte data structure; byte 0 = ACRE, Advanced Command
    /// Retry Enable: the controller may then ask for retry delays through a completion's CRD).
    pub const HOST_BEHAVIOR_SUPPORT: u32 = 0x16;
    /// I/O Command Set Profile (CDW11 8:0: the index of the command set vector to use).
    pub const IO_COMMAND_SET_PROFILE: u32 = 0x19;
    /// Temperature Threshold (TMPTH 15:0 in kelvin, TMPSEL 19:16, THSEL 21:20: 0 over, 1
    /// under).
    pub const TEMPERATURE_THRESHOLD: u32 = 0x04;
    /// Asynchronous Event Configuration (SMART/health critical warnings 7:0, notices 8 up).
    pub const ASYNC_EVENT_CONFIG: u32 = 0x0B;
}

/// Log page identifiers (Get Log Page CDW10 bits 7:0).
pub mod log_page {
    /// Error Information (64 bytes per entry, ELPE + 1 entries).
    pub const ERROR_INFO: u8 = 0x01;
    /// SMART / Health Information (512 bytes).
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List (1024 NSIDs).
    pub const CHANGED_NS_LIST: u8 = 0x04;
}

/// Identify Controller data structure (4096 bytes, NVMe 1.4 Figure 247); fields Keel uses.
#[repr(C)]
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: U16,
    /// PCI subsystem vendor ID.
    pub ssvid: U16,
    /// Serial number (ASCII, space padded).
    pub sn: [u8; 20],
    /// Model number (ASCII, space padded).
    pub mn: [u8; 40],
    /// Firmware revision (ASCII, space padded).
    pub fr: [u8; 8],
    /// Recommended arbitration burst.
    pub rab: u8,
    /// IEEE OUI identifier.
    pub ieee: [u8; 3],
    /// Controller multi-path I/O and namespace sharing capabilities.
    pub cmic: u8,
    /// Maximum data transfer size, 2^n units of CAP.MPSMIN; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: U16,
    /// Version (same layout as the VS register, [`Vs`]).
    pub ver: U32,
    _rsvd84: [u8; 50],
    /// Command Retry Delay Times 1..3 (offset 134), in units of 100 ms: what a completion's
    /// CRD field 1..3 asks the host to wait before retrying.
    pub crdt: [U16; 3],
    _rsvd140: [u8; 116],
    /// Optional admin command support; bit 8 = Doorbell Buffer Config.
    pub oacs: U16,
    /// Abort command limit (0-based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0-based: AERL + 1 may be outstanding).
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error Log Page Entries (0-based: ELPE + 1 entries).
    pub elpe: u8,
    _rsvd263: [u8; 249],
    /// SQ entry size: required (3:0) and maximum (7:4), log2 bytes.
    pub sqes: u8,
    /// CQ entry size: required (3:0) and maximum (7:4), log2 bytes.
    pub cqes: u8,
    /// Maximum outstanding commands (0 = not reported).
    pub maxcmd: U16,
    /// Number of namespaces (highest valid NSID).
    pub nn: U32,
    /// Optional NVM command support; bit 2 = DSM, bit 3 = Write Zeroes.
    pub oncs: U16,
    /// Fused operation support.
    pub fuses: U16,
    /// Format NVM attributes.
    pub fna: u8,
    /// Volatile write cache present (bit 0).
    pub vwc: u8,
    _rsvd526: [u8; 3570],
}
const_assert_eq!(size_of::<IdentifyController>(), 4096);
const_assert_eq!(offset_of!(IdentifyController, sn), 4);
const_assert_eq!(offset_of!(IdentifyController, mn), 24);
const_assert_eq!(offset_of!(IdentifyController, fr), 64);
const_assert_eq!(offset_of!(IdentifyController, mdts), 77);
const_assert_eq!(offset_of!(IdentifyController, ver), 80);
const_assert_eq!(offset_of!(IdentifyController, oacs), 256);
const_assert_eq!(offset_of!(IdentifyController, aerl), 259);
const_assert_eq!(offset_of!(IdentifyController, elpe), 262);
const_assert_eq!(offset_of!(IdentifyController, sqes), 512);
const_assert_eq!(offset_of!(IdentifyController, nn), 516);
const_assert_eq!(offset_of!(IdentifyController, oncs), 520);
const_assert_eq!(offset_of!(IdentifyController, vwc), 525);

/// OACS bit: Namespace Management and Attachment supported.
pub const OACS_NS_MANAGEMENT: u16 = 1 << 3;
/// OACS bit: Doorbell Buffer Config supported.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
/// ONCS bit: Dataset Management supported.
pub const ONCS_DSM: u16 = 1 << 2;
/// ONCS bit: Write Zeroes supported.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// LBA Format data structure (4 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct LbaFormat {
    /// Metadata bytes per LBA.
    pub ms: U16,
    /// LBA data size, log2 bytes.
    pub lbads: u8,
    /// Relative performance (bits 1:0).
    pub rp: u8,
}
const_assert_eq!(size_of::<LbaFormat>(), 4);

/// Identify Namespace data structure (4096 bytes, NVMe 1.4 Figure 249); fields Keel uses.
#[repr(C)]
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: U64,
    /// Namespace capacity in logical blocks.
    pub ncap: U64,
    /// Namespace utilization in logical blocks.
    pub nuse: U64,
    /// Namespace features.
    pub nsfeat: u8,
    /// Number of LBA formats, 0-based.
    pub nlbaf: u8,
    /// Formatted LBA size: index (3:0, and 6:5 as upper bits), extended-LBA metadata (bit 4).
    pub flbas: u8,
    /// Metadata capabilities.
    pub mc: u8,
    /// End-to-end data protection capabilities.
    pub dpc: u8,
    /// End-to-end data protection type settings.
    pub dps: u8,
    _rsvd30: [u8; 98],
    /// The LBA formats (NLBAF + 1 of them valid).
    pub lbaf: [LbaFormat; 64],
    _rsvd384: [u8; 3712],
}
const_assert_eq!(size_of::<IdentifyNamespace>(), 4096);
const_assert_eq!(offset_of!(IdentifyNamespace, nlbaf), 25);
const_assert_eq!(offset_of!(IdentifyNamespace, flbas), 26);
const_assert_eq!(offset_of!(IdentifyNamespace, lbaf), 128);

/// One Dataset Management range (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DsmRange {
    /// Context attributes (0: none).
    pub cattr: u32,
    /// Length in logical blocks (1-based).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}
const_assert_eq!(size_of::<DsmRange>(), 16);

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// A decoded completion status field (NVMe 1.4 4.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Status {
    /// Status Code Type.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Command Retry Delay index.
    pub crd: u8,
    /// More information in the error log.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

/// What a status means, for the codes Keel distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StatusKind {
    /// Successful completion.
    Success,
    /// Invalid command opcode.
    InvalidOpcode,
    /// Invalid field in command.
    InvalidField,
    /// Command ID conflict.
    CommandIdConflict,
    /// Data transfer error.
    DataTransferError,
    /// Commands aborted due to power loss notification.
    AbortedPowerLoss,
    /// Internal error.
    InternalError,
    /// Command abort requested.
    AbortRequested,
    /// Command aborted due to SQ deletion.
    AbortedSqDeletion,
    /// Invalid namespace or format.
    InvalidNamespace,
    /// LBA out of range.
    LbaOutOfRange,
    /// Capacity exceeded.
    CapacityExceeded,
    /// Namespace not ready.
    NamespaceNotReady,
    /// Invalid queue identifier (Create I/O queue).
    InvalidQueueId,
    /// Invalid queue size (Create I/O queue).
    InvalidQueueSize,
    /// Write fault (media).
    WriteFault,
    /// Unrecovered read error (media).
    UnrecoveredRead,
    /// End-to-end guard, application or reference tag check error, or compare failure.
    IntegrityError,
    /// Access denied (media).
    AccessDenied,
    /// Namespace or LBA range is write protected.
    WriteProtected,
    /// Command interrupted (retry).
    CommandInterrupted,
    /// Transient transport error.
    TransientTransport,
    /// Format in progress.
    FormatInProgress,
    /// Reservation conflict.
    ReservationConflict,
    /// Path-related status a retry may fix (internal path error, ANA transition, pathing errors).
    PathTransient,
    /// Path-related status a retry on this controller will not fix (ANA loss / inaccessible).
    PathError,
    /// Any other status.
    Other,
}

impl Status {
    /// Decodes the 16-bit status/phase word of a CQ entry (bit 0, the phase tag, is ignored).
    pub fn from_field(field: u16) -> Self {
        Self {
            sc: (field >> 1) as u8,
            sct: ((field >> 9) & 0x7) as u8,
            crd: ((field >> 12) & 0x3) as u8,
            more: field & (1 << 14) != 0,
            dnr: field & (1 << 15) != 0,
        }
    }

    /// Encodes back into a status field with phase 0 (for tests and models).
    pub fn to_field(&self) -> u16 {
        ((self.sc as u16) << 1)
            | ((self.sct as u16 & 7) << 9)
            | ((self.crd as u16 & 3) << 12)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    /// `true` for Successful Completion (SCT 0, SC 0).
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// `SCT << 8 | SC`.
    pub fn code(&self) -> u16 {
        ((self.sct as u16) << 8) | self.sc as u16
    }

    /// What the status means, for the codes Keel distinguishes.
    pub fn kind(&self) -> StatusKind {
        use StatusKind::*;
        match (self.sct, self.sc) {
            (sct::GENERIC, 0x00) => Success,
            (sct::GENERIC, 0x01) => InvalidOpcode,
            (sct::GENERIC, 0x02) => InvalidField,
            (sct::GENERIC, 0x03) => CommandIdConflict,
            (sct::GENERIC, 0x04) => DataTransferError,
            (sct::GENERIC, 0x05) => AbortedPowerLoss,
            (sct::GENERIC, 0x06) => InternalError,
            (sct::GENERIC, 0x07) => AbortRequested,
            (sct::GENERIC, 0x08) => AbortedSqDeletion,
            (sct::GENERIC, 0x0B) => InvalidNamespace,
            (sct::GENERIC, 0x20) => WriteProtected,
            (sct::GENERIC, 0x21) => CommandInterrupted,
            (sct::GENERIC, 0x22) => TransientTransport,
            (sct::GENERIC, 0x80) => LbaOutOfRange,
            (sct::GENERIC, 0x81) => CapacityExceeded,
            (sct::GENERIC, 0x82) => NamespaceNotReady,
            (sct::GENERIC, 0x83) => ReservationConflict,
            (sct::GENERIC, 0x84) => FormatInProgress,
            (sct::COMMAND_SPECIFIC, 0x01) => InvalidQueueId,
            (sct::COMMAND_SPECIFIC, 0x02) => InvalidQueueSize,
            (sct::COMMAND_SPECIFIC, 0x82) => WriteProtected, // write to read-only range
            (sct::MEDIA, 0x80) => WriteFault,
            (sct::MEDIA, 0x81) => UnrecoveredRead,
            (sct::MEDIA, 0x82..=0x85) => IntegrityError,
            (sct::MEDIA, 0x86) => AccessDenied,
            (sct::PATH, 0x00 | 0x03 | 0x60 | 0x70) => PathTransient,
            (sct::PATH, _) => PathError,
            _ => Other,
        }
    }

    /// Retry policy: only when the device allows it (DNR = 0) and the condition is transient.
    pub fn is_retryable(&self) -> bool {
        if self.dnr || self.is_success() {
            return false;
        }
        matches!(
            self.kind(),
            StatusKind::DataTransferError
                | StatusKind::AbortedPowerLoss
                | StatusKind::InternalError
                | StatusKind::NamespaceNotReady
                | StatusKind::CommandInterrupted
                | StatusKind::TransientTransport
                | StatusKind::FormatInProgress
                | StatusKind::PathTransient
        )
    }

    /// Maps the status onto the device-independent error of `keel-blockdev`. Media and
    /// unclassified statuses keep the whole status (DNR, More, CRD); an abort status the device
    /// marked Do Not Retry is reported as `Device` so the DNR bit is not lost.
    pub fn to_io_error(&self) -> keel_blockdev::IoError {
        use keel_blockdev::{DevStatus, IoError};
        let status = DevStatus::from_field(self.to_field());
        match self.kind() {
            StatusKind::AbortRequested
            | StatusKind::AbortedSqDeletion
            | StatusKind::AbortedPowerLoss
                if !self.dnr =>
            {
                IoError::Aborted
            }
            StatusKind::LbaOutOfRange | StatusKind::CapacityExceeded => IoError::OutOfRange,
            StatusKind::InvalidOpcode | StatusKind::InvalidField | StatusKind::InvalidNamespace => {
                IoError::Invalid
            }
            StatusKind::WriteFault | StatusKind::UnrecoveredRead | StatusKind::IntegrityError => {
                IoError::Media { status }
            }
            StatusKind::WriteProtected => IoError::WriteProtected,
            _ => IoError::Device { status },
        }
    }
}

/// The EventIdx rule for shadow doorbells (NVMe 1.4 7.13.1): write the MMIO doorbell only when
/// moving from `old` to `new` crossed the device's `event_idx`.
pub fn shadow_needs_mmio(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_and_policy() {
        let s = Status {
            sct: 0,
            sc: 0x06,
            crd: 0,
            more: false,
            dnr: false,
        };
        let f = s.to_field() | 1;
        assert_eq!(Status::from_field(f), s);
        assert!(s.is_retryable());
        let s2 = Status { dnr: true, ..s };
        assert!(!Status::from_field(s2.to_field()).is_retryable());
        let lba = Status {
            sct: 0,
            sc: 0x80,
            crd: 0,
            more: false,
            dnr: false,
        };
        assert_eq!(lba.kind(), StatusKind::LbaOutOfRange);
        assert!(!lba.is_retryable());
        assert_eq!(lba.to_io_error(), keel_blockdev::IoError::OutOfRange);
        let wp = Status {
            sct: 0,
            sc: 0x20,
            crd: 0,
            more: false,
            dnr: false,
        };
        assert_eq!(wp.to_io_error(), keel_blockdev::IoError::WriteProtected);
        assert!(!wp.is_retryable());
        let intr = Status {
            sct: 0,
            sc: 0x21,
            crd: 0,
            more: false,
            dnr: false,
        };
        assert!(intr.is_retryable());
        let ana_loss = Status {
            sct: 3,
            sc: 0x01,
            crd: 0,
            more: false,
            dnr: false,
        };
        assert!(!ana_loss.is_retryable());
        let media = Status {
            sct: 2,
            sc: 0x81,
            crd: 0,
            more: true,
            dnr: true,
        };
        assert_eq!(Status::from_field(media.to_field()), media);
        assert!(
            matches!(media.to_io_error(), keel_blockdev::IoError::Media { status } if status.code() == media.code())
        );
        let st = media
            .to_io_error()
            .status()
            .unwrap_or(keel_blockdev::DevStatus::from_field(0));
        assert!(st.dnr() && st.more() && media.to_io_error().dnr());
        let abort_dnr = Status {
            sct: 0,
            sc: 0x07,
            crd: 0,
            more: false,
            dnr: true,
        };
        assert!(
            abort_dnr.to_io_error().dnr(),
            "a DNR abort keeps its DNR bit"
        );
        let abort = Status {
            dnr: false,
            ..abort_dnr
        };
        assert_eq!(abort.to_io_error(), keel_blockdev::IoError::Aborted);
    }

    #[test]
    fn event_idx_rule() {
        // Device asked to be told once tail passes 5.
        assert!(shadow_needs_mmio(5, 7, 5));
        assert!(shadow_needs_mmio(5, 6, 5));
        assert!(!shadow_needs_mmio(5, 5, 4));
        // Device already asked at 2 and we were at 4: no notification needed.
        assert!(!shadow_needs_mmio(2, 7, 4));
        // Wrap-around.
        assert!(shadow_needs_mmio(0xFFFF, 1, 0xFFFE));
    }

    #[test]
    fn cap_decode() {
        // MQES 0x7FF, CQR, AMS 0b01, TO 0x14, DSTRD 2, NSSRS, CSS = NVM, MPSMIN 0, MPSMAX 4.
        let raw = 0x07FF | 1 << 16 | 1 << 17 | 0x14 << 24 | 2 << 32 | 1 << 36 | 1 << 37 | 4 << 52;
        let cap = Cap::from_bits(raw);
        assert_eq!(cap.mqes(), 0x7FF);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.cqr());
        assert_eq!(cap.ams(), 1);
        assert_eq!(cap.to(), 0x14);
        assert_eq!(cap.timeout_ms(), 0x14 * 500);
        assert_eq!(cap.dstrd(), 2);
        assert_eq!(cap.doorbell_stride(), 16);
        assert!(cap.nssrs());
        assert_eq!(cap.css(), 1);
        assert!(cap.css_nvm());
        assert!(!cap.bps());
        assert_eq!(cap.mps_min(), 4096);
        assert_eq!(cap.mps_max(), 64 * 1024);
        assert!(!cap.pmrs() && !cap.cmbs());
        assert_eq!(cap.into_bits(), raw);
        // Each single-bit field at its own bit, nothing else set.
        assert!(Cap::from_bits(1 << 56).pmrs());
        assert!(Cap::from_bits(1 << 57).cmbs());
        assert!(Cap::from_bits(1 << 45).bps());
        assert_eq!(Cap::from_bits(0xF << 48).mpsmin(), 0xF);
        assert_eq!(Cap::from_bits(0xF << 48).mpsmax(), 0);
        assert_eq!(sq_doorbell(1, 4), 0x1008);
        assert_eq!(cq_doorbell(1, 4), 0x100C);
    }

    #[test]
    fn vs_decode() {
        let vs = Vs::from_bits(0x0001_0400);
        assert_eq!((vs.mjr(), vs.mnr(), vs.ter()), (1, 4, 0));
        assert!(vs.at_least(1, 1) && vs.at_least(1, 4) && !vs.at_least(1, 5));
        assert!(!Vs::from_bits(0x0001_0000).at_least(1, 1));
        assert!(Vs::from_bits(0x0002_0000).at_least(1, 4));
        assert_eq!(Vs::from_bits(0x0001_0203).ter(), 3);
    }

    #[test]
    fn cc_encode() {
        let cc = Cc::new()
            .with_en(true)
            .with_css(Cc::CSS_NVM)
            .with_mps(0)
            .with_ams(Cc::AMS_ROUND_ROBIN)
            .with_iosqes(SQES_LOG2 as u8)
            .with_iocqes(CQES_LOG2 as u8);
        assert_eq!(cc.into_bits(), 0x0046_0001);
        assert_eq!(cc.with_shn(Shn::Normal).into_bits(), 0x0046_4001);
        assert_eq!(cc.with_shn(Shn::Abrupt).into_bits(), 0x0046_8001);
        assert_eq!(Cc::new().with_css(7).into_bits(), 7 << 4);
        assert_eq!(Cc::new().with_mps(0xF).into_bits(), 0xF << 7);
        assert_eq!(Cc::new().with_ams(7).into_bits(), 7 << 11);
        // Decoding keeps reserved bits (a read-modify-write preserves them).
        let read = Cc::from_bits(0xFF00_4001);
        assert!(read.en());
        assert_eq!(read.shn(), Shn::Normal);
        assert_eq!(read.with_en(false).into_bits(), 0xFF00_4000);
    }

    #[test]
    fn csts_decode() {
        let c = Csts::from_bits(0b1001);
        assert!(c.rdy() && !c.cfs());
        assert_eq!(c.shst(), Shst::Complete);
        assert!(!c.fatal());
        assert!(Csts::from_bits(0b10).fatal());
        assert_eq!(Csts::from_bits(0b0100).shst(), Shst::Occurring);
        assert!(Csts::from_bits(1 << 4).nssro());
        assert!(Csts::from_bits(1 << 5).pp());
        let gone = Csts::from_bits(u32::MAX);
        assert!(gone.device_gone() && gone.fatal());
    }

    #[test]
    fn aqa_encode() {
        let aqa = Aqa::new().with_asqs(31).with_acqs(15);
        assert_eq!(aqa.into_bits(), 0x000F_001F);
        assert_eq!(
            Aqa::new().with_asqs(0xFFF).with_acqs(0xFFF).into_bits(),
            0x0FFF_0FFF
        );
        let read = Aqa::from_bits(0xFFFF_FFFF);
        assert_eq!((read.asqs(), read.acqs()), (0xFFF, 0xFFF));
    }
}
