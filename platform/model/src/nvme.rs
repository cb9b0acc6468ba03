//! A software NVMe 1.4 controller for host tests of `keel-nvme`.
//!
//! Commands are executed synchronously when the driver writes an SQ tail doorbell (or on
//! [`NvmeModel::step`], which also picks up shadow-doorbell tails). Structures are parsed from
//! raw bytes at the spec offsets, independently of the driver's types.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::dma::HostDma;

const PAGE: u64 = 4096;

/// One namespace of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsConfig {
    /// Namespace ID (1-based, as Identify reports it).
    pub nsid: u32,
    /// Capacity in logical blocks (of `1 << lba_shift` bytes each); the model keeps them all in
    /// memory.
    pub blocks: u64,
    /// log2 of the LBA data size (9 = 512 B, 12 = 4 KiB).
    pub lba_shift: u8,
}

/// Model parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The namespaces, each backed by zeroed memory at start.
    pub namespaces: Vec<NsConfig>,
    /// Identify MDTS (2^n * 4 KiB; 0 = unlimited).
    pub mdts: u8,
    /// CAP.MQES (0-based).
    pub mqes: u16,
    /// CAP.DSTRD.
    pub dstrd: u8,
    /// I/O queue pairs the model grants.
    pub max_io_queues: u16,
    /// Advertise Doorbell Buffer Config (OACS bit 8).
    pub doorbell_buffer: bool,
    /// With shadow doorbells: act like a controller that polls the shadow buffer and never asks
    /// for MMIO doorbells (EventIdx is left alone); call [`NvmeModel::step`] to let it "poll".
    pub shadow_polling: bool,
    /// Identify Controller VWC: advertise a volatile write cache (advertising only; see
    /// [`NvmeModel::set_volatile_cache`] to simulate one).
    pub vwc: bool,
    /// Advertise (ONCS bit 3) and execute Write Zeroes.
    pub write_zeroes: bool,
    /// Advertise (ONCS bit 2) and execute Dataset Management (Deallocate).
    pub dsm: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            namespaces: vec![NsConfig {
                nsid: 1,
                blocks: 8192,
                lba_shift: 9,
            }],
            mdts: 5,
            mqes: 1023,
            dstrd: 0,
            max_io_queues: 4,
            doorbell_buffer: true,
            shadow_polling: false,
            vwc: true,
            write_zeroes: true,
            dsm: true,
        }
    }
}

/// Ways to make the model misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave correctly.
    #[default]
    None,
    /// Fetch no I/O commands (they stay in the SQ until the fault is cleared and a doorbell or
    /// `step` comes, or the controller is reset).
    Stall,
    /// Post every I/O completion twice.
    DuplicateCompletion,
    /// Post I/O completions with the wrong phase tag (the driver never sees them).
    WrongPhase,
    /// Set CSTS.CFS on the next I/O doorbell and stop working until reset.
    FatalStatus,
    /// Identify Namespace reports an LBA data size of 8 bytes.
    AbsurdIdentify,
    /// Fail the next `n` I/O commands with Internal Error (transient, DNR = 0).
    TransientError(u32),
    /// Fail every I/O command with Internal Error and DNR = 1.
    PermanentError,
    /// Fail every Write with a media Write Fault (SCT 2, SC 0x80) and DNR = 1; other commands
    /// succeed.
    WriteFault,
    /// Complete every I/O command with this raw status field (`SC << 1 | SCT << 9 | ...`; the
    /// phase bit is ignored).
    Status(u16),
    /// XOR the CID of every I/O completion with this mask.
    CorruptCid(u16),
    /// CC.EN = 1 never sets CSTS.RDY (the controller never becomes ready).
    NeverReady,
    /// CC.EN = 1 sets CSTS.CFS instead of CSTS.RDY.
    FatalOnEnable,
    /// Zone appends write where they should but report the LBA written plus this offset.
    AppendLba(i64),
    /// Zone reports carry this descriptor count in their header, whatever they hold.
    ZoneReportCount(u64),
    /// The device fell off the bus (surprise removal): every register reads all ones,
    /// writes and doorbells are lost, nothing is fetched, completed or DMAed any more.
    Removed,
}

/// A zoned namespace of the model (see [`NvmeModel::set_zoned`]): sequential-write-required
/// zones with write pointers, zone append, Zone Management Send and Receive, the ZNS errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneConfig {
    /// Blocks per zone.
    pub zone_blocks: u64,
    /// Writable blocks per zone (at most `zone_blocks`).
    pub capacity: u64,
    /// Most open zones (implicitly or explicitly); 0 = no limit.
    pub max_open: u32,
}

/// Zone states as the model keeps them (the ZS codes).
mod zs {
    pub const EMPTY: u8 = 0x1;
    pub const IOPEN: u8 = 0x2;
    pub const EOPEN: u8 = 0x3;
    pub const CLOSED: u8 = 0x4;
    pub const FULL: u8 = 0xE;
    pub const OFFLINE: u8 = 0xF;
    pub const READ_ONLY: u8 = 0xD;
}

#[derive(Debug, Clone)]
struct Zones {
    cfg: ZoneConfig,
    /// (state, write pointer) per zone.
    zones: Vec<(u8, u64)>,
    /// Per zone: the write pointer a power cut cannot take away (as of the last Flush, a
    /// reset or a finish; see [`NvmeModel::power_cut`]).
    durable_wp: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Sq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Debug, Clone)]
struct Cq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    phase: bool,
    pending: VecDeque<[u8; 16]>,
}

struct Disk {
    cfg: NsConfig,
    data: Vec<u8>,
    /// Attached to the controller (a detached namespace identifies as zeroes and fails I/O).
    active: bool,
    /// With a volatile write cache (see [`NvmeModel::set_volatile_cache`]): the media image as of
    /// the last completed Flush, and the blocks written since.
    durable: Option<Vec<u8>>,
    dirty: std::collections::BTreeSet<u64>,
    zones: Option<Zones>,
}

impl Disk {
    fn mark_dirty(&mut self, slba: u64, nlb: u64) {
        if self.durable.is_some() {
            self.dirty.extend(slba..slba + nlb);
        }
    }

    fn flush(&mut self) {
        if let Some(d) = self.durable.as_mut() {
            d.copy_from_slice(&self.data);
            self.dirty.clear();
        }
        if let Some(z) = self.zones.as_mut() {
            for (i, &(state, wp)) in z.zones.iter().enumerate() {
                if state != zs::OFFLINE {
                    z.durable_wp[i] = wp;
                }
            }
        }
    }
}

struct State {
    cfg: ModelConfig,
    mem: HostDma,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    disks: Vec<Disk>,
    fault: Fault,
    granted: u16,
    dbbuf: Option<(u64, u64)>,
    sq_doorbells: BTreeMap<u16, u64>,
    cq_doorbells: BTreeMap<u16, u64>,
    commands: BTreeMap<u8, u64>,
    io_commands: u64,
    /// The latest I/O submission queue entries fetched (oldest first, at most
    /// [`IO_SQE_RECORD`]), as the driver wrote them.
    io_sqes: std::collections::VecDeque<[u8; 64]>,
    log: Vec<String>,
    /// (CNS, byte offset, bytes) written over Identify data before it is returned.
    id_patches: Vec<(u8, usize, Vec<u8>)>,
    /// Reads and writes still to be taken and held (see [`NvmeModel::hold_next_io`]).
    hold: u32,
    /// Reads and writes still to be executed normally before holding starts (see
    /// [`NvmeModel::hold_io_after`]).
    hold_skip: u64,
    /// Controller resets (CC.EN 1 -> 0) so far.
    resets: u64,
    /// Abort confirms (and completes "Abort Requested") a held command it names.
    abort_works: bool,
    /// Identify Controller ACL (0-based).
    acl: u8,
    /// Identify Controller CRDT1..3 (100 ms units).
    crdt: [u16; 3],
    /// Host Behavior Support ACRE as last set (CC.EN = 0 clears it).
    acre: bool,
    /// Commands fetched and held: the device owns them until `release_held` or a reset.
    held: Vec<Held>,
    /// DW1 of the completion of the command being executed.
    dw1: u32,
    /// SMART / health, error log, asynchronous events.
    health: Health,
}

/// Health counters, the error log and asynchronous events, as QEMU's controller keeps them.
#[derive(Default)]
struct Health {
    /// Composite temperature, kelvin.
    temperature: u16,
    /// Over and under temperature thresholds, kelvin.
    thresh_over: u16,
    thresh_under: u16,
    /// Asynchronous Event Configuration (Set Features 0x0B).
    async_config: u32,
    /// Bytes read and written by I/O commands, and the commands.
    bytes_read: u64,
    bytes_written: u64,
    read_cmds: u64,
    write_cmds: u64,
    /// Media errors reported.
    media_errors: u64,
    /// Error log: every failed I/O command (newest last), and the running error count.
    errors: VecDeque<[u8; 64]>,
    error_count: u64,
    /// Outstanding AERs: (CID, SQ head after fetching it).
    aers: VecDeque<(u16, u16)>,
    /// Events waiting for an AER: (type, info, log page).
    events: VecDeque<(u8, u8, u8)>,
    /// Event types reported and not yet cleared by reading their log page (bit per type).
    masked: u8,
    /// Namespaces changed since the Changed Namespace List was last read.
    changed: std::collections::BTreeSet<u32>,
    /// Completions of AERs posted (for tests).
    aer_completions: u64,
}

/// Most AERs the model takes at once (Identify AERL + 1).
const MODEL_AERL: u8 = 3;
/// Error log entries the model keeps (Identify ELPE + 1).
const MODEL_ERROR_ENTRIES: usize = 8;

/// A read or write the model fetched and has not finished (a command that "times out").
struct Held {
    sqid: u16,
    cqid: u16,
    sq_head: u16,
    cid: u16,
    cmd: [u8; 64],
    /// A write's data, read from host memory when the command was fetched.
    data: Option<Vec<u8>>,
}

/// The model; cheap to clone (shared state).
#[derive(Clone)]
pub struct NvmeModel {
    st: Arc<Mutex<State>>,
}

