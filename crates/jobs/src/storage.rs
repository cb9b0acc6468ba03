//! Storage jobs over any `keel_blockdev::BlockQueue`: `selftest` (write, read back, verify, on
//! every namespace and transfer shape), `scrub` (CRC32C of a range, for the host to compare with
//! the disk image) and `bench` (fio-like load with per-core IOPS, MB/s, average and p99 latency).

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, NsId, SubmitError};
use keel_hal::{Clock, DmaAllocator, DmaRegion};

/// Why a storage step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StorageError {
    /// The queue refused the operation.
    Submit(SubmitError),
    /// The device failed it.
    Io(IoError),
    /// A DMA buffer could not be had or accessed.
    Dma,
    /// Data read back differs from what was written.
    Mismatch {
        /// First block that differs.
        lba: u64,
        /// Byte offset in it.
        offset: usize,
    },
    /// The tag never came back (a driver bug: the driver times commands out itself).
    Timeout,
    /// No such namespace.
    NoSuchNamespace(NsId),
}

impl From<SubmitError> for StorageError {
    fn from(e: SubmitError) -> Self {
        Self::Submit(e)
    }
}

/// Poll budget for one synchronous operation (device-side timeouts are the driver's job; this
/// only guards the job against a driver bug).
const SYNC_TIMEOUT_NS: u64 = 5_000_000_000;

/// Submits one operation and polls until its tag comes back.
pub fn sync_op<Q: BlockQueue, C: Clock>(
    q: &mut Q,
    clock: &C,
    op: BlockOp,
) -> Result<(), StorageError> {
    sync_with(q, clock, |q, tag| q.submit(op, tag))
}

/// [`sync_op`] for a submission of the caller's (e.g. an NVMe read or write with a metadata
/// buffer): `submit(q, tag)` is retried while the queue is full.
pub fn sync_with<Q: BlockQueue, C: Clock>(
    q: &mut Q,
    clock: &C,
    mut submit: impl FnMut(&mut Q, u32) -> Result<(), SubmitError>,
) -> Result<(), StorageError> {
    const TAG: u32 = 0x5EED;
    loop {
        match submit(q, TAG) {
            Ok(()) => break,
            Err(SubmitError::QueueFull) => {
                q.poll(usize::MAX, &mut |_, _| {});
            }
            Err(e) => return Err(e.into()),
        }
    }
    q.flush_submissions();
    let start = clock.now_ns();
    let mut result = None;
    while result.is_none() {
        q.poll(usize::MAX, &mut |tag, r| {
            if tag == TAG {
                result = Some(r);
            }
        });
        if clock.now_ns() - start > SYNC_TIMEOUT_NS {
            return Err(StorageError::Timeout);
        }
    }
    result.unwrap_or(Ok(())).map_err(StorageError::Io)
}

/// The pattern word at byte offset `off` of block `lba` of namespace `ns` for run `seed` (what
/// `selftest` writes; tests recompute it to check a disk image).
pub fn pattern(ns: NsId, lba: u64, off: usize, seed: u64) -> u64 {
    let mut z = seed ^ (ns as u64) << 56 ^ lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ off as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fill(
    buf: &DmaRegion,
    at: usize,
    len: usize,
    ns: NsId,
    lba: u64,
    bs: usize,
    seed: u64,
) -> Result<(), StorageError> {
    let mut chunk = [0u8; 512];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(512);
        for (i, w) in chunk[..n].chunks_mut(8).enumerate() {
            let off = done + i * 8;
            let v = pattern(ns, lba + (off / bs) as u64, off % bs, seed).to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
        buf.write_bytes(at + done, &chunk[..n])
            .map_err(|_| StorageError::Dma)?;
        done += n;
    }
    Ok(())
}

fn verify(
    buf: &DmaRegion,
    at: usize,
    len: usize,
    ns: NsId,
    lba: u64,
    bs: usize,
    seed: Option<u64>,
) -> Result<(), StorageError> {
    let mut chunk = [0u8; 512];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(512);
        buf.read_bytes(at + done, &mut chunk[..n])
            .map_err(|_| StorageError::Dma)?;
        for (i, w) in chunk[..n].chunks(8).enumerate() {
            let off = done + i * 8;
            let want = match seed {
                Some(s) => pattern(ns, lba + (off / bs) as u64, off % bs, s).to_le_bytes(),
                None => [0; 8],
            };
            if w != &want[..w.len()] {
                return Err(StorageError::Mismatch {
                    lba: lba + (off / bs) as u64,
                    offset: off % bs,
                });
            }
        }
        done += n;
    }
    Ok(())
}

