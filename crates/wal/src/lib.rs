//! # keel-wal: a write-ahead log on `keel-writer`
//!
//! ## Layout
//! The log owns `lba_count` blocks from `lba_start` of one namespace:
//! * block `lba_start` is the **superblock**: magic, `format_epoch`, `epoch`, CRC32C over those
//!   (bytes `0..20`), then the **acknowledged end** (`ack magic u64 | seq u64 | offset u64`) and a
//!   CRC32C over bytes `0..44`. A superblock without the second part (the older layout) is read
//!   as recording an acknowledged end of 0;
//! * the rest is a [`keel_writer::Writer`] byte stream of back-to-back **records**:
//!   a 24-byte header (`magic u32 | len u32 | seq u64 | epoch u32 | crc u32`, little endian)
//!   then `len` payload bytes. `crc` is CRC32C (`CRC_32_ISCSI`) over the record's stream offset,
//!   `len`, `seq`, `epoch` and the payload, so a record copied or shifted elsewhere is invalid.
//!
//! ## Protocol
//! * [`Wal::append`] buffers a record (sequence numbers are dense from 0) and returns its
//!   [`Lsn`]. It is **not acknowledged** yet.
//! * [`Wal::sync`] writes everything out, waits for the writes, issues a device Flush and waits
//!   for it, then records the new acknowledged end in the superblock (one block write, not
//!   flushed: it becomes durable with the next Flush); only then are the records acknowledged
//!   ([`Wal::acked`]). The end is written only *after* the Flush completed, so the superblock
//!   never claims a record the device might not hold; a power cut may lose that write, and the
//!   superblock then holds an older (smaller, still true) end.
//! * [`Wal::open`] (recovery) scans from the start and accepts the longest prefix of records
//!   whose header, CRC, sequence (previous + 1) and epoch (`format_epoch <= epoch <=` superblock
//!   epoch, non-decreasing) are valid. Where the scan stops decides what it found:
//!   - at or past the superblock's acknowledged end: a **torn tail** (writes that were never
//!     acknowledged, possibly with holes and valid records behind them); it is discarded;
//!   - before it: an **acknowledged record is corrupt** (media corruption, a lost write). `open`
//!     fails with [`Error::CorruptAcked`] naming the record's [`Lsn`] and writes nothing, so no
//!     append can ever overwrite the acknowledged records behind it.
//!
//!   "Valid records of the same epoch follow the bad one" is *not* used as the test: a power cut
//!   may keep any subset of the unflushed writes, so a hole followed by valid records of the
//!   current epoch is an ordinary torn tail.
//!   Before anything new is written it flushes (the records it found may sit in the device's
//!   volatile cache), then writes the superblock with a bumped epoch and the recovered end as
//!   the acknowledged end, and flushes it, so records left behind a discarded tail by an
//!   earlier session (lower epoch) can never be mistaken for the continuation of a later one.
//!   [`Wal::format`] starts a new `format_epoch` above the old superblock's epoch and above the
//!   epoch of any old record 0, so an older log stays invisible even when its superblock was
//!   destroyed.
//! * [`Wal::next`] iterates acknowledged records from any [`Cursor`] (the start, or an
//!   acknowledged record's [`Lsn`]).
//!
//! ## Guarantees
//! * Every record acknowledged by a completed `sync` is returned by recovery, in order, or
//!   recovery fails with a typed error: it never silently drops an acknowledged record below the
//!   superblock's acknowledged end. That end is the last `sync`'s unless a power cut lost its
//!   superblock write (then it is an earlier sync's): corruption inside the records of that last
//!   sync is then indistinguishable from a torn tail, and is cut like one. With one Flush per
//!   sync this window cannot be closed: a claim written before the Flush could be kept while the
//!   records it names are lost.
//! * Recovery never returns a corrupt record. With a device that drops every write not covered
//!   by a completed Flush on power loss, it returns exactly the acknowledged records. If a power
//!   cut persists *some* unflushed blocks, recovery may also return records appended after the
//!   last `sync` — never past a hole: what it returns is a prefix of the appended records.
//! * Iteration returns only acknowledged records; no allocation, no panics on bad input.
//!
//! ## On a zoned namespace
//! [`zoned::ZonedWal`] is the same log for a zoned namespace (sequential writes only): zone
//! headers instead of a superblock, records placed by Zone Append, recovery from the zones'
//! write pointers. See [`zoned`].
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use crc::{Crc, CRC_32_ISCSI};
use keel_blockdev::BlockQueue;
use keel_hal::{Clock, DmaAllocator};
use keel_writer::{CancelToken, Config, Error as WError, Writer};

