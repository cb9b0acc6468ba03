//! # The write-ahead log on a zoned namespace ([`ZonedWal`])
//!
//! A zoned namespace only takes sequential writes (at each zone's write pointer) or Zone Append,
//! so [`crate::Wal`]'s superblock rewritten in place cannot work there. This log keeps all of its
//! state in the zones it writes: nothing is ever rewritten, and recovery reads it back from the
//! zones' contents and write pointers alone.
//!
//! ## Layout
//! The log owns `zones` zones from zone `first_zone` of one zoned namespace. Each zone it uses
//! starts with a **zone header** block (little endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `"KEELZWL1"` |
//! | 8..12 | `format_epoch`: the format that made the log (bumped by [`ZonedWal::format`]) |
//! | 12..16 | `epoch`: the session (bumped by every [`ZonedWal::open`]) |
//! | 16..24 | `first_seq`: the sequence number of the first record of this zone |
//! | 24..28 | `window`: appends the session kept in flight at most |
//! | 28..32 | `max_blocks`: the largest record, in blocks, the session could write |
//! | 32..36 | `zone`: the zone's index in the namespace |
//! | 36..40 | CRC32C (`CRC_32_ISCSI`) of bytes 0..36 |
//!
//! then **records**, each a whole number of blocks, placed by Zone Append (several are in flight
//! at once, so the device may place them in any order inside the zone). A record's first block
//! holds a 32-byte header then the payload; each further block starts with an 8-byte tag then the
//! payload's next bytes, so payload bytes never begin a block and a payload can never be taken
//! for a record header:
//!
//! | bytes | first block | further blocks |
//! | --- | --- | --- |
//! | 0..4 | magic `"ZREC"` | magic `"ZCON"` |
//! | 4..8 | `len`: payload bytes | `seq` (low 32 bits) |
//! | 8..16 | `seq` | payload |
//! | 16..20 | `epoch` (the zone header's) | |
//! | 20..24 | `blocks` | |
//! | 24..28 | CRC32C of bytes 0..24, 28..32 and the payload | |
//! | 28..32 | `behind`: `seq` minus the acknowledged end when the record was framed (`u32::MAX`: more) | |
//! | 32.. | payload | |
//!
//! Nothing in a record depends on its LBA (the device chooses it); a record belongs to the zone
//! it is in, whose header fixes its epoch and the range of its sequence numbers.
//!
//! ## Protocol
//! * [`ZonedWal::format`] resets every zone of the range and writes the first zone's header
//!   (`format_epoch` above any the range held, epoch 1, `first_seq` 0), flushed.
//! * [`ZonedWal::append`] frames a record into one of up to `in_flight` DMA buffers and submits
//!   it as a Zone Append to the current zone; it returns the record's sequence number (dense from
//!   0) at once. It is **not acknowledged**. Sequence number `s` is submitted only when every
//!   record below `s - window + 1` has completed, so a record is never placed more than `window`
//!   records out of order (iteration relies on that; recovery does not). When the next record
//!   does not fit the current zone (or the zone holds [`MAX_ZONE_RECORDS`]), the log moves on to
//!   the next empty zone of the range: its header `(epoch, first_seq = next seq)` is appended
//!   and waited for first, so it is the zone's first block; the zone left behind is finished
//!   once its appends completed (one open zone at a time). No empty zone left:
//!   [`Error::Full`] (nothing is lost; [`ZonedWal::reclaim`] frees zones).
//! * [`ZonedWal::sync`] waits until every append completed, then issues a Flush and waits for
//!   it; only then are the records acknowledged ([`ZonedWal::acked`]). A failed append or Flush
//!   makes the log fail every later call (the append may or may not have landed: it is never
//!   issued again, which could place it twice); reopen to go on.
//! * [`ZonedWal::open`] (recovery): a zone report of every zone of the range; every non-empty
//!   zone's header is read (a zone the device reports offline is [`Error::ZoneUnusable`]: it
//!   may have held acknowledged records). Only headers of the newest `format_epoch` count. They
//!   are ordered by `(epoch, first_seq)`, and walked in that order from the first one's
//!   `first_seq`: a zone is taken only if its `first_seq` equals the end reached so far; from a
//!   taken zone, every block from its start up to its write pointer (its capacity if full) is
//!   scanned, the sequence numbers of the valid records seen are marked in a bitmap (bounded:
//!   [`MAX_ZONE_RECORDS`] bits), and the dense run from `first_seq` is taken. Anything after a
//!   hole is a torn tail, unless a valid record of the format (in any zone) was framed when the
//!   acknowledged end was past the hole: then an acknowledged record is corrupt or gone, and
//!   recovery is [`Error::Corrupt`] with the hole's sequence number, having written nothing.
//!   Every zone not taken (torn tails of later zones, headers that never
//!   became durable, older formats) is reset, after a Flush that makes what was read durable
//!   (it may have come from the device's volatile cache after a reboot without power loss), and
//!   every zone taken is finished (never appended to again, and its blocks read the same). The
//!   next session appends with epoch `max + 1` into a fresh zone (started by the first
//!   append), so a torn tail left in an older zone is never continued.
//! * [`ZonedWal::next`] iterates the acknowledged records in order from a [`Cursor`];
//!   [`ZonedWal::reclaim`] resets the oldest zones whose records all lie below a checkpoint.
//!
//! ## Guarantees
//! * Every record acknowledged by a completed `sync` comes back after a power cut, in order:
//!   an acknowledged record was durable, with every record before it and every zone header
//!   before it, so the walk reaches it.
//! * Recovery never returns a corrupt record (magic, epoch, sequence range, block count, tags
//!   and CRC32C are checked), and never a record past a hole: what it returns is a prefix of
//!   what was appended. It may return records appended after the last `sync` when the power cut
//!   kept them (the model's volatile cache keeps any subset of the unflushed blocks).
//! * Recovery may run any number of times, and be cut anywhere: it writes nothing until its
//!   Flush made what it read durable, and then only resets zones it does not return.
//! * A device that lies about an append's LBA (outside its zone) is caught by the driver
//!   (`IoError::BadResult`); one that places a record over the zone header is caught here
//!   ([`Error::BadDevice`]). Neither acknowledges anything.
//! * No allocation (DMA buffers come from the caller's allocator at `format` / `open`), no
//!   panics on bad input, typed errors.
//!
//! ## Limits
//! An interrupted `format` may leave zones of the old log behind (format again). A device that
//! drops a completed zone reset on power loss could bring back an older zone; the
//! `format_epoch` hides older formats, not older zones of the same format. Corruption of an
//! acknowledged record is told from a torn tail only by a later record: each record carries the
//! acknowledged end its framing saw (there is no superblock recording it: nothing may be
//! rewritten). Corruption among the records the last `sync` acknowledged, with no record
//! appended after that `sync` surviving, looks like a torn tail: recovery then ends before the
//! corrupt record and never returns it, but cannot say it was acknowledged. Zone capacities are taken from the report at `format` / `open`.
//!
//! QEMU 7.2 keeps zone state (write pointers, states) in memory only: a new QEMU process starts
//! with every zone empty whatever the image holds, so a replay across a QEMU restart sees an
//! empty log (`NotFormatted`); a guest reset keeps them. The QEMU case (`xtask/src/itest/zwal.rs`)
//! therefore crashes the guest by a machine reset and replays in the same QEMU process.

