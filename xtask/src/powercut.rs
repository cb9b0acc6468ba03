//! Power-cut replay. QEMU's `blklogwrites` block driver records every write, write-zeroes,
//! discard and flush the emulated NVMe device issues to its disk, in the dm-log-writes format:
//! a superblock in log sector 0 (magic, version, entry count as of the last flush, sector size),
//! then for each request a header sector (`sector`, `nr_sectors`, `flags`, `data_len`) followed
//! by its data sectors (none for flushes and discards; Write Zeroes is logged with zero data).
//! QEMU logs a request after the request itself completed on the file below (and before the
//! guest sees it complete), so the log's order is the order in which the device finished
//! them, and a flush's entry follows every write the guest saw complete before issuing it.
//!
//! The model of a power cut: a device with a volatile write cache keeps everything before the
//! last completed flush, and of the writes after it (the *gap*) any subset, each sector on its
//! own: a multi-sector write may be torn at any sector boundary (the log's sector is the
//! namespace's block: one block is atomic). [`crash_states`] picks, per gap: nothing kept, every
//! in-order prefix, seeded random subsets, and every multi-sector write torn at every boundary
//! (the sectors before it, and the sectors from it on). Identical disk images are counted once.
//!
//! [`Oracle`] says what recovery must return for a state without asking the WAL: records are
//! rebuilt from the `log` job's payload function and the documented record layout, and the
//! exact answer is the longest prefix of records whose bytes are all intact on the image, with
//! the superblock's claim and the next epoch. It also says what the application can have been
//! told: the `log: acked N` lines must be exactly the job's sync schedule, an acknowledgement
//! follows the sync's superblock write, so a state whose cut may have come after that write
//! must hold those records; and where only flushed writes survived, the intact records must be
//! exactly those the completed syncs acknowledged.
//!
//! [`replay_suite`] runs it: several `log` configurations (512 B and 4 KiB blocks, buffer
//! sizes, in-flight depth, fixed and varied sync cadence) under blklogwrites, their distinct
//! crash states packed side by side into disks and recovered (`recover images=N`) under
//! blklogwrites again, which records recovery's own writes; each state is then rebuilt with
//! them (a cut during or right after recovery) and recovered a second time. Guest crashes
//! (the device keeps its cache) at two sync points of each run are recovered under
//! blklogwrites and cut again ([`crash_then_recover`]). [`kill_suite`] kills QEMU in the middle
//! of a long run instead (see there for what that models).
//!
//! Limits: the log's order is QEMU's completion order; a torn write keeps a prefix or a suffix
//! of its sectors (not any subset); the subsets are a seeded sample, not all of them; the
//! oracle rebuilds only the `log` job's records.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::qemu::{self, Outcome, VmOpts};

const MAGIC: u64 = 0x006a_7366_7773_6872;
const FLUSH: u64 = 1 << 0;
const FUA: u64 = 1 << 1;
const DISCARD: u64 = 1 << 2;
const MARK: u64 = 1 << 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Bytes written at `offset` (FUA or not: both are durable once a later flush completes;
    /// FUA ones are durable at once).
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// A discard (NVMe Deallocate). Contents afterwards are unspecified; QEMU's default
    /// `discard=ignore` keeps them, so replay does too.
    Discard { offset: u64, len: u64 },
    /// Everything before this is durable.
    Flush,
}

#[derive(Debug)]
pub struct Log {
    pub sector_size: u64,
    /// Entries counted by the superblock (as of the last flush).
    pub flushed_entries: u64,
    pub entries: Vec<Entry>,
}

fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    let s = b.get(off..off + 8).context("log truncated")?;
    Ok(u64::from_le_bytes(s.try_into().context("8 bytes")?))
}

/// Parses a blklogwrites log. Entries past the superblock's count (written after the last
/// flush) are included while they look valid: a power cut may or may not have kept them.
pub fn parse(log: &[u8]) -> Result<Log> {
    ensure!(log.len() >= 28, "log shorter than its superblock");
    ensure!(
        u64_at(log, 0)? == MAGIC,
        "not a dm-log-writes log (bad magic)"
    );
    ensure!(
        u64_at(log, 8)? == 1,
        "unsupported log version {}",
        u64_at(log, 8)?
    );
    let flushed_entries = u64_at(log, 16)?;
    let sector_size = u32::from_le_bytes(log[24..28].try_into()?) as u64;
    ensure!(
        sector_size.is_power_of_two() && (512..=65536).contains(&sector_size),
        "bad log sector size {sector_size}"
    );
    let ss = sector_size as usize;
    let mut entries = Vec::new();
    let mut at = ss;
    while at + 32 <= log.len() {
        let (sector, nr, flags) = (
            u64_at(log, at)?,
            u64_at(log, at + 8)?,
            u64_at(log, at + 16)?,
        );
        if flags & !(FLUSH | FUA | DISCARD | MARK) != 0 || (flags == 0 && nr == 0) {
            break; // past the last entry (zero-filled or garbage tail)
        }
        at += ss;
        let offset = sector * sector_size;
        let len = nr * sector_size;
        if flags & FLUSH != 0 {
            entries.push(Entry::Flush);
        } else if flags & DISCARD != 0 {
            entries.push(Entry::Discard { offset, len });
        } else if flags & MARK != 0 {
            // marks carry a label, not disk data
            at += (len as usize).div_ceil(ss) * ss;
        } else {
            let end = at
                .checked_add(len as usize)
                .context("entry length overflows")?;
            // A torn tail of the log itself (QEMU killed while writing it) ends the log.
            let Some(data) = log.get(at..end) else { break };
            // Write Zeroes is logged as a write of zero data: replaying it as a write is exact.
            entries.push(Entry::Write {
                offset,
                data: data.to_vec(),
                fua: flags & FUA != 0,
            });
            at = end;
        }
        if (entries.len() as u64) > flushed_entries + 1_000_000 {
            bail!("log has implausibly many entries");
        }
    }
    Ok(Log {
        sector_size,
        flushed_entries,
        entries,
    })
}

/// The entries of the log file at `path`. A boot that wrote and flushed nothing leaves it empty
/// (without a superblock either).
pub fn read_log(path: &Path) -> Result<Vec<Entry>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    Ok(parse(&bytes)?.entries)
}

/// The disk after applying `entries` to `base`.
pub fn replay(base: &[u8], entries: &[Entry]) -> Vec<u8> {
    let mut img = base.to_vec();
    for e in entries {
        if let Entry::Write { offset, data, .. } = e {
            put(&mut img, *offset, data, true);
        }
    }
    img
}

/// Copies `bytes` to `img` at `offset`; past its end the image grows (`grow`) or the bytes are
/// dropped (a fixed region).
fn put(img: &mut Vec<u8>, offset: u64, bytes: &[u8], grow: bool) {
    let o = offset as usize;
    let end = o + bytes.len();
    if img.len() < end && grow {
        img.resize(end, 0);
    }
    if o >= img.len() {
        return;
    }
    let end = end.min(img.len());
    img[o..end].copy_from_slice(&bytes[..end - o]);
}

// ---------------------------------------------------------------------------------------------
// Crash states

/// The part of one logged write a crash state keeps: its sectors `first..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub entry: usize,
    pub first: u64,
    pub end: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every unflushed write lost (what a device that honours only flushes leaves).
    Dropped,
    /// The first n unflushed writes kept, whole (a cache written back in order).
    Prefix,
    /// A seeded random subset of the unflushed writes, each whole.
    Subset,
    /// One multi-sector write torn at a sector boundary, the writes before it kept.
    Torn,
}

/// One state a power cut can leave the disk in.
#[derive(Clone, Debug)]
pub struct CrashState {
    pub label: String,
    pub kind: Kind,
    /// Flushes completed before the cut.
    pub flushes: usize,
    /// Entries `0..durable` are on the media (everything up to the last completed flush).
    pub durable: usize,
    /// The latest the cut can have come: every entry before it was issued (the next flush's
    /// index, or the log's end). What the application may have been told depends on it.
    pub cut: usize,
    /// Unflushed pieces that survived, in log order.
    pub kept: Vec<Piece>,
}

/// How many states [`crash_states`] picks.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Random subsets per gap (distinct ones; fewer when the gap has fewer).
    pub subsets: usize,
    pub seed: u64,
    /// Only gaps after this many flushes.
    pub from_flush: usize,
    /// At most this many prefix and torn states per gap (a seeded sample of them when the gap
    /// has more); 0: all of them.
    pub max_per_gap: usize,
}