pub mod zoned;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);
const SB_MAGIC: u64 = 0x4B45_454C_5741_4C31; // "KEELWAL1"
const REC_MAGIC: u32 = 0x5245_434B; // "KCER"
const ACK_MAGIC: u64 = 0x3143_4157_4C45_454B; // "KEELWAC1"
/// Record header bytes.
pub const HEADER: usize = 24;

/// WAL errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// From the writer (device, cancellation, capacity, configuration).
    Writer(WError),
    /// No valid superblock: run [`Wal::format`].
    NotFormatted,
    /// An acknowledged record failed validation while iterating (media corruption).
    Corrupt {
        /// Stream offset of the record.
        offset: u64,
    },
    /// Recovery found an invalid record below the acknowledged end the superblock recorded at
    /// `sync`: an acknowledged record is corrupt or missing. Nothing was written to the device;
    /// the log cannot be opened for appending (which would overwrite the records behind it).
    CorruptAcked {
        /// The first record that failed validation: its sequence number and stream offset.
        at: Lsn,
        /// The acknowledged end the superblock recorded.
        acked: Lsn,
    },
    /// The caller's buffer is too small for the record's payload.
    BufferTooSmall {
        /// The payload's length.
        need: usize,
    },
    /// Payload larger than `u32::MAX` or than the log.
    TooLarge,
    /// The cursor does not point into the acknowledged log.
    BadCursor,
    /// The log region is too small (needs the superblock and one block of records).
    Config,
}

impl From<WError> for Error {
    fn from(e: WError) -> Self {
        Error::Writer(e)
    }
}

/// Where a record is: its sequence number and stream offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lsn {
    /// Sequence number (dense from 0).
    pub seq: u64,
    /// Stream offset of the record's header.
    pub offset: u64,
}

/// A read position for [`Wal::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    next: Lsn,
    min_epoch: u32,
}

impl Cursor {
    /// The first record of the log.
    pub fn start() -> Self {
        Self {
            next: Lsn { seq: 0, offset: 0 },
            min_epoch: 0,
        }
    }
    /// The record at `lsn` (as returned by [`Wal::append`] or [`Wal::next`]).
    pub fn at(lsn: Lsn) -> Self {
        Self {
            next: lsn,
            min_epoch: 0,
        }
    }
    /// The record [`Wal::next`] reads next.
    pub fn position(&self) -> Lsn {
        self.next
    }
}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Valid records (sequence numbers `0..records`).
    pub records: u64,
    /// Stream offset of the end of the last valid record.
    pub end: u64,
    /// Epoch of this session.
    pub epoch: u32,
    /// The acknowledged end the superblock had recorded; the scan found every record below it.
    pub committed: Lsn,
}

/// The superblock's contents.
#[derive(Debug, Clone, Copy)]
struct Super {
    format_epoch: u32,
    epoch: u32,
    acked: Lsn,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    len: u32,
    seq: u64,
    epoch: u32,
    crc: u32,
}

fn parse_header(b: &[u8; HEADER]) -> Option<Header> {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    if u32_at(0) != REC_MAGIC {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[8..16]);
    Some(Header {
        len: u32_at(4),
        seq: u64::from_le_bytes(s),
        epoch: u32_at(16),
        crc: u32_at(20),
    })
}

fn crc_start(offset: u64, h: &Header) -> crc::Digest<'static, u32> {
    let mut d = CRC32C.digest();
    d.update(&offset.to_le_bytes());
    d.update(&h.len.to_le_bytes());
    d.update(&h.seq.to_le_bytes());
    d.update(&h.epoch.to_le_bytes());
    d
}

/// The log. See the crate documentation.
pub struct Wal<Q: BlockQueue, C: Clock, K: CancelToken> {
    w: Writer<Q, C, K>,
    sb_lba: u64,
    format_epoch: u32,
    epoch: u32,
    next: Lsn,
    acked: Lsn,
    /// The acknowledged end last written to the superblock.
    sb_acked: Lsn,
}

