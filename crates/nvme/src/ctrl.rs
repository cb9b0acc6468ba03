//! Controller bring-up, admin queue, queue creation, reset.

use core::sync::atomic::{fence, Ordering};

use bitvec::BitArr;
use heapless::Vec;
use keel_hal::{Clock, DmaAllocator, DmaError, DmaRegion, DmaRing, Mmio};

use crate::error::{BadIdentify, NvmeError, Step};

mod attach;
mod events;
use crate::qpair::{IoQueuePair, QpairParams};
use crate::spec::{
    self, admin_op, cns, feature, reg, Aqa, Cap, Cc, CqEntry, Csts, Shn, Shst, SqEntry, Vs,
    PAGE_SIZE,
};
use crate::zns::{parse_zoned, Zoned};
pub use attach::{AttachError, MAX_CONTROLLER_IDS};
pub use events::{
    AsyncEvent, EventStats, NsChange, NsState, AER_CID_BASE, MAX_AERS, MAX_NS_CHANGES,
};

/// Most namespaces a [`Controller`] keeps (extra active namespaces are ignored with a warning).
pub const MAX_NAMESPACES: usize = 64;
/// Highest I/O queue id Keel uses.
pub const MAX_IO_QUEUES: u16 = 64;
/// Largest I/O queue depth Keel creates (leaves at least 4 generation bits in each CID).
pub const MAX_IO_DEPTH: u16 = 4096;
const ADMIN_DEPTH: u16 = 32;

/// A set of I/O queue ids (bit `qid`; bit 0, the admin queue, unused).
type QidSet = BitArr!(for MAX_IO_QUEUES as usize + 1);

/// Driver configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Use the Doorbell Buffer Config (shadow doorbell) feature when the controller offers it.
    pub shadow_doorbells: bool,
    /// Per-command I/O timeout.
    pub io_timeout_ms: u64,
    /// Admin command timeout.
    pub admin_timeout_ms: u64,
    /// Retries of a command that failed with a transient status (DNR = 0), or that was in flight
    /// across a controller reset.
    pub max_retries: u8,
    /// PRP list pages preallocated per command slot (>= 1). One page describes up to 2 MiB;
    /// more pages are chained and raise the per-command transfer limit (if MDTS allows).
    pub prp_list_pages: usize,
    /// I/O queue pairs to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Write the completion-queue head doorbell lazily: half of each queue pair's entries are
    /// kept as completion-queue slack (so `depth / 2` commands in flight instead of
    /// `depth - 1`), and the head is written only when that slack is used up. The device can
    /// never find the completion queue full, and most passes write no doorbell at all. Under
    /// emulation, where each doorbell write is expensive, this is a large saving.
    pub lazy_cq_doorbell: bool,
    /// How many timeout checks (`poll` / `poll_due` calls with commands outstanding) share one
    /// clock read (>= 1; 1 reads the clock on every call). A scan comes due at most this many
    /// checks late: microseconds for a poller that spins, but a caller that polls from a
    /// timer tick should set it to 1. Under emulation a clock read is costly (see
    /// `IoQueuePair::scan_due`), so the default shares one among 32.
    pub timeout_check_polls: u16,
    /// Abort commands [`Controller::recover`] sends per call at most (also bounded by the
    /// controller's Abort Command Limit); timed-out commands beyond it go straight to a
    /// queue-pair reset.
    pub max_aborts: u8,
    /// How long [`Controller::recover`] waits for the completion of a command whose abort the
    /// controller confirmed, before it resets the queue pair anyway.
    pub abort_wait_ms: u64,
    /// Surprise-removal check: a queue pair with commands outstanding whose polls found no
    /// completion for this long reads CSTS (from its periodic scan, never on the hot path);
    /// all ones means the device is gone. Far below `io_timeout_ms`.
    pub removal_check_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shadow_doorbells: false,
            io_timeout_ms: 30_000,
            admin_timeout_ms: 5_000,
            max_retries: 3,
            prp_list_pages: 1,
            io_queues: 8,
            lazy_cq_doorbell: false,
            timeout_check_polls: 32,
            max_aborts: 4,
            abort_wait_ms: 100,
            removal_check_ms: 100,
        }
    }
}

/// A namespace the driver can do I/O on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block (LBA data) size in bytes.
    pub block_size: u32,
    /// Metadata bytes per block (0: none).
    pub metadata: u16,
    /// How data-only I/O (a buffer of `blocks * block_size` bytes, no metadata buffer) is done
    /// on this namespace, or why it is refused.
    pub format: NsFormat,
    /// Metadata interleaved with the data (extended LBAs).
    pub extended: bool,
    /// The protection type, if the namespace has protection information.
    pub pi: Option<PiType>,
    /// Where the protection information sits in a block's metadata (DPS.PIP: first, else
    /// last): 8 bytes with a 16-bit guard, 16 with a 64-bit guard.
    pub pi_offset: u16,
    /// The protection information has a 64-bit guard and a 48-bit reference tag (PIF = 2 in
    /// the NVM command set's extended LBA format): 16 bytes. Through PRACT where it is all the
    /// metadata, or computed by the caller ([`crate::pi`]) in a separate metadata buffer.
    pub pi_guard64: bool,
    /// The namespace's I/O command set (CSI: 0 NVM, 2 zoned), from its identification
    /// descriptors.
    pub command_set: u8,
    /// A zoned namespace's zones (`Some` only when the zoned command set is enabled and its
    /// Identify data is usable; then reads, writes at the write pointer and the zone
    /// operations of [`IoQueuePair::submit_zone`] work on it).
    pub zoned: Option<Zoned>,
}

impl Namespace {
    /// Blocks without metadata: the driver's one-pass path takes I/O to it.
    #[inline(always)]
    pub fn is_plain(&self) -> bool {
        matches!(self.format, NsFormat::Plain)
    }
}

/// End-to-end protection type (Identify Namespace DPS bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PiType {
    /// Type 1: the reference tag is the LBA's low 32 bits.
    Type1,
    /// Type 2: the reference tag starts at the command's initial reference tag.
    Type2,
    /// Type 3: no reference tag.
    Type3,
}

/// What the driver does with a namespace's format for data-only I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NsFormat {
    /// No metadata: plain reads and writes.
    Plain,
    /// The metadata is protection information alone (8 bytes with a 16-bit guard, 16 with a
    /// 64-bit guard, [`Namespace::pi_guard64`]): every read and
    /// write sets PRACT, so the controller generates the guard and tags on writes and checks
    /// and strips them on reads (PRCHK: guard, and the reference tag = LBA for types 1 and 2);
    /// no metadata crosses the bus (the same for separate and extended LBAs). A check failure
    /// completes with an end-to-end status (`IoError` with the device's status).
    Pract(PiType),
    /// Metadata lives in a separate buffer (MPTR) that this I/O path does not supply: I/O is
    /// refused with [`SubmitError::MetadataRequired`](keel_blockdev::SubmitError), never sent
    /// with MPTR = 0 (the device would DMA metadata at bus address 0);
    /// [`IoQueuePair::submit_with_metadata`] supplies it (with protection information, the
    /// caller's tuples: [`crate::pi`]).
    SeparateMetadata,
    /// Metadata interleaved with the data (extended LBAs) beyond protection information
    /// alone: refused with [`SubmitError::UnsupportedFormat`](keel_blockdev::SubmitError).
    ExtendedMetadata,
    /// An I/O command set Keel cannot use here (the CSI): one it does not know, or a zoned
    /// namespace whose controller cannot enable the zoned command set or whose zoned Identify
    /// data is unusable (the reason is logged at bring-up): refused with
    /// [`SubmitError::UnsupportedFormat`](keel_blockdev::SubmitError).
    CommandSet(u8),
    /// Protection information in a format this I/O path does not produce or check: a 32-bit
    /// guard, or storage tags (the NVM command set's extended LBA format, Identify CNS 0x05):
    /// refused with [`SubmitError::UnsupportedFormat`](keel_blockdev::SubmitError). (64-bit
    /// guards are used through PRACT when the protection information is the whole metadata,
    /// and with a caller's metadata buffer where the metadata is separate; a 64-bit guard with
    /// more metadata than the PI, interleaved with the data, is this.)
    UnsupportedProtection,
}

impl NsFormat {
    /// CDW12's PRCHK bits (28:26: guard, application tag, reference tag).
    pub const PRCHK_MASK: u32 = 0b111 << 26;

