//! # keel-writer: a zero-copy, polled, aligned-buffer writer
//!
//! [`Writer`] turns a stream of appends into large block writes on any
//! [`keel_blockdev::BlockQueue`] (the NVMe driver's `IoQueuePair`, or anything else), in the
//! spirit of neon's `BufferedWriter`, but for a `no_std`, allocator-free, polled world.
//!
//! ## Design
//! * **Stream → blocks.** The writer owns an LBA range `[lba_start, lba_start + lba_count)` of one
//!   namespace and presents it as a byte stream. Stream offset `o` lives at byte `o % bs` of block
//!   `lba_start + o / bs`.
//! * **Buffer pool.** `buffers` DMA buffers of `buf_size` bytes are allocated once, at
//!   construction ([`keel_hal::DmaAllocator`]); nothing is allocated afterwards. Appends are copied
//!   into the *current* buffer; a full buffer is *sealed* and its write submitted in the
//!   background while the next buffer fills. Up to `max_in_flight` writes are on the device at
//!   once. When every buffer is sealed and in flight, `append` polls until one comes back
//!   (backpressure).
//! * **In-order watermarks.** Writes may complete in any order, but [`Writer::written`] (every
//!   byte below it is on the device) advances only over a contiguous prefix of completed writes,
//!   and [`Writer::durable`] only when a Flush command issued after those writes completes.
//! * **Read availability.** [`Writer::read_at`] serves any appended byte at every moment: from
//!   the current buffer, from a sealed buffer (in flight, waiting for a retry, failed or
//!   cancelled — a buffer is recycled only after its write succeeded), or from the device.
//! * **Retries and cancellation.** Errors the [`Config::is_transient`] classifier accepts are
//!   retried forever with exponential backoff timed by [`keel_hal::Clock`]. **Every wait checks
//!   the [`CancelToken`]**: on every polling pass (waiting for a free buffer, an op slot, writes
//!   or a Flush to complete, a queue slot, a raw command) and at least every
//!   [`CANCEL_CHECK_US`] of a backoff sleep. Once it is set, nothing new is submitted (no
//!   retries, no raw writes or flushes), the waiting call returns [`Error::Cancelled`] at its
//!   next check — a stuck device cannot hold it — and appends fail with `Cancelled` from then on.
//!   Commands already on the device are not abandoned: they stay tracked
//!   ([`Writer::in_flight`]), their pool buffers are never reused, and later calls
//!   ([`Writer::poll`]) reap them. Reads keep working: from the buffers, or from the device —
//!   a read asked for after cancellation is submitted once (no retry) and awaited until it
//!   completes or the queue announces its timeout (then it fails with `Timeout`, the bounce
//!   buffer staying reserved until the device is done). [`Writer::append_dma`] waits, even
//!   cancelled, until the device is done with its own commands on the caller's memory (the
//!   region is borrowed only for the call): a timed-out command ends that wait only when the
//!   device completes it late or a controller reset quiesces it.
//! * **Buffers stay the device's until it is done.** A queue reports a tag only when the device
//!   is done with its buffer; a timeout is only an event ([`keel_blockdev::TimedOut`], counted
//!   in [`Stats::timeouts`]). So a write is retried only after its original completed (with an
//!   error, or quiesced by a reset), a retried write is never overtaken by a late original, and
//!   a pool buffer is never refilled while the device may still read it.
//!   Don't drop a writer, or reuse its LBA range, while `in_flight()` is not 0. Permanent errors
//!   surface as [`Error::Io`] and leave the writer read-only too.
//! * **Zero-copy bypass.** [`Writer::append_dma`] takes the caller's DMA-able buffer. The unaligned
//!   head and tail are copied into pool buffers; the block-aligned middle is written to the
//!   device straight from the caller's memory (no copy), in commands of at most
//!   `max_io_bytes`. The call returns once those commands have completed, so the borrow of the
//!   caller's region is sound. [`Stats::bytes_copied`] vs [`Stats::bytes_appended`] shows it.
//!
//! ## Guarantees
//! * No panics on bad input: every misuse is a typed [`Error`].
//! * `written() <= appended()` whenever control is back with the caller, and `durable() <=
//!   written()`.
//! * After [`Writer::sync`] returns `Ok(d)`, every byte below `d` survives power loss (the device
//!   completed a Flush after the writes completed).
//! * A command is never resubmitted while in flight and never forgotten while in flight.
//!
//! A partially filled buffer synced by [`Writer::sync`] is written with zero padding up to the
//! block boundary and rewritten (with more data) by the next write of the same buffer; `sync`
//! waits for that write, so the same blocks are never in two commands at once.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::sync::atomic::{AtomicBool, Ordering};

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, NsId, SubmitError};
use keel_hal::{Clock, DmaAllocator, DmaError, DmaRegion};