fn sectors_of(e: &Entry, ss: u64) -> u64 {
    match e {
        Entry::Write { data, .. } => data.len() as u64 / ss,
        _ => 0,
    }
}

/// The crash states of `entries` (see the module documentation), gap by gap in log order.
pub fn crash_states(entries: &[Entry], ss: u64, plan: &Plan) -> Vec<CrashState> {
    let mut rng = plan.seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let whole = |i: usize| Piece {
        entry: i,
        first: 0,
        end: sectors_of(&entries[i], ss),
    };
    let mut out = Vec::new();
    let (mut start, mut flushes) = (0usize, 0usize);
    loop {
        let end = entries[start..]
            .iter()
            .position(|e| *e == Entry::Flush)
            .map_or(entries.len(), |p| start + p);
        if flushes >= plan.from_flush {
            let writes: Vec<usize> = (start..end)
                .filter(|&i| matches!(entries[i], Entry::Write { .. }))
                .collect();
            // FUA writes are durable on completion: every state keeps them.
            let fua: Vec<usize> = writes
                .iter()
                .copied()
                .filter(|&i| matches!(entries[i], Entry::Write { fua: true, .. }))
                .collect();
            let u: Vec<usize> = writes
                .iter()
                .copied()
                .filter(|i| !fua.contains(i))
                .collect();
            let state = |kind, label: String, mut kept: Vec<Piece>| {
                kept.extend(fua.iter().map(|&i| whole(i)));
                kept.sort_by_key(|p| p.entry);
                CrashState {
                    label: format!("after flush {flushes}: {label}"),
                    kind,
                    flushes,
                    durable: start,
                    cut: end,
                    kept,
                }
            };
            out.push(state(Kind::Dropped, "unflushed dropped".into(), vec![]));
            let mut ordered = Vec::new();
            for p in 1..=u.len() {
                let kept = u[..p].iter().map(|&i| whole(i)).collect();
                ordered.push(state(
                    Kind::Prefix,
                    format!("first {p}/{} unflushed kept", u.len()),
                    kept,
                ));
            }
            // Subsets: distinct, and not the empty set or a prefix (listed already).
            let mut seen: HashSet<Vec<usize>> = HashSet::new();
            for p in 0..=u.len() {
                seen.insert(u[..p].to_vec());
            }
            let mut made = 0;
            for _ in 0..plan.subsets * 4 {
                if made == plan.subsets {
                    break;
                }
                let pick: Vec<usize> = u.iter().copied().filter(|_| next() & 1 == 1).collect();
                if !seen.insert(pick.clone()) {
                    continue;
                }
                made += 1;
                let label = format!("{} of {} unflushed kept (random)", pick.len(), u.len());
                out.push(state(
                    Kind::Subset,
                    label,
                    pick.iter().map(|&i| whole(i)).collect(),
                ));
            }
            for (k, &w) in u.iter().enumerate() {
                let n = sectors_of(&entries[w], ss);
                for j in 1..n {
                    let before: Vec<Piece> = u[..k].iter().map(|&i| whole(i)).collect();
                    let mut head = before.clone();
                    head.push(Piece {
                        entry: w,
                        first: 0,
                        end: j,
                    });
                    ordered.push(state(
                        Kind::Torn,
                        format!(
                            "write {}/{} torn: sectors 0..{j} of {n} kept",
                            k + 1,
                            u.len()
                        ),
                        head,
                    ));
                    let mut tail = before;
                    tail.push(Piece {
                        entry: w,
                        first: j,
                        end: n,
                    });
                    ordered.push(state(
                        Kind::Torn,
                        format!(
                            "write {}/{} torn: sectors {j}..{n} of {n} kept",
                            k + 1,
                            u.len()
                        ),
                        tail,
                    ));
                }
            }
            if plan.max_per_gap > 0 && ordered.len() > plan.max_per_gap {
                // A seeded sample, in order (a partial Fisher-Yates over the indices).
                let mut idx: Vec<usize> = (0..ordered.len()).collect();
                for i in 0..plan.max_per_gap {
                    let j = i + (next() as usize) % (idx.len() - i);
                    idx.swap(i, j);
                }
                let mut pick = idx[..plan.max_per_gap].to_vec();
                pick.sort_unstable();
                let mut all: Vec<Option<CrashState>> = ordered.into_iter().map(Some).collect();
                ordered = pick.into_iter().filter_map(|i| all[i].take()).collect();
            }
            out.extend(ordered);
        }
        if end == entries.len() {
            break;
        }
        flushes += 1;
        start = end + 1;
    }
    out
}

/// Builds crash-state images gap by gap: the durable part is applied once and extended as the
/// states' `durable` grows (states must come in that order, as [`crash_states`] gives them).
pub struct Builder<'a> {
    entries: &'a [Entry],
    ss: u64,
    base: Vec<u8>,
    durable: Vec<u8>,
    upto: usize,
}

impl<'a> Builder<'a> {
    /// Images are `base.len()` bytes; writes past it are dropped.
    pub fn new(entries: &'a [Entry], ss: u64, base: Vec<u8>) -> Self {
        Self {
            entries,
            ss,
            durable: base.clone(),
            base,
            upto: 0,
        }
    }

    pub fn build(&mut self, s: &CrashState) -> Vec<u8> {
        if s.durable < self.upto {
            // Out of order: start over.
            self.durable.clone_from(&self.base);
            self.upto = 0;
        }
        for e in &self.entries[self.upto..s.durable] {
            if let Entry::Write { offset, data, .. } = e {
                put(&mut self.durable, *offset, data, false);
            }
        }
        self.upto = s.durable;
        let mut img = self.durable.clone();
        for p in &s.kept {
            if let Entry::Write { offset, data, .. } = &self.entries[p.entry] {
                let (a, b) = ((p.first * self.ss) as usize, (p.end * self.ss) as usize);
                put(&mut img, offset + a as u64, &data[a..b], false);
            }
        }
        img
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle

const REC_MAGIC: u32 = 0x5245_434B;
const REC_HEADER: usize = 24;
const SB_MAGIC: u64 = 0x4B45_454C_5741_4C31;
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The `log` job's records as the WAL documents their layout: a 24-byte header (`magic u32 |
/// len u32 | seq u64 | epoch u32 | crc u32`) then the payload, back to back in a stream that
/// starts at the block after the superblock; `crc` is CRC32C over the record's stream offset,
/// `len`, `seq`, `epoch` and the payload. Returns each record's byte offset on the disk (the log
/// at block 0) and its bytes, for as many records as end within `limit` bytes.
pub fn records(count: u64, epoch: u32, bs: u64, limit: usize) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0u64;
    let mut buf = [0u8; keel_jobs::wal::MAX_PAYLOAD];
    for seq in 0..count {
        let n = keel_jobs::wal::payload(seq, &mut buf);
        let at = (bs + off) as usize;
        if at + REC_HEADER + n > limit {
            break;
        }
        let mut d = CRC32C.digest();
        d.update(&off.to_le_bytes());
        d.update(&(n as u32).to_le_bytes());
        d.update(&seq.to_le_bytes());
        d.update(&epoch.to_le_bytes());
        d.update(&buf[..n]);
        let mut r = Vec::with_capacity(REC_HEADER + n);
        r.extend_from_slice(&REC_MAGIC.to_le_bytes());
        r.extend_from_slice(&(n as u32).to_le_bytes());
        r.extend_from_slice(&seq.to_le_bytes());
        r.extend_from_slice(&epoch.to_le_bytes());
        r.extend_from_slice(&d.finalize().to_le_bytes());
        r.extend_from_slice(&buf[..n]);
        out.push((at, r));
        off += (REC_HEADER + n) as u64;
    }
    out
}

/// Records acknowledged by each of the `log` job's syncs, in order (the numbers its `log: acked
/// N records` lines print).
pub fn ack_schedule(records: u64, sync_every: u64, varied: bool) -> Vec<u64> {
    (0..records)
        .filter(|&s| keel_jobs::wal::syncs_after(s, records, sync_every, varied))
        .map(|s| s + 1)
        .collect()
}

/// A superblock write in the log.
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    /// Its entry.
    pub entry: usize,
    /// The acknowledged end it records (records).
    pub records: u64,
    /// The epoch it carries.
    pub epoch: u32,
}