/// BAR0 of the model: implements [`keel_hal::Mmio`]; `Clone + Send`.
#[derive(Clone)]
pub struct ModelMmio {
    st: Arc<Mutex<State>>,
}

/// How many I/O submission queue entries [`NvmeModel::io_sqes`] keeps.
const IO_SQE_RECORD: usize = 256;

fn lock(st: &Mutex<State>) -> MutexGuard<'_, State> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

const BAR_LEN: usize = 0x4000;

/// Controller registers as the model decodes them: on its own, from the spec's bit positions,
/// not with keel-nvme's register types (keel-model does not depend on keel-nvme; and a layout
/// mistake in the driver's types then shows up as a disagreement with the model in tests).
mod regs {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1C;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    pub const DOORBELLS: usize = 0x1000;

    /// What the model reports in VS: NVMe 1.4.0.
    pub const VERSION_1_4: u32 = 1 << 16 | 4 << 8;

    /// `width` bits of `v` from bit `lo` up.
    pub const fn field(v: u32, lo: u32, width: u32) -> u32 {
        (v >> lo) & ((1 << width) - 1)
    }

    // CAP bit positions.
    pub const CAP_CQR: u32 = 16;
    pub const CAP_TO: u32 = 24;
    pub const CAP_DSTRD: u32 = 32;
    pub const CAP_CSS: u32 = 37;
    pub const CAP_MPSMAX: u32 = 52;

    /// CC as the model reads it.
    pub struct Cc {
        pub en: bool,
        pub css: u32,
        pub mps: u32,
        pub shn: u32,
        pub iosqes: u32,
        pub iocqes: u32,
    }

    impl Cc {
        pub fn decode(v: u32) -> Self {
            Self {
                en: field(v, 0, 1) != 0,
                css: field(v, 4, 3),
                mps: field(v, 7, 4),
                shn: field(v, 14, 2),
                iosqes: field(v, 16, 4),
                iocqes: field(v, 20, 4),
            }
        }
    }

    pub const CSTS_RDY: u32 = 1 << 0;
    pub const CSTS_CFS: u32 = 1 << 1;
    pub const CSTS_SHST_MASK: u32 = 3 << 2;
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

    /// AQA: (ASQS, ACQS), both 0-based.
    pub fn aqa(v: u32) -> (u32, u32) {
        (field(v, 0, 12), field(v, 16, 12))
    }
}
use regs::{CSTS_CFS, CSTS_RDY};

impl NvmeModel {
    /// A controller per `cfg`, disabled (CC.EN = 0), no fault, every namespace zeroed; it reaches
    /// host memory (queues, PRPs, data) through `mem`, which checks every access.
    pub fn new(cfg: ModelConfig, mem: HostDma) -> Self {
        let disks = cfg
            .namespaces
            .iter()
            .map(|n| Disk {
                cfg: *n,
                data: vec![0u8; (n.blocks << n.lba_shift) as usize],
                active: true,
                durable: None,
                dirty: Default::default(),
                zones: None,
            })
            .collect();
        let st = State {
            cfg,
            mem,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            disks,
            fault: Fault::None,
            granted: 0,
            dbbuf: None,
            sq_doorbells: BTreeMap::new(),
            cq_doorbells: BTreeMap::new(),
            commands: BTreeMap::new(),
            io_commands: 0,
            io_sqes: std::collections::VecDeque::new(),
            log: Vec::new(),
            id_patches: Vec::new(),
            hold: 0,
            hold_skip: 0,
            resets: 0,
            abort_works: false,
            acl: 3,
            crdt: [0; 3],
            acre: false,
            held: Vec::new(),
            dw1: 0,
            health: Health {
                temperature: 323,
                thresh_over: 343,
                ..Health::default()
            },
        };
        Self {
            st: Arc::new(Mutex::new(st)),
        }
    }

    /// A handle to this controller's BAR0 registers, for the driver.
    pub fn mmio(&self) -> ModelMmio {
        ModelMmio {
            st: self.st.clone(),
        }
    }

    /// Makes namespace `nsid` zoned (before bring-up): the controller then offers CAP.CSS
    /// bit 6, the I/O command set vectors and profile, zoned Identify (CNS 5/6), and executes
    /// the zoned command set once CC.CSS = 6. Every zone starts empty.
    pub fn set_zoned(&self, nsid: u32, cfg: ZoneConfig) {
        let mut st = lock(&self.st);
        if let Some(d) = st.disks.iter_mut().find(|d| d.cfg.nsid == nsid) {
            let n = d.cfg.blocks / cfg.zone_blocks.max(1);
            d.zones = Some(Zones {
                cfg,
                zones: (0..n).map(|i| (zs::EMPTY, i * cfg.zone_blocks)).collect(),
                durable_wp: (0..n).map(|i| i * cfg.zone_blocks).collect(),
            });
        }
    }

    /// `(state code, write pointer)` of every zone of namespace `nsid` (empty if not zoned).
    pub fn zones(&self, nsid: u32) -> Vec<(u8, u64)> {
        let st = lock(&self.st);
        st.disks
            .iter()
            .find(|d| d.cfg.nsid == nsid)
            .and_then(|d| d.zones.as_ref())
            .map(|z| z.zones.clone())
            .unwrap_or_default()
    }

    /// Forces zone `zone` (an index) of namespace `nsid` into state `code` (a ZS code: 0xD read
    /// only, 0xF offline, ...), as a drive's own media management would; the write pointer is
    /// kept. A read-only zone refuses writes and appends (Zone Is Read Only) and resets.
    pub fn set_zone_state(&self, nsid: u32, zone: usize, code: u8) {
        let mut st = lock(&self.st);
        if let Some(z) = st
            .disks
            .iter_mut()
            .find(|d| d.cfg.nsid == nsid)
            .and_then(|d| d.zones.as_mut())
        {
            if let Some(e) = z.zones.get_mut(zone) {
                e.0 = code;
            }
        }
    }

    /// Replaces the active fault with `f` ([`Fault::None`] clears it).
    pub fn set_fault(&self, f: Fault) {
        lock(&self.st).fault = f;
    }

    /// Overwrites bytes `offset..` of every Identify data structure with this CNS (0 =
    /// namespace, 1 = controller, 2 = active namespace list) before it is returned; bytes past
    /// 4096 are ignored.
    pub fn patch_identify(&self, cns: u8, offset: usize, bytes: &[u8]) {
        lock(&self.st)
            .id_patches
            .push((cns, offset, bytes.to_vec()));
    }

    /// Drops every Identify patch.
    pub fn clear_identify_patches(&self) {
        lock(&self.st).id_patches.clear();
    }

    /// MMIO SQ tail doorbell writes seen for queue `qid`.
    pub fn sq_doorbell_writes(&self, qid: u16) -> u64 {
        lock(&self.st).sq_doorbells.get(&qid).copied().unwrap_or(0)
    }

    /// MMIO CQ head doorbell writes seen for queue `qid`.
    pub fn cq_doorbell_writes(&self, qid: u16) -> u64 {
        lock(&self.st).cq_doorbells.get(&qid).copied().unwrap_or(0)
    }

    /// How many commands with this admin opcode were executed.
    pub fn admin_commands(&self, opcode: u8) -> u64 {
        lock(&self.st).commands.get(&opcode).copied().unwrap_or(0)
    }

    /// I/O commands executed (fetched and completed).
    pub fn io_commands(&self) -> u64 {
        lock(&self.st).io_commands
    }

    /// The latest I/O submission queue entries fetched, oldest first (at most 256), byte for
    /// byte as the driver built them: for tests of fields the model does not act on (the
    /// protection information bits, CDW3, MPTR).
    pub fn io_sqes(&self) -> Vec<[u8; 64]> {
        lock(&self.st).io_sqes.iter().copied().collect()
    }

    /// Whether the driver set up shadow doorbells.
    pub fn shadow_enabled(&self) -> bool {
        lock(&self.st).dbbuf.is_some()
    }

    /// Problems the model noticed in what the driver did (bad PRPs, bad registers, ...).
    pub fn log(&self) -> Vec<String> {
        lock(&self.st).log.clone()
    }

    /// Bytes of namespace `nsid`'s backing store.
    pub fn disk_read(&self, nsid: u32, byte_off: usize, len: usize) -> Vec<u8> {
        let st = lock(&self.st);
        let d = st
            .disks
            .iter()
            .find(|d| d.cfg.nsid == nsid)
            .expect("no such namespace");
        d.data[byte_off..byte_off + len].to_vec()
    }

    /// Writes `data` at byte `byte_off` of namespace `nsid`'s backing store, bypassing the
    /// controller (and, with a volatile cache simulated, straight to the media image too).
    /// Panics if there is no such namespace or the range is past its end.
    pub fn disk_write(&self, nsid: u32, byte_off: usize, data: &[u8]) {
        let mut st = lock(&self.st);
        let d = st
            .disks
            .iter_mut()
            .find(|d| d.cfg.nsid == nsid)
            .expect("no such namespace");
        d.data[byte_off..byte_off + data.len()].copy_from_slice(data);
        if let Some(m) = d.durable.as_mut() {
            m[byte_off..byte_off + data.len()].copy_from_slice(data); // a backdoor to the media
        }
    }

    /// Simulates a volatile write cache on every namespace: writes complete into the cache and
    /// reach the media image only on Flush. [`NvmeModel::power_cut`] drops what is not flushed.
    /// Enabling starts from the current contents; disabling makes the cache contents durable.
    pub fn set_volatile_cache(&self, on: bool) {
        let mut st = lock(&self.st);
        for d in st.disks.iter_mut() {
            d.dirty.clear();
            d.durable = on.then(|| d.data.clone());
        }
    }

    /// The media image of namespace `nsid` as of the last completed Flush (the whole disk when no
    /// volatile cache is simulated).
    pub fn durable_image(&self, nsid: u32) -> Vec<u8> {
        let st = lock(&self.st);
        let d = st
            .disks
            .iter()
            .find(|d| d.cfg.nsid == nsid)
            .expect("no such namespace");
        d.durable.clone().unwrap_or_else(|| d.data.clone())
    }