/// One row of the selftest table.
pub struct Shape {
    /// What the row checks.
    pub name: &'static str,
    /// Byte offset of the data inside its DMA buffer (non-zero: PRP1 with an offset).
    pub buf_offset: usize,
    /// Blocks transferred.
    pub blocks: u32,
    /// Where.
    pub lba: u64,
}

/// Write → read → verify one shape; then the zeroes/deallocate/flush checks are run by the caller.
pub fn write_read_verify<Q: BlockQueue, C: Clock>(
    q: &mut Q,
    clock: &C,
    ns: NsId,
    s: &Shape,
    wbuf: &DmaRegion,
    rbuf: &DmaRegion,
    seed: u64,
) -> Result<(), StorageError> {
    let bs = q.block_size(ns).ok_or(StorageError::NoSuchNamespace(ns))? as usize;
    let len = s.blocks as usize * bs;
    fill(wbuf, s.buf_offset, len, ns, s.lba, bs, seed)?;
    rbuf.fill(s.buf_offset, len, 0xA5)
        .map_err(|_| StorageError::Dma)?;
    let w = BufRef::new(wbuf, s.buf_offset, len).map_err(|_| StorageError::Dma)?;
    let r = BufRef::new(rbuf, s.buf_offset, len).map_err(|_| StorageError::Dma)?;
    sync_op(
        q,
        clock,
        BlockOp::Write {
            ns,
            lba: s.lba,
            blocks: s.blocks,
            buf: w,
        },
    )?;
    sync_op(
        q,
        clock,
        BlockOp::Read {
            ns,
            lba: s.lba,
            blocks: s.blocks,
            buf: r,
        },
    )?;
    verify(rbuf, s.buf_offset, len, ns, s.lba, bs, Some(seed))
}

/// Write zeroes over a written range and check it reads back as zeroes.
pub fn zeroes_verify<Q: BlockQueue, C: Clock>(
    q: &mut Q,
    clock: &C,
    ns: NsId,
    lba: u64,
    blocks: u32,
    rbuf: &DmaRegion,
) -> Result<(), StorageError> {
    let bs = q.block_size(ns).ok_or(StorageError::NoSuchNamespace(ns))? as usize;
    let len = blocks as usize * bs;
    sync_op(q, clock, BlockOp::WriteZeroes { ns, lba, blocks })?;
    rbuf.fill(0, len, 0xA5).map_err(|_| StorageError::Dma)?;
    sync_op(
        q,
        clock,
        BlockOp::Read {
            ns,
            lba,
            blocks,
            buf: BufRef::new(rbuf, 0, len).map_err(|_| StorageError::Dma)?,
        },
    )?;
    verify(rbuf, 0, len, ns, lba, bs, None)
}

/// CRC32C (Castagnoli) of `blocks` blocks from `lba`, read in chunks of `chunk` bytes.
pub fn scrub<Q: BlockQueue, C: Clock>(
    q: &mut Q,
    clock: &C,
    ns: NsId,
    lba: u64,
    blocks: u64,
    buf: &DmaRegion,
) -> Result<u32, StorageError> {
    let bs = q.block_size(ns).ok_or(StorageError::NoSuchNamespace(ns))? as u64;
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut digest = crc.digest();
    let per = (buf.len() as u64 / bs).max(1);
    let mut chunk = [0u8; 4096];
    let mut at = lba;
    while at < lba + blocks {
        let n = per.min(lba + blocks - at);
        let len = (n * bs) as usize;
        sync_op(
            q,
            clock,
            BlockOp::Read {
                ns,
                lba: at,
                blocks: n as u32,
                buf: BufRef::new(buf, 0, len).map_err(|_| StorageError::Dma)?,
            },
        )?;
        let mut off = 0;
        while off < len {
            let m = (len - off).min(chunk.len());
            buf.read_bytes(off, &mut chunk[..m])
                .map_err(|_| StorageError::Dma)?;
            digest.update(&chunk[..m]);
            off += m;
        }
        at += n;
    }
    Ok(digest.finalize())
}

/// Allocates a DMA buffer or fails the job with a typed error.
pub fn dma<D: DmaAllocator + ?Sized>(pool: &D, len: usize) -> Result<DmaRegion, StorageError> {
    pool.alloc(len, 4096).map_err(|_| StorageError::Dma)
}