/// What recovery must do with a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// No superblock: report no log.
    NoLog,
    /// Open the log with exactly these records, report the superblock's claim, start this epoch.
    Opened {
        records: u64,
        claimed: u64,
        epoch: u32,
    },
    /// The superblock claims more than the device holds: `CorruptAcked`, nothing written.
    Refused,
}

/// What recovery must return for a crash state of one run (see the module documentation).
#[derive(Clone)]
pub struct Oracle {
    pub bs: u64,
    pub records: Vec<(usize, Vec<u8>)>,
    /// Superblock writes in log order; the first is the format's.
    pub claims: Vec<Claim>,
    /// Entry index from which the application may hold an acknowledgement of `n` records.
    pub acks: Vec<(usize, u64)>,
    /// Records durable once flush `k` (from 1) completed, where the run says so (a sync's).
    pub flush_durable: Vec<Option<u64>>,
}

/// How a state checked against the oracle.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub want: Want,
    /// Records the application may have been told are acknowledged at the latest cut.
    pub acked: u64,
    /// Records intact on the image (the longest prefix).
    pub intact: u64,
    /// `Some(problem)`: the state loses what it must not (an acknowledged or claimed record).
    pub lost: Option<&'static str>,
    /// `Some(problem)`: only flushed writes survived, and the intact records are not exactly
    /// what the completed syncs acknowledged.
    pub inexact: Option<String>,
}