    /// PRINFO bits for CDW12 of a read, write or write zeroes (PRACT, PRCHK), and whether
    /// CDW14 (initial reference tag) must carry the LBA.
    #[inline]
    pub fn prinfo(self) -> (u32, bool) {
        const PRACT: u32 = 1 << 29;
        const PRCHK_GUARD: u32 = 1 << 28;
        const PRCHK_REF: u32 = 1 << 26;
        match self {
            NsFormat::Pract(PiType::Type1 | PiType::Type2) => {
                (PRACT | PRCHK_GUARD | PRCHK_REF, true)
            }
            NsFormat::Pract(PiType::Type3) => (PRACT | PRCHK_GUARD, false),
            _ => (0, false),
        }
    }

    /// The refusal for data-only I/O, if any.
    #[inline]
    pub fn refusal(self) -> Option<keel_blockdev::SubmitError> {
        match self {
            NsFormat::SeparateMetadata => Some(keel_blockdev::SubmitError::MetadataRequired),
            NsFormat::ExtendedMetadata
            | NsFormat::CommandSet(_)
            | NsFormat::UnsupportedProtection => {
                Some(keel_blockdev::SubmitError::UnsupportedFormat)
            }
            _ => None,
        }
    }
}

/// What Identify Controller said, in usable form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ControllerInfo {
    /// PCI vendor ID (VID).
    pub vid: u16,
    /// Serial number (SN), ASCII padded with spaces; see [`ControllerInfo::serial_str`].
    pub serial: [u8; 20],
    /// Model number (MN), ASCII padded with spaces; see [`ControllerInfo::model_str`].
    pub model: [u8; 40],
    /// Firmware revision (FR), ASCII padded with spaces; see [`ControllerInfo::firmware_str`].
    pub firmware: [u8; 8],
    /// The raw VS register (major << 16 | minor << 8 | tertiary); [`Vs::from_bits`] decodes it.
    pub version: u32,
    /// MDTS in bytes; `None` = no limit.
    pub mdts_bytes: Option<u32>,
    /// Largest transfer one command carries (MDTS and the PRP list space).
    pub max_transfer: usize,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Write Zeroes supported (ONCS bit 3).
    pub write_zeroes: bool,
    /// Dataset Management (deallocate) supported (ONCS bit 2).
    pub deallocate: bool,
    /// Doorbell Buffer Config supported (OACS bit 8).
    pub doorbell_buffer: bool,
    /// Namespace Management and Attachment supported (OACS bit 3): see
    /// [`Controller::attach_namespace`].
    pub namespace_attachment: bool,
    /// Shadow doorbells are in use.
    pub shadow_doorbells: bool,
    /// Number of namespaces (NN, the highest valid NSID).
    pub nn: u32,
    /// Entries per I/O queue the controller supports (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// I/O queue pairs granted (Set Features Number of Queues), capped at [`MAX_IO_QUEUES`].
    pub io_queues: u16,
    /// Command Retry Delay Times CRDT1..3 in units of 100 ms (0 where not reported).
    pub crdt: [u16; 3],
    /// Abort commands the controller accepts at once (ACL + 1).
    pub abort_limit: u8,
    /// Advanced Command Retry is on (Host Behavior Support ACRE set at bring-up): completions
    /// may carry a CRD asking for a delay before a retry.
    pub acre: bool,
    /// Controller ID (CNTLID).
    pub cntlid: u16,
    /// CC.CSS = 6 is in use (CAP.CSS bit 6): the I/O command sets of the selected profile
    /// are enabled, the zoned one among them where the controller offers it.
    pub io_command_sets: bool,
    /// The I/O Command Set Profile index selected (Set Features 0x19), and its command set
    /// vector (bit n = CSI n), when `io_command_sets`.
    pub command_set_profile: Option<(u16, u64)>,
    /// Zone Append Size Limit in bytes (ZASL of the zoned Identify Controller, MDTS where 0),
    /// once a zoned namespace asked for it.
    pub zone_append_limit: Option<u32>,
}

fn trim(bytes: &[u8]) -> &str {
    let s = core::str::from_utf8(bytes).unwrap_or("?");
    s.trim_end_matches([' ', '\0'])
}

impl ControllerInfo {
    /// The model number without its padding.
    pub fn model_str(&self) -> &str {
        trim(&self.model)
    }
    /// The serial number without its padding.
    pub fn serial_str(&self) -> &str {
        trim(&self.serial)
    }
    /// The firmware revision without its padding.
    pub fn firmware_str(&self) -> &str {
        trim(&self.firmware)
    }
}

/// Admin-queue statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AdminStats {
    /// Admin commands submitted.
    pub commands: u64,
    /// Completions with an unexpected CID or SQID (dropped).
    pub stale_completions: u64,
    /// Controller resets ([`Controller::reset`] calls).
    pub resets: u64,
    /// Abort commands sent by [`Controller::recover`].
    pub aborts_sent: u64,
    /// Aborts the controller confirmed (the command then completes "Abort Requested").
    pub aborts_confirmed: u64,
    /// Queue pairs deleted and recreated by [`Controller::reset_queue`].
    pub queue_resets: u64,
}

/// What one [`Controller::recover`] call did, level by level (SPDK's and Linux's escalation:
/// abort, then reset the queue pair, then reset the controller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Recovery {
    /// Completions already posted that the call reaped for the pairs' owners (late completions
    /// settle a timed-out command without any abort).
    pub reaped: u16,
    /// Abort commands sent.
    pub aborts_sent: u16,
    /// Aborts the controller confirmed.
    pub aborts_confirmed: u16,
    /// Queue pairs deleted and recreated.
    pub queue_resets: u16,
    /// The controller was reset (CC.EN 1 → 0 → 1): fatal status, a device that is gone, a
    /// failed pair, or a lower level that did not work.
    pub controller_reset: bool,
}

struct AdminQueue {
    sq: DmaRegion,
    cq: DmaRegion,
    tail: u16,
    head: u16,
    phase: bool,
    next_cid: u16,
}

struct Shadow {
    db_bus: u64,
    ei_bus: u64,
    /// Per-qid `(doorbell, eventidx)` slices, `2 * stride` bytes each; `None` once handed out.
    parts: Vec<Option<(DmaRegion, DmaRegion)>, { MAX_IO_QUEUES as usize + 1 }>,
}

/// An NVMe controller: the admin queue, identify data, namespaces.
///
/// I/O happens on [`IoQueuePair`]s created with [`Controller::create_io_qpair`], each owned by
/// one core.
pub struct Controller<M: Mmio, C: Clock> {
    mmio: M,
    clock: C,
    cfg: Config,
    cap: Cap,
    /// The deadline for a CSTS.RDY transition: CAP.TO, or CRTO.CRWMT where the controller
    /// reports it (NVMe 2.0 lets CRWMT exceed what CAP.TO can say).
    ready_timeout_ms: u64,
    stride: usize,
    admin: AdminQueue,
    scratch: DmaRegion,
    info: ControllerInfo,
    namespaces: Vec<Namespace, MAX_NAMESPACES>,
    /// Active namespaces whose identify data the driver cannot use, with the reason.
    skipped: Vec<(u32, BadIdentify), 8>,
    shadow: Option<Shadow>,
    /// The I/O queue pairs that exist on the device.
    live: QidSet,
    failed: bool,
    stats: AdminStats,
    /// Asynchronous Event Requests outstanding and events to handle (see `events.rs`).
    events: events::EventState,
}