use bitvec::array::BitArray;
use crc::{Crc, CRC_32_ISCSI};
use heapless::Vec;
use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, NsId, SubmitError};
use keel_hal::{Clock, DmaAllocator, DmaRegion, Mmio};
use keel_nvme::{
    parse_zone_report, IoQueuePair, ZoneAction, ZoneDescriptor, ZoneOp, ZoneReportError, ZoneState,
    Zoned,
};

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);
/// Zone header magic, `"KEELZWL1"`.
pub const ZONE_MAGIC: u64 = u64::from_le_bytes(*b"KEELZWL1");
/// Record first-block magic, `"ZREC"`.
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"ZREC");
/// Record further-block magic, `"ZCON"`.
pub const CONT_MAGIC: u32 = u32::from_le_bytes(*b"ZCON");
/// Bytes of a record's first block before its payload.
pub const REC_HEADER: usize = 32;
/// Bytes of a record's further blocks before their payload.
pub const CONT_HEADER: usize = 8;
/// Most appends in flight at once.
pub const MAX_IN_FLIGHT: usize = 32;
/// Most zones a log may own.
pub const MAX_ZONES: usize = 128;
/// Most records in one zone (recovery's bitmap per zone: 4 KiB on the stack).
pub const MAX_ZONE_RECORDS: u64 = 32768;
const WORDS: usize = MAX_ZONE_RECORDS as usize / 64;

const TAG_OP: u32 = 0x5A00;

/// A queue that takes the zoned command set: what the log needs beyond [`BlockQueue`].
/// Implemented for the driver's [`IoQueuePair`].
pub trait ZoneQueue: BlockQueue {
    /// Submits a zone operation (see `IoQueuePair::submit_zone`).
    fn submit_zone(&mut self, op: ZoneOp, tag: u32) -> Result<(), SubmitError>;
    /// The LBA a completed zone append was written at (see `IoQueuePair::pop_appended`).
    fn pop_appended(&mut self) -> Option<(u32, u64)>;
}

impl<M: Mmio, C: Clock> ZoneQueue for IoQueuePair<M, C> {
    fn submit_zone(&mut self, op: ZoneOp, tag: u32) -> Result<(), SubmitError> {
        IoQueuePair::submit_zone(self, op, tag)
    }
    fn pop_appended(&mut self) -> Option<(u32, u64)> {
        IoQueuePair::pop_appended(self)
    }
}

/// Where the log lives and how it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZonedConfig {
    /// The zoned namespace.
    pub ns: NsId,
    /// Its zone geometry (`Namespace::zoned` from bring-up).
    pub zoned: Zoned,
    /// The first zone of the log (an index: zone `i` starts at `i * zone_size`).
    pub first_zone: u64,
    /// Zones the log owns (2..=[`MAX_ZONES`]).
    pub zones: u64,
    /// Appends in flight at once (1..=[`MAX_IN_FLIGHT`]).
    pub in_flight: usize,
    /// Largest payload in bytes.
    pub max_record: usize,
    /// How long any one wait for the device may take, in milliseconds.
    pub timeout_ms: u64,
}

impl ZonedConfig {
    /// `zones` zones from `first_zone`, 8 appends in flight, payloads up to 4 KiB, 5 s waits.
    pub fn new(ns: NsId, zoned: Zoned, first_zone: u64, zones: u64) -> Self {
        Self {
            ns,
            zoned,
            first_zone,
            zones,
            in_flight: 8,
            max_record: 4096,
            timeout_ms: 5000,
        }
    }
}

/// Zoned log errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A device command failed (the log fails from then on; reopen).
    Io(IoError),
    /// The queue refused a command.
    Submit(SubmitError),
    /// The device did not complete a command in time (the log fails from then on).
    Timeout,
    /// No zone of the range holds a log header: run [`ZonedWal::format`].
    NotFormatted,
    /// No empty zone left for the next record (not sticky: reclaim, then append again).
    Full,
    /// Payload larger than the configured `max_record`.
    TooLarge,
    /// The configuration does not fit the namespace, the queue or what the log on it needs.
    Config,
    /// DMA memory for the log's buffers could not be had.
    Dma,
    /// A zone of the range cannot be used: offline (recovery cannot read it, it may hold
    /// acknowledged records) or read-only where it must be reset.
    ZoneUnusable {
        /// The zone's index in the namespace.
        zone: u64,
        /// Its state.
        state: ZoneState,
    },
    /// The device's zone report was malformed.
    Report(ZoneReportError),
    /// The device did something impossible (a record placed over a zone header, a header not
    /// placed at its zone's start).
    BadDevice,
    /// An acknowledged record could not be found or failed its checks: while iterating, or at
    /// recovery when a later record proves it was acknowledged (recovery then writes nothing).
    Corrupt {
        /// Its sequence number.
        seq: u64,
    },
    /// The caller's buffer is smaller than the record's payload.
    BufferTooSmall {
        /// The payload's length.
        need: usize,
    },
    /// A cursor or checkpoint outside the acknowledged log.
    BadCursor,
}