impl Oracle {
    /// The oracle of one complete or killed `log` run (the log at block 0 of a fresh disk):
    /// block 0 writes are superblocks (the format's, then one per sync, each claiming what
    /// that sync acknowledges and written after its flush); every flush after the format's is
    /// one sync's.
    pub fn for_log_run(
        entries: &[Entry],
        bs: u64,
        epoch: u32,
        acks: &[u64],
        records: Vec<(usize, Vec<u8>)>,
    ) -> Result<Self> {
        let mut claims = Vec::new();
        let mut ack_at = Vec::new();
        let mut flush_durable = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e {
                Entry::Write { offset, data, .. } if *offset < bs => {
                    ensure!(
                        *offset == 0 && data.len() as u64 == bs,
                        "entry {i}: a write into the superblock that is not the whole block"
                    );
                    let n = claims.len();
                    let claim = match n {
                        0 => 0,
                        _ => *acks.get(n - 1).with_context(|| {
                            format!("superblock write {n} but only {} syncs", acks.len())
                        })?,
                    };
                    if n > 0 {
                        ack_at.push((i, claim));
                    }
                    claims.push(Claim {
                        entry: i,
                        records: claim,
                        epoch,
                    });
                }
                Entry::Flush => {
                    let k = flush_durable.len();
                    flush_durable.push(match k {
                        0 => Some(0),
                        _ => acks.get(k - 1).copied(),
                    });
                }
                _ => {}
            }
        }
        ensure!(
            !claims.is_empty(),
            "the format's superblock write is not in the log"
        );
        Ok(Self {
            bs,
            records,
            claims,
            acks: ack_at,
            flush_durable,
        })
    }

    /// Records whose bytes are all intact on `img`, counted from the first (a prefix).
    pub fn intact(&self, img: &[u8]) -> u64 {
        self.records
            .iter()
            .take_while(|(at, r)| img.get(*at..at + r.len()) == Some(&r[..]))
            .count() as u64
    }

    /// The superblock write that is on the image of `s` (the last one applied), if any.
    pub fn superblock(&self, s: &CrashState) -> Option<Claim> {
        let kept = s
            .kept
            .iter()
            .rev()
            .find_map(|p| self.claims.iter().find(|c| c.entry == p.entry));
        kept.or_else(|| self.claims.iter().rev().find(|c| c.entry < s.durable))
            .copied()
    }

    /// Records the application may hold acknowledged when every entry before `cut` was issued.
    pub fn acked(&self, cut: usize) -> u64 {
        self.acks
            .iter()
            .filter(|(i, _)| *i < cut)
            .map(|a| a.1)
            .max()
            .unwrap_or(0)
    }

    /// What recovery must do with state `s`, whose image is `img`.
    pub fn judge(&self, s: &CrashState, img: &[u8]) -> Result<Verdict> {
        let intact = self.intact(img);
        let acked = self.acked(s.cut);
        let sb = self.superblock(s);
        if let Some(c) = sb {
            // The image's block 0 must be the superblock this says (a check of the oracle).
            let b = &img[..self.bs as usize];
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let epoch = u32::from_le_bytes(b[12..16].try_into().unwrap_or([0; 4]));
            ensure!(
                u64_at(0) == SB_MAGIC && epoch == c.epoch && u64_at(28) == c.records,
                "{}: block 0 is not the superblock write the log says (claim {}, epoch {})",
                s.label,
                c.records,
                c.epoch
            );
        }
        let mut lost = None;
        let want = match sb {
            None => Want::NoLog,
            Some(c) if intact < c.records => {
                lost = Some("the superblock claims records the device lost");
                Want::Refused
            }
            Some(c) => Want::Opened {
                records: intact,
                claimed: c.records,
                epoch: c.epoch + 1,
            },
        };
        let found = match want {
            Want::Opened { records, .. } => records,
            _ => 0,
        };
        if found < acked {
            lost = Some("acknowledged records are not on the device");
        }
        let mut inexact = None;
        if s.kind == Kind::Dropped {
            // Only flushed writes survived: exactly what the completed syncs acknowledged.
            let k = s.flushes.checked_sub(1);
            if let Some(Some(d)) = k.and_then(|k| self.flush_durable.get(k)) {
                if intact != *d {
                    inexact = Some(format!(
                        "{} records intact where the completed flushes made exactly {d} durable",
                        intact
                    ));
                }
            }
        }
        Ok(Verdict {
            want,
            acked,
            intact,
            lost,
            inexact,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Under QEMU

/// Namespace 1 of a power-cut boot: its image, block size, and the blklogwrites log, if any.
struct Disk<'a> {
    path: &'a Path,
    bs: u64,
    log: Option<&'a Path>,
}

/// The controller and namespace for `d` (QEMU's generic `nvme_args` knows only 512 B logs).
/// Under blklogwrites the log's sector is the namespace's block. The device reports a volatile
/// write cache, so the driver must flush; QEMU itself has no cache to lose (a completed write
/// is in the host's page cache), which is why durability is judged from the log. The guest's
/// flushes reach blklogwrites, which logs them; its two files skip the host's fsync
/// (`cache.no-flush`): the host's own durability plays no part.
fn nvme_args(d: &Disk) -> Result<Vec<String>> {
    let drive = match d.log {
        Some(log) => {
            std::fs::File::create(log)?; // the file driver opens, it does not create
            format!(
                "driver=blklogwrites,file.driver=file,file.filename={},file.cache.no-flush=on,log.driver=file,log.filename={},log.cache.no-flush=on,log-sector-size={},if=none,id=ns1",
                d.path.display(),
                log.display(),
                d.bs
            )
        }
        None => format!(
            "file={},if=none,id=ns1,format=raw,cache=unsafe",
            d.path.display()
        ),
    };
    Ok(vec![
        "-device".into(),
        "nvme-subsys,id=subsys0,nqn=keel".into(),
        "-device".into(),
        "nvme,id=nvme0,serial=KEEL0001,subsys=subsys0,mdts=7,max_ioqpairs=64".into(),
        "-drive".into(),
        drive,
        "-device".into(),
        format!(
            "nvme-ns,drive=ns1,bus=nvme0,nsid=1,logical_block_size={bs},physical_block_size={bs},write-cache=on",
            bs = d.bs
        ),
    ])
}

fn boot(fw: &Path, d: &Disk, timeout: u64, cmdline: &str) -> Result<Outcome> {
    let work = crate::work_dir();
    let (accel, _) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    let vm = VmOpts {
        smp: 1,
        accel,
        timeout,
        no_nvme: true,
        qemu_args: nvme_args(d)?,
        ..VmOpts::default()
    };
    qemu::run(fw, &vm, cmdline, &work, qemu::Verbosity::Quiet)
}

/// The numbers printed right after `marker` in the decoded log, in order.
fn numbers_after(o: &Outcome, marker: &str) -> Vec<u64> {
    o.log
        .iter()
        .filter_map(|l| {
            l.split(marker)
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn dump(o: &Outcome) {
    for l in o.all_lines().filter(|l| !l.contains("DEBUG")) {
        eprintln!("    {l}");
    }
}

/// The writer the `log` job writes (and `recover` reopens) the log with.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub buf_size: usize,
    pub buffers: usize,
    pub in_flight: usize,
}

impl Shape {
    fn opts(&self) -> String {
        format!(
            "buf_size={} buffers={} in_flight={}",
            self.buf_size, self.buffers, self.in_flight
        )
    }
}

/// One configuration of the `log` job.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub bs: u64,
    pub records: u64,
    pub sync_every: u64,
    pub varied: bool,
    pub shape: Shape,
}

impl Variant {
    pub fn name(&self) -> String {
        format!(
            "{} B blocks, {} x {} KiB buffers, {} in flight, sync {}{}",
            self.bs,
            self.shape.buffers,
            self.shape.buf_size / 1024,
            self.shape.in_flight,
            if self.varied { "every ~" } else { "every " },
            self.sync_every
        )
    }

    /// Blocks of the log's region: the superblock, the stream, a buffer of slack.
    fn blocks(&self) -> u64 {
        let mut buf = [0u8; keel_jobs::wal::MAX_PAYLOAD];
        let stream: u64 = (0..self.records)
            .map(|s| (REC_HEADER + keel_jobs::wal::payload(s, &mut buf)) as u64)
            .sum();
        1 + (stream + self.shape.buf_size as u64).div_ceil(self.bs)
    }

    fn log_cmdline(&self) -> String {
        format!(
            "log records={} sync_every={} cadence={} blocks={} {}",
            self.records,
            self.sync_every,
            if self.varied { "varied" } else { "fixed" },
            self.blocks(),
            self.shape.opts()
        )
    }
}

/// The configurations `cargo xtask test` replays.
pub fn variants() -> Vec<Variant> {
    let shape = |buf_kib: usize, buffers, in_flight| Shape {
        buf_size: buf_kib * 1024,
        buffers,
        in_flight,
    };
    let v = |bs, records, sync_every, varied, shape| Variant {
        bs,
        records,
        sync_every,
        varied,
        shape,
    };
    vec![
        // The writer's defaults; each sync rewrites the growing partial buffer.
        v(512, 300, 5, false, shape(16, 4, 4)),
        // Small buffers, one write at a time, irregular syncs: several full-buffer writes per
        // gap, so subsets and in-order prefixes differ.
        v(512, 300, 12, true, shape(4, 2, 1)),
        // Large buffers, two writes in flight, a sync every 3 records.
        v(512, 150, 3, false, shape(64, 3, 2)),
        // 4 KiB blocks: the block is the atomic unit, tears fall on 4 KiB boundaries.
        v(4096, 400, 6, true, shape(16, 4, 4)),
        v(4096, 400, 40, false, shape(8, 2, 1)),
        v(4096, 300, 20, true, shape(64, 4, 4)),
        // Three writes in flight over small buffers: QEMU may finish them out of order.
        v(512, 300, 4, true, shape(8, 3, 3)),
        v(4096, 200, 3, false, shape(32, 2, 2)),
    ]
}

/// One image to recover and what recovery must say about it.
struct Item {
    label: String,
    img: Vec<u8>,
    want: Want,
    /// Records the application may hold acknowledged.
    acked: u64,
}

/// What `recover` printed for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Got {
    NoLog,
    Opened {
        records: u64,
        verified: u64,
        corrupt: u64,
        claimed: u64,
        epoch: u64,
    },
    Failed(String),
}

fn num_before(s: &str, key: &str) -> Option<u64> {
    s[..s.find(key)?].rsplit(' ').next()?.parse().ok()
}

fn num_after(s: &str, key: &str) -> Option<u64> {
    let rest = &s[s.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Parses `recover`'s result lines (`recover: image I: ...`, or the single-log form).
fn parse_recover(o: &Outcome, images: usize) -> Vec<Option<Got>> {
    let mut got = vec![None; images];
    for l in &o.log {
        let Some((_, rest)) = l.split_once("recover: ") else {
            continue;
        };
        let (i, rest) = match rest.strip_prefix("image ") {
            Some(r) => {
                let Some((n, r)) = r.split_once(": ") else {
                    continue;
                };
                let Ok(n) = n.parse::<usize>() else { continue };
                (n, r)
            }
            None if images == 1 => (0, rest),
            None => continue,
        };
        let g = if rest.starts_with("no log") {
            Got::NoLog
        } else if rest.starts_with("failed") || rest.starts_with("open") {
            Got::Failed(rest.to_string())
        } else if rest.contains(" records recovered") {
            let n = |v: Option<u64>| v.unwrap_or(u64::MAX);
            Got::Opened {
                records: n(num_before(rest, " records recovered")),
                verified: n(num_before(rest, " verified")),
                corrupt: n(num_before(rest, " corrupt")),
                claimed: n(num_after(rest, "superblock claimed ")),
                epoch: n(num_after(rest, "new epoch ")),
            }
        } else {
            continue;
        };
        if let Some(slot) = got.get_mut(i) {
            *slot = Some(g);
        }
    }
    got
}

/// Counts over everything replayed.
#[derive(Default, Debug)]
pub struct Tally {
    /// Crash states generated (before identical images are merged).
    pub states: usize,
    /// Distinct images recovered, by source.
    pub distinct: usize,
    pub after_recovery: usize,
    pub boots: usize,
    /// States that lose an acknowledged (or claimed) record, by the oracle or by recovery.
    pub acked_lost: usize,
    /// Records recovery returned that were not written (its own check, or past the intact end).
    pub corrupt: u64,
    /// Results that differ from the oracle's exact answer.
    pub wrong: usize,
    pub most_acked: u64,
    failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 12 {
            eprintln!("xtask: power-cut: {what}");
        }
        self.failures.push(what);
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.acked_lost == 0 && self.corrupt == 0 && self.wrong == 0
    }
}

fn fingerprint(bs: u64, img: &[u8]) -> u128 {
    let h = |salt: u64| {
        let mut s = std::collections::hash_map::DefaultHasher::new();
        (salt, bs, img).hash(&mut s);
        s.finish()
    };
    (u128::from(h(0)) << 64) | u128::from(h(0x5eed))
}

/// A geometry images are packed with: `stride` blocks of `bs` bytes each, and the writer shape.
#[derive(Clone, Copy)]
struct Geometry {
    bs: u64,
    stride: u64,
    shape: Shape,
}

/// A run stops queueing states after this many failures (a broken WAL fails thousands).
const MAX_FAILURES: usize = 200;

/// Images per recovery boot.
const BATCH: usize = 48;

/// Recovers `items` side by side in one boot and checks each against its [`Want`]. With `record`
/// the boot runs under blklogwrites and the entries of recovery's own writes come back.
fn recover_batch(
    fw: &Path,
    g: Geometry,
    items: &[Item],
    record: bool,
    t: &mut Tally,
) -> Result<Option<Vec<Entry>>> {
    let work = crate::work_dir();
    let path = work.join("powercut-batch.img");
    let log_path = work.join("powercut-batch.wlog");
    let stride_bytes = g.stride * g.bs;
    {
        let f = std::fs::File::create(&path)?;
        f.set_len(stride_bytes * items.len() as u64)?;
        for (i, it) in items.iter().enumerate() {
            ensure!(
                it.img.len() as u64 <= stride_bytes,
                "an image is larger than the stride"
            );
            f.write_all_at(&it.img, i as u64 * stride_bytes)?;
        }
    }
    let disk = Disk {
        path: &path,
        bs: g.bs,
        log: record.then_some(log_path.as_path()),
    };
    let cmd = format!(
        "recover images={} stride={} blocks={} {}",
        items.len(),
        g.stride,
        g.stride,
        g.shape.opts()
    );
    let out = boot(fw, &disk, 600, &cmd)?;
    t.boots += 1;
    let got = parse_recover(&out, items.len());
    let mut all_right = true;
    for (it, got) in items.iter().zip(&got) {
        let Some(got) = got else {
            all_right = false;
            t.wrong += 1;
            t.fail(format!("'{}': no result line from recover", it.label));
            continue;
        };
        let right = match (it.want, got) {
            (Want::NoLog, Got::NoLog) => true,
            (Want::Refused, Got::Failed(m)) => m.contains("CorruptAcked"),
            (
                Want::Opened {
                    records,
                    claimed,
                    epoch,
                },
                Got::Opened {
                    records: r,
                    verified: v,
                    corrupt: c,
                    claimed: cl,
                    epoch: e,
                },
            ) => {
                t.corrupt += c + r.saturating_sub(records);
                *r == records && *v == records && *c == 0 && *cl == claimed && *e == epoch as u64
            }
            _ => false,
        };
        let returned = match got {
            Got::Opened { records, .. } => *records,
            _ => 0,
        };
        if returned < it.acked {
            t.acked_lost += 1;
        }
        if !right {
            all_right = false;
            t.wrong += 1;
            t.fail(format!(
                "'{}': recover said {got:?}, the oracle {:?} ({} acknowledged)",
                it.label, it.want, it.acked
            ));
        }
    }
    let expect_pass = items.iter().all(|it| it.want != Want::Refused);
    if all_right && out.passed() != expect_pass {
        dump(&out);
        t.fail(format!(
            "recover over {} images: {} (every image as the oracle says)",
            items.len(),
            out.verdict()
        ));
    }
    if !record {
        return Ok(None);
    }
    Ok(Some(read_log(&log_path)?))
}

/// The states a cut during (or right after) recovery leaves: recovery's writes, from its log,
/// must be one superblock block per opened image, each followed by a flush; the image with its
/// new superblock must then recover to the same records, claimed, in the next epoch. (Without
/// it, the image is the state just recovered.) That recovery also flushes *before* its claim is
/// not visible here: QEMU drops a flush with no write since the last one, and over these
/// images, durable already, that flush has nothing to do; [`kill_suite`] is where it matters.
fn after_recovery(
    items: &[Item],
    entries: &[Entry],
    g: Geometry,
    t: &mut Tally,
) -> Result<Vec<Item>> {
    let stride_bytes = g.stride * g.bs;
    let mut claim: Vec<Option<&Vec<u8>>> = vec![None; items.len()];
    let mut unflushed: Option<usize> = None;
    for e in entries {
        match e {
            Entry::Flush => unflushed = None,
            Entry::Write { offset, data, .. } => {
                let i = (offset / stride_bytes) as usize;
                ensure!(
                    offset % stride_bytes == 0 && data.len() as u64 == g.bs && i < items.len(),
                    "recovery wrote {} bytes at {offset}: not a superblock",
                    data.len()
                );
                ensure!(
                    claim[i].is_none(),
                    "recovery wrote image {i}'s superblock twice"
                );
                if let Some(j) = unflushed {
                    t.fail(format!(
                        "'{}': recovery's claim was not flushed before the next log's",
                        items[j].label
                    ));
                }
                claim[i] = Some(data);
                unflushed = Some(i);
            }
            Entry::Discard { .. } => bail!("recovery discarded blocks"),
        }
    }
    if let Some(j) = unflushed {
        t.fail(format!(
            "'{}': recovery's claim was never flushed",
            items[j].label
        ));
    }
    let mut out = Vec::new();
    for (it, c) in items.iter().zip(claim) {
        match (it.want, c) {
            (Want::Opened { records, epoch, .. }, Some(sb)) => {
                let mut img = it.img.clone();
                put(&mut img, 0, sb, false);
                out.push(Item {
                    label: format!("{}, then recovered", it.label),
                    img,
                    want: Want::Opened {
                        records,
                        claimed: records,
                        epoch: epoch + 1,
                    },
                    acked: records,
                });
            }
            (Want::Opened { .. }, None) => {
                t.fail(format!("'{}': recovery wrote no superblock", it.label))
            }
            (_, Some(_)) => t.fail(format!(
                "'{}': recovery wrote a superblock where it must write nothing",
                it.label
            )),
            (_, None) => {}
        }
    }
    Ok(out)
}

/// Distinct images waiting for a boot, and the ones recovered by it waiting for round two.
struct Queue {
    g: Geometry,
    first: Vec<Item>,
    second: Vec<Item>,
}

impl Queue {
    fn new(g: Geometry) -> Self {
        Self {
            g,
            first: Vec::new(),
            second: Vec::new(),
        }
    }

    /// Adds a crash state's image; boots when a batch is full.
    fn push(
        &mut self,
        fw: &Path,
        it: Item,
        seen: &mut HashSet<u128>,
        t: &mut Tally,
    ) -> Result<bool> {
        if !seen.insert(fingerprint(self.g.bs, &it.img)) {
            return Ok(false);
        }
        t.distinct += 1;
        self.first.push(it);
        if self.first.len() == BATCH {
            self.run(fw, seen, t, false)?;
        }
        Ok(true)
    }

    /// Boots what is queued (`all`: also a partial batch, and round two's leftovers).
    fn run(&mut self, fw: &Path, seen: &mut HashSet<u128>, t: &mut Tally, all: bool) -> Result<()> {
        if !self.first.is_empty() {
            let items = std::mem::take(&mut self.first);
            let entries = recover_batch(fw, self.g, &items, true, t)?.unwrap_or_default();
            if t.boots.is_multiple_of(16) {
                qemu::progress(
                    false,
                    &format!(
                        "xtask: power-cut: {} distinct states recovered in {} boots (last: '{}')",
                        t.distinct,
                        t.boots,
                        items.last().map_or("", |i| i.label.as_str())
                    ),
                );
            }
            for it in after_recovery(&items, &entries, self.g, t)? {
                if seen.insert(fingerprint(self.g.bs, &it.img)) {
                    t.after_recovery += 1;
                    self.second.push(it);
                }
            }
        }
        while self.second.len() >= BATCH || (all && !self.second.is_empty()) {
            let n = self.second.len().min(BATCH);
            let items: Vec<Item> = self.second.drain(..n).collect();
            recover_batch(fw, self.g, &items, false, t)?;
        }
        Ok(())
    }
}

/// One `log` run under blklogwrites, its crash states recovered. Returns the distinct states.
fn replay_variant(
    fw: &Path,
    v: &Variant,
    plan: &Plan,
    seen: &mut HashSet<u128>,
    t: &mut Tally,
) -> Result<usize> {
    let work = crate::work_dir();
    let disk = work.join("powercut-log.img");
    let log_path = work.join("powercut-log.wlog");
    let blocks = v.blocks();
    {
        let f = std::fs::File::create(&disk)?;
        f.set_len(blocks * v.bs)?;
    }
    let d = Disk {
        path: &disk,
        bs: v.bs,
        log: Some(&log_path),
    };
    let out = boot(fw, &d, 300, &v.log_cmdline())?;
    if !out.passed() {
        dump(&out);
        bail!("log job failed: {}", out.verdict());
    }
    let acks = ack_schedule(v.records, v.sync_every, v.varied);
    let printed = numbers_after(&out, "log: acked ");
    ensure!(
        printed == acks,
        "the log job acknowledged {printed:?}, its schedule says {acks:?}"
    );
    let epoch = *numbers_after(&out, "log: formatted, epoch ")
        .first()
        .context("no format line")? as u32;
    let log = parse(&std::fs::read(&log_path)?)?;
    ensure!(
        log.sector_size == v.bs,
        "log sector {} for {} B blocks",
        log.sector_size,
        v.bs
    );
    let entries = log.entries;
    let on_disk = std::fs::read(&disk)?;
    ensure!(
        replay(&vec![0; on_disk.len()], &entries) == on_disk,
        "replaying the whole log does not reproduce the disk QEMU left"
    );
    let extent = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Write { offset, data, .. } => Some(offset + data.len() as u64),
            _ => None,
        })
        .max()
        .unwrap_or(v.bs) as usize;
    let oracle = Oracle::for_log_run(
        &entries,
        v.bs,
        epoch,
        &acks,
        records(v.records, epoch, v.bs, on_disk.len()),
    )?;
    ensure!(
        oracle.intact(&on_disk) == v.records,
        "the oracle finds {} of {} records on the completed run's disk",
        oracle.intact(&on_disk),
        v.records
    );
    let flushes = entries.iter().filter(|e| **e == Entry::Flush).count();
    ensure!(
        oracle.claims.len() == 1 + acks.len() && flushes == 1 + acks.len(),
        "{} superblock writes and {flushes} flushes for {} syncs (one each, and the format's)",
        oracle.claims.len(),
        acks.len()
    );
    let states = crash_states(&entries, v.bs, plan);
    let g = Geometry {
        bs: v.bs,
        stride: blocks,
        shape: v.shape,
    };
    let mut q = Queue::new(g);
    let mut b = Builder::new(&entries, v.bs, vec![0; extent]);
    let before = t.distinct;
    for s in &states {
        let img = b.build(s);
        judge_and_queue(fw, &oracle, s, img, &v.name(), &mut q, seen, t)?;
    }
    q.run(fw, seen, t, true)?;
    // Guest crashes where the device's cache holds a sync's writes, its flush not yet done:
    // halfway through the run and at the last sync.
    let sync_flushes: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == Entry::Flush)
        .map(|(i, _)| i)
        .skip(1)
        .collect();
    for cut in [
        sync_flushes[sync_flushes.len() / 2],
        sync_flushes[sync_flushes.len() - 1],
    ] {
        let c = Crash {
            entries: &entries[..cut],
            oracle: &oracle,
            epoch,
            extent,
            g,
        };
        let what = format!("{}: guest crash", v.name());
        crash_then_recover(fw, &c, &what, seen, t)?;
    }
    qemu::progress(
        false,
        &format!(
            "xtask: power-cut [{}]: {} entries, {flushes} flushes: {} states, {} distinct",
            v.name(),
            entries.len(),
            states.len(),
            t.distinct - before
        ),
    );
    Ok(t.distinct - before)
}