// ---------------------------------------------------------------------------------------------
// bench

/// The access pattern of a bench.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
}

impl Pattern {
    /// From its name (`read`, `write`, `randread`, `randwrite`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Self::Read,
            "write" => Self::Write,
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            _ => return None,
        })
    }
    fn is_write(self) -> bool {
        matches!(self, Self::Write | Self::RandWrite)
    }
    fn is_random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }
}

/// What one core's bench does.
#[derive(Clone, Copy)]
pub struct BenchCfg {
    /// Access pattern.
    pub pattern: Pattern,
    /// Namespace.
    pub ns: NsId,
    /// Bytes per I/O.
    pub bs: usize,
    /// I/Os kept in flight.
    pub qd: usize,
    /// How long.
    pub duration_ns: u64,
    /// Region of the namespace this core uses (so cores do not overlap): [lba0, lba0 + blocks).
    pub lba0: u64,
    /// Blocks in the region.
    pub blocks: u64,
    /// The namespace's logical block size.
    pub block_size: u32,
}

/// Latency histogram: 1 µs buckets up to 4 ms, then one overflow bucket.
pub const HIST: usize = 4096;

/// What one bench run measured.
#[derive(Clone, Copy, Default, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BenchResult {
    /// I/Os completed.
    pub ios: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed_ns: u64,
    /// Sum of latencies.
    pub lat_sum_ns: u64,
    /// 99th percentile latency.
    pub p99_us: u64,
    /// Where this core's time went, in TSC ticks: building and queueing submissions, the
    /// doorbell (`kick`), polls that found completions (with their handling), and polls that
    /// found none (waiting for the device).
    pub t_submit: u64,
    /// Ticks in doorbells.
    pub t_kick: u64,
    /// Ticks in polls that found completions.
    pub t_reap: u64,
    /// Ticks in polls that found none.
    pub t_idle: u64,
}

impl BenchResult {
    /// Adds `r` (sums; the worst p99).
    pub fn add(&mut self, r: &BenchResult) {
        self.ios += r.ios;
        self.errors += r.errors;
        self.elapsed_ns += r.elapsed_ns;
        self.lat_sum_ns += r.lat_sum_ns;
        self.p99_us = self.p99_us.max(r.p99_us);
        self.t_submit += r.t_submit;
        self.t_kick += r.t_kick;
        self.t_reap += r.t_reap;
        self.t_idle += r.t_idle;
    }
}

/// What the bench loop drives: a raw queue pair, or the full stack (a reactor with I/O
/// handles). One loop serves both so their numbers are comparable.
pub trait BenchTarget {
    /// Queues one operation; `false` means "full, poll first".
    fn submit(&mut self, op: BlockOp, tag: u32) -> bool;
    /// Queues a burst in order; returns how many were queued (the rest: "full, poll first").
    fn submit_burst(&mut self, ops: &[(BlockOp, u32)]) -> usize {
        let mut n = 0;
        for &(op, tag) in ops {
            if !self.submit(op, tag) {
                break;
            }
            n += 1;
        }
        n
    }
    /// Rings the doorbell for what was queued.
    fn kick(&mut self);
    /// Reports finished tags.
    fn reap(&mut self, on_done: &mut dyn FnMut(u32, Result<(), IoError>));
    /// The namespace's block size, if the target knows it.
    fn block_size(&self, ns: NsId) -> Option<u32>;
}

/// The leanest path: `BlockQueue` calls straight on the queue pair.
pub struct Raw<'q, Q>(pub &'q mut Q);

impl<Q: BlockQueue> BenchTarget for Raw<'_, Q> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> bool {
        self.0.submit(op, tag).is_ok()
    }
    fn kick(&mut self) {
        self.0.flush_submissions();
    }
    fn reap(&mut self, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) {
        self.0.poll(usize::MAX, on_done);
    }
    fn block_size(&self, ns: NsId) -> Option<u32> {
        self.0.block_size(ns)
    }
}