/// Most buffers a pool may have.
pub const MAX_BUFFERS: usize = 16;
/// Most write/flush operations tracked at once (in flight, waiting for retry, or failed).
pub const MAX_OPS: usize = 64;
/// The tag used for the writer's own synchronous reads/writes (never an op index).
const RAW_TAG: u32 = u32::MAX - 7;
/// Longest stretch of a backoff sleep between two checks of the [`CancelToken`], in
/// microseconds.
pub const CANCEL_CHECK_US: u64 = 100;

/// A cancellation signal, checked by every wait (see the crate documentation).
pub trait CancelToken {
    /// `true` once cancellation was requested (it should stay `true`).
    fn is_cancelled(&self) -> bool;
}

impl CancelToken for AtomicBool {
    fn is_cancelled(&self) -> bool {
        self.load(Ordering::Acquire)
    }
}

impl<T: CancelToken + ?Sized> CancelToken for &T {
    fn is_cancelled(&self) -> bool {
        (**self).is_cancelled()
    }
}

/// A token that is never set.
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverCancel;

impl CancelToken for NeverCancel {
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// The default classifier: timeouts, aborts, resets and unclassified device statuses are
/// transient; media errors, invalid commands, range and write-protect errors are permanent, and
/// so is **every status the device marked Do Not Retry** (DNR = 1), whatever its kind.
///
/// A retry can only follow the failed command's completion: a queue reports a tag only once
/// the device is done with it (`keel_blockdev::TimedOut` is an event, not a completion), so a
/// retried write is never overtaken by a late original.
///
/// Command Retry Delay: a retry waits at least what the device asked for
/// ([`keel_blockdev::BlockQueue::retry_delay_us`]: the status's CRD selects CRDT1..3 from
/// Identify Controller), and the writer's own backoff otherwise.
pub fn default_is_transient(e: IoError) -> bool {
    if e.dnr() {
        return false;
    }
    matches!(
        e,
        IoError::Timeout | IoError::Aborted | IoError::DeviceReset | IoError::Device { .. }
    )
}

/// Writer parameters.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The namespace the stream lives on.
    pub ns: NsId,
    /// First block of the stream.
    pub lba_start: u64,
    /// Blocks the stream may use.
    pub lba_count: u64,
    /// Bytes per pool buffer (a multiple of the block size).
    pub buf_size: usize,
    /// Pool buffers, `2..=MAX_BUFFERS`.
    pub buffers: usize,
    /// Write/flush commands on the device at once, `1..=MAX_OPS`.
    pub max_in_flight: usize,
    /// Largest bypass write command in bytes (a multiple of the block size).
    pub max_io_bytes: usize,
    /// First retry delay; doubles per attempt up to `backoff_max_us`.
    pub backoff_base_us: u64,
    /// Longest retry delay.
    pub backoff_max_us: u64,
    /// Which errors are retried (forever, until cancelled).
    pub is_transient: fn(IoError) -> bool,
}

impl Config {
    /// Sensible defaults for a stream over `lba_count` blocks from `lba_start` of `ns`.
    pub fn new(ns: NsId, lba_start: u64, lba_count: u64) -> Self {
        Self {
            ns,
            lba_start,
            lba_count,
            buf_size: 16 * 1024,
            buffers: 4,
            max_in_flight: 4,
            max_io_bytes: 64 * 1024,
            backoff_base_us: 10,
            backoff_max_us: 100_000,
            is_transient: default_is_transient,
        }
    }
}

/// Writer errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The configuration is unusable (the reason says which field).
    Config(&'static str),
    /// DMA allocation or access failed.
    Dma(DmaError),
    /// The queue refused a command permanently.
    Submit(SubmitError),
    /// The device failed a command with a permanent error.
    Io(IoError),
    /// The cancellation token was set; the writer is read-only now.
    Cancelled,
    /// The append does not fit in the stream's LBA range.
    Full,
    /// A read past the appended end, a range outside the given buffer, or a raw access into the
    /// stream's own blocks.
    OutOfRange,
    /// `resume` after appends.
    NotFresh,
}