/// The power-cut replay of `cargo xtask test`: every [`variants`] configuration; returns the
/// summary line, or fails when any state lost an acknowledged record, returned a corrupt one
/// or differed from the oracle's exact count.
pub fn replay_suite(fw: &Path, subsets: usize) -> Result<String> {
    let plan = Plan {
        subsets,
        seed: 0xC0FFEE,
        from_flush: 0,
        max_per_gap: 0,
    };
    let mut seen = HashSet::new();
    let mut t = Tally::default();
    let mut per = Vec::new();
    for v in variants() {
        let n = replay_variant(fw, &v, &plan, &mut seen, &mut t).with_context(|| v.name())?;
        per.push((v.bs, n));
    }
    let sum = |bs: u64| per.iter().filter(|p| p.0 == bs).map(|p| p.1).sum::<usize>();
    let line = format!(
        "power-cut replay: {} distinct crash states (512 B blocks {}, 4 KiB {}; {} configurations, {} states before merging identical images) + {} cut during recovery; {} boots; exact record counts {}; {} acked lost, {} corrupt (up to {} acked)",
        t.distinct,
        sum(512),
        sum(4096),
        per.len(),
        t.states,
        t.after_recovery,
        t.boots,
        if t.wrong == 0 { "matched".to_string() } else { format!("WRONG in {}", t.wrong) },
        t.acked_lost,
        t.corrupt,
        t.most_acked
    );
    if !t.ok() {
        bail!("{line}");
    }
    Ok(line)
}

