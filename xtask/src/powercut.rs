//! Power-cut replay (issue 5's test bed). QEMU's `blklogwrites` block driver records every write,
//! write-zeroes, discard and flush the emulated NVMe device issues to its disk, in the
//! dm-log-writes format: a superblock in log sector 0 (magic, version, entry count as of the
//! last flush, sector size), then for each request a header sector (`sector`, `nr_sectors`,
//! `flags`, `data_len`) followed by its data sectors (none for flushes and discards; Write
//! Zeroes is logged with zero data).
//!
//! [`replay`] rebuilds the disk as it was after any prefix of that log; [`crash_states`] picks
//! the states a power cut can leave: every flush point, and points between flushes where the
//! unflushed writes since the last flush are dropped, kept as a prefix, or kept as a random
//! subset (a volatile write cache may persist any of them, in any order).

use anyhow::{bail, ensure, Context, Result};

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
            let Some(data) = log.get(at..end) else { break }; // torn tail of the log itself
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

/// The disk after applying `entries` to `base`.
pub fn replay(base: &[u8], entries: &[Entry]) -> Vec<u8> {
    let mut img = base.to_vec();
    for e in entries {
        apply(&mut img, e);
    }
    img
}

fn apply(img: &mut Vec<u8>, e: &Entry) {
    let mut put = |offset: u64, bytes: &[u8]| {
        let (o, end) = (offset as usize, offset as usize + bytes.len());
        if img.len() < end {
            img.resize(end, 0);
        }
        img[o..end].copy_from_slice(bytes);
    };
    match e {
        Entry::Write { offset, data, .. } => put(*offset, data),
        Entry::Discard { .. } | Entry::Flush => {}
    }
}

/// One state a power cut can leave the disk in.
pub struct CrashState {
    pub label: String,
    /// Entries (by index) applied, in order.
    pub applied: Vec<usize>,
}

/// Every flush point, plus `random_per_gap` states inside each gap between flushes (and after
/// the last one): unflushed writes dropped entirely, kept as a prefix, or kept as a random subset.
pub fn crash_states(log: &Log, random_per_gap: usize, seed: u64) -> Vec<CrashState> {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let flush_idx: Vec<usize> = log
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == Entry::Flush)
        .map(|(i, _)| i)
        .collect();
    let mut out = Vec::new();
    let mut durable: Vec<usize> = Vec::new();
    let mut gap_start = 0;
    let mut flushes = 0;
    let gaps = flush_idx
        .iter()
        .map(|&f| (f, true))
        .chain(std::iter::once((log.entries.len(), false)));
    for (end, is_flush) in gaps {
        let unflushed: Vec<usize> = (gap_start..end).collect();
        for r in 0..random_per_gap {
            let kept: Vec<usize> = match r % 3 {
                0 => vec![],
                1 => unflushed[..(next() as usize) % (unflushed.len() + 1)].to_vec(),
                _ => unflushed
                    .iter()
                    .copied()
                    .filter(|_| next() & 1 == 1)
                    .collect(),
            };
            let mut applied = durable.clone();
            applied.extend(kept.iter().copied());
            // FUA writes are durable on completion: always keep them.
            for &i in &unflushed {
                if matches!(log.entries[i], Entry::Write { fua: true, .. }) && !applied.contains(&i)
                {
                    applied.push(i);
                }
            }
            let kind = ["unflushed dropped", "unflushed prefix", "unflushed subset"][r % 3];
            out.push(CrashState {
                label: format!(
                    "after flush {flushes}, {kind} ({}/{})",
                    kept.len(),
                    unflushed.len()
                ),
                applied,
            });
        }
        durable.extend(gap_start..end);
        if is_flush {
            durable.push(end);
            flushes += 1;
            out.push(CrashState {
                label: format!("at flush {flushes}"),
                applied: durable.clone(),
            });
            gap_start = end + 1;
        }
    }
    out
}

/// Rebuilds the disk for one crash state.
pub fn build(base: &[u8], log: &Log, s: &CrashState) -> Vec<u8> {
    let mut img = base.to_vec();
    let mut order = s.applied.clone();
    order.sort_unstable(); // a later write to the same block wins, as on the device
    for i in order {
        apply(&mut img, &log.entries[i]);
    }
    img
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
        let states = crash_states(&log, 3, 7);
        // One flush: 3 states before it, the flush point, 3 states after it.
        assert_eq!(states.len(), 7);
        let at_flush = states.iter().find(|s| s.label == "at flush 1").unwrap();
        let img = build(&[0u8; 4096], &log, at_flush);
        assert_eq!(
            &img[1024..2048],
            &a[..],
            "the write before the flush is durable"
        );
        let dropped = states
            .iter()
            .find(|s| s.label.starts_with("after flush 1, unflushed dropped"))
            .unwrap();
        assert_eq!(
            &build(&[0u8; 4096], &log, dropped)[1536..2048],
            &a[512..],
            "the unflushed write is gone"
        );
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