impl From<SubmitError> for Error {
    fn from(e: SubmitError) -> Self {
        Error::Submit(e)
    }
}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// The first record the log holds (0 unless zones were reclaimed).
    pub first: u64,
    /// The end: records `first..end` came back (every acknowledged one among them).
    pub end: u64,
    /// The epoch the next session appends with.
    pub epoch: u32,
    /// Zones the records came from.
    pub zones: usize,
    /// Zones reset because they were not part of the log (torn tails, lost headers, older
    /// formats).
    pub discarded: usize,
}

/// A read position for [`ZonedWal::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    seq: u64,
    ci: usize,
    /// Every record below this LBA of zone `ci` has been returned (or is not the log's).
    floor: u64,
}

impl Cursor {
    /// The sequence number [`ZonedWal::next`] returns next.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A valid record found on the media.
#[derive(Debug, Clone, Copy)]
struct Rec {
    seq: u64,
    blocks: u64,
    len: usize,
    /// Its payload was copied out.
    copied: bool,
    /// The acknowledged end when it was framed.
    claim: u64,
}

/// One zone of the log, oldest first.
#[derive(Debug, Clone, Copy, Default)]
struct ChainZone {
    zone: u64,
    first_seq: u64,
    epoch: u32,
    window: u32,
    max_blocks: u32,
    /// Blocks past the zone start worth reading (its write pointer, as far as known).
    lim: u64,
}

#[derive(Debug, Clone, Copy)]
struct ZoneHeader {
    format_epoch: u32,
    epoch: u32,
    first_seq: u64,
    window: u32,
    max_blocks: u32,
    zone: u32,
}

impl ZoneHeader {
    fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&ZONE_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&self.format_epoch.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.window.to_le_bytes());
        b[28..32].copy_from_slice(&self.max_blocks.to_le_bytes());
        b[32..36].copy_from_slice(&self.zone.to_le_bytes());
        let crc = CRC32C.checksum(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 40], zone: u64) -> Option<Self> {
        if le64(b, 0) != ZONE_MAGIC || CRC32C.checksum(&b[0..36]) != le32(b, 36) {
            return None;
        }
        let h = ZoneHeader {
            format_epoch: le32(b, 8),
            epoch: le32(b, 12),
            first_seq: le64(b, 16),
            window: le32(b, 24),
            max_blocks: le32(b, 28),
            zone: le32(b, 32),
        };
        let sane = u64::from(h.zone) == zone
            && (1..=MAX_IN_FLIGHT as u32).contains(&h.window)
            && h.max_blocks >= 1
            && h.first_seq.checked_add(MAX_ZONE_RECORDS).is_some();
        sane.then_some(h)
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    let mut m = [0u8; 4];
    m.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(m)
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(m)
}