impl From<DmaError> for Error {
    fn from(e: DmaError) -> Self {
        Error::Dma(e)
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes accepted by `append`/`append_dma`.
    pub bytes_appended: u64,
    /// Bytes copied into pool buffers.
    pub bytes_copied: u64,
    /// Bytes written straight from caller memory.
    pub bytes_bypassed: u64,
    /// Write and flush commands submitted (retries included).
    pub commands: u64,
    /// Transient failures that were retried (or would have been, before a cancellation).
    pub retries: u64,
    /// Completions for tags the writer did not have in flight (ignored).
    pub stray_completions: u64,
    /// Commands the queue announced as timed out (still the device's until they complete).
    pub timeouts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Free,
    Current,
    Sealed,
}

struct Buf {
    region: DmaRegion,
    role: Role,
    /// Stream offset of byte 0 (block-aligned).
    start: u64,
    fill: usize,
    /// A write of this buffer is queued or on the device.
    busy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pool(u8),
    Direct { bus: u64 },
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Ready,
    InFlight,
    Done,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    /// Stream range the op writes (for Flush: `start` is the durable target).
    start: u64,
    len: u64,
    /// Bytes transferred (a block multiple).
    io_len: usize,
    st: St,
    attempts: u32,
    retry_at: u64,
}

/// The writer. See the crate documentation.
pub struct Writer<Q: BlockQueue, C: Clock, K: CancelToken> {
    q: Q,
    clock: C,
    cancel: K,
    cfg: Config,
    bs: usize,
    cap: u64,
    bufs: heapless::Vec<Buf, MAX_BUFFERS>,
    cur: Option<usize>,
    bounce: DmaRegion,
    ops: [Option<Op>; MAX_OPS],
    order: heapless::Deque<u8, MAX_OPS>,
    in_flight: usize,
    raw_busy: bool,
    /// The queue announced that the raw command timed out (the device still owns it).
    raw_timed_out: bool,
    raw_result: Option<Result<(), IoError>>,
    appended: u64,
    written: u64,
    durable: u64,
    health: Option<Error>,
    stats: Stats,
}

impl<Q: BlockQueue, C: Clock, K: CancelToken> Writer<Q, C, K> {
    /// Validates `cfg` against the queue and preallocates every buffer.
    pub fn new(
        q: Q,
        dma: &dyn DmaAllocator,
        clock: C,
        cancel: K,
        cfg: Config,
    ) -> Result<Self, Error> {
        let bs = q.block_size(cfg.ns).ok_or(Error::Config("ns"))? as usize;
        let blocks = q.num_blocks(cfg.ns).ok_or(Error::Config("ns"))?;
        if bs == 0 || cfg.buf_size == 0 || cfg.buf_size % bs != 0 {
            return Err(Error::Config("buf_size"));
        }
        if !(2..=MAX_BUFFERS).contains(&cfg.buffers) {
            return Err(Error::Config("buffers"));
        }
        if !(1..=MAX_OPS).contains(&cfg.max_in_flight) {
            return Err(Error::Config("max_in_flight"));
        }
        if cfg.max_io_bytes == 0 || cfg.max_io_bytes % bs != 0 {
            return Err(Error::Config("max_io_bytes"));
        }
        match cfg.lba_start.checked_add(cfg.lba_count) {
            Some(end) if end <= blocks && cfg.lba_count > 0 => {}
            _ => return Err(Error::Config("lba range")),
        }
        let cap = cfg
            .lba_count
            .checked_mul(bs as u64)
            .ok_or(Error::Config("lba range"))?;
        let mut bufs = heapless::Vec::new();
        for _ in 0..cfg.buffers {
            let region = dma.alloc(cfg.buf_size, 4096)?;
            let b = Buf {
                region,
                role: Role::Free,
                start: 0,
                fill: 0,
                busy: false,
            };
            if bufs.push(b).is_err() {
                return Err(Error::Config("buffers"));
            }
        }
        let bounce = dma.alloc(cfg.buf_size, 4096)?;
        bufs[0].role = Role::Current;
        Ok(Self {
            q,
            clock,
            cancel,
            cfg,
            bs,
            cap,
            bufs,
            cur: Some(0),
            bounce,
            ops: [None; MAX_OPS],
            order: heapless::Deque::new(),
            in_flight: 0,
            raw_busy: false,
            raw_timed_out: false,
            raw_result: None,
            appended: 0,
            written: 0,
            durable: 0,
            health: None,
            stats: Stats::default(),
        })
    }