/// Kill QEMU in the middle of a long `log` run, then judge the disk as a power cut at that
/// instant would have left it, and as a guest crash followed by recovery and a power cut would.
///
/// What a killed QEMU models: nothing by itself. QEMU keeps no volatile cache of its own (a
/// completed write is in the host's page cache under `cache=writeback`, on the host's disk
/// under `none`/`directsync`; `unsafe` only ignores flushes too), so the image a killed QEMU
/// leaves holds every write it completed, flushed or not: a process crash, where a real
/// device's cache survives. The run is therefore recorded with blklogwrites (guest-visible
/// volatile write cache on, flushes logged in the order the device finished them) and the disk
/// is rebuilt from the log:
/// * **power cut at the kill**: everything up to the last completed flush, plus the
///   [`crash_states`] of the unflushed tail (dropped, prefixes, random subsets, torn writes);
///   writes the guest had submitted but QEMU had not finished are not in the log, so they are
///   lost, as in a power cut;
/// * **guest crash, then recovery, then a power cut**: the device kept its cache (every logged
///   write, as the killed QEMU's own image does); `recover` runs on that under blklogwrites, and
///   the crash states of both logs together, from the run's last flush on, are recovered again:
///   a recovery that claimed the records it found before flushing them would lose them here.
///
/// Limits: the order within the log is QEMU's completion order, and only the states listed are
/// tried (not every subset); a request QEMU finished on the file but had not logged yet when it
/// died counts as lost (it may be in the image QEMU left: the two are compared and the
/// difference reported, not judged).
pub fn kill_suite(fw: &Path) -> Result<String> {
    // ~0.65 ms a record: some 1300 records by the kill, a sync every 100 and 2 KiB buffers
    // (eight writes between two syncs), so the kill usually finds unflushed writes.
    let (bs, blocks, sync_every, records, pause_us) =
        (512u64, 131_072u64, 100u64, 1_000_000u64, 600);
    let shape = Shape {
        buf_size: 2048,
        buffers: 2,
        in_flight: 1,
    };
    let work = crate::work_dir();
    let disk = work.join("killed-log.img");
    let log_path = work.join("killed-log.wlog");
    std::fs::File::create(&disk)?.set_len(blocks * bs)?;
    let d = Disk {
        path: &disk,
        bs,
        log: Some(&log_path),
    };
    let out = boot(
        fw,
        &d,
        1,
        &format!(
            "log records={records} sync_every={sync_every} blocks={blocks} pause_us={pause_us} {}",
            shape.opts()
        ),
    )?;
    ensure!(
        out.timed_out,
        "the log run ended before it could be killed: {}",
        out.verdict()
    );
    let seen_acked = numbers_after(&out, "log: acked ")
        .into_iter()
        .max()
        .unwrap_or(0);
    ensure!(seen_acked > 0, "nothing was acknowledged before the kill");
    let epoch = *numbers_after(&out, "log: formatted, epoch ")
        .first()
        .context("no format line")? as u32;
    let e1 = parse(&std::fs::read(&log_path)?)?.entries;
    let extent = e1
        .iter()
        .filter_map(|e| match e {
            Entry::Write { offset, data, .. } => Some(offset + data.len() as u64),
            _ => None,
        })
        .max()
        .unwrap_or(bs)
        .next_multiple_of(bs) as usize;
    let acks = ack_schedule(records, sync_every, false);
    let oracle = Oracle::for_log_run(&e1, bs, epoch, &acks, records_upto(epoch, bs, extent))?;
    let acked = oracle.acked(e1.len());
    ensure!(
        seen_acked <= acked,
        "the host saw {seen_acked} records acknowledged, the log's superblock writes only {acked}"
    );
    let flushes = e1.iter().filter(|e| **e == Entry::Flush).count();
    let durable = oracle.flush_durable.last().copied().flatten().unwrap_or(0);
    // The stride leaves room behind the records for the scan to find zeroes.
    let stride = (extent as u64).div_ceil(bs) + 2048;
    let g = Geometry { bs, stride, shape };
    let full = replay(&vec![0; extent], &e1);
    let on_disk = std::fs::read(&disk)?;
    let in_file = oracle.intact(&on_disk);
    let differ = full
        .chunks(bs as usize)
        .zip(on_disk.chunks(bs as usize))
        .filter(|(a, b)| a != b)
        .count();

    let mut t = Tally::default();
    let mut seen = HashSet::new();
    // 1. A power cut at the kill.
    // The tail at the kill is a few writes; a WAL that never flushed would make it the whole
    // run, hence the cap.
    let plan = Plan {
        subsets: 6,
        seed: 0xD1E,
        from_flush: flushes,
        max_per_gap: 32,
    };
    let mut q = Queue::new(g);
    let mut b = Builder::new(&e1, bs, vec![0; extent]);
    for s in crash_states(&e1, bs, &plan) {
        judge_and_queue(
            fw,
            &oracle,
            &s,
            b.build(&s),
            "power cut at the kill",
            &mut q,
            &mut seen,
            &mut t,
        )?;
    }
    q.run(fw, &mut seen, &mut t, true)?;
    let at_kill = t.distinct;

    // 2. A guest crash (the device kept every logged write), recovery recorded, a power cut.
    let (states_before, distinct_before) = (t.states, t.distinct);
    let c = Crash {
        entries: &e1,
        oracle: &oracle,
        epoch,
        extent,
        g,
    };
    crash_then_recover(fw, &c, "guest crash at the kill", &mut seen, &mut t)?;
    let line = format!(
        "kill QEMU mid-log: {seen_acked} acked seen ({acked} by the log), {flushes} flushes; QEMU's image holds {in_file} records, the durable state {durable} ({differ} blocks differ); {at_kill} distinct power-cut states at the kill, {} after a guest crash and a recorded recovery ({} of them new), {} cut during recovery; {} acked lost, {} corrupt, exact counts {}",
        t.states - states_before,
        t.distinct - distinct_before,
        t.after_recovery,
        t.acked_lost,
        t.corrupt,
        if t.wrong == 0 { "matched".to_string() } else { format!("WRONG in {}", t.wrong) },
    );
    if !t.ok() {
        bail!("{line}");
    }
    Ok(line)
}