    /// Power loss with a volatile cache: each block written since the last Flush survives only if
    /// `keep(nsid, lba)` says so (block writes are atomic); the rest reverts to the media image.
    /// `|_, _| false` drops every unflushed write. No-op without a volatile cache.
    ///
    /// Zoned namespaces: zone resets and finishes are durable when they complete (zone state
    /// is persistent), so only written blocks are at stake. Each zone's write pointer after the
    /// cut covers what is durable: it is past the last block kept, and never below where it was
    /// at the last Flush (or reset / finish). A block not kept below it reads as the media held
    /// it (zeroes since the zone's reset): the harshest reading of a drive that keeps some
    /// unflushed blocks and not others. Open zones come back closed (ZNS: a power cycle closes
    /// them), or empty / full where the write pointer is at the start / the capacity.
    pub fn power_cut(&self, mut keep: impl FnMut(u32, u64) -> bool) {
        let mut st = lock(&self.st);
        for d in st.disks.iter_mut() {
            let Some(media) = d.durable.as_mut() else {
                continue;
            };
            let bs = 1usize << d.cfg.lba_shift;
            let mut kept = Vec::new();
            for &lba in d.dirty.iter() {
                let o = lba as usize * bs;
                if keep(d.cfg.nsid, lba) {
                    media[o..o + bs].copy_from_slice(&d.data[o..o + bs]);
                    kept.push(lba);
                }
            }
            d.data.copy_from_slice(media);
            d.dirty.clear();
            if let Some(z) = d.zones.as_mut() {
                let (size, cap) = (z.cfg.zone_blocks, z.cfg.capacity);
                let mut wp: Vec<u64> = z.durable_wp.clone();
                for lba in kept {
                    if let Some(w) = wp.get_mut((lba / size) as usize) {
                        *w = (*w).max(lba + 1);
                    }
                }
                for (i, (state, zwp)) in z.zones.iter_mut().enumerate() {
                    if *state == zs::OFFLINE || *state == zs::READ_ONLY {
                        continue;
                    }
                    let start = i as u64 * size;
                    let w = wp[i].clamp(start, start + cap);
                    *zwp = w;
                    *state = if w == start {
                        zs::EMPTY
                    } else if w == start + cap {
                        zs::FULL
                    } else {
                        zs::CLOSED
                    };
                    z.durable_wp[i] = w;
                }
            }
        }
    }

    /// Posts an arbitrary completion into CQ `cqid` (fault injection).
    pub fn inject_completion(&self, cqid: u16, sqid: u16, sq_head: u16, cid: u16, status: u16) {
        let mut st = lock(&self.st);
        let mut e = [0u8; 16];
        e[8..10].copy_from_slice(&sq_head.to_le_bytes());
        e[10..12].copy_from_slice(&sqid.to_le_bytes());
        e[12..14].copy_from_slice(&cid.to_le_bytes());
        e[14..16].copy_from_slice(&(status & !1).to_le_bytes());
        st.post_raw(cqid, e);
    }

    /// The next `n` reads and writes fetched from an I/O queue are held: fetched (a write's data
    /// is read from host memory then, as a device that buffers it before its media write) but
    /// neither executed nor completed, as commands that time out. [`NvmeModel::release_held`]
    /// finishes them late; a controller reset (CC.EN = 0) drops them.
    pub fn hold_next_io(&self, n: u32) {
        lock(&self.st).hold = n;
    }

    /// As [`NvmeModel::hold_next_io`], but mid-run: the next `after` reads and writes fetched
    /// from I/O queues execute normally, the `n` after them are held.
    pub fn hold_io_after(&self, after: u64, n: u32) {
        let mut st = lock(&self.st);
        st.hold_skip = after;
        st.hold = n;
    }

    /// Controller resets (CC.EN from 1 to 0) since the model was made.
    pub fn controller_resets(&self) -> u64 {
        lock(&self.st).resets
    }

    /// How Abort behaves. `false` (the default, and what QEMU does): every Abort completes
    /// "command not aborted". `true`: an Abort naming a held command drops it and completes it
    /// with "Abort Requested"; one naming anything else is "not aborted". Identify reports
    /// `acl` (0-based Abort Command Limit).
    pub fn set_abort(&self, works: bool, acl: u8) {
        let mut st = lock(&self.st);
        st.abort_works = works;
        st.acl = acl;
    }

    /// Identify Controller CRDT1..3 (100 ms units) from the next Identify on; with any of them
    /// non-zero the driver enables ACRE, which the model accepts.
    pub fn set_crdt(&self, crdt: [u16; 3]) {
        lock(&self.st).crdt = crdt;
    }

    /// Whether the host enabled Advanced Command Retry (Host Behavior Support, ACRE = 1) since
    /// the last controller reset.
    pub fn acre(&self) -> bool {
        lock(&self.st).acre
    }

    /// Commands held now (see [`NvmeModel::hold_next_io`]).
    pub fn held(&self) -> usize {
        lock(&self.st).held.len()
    }

    /// Finishes every held command, oldest first, now: a read transfers the disk's data into
    /// its buffer now (late DMA), a write puts the data it fetched onto the disk now; each is
    /// completed with success. Returns how many.
    pub fn release_held(&self) -> usize {
        let mut st = lock(&self.st);
        let held = std::mem::take(&mut st.held);
        let n = held.len();
        for h in held {
            let status = match h.data {
                Some(data) => st.write_fetched(&h.cmd, &data),
                None => st.io(&h.cmd).1,
            };
            st.io_commands += 1;
            let mut e = [0u8; 16];
            e[8..10].copy_from_slice(&h.sq_head.to_le_bytes());
            e[10..12].copy_from_slice(&h.sqid.to_le_bytes());
            e[12..14].copy_from_slice(&h.cid.to_le_bytes());
            e[14..16].copy_from_slice(&status.to_le_bytes());
            st.post_raw(h.cqid, e);
        }
        n
    }

    /// Sets the composite temperature (kelvin); crossing a threshold raises a SMART / health
    /// event (if enabled), as a real controller's sensor would.
    pub fn set_temperature(&self, kelvin: u16) {
        let mut st = lock(&self.st);
        st.health.temperature = kelvin;
        st.check_temperature();
    }

    /// Raises an asynchronous event (type, info, log page) now, whatever the configuration:
    /// it completes an outstanding AER unless its type is masked (reported, log not read yet).
    pub fn raise_event(&self, kind: u8, info: u8, log_page: u8) {
        let mut st = lock(&self.st);
        st.health.events.push_back((kind, info, log_page));
        st.deliver_events();
    }

    /// Detaches (`false`) or attaches namespace `nsid`: it then identifies as zeroes (or
    /// again as itself), I/O to it fails with Invalid Namespace, and a namespace-attribute
    /// notice is raised (if enabled) with `nsid` in the Changed Namespace List.
    pub fn set_namespace_attached(&self, nsid: u32, attached: bool) {
        let mut st = lock(&self.st);
        if let Some(d) = st.disks.iter_mut().find(|d| d.cfg.nsid == nsid) {
            d.active = attached;
        }
        st.namespace_changed(nsid);
    }

    /// Namespace `nsid` detached from power-on (QEMU's `nvme-ns,detached=true`): it
    /// identifies as zeroes and fails I/O, and — unlike [`NvmeModel::set_namespace_attached`]
    /// — nothing goes into the Changed Namespace List (nothing changed). Call it before the
    /// driver's bring-up.
    pub fn start_detached(&self, nsid: u32) {
        let mut st = lock(&self.st);
        if let Some(d) = st.disks.iter_mut().find(|d| d.cfg.nsid == nsid) {
            d.active = false;
        }
    }

    /// Changes namespace `nsid`'s capacity to `blocks` (data kept up to the new end) and
    /// raises a namespace-attribute notice, as a resize by a management tool would.
    pub fn resize_namespace(&self, nsid: u32, blocks: u64) {
        let mut st = lock(&self.st);
        if let Some(d) = st.disks.iter_mut().find(|d| d.cfg.nsid == nsid) {
            d.cfg.blocks = blocks;
            d.data.resize((blocks << d.cfg.lba_shift) as usize, 0);
        }
        st.namespace_changed(nsid);
    }

    /// Puts NSIDs into the Changed Namespace List as they are (no check: for hostile tests).
    pub fn force_changed_list(&self, nsids: &[u32]) {
        lock(&self.st).health.changed.extend(nsids.iter().copied());
    }

    /// AERs the driver has outstanding on the model now.
    pub fn aers_outstanding(&self) -> usize {
        lock(&self.st).health.aers.len()
    }

    /// AER completions the model has posted.
    pub fn aer_completions(&self) -> u64 {
        lock(&self.st).health.aer_completions
    }

    /// One "background" pass: picks up shadow-doorbell tails and CQ heads, then executes
    /// everything pending in every SQ.
    pub fn step(&self) {
        let mut st = lock(&self.st);
        st.sync_shadow();
        let qids: Vec<u16> = st.sqs.keys().copied().collect();
        for q in qids {
            st.process_sq(q);
        }
    }
}

impl keel_hal::Mmio for ModelMmio {
    fn len(&self) -> usize {
        BAR_LEN
    }