    /// Bytes appended (the stream's logical end).
    pub fn appended(&self) -> u64 {
        self.appended
    }
    /// Every byte below this is on the device (writes completed, in order).
    pub fn written(&self) -> u64 {
        self.written
    }
    /// Every byte below this survived a completed Flush.
    pub fn durable(&self) -> u64 {
        self.durable
    }
    /// Stream capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.cap
    }
    /// The namespace's block size in bytes.
    pub fn block_size(&self) -> usize {
        self.bs
    }
    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// `Err` once cancelled or failed: appends are refused, reads still work.
    pub fn health(&self) -> Result<(), Error> {
        match self.health {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
    /// Commands of this writer on the device right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight + usize::from(self.raw_busy)
    }
    /// The queue pair the writer drives.
    pub fn queue(&self) -> &Q {
        &self.q
    }
    /// The queue, mutably: for device-specific control such as recovery (a controller reset
    /// that quiesces timed-out commands). Submitting or reaping through it behind the writer's
    /// back loses its completions.
    pub fn queue_mut(&mut self) -> &mut Q {
        &mut self.q
    }
    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Starts appending at stream offset `end` of an existing stream (after recovery): bytes
    /// below `end` are taken as durable; the partial last block is loaded so that it is rewritten
    /// intact. Only before the first append.
    pub fn resume(&mut self, end: u64) -> Result<(), Error> {
        if self.appended != 0 || !self.order.is_empty() || self.cur != Some(0) {
            return Err(Error::NotFresh);
        }
        if end > self.cap {
            return Err(Error::Full);
        }
        let bs = self.bs as u64;
        let start = end / bs * bs;
        let fill = (end - start) as usize;
        if fill > 0 {
            let mut tmp = [0u8; 64];
            self.raw_io(self.cfg.lba_start + start / bs, 1, false)?;
            let mut o = 0;
            while o < fill {
                let n = (fill - o).min(tmp.len());
                self.bounce.read_bytes(o, &mut tmp[..n])?;
                self.bufs[0].region.write_bytes(o, &tmp[..n])?;
                o += n;
            }
        }
        self.bufs[0].start = start;
        self.bufs[0].fill = fill;
        self.appended = end;
        self.written = end;
        self.durable = end;
        Ok(())
    }

    /// Appends `data` (copied into pool buffers). On `Err`, a prefix may have been appended;
    /// [`Writer::appended`] tells how much.
    pub fn append(&mut self, data: &[u8]) -> Result<(), Error> {
        self.health()?;
        if self.appended.saturating_add(data.len() as u64) > self.cap {
            return Err(Error::Full);
        }
        let mut rest = data;
        while !rest.is_empty() {
            let c = self.current()?;
            let b = &mut self.bufs[c];
            let n = (self.cfg.buf_size - b.fill).min(rest.len());
            b.region.write_bytes(b.fill, &rest[..n])?;
            b.fill += n;
            self.appended += n as u64;
            self.stats.bytes_copied += n as u64;
            self.stats.bytes_appended += n as u64;
            rest = &rest[n..];
            if self.bufs[c].fill == self.cfg.buf_size {
                self.seal(false)?;
            }
        }
        self.pump();
        Ok(())
    }

    /// Appends `len` bytes at `offset` of the caller's DMA region; the block-aligned middle goes
    /// to the device without a copy. Returns once the bypass commands completed.
    pub fn append_dma(
        &mut self,
        region: &DmaRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), Error> {
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => {}
            _ => return Err(Error::OutOfRange),
        }
        self.health()?;
        if self.appended.saturating_add(len as u64) > self.cap {
            return Err(Error::Full);
        }
        let bs = self.bs as u64;
        let head = (((bs - self.appended % bs) % bs) as usize).min(len);
        self.copy_from_region(region, offset, head)?;
        let mid = (len - head) / self.bs * self.bs;
        let bus = region.bus_addr().wrapping_add((offset + head) as u64);
        if mid == 0 || bus % 4 != 0 {
            return self.copy_from_region(region, offset + head, len - head);
        }
        // Close the current buffer: it ends on a block boundary now.
        if let Some(c) = self.cur {
            if self.bufs[c].fill > 0 {
                self.seal(false)?;
            } else if !self.bufs[c].busy {
                self.bufs[c].role = Role::Free;
                self.cur = None;
            }
        }
        let base = self.appended;
        let mut done = 0usize;
        while done < mid {
            let n = (mid - done).min(self.cfg.max_io_bytes);
            let op = Op {
                kind: Kind::Direct {
                    bus: bus + done as u64,
                },
                start: base + done as u64,
                len: n as u64,
                io_len: n,
                st: St::Ready,
                attempts: 0,
                retry_at: 0,
            };
            if let Err(e) = self.enqueue(op) {
                self.finish_bypass_error(base);
                return Err(e);
            }
            done += n;
        }
        let end = base + mid as u64;
        if let Err(e) = self.wait(|w| w.written >= end) {
            self.finish_bypass_error(base);
            return Err(e);
        }
        self.appended = end;
        self.stats.bytes_bypassed += mid as u64;
        self.stats.bytes_appended += mid as u64;
        self.copy_from_region(region, offset + head + mid, len - head - mid)
    }

    fn finish_bypass_error(&mut self, base: u64) {
        // The device may still be reading the caller's region, which is borrowed only for this
        // call: wait until it reported every bypass command it holds, whatever the token says
        // (nothing is retried or submitted meanwhile; the queue's command timeout bounds it).
        while self
            .ops
            .iter()
            .flatten()
            .any(|o| matches!(o.kind, Kind::Direct { .. }) && o.st == St::InFlight)
        {
            self.pump();
        }
        // Bypass bytes count as appended only as far as they are contiguously on the device.
        self.appended = base.max(self.written);
        self.stats.bytes_appended += self.appended - base;
        self.stats.bytes_bypassed += self.appended - base;
    }