/// A guest crash at the end of `entries` (a run's log so far), for [`crash_then_recover`].
struct Crash<'a> {
    entries: &'a [Entry],
    oracle: &'a Oracle,
    epoch: u32,
    extent: usize,
    g: Geometry,
}

/// A guest crash, then recovery, then a power cut: the device kept every write issued before
/// the crash, flushed or not (a crash is not a power loss), `recover` runs on that under
/// blklogwrites, and the crash states of the run's log and recovery's together, from the run's
/// last flush on, are recovered again. Recovery found records that were only in the device's
/// cache; a recovery that claimed them before flushing them loses them here.
///
/// QEMU drops a flush when nothing was written through it since its last one, as is the case
/// for a recovery's first flush in a fresh QEMU; `recover touch_lba=` zeroes a block past the
/// log first, so that flush reaches the log.
fn crash_then_recover(
    fw: &Path,
    c: &Crash,
    what: &str,
    seen: &mut HashSet<u128>,
    t: &mut Tally,
) -> Result<()> {
    let (bs, stride) = (c.g.bs, c.g.stride);
    let touch = stride - 1;
    ensure!(
        touch * bs >= c.extent as u64,
        "no block past the log to touch"
    );
    let full = replay(&vec![0; c.extent], c.entries);
    let in_cache = c.oracle.intact(&full);
    let claimed = c
        .oracle
        .claims
        .iter()
        .rev()
        .find(|cl| cl.entry < c.entries.len())
        .map_or(0, |cl| cl.records);
    let work = crate::work_dir();
    let img = work.join("crashed.img");
    {
        let f = std::fs::File::create(&img)?;
        f.set_len(stride * bs)?;
        f.write_all_at(&full, 0)?;
    }
    let log = work.join("crashed-recover.wlog");
    let d = Disk {
        path: &img,
        bs,
        log: Some(&log),
    };
    let cmd = format!(
        "recover blocks={stride} touch_lba={touch} {}",
        c.g.shape.opts()
    );
    let out = boot(fw, &d, 300, &cmd)?;
    t.boots += 1;
    let got = parse_recover(&out, 1).remove(0);
    let want = Got::Opened {
        records: in_cache,
        verified: in_cache,
        corrupt: 0,
        claimed,
        epoch: u64::from(c.epoch) + 1,
    };
    if got.as_ref() != Some(&want) || !out.passed() {
        dump(&out);
        t.wrong += 1;
        t.fail(format!(
            "{what}: recovery of the device's cache said {got:?}, the oracle {want:?}"
        ));
        return Ok(());
    }
    // The run's oracle, cut where the crash came.
    let cut = c.entries.len();
    let mut oracle = c.oracle.clone();
    oracle.claims.retain(|cl| cl.entry < cut);
    oracle.acks.retain(|a| a.0 < cut);
    oracle
        .flush_durable
        .truncate(c.entries.iter().filter(|e| **e == Entry::Flush).count());
    let mut all = c.entries.to_vec();
    for e in read_log(&log)? {
        match &e {
            // The zeroed block, past the log.
            Entry::Write { offset, data, .. } if *offset == touch * bs => {
                ensure!(data.iter().all(|b| *b == 0), "touch_lba wrote data");
            }
            Entry::Write { offset, .. } => {
                ensure!(*offset == 0, "recovery wrote outside its superblock");
                oracle.claims.push(Claim {
                    entry: all.len(),
                    records: in_cache,
                    epoch: c.epoch + 1,
                });
                oracle.acks.push((all.len(), in_cache));
            }
            Entry::Flush => oracle.flush_durable.push(None),
            Entry::Discard { .. } => bail!("recovery discarded blocks"),
        }
        all.push(e);
    }
    let plan = Plan {
        subsets: 6,
        seed: 0xD1E2,
        from_flush: c.entries.iter().filter(|e| **e == Entry::Flush).count(),
        max_per_gap: 32,
    };
    let mut q = Queue::new(c.g);
    let mut b = Builder::new(&all, bs, vec![0; c.extent]);
    for s in crash_states(&all, bs, &plan) {
        judge_and_queue(fw, &oracle, &s, b.build(&s), what, &mut q, seen, t)?;
    }
    q.run(fw, seen, t, true)
}

fn records_upto(epoch: u32, bs: u64, extent: usize) -> Vec<(usize, Vec<u8>)> {
    records(u64::MAX, epoch, bs, extent)
}