impl<Q: BlockQueue, C: Clock, K: CancelToken> Wal<Q, C, K> {
    fn make_writer(
        q: Q,
        dma: &dyn DmaAllocator,
        clock: C,
        cancel: K,
        cfg: Config,
    ) -> Result<Writer<Q, C, K>, Error> {
        if cfg.lba_count < 2 {
            return Err(Error::Config);
        }
        let wcfg = Config {
            lba_start: cfg.lba_start.checked_add(1).ok_or(Error::Config)?,
            lba_count: cfg.lba_count - 1,
            ..cfg
        };
        Ok(Writer::new(q, dma, clock, cancel, wcfg)?)
    }

    fn read_sb(w: &mut Writer<Q, C, K>, lba: u64) -> Result<Option<Super>, Error> {
        let mut b = [0u8; 4096];
        let bs = w.block_size().min(b.len());
        w.raw_read(lba, &mut b[..bs])?;
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut m = [0u8; 8];
            m.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(m)
        };
        let (fe, e) = (u32_at(8), u32_at(12));
        if u64_at(0) != SB_MAGIC || CRC32C.checksum(&b[0..16]) != u32_at(16) || fe > e {
            return Ok(None);
        }
        let mut acked = Lsn { seq: 0, offset: 0 };
        if u64_at(20) == ACK_MAGIC {
            if CRC32C.checksum(&b[0..44]) != u32_at(44) {
                return Ok(None);
            }
            acked = Lsn {
                seq: u64_at(28),
                offset: u64_at(36),
            };
        }
        Ok(Some(Super {
            format_epoch: fe,
            epoch: e,
            acked,
        }))
    }

    /// Writes the superblock (not flushed).
    fn put_sb(w: &mut Writer<Q, C, K>, lba: u64, sb: Super) -> Result<(), Error> {
        let mut b = [0u8; 4096];
        let bs = w.block_size().min(b.len());
        b[0..8].copy_from_slice(&SB_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&sb.format_epoch.to_le_bytes());
        b[12..16].copy_from_slice(&sb.epoch.to_le_bytes());
        let crc = CRC32C.checksum(&b[0..16]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b[20..28].copy_from_slice(&ACK_MAGIC.to_le_bytes());
        b[28..36].copy_from_slice(&sb.acked.seq.to_le_bytes());
        b[36..44].copy_from_slice(&sb.acked.offset.to_le_bytes());
        let crc = CRC32C.checksum(&b[0..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        w.raw_write(lba, &b[..bs])?;
        Ok(())
    }

    /// Writes the superblock and flushes it.
    fn write_sb(w: &mut Writer<Q, C, K>, lba: u64, sb: Super) -> Result<(), Error> {
        Self::put_sb(w, lba, sb)?;
        w.device_flush()?;
        Ok(())
    }

    /// Creates an empty log on `cfg.lba_start .. + cfg.lba_count` (the first block is the
    /// superblock; the rest of `cfg` tunes the writer). Older contents become invisible.
    pub fn format(
        q: Q,
        dma: &dyn DmaAllocator,
        clock: C,
        cancel: K,
        cfg: Config,
    ) -> Result<Self, Error> {
        let mut w = Self::make_writer(q, dma, clock, cancel, cfg)?;
        let old = Self::read_sb(&mut w, cfg.lba_start)?.map_or(0, |sb| sb.epoch);
        // A recovery scan can only start with a record 0 at offset 0. If an older log's record 0
        // is still there (even with its superblock destroyed), the new format epoch must exceed
        // its epoch so that the scan rejects it, and with it everything behind it.
        let mut hb = [0u8; HEADER];
        w.read_device_at(0, &mut hb)?;
        let first = parse_header(&hb).map_or(0, |h| h.epoch);
        let epoch = old.max(first).checked_add(1).ok_or(Error::Config)?;
        let zero = Lsn { seq: 0, offset: 0 };
        let sb = Super {
            format_epoch: epoch,
            epoch,
            acked: zero,
        };
        Self::write_sb(&mut w, cfg.lba_start, sb)?;
        Ok(Self {
            w,
            sb_lba: cfg.lba_start,
            format_epoch: epoch,
            epoch,
            next: zero,
            acked: zero,
            sb_acked: zero,
        })
    }

    /// Recovery: scans the log, keeps the valid prefix, starts a new epoch and resumes
    /// appending after the last valid record.
    ///
    /// Fails with [`Error::CorruptAcked`] (and writes nothing) when the valid prefix ends before
    /// the acknowledged end the superblock recorded: see the crate documentation.
    pub fn open(
        q: Q,
        dma: &dyn DmaAllocator,
        clock: C,
        cancel: K,
        cfg: Config,
    ) -> Result<(Self, Recovered), Error> {
        let mut w = Self::make_writer(q, dma, clock, cancel, cfg)?;
        let sb = Self::read_sb(&mut w, cfg.lba_start)?.ok_or(Error::NotFormatted)?;
        let (fe, e) = (sb.format_epoch, sb.epoch);
        let cap = w.capacity();
        if sb.acked.offset > cap {
            // Formatted with a larger region than `cfg` gives.
            return Err(Error::Config);
        }
        let mut pos = Lsn { seq: 0, offset: 0 };
        let mut prev_epoch = fe;
        while let Some((h, next)) = Self::scan_one(&mut w, pos, prev_epoch, e, cap)? {
            prev_epoch = h.epoch;
            pos = next;
        }
        if pos.seq < sb.acked.seq || pos.offset < sb.acked.offset {
            // Not a torn tail: the record at `pos` was acknowledged. Nothing has been written.
            return Err(Error::CorruptAcked {
                at: pos,
                acked: sb.acked,
            });
        }
        let epoch = e.checked_add(1).ok_or(Error::Config)?;
        // The recovered records become the acknowledged end. They may have been read from the
        // device's volatile cache (after a reboot without power loss): make them durable
        // before the superblock claims them, or a power cut between the superblock write and
        // its Flush could keep the claim and lose the records.
        w.device_flush()?;
        let nsb = Super {
            format_epoch: fe,
            epoch,
            acked: pos,
        };
        Self::write_sb(&mut w, cfg.lba_start, nsb)?;
        w.resume(pos.offset)?;
        let rec = Recovered {
            records: pos.seq,
            end: pos.offset,
            epoch,
            committed: sb.acked,
        };
        Ok((
            Self {
                w,
                sb_lba: cfg.lba_start,
                format_epoch: fe,
                epoch,
                next: pos,
                acked: pos,
                sb_acked: pos,
            },
            rec,
        ))
    }

    /// Validates the record at `pos` on the device; `None` if it is not a valid continuation.
    fn scan_one(
        w: &mut Writer<Q, C, K>,
        pos: Lsn,
        min_epoch: u32,
        max_epoch: u32,
        cap: u64,
    ) -> Result<Option<(Header, Lsn)>, Error> {
        if pos.offset + HEADER as u64 > cap {
            return Ok(None);
        }
        let mut hb = [0u8; HEADER];
        w.read_device_at(pos.offset, &mut hb)?;
        let Some(h) = parse_header(&hb) else {
            return Ok(None);
        };
        let end = pos.offset + HEADER as u64 + u64::from(h.len);
        if h.seq != pos.seq || h.epoch < min_epoch || h.epoch > max_epoch || end > cap {
            return Ok(None);
        }
        let mut d = crc_start(pos.offset, &h);
        let mut chunk = [0u8; 512];
        let mut o = pos.offset + HEADER as u64;
        while o < end {
            let n = ((end - o) as usize).min(chunk.len());
            w.read_device_at(o, &mut chunk[..n])?;
            d.update(&chunk[..n]);
            o += n as u64;
        }
        if d.finalize() != h.crc {
            return Ok(None);
        }
        Ok(Some((
            h,
            Lsn {
                seq: pos.seq + 1,
                offset: end,
            },
        )))
    }

    /// Appends a record; returns where it is. Not acknowledged until [`Wal::sync`] returns.
    pub fn append(&mut self, payload: &[u8]) -> Result<Lsn, Error> {
        let len = u32::try_from(payload.len()).map_err(|_| Error::TooLarge)?;
        let total = HEADER as u64 + u64::from(len);
        if self.next.offset.saturating_add(total) > self.w.capacity() {
            return Err(Error::Writer(WError::Full));
        }
        let h = Header {
            len,
            seq: self.next.seq,
            epoch: self.epoch,
            crc: 0,
        };
        let mut d = crc_start(self.next.offset, &h);
        d.update(payload);
        let mut hb = [0u8; HEADER];
        hb[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        hb[4..8].copy_from_slice(&len.to_le_bytes());
        hb[8..16].copy_from_slice(&h.seq.to_le_bytes());
        hb[16..20].copy_from_slice(&h.epoch.to_le_bytes());
        hb[20..24].copy_from_slice(&d.finalize().to_le_bytes());
        // A failed append leaves a partial record in the writer, which is then read-only (errors
        // are sticky), so a half record can never be followed by another one.
        self.w.append(&hb)?;
        self.w.append(payload)?;
        let lsn = self.next;
        self.next = Lsn {
            seq: lsn.seq + 1,
            offset: lsn.offset + total,
        };
        Ok(lsn)
    }

    /// Makes every appended record durable and acknowledges it. Returns the acknowledged end.
    ///
    /// After the device Flush completed, the new acknowledged end is written to the superblock
    /// (see the crate documentation). On `Err` nothing new is acknowledged ([`Wal::acked`] is
    /// unchanged), even if the records did become durable.
    pub fn sync(&mut self) -> Result<Lsn, Error> {
        let target = self.next;
        let durable = self.w.sync()?;
        if durable < target.offset {
            return Ok(self.acked);
        }
        if target != self.sb_acked {
            let sb = Super {
                format_epoch: self.format_epoch,
                epoch: self.epoch,
                acked: target,
            };
            Self::put_sb(&mut self.w, self.sb_lba, sb)?;
            self.sb_acked = target;
        }
        self.acked = target;
        Ok(self.acked)
    }

    /// The acknowledged end: records `0..acked().seq` are durable.
    pub fn acked(&self) -> Lsn {
        self.acked
    }

    /// The appended end (acknowledged or not).
    pub fn appended(&self) -> Lsn {
        self.next
    }

    /// This session's epoch (stamped on every record it appends).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The superblock's block.
    pub fn superblock_lba(&self) -> u64 {
        self.sb_lba
    }

    /// The underlying writer (statistics, watermarks).
    pub fn writer(&self) -> &Writer<Q, C, K> {
        &self.w
    }

    /// Reads the acknowledged record at `cur` into `buf` and advances `cur`; `Ok(None)` at the
    /// acknowledged end. Returns the record's position and payload length.
    pub fn next(
        &mut self,
        cur: &mut Cursor,
        buf: &mut [u8],
    ) -> Result<Option<(Lsn, usize)>, Error> {
        let pos = cur.next;
        if pos.offset == self.acked.offset && pos.seq == self.acked.seq {
            return Ok(None);
        }
        if pos.offset > self.acked.offset || pos.seq >= self.acked.seq {
            return Err(Error::BadCursor);
        }
        let mut hb = [0u8; HEADER];
        self.w
            .read_at(pos.offset, &mut hb)
            .map_err(|_| Error::BadCursor)?;
        let corrupt = Error::Corrupt { offset: pos.offset };
        let h = parse_header(&hb).ok_or(corrupt)?;
        if h.seq != pos.seq
            || h.epoch < cur.min_epoch.max(self.format_epoch)
            || h.epoch > self.epoch
        {
            return Err(corrupt);
        }
        let len = h.len as usize;
        let end = pos.offset + (HEADER + len) as u64;
        if end > self.acked.offset {
            return Err(corrupt);
        }
        if buf.len() < len {
            return Err(Error::BufferTooSmall { need: len });
        }
        self.w
            .read_at(pos.offset + HEADER as u64, &mut buf[..len])?;
        let mut d = crc_start(pos.offset, &h);
        d.update(&buf[..len]);
        if d.finalize() != h.crc {
            return Err(corrupt);
        }
        cur.next = Lsn {
            seq: pos.seq + 1,
            offset: end,
        };
        cur.min_epoch = h.epoch;
        Ok(Some((pos, len)))
    }
}