    fn copy_from_region(
        &mut self,
        region: &DmaRegion,
        offset: usize,
        len: usize,
    ) -> Result<(), Error> {
        let mut tmp = [0u8; 256];
        let mut o = 0;
        while o < len {
            let n = (len - o).min(tmp.len());
            region.read_bytes(offset + o, &mut tmp[..n])?;
            self.append(&tmp[..n])?;
            o += n;
        }
        Ok(())
    }

    /// Writes out everything appended, then issues a device Flush; returns the durable end once
    /// the Flush completed.
    pub fn sync(&mut self) -> Result<u64, Error> {
        let target = self.write_out()?;
        if self.durable >= target {
            return Ok(self.durable);
        }
        self.enqueue(Op {
            kind: Kind::Flush,
            start: target,
            len: 0,
            io_len: 0,
            st: St::Ready,
            attempts: 0,
            retry_at: 0,
        })?;
        self.wait(|w| w.durable >= target)?;
        Ok(self.durable)
    }

    /// Submits the current buffer (even if partial) and waits until everything appended is
    /// written (not necessarily durable). Returns the written end.
    pub fn write_out(&mut self) -> Result<u64, Error> {
        self.health()?;
        let target = self.appended;
        if self.written < target {
            if let Some(c) = self.cur {
                let b = &self.bufs[c];
                if b.fill > 0 && !b.busy && b.start + b.fill as u64 > self.written {
                    self.seal(true)?;
                }
            }
            self.wait(|w| w.written >= target)?;
        }
        Ok(self.written)
    }

    /// Drives the device: submits queued writes and retries that are due, reaps completions,
    /// advances the watermarks. `append` calls it; call it from an idle loop too.
    pub fn poll(&mut self) {
        self.pump();
    }

    /// Copies `dst.len()` appended bytes at stream offset `off` into `dst` from wherever they
    /// are: a pool buffer or the device. Works after cancellation and permanent errors.
    pub fn read_at(&mut self, off: u64, dst: &mut [u8]) -> Result<(), Error> {
        match off.checked_add(dst.len() as u64) {
            Some(end) if end <= self.appended => {}
            _ => return Err(Error::OutOfRange),
        }
        let mut p = 0usize;
        while p < dst.len() {
            let pos = off + p as u64;
            let want = dst.len() - p;
            // Memory first: the current buffer, then sealed ones.
            let mut hit = None;
            let mut next_mem = u64::MAX;
            for (i, b) in self.bufs.iter().enumerate() {
                if b.role == Role::Free || b.fill == 0 {
                    continue;
                }
                let end = b.start + b.fill as u64;
                if b.start <= pos && pos < end && (hit.is_none() || b.role == Role::Current) {
                    hit = Some(i);
                } else if b.start > pos {
                    next_mem = next_mem.min(b.start);
                }
            }
            if let Some(i) = hit {
                let b = &self.bufs[i];
                let n = ((b.start + b.fill as u64 - pos) as usize).min(want);
                b.region
                    .read_bytes((pos - b.start) as usize, &mut dst[p..p + n])?;
                p += n;
                continue;
            }
            let n = self.read_device(pos, &mut dst[p..], next_mem)?;
            p += n;
        }
        Ok(())
    }

    /// Reads stream bytes straight from the device (no buffers consulted, no appended-end
    /// check; for recovery scans). Fills all of `dst`.
    pub fn read_device_at(&mut self, off: u64, dst: &mut [u8]) -> Result<(), Error> {
        match off.checked_add(dst.len() as u64) {
            Some(end) if end <= self.cap => {}
            _ => return Err(Error::OutOfRange),
        }
        let mut p = 0;
        while p < dst.len() {
            p += self.read_device(off + p as u64, &mut dst[p..], u64::MAX)?;
        }
        Ok(())
    }

    /// One device read into the bounce buffer; copies at most up to `limit`. Returns bytes copied.
    fn read_device(&mut self, pos: u64, dst: &mut [u8], limit: u64) -> Result<usize, Error> {
        let bs = self.bs as u64;
        let first = pos / bs;
        let skip = (pos % bs) as usize;
        let n = dst
            .len()
            .min(self.cfg.buf_size - skip)
            .min((limit.saturating_sub(pos)).min(usize::MAX as u64) as usize);
        if n == 0 {
            return Err(Error::OutOfRange);
        }
        let blocks = (skip + n).div_ceil(self.bs);
        self.raw_io(self.cfg.lba_start + first, blocks as u32, false)?;
        self.bounce.read_bytes(skip, &mut dst[..n])?;
        Ok(n)
    }

    /// Synchronous read of `dst.len()` bytes (a block multiple, at most `buf_size`) at absolute
    /// `lba`, outside the stream's range (for a superblock). Retries transient errors.
    pub fn raw_read(&mut self, lba: u64, dst: &mut [u8]) -> Result<(), Error> {
        let blocks = self.raw_check(lba, dst.len())?;
        self.raw_io(lba, blocks, false)?;
        self.bounce.read_bytes(0, dst)?;
        Ok(())
    }