/// Blocks a record of `len` payload bytes takes with `bs`-byte blocks.
pub fn record_blocks(len: usize, bs: usize) -> u64 {
    let first = bs - REC_HEADER;
    if len <= first {
        1
    } else {
        1 + (len - first).div_ceil(bs - CONT_HEADER) as u64
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    busy: bool,
    seq: u64,
    /// Index into the chain of the zone it was appended to.
    ci: usize,
    blocks: u32,
}

/// What one zone looked like in the report.
#[derive(Debug, Clone, Copy)]
struct ZoneInfo {
    state: ZoneState,
    /// Blocks from the zone start worth reading (write pointer or capacity).
    lim: u64,
    header: Option<ZoneHeader>,
}

/// The log on a zoned namespace. See the module documentation.
pub struct ZonedWal<Q: ZoneQueue, C: Clock> {
    q: Q,
    clock: C,
    cfg: ZonedConfig,
    bs: usize,
    max_blocks: u32,
    format_epoch: u32,
    epoch: u32,
    chain: Vec<ChainZone, MAX_ZONES>,
    /// Per zone of the range: empty, usable for the next zone of the log.
    free: [bool; MAX_ZONES],
    caps: [u64; MAX_ZONES],
    /// The zone being appended to (an index into `chain`), once this session started one.
    cur: Option<usize>,
    cur_used: u64,
    cur_records: u64,
    first: u64,
    next_seq: u64,
    acked: u64,
    slots: [Slot; MAX_IN_FLIGHT],
    bufs: Vec<DmaRegion, MAX_IN_FLIGHT>,
    page: DmaRegion,
    rbuf: DmaRegion,
    win_blocks: u64,
    win: Option<(u64, u64)>,
    op_done: Option<Result<(), IoError>>,
    op_lba: Option<u64>,
    failed: Option<Error>,
}

impl<Q: ZoneQueue, C: Clock> ZonedWal<Q, C> {
    fn new(q: Q, dma: &dyn DmaAllocator, clock: C, cfg: ZonedConfig) -> Result<Self, Error> {
        let bs = q.block_size(cfg.ns).ok_or(Error::Config)? as usize;
        let z = cfg.zoned;
        let ok = bs >= 512
            && (2..=MAX_ZONES as u64).contains(&cfg.zones)
            && cfg
                .first_zone
                .checked_add(cfg.zones)
                .is_some_and(|e| e <= z.zones)
            && (1..=MAX_IN_FLIGHT).contains(&cfg.in_flight)
            && cfg.in_flight < q.depth()
            && cfg.max_record <= u32::MAX as usize;
        if !ok {
            return Err(Error::Config);
        }
        let max_blocks = record_blocks(cfg.max_record, bs);
        let rec_bytes = max_blocks as usize * bs;
        if max_blocks + 1 > z.zone_size || rec_bytes > z.append_limit as usize {
            return Err(Error::Config);
        }
        let alloc = |len: usize| dma.alloc(len, 4096).map_err(|_| Error::Dma);
        let mut bufs = Vec::new();
        for _ in 0..cfg.in_flight {
            let _ = bufs.push(alloc(rec_bytes)?);
        }
        let win_blocks = max_blocks.max((64 * 1024 / bs) as u64);
        Ok(Self {
            q,
            clock,
            cfg,
            bs,
            max_blocks: max_blocks as u32,
            format_epoch: 0,
            epoch: 0,
            chain: Vec::new(),
            free: [false; MAX_ZONES],
            caps: [0; MAX_ZONES],
            cur: None,
            cur_used: 0,
            cur_records: 0,
            first: 0,
            next_seq: 0,
            acked: 0,
            slots: [Slot::default(); MAX_IN_FLIGHT],
            bufs,
            page: alloc(bs.max(4096))?,
            rbuf: alloc(win_blocks as usize * bs)?,
            win_blocks,
            win: None,
            op_done: None,
            op_lba: None,
            failed: None,
        })
    }

    fn zone_lba(&self, zone: u64) -> u64 {
        zone * self.cfg.zoned.zone_size
    }

    // ---------------------------------------------------------------- device plumbing

    /// Reaps completions: appends update their slots, the one operation its result.
    fn pump(&mut self) {
        let mut done: Vec<(u32, Result<(), IoError>), 64> = Vec::new();
        self.q.poll(64, &mut |tag, r| {
            let _ = done.push((tag, r));
        });
        let mut lbas: Vec<(u32, u64), 64> = Vec::new();
        while let Some(a) = self.q.pop_appended() {
            if lbas.push(a).is_err() {
                break;
            }
        }
        for (tag, r) in done {
            let lba = lbas.iter().find(|(t, _)| *t == tag).map(|&(_, l)| l);
            if tag == TAG_OP {
                self.op_done = Some(r);
                self.op_lba = lba;
                continue;
            }
            let Some(s) = self.slots.get_mut(tag as usize).filter(|s| s.busy) else {
                continue;
            };
            s.busy = false;
            let s = *s;
            match (r, lba) {
                (Err(e), _) => {
                    self.failed.get_or_insert(Error::Io(e));
                }
                (Ok(()), Some(lba)) => {
                    let Some(cz) = self.chain.get_mut(s.ci) else {
                        continue;
                    };
                    let start = cz.zone * self.cfg.zoned.zone_size;
                    let end = lba + u64::from(s.blocks) - start;
                    if lba <= start || end > self.caps[(cz.zone - self.cfg.first_zone) as usize] {
                        self.failed.get_or_insert(Error::BadDevice);
                    } else {
                        cz.lim = cz.lim.max(end);
                    }
                }
                (Ok(()), None) => {
                    self.failed.get_or_insert(Error::BadDevice);
                }
            }
        }
    }

    fn deadline(&self) -> u64 {
        self.clock
            .now_ns()
            .saturating_add(self.cfg.timeout_ms.saturating_mul(1_000_000))
    }

    fn fail(&mut self, e: Error) -> Error {
        *self.failed.get_or_insert(e)
    }

    /// Submits one operation (retrying while the queue is full) and waits for it; returns the
    /// LBA if it was an append.
    fn run(
        &mut self,
        mut submit: impl FnMut(&mut Q, u32) -> Result<(), SubmitError>,
    ) -> Result<Option<u64>, Error> {
        let dl = self.deadline();
        self.op_done = None;
        self.op_lba = None;
        loop {
            match submit(&mut self.q, TAG_OP) {
                Ok(()) => break,
                Err(SubmitError::QueueFull) => self.pump(),
                Err(e) => return Err(Error::Submit(e)),
            }
            if self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        }
        self.q.flush_submissions();
        while self.op_done.is_none() {
            self.pump();
            if self.op_done.is_none() && self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        }
        match self.op_done.take() {
            Some(Ok(())) => Ok(self.op_lba.take()),
            Some(Err(e)) => Err(Error::Io(e)),
            None => Err(Error::Timeout),
        }
    }

    fn flush_device(&mut self) -> Result<(), Error> {
        let ns = self.cfg.ns;
        self.run(|q, t| q.submit(BlockOp::Flush { ns }, t))
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn manage(&mut self, zone: u64, action: ZoneAction) -> Result<(), Error> {
        let (ns, zslba) = (self.cfg.ns, self.zone_lba(zone));
        self.run(|q, t| {
            q.submit_zone(
                ZoneOp::Manage {
                    ns,
                    zone: zslba,
                    action,
                    all: false,
                },
                t,
            )
        })?;
        Ok(())
    }

    /// Every zone of the range, from zone reports.
    fn report(&mut self, out: &mut [ZoneDescriptor; MAX_ZONES]) -> Result<(), Error> {
        let n = self.cfg.zones as usize;
        let mut got = 0;
        let buf = BufRef::new(&self.page, 0, 4096).map_err(|_| Error::Dma)?;
        while got < n {
            let (ns, from) = (self.cfg.ns, self.zone_lba(self.cfg.first_zone + got as u64));
            self.run(|q, t| q.submit_zone(ZoneOp::Report { ns, from, buf }, t))?;
            let mut bytes = [0u8; 4096];
            self.page
                .read_bytes(0, &mut bytes)
                .map_err(|_| Error::Dma)?;
            let count = parse_zone_report(&bytes, &self.cfg.zoned, from, &mut out[got..n])
                .map_err(Error::Report)?;
            let count = count.min(n - got);
            for (i, d) in out[got..got + count].iter().enumerate() {
                if d.start != self.zone_lba(self.cfg.first_zone + (got + i) as u64) {
                    return Err(Error::Report(ZoneReportError::Start(d.start)));
                }
            }
            if count == 0 {
                return Err(Error::Report(ZoneReportError::Count(0)));
            }
            got += count;
        }
        Ok(())
    }

    /// Makes blocks `lba .. lba + n` readable from the window (`n <= win_blocks`, and no read
    /// goes past `lim`, an LBA). Returns the byte offset of `lba` in the window.
    fn window(&mut self, lba: u64, n: u64, lim: u64) -> Result<usize, Error> {
        if let Some((w, len)) = self.win {
            if lba >= w && lba + n <= w + len {
                return Ok((lba - w) as usize * self.bs);
            }
        }
        let len = self.win_blocks.min(lim.saturating_sub(lba)).max(n);
        self.win = None;
        let buf = BufRef::new(&self.rbuf, 0, len as usize * self.bs).map_err(|_| Error::Dma)?;
        let ns = self.cfg.ns;
        let blocks = len as u32;
        self.run(|q, t| {
            q.submit(
                BlockOp::Read {
                    ns,
                    lba,
                    blocks,
                    buf,
                },
                t,
            )
        })?;
        self.win = Some((lba, len));
        Ok(0)
    }

    fn read_header(&mut self, zone: u64, lim: u64) -> Result<Option<ZoneHeader>, Error> {
        let start = self.zone_lba(zone);
        let off = self.window(start, 1, start + lim)?;
        let mut b = [0u8; 40];
        self.rbuf.read_bytes(off, &mut b).map_err(|_| Error::Dma)?;
        Ok(ZoneHeader::decode(&b, zone))
    }

    /// The record at `lba` of a zone with header `h`, reading no block at or past `lim`, if it is
    /// valid: `(seq, blocks, len, copied)`; its payload is copied into `out` when it fits.
    fn record(
        &mut self,
        lba: u64,
        lim: u64,
        h: &ChainZone,
        mut out: Option<&mut [u8]>,
    ) -> Result<Option<Rec>, Error> {
        let bs = self.bs;
        let off = self.window(lba, 1, lim)?;
        let mut hb = [0u8; REC_HEADER];
        self.rbuf.read_bytes(off, &mut hb).map_err(|_| Error::Dma)?;
        let (len, seq, blocks) = (
            le32(&hb, 4) as usize,
            le64(&hb, 8),
            u64::from(le32(&hb, 20)),
        );
        let behind = le32(&hb, 28);
        let valid = le32(&hb, 0) == REC_MAGIC
            && le32(&hb, 16) == h.epoch
            && seq >= h.first_seq
            && seq - h.first_seq < MAX_ZONE_RECORDS
            && blocks <= u64::from(h.max_blocks)
            && blocks <= self.win_blocks
            && blocks == record_blocks(len, bs)
            && lba + blocks <= lim;
        if !valid {
            return Ok(None);
        }
        let off = self.window(lba, blocks, lim)?;
        let fits = out.as_ref().is_some_and(|o| o.len() >= len);
        let mut d = CRC32C.digest();
        d.update(&hb[0..24]);
        d.update(&hb[28..32]);
        let mut chunk = [0u8; 512];
        let mut done = 0usize;
        for k in 0..blocks as usize {
            let boff = off + k * bs;
            let skip = if k == 0 { REC_HEADER } else { CONT_HEADER };
            if k > 0 {
                let mut t = [0u8; CONT_HEADER];
                self.rbuf.read_bytes(boff, &mut t).map_err(|_| Error::Dma)?;
                if le32(&t, 0) != CONT_MAGIC || le32(&t, 4) != seq as u32 {
                    return Ok(None);
                }
            }
            let mut n = (bs - skip).min(len - done);
            let mut p = boff + skip;
            while n > 0 {
                let c = n.min(chunk.len());
                self.rbuf
                    .read_bytes(p, &mut chunk[..c])
                    .map_err(|_| Error::Dma)?;
                d.update(&chunk[..c]);
                if fits {
                    if let Some(o) = out.as_deref_mut() {
                        o[done..done + c].copy_from_slice(&chunk[..c]);
                    }
                }
                done += c;
                p += c;
                n -= c;
            }
        }
        if d.finalize() != le32(&hb, 24) {
            return Ok(None);
        }
        // The acknowledged end this record's framing saw: every record below it was durable
        // before this one was even submitted.
        let claim = match behind {
            u32::MAX => 0,
            b => seq.saturating_sub(u64::from(b)),
        };
        Ok(Some(Rec {
            seq,
            blocks,
            len,
            copied: fits,
            claim,
        }))
    }

    /// The dense run of sequence numbers from the zone's `first_seq` among its valid records,
    /// and the highest acknowledged end any of them saw when it was framed.
    fn scan(&mut self, cz: &ChainZone) -> Result<(u64, u64), Error> {
        let start = self.zone_lba(cz.zone);
        let lim = start + cz.lim;
        let mut seen: BitArray<[u64; WORDS]> = BitArray::ZERO;
        let mut claim = 0u64;
        let mut b = start + 1;
        while b < lim {
            match self.record(b, lim, cz, None)? {
                Some(r) => {
                    seen.set((r.seq - cz.first_seq) as usize, true);
                    claim = claim.max(r.claim);
                    b += r.blocks;
                }
                None => b += 1,
            }
        }
        Ok((seen.leading_ones() as u64, claim))
    }

    // ---------------------------------------------------------------- format, open

    /// Creates an empty log on the range: resets every zone (older contents are gone) and writes
    /// the first zone's header, flushed. A zone that is offline or read-only is
    /// [`Error::ZoneUnusable`].
    pub fn format(q: Q, dma: &dyn DmaAllocator, clock: C, cfg: ZonedConfig) -> Result<Self, Error> {
        let mut w = Self::new(q, dma, clock, cfg)?;
        match w.format_in(cfg) {
            Ok(()) => Ok(w),
            Err(e) => {
                let _ = w.close(dma);
                Err(e)
            }
        }
    }

    fn format_in(&mut self, cfg: ZonedConfig) -> Result<(), Error> {
        let mut ds = [ZoneDescriptor::default(); MAX_ZONES];
        self.report(&mut ds)?;
        let mut fe = 0u32;
        for (i, d) in ds[..cfg.zones as usize].iter().enumerate() {
            let zone = cfg.first_zone + i as u64;
            if matches!(d.state, ZoneState::Offline | ZoneState::ReadOnly) {
                return Err(Error::ZoneUnusable {
                    zone,
                    state: d.state,
                });
            }
            self.caps[i] = d.capacity;
            if d.state != ZoneState::Empty {
                let lim = d.write_pointer.map_or(d.capacity, |p| p - d.start);
                if lim > 0 {
                    if let Some(h) = self.read_header(zone, lim)? {
                        fe = fe.max(h.format_epoch);
                    }
                }
                self.manage(zone, ZoneAction::Reset)?;
            }
            self.free[i] = true;
        }
        self.win = None;
        self.format_epoch = fe.checked_add(1).ok_or(Error::Config)?;
        self.epoch = 1;
        self.flush_device()?;
        self.roll()?;
        self.flush_device()?;
        Ok(())
    }

    /// Recovery: finds the log's records (see the module documentation), makes them durable,
    /// resets the zones that are not part of it, and prepares the next session (epoch + 1,
    /// appending into a fresh zone from the first `append`).
    pub fn open(
        q: Q,
        dma: &dyn DmaAllocator,
        clock: C,
        cfg: ZonedConfig,
    ) -> Result<(Self, Recovered), Error> {
        let mut w = Self::new(q, dma, clock, cfg)?;
        match w.open_in(cfg) {
            Ok(rec) => Ok((w, rec)),
            Err(e) => {
                let _ = w.close(dma);
                Err(e)
            }
        }
    }

    fn open_in(&mut self, cfg: ZonedConfig) -> Result<Recovered, Error> {
        let n = cfg.zones as usize;
        let mut ds = [ZoneDescriptor::default(); MAX_ZONES];
        self.report(&mut ds)?;
        let mut info = [None::<ZoneInfo>; MAX_ZONES];
        let mut fe = None::<u32>;
        for i in 0..n {
            let d = ds[i];
            let zone = cfg.first_zone + i as u64;
            if d.state == ZoneState::Offline {
                return Err(Error::ZoneUnusable {
                    zone,
                    state: d.state,
                });
            }
            self.caps[i] = d.capacity;
            let lim = d.write_pointer.map_or(d.capacity, |p| p - d.start);
            let header = if lim > 0 {
                self.read_header(zone, lim)?
            } else {
                None
            };
            if let Some(h) = header {
                fe = Some(fe.map_or(h.format_epoch, |f: u32| f.max(h.format_epoch)));
            }
            info[i] = Some(ZoneInfo {
                state: d.state,
                lim,
                header,
            });
        }
        let fe = fe.ok_or(Error::NotFormatted)?;
        // The log's zones, by (epoch, first_seq).
        let mut order: Vec<(u32, u64, usize), MAX_ZONES> = Vec::new();
        for (i, zi) in info[..n].iter().enumerate() {
            if let Some(h) = zi.and_then(|z| z.header).filter(|h| h.format_epoch == fe) {
                let _ = order.push((h.epoch, h.first_seq, i));
            }
        }
        order.sort_unstable();
        let mut max_epoch = 0u32;
        let mut taken = [false; MAX_ZONES];
        let first = order.first().map_or(0, |o| o.1);
        let mut end = first;
        // The highest acknowledged end any record of the log's format saw when it was framed.
        let mut claim = 0u64;
        // Zone `i` as a zone of the log, from its header.
        let chain_zone = |i: usize| {
            let (zi, h) = (info[i]?, info[i]?.header?);
            Some(ChainZone {
                zone: cfg.first_zone + i as u64,
                first_seq: h.first_seq,
                epoch: h.epoch,
                window: h.window,
                max_blocks: h.max_blocks,
                lim: zi.lim,
            })
        };
        for &(epoch, fs, i) in order.iter() {
            max_epoch = max_epoch.max(epoch);
            if fs != end {
                continue;
            }
            let Some(cz) = chain_zone(i) else {
                continue;
            };
            if cz.max_blocks > self.win_blocks as u32 {
                // Written with records larger than this configuration can read.
                return Err(Error::Config);
            }
            let (dense, c) = self.scan(&cz)?;
            claim = claim.max(c);
            let _ = self.chain.push(cz);
            taken[i] = true;
            end += dense;
        }
        // Zones of this format not in the chain (torn tails, zones past a break) hold records
        // too: what their framing saw counts as much.
        for &(_, _, i) in order.iter() {
            let win = self.win_blocks as u32;
            let Some(cz) = chain_zone(i).filter(|cz| !taken[i] && cz.max_blocks <= win) else {
                continue;
            };
            claim = claim.max(self.scan(&cz)?.1);
        }
        if claim > end {
            // A record framed after records up to `claim` were acknowledged survived, but the
            // walk ends at `end`: an acknowledged record is corrupt or gone (not a torn tail).
            // Nothing is written: the log stays as found, for inspection.
            self.win = None;
            return Err(Error::Corrupt { seq: end });
        }
        // What was read may sit in the device's volatile cache: durable before anything else.
        self.win = None;
        self.flush_device()?;
        // The log's zones are never appended to again: finished, they hold no open or active
        // zone resource (what they hold reads the same: every block up to the capacity is
        // scanned).
        for i in 0..n {
            let full =
                info[i].is_some_and(|z| matches!(z.state, ZoneState::Full | ZoneState::ReadOnly));
            if taken[i] && !full {
                self.manage(cfg.first_zone + i as u64, ZoneAction::Finish)?;
            }
        }
        let mut discarded = 0;
        for i in 0..n {
            let Some(zi) = info[i] else { continue };
            if taken[i] {
                continue;
            }
            if zi.lim == 0 {
                self.free[i] = zi.state != ZoneState::ReadOnly;
                continue;
            }
            if zi.state == ZoneState::ReadOnly {
                continue; // cannot be reset; never written either
            }
            self.manage(cfg.first_zone + i as u64, ZoneAction::Reset)?;
            self.free[i] = true;
            discarded += 1;
        }
        self.format_epoch = fe;
        self.epoch = max_epoch.checked_add(1).ok_or(Error::Config)?;
        self.first = first;
        self.next_seq = end;
        self.acked = end;
        let rec = Recovered {
            first,
            end,
            epoch: self.epoch,
            zones: self.chain.len(),
            discarded,
        };
        Ok(rec)
    }

    /// Finishes the zone the log moves away from, once its appends completed: full, it holds
    /// no open or active zone resource (a device with few open zones keeps working).
    fn retire(&mut self, ci: usize) -> Result<(), Error> {
        let dl = self.deadline();
        while self.slots.iter().any(|s| s.busy && s.ci == ci) {
            self.pump();
            if self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        }
        self.check()?;
        self.cur = None;
        let zone = self.chain[ci].zone;
        self.manage(zone, ZoneAction::Finish)
            .map_err(|e| self.fail(e))
    }

    /// Starts the next zone of the log: its header appended (and waited for) at the start of an
    /// empty zone of the range.
    fn roll(&mut self) -> Result<(), Error> {
        let need = u64::from(self.max_blocks) + 1;
        let Some(i) = (0..self.cfg.zones as usize).find(|&i| self.free[i] && self.caps[i] >= need)
        else {
            return Err(Error::Full);
        };
        if let Some(ci) = self.cur {
            self.retire(ci)?;
        }
        let zone = self.cfg.first_zone + i as u64;
        let h = ZoneHeader {
            format_epoch: self.format_epoch,
            epoch: self.epoch,
            first_seq: self.next_seq,
            window: self.cfg.in_flight as u32,
            max_blocks: self.max_blocks,
            zone: zone as u32,
        };
        let bs = self.bs;
        self.page.fill(0, bs, 0).map_err(|_| Error::Dma)?;
        self.page
            .write_bytes(0, &h.encode())
            .map_err(|_| Error::Dma)?;
        let buf = BufRef::new(&self.page, 0, bs).map_err(|_| Error::Dma)?;
        let (ns, zslba) = (self.cfg.ns, self.zone_lba(zone));
        self.free[i] = false;
        let lba = self
            .run(|q, t| {
                q.submit_zone(
                    ZoneOp::Append {
                        ns,
                        zone: zslba,
                        blocks: 1,
                        buf,
                    },
                    t,
                )
            })
            .map_err(|e| self.fail(e))?;
        if lba != Some(zslba) {
            return Err(self.fail(Error::BadDevice));
        }
        let cz = ChainZone {
            zone,
            first_seq: self.next_seq,
            epoch: self.epoch,
            window: h.window,
            max_blocks: h.max_blocks,
            lim: 1,
        };
        self.chain.push(cz).map_err(|_| self.fail(Error::Config))?;
        self.cur = Some(self.chain.len() - 1);
        self.cur_used = 1;
        self.cur_records = 0;
        Ok(())
    }

    // ---------------------------------------------------------------- append, sync

    fn check(&self) -> Result<(), Error> {
        self.failed.map_or(Ok(()), Err)
    }

    fn oldest_in_flight(&self) -> Option<u64> {
        self.slots[..self.cfg.in_flight]
            .iter()
            .filter(|s| s.busy)
            .map(|s| s.seq)
            .min()
    }

    /// Appends a record (Zone Append, in flight when this returns); returns its sequence
    /// number. Not acknowledged until [`ZonedWal::sync`] returns.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, Error> {
        self.check()?;
        if payload.len() > self.cfg.max_record {
            return Err(Error::TooLarge);
        }
        let bs = self.bs;
        let blocks = record_blocks(payload.len(), bs);
        let fits = self.cur.is_some_and(|ci| {
            let cap = self.caps[(self.chain[ci].zone - self.cfg.first_zone) as usize];
            self.cur_used + blocks <= cap && self.cur_records < MAX_ZONE_RECORDS
        });
        if !fits {
            self.roll()?;
        }
        let ci = self.cur.ok_or(Error::Config)?;
        // A free slot, and the window: `seq` only once everything below `seq - window + 1`
        // has completed.
        let seq = self.next_seq;
        let window = self.cfg.in_flight as u64;
        let dl = self.deadline();
        let slot = loop {
            self.check()?;
            let in_window = self.oldest_in_flight().is_none_or(|o| seq < o + window);
            let free = self.slots[..self.cfg.in_flight]
                .iter()
                .position(|s| !s.busy);
            if let (true, Some(i)) = (in_window, free) {
                break i;
            }
            self.pump();
            if self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        };
        // Frame the record into the slot's buffer.
        let buf = &self.bufs[slot];
        let mut hb = [0u8; REC_HEADER];
        hb[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        hb[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        hb[8..16].copy_from_slice(&seq.to_le_bytes());
        hb[16..20].copy_from_slice(&self.epoch.to_le_bytes());
        hb[20..24].copy_from_slice(&(blocks as u32).to_le_bytes());
        let behind =
            u32::try_from(seq - self.acked.min(seq)).map_or(u32::MAX, |b| b.min(u32::MAX - 1));
        hb[28..32].copy_from_slice(&behind.to_le_bytes());
        let mut d = CRC32C.digest();
        d.update(&hb[0..24]);
        d.update(&hb[28..32]);
        d.update(payload);
        hb[24..28].copy_from_slice(&d.finalize().to_le_bytes());
        let dma = |r: Result<(), keel_hal::DmaError>| r.map_err(|_| Error::Dma);
        dma(buf.fill(0, blocks as usize * bs, 0))?;
        dma(buf.write_bytes(0, &hb))?;
        let first = payload.len().min(bs - REC_HEADER);
        dma(buf.write_bytes(REC_HEADER, &payload[..first]))?;
        let mut tag = [0u8; CONT_HEADER];
        tag[0..4].copy_from_slice(&CONT_MAGIC.to_le_bytes());
        tag[4..8].copy_from_slice(&(seq as u32).to_le_bytes());
        for (k, part) in payload[first..].chunks(bs - CONT_HEADER).enumerate() {
            let at = (k + 1) * bs;
            dma(buf.write_bytes(at, &tag))?;
            dma(buf.write_bytes(at + CONT_HEADER, part))?;
        }
        let rbuf = BufRef::new(buf, 0, blocks as usize * bs).map_err(|_| Error::Dma)?;
        let op = ZoneOp::Append {
            ns: self.cfg.ns,
            zone: self.zone_lba(self.chain[ci].zone),
            blocks: blocks as u32,
            buf: rbuf,
        };
        loop {
            match self.q.submit_zone(op, slot as u32) {
                Ok(()) => break,
                Err(SubmitError::QueueFull) => self.pump(),
                Err(e) => return Err(self.fail(Error::Submit(e))),
            }
            if self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        }
        self.q.flush_submissions();
        self.slots[slot] = Slot {
            busy: true,
            seq,
            ci,
            blocks: blocks as u32,
        };
        self.cur_used += blocks;
        self.cur_records += 1;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Waits for every append, then Flush: every record appended so far is acknowledged.
    /// Returns the acknowledged end. On `Err` nothing new is acknowledged.
    pub fn sync(&mut self) -> Result<u64, Error> {
        self.check()?;
        let target = self.next_seq;
        let dl = self.deadline();
        while self.oldest_in_flight().is_some() {
            self.pump();
            if self.oldest_in_flight().is_some() && self.clock.now_ns() > dl {
                return Err(self.fail(Error::Timeout));
            }
        }
        self.check()?;
        self.flush_device()?;
        self.acked = target;
        Ok(target)
    }

    /// Polls the device once (completes appends in the background; an application's loop may
    /// call it between appends). Returns appends still in flight.
    pub fn poll(&mut self) -> usize {
        self.pump();
        self.slots.iter().filter(|s| s.busy).count()
    }

    // ---------------------------------------------------------------- reading, reclaiming

    /// The acknowledged end: records `first()..acked()` are durable.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The appended end (acknowledged or not).
    pub fn appended(&self) -> u64 {
        self.next_seq
    }

    /// The first record the log holds (reclaimed zones took the ones below).
    pub fn first(&self) -> u64 {
        self.first
    }

    /// This session's epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The sticky error, if the log has failed.
    pub fn failed(&self) -> Option<Error> {
        self.failed
    }

    /// The log's zones, oldest first: `(zone index, first_seq)`.
    pub fn zones(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chain.iter().map(|c| (c.zone, c.first_seq))
    }

    /// The block size of the namespace.
    pub fn block_size(&self) -> usize {
        self.bs
    }

    /// A cursor at the first record.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            seq: self.first,
            ci: 0,
            floor: self.chain.first().map_or(0, |c| self.zone_lba(c.zone) + 1),
        }
    }

    /// Reads the acknowledged record at `cur` into `buf` and advances `cur`; `Ok(None)` at the
    /// acknowledged end. Returns its sequence number and payload length.
    pub fn next(
        &mut self,
        cur: &mut Cursor,
        buf: &mut [u8],
    ) -> Result<Option<(u64, usize)>, Error> {
        let want = cur.seq;
        if want >= self.acked {
            return Ok(None);
        }
        if want < self.first || cur.ci >= self.chain.len() {
            return Err(Error::BadCursor);
        }
        while cur.ci + 1 < self.chain.len() && self.chain[cur.ci + 1].first_seq <= want {
            cur.ci += 1;
            cur.floor = self.zone_lba(self.chain[cur.ci].zone) + 1;
        }
        let cz = self.chain[cur.ci];
        let start = self.zone_lba(cz.zone);
        let lim = start + cz.lim;
        let corrupt = Error::Corrupt { seq: want };
        let mut b = cur.floor.max(start + 1);
        let mut all_below = true;
        self.win = None;
        while b < lim {
            let Some(Rec {
                seq,
                blocks: n,
                len,
                copied,
                ..
            }) = self.record(b, lim, &cz, Some(&mut *buf))?
            else {
                b += 1;
                continue;
            };
            if seq == want {
                if !copied {
                    return Err(Error::BufferTooSmall { need: len });
                }
                if all_below {
                    cur.floor = b + n;
                }
                cur.seq += 1;
                return Ok(Some((seq, len)));
            }
            if seq > want {
                if seq >= want + u64::from(cz.window) {
                    return Err(corrupt);
                }
                all_below = false;
            }
            b += n;
        }
        Err(corrupt)
    }

    /// Resets the oldest zones of the log whose records all lie below `checkpoint` (at most the
    /// acknowledged end); they become free for new records. Returns how many.
    pub fn reclaim(&mut self, checkpoint: u64) -> Result<usize, Error> {
        self.check()?;
        if checkpoint > self.acked {
            return Err(Error::BadCursor);
        }
        let mut n = 0;
        while self.chain.len() >= 2 && self.chain[1].first_seq <= checkpoint && self.cur != Some(0)
        {
            let zone = self.chain[0].zone;
            self.manage(zone, ZoneAction::Reset)
                .map_err(|e| self.fail(e))?;
            self.chain.remove(0);
            self.cur = self.cur.map(|c| c - 1);
            for s in self.slots.iter_mut().filter(|s| s.busy) {
                s.ci = s.ci.saturating_sub(1);
            }
            self.free[(zone - self.cfg.first_zone) as usize] = true;
            self.first = self.chain[0].first_seq;
            n += 1;
        }
        self.win = None;
        Ok(n)
    }

    /// The queue (statistics).
    pub fn queue(&self) -> &Q {
        &self.q
    }

    /// Gives the queue back and the DMA buffers to `dma`. Appends still in flight are waited
    /// for first (not acknowledged).
    pub fn close(mut self, dma: &dyn DmaAllocator) -> Q {
        let dl = self.deadline();
        while self.q.in_flight() > 0 && self.clock.now_ns() <= dl {
            self.pump();
        }
        for b in self.bufs.drain(..) {
            dma.free(b);
        }
        dma.free(self.page);
        dma.free(self.rbuf);
        self.q
    }
}