impl<M: Mmio, C: Clock> Controller<M, C> {
    /// Resets and enables the controller, identifies it and its namespaces, and negotiates the
    /// number of I/O queues. `mmio` is BAR0.
    pub fn init(
        mmio: M,
        dma: &impl DmaAllocator,
        clock: C,
        cfg: Config,
    ) -> Result<Self, NvmeError> {
        if cfg.prp_list_pages == 0 {
            return Err(NvmeError::InvalidArgument("prp_list_pages must be >= 1"));
        }
        let cap = Cap::from_bits(mmio.read64(reg::CAP));
        if !cap.css_nvm() {
            return Err(NvmeError::Unsupported("NVM command set"));
        }
        if cap.mps_min() > PAGE_SIZE || cap.mps_max() < PAGE_SIZE {
            return Err(NvmeError::Unsupported("4 KiB memory pages"));
        }
        let stride = cap.doorbell_stride();
        let ready_timeout_ms = if cap.crwms() && mmio.len() >= reg::CRTO + 4 {
            let crwmt = (mmio.read32(reg::CRTO) & 0xFFFF) as u64 * 500;
            cap.timeout_ms().max(crwmt)
        } else {
            cap.timeout_ms()
        };
        if mmio.len() < spec::cq_doorbell(0, stride) + 4 {
            return Err(NvmeError::InvalidArgument(
                "BAR0 smaller than the admin doorbells",
            ));
        }
        let version = mmio.read32(reg::VS);
        let admin = AdminQueue {
            sq: dma.alloc(ADMIN_DEPTH as usize * 64, PAGE_SIZE)?,
            cq: dma.alloc(ADMIN_DEPTH as usize * 16, PAGE_SIZE)?,
            tail: 0,
            head: 0,
            phase: true,
            next_cid: 0,
        };
        let scratch = dma.alloc(PAGE_SIZE, PAGE_SIZE)?;
        let info = ControllerInfo {
            vid: 0,
            serial: [0; 20],
            model: [0; 40],
            firmware: [0; 8],
            version,
            mdts_bytes: None,
            max_transfer: 0,
            vwc: false,
            write_zeroes: false,
            deallocate: false,
            doorbell_buffer: false,
            namespace_attachment: false,
            shadow_doorbells: false,
            nn: 0,
            max_queue_entries: cap.max_queue_entries(),
            io_queues: 0,
            crdt: [0; 3],
            abort_limit: 1,
            acre: false,
            cntlid: 0,
            io_command_sets: cap.css_io_sets(),
            command_set_profile: None,
            zone_append_limit: None,
        };
        let mut ctrl = Self {
            mmio,
            clock,
            cfg,
            cap,
            ready_timeout_ms,
            stride,
            admin,
            scratch,
            info,
            namespaces: Vec::new(),
            skipped: Vec::new(),
            shadow: None,
            live: QidSet::ZERO,
            failed: false,
            stats: AdminStats::default(),
            events: events::EventState::default(),
        };
        keel_log::info!(
            "nvme: version {=u32:x}, mqes {}, to {} ms",
            version,
            cap.max_queue_entries(),
            cap.timeout_ms()
        );
        let r = (|| {
            ctrl.disable()?;
            ctrl.enable()?;
            ctrl.identify_controller()?;
            ctrl.enable_acre();
            ctrl.select_command_sets()?;
            ctrl.scan_namespaces()?;
            ctrl.negotiate_queues()?;
            if ctrl.cfg.shadow_doorbells && ctrl.info.doorbell_buffer {
                ctrl.setup_shadow(dma)?;
            }
            ctrl.arm_events()?;
            Ok(())
        })();
        if let Err(e) = r {
            // Bring-up failed (device not ready, fatal, absurd identify, ...): disable the
            // device and, once it reports it stopped (RDY = 0), give the admin queues and the
            // scratch page back instead of leaking them on every attempt. A device that does
            // not stop may still write there, so then the memory stays leaked on purpose.
            let cc = ctrl.cc();
            ctrl.set_cc(cc.with_en(false));
            if ctrl.wait_csts(|c| !c.rdy(), Step::Disable).is_ok() {
                dma.free(ctrl.admin.sq);
                dma.free(ctrl.admin.cq);
                dma.free(ctrl.scratch);
            }
            return Err(e);
        }
        Ok(ctrl)
    }

    /// What Identify Controller (and queue negotiation) said.
    pub fn identify(&self) -> &ControllerInfo {
        &self.info
    }

    /// The active namespaces the driver uses (at most [`MAX_NAMESPACES`]).
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Active namespaces left out because their identify data is unusable, with the reason
    /// (the first 8; each is also logged).
    pub fn skipped_namespaces(&self) -> &[(u32, BadIdentify)] {
        &self.skipped
    }

    /// The namespace with this NSID, if active.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The configuration given to [`Controller::init`].
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The CAP register as read at bring-up.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// Admin-queue counters.
    pub fn stats(&self) -> AdminStats {
        self.stats
    }

    /// `true` when the device is gone (CSTS reads all ones: surprise removal). Its queue pairs
    /// notice on their own ([`IoQueuePair::is_removed`]); nothing brings it back.
    pub fn is_removed(&self) -> bool {
        self.csts().device_gone()
    }

    /// `true` when CSTS.CFS (controller fatal status) is set: call [`Controller::reset`].
    pub fn is_fatal(&self) -> bool {
        // All-ones: the device fell off the bus; treat as fatal.
        self.csts().fatal()
    }

    fn cc(&self) -> Cc {
        Cc::from_bits(self.mmio.read32(reg::CC))
    }

    fn set_cc(&self, cc: Cc) {
        self.mmio.write32(reg::CC, cc.into_bits());
    }

    fn csts(&self) -> Csts {
        Csts::from_bits(self.mmio.read32(reg::CSTS))
    }

    /// Polls CSTS until `done` says so, for at most CAP.TO (or CRTO.CRWMT, where larger; and
    /// at least 500 ms).
    fn wait_csts(&self, done: impl Fn(Csts) -> bool, step: Step) -> Result<(), NvmeError> {
        // CAP.TO / CRWMT is the worst case for RDY transitions; never wait less than 500 ms.
        let limit_ms = self.ready_timeout_ms.max(500);
        let deadline = self.clock.now_ns().saturating_add(limit_ms * 1_000_000);
        loop {
            let csts = self.csts();
            if csts.device_gone() {
                return Err(NvmeError::ControllerFatal);
            }
            if done(csts) {
                return Ok(());
            }
            if csts.cfs() && step == Step::Enable {
                return Err(NvmeError::ControllerFatal);
            }
            if self.clock.now_ns() > deadline {
                return Err(NvmeError::Timeout(step));
            }
            self.clock.delay_us(10);
        }
    }

    fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.cc();
        if cc.en() {
            let csts = self.csts();
            if !csts.rdy() && !csts.cfs() {
                // EN 1 -> 0 while RDY is still 0 is undefined: let it finish enabling first.
                let _ = self.wait_csts(|c| c.rdy(), Step::Enable);
            }
        }
        self.set_cc(cc.with_en(false));
        self.wait_csts(|c| !c.rdy(), Step::Disable)
    }

    fn enable(&mut self) -> Result<(), NvmeError> {
        self.admin.cq.fill(0, self.admin.cq.len(), 0)?;
        self.admin.tail = 0;
        self.admin.head = 0;
        self.admin.phase = true;
        let q = ADMIN_DEPTH - 1;
        let aqa = Aqa::new().with_asqs(q).with_acqs(q);
        self.mmio.write32(reg::AQA, aqa.into_bits());
        self.mmio.write64(reg::ASQ, self.admin.sq.bus_addr());
        self.mmio.write64(reg::ACQ, self.admin.cq.bus_addr());
        // MPS = 0: 4 KiB pages (PAGE_SIZE); a fresh value, so reserved bits are written as 0.
        let cc = Cc::new()
            .with_en(true)
            .with_css(if self.info.io_command_sets {
                Cc::CSS_IO_SETS
            } else {
                Cc::CSS_NVM
            })
            .with_mps(0)
            .with_ams(Cc::AMS_ROUND_ROBIN)
            .with_iosqes(spec::SQES_LOG2 as u8)
            .with_iocqes(spec::CQES_LOG2 as u8);
        // The admin queues' memory before CC.EN lets the controller read it.
        self.mmio.doorbell_barrier();
        self.set_cc(cc);
        self.wait_csts(|c| c.rdy(), Step::Enable)
    }

    /// Runs one admin command to completion (polled). Returns the completion's DW0.
    pub fn admin_command(&mut self, mut sqe: SqEntry) -> Result<u32, NvmeError> {
        if self.failed {
            return Err(NvmeError::Failed);
        }
        let opcode = sqe.opcode();
        let cid = self.admin.next_cid;
        // CIDs from AER_CID_BASE up belong to the outstanding Asynchronous Event Requests.
        self.admin.next_cid = if cid + 1 >= AER_CID_BASE { 0 } else { cid + 1 };
        sqe.set_cid(cid);
        self.admin.sq.write(self.admin.tail as usize * 64, &sqe)?;
        self.admin.tail = (self.admin.tail + 1) % ADMIN_DEPTH;
        self.mmio.doorbell_barrier();
        self.admin_doorbell(false, self.admin.tail);
        self.stats.commands += 1;
        let deadline = self
            .clock
            .now_ns()
            .saturating_add(self.cfg.admin_timeout_ms * 1_000_000);
        let mut spins = 0u32;
        loop {
            let off = self.admin.head as usize * 16;
            let word = self.admin.cq.read_u16(off + spec::CQE_STATUS_OFFSET)?;
            if (word & 1 != 0) == self.admin.phase {
                fence(Ordering::Acquire);
                let cqe: CqEntry = self.admin.cq.read(off)?;
                self.admin.head += 1;
                if self.admin.head == ADMIN_DEPTH {
                    self.admin.head = 0;
                    self.admin.phase = !self.admin.phase;
                }
                self.admin_doorbell(true, self.admin.head);
                if cqe.sq_id != 0 || cqe.cid != cid || cqe.phase() != (word & 1 != 0) {
                    if self.events.take_aer_waiting(&cqe) {
                        continue; // an event: kept for `poll_events`
                    }
                    self.stats.stale_completions += 1;
                    keel_log::warn!(
                        "nvme: stale admin completion cid {} (want {})",
                        cqe.cid,
                        cid
                    );
                    continue;
                }
                let status = cqe.status();
                if !status.is_success() {
                    return Err(NvmeError::AdminStatus { opcode, status });
                }
                return Ok(cqe.dw0);
            }
            spins += 1;
            if spins % 64 == 0 && self.is_fatal() {
                return Err(NvmeError::ControllerFatal);
            }
            if self.clock.now_ns() > deadline {
                keel_log::error!("nvme: admin opcode {=u8:x} timed out", opcode);
                return Err(NvmeError::Timeout(Step::AdminCommand(opcode)));
            }
            self.clock.delay_us(1);
        }
    }

    fn admin_doorbell(&mut self, cq: bool, value: u16) {
        if let Some(Some((db, _))) = self.shadow.as_ref().and_then(|s| s.parts.first()) {
            // Keep the admin shadow in step too, but always ring: controllers differ on whether
            // the admin queue uses the shadow buffer.
            let _ = db.write_u32(if cq { self.stride } else { 0 }, value as u32);
            self.mmio.doorbell_barrier();
        }
        let off = if cq {
            spec::cq_doorbell(0, self.stride)
        } else {
            spec::sq_doorbell(0, self.stride)
        };
        self.mmio.write32(off, value as u32);
    }

    fn identify_raw(&mut self, cns: u32, nsid: u32) -> Result<(), NvmeError> {
        self.scratch.fill(0, PAGE_SIZE, 0)?;
        let mut sqe = SqEntry::new(admin_op::IDENTIFY, 0, nsid);
        sqe.prp1 = self.scratch.bus_addr();
        sqe.cdw10 = cns;
        self.admin_command(sqe)?;
        Ok(())
    }

    /// Enables Advanced Command Retry (Host Behavior Support, ACRE = 1) when the controller
    /// gives retry delay times (CRDT1..3): only then may its completions ask, through CRD, for
    /// a delay before a retry ([`crate::IoQueuePair`] honours it through
    /// `BlockQueue::retry_delay_us`). A controller that refuses the feature keeps ACRE off; it
    /// is not an error. Features are back to their defaults after a controller reset, so
    /// [`Controller::reset`] calls this again.
    fn enable_acre(&mut self) {
        self.info.acre = false;
        if self.info.crdt.iter().all(|&t| t == 0) {
            return;
        }
        let r = (|| {
            self.scratch.fill(0, PAGE_SIZE, 0)?;
            self.scratch.write(0, &1u8)?;
            let mut sqe = SqEntry::new(admin_op::SET_FEATURES, 0, 0);
            sqe.prp1 = self.scratch.bus_addr();
            sqe.cdw10 = spec::feature::HOST_BEHAVIOR_SUPPORT;
            self.admin_command(sqe)
        })();
        self.info.acre = r.is_ok();
        keel_log::info!(
            "nvme: crdt {} {} {} ms x100, acre {}",
            self.info.crdt[0],
            self.info.crdt[1],
            self.info.crdt[2],
            self.info.acre
        );
    }

    fn identify_controller(&mut self) -> Result<(), NvmeError> {
        self.identify_raw(cns::CONTROLLER, 0)?;
        let id: spec::IdentifyController = self.scratch.read(0)?;
        let sqes = id.sqes;
        let cqes = id.cqes;
        let ok = |v: u8, want: u8| (v & 0xF) <= want && (v >> 4) >= want;
        if !ok(sqes, spec::SQES_LOG2 as u8) || !ok(cqes, spec::CQES_LOG2 as u8) {
            return Err(NvmeError::BadIdentify(BadIdentify::EntrySizes));
        }
        let info = &mut self.info;
        info.vid = id.vid.get();
        info.cntlid = id.cntlid.get();
        info.serial = id.sn;
        info.model = id.mn;
        info.firmware = id.fr;
        let oacs = id.oacs.get();
        let oncs = id.oncs.get();
        info.vwc = id.vwc & 1 != 0;
        info.write_zeroes = oncs & spec::ONCS_WRITE_ZEROES != 0;
        info.deallocate = oncs & spec::ONCS_DSM != 0;
        info.doorbell_buffer = oacs & spec::OACS_DOORBELL_BUFFER_CONFIG != 0;
        info.namespace_attachment = oacs & spec::OACS_NS_MANAGEMENT != 0;
        info.nn = id.nn.get();
        info.crdt = id.crdt.map(|t| t.get());
        info.abort_limit = id.acl.saturating_add(1);
        self.events.set_limits(id.aerl, id.elpe);
        // MDTS is in units of CAP.MPSMIN; clamp absurd exponents instead of overflowing.
        info.mdts_bytes = match id.mdts {
            0 => None,
            m => Some((self.cap.mps_min() as u64) << m.min(20))
                .map(|b| b.min(u32::MAX as u64) as u32),
        };
        let prp_max = crate::prp::max_transfer(self.cfg.prp_list_pages);
        // Per-command byte counts are kept in 32 bits: cap at 1 GiB.
        info.max_transfer = match info.mdts_bytes {
            Some(m) => (m as usize).min(prp_max),
            None => prp_max,
        }
        .min(1 << 30);
        keel_log::info!(
            "nvme: identify ctrl nn {} mdts {} oacs {=u16:x} oncs {=u16:x} vwc {}",
            info.nn,
            id.mdts,
            oacs,
            oncs,
            info.vwc
        );
        Ok(())
    }

    fn scan_namespaces(&mut self) -> Result<(), NvmeError> {
        self.namespaces.clear();
        self.skipped.clear();
        let mut ids: Vec<u32, MAX_NAMESPACES> = Vec::new();
        if Vs::from_bits(self.info.version).at_least(1, 1) {
            self.identify_raw(cns::ACTIVE_NS_LIST, 0)?;
            let mut prev = 0u32;
            for i in 0..1024 {
                let nsid: u32 = self.scratch.read(i * 4)?;
                if nsid == 0 {
                    break;
                }
                if nsid <= prev || nsid > self.info.nn || nsid == u32::MAX {
                    return Err(NvmeError::BadIdentify(BadIdentify::NamespaceId));
                }
                prev = nsid;
                if ids.push(nsid).is_err() {
                    keel_log::warn!(
                        "nvme: more than {} namespaces, ignoring nsid {}",
                        MAX_NAMESPACES,
                        nsid
                    );
                }
            }
        } else {
            for nsid in 1..=self.info.nn.min(MAX_NAMESPACES as u32) {
                let _ = ids.push(nsid);
            }
        }
        for nsid in ids {
            self.identify_raw(cns::NAMESPACE, nsid)?;
            let id: spec::IdentifyNamespace = self.scratch.read(0)?;
            if id.nsze.get() == 0 && !Vs::from_bits(self.info.version).at_least(1, 1) {
                continue; // inactive namespace on a pre-1.1 controller
            }
            let ns = match parse_namespace(nsid, &id) {
                Ok(ns) => match self.command_set(nsid)? {
                    spec::csi::NVM => self.protection_format(ns, &id)?,
                    spec::csi::ZONED => self.zoned_namespace(ns, &id)?,
                    other => {
                        // Identify Namespace reads the same for every command set, but I/O
                        // to a namespace of a set Keel does not speak is refused, typed.
                        keel_log::warn!(
                            "nvme: ns {} uses I/O command set {=u8}, unknown to Keel: I/O refused",
                            nsid,
                            other
                        );
                        Namespace {
                            format: NsFormat::CommandSet(other),
                            command_set: other,
                            ..ns
                        }
                    }
                },
                Err(e) => {
                    // One namespace the driver cannot use leaves the others usable.
                    keel_log::warn!("nvme: ns {} skipped: {}", nsid, e);
                    if let NvmeError::BadIdentify(why) = e {
                        let _ = self.skipped.push((nsid, why));
                    }
                    continue;
                }
            };
            keel_log::info!(
                "nvme: ns {} blocks {} bs {} metadata {} format {}",
                ns.nsid,
                ns.blocks,
                ns.block_size,
                ns.metadata,
                ns.format
            );
            let _ = self.namespaces.push(ns);
        }
        Ok(())
    }

    /// With CC.CSS = 6: reads the controller's I/O command set vectors (Identify CNS 0x1C) and
    /// selects the first profile that has both NVM and zoned (else the first with NVM) with
    /// Set Features 0x19. A controller that refuses either keeps its default profile (index
    /// 0), logged; the zoned namespaces then say for themselves whether they work.
    fn select_command_sets(&mut self) -> Result<(), NvmeError> {
        if !self.info.io_command_sets {
            return Ok(());
        }
        const NVM: u64 = 1 << spec::csi::NVM;
        const ZONED: u64 = 1 << spec::csi::ZONED;
        let cdw10 = cns::IO_COMMAND_SETS | (self.info.cntlid as u32) << 16;
        match self.identify_raw(cdw10, 0) {
            Ok(()) => {}
            Err(NvmeError::AdminStatus { status, .. }) => {
                keel_log::warn!(
                    "nvme: I/O command set vectors refused ({=u16:x}); default profile",
                    status.code()
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let mut pick: Option<(u16, u64)> = None;
        for i in 0..(PAGE_SIZE / 8) as u16 {
            let v: u64 = self.scratch.read(i as usize * 8)?;
            if v & (NVM | ZONED) == NVM | ZONED {
                pick = Some((i, v));
                break;
            }
            if v & NVM != 0 && pick.is_none() {
                pick = Some((i, v));
            }
        }
        let Some((index, vector)) = pick else {
            keel_log::warn!("nvme: no I/O command set profile has NVM; default profile");
            return Ok(());
        };
        let mut sqe = SqEntry::new(admin_op::SET_FEATURES, 0, 0);
        sqe.cdw10 = feature::IO_COMMAND_SET_PROFILE;
        sqe.cdw11 = index as u32;
        match self.admin_command(sqe) {
            Ok(_) => {
                self.info.command_set_profile = Some((index, vector));
                keel_log::info!(
                    "nvme: I/O command set profile {} (sets {=u64:x})",
                    index,
                    vector
                );
                Ok(())
            }
            Err(NvmeError::AdminStatus { status, .. }) => {
                keel_log::warn!(
                    "nvme: I/O command set profile {} refused ({=u16:x}); default profile",
                    index,
                    status.code()
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A namespace whose CSI says zoned: with the zoned command set enabled and usable zoned
    /// Identify data (CNS 5, and ZASL from CNS 6), kept with its zones; otherwise kept refused
    /// (`NsFormat::CommandSet(2)`), the reason logged. Only transport failures are errors.
    fn zoned_namespace(
        &mut self,
        ns: Namespace,
        id: &spec::IdentifyNamespace,
    ) -> Result<Namespace, NvmeError> {
        let refused = |why: &str| {
            keel_log::warn!("nvme: ns {} is zoned but {=str}: I/O refused", ns.nsid, why);
            Ok(Namespace {
                format: NsFormat::CommandSet(spec::csi::ZONED),
                command_set: spec::csi::ZONED,
                ..ns
            })
        };
        if !self.info.io_command_sets {
            return refused("the controller cannot enable the zoned command set (CAP.CSS bit 6)");
        }
        if self
            .info
            .command_set_profile
            .is_some_and(|(_, v)| v & (1 << spec::csi::ZONED) == 0)
        {
            return refused("the selected command set profile lacks it");
        }
        let zasl = match self.info.zone_append_limit {
            Some(z) => z,
            None => {
                let cdw11 = (spec::csi::ZONED as u32) << 24;
                match self.identify_csi(cns::CS_CONTROLLER, 0, cdw11) {
                    Ok(()) => {}
                    Err(NvmeError::AdminStatus { .. }) => {
                        return refused("zoned Identify Controller (CNS 6) failed")
                    }
                    Err(e) => return Err(e),
                }
                let [zasl]: [u8; 1] = self.scratch.read(0)?;
                let mdts = self.info.max_transfer as u64;
                let limit = match zasl {
                    0 => mdts,
                    z => ((self.cap.mps_min() as u64) << z.min(20)).min(mdts),
                };
                let limit = limit.min(u32::MAX as u64) as u32;
                self.info.zone_append_limit = Some(limit);
                limit
            }
        };
        let cdw11 = (spec::csi::ZONED as u32) << 24;
        match self.identify_csi(cns::CS_NAMESPACE, ns.nsid, cdw11) {
            Ok(()) => {}
            Err(NvmeError::AdminStatus { .. }) => {
                return refused("zoned Identify Namespace (CNS 5) failed")
            }
            Err(e) => return Err(e),
        }
        let mut cs = [0u8; PAGE_SIZE];
        self.scratch.read_bytes(0, &mut cs)?;
        match parse_zoned(ns.blocks, lba_format_index(id), &cs, zasl) {
            Ok(z) => {
                keel_log::info!(
                    "nvme: ns {} zoned: {} zones of {} blocks, max active {}, max open {}, append limit {} bytes",
                    ns.nsid,
                    z.zones,
                    z.zone_size,
                    z.max_active,
                    z.max_open,
                    z.append_limit
                );
                Ok(Namespace {
                    command_set: spec::csi::ZONED,
                    zoned: Some(z),
                    ..ns
                })
            }
            Err(BadIdentify::ZoneSize) => refused("its zone size is absurd (ZSZE)"),
            Err(_) => refused("its zone limits are absurd (MAR/MOR/ZASL)"),
        }
    }

    /// For a namespace with protection information: its format in the NVM command set's
    /// Identify Namespace (CNS 0x05, CSI 0: the extended LBA format of the selected index at
    /// byte 12 + 4 x index, bits 6:0 STS, 8:7 PIF). A controller without it (the command fails): 16-bit guards, as
    /// before NVMe 2.0.
    pub(crate) fn protection_format(
        &mut self,
        ns: Namespace,
        id: &spec::IdentifyNamespace,
    ) -> Result<Namespace, NvmeError> {
        let Some(t) = ns.pi else {
            return Ok(ns);
        };
        let cdw11 = (spec::csi::NVM as u32) << 24;
        if self
            .identify_csi(cns::CS_NAMESPACE, ns.nsid, cdw11)
            .is_err()
        {
            return Ok(ns);
        }
        let idx = lba_format_index(id);
        // LBSTM (8 bytes), PIC, 3 reserved, then ELBAF[64] of 4 bytes each.
        let elbaf = u32::from_le_bytes(self.scratch.read::<[u8; 4]>(12 + 4 * idx)?);
        let (sts, pif) = (elbaf & 0x7F, (elbaf >> 7) & 0x3);
        let ms = ns.metadata;
        Ok(match (pif, sts) {
            (0, 0) => ns,
            (2, 0) if ms >= 16 => {
                keel_log::info!(
                    "nvme: ns {} protection information with a 64-bit guard (16 bytes of {} of metadata)",
                    ns.nsid,
                    ms
                );
                Namespace {
                    format: match ns.format {
                        NsFormat::Pract(_) | NsFormat::SeparateMetadata if ms == 16 => {
                            NsFormat::Pract(t)
                        }
                        NsFormat::ExtendedMetadata if ms == 16 => NsFormat::Pract(t),
                        // More metadata than the PI, apart from the data: the caller's metadata
                        // buffer carries it, with Keel's tuples (`crate::pi`).
                        NsFormat::SeparateMetadata => NsFormat::SeparateMetadata,
                        _ => NsFormat::UnsupportedProtection,
                    },
                    pi_offset: if id.dps & 0x8 != 0 { 0 } else { ms - 16 },
                    pi_guard64: true,
                    ..ns
                }
            }
            _ => {
                keel_log::warn!(
                    "nvme: ns {} protection information format Keel cannot use (PIF {=u32}, storage tag {=u32} bits): I/O refused",
                    ns.nsid,
                    pif,
                    sts
                );
                Namespace {
                    format: NsFormat::UnsupportedProtection,
                    ..ns
                }
            }
        })
    }

    fn identify_csi(&mut self, cns: u32, nsid: u32, cdw11: u32) -> Result<(), NvmeError> {
        self.scratch.fill(0, PAGE_SIZE, 0)?;
        let mut sqe = SqEntry::new(admin_op::IDENTIFY, 0, nsid);
        sqe.prp1 = self.scratch.bus_addr();
        sqe.cdw10 = cns;
        sqe.cdw11 = cdw11;
        self.admin_command(sqe)?;
        Ok(())
    }

    /// The I/O command set of namespace `nsid`, from its identification descriptors (NVMe
    /// 1.3+; a controller that fails the command or lists no CSI descriptor: NVM). The list is
    /// walked within the page, whatever lengths it claims.
    fn command_set(&mut self, nsid: u32) -> Result<u8, NvmeError> {
        if !Vs::from_bits(self.info.version).at_least(1, 3) {
            return Ok(spec::csi::NVM);
        }
        match self.identify_raw(cns::NS_DESCRIPTORS, nsid) {
            Ok(()) => {}
            Err(NvmeError::AdminStatus { .. }) => return Ok(spec::csi::NVM),
            Err(e) => return Err(e),
        }
        let mut off = 0;
        while off + 4 < PAGE_SIZE {
            let [kind, len, _, _]: [u8; 4] = self.scratch.read(off)?;
            if kind == 0 {
                break;
            }
            if kind == spec::nidt::CSI && len == 1 {
                let [csi]: [u8; 1] = self.scratch.read(off + 4)?;
                return Ok(csi);
            }
            off += 4 + len as usize;
        }
        Ok(spec::csi::NVM)
    }

    fn negotiate_queues(&mut self) -> Result<(), NvmeError> {
        let want = self.cfg.io_queues.clamp(1, MAX_IO_QUEUES) as u32 - 1;
        let mut sqe = SqEntry::new(admin_op::SET_FEATURES, 0, 0);
        sqe.cdw10 = feature::NUMBER_OF_QUEUES;
        sqe.cdw11 = (want << 16) | want;
        let dw0 = self.admin_command(sqe)?;
        let nsqa = (dw0 & 0xFFFF) + 1;
        let ncqa = (dw0 >> 16) + 1;
        self.info.io_queues = nsqa.min(ncqa).min(want + 1).min(MAX_IO_QUEUES as u32) as u16;
        Ok(())
    }

    fn setup_shadow(&mut self, dma: &impl DmaAllocator) -> Result<(), NvmeError> {
        let chunk = 2 * self.stride;
        if (self.info.io_queues as usize + 1) * chunk > PAGE_SIZE {
            // Once enabled, the controller takes every I/O queue's doorbell from the buffer; if a
            // page cannot hold them all, stay with MMIO doorbells.
            keel_log::warn!("nvme: doorbell stride too large for a shadow page; not using it");
            return Ok(());
        }
        let db = dma.alloc(PAGE_SIZE, PAGE_SIZE)?;
        let ei = dma.alloc(PAGE_SIZE, PAGE_SIZE)?;
        let (db_bus, ei_bus) = (db.bus_addr(), ei.bus_addr());
        let mut parts = Vec::new();
        let (mut db_rest, mut ei_rest) = (db, ei);
        while parts.len() < parts.capacity() && db_rest.len() >= chunk {
            let (a, r1) = db_rest
                .split_at(chunk)
                .map_err(|_| NvmeError::DmaBadRequest)?;
            let (b, r2) = ei_rest
                .split_at(chunk)
                .map_err(|_| NvmeError::DmaBadRequest)?;
            db_rest = r1;
            ei_rest = r2;
            let _ = parts.push(Some((a, b)));
        }
        self.shadow = Some(Shadow {
            db_bus,
            ei_bus,
            parts,
        });
        match self.send_dbbuf() {
            Ok(()) => {
                self.info.shadow_doorbells = true;
                Ok(())
            }
            Err(NvmeError::AdminStatus { .. }) => {
                keel_log::warn!("nvme: doorbell buffer config refused; using MMIO doorbells");
                self.shadow = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn send_dbbuf(&mut self) -> Result<(), NvmeError> {
        let Some(sh) = &self.shadow else {
            return Ok(());
        };
        let mut sqe = SqEntry::new(admin_op::DOORBELL_BUFFER_CONFIG, 0, 0);
        sqe.prp1 = sh.db_bus;
        sqe.prp2 = sh.ei_bus;
        self.admin_command(sqe).map(|_| ())
    }

    /// Creates I/O queue pair `qid` (1..=`identify().io_queues`) with `depth` entries per queue
    /// (2..=min(CAP.MQES+1, 4096)); up to `depth - 1` commands can be in flight (at most
    /// [`crate::MAX_COMMANDS`], and half the ring with lazy CQ doorbells). All memory the
    /// pair needs on the I/O path (rings, PRP lists, bookkeeping) is allocated here.
    pub fn create_io_qpair(
        &mut self,
        dma: &impl DmaAllocator,
        qid: u16,
        depth: u16,
    ) -> Result<IoQueuePair<M, C>, NvmeError>
    where
        M: Clone + Send,
        C: Clone + Send,
    {
        if self.failed {
            return Err(NvmeError::Failed);
        }
        if qid == 0 || qid > self.info.io_queues {
            return Err(NvmeError::InvalidArgument("qid"));
        }
        let max_depth = self.cap.max_queue_entries().min(MAX_IO_DEPTH as u32);
        if depth < 2 || depth as u32 > max_depth {
            return Err(NvmeError::InvalidArgument("depth"));
        }
        if self.live[qid as usize] {
            return Err(NvmeError::QueueInUse(qid));
        }
        if self.mmio.len() < spec::cq_doorbell(qid, self.stride) + 4 {
            return Err(NvmeError::InvalidArgument("qid beyond BAR0 doorbells"));
        }
        let nslots = IoQueuePair::<M, C>::slots_for(depth, &self.cfg) as usize;
        let sq = dma.alloc(depth as usize * 64, PAGE_SIZE)?;
        let cq = match dma.alloc(depth as usize * 16, PAGE_SIZE) {
            Ok(cq) => cq,
            Err(e) => {
                dma.free(sq);
                return Err(e.into());
            }
        };
        // The hot paths store SQ entries and load CQ entries as aligned quadwords, checked
        // against the ring once here: a board whose allocator broke the alignment contract is
        // refused (typed), not found out as a queue that never completes.
        let (sq, cq) = match (DmaRing::new(sq, depth), DmaRing::new(cq, depth)) {
            (Ok(sq), Ok(cq)) => (sq, cq),
            (sq, cq) => {
                let mut err = DmaError::BadRequest;
                for r in [sq.map(DmaRing::into_region), cq.map(DmaRing::into_region)] {
                    match r {
                        Ok(region) => dma.free(region),
                        Err((region, e)) => {
                            err = e;
                            dma.free(region);
                        }
                    }
                }
                return Err(err.into());
            }
        };
        let prp = dma.alloc(nslots * self.cfg.prp_list_pages * PAGE_SIZE, PAGE_SIZE)?;
        let shadow = self
            .shadow
            .as_mut()
            .and_then(|s| s.parts.get_mut(qid as usize).and_then(Option::take));
        let mut qp = IoQueuePair::new(QpairParams {
            mmio: self.mmio.clone(),
            clock: self.clock.clone(),
            qid,
            depth,
            stride: self.stride,
            sq,
            cq,
            prp,
            shadow,
            namespaces: self.namespaces.clone(),
            max_transfer: self.info.max_transfer,
            write_zeroes: self.info.write_zeroes,
            deallocate: self.info.deallocate,
            crdt: self.info.crdt,
            cfg: self.cfg,
        })?;
        if let Err(e) = self.create_queues_on_device(&qp) {
            if let (Some(sh), Some(part)) = (self.shadow.as_mut(), qp.take_shadow()) {
                sh.parts[qid as usize] = Some(part);
            }
            return Err(e);
        }
        self.live.set(qid as usize, true);
        keel_log::info!("nvme: io queue {} depth {}", qid, depth);
        Ok(qp)
    }

    fn create_queues_on_device(&mut self, qp: &IoQueuePair<M, C>) -> Result<(), NvmeError> {
        let qid = qp.qid() as u32;
        let qsize = qp.entries() as u32 - 1;
        let mut cq = SqEntry::new(admin_op::CREATE_IO_CQ, 0, 0);
        cq.prp1 = qp.cq_bus();
        cq.cdw10 = (qsize << 16) | qid;
        cq.cdw11 = 1; // PC = 1, IEN = 0: physically contiguous, polled
        self.admin_command(cq)?;
        let mut sq = SqEntry::new(admin_op::CREATE_IO_SQ, 0, 0);
        sq.prp1 = qp.sq_bus();
        sq.cdw10 = (qsize << 16) | qid;
        sq.cdw11 = (qid << 16) | 1; // CQID, PC = 1, priority urgent-less (ignored under RR)
        if let Err(e) = self.admin_command(sq) {
            let mut del = SqEntry::new(admin_op::DELETE_IO_CQ, 0, 0);
            del.cdw10 = qid;
            let _ = self.admin_command(del);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes an I/O queue pair on the device. The pair must be drained (no tags in flight,
    /// no timed-out commands the device still owns); otherwise it is handed back.
    #[allow(clippy::result_large_err)]
    pub fn delete_io_qpair(
        &mut self,
        dma: &impl DmaAllocator,
        mut qp: IoQueuePair<M, C>,
    ) -> Result<(), (NvmeError, IoQueuePair<M, C>)> {
        if qp.busy_slots() != 0 {
            return Err((NvmeError::QueueBusy, qp));
        }
        let qid = qp.qid();
        let mut sq = SqEntry::new(admin_op::DELETE_IO_SQ, 0, 0);
        sq.cdw10 = qid as u32;
        if let Err(e) = self.admin_command(sq) {
            return Err((e, qp));
        }
        let mut cq = SqEntry::new(admin_op::DELETE_IO_CQ, 0, 0);
        cq.cdw10 = qid as u32;
        if let Err(e) = self.admin_command(cq) {
            return Err((e, qp));
        }
        self.live.set(qid as usize, false);
        if let (Some(sh), Some(part)) = (self.shadow.as_mut(), qp.take_shadow()) {
            let _ = part.0.fill(0, part.0.len(), 0);
            sh.parts[qid as usize] = Some(part);
        }
        qp.release(dma);
        Ok(())
    }

    /// Asks the controller to abort command `cid` on submission queue `sqid`. Returns `true`
    /// when the controller reports it aborted the command (its completion then arrives with
    /// "Command Abort Requested" status, which the queue pair reports as `IoError::Aborted`:
    /// that completion is what hands the command's buffer back, timed out or not).
    pub fn abort(&mut self, sqid: u16, cid: u16) -> Result<bool, NvmeError> {
        let mut sqe = SqEntry::new(admin_op::ABORT, 0, 0);
        sqe.cdw10 = sqid as u32 | ((cid as u32) << 16);
        let dw0 = self.admin_command(sqe)?;
        Ok(dw0 & 1 == 0)
    }

    /// Timeout recovery for this controller's queue pairs, escalating like SPDK and Linux:
    ///
    /// 1. completions already posted are reaped (a late completion settles a timed-out command
    ///    with no abort at all);
    /// 2. each timed-out command still on the device gets an Abort, at most
    ///    `min(Config::max_aborts, ACL + 1)` per call, one outstanding at a time; a confirmed
    ///    abort's completion ("Abort Requested") is waited for, at most
    ///    `Config::abort_wait_ms`;
    /// 3. a pair that still holds a timed-out command (abort refused, not confirmed in time, or
    ///    beyond the limit) is reset on its own ([`Controller::reset_queue`]): deleted and
    ///    recreated, its other commands resubmitted;
    /// 4. the controller is reset ([`Controller::reset`]) when it is fatal (CSTS.CFS), gone
    ///    (all-ones registers), a pair has failed, or an admin command of a lower level fails
    ///    or times out.
    ///
    /// Every live queue pair must be passed in, lent by its owner for the call (nobody else
    /// polls them meanwhile). No outcome is reported here: each goes to its pair's ready list,
    /// and the owner reports it on its next poll, so every command still completes exactly
    /// once, to its owner, and a buffer goes back only when the device is done with it.
    /// Admin commands are synchronous: run this off the pollers (on the worker core).
    pub fn recover(
        &mut self,
        qpairs: &mut [&mut IoQueuePair<M, C>],
    ) -> Result<Recovery, NvmeError> {
        let mut rep = Recovery::default();
        let fatal = self.failed || self.csts().fatal() || qpairs.iter().any(|q| q.is_failed());
        if !fatal {
            match self.recover_below_reset(qpairs, &mut rep) {
                Ok(()) => return Ok(rep),
                Err(e) => keel_log::warn!("nvme: recovery escalates to a controller reset: {}", e),
            }
        }
        rep.controller_reset = true;
        self.reset(qpairs)?;
        Ok(rep)
    }

    /// Levels 1 to 3 of [`Controller::recover`]; an error asks for the controller reset.
    fn recover_below_reset(
        &mut self,
        qpairs: &mut [&mut IoQueuePair<M, C>],
        rep: &mut Recovery,
    ) -> Result<(), NvmeError> {
        for qp in qpairs.iter_mut() {
            rep.reaped = rep
                .reaped
                .saturating_add(u16::try_from(qp.reap_deferred()).unwrap_or(u16::MAX));
        }
        let limit = self.cfg.max_aborts.min(self.info.abort_limit) as u16;
        let mut reset = QidSet::ZERO;
        let mut waiting = false;
        for qp in qpairs.iter_mut() {
            let qid = qp.qid();
            while let Some(cid) = qp.pop_abort_candidate() {
                if !qp.is_zombie(cid) {
                    continue; // it completed meanwhile
                }
                if rep.aborts_sent >= limit {
                    reset.set(qid as usize, true);
                    continue;
                }
                rep.aborts_sent += 1;
                self.stats.aborts_sent += 1;
                if self.abort(qid, cid)? {
                    rep.aborts_confirmed += 1;
                    self.stats.aborts_confirmed += 1;
                    waiting = true;
                } else {
                    reset.set(qid as usize, true);
                }
            }
        }
        if waiting {
            let deadline = self
                .clock
                .now_ns()
                .saturating_add(self.cfg.abort_wait_ms.saturating_mul(1_000_000));
            loop {
                for qp in qpairs.iter_mut() {
                    qp.reap_deferred();
                }
                let left = qpairs
                    .iter()
                    .any(|q| !reset[q.qid() as usize] && q.timed_out_slots() != 0);
                if !left || self.clock.now_ns() > deadline {
                    break;
                }
                self.clock.delay_us(10);
            }
        }
        for qp in qpairs.iter_mut() {
            if reset[qp.qid() as usize] || qp.timed_out_slots() != 0 {
                self.reset_queue(qp)?;
                rep.queue_resets += 1;
            } else {
                qp.settled();
            }
        }
        Ok(())
    }

    /// Resets one I/O queue pair: Delete I/O SQ (the controller aborts every command on it and
    /// will not touch their buffers again), the completions posted before that are reaped,
    /// Delete I/O CQ, then both are created again on the same memory. Commands that had timed
    /// out complete with `IoError::Timeout`; the others are resubmitted (within
    /// `Config::max_retries`) or fail with `IoError::DeviceReset`. Outcomes reach the owner on
    /// its next poll. On an error the caller resets the controller (which recovers this pair
    /// with the others).
    pub fn reset_queue(&mut self, qp: &mut IoQueuePair<M, C>) -> Result<(), NvmeError> {
        let qid = qp.qid();
        if !self.live[qid as usize] {
            return Err(NvmeError::InvalidArgument("queue pair not live"));
        }
        keel_log::warn!("nvme: q{} reset (delete and recreate)", qid);
        let mut sq = SqEntry::new(admin_op::DELETE_IO_SQ, 0, 0);
        sq.cdw10 = qid as u32;
        self.admin_command(sq)?;
        qp.reap_deferred();
        let mut cq = SqEntry::new(admin_op::DELETE_IO_CQ, 0, 0);
        cq.cdw10 = qid as u32;
        self.admin_command(cq)?;
        // The device owns none of the pair's commands any more.
        qp.prepare_reset();
        self.create_queues_on_device(qp)?;
        qp.after_reset_ok();
        self.stats.queue_resets += 1;
        Ok(())
    }

    /// Get Features: returns DW0 of the completion.
    pub fn get_features(&mut self, fid: u8, cdw11: u32) -> Result<u32, NvmeError> {
        let mut sqe = SqEntry::new(admin_op::GET_FEATURES, 0, 0);
        sqe.cdw10 = fid as u32;
        sqe.cdw11 = cdw11;
        self.admin_command(sqe)
    }

    /// Controller reset (CC.EN 1 -> 0 -> 1) with recovery of every live I/O queue pair.
    ///
    /// All live queue pairs must be passed in (quiesced: nobody else uses them during the
    /// call). Their rings are recreated on the device; commands in flight are resubmitted
    /// (counted against `max_retries`) or failed with `IoError::DeviceReset`; commands that had
    /// timed out (still owned by the device until now) complete with `IoError::Timeout`, the
    /// controller being quiesced (CSTS.RDY = 0) before they are. If recovery fails, every
    /// pending tag is failed, the pairs refuse new work and the controller is marked failed.
    pub fn reset(&mut self, qpairs: &mut [&mut IoQueuePair<M, C>]) -> Result<(), NvmeError> {
        for qid in self.live.iter_ones().map(|q| q as u16) {
            if !qpairs.iter().any(|q| q.qid() == qid) {
                return Err(NvmeError::MissingQueuePair(qid));
            }
        }
        self.stats.resets += 1;
        keel_log::warn!("nvme: controller reset");
        let r = self.reset_inner(qpairs);
        match r {
            Ok(()) => {
                self.failed = false;
                for qp in qpairs.iter_mut() {
                    qp.after_reset_ok();
                }
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                for qp in qpairs.iter_mut() {
                    qp.after_reset_failed();
                }
                Err(e)
            }
        }
    }

    fn reset_inner(&mut self, qpairs: &mut [&mut IoQueuePair<M, C>]) -> Result<(), NvmeError> {
        self.failed = false;
        self.disable()?;
        for qp in qpairs.iter_mut() {
            qp.prepare_reset();
        }
        if let Some(sh) = &self.shadow {
            for (db, ei) in sh.parts.iter().flatten() {
                db.fill(0, db.len(), 0)?;
                ei.fill(0, ei.len(), 0)?;
            }
        }
        self.enable()?;
        self.enable_acre();
        self.select_command_sets()?;
        self.negotiate_queues()?;
        if self.shadow.is_some() {
            self.send_dbbuf()?;
        }
        for qp in qpairs.iter() {
            self.create_queues_on_device(qp)?;
        }
        Ok(())
    }

    /// Normal shutdown (CC.SHN), waiting for CSTS.SHST = complete.
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let cc = self.cc();
        self.set_cc(cc.with_shn(Shn::Normal));
        self.wait_csts(|c| c.shst() == Shst::Complete, Step::Shutdown)
    }
}

/// The LBA format FLBAS selects (bits 3:0, and 6:5 as upper bits with more than 16 formats).
fn lba_format_index(id: &spec::IdentifyNamespace) -> usize {
    let flbas = id.flbas;
    let mut idx = (flbas & 0xF) as usize;
    if id.nlbaf >= 16 {
        idx |= (((flbas >> 5) & 0x3) as usize) << 4;
    }
    idx
}

/// Validates Identify Namespace data.
pub fn parse_namespace(nsid: u32, id: &spec::IdentifyNamespace) -> Result<Namespace, NvmeError> {
    let bad = |b| Err(NvmeError::BadIdentify(b));
    let nlbaf = id.nlbaf as usize;
    let flbas = id.flbas;
    let idx = lba_format_index(id);
    if idx > nlbaf || idx >= id.lbaf.len() {
        return bad(BadIdentify::LbaFormatIndex);
    }
    let lbaf = id.lbaf[idx];
    if !(9..=16).contains(&lbaf.lbads) {
        return bad(BadIdentify::LbaSize);
    }
    let ms = lbaf.ms.get();
    let extended = flbas & 0x10 != 0;
    let pi = match id.dps & 0x7 {
        0 => None,
        1 => Some(PiType::Type1),
        2 => Some(PiType::Type2),
        3 => Some(PiType::Type3),
        _ => return bad(BadIdentify::ProtectionType),
    };
    // Protection information takes 8 bytes (16-bit guard) of the metadata; with PRACT and
    // metadata that is PI alone, no metadata is transferred (NVMe 1.4 8.3.1.1; QEMU's
    // nvme_dif_rw), separate or extended alike.
    let format = match (ms, pi) {
        (0, None) => NsFormat::Plain,
        (0..=7, Some(_)) => return bad(BadIdentify::ProtectionType),
        (8, Some(t)) => NsFormat::Pract(t),
        (_, _) if extended => NsFormat::ExtendedMetadata,
        _ => NsFormat::SeparateMetadata,
    };
    let nsze = id.nsze.get();
    let ncap = id.ncap.get();
    let block_size = 1u32 << lbaf.lbads;
    if nsze == 0 || ncap > nsze || nsze.checked_mul(block_size as u64).is_none() {
        return bad(BadIdentify::NamespaceSize);
    }
    Ok(Namespace {
        nsid,
        blocks: nsze,
        block_size,
        metadata: ms,
        format,
        extended,
        pi,
        pi_offset: if id.dps & 0x8 != 0 {
            0
        } else {
            ms.saturating_sub(8)
        },
        pi_guard64: false,
        command_set: spec::csi::NVM,
        zoned: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    fn ns(nlbaf: u8, flbas: u8, lbads: &[u8], nsze: u64, ncap: u64) -> spec::IdentifyNamespace {
        let mut id = spec::IdentifyNamespace::new_zeroed();
        id.nsze.set(nsze);
        id.ncap.set(ncap);
        id.nlbaf = nlbaf;
        id.flbas = flbas;
        for (i, l) in lbads.iter().enumerate() {
            id.lbaf[i].lbads = *l;
        }
        id
    }

    #[test]
    fn namespace_formats() {
        let n = parse_namespace(1, &ns(1, 0, &[9, 12], 100, 100)).unwrap();
        assert_eq!((n.block_size, n.blocks), (512, 100));
        let n = parse_namespace(2, &ns(1, 1, &[9, 12], 100, 50)).unwrap();
        assert_eq!(n.block_size, 4096);
        // Upper FLBAS bits only count with more than 16 formats.
        let mut many = [9u8; 20];
        many[17] = 12;
        let n = parse_namespace(3, &ns(19, 0x21, &many, 8, 8)).unwrap();
        assert_eq!(n.block_size, 4096);
    }

    #[test]
    fn absurd_namespaces_rejected() {
        let e = |id| parse_namespace(1, &id).unwrap_err();
        use BadIdentify::*;
        assert_eq!(
            e(ns(0, 1, &[9, 12], 8, 8)),
            NvmeError::BadIdentify(LbaFormatIndex)
        );
        assert_eq!(e(ns(0, 0, &[3], 8, 8)), NvmeError::BadIdentify(LbaSize));
        assert_eq!(e(ns(0, 0, &[40], 8, 8)), NvmeError::BadIdentify(LbaSize));
        assert_eq!(
            e(ns(0, 0, &[9], 0, 0)),
            NvmeError::BadIdentify(NamespaceSize)
        );
        assert_eq!(
            e(ns(0, 0, &[9], 8, 9)),
            NvmeError::BadIdentify(NamespaceSize)
        );
        assert_eq!(
            e(ns(0, 0, &[12], u64::MAX / 2, 1)),
            NvmeError::BadIdentify(NamespaceSize)
        );
        let mut pi_without_metadata = ns(0, 0, &[9], 8, 8);
        pi_without_metadata.dps = 1;
        assert_eq!(
            e(pi_without_metadata),
            NvmeError::BadIdentify(ProtectionType)
        );
        let mut pi_type_7 = ns(0, 0, &[9], 8, 8);
        pi_type_7.lbaf[0].ms.set(8);
        pi_type_7.dps = 7;
        assert_eq!(e(pi_type_7), NvmeError::BadIdentify(ProtectionType));
    }

    /// Each metadata / protection combination gets the format the I/O path needs: PRACT only
    /// where the metadata is PI alone, a refusal where a metadata buffer would be needed
    /// (never MPTR = 0), and extended LBAs beyond PI refused for this namespace alone.
    #[test]
    fn metadata_and_protection_formats() {
        let format = |flbas: u8, ms: u16, dps: u8| {
            let mut id = ns(0, flbas, &[9], 8, 8);
            id.lbaf[0].ms.set(ms);
            id.dps = dps;
            parse_namespace(1, &id).map(|n| n.format)
        };
        assert_eq!(format(0, 0, 0), Ok(NsFormat::Plain));
        assert_eq!(format(0, 8, 1), Ok(NsFormat::Pract(PiType::Type1)));
        assert_eq!(format(0x10, 8, 2), Ok(NsFormat::Pract(PiType::Type2)));
        assert_eq!(format(0, 8, 3 | 0x8), Ok(NsFormat::Pract(PiType::Type3)));
        assert_eq!(format(0, 8, 0), Ok(NsFormat::SeparateMetadata));
        assert_eq!(format(0, 16, 1), Ok(NsFormat::SeparateMetadata));
        assert_eq!(format(0x10, 8, 0), Ok(NsFormat::ExtendedMetadata));
        assert_eq!(format(0x10, 16, 1), Ok(NsFormat::ExtendedMetadata));
        assert_eq!(
            NsFormat::Pract(PiType::Type1).prinfo(),
            (0x1400_0000 | 1 << 29, true)
        );
        assert_eq!(
            NsFormat::Pract(PiType::Type3).prinfo(),
            (1 << 29 | 1 << 28, false)
        );
        assert_eq!(NsFormat::Plain.prinfo(), (0, false));
        assert_eq!(
            NsFormat::SeparateMetadata.refusal(),
            Some(keel_blockdev::SubmitError::MetadataRequired)
        );
        assert_eq!(NsFormat::Pract(PiType::Type2).refusal(), None);
    }
}