    fn read32(&self, offset: usize) -> u32 {
        let st = lock(&self.st);
        if st.fault == Fault::Removed {
            return u32::MAX;
        }
        match offset {
            regs::CAP => st.cap() as u32,
            o if o == regs::CAP + 4 => (st.cap() >> 32) as u32,
            regs::VS => regs::VERSION_1_4,
            regs::CC => st.cc,
            regs::CSTS => st.csts,
            regs::AQA => st.aqa,
            regs::ASQ => st.asq as u32,
            o if o == regs::ASQ + 4 => (st.asq >> 32) as u32,
            regs::ACQ => st.acq as u32,
            o if o == regs::ACQ + 4 => (st.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut st = lock(&self.st);
        if st.fault == Fault::Removed {
            return;
        }
        match offset {
            regs::CC => st.write_cc(value),
            regs::AQA => st.aqa = value,
            regs::ASQ => st.asq = (st.asq & !0xFFFF_FFFF) | value as u64,
            o if o == regs::ASQ + 4 => st.asq = (st.asq & 0xFFFF_FFFF) | ((value as u64) << 32),
            regs::ACQ => st.acq = (st.acq & !0xFFFF_FFFF) | value as u64,
            o if o == regs::ACQ + 4 => st.acq = (st.acq & 0xFFFF_FFFF) | ((value as u64) << 32),
            o if (regs::DOORBELLS..BAR_LEN).contains(&o) => st.doorbell(o, value),
            _ => {}
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        match offset {
            regs::CAP if lock(&self.st).fault != Fault::Removed => lock(&self.st).cap(),
            _ => self.read32(offset) as u64 | ((self.read32(offset + 4) as u64) << 32),
        }
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    /// Every register access takes the model's mutex, which orders the driver's earlier
    /// stores to (heap) DMA memory before the model reads them.
    #[inline(always)]
    fn doorbell_barrier(&self) {
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// Status field values (SC << 1 | SCT << 9), phase bit clear.
mod sf {
    pub const OK: u16 = 0;
    pub const INVALID_OPCODE: u16 = 0x01 << 1;
    pub const INVALID_FIELD: u16 = 0x02 << 1;
    pub const DATA_TRANSFER: u16 = 0x04 << 1;
    pub const INTERNAL: u16 = 0x06 << 1;
    pub const INVALID_NS: u16 = 0x0B << 1;
    pub const PRP_OFFSET: u16 = 0x13 << 1;
    pub const LBA_RANGE: u16 = 0x80 << 1;
    pub const CQ_INVALID: u16 = 1 << 9;
    pub const INVALID_QID: u16 = (1 << 9) | (0x01 << 1);
    pub const INVALID_QSIZE: u16 = (1 << 9) | (0x02 << 1);
    pub const INVALID_DELETION: u16 = (1 << 9) | (0x0C << 1);
    pub const DNR: u16 = 1 << 15;
    pub const WRITE_FAULT: u16 = (2 << 9) | (0x80 << 1);
    pub const ABORT_REQUESTED: u16 = 0x07 << 1;
    pub const AER_LIMIT: u16 = (1 << 9) | (0x05 << 1);
    pub const INVALID_LOG_PAGE: u16 = (1 << 9) | (0x09 << 1);
}

impl State {
    fn stride(&self) -> usize {
        4 << self.cfg.dstrd
    }

    fn cap(&self) -> u64 {
        use regs::*;
        self.cfg.mqes as u64 // MQES
            | (1 << CAP_CQR)
            | (20 << CAP_TO) // 10 s
            | ((self.cfg.dstrd as u64 & 0xF) << CAP_DSTRD)
            | (1 << CAP_CSS) // bit 0: the NVM command set
            | ((self.disks.iter().any(|d| d.zones.is_some()) as u64) << (CAP_CSS + 6))
            | (4u64 << CAP_MPSMAX) // 64 KiB; MPSMIN = 0: 4 KiB
    }

    fn note(&mut self, s: String) {
        self.log.push(s);
    }

    fn write_cc(&mut self, v: u32) {
        let was = regs::Cc::decode(self.cc).en;
        self.cc = v;
        let cc = regs::Cc::decode(v);
        if !was && cc.en {
            if self.fault == Fault::FatalOnEnable {
                self.csts |= CSTS_CFS;
                return;
            }
            let css_ok = cc.css == 0 || (cc.css == 6 && self.cap() & (1 << (37 + 6)) != 0);
            if cc.mps != 0 || !css_ok {
                self.note(format!("CC: unsupported MPS/CSS {v:#x}"));
                self.csts |= CSTS_CFS;
                return;
            }
            if cc.iosqes != 6 || cc.iocqes != 4 {
                self.note(format!("CC: IOSQES {} IOCQES {}", cc.iosqes, cc.iocqes));
            }
            let (asqs, acqs) = regs::aqa(self.aqa);
            let (sqs, cqs) = (asqs as u16 + 1, acqs as u16 + 1);
            if self.asq % PAGE != 0 || self.acq % PAGE != 0 || sqs < 2 || cqs < 2 {
                self.note("CC.EN with bad admin queue registers".into());
                self.csts |= CSTS_CFS;
                return;
            }
            self.sqs.insert(
                0,
                Sq {
                    base: self.asq,
                    size: sqs,
                    head: 0,
                    tail: 0,
                    cqid: 0,
                },
            );
            self.cqs.insert(
                0,
                Cq {
                    base: self.acq,
                    size: cqs,
                    head: 0,
                    tail: 0,
                    phase: true,
                    pending: VecDeque::new(),
                },
            );
            self.csts = if self.fault == Fault::NeverReady {
                0
            } else {
                CSTS_RDY
            };
        } else if was && !cc.en {
            // CSTS.RDY = 0: nothing the controller held will complete or touch memory again.
            self.held.clear();
            self.resets += 1;
            self.acre = false;
            // Outstanding AERs are dropped by a reset (never completed); events stay queued.
            self.health.aers.clear();
            self.health.masked = 0;
            self.sqs.clear();
            self.cqs.clear();
            self.dbbuf = None;
            self.granted = 0;
            self.csts = 0;
        } else if cc.en && cc.shn != 0 {
            self.csts = (self.csts & !regs::CSTS_SHST_MASK) | regs::CSTS_SHST_COMPLETE;
        }
    }

    fn doorbell(&mut self, off: usize, value: u32) {
        let idx = (off - regs::DOORBELLS) / self.stride();
        let qid = (idx / 2) as u16;
        if (off - regs::DOORBELLS) % self.stride() != 0 {
            return;
        }
        if self.csts & CSTS_RDY == 0 || self.csts & CSTS_CFS != 0 {
            return;
        }
        if idx % 2 == 0 {
            *self.sq_doorbells.entry(qid).or_default() += 1;
            let Some(sq) = self.sqs.get_mut(&qid) else {
                self.note(format!("SQ doorbell for missing queue {qid}"));
                return;
            };
            if value >= sq.size as u32 {
                self.note(format!("SQ {qid} tail {value} out of range"));
                return;
            }
            sq.tail = value as u16;
            if qid != 0 && self.fault == Fault::FatalStatus {
                self.csts |= CSTS_CFS;
                return;
            }
            self.process_sq(qid);
        } else {
            *self.cq_doorbells.entry(qid).or_default() += 1;
            let Some(cq) = self.cqs.get_mut(&qid) else {
                self.note(format!("CQ doorbell for missing queue {qid}"));
                return;
            };
            if value >= cq.size as u32 {
                self.note(format!("CQ {qid} head {value} out of range"));
                return;
            }
            cq.head = value as u16;
            self.flush_pending(qid);
        }
        self.update_event_idx(qid);
    }

    /// Reads shadow doorbell values for I/O queues.
    fn sync_shadow(&mut self) {
        let Some((db, _)) = self.dbbuf else { return };
        let stride = self.stride() as u64;
        let qids: Vec<u16> = self.sqs.keys().copied().filter(|q| *q != 0).collect();
        for q in qids {
            if let Ok(t) = self.mem.read_u32(db + 2 * q as u64 * stride) {
                if let Some(sq) = self.sqs.get_mut(&q) {
                    if t < sq.size as u32 {
                        sq.tail = t as u16;
                    }
                }
            }
        }
        let cqids: Vec<u16> = self.cqs.keys().copied().filter(|q| *q != 0).collect();
        for q in cqids {
            if let Ok(h) = self.mem.read_u32(db + (2 * q as u64 + 1) * stride) {
                if let Some(cq) = self.cqs.get_mut(&q) {
                    if h < cq.size as u32 {
                        cq.head = h as u16;
                    }
                }
            }
            self.flush_pending(q);
        }
    }

    /// Publishes EventIdx for queue pair `qid` (tail of SQ `qid`, head of CQ `qid`): "tell me
    /// about anything past what I have seen". Only that queue's words are written, so drivers on
    /// other threads never race with the model on their own words.
    fn update_event_idx(&mut self, qid: u16) {
        let Some((_, ei)) = self.dbbuf else { return };
        if self.cfg.shadow_polling || qid == 0 {
            return;
        }
        let stride = self.stride() as u64;
        if let Some(t) = self.sqs.get(&qid).map(|s| s.tail) {
            let _ = self.mem.write_u32(ei + 2 * qid as u64 * stride, t as u32);
        }
        if let Some(h) = self.cqs.get(&qid).map(|c| c.head) {
            let _ = self
                .mem
                .write_u32(ei + (2 * qid as u64 + 1) * stride, h as u32);
        }
    }

    fn process_sq(&mut self, qid: u16) {
        if qid != 0 && (self.fault == Fault::Stall || self.fault == Fault::FatalStatus) {
            return;
        }
        if self.fault == Fault::Removed {
            return;
        }
        loop {
            if self.csts & CSTS_CFS != 0 {
                return;
            }
            let Some(sq) = self.sqs.get_mut(&qid) else {
                return;
            };
            if sq.head == sq.tail {
                return;
            }
            let addr = sq.base + sq.head as u64 * 64;
            sq.head = (sq.head + 1) % sq.size;
            let (sq_head, cqid) = (sq.head, sq.cqid);
            let mut cmd = [0u8; 64];
            if self.mem.read(addr, &mut cmd).is_err() {
                self.note(format!("SQ {qid}: entry at {addr:#x} not in DMA memory"));
                self.csts |= CSTS_CFS;
                return;
            }
            let mut cid = le16(&cmd, 2);
            if qid != 0 {
                if self.io_sqes.len() == IO_SQE_RECORD {
                    self.io_sqes.pop_front();
                }
                self.io_sqes.push_back(cmd);
            }
            let rw = qid != 0 && (cmd[0] == 0x01 || cmd[0] == 0x02);
            if rw && self.hold > 0 && self.hold_skip > 0 {
                self.hold_skip -= 1;
            } else if rw && self.hold > 0 {
                self.hold -= 1;
                let data = if cmd[0] == 0x01 {
                    self.fetch_write_data(&cmd)
                } else {
                    None
                };
                self.held.push(Held {
                    sqid: qid,
                    cqid,
                    sq_head,
                    cid,
                    cmd,
                    data,
                });
                continue;
            }
            if qid == 0 && cmd[0] == 0x0C {
                // Asynchronous Event Request: held until an event comes.
                if self.health.aers.len() > MODEL_AERL as usize {
                    let mut e = [0u8; 16];
                    e[8..10].copy_from_slice(&sq_head.to_le_bytes());
                    e[12..14].copy_from_slice(&cid.to_le_bytes());
                    e[14..16].copy_from_slice(&(sf::AER_LIMIT | sf::DNR).to_le_bytes());
                    self.post_raw(0, e);
                } else {
                    *self.commands.entry(0x0C).or_default() += 1;
                    self.health.aers.push_back((cid, sq_head));
                    self.deliver_events();
                }
                continue;
            }
            let (dw0, status) = if qid == 0 {
                self.admin(&cmd)
            } else {
                let r = self.io(&cmd);
                self.account_io(&cmd, qid, cid, r.1);
                r
            };
            if qid != 0 {
                if let Fault::CorruptCid(mask) = self.fault {
                    cid ^= mask;
                }
            }
            if qid != 0 {
                self.io_commands += 1;
            }
            let mut e = [0u8; 16];
            e[0..4].copy_from_slice(&dw0.to_le_bytes());
            e[4..8].copy_from_slice(&std::mem::take(&mut self.dw1).to_le_bytes());
            e[8..10].copy_from_slice(&sq_head.to_le_bytes());
            e[10..12].copy_from_slice(&qid.to_le_bytes());
            e[12..14].copy_from_slice(&cid.to_le_bytes());
            e[14..16].copy_from_slice(&status.to_le_bytes());
            self.post_raw(cqid, e);
            if qid != 0 && self.fault == Fault::DuplicateCompletion {
                self.post_raw(cqid, e);
            }
        }
    }

    fn post_raw(&mut self, cqid: u16, e: [u8; 16]) {
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        cq.pending.push_back(e);
        self.flush_pending(cqid);
    }

    fn flush_pending(&mut self, cqid: u16) {
        let wrong_phase = cqid != 0 && self.fault == Fault::WrongPhase;
        let mem = self.mem.clone();
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        while (cq.tail + 1) % cq.size != cq.head {
            let Some(mut e) = cq.pending.pop_front() else {
                break;
            };
            let phase = cq.phase != wrong_phase;
            e[14] = (e[14] & !1) | phase as u8;
            let addr = cq.base + cq.tail as u64 * 16;
            // Body first, then the status/phase word, as a device would.
            let ok = mem.write(addr, &e[..14]).is_ok() && mem.write(addr + 14, &e[14..]).is_ok();
            if !ok {
                self.log
                    .push(format!("CQ {cqid}: entry at {addr:#x} not in DMA memory"));
                return;
            }
            cq.tail += 1;
            if cq.tail == cq.size {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
        }
    }

    // ---------------- admin ----------------

    fn admin(&mut self, c: &[u8; 64]) -> (u32, u16) {
        let opc = c[0];
        *self.commands.entry(opc).or_default() += 1;
        let nsid = le32(c, 4);
        let prp1 = le64(c, 24);
        let prp2 = le64(c, 32);
        let cdw10 = le32(c, 40);
        let cdw11 = le32(c, 44);
        match opc {
            0x06 => self.identify(cdw10 & 0xFF, nsid, prp1, prp2, cdw11 >> 24),
            // Set Features, I/O Command Set Profile: the model has one profile, index 0.
            0x09 if cdw10 & 0xFF == 0x19 => {
                if cdw11 & 0x1FF != 0 {
                    return (0, (1 << 9) | (0x2B << 1) | sf::DNR);
                }
                (0, sf::OK)
            }
            0x02 => self.get_log_page(cdw10, le32(c, 44), nsid, prp1, prp2),
            0x15 => self.namespace_attachment(cdw10 & 0xF, nsid, prp1, prp2),
            // Temperature threshold: TMPTH 15:0, THSEL 21:20 (0 over, 1 under).
            0x09 if cdw10 & 0xFF == 0x04 => {
                match (cdw11 >> 20) & 3 {
                    0 => self.health.thresh_over = cdw11 as u16,
                    1 => self.health.thresh_under = cdw11 as u16,
                    _ => return (0, sf::INVALID_FIELD | sf::DNR),
                }
                self.check_temperature();
                (0, sf::OK)
            }
            0x0A if cdw10 & 0xFF == 0x04 => match (cdw11 >> 20) & 3 {
                0 => (self.health.thresh_over as u32, sf::OK),
                1 => (self.health.thresh_under as u32, sf::OK),
                _ => (0, sf::INVALID_FIELD | sf::DNR),
            },
            0x09 if cdw10 & 0xFF == 0x0B => {
                self.health.async_config = cdw11;
                (0, sf::OK)
            }
            0x0A if cdw10 & 0xFF == 0x0B => (self.health.async_config, sf::OK),
            // Get Features, Volatile Write Cache: enabled when a cache is simulated.
            0x0A if cdw10 & 0xFF == 0x06 => {
                let on = self.disks.iter().any(|d| d.durable.is_some());
                (on as u32, sf::OK)
            }
            0x09 if cdw10 & 0xFF == 0x16 => {
                let mut b = [0u8; 1];
                if self.mem.read(prp1, &mut b).is_err() {
                    return (0, sf::DATA_TRANSFER);
                }
                self.acre = b[0] & 1 != 0;
                (0, sf::OK)
            }
            0x09 | 0x0A => {
                if cdw10 & 0xFF != 0x07 {
                    return (
                        0,
                        if opc == 0x0A {
                            sf::OK
                        } else {
                            sf::INVALID_FIELD
                        },
                    );
                }
                if opc == 0x09 {
                    if cdw11 & 0xFFFF == 0xFFFF || cdw11 >> 16 == 0xFFFF {
                        return (0, sf::INVALID_FIELD);
                    }
                    let want = ((cdw11 & 0xFFFF).min(cdw11 >> 16) + 1) as u16;
                    if self.granted == 0 {
                        self.granted = want.min(self.cfg.max_io_queues);
                    }
                }
                let n = self.cfg.max_io_queues as u32 - 1;
                (n | (n << 16), sf::OK)
            }
            0x05 => {
                let qid = (cdw10 & 0xFFFF) as u16;
                let size = (cdw10 >> 16) + 1;
                if qid == 0 || qid > self.granted.max(1) || self.cqs.contains_key(&qid) {
                    return (0, sf::INVALID_QID | sf::DNR);
                }
                if size < 2 || size > self.cfg.mqes as u32 + 1 {
                    return (0, sf::INVALID_QSIZE | sf::DNR);
                }
                if cdw11 & 1 == 0 || prp1 % PAGE != 0 || cdw11 & 2 != 0 {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                let cq = Cq {
                    base: prp1,
                    size: size as u16,
                    head: 0,
                    tail: 0,
                    phase: true,
                    pending: VecDeque::new(),
                };
                self.cqs.insert(qid, cq);
                (0, sf::OK)
            }
            0x01 => {
                let qid = (cdw10 & 0xFFFF) as u16;
                let size = (cdw10 >> 16) + 1;
                let cqid = (cdw11 >> 16) as u16;
                if qid == 0 || qid > self.granted.max(1) || self.sqs.contains_key(&qid) {
                    return (0, sf::INVALID_QID | sf::DNR);
                }
                if cqid == 0 || !self.cqs.contains_key(&cqid) {
                    return (0, sf::CQ_INVALID | sf::DNR);
                }
                if size < 2 || size > self.cfg.mqes as u32 + 1 {
                    return (0, sf::INVALID_QSIZE | sf::DNR);
                }
                if cdw11 & 1 == 0 || prp1 % PAGE != 0 {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        base: prp1,
                        size: size as u16,
                        head: 0,
                        tail: 0,
                        cqid,
                    },
                );
                (0, sf::OK)
            }
            0x00 => {
                let qid = (cdw10 & 0xFFFF) as u16;
                if qid == 0 || self.sqs.remove(&qid).is_none() {
                    return (0, sf::INVALID_QID | sf::DNR);
                }
                // Commands still held on the queue are aborted with it: never completed, their
                // buffers never touched again.
                self.held.retain(|h| h.sqid != qid);
                (0, sf::OK)
            }
            0x04 => {
                let qid = (cdw10 & 0xFFFF) as u16;
                if qid == 0 || !self.cqs.contains_key(&qid) {
                    return (0, sf::INVALID_QID | sf::DNR);
                }
                if self.sqs.values().any(|s| s.cqid == qid) {
                    return (0, sf::INVALID_DELETION | sf::DNR);
                }
                self.cqs.remove(&qid);
                (0, sf::OK)
            }
            0x7C => {
                if !self.cfg.doorbell_buffer {
                    return (0, sf::INVALID_OPCODE | sf::DNR);
                }
                if prp1 == 0 || prp2 == 0 || prp1 % PAGE != 0 || prp2 % PAGE != 0 {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                self.dbbuf = Some((prp1, prp2));
                (0, sf::OK)
            }
            0x08 => {
                let (sqid, cid) = ((cdw10 & 0xFFFF) as u16, (cdw10 >> 16) as u16);
                let found = self
                    .held
                    .iter()
                    .position(|h| h.sqid == sqid && h.cid == cid);
                match found.filter(|_| self.abort_works) {
                    Some(k) => {
                        let h = self.held.remove(k);
                        let mut e = [0u8; 16];
                        e[8..10].copy_from_slice(&h.sq_head.to_le_bytes());
                        e[10..12].copy_from_slice(&h.sqid.to_le_bytes());
                        e[12..14].copy_from_slice(&h.cid.to_le_bytes());
                        e[14..16].copy_from_slice(&sf::ABORT_REQUESTED.to_le_bytes());
                        self.post_raw(h.cqid, e);
                        (0, sf::OK)
                    }
                    None => (1, sf::OK), // command not aborted
                }
            }
            _ => (0, sf::INVALID_OPCODE | sf::DNR),
        }
    }

    fn identify(&mut self, cns: u32, nsid: u32, prp1: u64, prp2: u64, csi: u32) -> (u32, u16) {
        let mut d = vec![0u8; 4096];
        let zoned_ctrl = self.disks.iter().any(|d| d.zones.is_some());
        match cns {
            // Namespace Identification Descriptors: the CSI, for a zoned model only (an NVM
            // model answers as a 1.2 device would not: Invalid Field).
            0x03 if zoned_ctrl => {
                let Some(disk) = self.disks.iter().find(|x| x.cfg.nsid == nsid) else {
                    return (0, sf::INVALID_NS | sf::DNR);
                };
                d[0] = 0x04;
                d[1] = 1;
                d[4] = if disk.zones.is_some() { 2 } else { 0 };
            }
            // I/O Command Set vectors: profile 0 = NVM + zoned.
            0x1C if zoned_ctrl => d[0] = 0b101,
            0x05 if zoned_ctrl && csi == 2 => {
                let Some(disk) = self.disks.iter().find(|x| x.cfg.nsid == nsid) else {
                    return (0, sf::INVALID_NS | sf::DNR);
                };
                let Some(z) = &disk.zones else {
                    return (0, (1 << 9) | (0x29 << 1) | sf::DNR); // invalid I/O command set
                };
                let mor = if z.cfg.max_open == 0 {
                    u32::MAX
                } else {
                    z.cfg.max_open - 1
                };
                d[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                d[8..12].copy_from_slice(&mor.to_le_bytes());
                let idx = if disk.cfg.lba_shift == 9 { 0 } else { 1 };
                let o = 2816 + 16 * idx;
                d[o..o + 8].copy_from_slice(&z.cfg.zone_blocks.to_le_bytes());
            }
            0x06 if zoned_ctrl && csi == 2 => d[0] = 0, // ZASL = MDTS
            // The NVM command set's Identify Namespace (extended LBA formats: the protection
            // information format), only where a test patched it in: zeroes and the patches.
            0x05 if csi == 0 && self.id_patches.iter().any(|(c, _, _)| *c == 5) => {}
            0x01 => {
                d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                let pad = |dst: &mut [u8], s: &str| {
                    dst.fill(b' ');
                    dst[..s.len()].copy_from_slice(s.as_bytes());
                };
                pad(&mut d[4..24], "KEELMODEL0001");
                pad(&mut d[24..64], "Keel NVMe Model");
                pad(&mut d[64..72], "1.0");
                d[77] = self.cfg.mdts;
                d[80..84].copy_from_slice(&regs::VERSION_1_4.to_le_bytes());
                // Namespace Attachment always (bit 3); Doorbell Buffer Config if configured.
                let oacs: u16 = 1 << 3 | if self.cfg.doorbell_buffer { 1 << 8 } else { 0 };
                d[256..258].copy_from_slice(&oacs.to_le_bytes());
                d[258] = self.acl;
                for (k, t) in self.crdt.iter().enumerate() {
                    d[134 + 2 * k..136 + 2 * k].copy_from_slice(&t.to_le_bytes());
                }
                d[259] = MODEL_AERL;
                d[262] = MODEL_ERROR_ENTRIES as u8 - 1;
                d[512] = 0x66;
                d[513] = 0x44;
                let nn = self.disks.iter().map(|d| d.cfg.nsid).max().unwrap_or(0);
                d[516..520].copy_from_slice(&nn.to_le_bytes());
                let oncs = (if self.cfg.dsm { 1u16 << 2 } else { 0 })
                    | if self.cfg.write_zeroes { 1 << 3 } else { 0 };
                d[520..522].copy_from_slice(&oncs.to_le_bytes());
                d[525] = self.cfg.vwc as u8;
            }
            0x00 => {
                let absurd = self.fault == Fault::AbsurdIdentify;
                let Some(disk) = self.disks.iter().find(|x| x.cfg.nsid == nsid) else {
                    return (0, sf::INVALID_NS | sf::DNR);
                };
                let n = disk.cfg;
                if !disk.active {
                    d.fill(0); // an allocated, inactive namespace: all zeroes
                    return match self.transfer_out(prp1, prp2, &d) {
                        Ok(()) => (0, sf::OK),
                        Err(s) => (0, s),
                    };
                }
                d[0..8].copy_from_slice(&n.blocks.to_le_bytes());
                d[8..16].copy_from_slice(&n.blocks.to_le_bytes());
                d[16..24].copy_from_slice(&n.blocks.to_le_bytes());
                d[25] = 1; // two formats
                d[26] = if n.lba_shift == 9 { 0 } else { 1 };
                d[128 + 2] = 9;
                d[132 + 2] = 12;
                if n.lba_shift != 9 && n.lba_shift != 12 {
                    d[132 + 2] = n.lba_shift;
                }
                if absurd {
                    d[128 + 2] = 3;
                    d[132 + 2] = 3;
                }
            }
            // Controller lists: the model is the subsystem's one controller, ID 0 (CNTLID);
            // CNS 0x12 lists it where namespace `nsid` is attached.
            0x12 | 0x13 => {
                let listed = if cns == 0x12 {
                    let Some(disk) = self.disks.iter().find(|x| x.cfg.nsid == nsid) else {
                        return (0, sf::INVALID_FIELD | sf::DNR);
                    };
                    disk.active
                } else {
                    true
                };
                d[0] = listed as u8;
            }
            0x02 => {
                let mut ids: Vec<u32> = self
                    .disks
                    .iter()
                    .filter(|d| d.active)
                    .map(|d| d.cfg.nsid)
                    .filter(|id| *id > nsid)
                    .collect();
                ids.sort_unstable();
                for (i, id) in ids.iter().take(1024).enumerate() {
                    d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
            }
            _ => return (0, sf::INVALID_FIELD | sf::DNR),
        }
        for (c, off, bytes) in &self.id_patches {
            if *c as u32 == cns && *off < d.len() {
                let n = bytes.len().min(d.len() - off);
                d[*off..off + n].copy_from_slice(&bytes[..n]);
            }
        }
        match self.transfer_out(prp1, prp2, &d) {
            Ok(()) => (0, sf::OK),
            Err(s) => (0, s),
        }
    }

    // ---------------- PRPs ----------------

    /// Walks a PRP pair describing `len` bytes; returns the (address, length) segments.
    fn prp_segments(&mut self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<(u64, usize)>, u16> {
        let mut segs = Vec::new();
        if prp1 % 4 != 0 {
            self.note(format!("PRP1 {prp1:#x} not dword aligned"));
            return Err(sf::PRP_OFFSET | sf::DNR);
        }
        let first = ((PAGE - prp1 % PAGE) as usize).min(len);
        segs.push((prp1, first));
        let mut rem = len - first;
        if rem == 0 {
            return Ok(segs);
        }
        if rem <= PAGE as usize {
            if prp2 % PAGE != 0 {
                self.note(format!("PRP2 {prp2:#x} has an offset"));
                return Err(sf::PRP_OFFSET | sf::DNR);
            }
            segs.push((prp2, rem));
            return Ok(segs);
        }
        if prp2 % 8 != 0 {
            self.note(format!("PRP list pointer {prp2:#x} not qword aligned"));
            return Err(sf::PRP_OFFSET | sf::DNR);
        }
        let mut list = prp2;
        let mut pages = 0;
        while rem > 0 {
            let entries_here = ((PAGE - list % PAGE) / 8) as usize;
            for k in 0..entries_here {
                let e = self
                    .mem
                    .read_u64(list + k as u64 * 8)
                    .map_err(|_| sf::DATA_TRANSFER)?;
                if k == entries_here - 1 && rem > PAGE as usize {
                    if e % 8 != 0 {
                        return Err(sf::PRP_OFFSET | sf::DNR);
                    }
                    list = e;
                    pages += 1;
                    break;
                }
                if e % PAGE != 0 {
                    self.note(format!("PRP entry {e:#x} has an offset"));
                    return Err(sf::PRP_OFFSET | sf::DNR);
                }
                let n = rem.min(PAGE as usize);
                segs.push((e, n));
                rem -= n;
                if rem == 0 {
                    break;
                }
            }
            if pages > 4096 {
                return Err(sf::DATA_TRANSFER);
            }
        }
        Ok(segs)
    }

    fn transfer_out(&mut self, prp1: u64, prp2: u64, data: &[u8]) -> Result<(), u16> {
        let segs = self.prp_segments(prp1, prp2, data.len())?;
        let mut off = 0;
        for (a, n) in segs {
            if self.mem.write(a, &data[off..off + n]).is_err() {
                self.note(format!("device write to {a:#x}+{n} outside DMA memory"));
                return Err(sf::DATA_TRANSFER);
            }
            off += n;
        }
        Ok(())
    }

    fn transfer_in(&mut self, prp1: u64, prp2: u64, data: &mut [u8]) -> Result<(), u16> {
        let segs = self.prp_segments(prp1, prp2, data.len())?;
        let mut off = 0;
        for (a, n) in segs {
            if self.mem.read(a, &mut data[off..off + n]).is_err() {
                self.note(format!("device read from {a:#x}+{n} outside DMA memory"));
                return Err(sf::DATA_TRANSFER);
            }
            off += n;
        }
        Ok(())
    }

    // ---------------- I/O ----------------

    /// A held write's data, read from host memory at fetch time (`None` if it cannot be: the
    /// write then runs as a normal one at release).
    fn fetch_write_data(&mut self, c: &[u8; 64]) -> Option<Vec<u8>> {
        let nsid = le32(c, 4);
        let n = self.disks.iter().find(|d| d.cfg.nsid == nsid)?.cfg;
        let nlb = (le32(c, 48) & 0xFFFF) as u64 + 1;
        let mut buf = vec![0u8; (nlb << n.lba_shift) as usize];
        self.transfer_in(le64(c, 24), le64(c, 32), &mut buf).ok()?;
        Some(buf)
    }

    /// Executes write `c` with `data` fetched earlier: the disk gets it now.
    fn write_fetched(&mut self, c: &[u8; 64], data: &[u8]) -> u16 {
        let nsid = le32(c, 4);
        let Some(di) = self.disks.iter().position(|d| d.cfg.nsid == nsid) else {
            return sf::INVALID_NS | sf::DNR;
        };
        let n = self.disks[di].cfg;
        let slba = le32(c, 40) as u64 | ((le32(c, 44) as u64) << 32);
        let nlb = (le32(c, 48) & 0xFFFF) as u64 + 1;
        let off = (slba << n.lba_shift) as usize;
        match slba.checked_add(nlb) {
            Some(end) if end <= n.blocks && data.len() == (nlb << n.lba_shift) as usize => {
                self.disks[di].data[off..off + data.len()].copy_from_slice(data);
                self.disks[di].mark_dirty(slba, nlb);
                sf::OK
            }
            _ => sf::LBA_RANGE | sf::DNR,
        }
    }

    fn io(&mut self, c: &[u8; 64]) -> (u32, u16) {
        match self.fault {
            Fault::TransientError(n) if n > 0 => {
                self.fault = Fault::TransientError(n - 1);
                return (0, sf::INTERNAL);
            }
            Fault::PermanentError => return (0, sf::INTERNAL | sf::DNR),
            Fault::WriteFault if c[0] == 0x01 => return (0, sf::WRITE_FAULT | sf::DNR),
            Fault::Status(st) => return (0, st & !1),
            _ => {}
        }
        let opc = c[0];
        let nsid = le32(c, 4);
        let prp1 = le64(c, 24);
        let prp2 = le64(c, 32);
        let cdw10 = le32(c, 40);
        let cdw11 = le32(c, 44);
        let cdw12 = le32(c, 48);
        let Some(di) = self
            .disks
            .iter()
            .position(|d| d.cfg.nsid == nsid && d.active)
        else {
            return (0, sf::INVALID_NS | sf::DNR);
        };
        let n = self.disks[di].cfg;
        let slba = cdw10 as u64 | ((cdw11 as u64) << 32);
        let nlb = (cdw12 & 0xFFFF) as u64 + 1;
        let in_range = slba.checked_add(nlb).is_some_and(|e| e <= n.blocks);
        let off = (slba << n.lba_shift) as usize;
        let bytes = (nlb << n.lba_shift) as usize;
        match opc {
            0x00 => {
                self.disks[di].flush();
                (0, sf::OK)
            }
            0x79 | 0x7A | 0x7D => self.zone_command(di, c),
            0x01 if self.disks[di].zones.is_some() && regs::Cc::decode(self.cc).css == 6 => {
                self.zone_command(di, c)
            }
            0x01 | 0x02 => {
                if !in_range {
                    return (0, sf::LBA_RANGE | sf::DNR);
                }
                if self.cfg.mdts != 0 && bytes > (PAGE as usize) << self.cfg.mdts {
                    self.note(format!("transfer of {bytes} bytes exceeds MDTS"));
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                let mut buf = vec![0u8; bytes];
                if opc == 0x01 {
                    if let Err(s) = self.transfer_in(prp1, prp2, &mut buf) {
                        return (0, s);
                    }
                    self.disks[di].data[off..off + bytes].copy_from_slice(&buf);
                    self.disks[di].mark_dirty(slba, nlb);
                    (0, sf::OK)
                } else {
                    buf.copy_from_slice(&self.disks[di].data[off..off + bytes]);
                    match self.transfer_out(prp1, prp2, &buf) {
                        Ok(()) => (0, sf::OK),
                        Err(s) => (0, s),
                    }
                }
            }
            0x08 if self.cfg.write_zeroes => {
                if !in_range {
                    return (0, sf::LBA_RANGE | sf::DNR);
                }
                self.disks[di].data[off..off + bytes].fill(0);
                self.disks[di].mark_dirty(slba, nlb);
                (0, sf::OK)
            }
            0x09 if self.cfg.dsm => {
                let nr = (cdw10 & 0xFF) as usize + 1;
                let mut ranges = vec![0u8; nr * 16];
                if let Err(s) = self.transfer_in(prp1, prp2, &mut ranges) {
                    return (0, s);
                }
                if cdw11 & (1 << 2) != 0 {
                    for r in ranges.chunks(16) {
                        let rnlb = le32(r, 4) as u64;
                        let rslba = le64(r, 8);
                        if rslba.checked_add(rnlb).is_none_or(|e| e > n.blocks) {
                            return (0, sf::LBA_RANGE | sf::DNR);
                        }
                        let o = (rslba << n.lba_shift) as usize;
                        let l = (rnlb << n.lba_shift) as usize;
                        self.disks[di].data[o..o + l].fill(0); // deallocated blocks read as zeroes
                        self.disks[di].mark_dirty(rslba, rnlb);
                    }
                }
                (0, sf::OK)
            }
            _ => (0, sf::INVALID_OPCODE | sf::DNR),
        }
    }

    /// A write, zone append, Zone Management Send or Receive on a zoned namespace.
    fn zone_command(&mut self, di: usize, c: &[u8; 64]) -> (u32, u16) {
        const BOUNDARY: u16 = (1 << 9) | (0xB8 << 1) | sf::DNR;
        const FULL: u16 = (1 << 9) | (0xB9 << 1) | sf::DNR;
        const OFFLINE: u16 = (1 << 9) | (0xBB << 1) | sf::DNR;
        const READ_ONLY: u16 = (1 << 9) | (0xBA << 1) | sf::DNR;
        const INVALID_WRITE: u16 = (1 << 9) | (0xBC << 1) | sf::DNR;
        const TOO_MANY_OPEN: u16 = (1 << 9) | (0xBE << 1) | sf::DNR;
        const TRANSITION: u16 = (1 << 9) | (0xBF << 1) | sf::DNR;
        if regs::Cc::decode(self.cc).css != 6 {
            return (0, sf::INVALID_OPCODE | sf::DNR);
        }
        let n = self.disks[di].cfg;
        let Some(mut z) = self.disks[di].zones.clone() else {
            return (0, sf::INVALID_OPCODE | sf::DNR);
        };
        let (opc, prp1, prp2) = (c[0], le64(c, 24), le64(c, 32));
        let slba = le64(c, 40);
        let (cdw12, cdw13) = (le32(c, 48), le32(c, 52));
        let zsize = z.cfg.zone_blocks;
        let zi = (slba / zsize) as usize;
        if zi >= z.zones.len() {
            return (0, sf::LBA_RANGE | sf::DNR);
        }
        let open = |z: &Zones| {
            z.zones
                .iter()
                .filter(|(s, _)| *s == zs::IOPEN || *s == zs::EOPEN)
                .count() as u32
        };
        let result = match opc {
            0x01 | 0x7D => {
                let nlb = (cdw12 & 0xFFFF) as u64 + 1;
                let zslba = zi as u64 * zsize;
                if opc == 0x7D && slba != zslba {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                let (state, wp) = z.zones[zi];
                match state {
                    zs::FULL => return (0, FULL),
                    zs::OFFLINE => return (0, OFFLINE),
                    zs::READ_ONLY => return (0, READ_ONLY),
                    _ => {}
                }
                let at = if opc == 0x7D { wp } else { slba };
                if at != wp {
                    return (0, INVALID_WRITE);
                }
                if at + nlb > zslba + z.cfg.capacity {
                    return (0, BOUNDARY);
                }
                if (state == zs::EMPTY || state == zs::CLOSED)
                    && z.cfg.max_open != 0
                    && open(&z) >= z.cfg.max_open
                {
                    return (0, TOO_MANY_OPEN);
                }
                let bytes = (nlb << n.lba_shift) as usize;
                let mut buf = vec![0u8; bytes];
                if let Err(s) = self.transfer_in(prp1, prp2, &mut buf) {
                    return (0, s);
                }
                let off = (at << n.lba_shift) as usize;
                self.disks[di].data[off..off + bytes].copy_from_slice(&buf);
                self.disks[di].mark_dirty(at, nlb);
                let new_wp = at + nlb;
                let new_state = if new_wp == zslba + z.cfg.capacity {
                    zs::FULL
                } else if state == zs::EOPEN {
                    zs::EOPEN
                } else {
                    zs::IOPEN
                };
                z.zones[zi] = (new_state, new_wp);
                let mut reported = at;
                if let Fault::AppendLba(d) = self.fault {
                    reported = at.wrapping_add_signed(d);
                }
                if opc == 0x7D {
                    self.dw1 = (reported >> 32) as u32;
                    (reported as u32, sf::OK)
                } else {
                    (0, sf::OK)
                }
            }
            0x79 => {
                let action = (cdw13 & 0xFF) as u8;
                let all = cdw13 & (1 << 8) != 0;
                let targets: Vec<usize> = if all {
                    (0..z.zones.len()).collect()
                } else {
                    if slba % zsize != 0 {
                        return (0, sf::INVALID_FIELD | sf::DNR);
                    }
                    vec![zi]
                };
                for t in targets {
                    let (state, wp) = z.zones[t];
                    let start = t as u64 * zsize;
                    let next = match (action, state) {
                        (1, zs::IOPEN | zs::EOPEN) => (zs::CLOSED, wp),
                        (1, zs::CLOSED) => (zs::CLOSED, wp),
                        (2, zs::IOPEN | zs::EOPEN | zs::CLOSED | zs::EMPTY | zs::FULL) => {
                            if all && state == zs::EMPTY {
                                continue;
                            }
                            (zs::FULL, start + z.cfg.capacity)
                        }
                        (3, zs::EMPTY | zs::CLOSED | zs::IOPEN | zs::EOPEN) => {
                            if all && state == zs::EMPTY {
                                continue;
                            }
                            if state != zs::IOPEN
                                && state != zs::EOPEN
                                && z.cfg.max_open != 0
                                && open(&z) >= z.cfg.max_open
                            {
                                return (0, TOO_MANY_OPEN);
                            }
                            (zs::EOPEN, wp)
                        }
                        (4, s) if s != zs::OFFLINE && s != zs::READ_ONLY => (zs::EMPTY, start),
                        (5, _) => (zs::OFFLINE, start),
                        _ if all => continue,
                        _ => return (0, TRANSITION),
                    };
                    if next.0 == zs::EMPTY {
                        // A reset is durable when it completes (zone state is persistent): the
                        // media is zeroed too, nothing of the zone is left to a power cut.
                        let o = (start << n.lba_shift) as usize;
                        let l = (zsize << n.lba_shift) as usize;
                        let disk = &mut self.disks[di];
                        disk.data[o..o + l].fill(0);
                        if let Some(m) = disk.durable.as_mut() {
                            m[o..o + l].fill(0);
                        }
                        let kept = disk.dirty.split_off(&start);
                        disk.dirty.extend(kept.range(start + zsize..));
                    }
                    if next.0 == zs::EMPTY || next.0 == zs::FULL {
                        z.durable_wp[t] = next.1;
                    }
                    z.zones[t] = next;
                }
                (0, sf::OK)
            }
            0x7A => {
                let bytes = ((cdw12 as usize) + 1) * 4;
                if bytes < 64 || cdw13 & 0xFF != 0 {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                let partial = cdw13 & (1 << 16) != 0;
                let room = (bytes - 64) / 64;
                let mut r = vec![0u8; bytes];
                let all: Vec<(usize, (u8, u64))> =
                    z.zones.iter().copied().enumerate().skip(zi).collect();
                let count = if partial {
                    all.len().min(room)
                } else {
                    all.len()
                };
                let mut count = count as u64;
                if let Fault::ZoneReportCount(c) = self.fault {
                    count = c;
                }
                r[0..8].copy_from_slice(&count.to_le_bytes());
                for (k, (i, (state, wp))) in all.iter().take(room).enumerate() {
                    let o = 64 + k * 64;
                    r[o] = 2;
                    r[o + 1] = state << 4;
                    r[o + 8..o + 16].copy_from_slice(&z.cfg.capacity.to_le_bytes());
                    r[o + 16..o + 24].copy_from_slice(&(*i as u64 * zsize).to_le_bytes());
                    r[o + 24..o + 32].copy_from_slice(&wp.to_le_bytes());
                }
                if let Err(s) = self.transfer_out(prp1, prp2, &r) {
                    return (0, s);
                }
                (0, sf::OK)
            }
            _ => (0, sf::INVALID_OPCODE | sf::DNR),
        };
        self.disks[di].zones = Some(z);
        result
    }

    // ---------------- health, log pages, events ----------------

    /// Counts an executed I/O command (SMART counters) and logs its error, if it failed.
    fn account_io(&mut self, c: &[u8; 64], sqid: u16, cid: u16, status: u16) {
        let nsid = le32(c, 4);
        let shift = self
            .disks
            .iter()
            .find(|d| d.cfg.nsid == nsid)
            .map_or(9, |d| d.cfg.lba_shift);
        let nlb = (le32(c, 48) & 0xFFFF) as u64 + 1;
        let h = &mut self.health;
        if status & !1 == sf::OK {
            match c[0] {
                0x01 => {
                    h.write_cmds += 1;
                    h.bytes_written += nlb << shift;
                }
                0x02 => {
                    h.read_cmds += 1;
                    h.bytes_read += nlb << shift;
                }
                _ => {}
            }
            return;
        }
        if (status >> 9) & 7 == 2 {
            h.media_errors += 1;
        }
        h.error_count += 1;
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&h.error_count.to_le_bytes());
        e[8..10].copy_from_slice(&sqid.to_le_bytes());
        e[10..12].copy_from_slice(&cid.to_le_bytes());
        e[12..14].copy_from_slice(&(status & !1).to_le_bytes());
        e[14..16].copy_from_slice(&0xFFFFu16.to_le_bytes());
        e[16..24].copy_from_slice(&(le32(c, 40) as u64 | (le32(c, 44) as u64) << 32).to_le_bytes());
        e[24..28].copy_from_slice(&nsid.to_le_bytes());
        if h.errors.len() == MODEL_ERROR_ENTRIES {
            h.errors.pop_front();
        }
        h.errors.push_back(e);
    }

    fn temperature_warning(&self) -> bool {
        let h = &self.health;
        h.temperature >= h.thresh_over || h.temperature <= h.thresh_under
    }

    /// A SMART temperature event if a threshold is crossed and the event is enabled.
    fn check_temperature(&mut self) {
        if self.temperature_warning() && self.health.async_config & 0x02 != 0 {
            self.health.events.push_back((1, 0x01, 0x02));
            self.deliver_events();
        }
    }

    /// Namespace Attachment (0x15; SEL 0 attach, 1 detach) as QEMU does it: the controller
    /// list must be non-empty and name only this controller (ID 0); then the namespace is
    /// attached or detached and a namespace-attribute notice raised.
    fn namespace_attachment(&mut self, sel: u32, nsid: u32, prp1: u64, prp2: u64) -> (u32, u16) {
        const SC: u16 = 1 << 9; // command specific
        let mut list = [0u8; 4096];
        if let Err(s) = self.transfer_in(prp1, prp2, &mut list) {
            return (0, s);
        }
        let Some(i) = self.disks.iter().position(|d| d.cfg.nsid == nsid) else {
            return (0, sf::INVALID_FIELD | sf::DNR);
        };
        let count = u16::from_le_bytes([list[0], list[1]]) as usize;
        if count == 0 {
            return (0, SC | (0x1C << 1) | sf::DNR);
        }
        for k in 0..count.min(2047) {
            if u16::from_le_bytes([list[2 + 2 * k], list[3 + 2 * k]]) != 0 {
                return (0, SC | (0x1C << 1) | sf::DNR);
            }
        }
        let active = self.disks[i].active;
        match (sel, active) {
            (0, true) => return (0, SC | (0x18 << 1) | sf::DNR),
            (1, false) => return (0, SC | (0x1A << 1) | sf::DNR),
            (0 | 1, _) => self.disks[i].active = sel == 0,
            _ => return (0, sf::INVALID_FIELD | sf::DNR),
        }
        self.namespace_changed(nsid);
        (0, sf::OK)
    }

    fn namespace_changed(&mut self, nsid: u32) {
        let fresh = self.health.changed.insert(nsid);
        if fresh && self.health.async_config & (1 << 8) != 0 {
            self.health.events.push_back((2, 0x00, 0x04));
            self.deliver_events();
        }
    }

    /// Completes outstanding AERs with waiting events whose type is not masked.
    fn deliver_events(&mut self) {
        while !self.health.aers.is_empty() {
            let masked = self.health.masked;
            let Some(i) = self
                .health
                .events
                .iter()
                .position(|(t, _, _)| masked & (1 << t) == 0)
            else {
                return;
            };
            let Some((kind, info, lid)) = self.health.events.remove(i) else {
                return;
            };
            let Some((cid, sq_head)) = self.health.aers.pop_front() else {
                return;
            };
            self.health.masked |= 1 << kind;
            self.health.aer_completions += 1;
            let dw0 = kind as u32 | (info as u32) << 8 | (lid as u32) << 16;
            let mut e = [0u8; 16];
            e[0..4].copy_from_slice(&dw0.to_le_bytes());
            e[8..10].copy_from_slice(&sq_head.to_le_bytes());
            e[12..14].copy_from_slice(&cid.to_le_bytes());
            self.post_raw(0, e);
        }
    }

    /// Get Log Page: Error Information (1), SMART / Health (2), Changed Namespace List (4).
    /// RAE = 0 clears the page's event type (and the changed list).
    fn get_log_page(
        &mut self,
        cdw10: u32,
        cdw11: u32,
        nsid: u32,
        prp1: u64,
        prp2: u64,
    ) -> (u32, u16) {
        let lid = (cdw10 & 0xFF) as u8;
        let rae = cdw10 & (1 << 15) != 0;
        let numd = ((cdw10 >> 16) | (cdw11 & 0xFFFF) << 16) as usize + 1;
        let len = numd * 4;
        let (page, kind): (Vec<u8>, u8) = match lid {
            0x01 => {
                let mut p = vec![0u8; MODEL_ERROR_ENTRIES * 64];
                for (i, e) in self.health.errors.iter().rev().enumerate() {
                    p[i * 64..i * 64 + 64].copy_from_slice(e);
                }
                (p, 0)
            }
            0x02 => {
                if nsid != u32::MAX && nsid != 0 {
                    return (0, sf::INVALID_FIELD | sf::DNR);
                }
                let h = &self.health;
                let mut p = vec![0u8; 512];
                p[0] = if self.temperature_warning() { 0x02 } else { 0 };
                p[1..3].copy_from_slice(&h.temperature.to_le_bytes());
                p[3] = 100;
                p[4] = 10;
                let put = |p: &mut Vec<u8>, o: usize, v: u64| {
                    p[o..o + 16].copy_from_slice(&(v as u128).to_le_bytes())
                };
                put(&mut p, 32, (h.bytes_read / 512).div_ceil(1000));
                put(&mut p, 48, (h.bytes_written / 512).div_ceil(1000));
                put(&mut p, 64, h.read_cmds);
                put(&mut p, 80, h.write_cmds);
                put(&mut p, 112, 1);
                put(&mut p, 160, h.media_errors);
                put(&mut p, 176, h.error_count);
                (p, 1)
            }
            0x04 => {
                let mut p = vec![0u8; 4096];
                let ids: Vec<u32> = self.health.changed.iter().copied().collect();
                if ids.len() > 1024 {
                    p[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
                } else {
                    for (i, id) in ids.iter().enumerate() {
                        p[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                    }
                }
                self.health.changed.clear();
                (p, 2)
            }
            _ => return (0, sf::INVALID_LOG_PAGE | sf::DNR),
        };
        let mut out = vec![0u8; len];
        let n = len.min(page.len());
        out[..n].copy_from_slice(&page[..n]);
        if let Err(s) = self.transfer_out(prp1, prp2, &out) {
            return (0, s);
        }
        if !rae {
            self.health.masked &= !(1 << kind);
            self.deliver_events();
        }
        (0, sf::OK)
    }
}