#[allow(clippy::too_many_arguments)]
fn judge_and_queue(
    fw: &Path,
    oracle: &Oracle,
    s: &CrashState,
    img: Vec<u8>,
    what: &str,
    q: &mut Queue,
    seen: &mut HashSet<u128>,
    t: &mut Tally,
) -> Result<()> {
    if t.failures.len() >= MAX_FAILURES {
        bail!(
            "stopped after {MAX_FAILURES} failures ({} acked lost, {} corrupt, {} wrong so far)",
            t.acked_lost,
            t.corrupt,
            t.wrong
        );
    }
    let verdict = oracle.judge(s, &img)?;
    t.states += 1;
    t.most_acked = t.most_acked.max(verdict.acked);
    if let Some(m) = verdict.lost {
        t.acked_lost += 1;
        t.fail(format!(
            "{what}, '{}': {m} ({} acked, {} intact)",
            s.label, verdict.acked, verdict.intact
        ));
    }
    if let Some(m) = verdict.inexact {
        t.wrong += 1;
        t.fail(format!("{what}, '{}': {m}", s.label));
    }
    q.push(
        fw,
        Item {
            label: format!("{what}: {}", s.label),
            img,
            want: verdict.want,
            acked: verdict.acked,
        },
        seen,
        t,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_bytes(entries: &[(u64, u64, u64, Vec<u8>)], flushed: u64) -> Vec<u8> {
        let ss = 512usize;
        let mut v = vec![0u8; ss];
        v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        v[8..16].copy_from_slice(&1u64.to_le_bytes());
        v[16..24].copy_from_slice(&flushed.to_le_bytes());
        v[24..28].copy_from_slice(&512u32.to_le_bytes());
        for (sector, nr, flags, data) in entries {
            let mut h = vec![0u8; ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            v.extend(h);
            v.extend(data);
        }
        v
    }

    fn plan(subsets: usize) -> Plan {
        Plan {
            subsets,
            seed: 7,
            from_flush: 0,
            max_per_gap: 0,
        }
    }

    #[test]
    fn parse_and_replay() {
        let a = vec![0xAA; 1024];
        let b = vec![0xBB; 512];
        let log = parse(&log_bytes(
            &[
                (2, 2, 0, a.clone()),
                (0, 0, FLUSH, vec![]),
                (3, 1, 0, b.clone()),
            ],
            2,
        ))
        .unwrap();
        assert_eq!(log.entries.len(), 3);
        assert_eq!(log.flushed_entries, 2);
        let img = replay(&[0u8; 4096], &log.entries);
        assert_eq!(&img[1024..1536], &a[..512]);
        assert_eq!(&img[1536..2048], &b[..]);
        let states = crash_states(&log.entries, 512, &plan(3));
        // Gap 0: dropped, the one-write prefix, the two-sector write torn both ways at its one
        // boundary (a one-write gap has no subset that is not a prefix). Gap 1: dropped, prefix.
        let kinds: Vec<Kind> = states.iter().map(|s| s.kind).collect();
        use Kind::*;
        assert_eq!(kinds, [Dropped, Prefix, Torn, Torn, Dropped, Prefix]);
        let mut bld = Builder::new(&log.entries, 512, vec![0u8; 4096]);
        let imgs: Vec<Vec<u8>> = states.iter().map(|s| bld.build(s)).collect();
        assert_eq!(imgs[0], vec![0u8; 4096], "nothing flushed, nothing kept");
        assert_eq!(&imgs[2][1024..1536], &a[..512], "torn: first sector");
        assert_eq!(&imgs[2][1536..2048], &[0u8; 512][..], "torn: second lost");
        assert_eq!(&imgs[3][1024..1536], &[0u8; 512][..], "torn: first lost");
        assert_eq!(&imgs[3][1536..2048], &a[512..], "torn: second kept");
        assert_eq!(
            &imgs[4][1024..2048],
            &a[..],
            "the write before the flush is durable"
        );
        assert_eq!(
            &imgs[4][1536..2048],
            &a[512..],
            "the unflushed write is gone"
        );
        assert_eq!(&imgs[5][1536..2048], &b[..], "the unflushed write kept");
        assert_eq!(
            (states[4].flushes, states[4].durable, states[4].cut),
            (1, 2, 3)
        );
    }

    #[test]
    fn every_boundary_is_torn_and_subsets_are_distinct() {
        let w = |s: u64, n: u64| Entry::Write {
            offset: s * 512,
            data: vec![s as u8; (n * 512) as usize],
            fua: false,
        };
        let entries = vec![w(0, 4), w(8, 1), w(16, 3), w(24, 1), w(32, 1)];
        let states = crash_states(&entries, 512, &plan(6));
        let torn: Vec<(usize, u64, u64)> = states
            .iter()
            .filter(|s| s.kind == Kind::Torn)
            .map(|s| {
                let p = s.kept.last().unwrap();
                (p.entry, p.first, p.end)
            })
            .collect();
        let mut want = vec![];
        for (e, n) in [(0usize, 4u64), (2, 3)] {
            for j in 1..n {
                want.push((e, 0, j));
                want.push((e, j, n));
            }
        }
        assert_eq!(torn, want);
        let subsets: Vec<Vec<usize>> = states
            .iter()
            .filter(|s| s.kind == Kind::Subset)
            .map(|s| s.kept.iter().map(|p| p.entry).collect())
            .collect();
        assert_eq!(subsets.len(), 6);
        let set: HashSet<_> = subsets.iter().collect();
        assert_eq!(set.len(), 6, "distinct");
        for s in &subsets {
            assert!(
                *s != (0..s.len()).collect::<Vec<_>>(),
                "not a prefix: {s:?}"
            );
        }
        // Reproducible.
        let again = crash_states(&entries, 512, &plan(6));
        assert!(again.iter().zip(&states).all(|(a, b)| a.kept == b.kept));
        // Capped: a seeded sample of the prefix and torn states, in order, the rest kept.
        let capped = crash_states(
            &entries,
            512,
            &Plan {
                max_per_gap: 4,
                ..plan(6)
            },
        );
        let count = |v: &[CrashState], k: Kind| v.iter().filter(|s| s.kind == k).count();
        assert_eq!(count(&capped, Kind::Prefix) + count(&capped, Kind::Torn), 4);
        assert_eq!(count(&capped, Kind::Subset), 6);
        assert_eq!(count(&capped, Kind::Dropped), 1);
        assert!(capped.iter().all(|c| states
            .iter()
            .any(|s| s.label == c.label && s.kept == c.kept)));
    }

    /// A `log` run's device writes, built by hand: format (superblock, flush), then per sync
    /// the stream's blocks so far, a flush and the superblock claiming them.
    fn synthetic_run(acks: &[u64], epoch: u32) -> (Vec<Entry>, Vec<(usize, Vec<u8>)>) {
        let bs = 512u64;
        let recs = records(*acks.last().unwrap(), epoch, bs, 1 << 20);
        let sb = |claim: u64| {
            let mut b = vec![0u8; 512];
            b[0..8].copy_from_slice(&SB_MAGIC.to_le_bytes());
            b[8..12].copy_from_slice(&epoch.to_le_bytes());
            b[12..16].copy_from_slice(&epoch.to_le_bytes());
            b[28..36].copy_from_slice(&claim.to_le_bytes());
            Entry::Write {
                offset: 0,
                data: b,
                fua: false,
            }
        };
        let mut e = vec![sb(0), Entry::Flush];
        let mut written = 512usize; // stream bytes end (disk offset)
        let mut start = 512usize;
        for &a in acks {
            let end = recs[..a as usize]
                .last()
                .map_or(written, |(at, r)| at + r.len());
            let mut data = vec![0u8; (end - start).next_multiple_of(512)];
            for (at, r) in &recs[..a as usize] {
                if at + r.len() > start {
                    let from = at.max(&start) - at;
                    let o = at + from - start;
                    data[o..o + r.len() - from].copy_from_slice(&r[from..]);
                }
            }
            e.push(Entry::Write {
                offset: start as u64,
                data,
                fua: false,
            });
            e.push(Entry::Flush);
            e.push(sb(a));
            written = end;
            start = end / 512 * 512;
        }
        (e, recs)
    }

    #[test]
    fn the_oracle_is_exact_and_catches_a_claim_before_its_flush() {
        let acks = [3u64, 7, 12];
        let (e, recs) = synthetic_run(&acks, 1);
        let oracle = Oracle::for_log_run(&e, 512, 1, &acks, recs).unwrap();
        assert_eq!(oracle.claims.len(), 4);
        let img = replay(&[0u8; 16384], &e);
        assert_eq!(oracle.intact(&img), 12);
        let mut b = Builder::new(&e, 512, vec![0u8; 16384]);
        let mut seen_torn = false;
        for s in crash_states(&e, 512, &plan(4)) {
            let img = b.build(&s);
            let v = oracle.judge(&s, &img).unwrap();
            assert!(
                v.lost.is_none() && v.inexact.is_none(),
                "{}: {v:?}",
                s.label
            );
            if s.kind == Kind::Dropped && s.flushes >= 2 {
                // Exactly what the completed syncs acknowledged.
                assert!(
                    matches!(v.want, Want::Opened { records, epoch: 2, .. } if records == acks[s.flushes - 2]),
                    "{}: {v:?}",
                    s.label
                );
            }
            if s.kind == Kind::Torn {
                seen_torn = true;
                let Want::Opened { records, .. } = v.want else {
                    panic!()
                };
                assert!(records >= v.acked);
            }
        }
        assert!(seen_torn);
        // A WAL that writes its claim before the flush: the claim can survive its records.
        let mut bad = e.clone();
        let n = bad.len();
        bad.swap(n - 2, n - 1); // ..., data, superblock, flush
        let oracle =
            Oracle::for_log_run(&bad, 512, 1, &acks, records(12, 1, 512, 1 << 20)).unwrap();
        let mut b = Builder::new(&bad, 512, vec![0u8; 16384]);
        let lost = crash_states(&bad, 512, &plan(4))
            .iter()
            .filter(|s| oracle.judge(s, &b.build(s)).unwrap().lost.is_some())
            .count();
        assert!(lost > 0);
    }

    #[test]
    fn recover_lines_parse() {
        let o = Outcome {
            status: Some(33),
            timed_out: false,
            console: vec![],
            log: vec![
                "0.1 INFO recover: image 0: no log on the device (never formatted durably): 0 records recovered, 0 verified, 0 corrupt".into(),
                "0.2 INFO recover: image 1: 12 records recovered, 12 verified, 0 corrupt; end offset 900, new epoch 2; superblock claimed 7".into(),
                "0.3 ERROR recover: image 2: failed (recover: open): CorruptAcked { at: Lsn { seq: 3, offset: 10 }, acked: Lsn { seq: 7, offset: 99 } }".into(),
            ],
            boot_time: None,
            wall: std::time::Duration::ZERO,
            accel: String::new(),
        };
        let g = parse_recover(&o, 4);
        assert_eq!(g[0], Some(Got::NoLog));
        assert_eq!(
            g[1],
            Some(Got::Opened {
                records: 12,
                verified: 12,
                corrupt: 0,
                claimed: 7,
                epoch: 2
            })
        );
        assert!(matches!(&g[2], Some(Got::Failed(m)) if m.contains("CorruptAcked")));
        assert_eq!(g[3], None);
    }

    #[test]
    fn bad_logs_are_errors() {
        assert!(parse(&[0u8; 10]).is_err());
        assert!(parse(&[0u8; 1024]).is_err());
        let mut v = log_bytes(&[(0, 4, 0, vec![1; 2048])], 0);
        v.truncate(v.len() - 100); // torn log tail: the entry is dropped, not a panic
        assert_eq!(parse(&v).unwrap().entries.len(), 0);
    }
}