    /// Synchronous write, like [`Writer::raw_read`]; follow with [`Writer::sync`] or
    /// [`Writer::device_flush`] for durability.
    pub fn raw_write(&mut self, lba: u64, src: &[u8]) -> Result<(), Error> {
        let blocks = self.raw_check(lba, src.len())?;
        self.bounce.write_bytes(0, src)?;
        self.raw_io(lba, blocks, true)
    }

    /// A device Flush (without writing buffers out).
    pub fn device_flush(&mut self) -> Result<(), Error> {
        self.raw_op(BlockOp::Flush { ns: self.cfg.ns })
    }

    fn raw_check(&self, lba: u64, len: usize) -> Result<u32, Error> {
        if len == 0 || len % self.bs != 0 || len > self.cfg.buf_size {
            return Err(Error::OutOfRange);
        }
        let blocks = (len / self.bs) as u64;
        let end = lba.checked_add(blocks).ok_or(Error::OutOfRange)?;
        if end > self.cfg.lba_start && lba < self.cfg.lba_start + self.cfg.lba_count {
            return Err(Error::OutOfRange);
        }
        Ok(blocks as u32)
    }

    fn raw_io(&mut self, lba: u64, blocks: u32, write: bool) -> Result<(), Error> {
        let buf = BufRef::new(&self.bounce, 0, blocks as usize * self.bs)
            .map_err(|_| Error::OutOfRange)?;
        let ns = self.cfg.ns;
        let op = if write {
            BlockOp::Write {
                ns,
                lba,
                blocks,
                buf,
            }
        } else {
            BlockOp::Read {
                ns,
                lba,
                blocks,
                buf,
            }
        };
        self.raw_op(op)
    }