/// Drives `q` with `cfg` for its duration: keeps `qd` operations in flight, one doorbell per
/// burst, and measures each operation's latency from submit to completion with the TSC.
/// `bufs` holds `qd` buffers of `cfg.bs` bytes, one per in-flight slot.
pub fn bench<C: Clock>(
    q: &mut dyn BenchTarget,
    clock: &C,
    cfg: &BenchCfg,
    bufs: &[DmaRegion],
    hist: &mut [u32; HIST + 1],
) -> BenchResult {
    let bs_dev = q.block_size(cfg.ns).unwrap_or(cfg.block_size) as u64;
    let blocks = (cfg.bs as u64 / bs_dev).max(1) as u32;
    let span = (cfg.blocks / blocks as u64).max(1);
    let mut rng = 0x2545_F491_4F6C_DD1D ^ cfg.lba0;
    let mut seq = 0u64;
    let qd = cfg.qd.min(bufs.len()).max(1);
    let mut issued_at = [0u64; 256];
    let mut free: heapless::Vec<u32, 256> = (0..qd.min(256) as u32).rev().collect();
    let tsc_hz = clock.ticks_per_sec();
    let mut r = BenchResult::default();
    hist.fill(0);
    let start = clock.ticks();
    let end = start + clock.ns_to_ticks(cfg.duration_ns);
    // Latencies are kept in ticks and bucketed by a shift (no division per I/O): a bucket is
    // the largest power-of-two tick count not above 1 µs, converted back when reporting.
    let us_ticks = (tsc_hz / 1_000_000).max(1);
    let shift = 63 - us_ticks.leading_zeros();
    let bucket_ns = clock.ticks_to_ns(1 << shift).max(1);
    let mut stopping = false;
    let mut in_flight = 0usize;
    let mut t = start;
    loop {
        // Fill the queue: every free slot's operation, handed over as one burst.
        let mut burst: heapless::Vec<(BlockOp, u32), 256> = heapless::Vec::new();
        while let Some(tag) = if stopping { None } else { free.pop() } {
            let slot = if cfg.pattern.is_random() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Range reduction by a multiply (no division per I/O).
                ((rng as u128 * span as u128) >> 64) as u64
            } else {
                seq = if seq + 1 >= span { 0 } else { seq + 1 };
                seq
            };
            let lba = cfg.lba0 + slot * blocks as u64;
            let buf = BufRef::whole(&bufs[tag as usize]);
            let op = if cfg.pattern.is_write() {
                BlockOp::Write {
                    ns: cfg.ns,
                    lba,
                    blocks,
                    buf,
                }
            } else {
                BlockOp::Read {
                    ns: cfg.ns,
                    lba,
                    blocks,
                    buf,
                }
            };
            // One timestamp per burst: the I/Os of a burst reach the device with one doorbell.
            issued_at[tag as usize] = t;
            let _ = burst.push((op, tag));
        }
        let queued = q.submit_burst(&burst);
        for &(_, tag) in &burst[queued..] {
            let _ = free.push(tag);
        }
        in_flight += queued;
        // An idle pass (nothing to submit) reads the TSC once, at its end: under TCG every
        // `rdtsc` is a call into the emulator that takes a lock its device thread also takes.
        let t2 = if queued > 0 {
            let t1 = clock.ticks();
            r.t_submit += t1 - t;
            q.kick();
            let t2 = clock.ticks();
            r.t_kick += t2 - t1;
            t2
        } else {
            t
        };
        let before = r.ios;
        // One timestamp per poll pass, taken before it: what the pass reaps had completed by
        // then or during it.
        let t_pass = t2;
        let now_poll = &mut |tag: u32, res: Result<(), IoError>| {
            let lat = t_pass.saturating_sub(issued_at[tag as usize & 255]);
            r.lat_sum_ns += lat;
            hist[((lat >> shift) as usize).min(HIST)] += 1;
            if res.is_err() {
                r.errors += 1;
            }
            r.ios += 1;
            in_flight -= 1;
            let _ = free.push(tag);
        };
        q.reap(now_poll);
        t = clock.ticks();
        if r.ios != before {
            r.t_reap += t - t2;
        } else {
            r.t_idle += t - t2;
        }
        if !stopping && t >= end {
            stopping = true;
        }
        if stopping && in_flight == 0 {
            break;
        }
    }
    r.elapsed_ns = clock.ticks_to_ns(clock.ticks() - start);
    r.lat_sum_ns = clock.ticks_to_ns(r.lat_sum_ns);
    let target = r.ios - r.ios / 100;
    let mut acc = 0u64;
    for (b, n) in hist.iter().enumerate() {
        acc += *n as u64;
        if acc >= target.max(1) {
            r.p99_us = (b as u64 + 1) * bucket_ns / 1000;
            break;
        }
    }
    r
}