    /// Runs one command under `RAW_TAG` to completion, retrying transient errors with backoff.
    ///
    /// Cancellation: a raw write or flush is refused once the token is set; every wait below
    /// (a queue slot, the completion, a backoff) ends with `Cancelled` when the token is set
    /// during it. A read asked for after cancellation (read availability) is submitted once and
    /// its completion awaited, never retried.
    fn raw_op(&mut self, op: BlockOp) -> Result<(), Error> {
        let late = self.cancel.is_cancelled();
        if late && !matches!(op, BlockOp::Read { .. }) {
            return Err(self.cancelled());
        }
        if self.raw_busy {
            // A cancelled wait left the previous raw command on the device: the bounce buffer
            // and the tag are still its own until it is reaped.
            self.pump();
            if self.raw_busy {
                return Err(self.cancelled());
            }
        }
        let mut attempts = 0u32;
        let mut full = false;
        loop {
            match self.q.submit(op, RAW_TAG) {
                Ok(()) => {
                    self.raw_busy = true;
                    self.raw_timed_out = false;
                    self.raw_result = None;
                    self.q.flush_submissions();
                }
                Err(SubmitError::QueueFull) => {
                    // Polling frees slots; after one more try a cancellation ends the wait.
                    if full && self.cancel.is_cancelled() {
                        return Err(self.cancelled());
                    }
                    full = true;
                    self.pump();
                    continue;
                }
                Err(SubmitError::DeviceUnavailable) => {
                    attempts += 1;
                    self.backoff(attempts)?;
                    continue;
                }
                Err(e) => return Err(Error::Submit(e)),
            }
            while self.raw_busy {
                self.pump();
                if self.raw_busy && late && self.raw_timed_out {
                    // A read asked for after cancellation gives up once the queue says its
                    // command timed out; the bounce buffer and the tag stay reserved
                    // (`raw_busy`) until the device is done with them.
                    return Err(Error::Io(IoError::Timeout));
                }
                if self.raw_busy && !late && self.cancel.is_cancelled() {
                    // The command stays the writer's: `raw_busy` keeps the bounce buffer and the
                    // tag reserved until a later pump reaps it.
                    return Err(self.cancelled());
                }
            }
            match self.raw_result.take() {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) if (self.cfg.is_transient)(e) => {
                    self.stats.retries += 1;
                    attempts += 1;
                    let asked = e.status().map_or(0, |st| self.q.retry_delay_us(st));
                    self.backoff_at_least(attempts, asked)?;
                }
                Some(Err(e)) => return Err(Error::Io(e)),
                None => return Err(Error::Io(IoError::Aborted)),
            }
        }
    }

    /// Marks the writer cancelled; returns `Error::Cancelled`.
    fn cancelled(&mut self) -> Error {
        self.fail(Error::Cancelled);
        Error::Cancelled
    }

    /// The backoff before retry `attempts`, ended early by cancellation.
    fn backoff(&mut self, attempts: u32) -> Result<(), Error> {
        self.backoff_at_least(attempts, 0)
    }

    /// The backoff before retry `attempts`, at least `asked_us` (the device's Command Retry
    /// Delay), ended early by cancellation.
    fn backoff_at_least(&mut self, attempts: u32, asked_us: u64) -> Result<(), Error> {
        let us = self.backoff_us(attempts).max(asked_us);
        let until = self.clock.now_ns().saturating_add(us.saturating_mul(1000));
        self.sleep_until(until)
    }

    /// Sleeps until `until_ns`, checking the token at least every [`CANCEL_CHECK_US`].
    fn sleep_until(&mut self, until_ns: u64) -> Result<(), Error> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(self.cancelled());
            }
            let now = self.clock.now_ns();
            if now >= until_ns {
                return Ok(());
            }
            self.clock
                .delay_us((until_ns - now).div_ceil(1000).min(CANCEL_CHECK_US));
        }
    }

    fn backoff_us(&self, attempts: u32) -> u64 {
        let shift = attempts.saturating_sub(1).min(20);
        self.cfg
            .backoff_base_us
            .saturating_mul(1u64 << shift)
            .min(self.cfg.backoff_max_us)
    }

    /// The current buffer, waiting for a free one if needed.
    fn current(&mut self) -> Result<usize, Error> {
        if let Some(c) = self.cur {
            if self.bufs[c].busy {
                self.wait(|w| w.cur.is_some_and(|c| !w.bufs[c].busy))?;
            }
            return Ok(c);
        }
        self.wait(|w| w.bufs.iter().any(|b| b.role == Role::Free && !b.busy))?;
        let i = self
            .bufs
            .iter()
            .position(|b| b.role == Role::Free && !b.busy)
            .ok_or(Error::Config("buffers"))?;
        let b = &mut self.bufs[i];
        b.role = Role::Current;
        b.start = self.appended;
        b.fill = 0;
        self.cur = Some(i);
        Ok(i)
    }

    /// Queues the write of the current buffer. `keep`: it stays current (partial sync).
    fn seal(&mut self, keep: bool) -> Result<(), Error> {
        let Some(c) = self.cur else { return Ok(()) };
        let b = &self.bufs[c];
        let io_len = b.fill.div_ceil(self.bs) * self.bs;
        if io_len > b.fill {
            // Zero the padding so the device never sees stale bytes past the end.
            b.region.fill(b.fill, io_len - b.fill, 0)?;
        }
        let op = Op {
            kind: Kind::Pool(c as u8),
            start: b.start,
            len: b.fill as u64,
            io_len,
            st: St::Ready,
            attempts: 0,
            retry_at: 0,
        };
        // Mark first: `enqueue` pumps, and the write may complete before it returns.
        let b = &mut self.bufs[c];
        b.busy = true;
        if !keep {
            b.role = Role::Sealed;
            self.cur = None;
        }
        let r = self.enqueue(op);
        if r.is_err() {
            // Not queued: the data stays readable in the buffer, which is never reused.
            self.bufs[c].role = Role::Sealed;
            self.cur = None;
        }
        r
    }

    fn enqueue(&mut self, op: Op) -> Result<(), Error> {
        if self.order.len() >= MAX_OPS {
            self.wait(|w| w.order.len() < MAX_OPS)?;
        }
        let i = self
            .ops
            .iter()
            .position(Option::is_none)
            .ok_or(Error::Config("ops"))?;
        self.ops[i] = Some(op);
        self.order
            .push_back(i as u8)
            .map_err(|_| Error::Config("ops"))?;
        self.pump();
        Ok(())
    }

    /// Pumps until `done`; until the writer failed and has nothing on the device; or, once
    /// cancelled, at once (commands still on the device stay tracked and are reaped later).
    fn wait(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), Error> {
        loop {
            self.pump();
            if done(self) {
                return Ok(());
            }
            if let Some(e) = self.health {
                if self.in_flight == 0 || e == Error::Cancelled || self.cancel.is_cancelled() {
                    return Err(e);
                }
            }
            if self.in_flight == 0 {
                // Only retries waiting for their time: sleep until the first is due.
                let now = self.clock.now_ns();
                let due = self
                    .ops
                    .iter()
                    .flatten()
                    .filter(|o| o.st == St::Ready)
                    .map(|o| o.retry_at)
                    .min();
                match due {
                    Some(t) if t > now => self.sleep_until(t)?,
                    Some(_) => {}
                    None => return Err(Error::Config("nothing to wait for")),
                }
            }
        }
    }

    fn fail(&mut self, e: Error) {
        if self.health.is_none() {
            self.health = Some(e);
        }
    }

    fn pump(&mut self) {
        if self.health.is_none() && self.cancel.is_cancelled() {
            self.health = Some(Error::Cancelled);
        }
        let now = self.clock.now_ns();
        let mut submitted = false;
        for k in 0..self.order.len() {
            let Some(&idx) = self.order.iter().nth(k) else {
                break;
            };
            let Some(mut op) = self.ops[idx as usize] else {
                continue;
            };
            if op.st != St::Ready {
                continue;
            }
            if self.health.is_some() {
                op.st = St::Cancelled;
                self.ops[idx as usize] = Some(op);
                continue;
            }
            if op.retry_at > now || (op.kind == Kind::Flush && k != 0) {
                continue;
            }
            if self.in_flight >= self.cfg.max_in_flight {
                break;
            }
            let ns = self.cfg.ns;
            let lba = self.cfg.lba_start + op.start / self.bs as u64;
            let blocks = (op.io_len / self.bs) as u32;
            let bop = match op.kind {
                Kind::Flush => BlockOp::Flush { ns },
                Kind::Pool(b) => match BufRef::new(&self.bufs[b as usize].region, 0, op.io_len) {
                    Ok(buf) => BlockOp::Write {
                        ns,
                        lba,
                        blocks,
                        buf,
                    },
                    Err(_) => {
                        op.st = St::Failed;
                        self.ops[idx as usize] = Some(op);
                        self.fail(Error::OutOfRange);
                        continue;
                    }
                },
                Kind::Direct { bus } => BlockOp::Write {
                    ns,
                    lba,
                    blocks,
                    buf: BufRef::from_bus(bus, op.io_len),
                },
            };
            match self.q.submit(bop, u32::from(idx)) {
                Ok(()) => {
                    op.st = St::InFlight;
                    self.in_flight += 1;
                    self.stats.commands += 1;
                    submitted = true;
                }
                Err(SubmitError::QueueFull) => break,
                Err(SubmitError::DeviceUnavailable) => {
                    op.attempts += 1;
                    op.retry_at = now + self.backoff_us(op.attempts) * 1000;
                }
                Err(e) => {
                    op.st = St::Failed;
                    self.fail(Error::Submit(e));
                }
            }
            self.ops[idx as usize] = Some(op);
        }
        if submitted {
            self.q.flush_submissions();
        }
        // Reap.
        let mut done: heapless::Vec<(u32, Result<(), IoError>), 80> = heapless::Vec::new();
        self.q.poll(MAX_OPS, &mut |t, r| {
            let _ = done.push((t, r));
        });
        // Timeout events: not completions. The command, its buffer and (for a write) its blocks
        // stay the device's until its completion comes; nothing is retried before that.
        while let Some(t) = self.q.pop_timed_out() {
            self.stats.timeouts += 1;
            if t.tag == RAW_TAG && self.raw_busy {
                self.raw_timed_out = true;
            }
        }
        let now = self.clock.now_ns();
        for (tag, r) in done {
            if tag == RAW_TAG && self.raw_busy {
                self.raw_busy = false;
                self.raw_result = Some(r);
                continue;
            }
            let slot = self.ops.get_mut(tag as usize).and_then(Option::as_mut);
            let Some(op) = slot.filter(|o| o.st == St::InFlight) else {
                self.stats.stray_completions += 1;
                continue;
            };
            self.in_flight -= 1;
            match r {
                Ok(()) => {
                    op.st = St::Done;
                    if let Kind::Pool(b) = op.kind {
                        let b = &mut self.bufs[b as usize];
                        b.busy = false;
                        if b.role == Role::Sealed {
                            b.role = Role::Free;
                        }
                    }
                }
                Err(e) if (self.cfg.is_transient)(e) => {
                    op.attempts += 1;
                    self.stats.retries += 1;
                    if self.cancel.is_cancelled() || self.health.is_some() {
                        op.st = St::Cancelled;
                        if self.health.is_none() {
                            self.health = Some(Error::Cancelled);
                        }
                    } else {
                        op.st = St::Ready;
                        let shift = op.attempts.saturating_sub(1).min(20);
                        let us = self
                            .cfg
                            .backoff_base_us
                            .saturating_mul(1u64 << shift)
                            .min(self.cfg.backoff_max_us)
                            .max(e.status().map_or(0, |st| self.q.retry_delay_us(st)));
                        op.retry_at = now.saturating_add(us.saturating_mul(1000));
                    }
                }
                Err(e) => {
                    op.st = St::Failed;
                    if self.health.is_none() {
                        self.health = Some(Error::Io(e));
                    }
                }
            }
        }
        // Advance the watermarks over the completed prefix.
        while let Some(&idx) = self.order.front() {
            match self.ops[idx as usize] {
                Some(op) if op.st == St::Done => {
                    if op.kind == Kind::Flush {
                        self.durable = self.durable.max(op.start);
                    } else {
                        self.written = self.written.max(op.start + op.len);
                    }
                    self.ops[idx as usize] = None;
                    self.order.pop_front();
                }
                None => {
                    self.order.pop_front();
                }
                _ => break,
            }
        }
    }
}
