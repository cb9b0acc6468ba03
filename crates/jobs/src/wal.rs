//! The log jobs: `log` appends records to a `keel-wal` log on namespace 1 and syncs every few
//! records, printing each acknowledgement; `recover` runs recovery on whatever the disk holds
//! (after a clean run, a killed QEMU, or power-cut images rebuilt by `cargo xtask test`) and
//! verifies every record it returns byte for byte against the payload the `log` job wrote.
//!
//! `recover images=N stride=S` recovers N logs laid side by side on namespace 1 (log `i` at
//! block `i * S`) in one boot, one line each: the power-cut replay packs many crash states into
//! one disk. A log's layout is relative to its first block, so a log written at block 0 can be
//! recovered anywhere.

use keel_blockdev::{BlockOp, BlockQueue, IoError, NsId, OnDone, SubmitError};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock};
use keel_wal::{Cursor, Wal};
use keel_writer::{Config as WriterConfig, NeverCancel};

use crate::nvme as nvme_jobs;
use crate::{JobError, JobResult};

/// The log's place on namespace 1 and the writer it is written (or reopened) with (`log`,
/// `recover`).
pub const WAL_OPTS: &[OptSpec] = &[
    OptSpec::int("blocks", 4096, "blocks of namespace 1 the log may use"),
    OptSpec::size("buf_size", 16 * 1024, "bytes per writer buffer"),
    OptSpec::int("buffers", 4, "writer buffers (2..=16)"),
    OptSpec::int("in_flight", 4, "writes on the device at once"),
];
/// `log`'s options.
pub const LOG_OPTS: &[OptSpec] = &[
    OptSpec::int("records", 400, "records to append"),
    OptSpec::int("sync_every", 10, "records per sync (acknowledgement)"),
    OptSpec::choice(
        "cadence",
        &["fixed", "varied"],
        "fixed: a sync every `sync_every` records; varied: after 1..=2*sync_every-1 (seeded by the record number)",
    ),
    OptSpec::int(
        "pause_us",
        0,
        "microseconds to wait after each append (a slower run, for tests that kill it)",
    ),
    OptSpec::choice(
        "on_error",
        &["fail", "report"],
        "a device error fails the run, or ends it after reporting what was acknowledged",
    ),
];
/// `recover`'s options.
pub const RECOVER_OPTS: &[OptSpec] = &[
    OptSpec::int(
        "expect",
        0,
        "fail unless at least this many records come back (from each log)",
    ),
    OptSpec::int("images", 1, "logs to recover, side by side"),
    OptSpec::int(
        "stride",
        0,
        "blocks from one log's start to the next (0: blocks)",
    ),
    OptSpec::int(
        "touch_lba",
        0,
        "first zero this block, outside every log (0: don't): QEMU passes a flush down only after a write through it, so recovery's first flush then reaches a write log",
    ),
];
/// `logbench`'s options.
pub const LOGBENCH_OPTS: &[OptSpec] = &[OptSpec::int("ms", 1000, "milliseconds per path")];

/// Largest payload the `log` job writes.
pub const MAX_PAYLOAD: usize = 300;

/// The payload of record `seq`: its length and bytes depend only on `seq` (the host's power-cut
/// oracle rebuilds every record from it).
pub fn payload(seq: u64, buf: &mut [u8; MAX_PAYLOAD]) -> usize {
    let len = 8 + (seq.wrapping_mul(37) % (MAX_PAYLOAD as u64 - 8)) as usize;
    let mut x = seq ^ 0x6b65_656c_5741_4c00;
    for b in buf[..len].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    len
}

/// Whether `log records=.. sync_every=.. cadence=..` syncs right after appending record `seq`
/// (the last record is always followed by a sync). `varied`: with probability 1/`sync_every`,
/// decided by a hash of `seq`, so gaps between syncs vary in length but are reproducible.
pub fn syncs_after(seq: u64, records: u64, sync_every: u64, varied: bool) -> bool {
    let every = sync_every.max(1);
    if seq + 1 == records {
        return true;
    }
    if !varied {
        return (seq + 1).is_multiple_of(every);
    }
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).is_multiple_of(every)
}

fn wal_err<'a>(what: &'static str) -> impl FnOnce(keel_wal::Error) -> JobError<'a> {
    move |e| {
        keel_log::error!("{=str}: {}", what, keel_log::Debug2Format(&e));
        JobError::Failed(what)
    }
}

fn config<'a>(cl: &Cmdline<'a>) -> Result<WriterConfig, JobError<'a>> {
    let blocks = cl.int("blocks")?;
    let buf_size = cl.size("buf_size")? as usize;
    let buffers = cl.int("buffers")? as usize;
    let max_in_flight = cl.int("in_flight")? as usize;
    Ok(WriterConfig {
        buf_size,
        buffers,
        max_in_flight,
        ..WriterConfig::new(1, 0, blocks)
    })
}

/// `log`: format the log, append `records` records, sync after the ones [`syncs_after`] picks.
pub fn log<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let records = cl.int("records")?;
    let sync_every = cl.int("sync_every")?.max(1);
    let varied = cl.choice("cadence")? == "varied";
    // `report`: a device error ends the run normally after saying how many records were
    // acknowledged (for tests that inject errors); `fail` (default): the run fails.
    let on_error = cl.choice("on_error")?;
    let pause_us = cl.int("pause_us")?;
    let cfg = config(cl)?;
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    let clock = p.clock();
    keel_log::info!("job log: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let mut wal =
        Wal::format(qp, p.dma(), p.clock(), NeverCancel, cfg).map_err(wal_err("log: format"))?;
    keel_log::info!("log: formatted, epoch {=u32}", wal.epoch());
    let mut buf = [0u8; MAX_PAYLOAD];
    let t0 = clock.now_ns();
    let mut bytes = 0u64;
    for seq in 0..records {
        let n = payload(seq, &mut buf);
        bytes += n as u64;
        let step = wal.append(&buf[..n]).and_then(|_| {
            if syncs_after(seq, records, sync_every, varied) {
                let acked = wal.sync()?;
                keel_log::info!("log: acked {=u64} records", acked.seq);
            }
            Ok(())
        });
        if pause_us > 0 {
            clock.delay_us(pause_us);
        }
        if let Err(e) = step {
            keel_log::info!(
                "log: stopped by a device error after {=u64} acknowledged records: {}",
                wal.acked().seq,
                keel_log::Debug2Format(&e)
            );
            return if on_error == "report" {
                Ok(())
            } else {
                Err(JobError::Failed("log: device error"))
            };
        }
    }
    let us = (clock.now_ns() - t0) / 1000;
    keel_log::info!(
        "log: appended {=u64} records ({=u64} payload bytes), acknowledged {=u64}, in {=u64} us; writer {}",
        records, bytes, wal.acked().seq, us, keel_log::Debug2Format(&wal.writer().stats())
    );
    Ok(())
}

/// A queue pair lent to one log after another (`recover images=N`): the log owns its queue, and
/// the queue pair outlives each of them.
struct Lent<'q, Q>(&'q mut Q);

impl<Q: BlockQueue> BlockQueue for Lent<'_, Q> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        self.0.submit(op, tag)
    }
    fn flush_submissions(&mut self) {
        self.0.flush_submissions()
    }
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        self.0.poll(max, on_done)
    }
    fn poll_with<D: OnDone>(&mut self, max: usize, on_done: &mut D) -> usize {
        self.0.poll_with(max, on_done)
    }
    fn poll_due(&self) -> bool {
        self.0.poll_due()
    }
    fn pop_timed_out(&mut self) -> Option<keel_blockdev::TimedOut> {
        self.0.pop_timed_out()
    }
    fn depth(&self) -> usize {
        self.0.depth()
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn block_size(&self, ns: NsId) -> Option<u32> {
        self.0.block_size(ns)
    }
    fn num_blocks(&self, ns: NsId) -> Option<u64> {
        self.0.num_blocks(ns)
    }
}

/// What recovering one log found.
enum Found {
    /// No superblock: the format never became durable, so nothing was ever acknowledged.
    NoLog,
    /// Recovery opened the log; records iterated and checked against their payloads.
    Opened {
        rec: keel_wal::Recovered,
        valid: u64,
        corrupt: u64,
    },
}

/// Recovers the log `cfg` places and checks every record it returns.
fn recover_one<B: Board, Q: BlockQueue>(
    q: Q,
    p: &B,
    cfg: WriterConfig,
) -> Result<Found, (&'static str, keel_wal::Error)> {
    let (mut wal, rec) = match Wal::open(q, p.dma(), p.clock(), NeverCancel, cfg) {
        Ok(r) => r,
        Err(keel_wal::Error::NotFormatted) => return Ok(Found::NoLog),
        Err(e) => return Err(("recover: open", e)),
    };
    let mut cur = Cursor::start();
    let (mut got, mut want) = ([0u8; MAX_PAYLOAD], [0u8; MAX_PAYLOAD]);
    let (mut valid, mut corrupt) = (0u64, 0u64);
    while let Some((lsn, len)) = wal
        .next(&mut cur, &mut got)
        .map_err(|e| ("recover: iterate", e))?
    {
        let n = payload(lsn.seq, &mut want);
        if lsn.seq != valid || len != n || got[..len] != want[..n] {
            corrupt += 1;
            keel_log::error!(
                "recover: record {=u64} does not match what was written",
                lsn.seq
            );
        } else {
            valid += 1;
        }
    }
    Ok(Found::Opened {
        rec,
        valid,
        corrupt,
    })
}

/// One Write Zeroes of block `lba` of namespace 1, waited for.
fn zero_block<'a, B: Board, Q: BlockQueue>(q: &mut Q, p: &B, lba: u64) -> JobResult<'a> {
    let op = BlockOp::WriteZeroes {
        ns: 1,
        lba,
        blocks: 1,
    };
    q.submit(op, 0)
        .map_err(|_| JobError::Failed("recover: touch_lba refused"))?;
    q.flush_submissions();
    let clock = p.clock();
    let t0 = clock.now_ns();
    let mut done = None;
    while done.is_none() {
        q.poll(1, &mut |_, r| done = Some(r));
        if clock.now_ns() - t0 > 5_000_000_000 {
            return Err(JobError::Failed("recover: touch_lba timed out"));
        }
    }
    match done {
        Some(Ok(())) => Ok(()),
        _ => Err(JobError::Failed("recover: touch_lba failed")),
    }
}

/// `recover`: recovery, then every record returned is checked against its expected payload.
/// `expect=N` fails the run if fewer than N records come back (N acknowledged ones). With
/// `images=N`, the same for each of N logs `stride` blocks apart, one line per log
/// (`recover: image I: ...`); the run fails if any of them does.
pub fn recover<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let expect = cl.int("expect")?;
    let images = cl.int("images")?.max(1);
    let cfg = config(cl)?;
    let stride = match cl.int("stride")? {
        0 => cfg.lba_count,
        s => s,
    };
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    keel_log::info!("job recover: start");
    let mut qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let touch = cl.int("touch_lba")?;
    if touch > 0 {
        zero_block(&mut qp, p, touch)?;
    }
    let mut failure = None;
    for i in 0..images {
        let cfg = WriterConfig {
            lba_start: i * stride,
            ..cfg
        };
        let found = recover_one(Lent(&mut qp), p, cfg);
        let (records, valid) = match found {
            // The format itself never became durable: there is no log, so no record was ever
            // acknowledged. That is a correct recovery of nothing, unless records were expected.
            Ok(Found::NoLog) => {
                if images == 1 {
                    keel_log::info!(
                        "recover: no log on the device (never formatted durably): 0 records recovered, 0 verified, 0 corrupt; expected at least {=u64}",
                        expect
                    );
                } else {
                    keel_log::info!(
                        "recover: image {=u64}: no log on the device (never formatted durably): 0 records recovered, 0 verified, 0 corrupt",
                        i
                    );
                }
                (0, 0)
            }
            Ok(Found::Opened {
                rec,
                valid,
                corrupt,
            }) => {
                if images == 1 {
                    keel_log::info!(
                        "recover: {=u64} records recovered, {=u64} verified, {=u64} corrupt; end offset {=u64}, new epoch {=u32}; superblock claimed {=u64}; expected at least {=u64}",
                        rec.records, valid, corrupt, rec.end, rec.epoch, rec.committed.seq, expect
                    );
                } else {
                    keel_log::info!(
                        "recover: image {=u64}: {=u64} records recovered, {=u64} verified, {=u64} corrupt; end offset {=u64}, new epoch {=u32}; superblock claimed {=u64}",
                        i, rec.records, valid, corrupt, rec.end, rec.epoch, rec.committed.seq
                    );
                }
                if corrupt > 0 || valid != rec.records {
                    failure.get_or_insert("recovery returned a record that was not written");
                }
                (rec.records, valid)
            }
            Err((what, e)) => {
                if images == 1 {
                    return Err(wal_err(what)(e));
                }
                keel_log::error!(
                    "recover: image {=u64}: failed ({=str}): {}",
                    i,
                    what,
                    keel_log::Debug2Format(&e)
                );
                failure.get_or_insert(what);
                continue;
            }
        };
        if valid < expect || records < expect {
            failure.get_or_insert("recovery lost acknowledged records");
        }
    }
    match failure {
        Some(m) => Err(JobError::Failed(m)),
        None => Ok(()),
    }
}

/// `logbench`: in one boot, the driver's raw sequential write (64 KiB commands, QD 8) against
/// the writer's appends: 4 KiB appends copied into its buffers, and 64 KiB appends from a DMA
/// buffer that bypass the copy. Prints MB/s, the ratio to raw, and bytes copied per byte appended.
pub fn logbench<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    use keel_hal::DmaAllocator;
    use keel_writer::Writer;
    let ms = cl.int("ms")?;
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    let clock = p.clock();
    keel_log::info!("job logbench: start");
    let ns = *ctrl
        .namespace(1)
        .ok_or(JobError::Failed("no namespace 1"))?;
    let third = ns.blocks / 3;
    let limit_ns = ms * 1_000_000;

    // 1. Raw sequential writes through the queue pair.
    let mut raw_qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let mut bufs: heapless::Vec<keel_hal::DmaRegion, 8> = heapless::Vec::new();
    for _ in 0..8 {
        let _ = bufs.push(
            crate::storage::dma(p.dma(), 64 * 1024)
                .map_err(|_| JobError::Failed("DMA pool exhausted"))?,
        );
    }
    let cfg = crate::storage::BenchCfg {
        pattern: crate::storage::Pattern::Write,
        ns: 1,
        bs: 64 * 1024,
        qd: 8,
        duration_ns: limit_ns,
        lba0: 0,
        blocks: third,
        block_size: ns.block_size,
    };
    let mut hist = [0u32; 4097];
    let r = crate::storage::bench(
        &mut crate::storage::Raw(&mut raw_qp),
        &clock,
        &cfg,
        &bufs,
        &mut hist,
    );
    let raw_mbps = r.ios * 64 * 1024 * 1000 / r.elapsed_ns.max(1);

    // 2. and 3. The writer, copying small appends / bypassing with DMA appends.
    let mut results = [(0u64, 0u64, 0u64); 2];
    for (mode, slot) in results.iter_mut().enumerate() {
        let qp = nvme_jobs::qpair(&mut ctrl, p, 2 + mode as u16)?;
        // Shaped like the raw run: 64 KiB commands, up to 8 on the device.
        let wcfg = WriterConfig {
            buf_size: 64 * 1024,
            buffers: 9,
            max_in_flight: 8,
            max_io_bytes: 64 * 1024,
            ..WriterConfig::new(1, third * (1 + mode as u64), third)
        };
        let mut w = Writer::new(qp, p.dma(), p.clock(), NeverCancel, wcfg)
            .map_err(|_| JobError::Failed("writer"))?;
        let chunk = [0x5Au8; 4096];
        let dbuf = p
            .dma()
            .alloc(64 * 1024, 4096)
            .map_err(|_| JobError::Failed("DMA pool exhausted"))?;
        let t0 = clock.now_ns();
        loop {
            let res = if mode == 0 {
                w.append(&chunk)
            } else {
                w.append_dma(&dbuf, 0, dbuf.len())
            };
            match res {
                Ok(()) => {}
                Err(keel_writer::Error::Full) => break,
                Err(_) => return Err(JobError::Failed("writer append")),
            }
            if clock.now_ns() - t0 >= limit_ns {
                break;
            }
        }
        w.sync().map_err(|_| JobError::Failed("writer sync"))?;
        let elapsed = clock.now_ns() - t0;
        let st = w.stats();
        *slot = (
            st.bytes_appended * 1000 / elapsed.max(1),
            st.bytes_copied,
            st.bytes_appended,
        );
    }
    keel_log::info!("logbench | path | MB/s | vs raw | copied per appended byte");
    keel_log::info!(
        "logbench | raw sequential write, 64 KiB x QD8 | {=u64} | 1.00 | -",
        raw_mbps
    );
    for (name, (mbps, copied, appended)) in [
        ("writer, 4 KiB appends (copied)", results[0]),
        ("writer, 64 KiB DMA appends (bypass)", results[1]),
    ] {
        keel_log::info!(
            "logbench | {=str} | {=u64} | {=u64}.{=u64:02} | {=u64}.{=u64:02}",
            name,
            mbps,
            mbps / raw_mbps.max(1),
            mbps * 100 / raw_mbps.max(1) % 100,
            copied / appended.max(1),
            copied * 100 / appended.max(1) % 100
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use keel_cmdline::Cmdline;
    use keel_model::{HostDma, ModelBoard, ModelConfig, NsConfig, NvmeModel};

    use crate::{dispatch, JobError, JOBS};

    fn board() -> ModelBoard {
        let dma = HostDma::new();
        let cfg = ModelConfig {
            namespaces: vec![NsConfig {
                nsid: 1,
                blocks: 8192,
                lba_shift: 9,
            }],
            max_io_queues: 8,
            ..ModelConfig::default()
        };
        let nvme = NvmeModel::new(cfg, dma.clone());
        ModelBoard::new(1, dma, vec![nvme])
    }

    fn run<'a>(b: &ModelBoard, line: &'a str) -> Result<(), JobError<'a>> {
        dispatch(&Cmdline::parse_for(line, "boot", JOBS).unwrap(), b)
    }

    #[test]
    fn logs_side_by_side_recover_one_by_one() {
        let b = board();
        run(&b, "log records=60 sync_every=7 cadence=varied blocks=1000 buf_size=4K buffers=2 in_flight=1").unwrap();
        let m = &b.nvme()[0];
        let log = m.disk_read(1, 0, 1000 * 512);
        // Logs 1 and 2 are copies at blocks 1000 and 2000; block 3000 onwards holds no log.
        m.disk_write(1, 1000 * 512, &log);
        m.disk_write(1, 2000 * 512, &log);
        let line = "recover images=3 stride=1000 blocks=1000 expect=60";
        run(&b, line).unwrap();
        // A fourth image with no log: nothing acknowledged can come back from it.
        assert!(run(&b, "recover images=4 stride=1000 blocks=1000 expect=60").is_err());
        run(&b, "recover images=4 stride=1000 blocks=1000 expect=0").unwrap();
        // An acknowledged record destroyed in log 1 fails the run, whatever is expected;
        // recovery writes nothing there, and the other logs are still recovered.
        m.disk_write(1, 1000 * 512 + 512 + 100, &[0xFF; 64]);
        let sb = m.disk_read(1, 1000 * 512, 512);
        assert!(run(&b, "recover images=3 stride=1000 blocks=1000 expect=0").is_err());
        assert_eq!(m.disk_read(1, 1000 * 512, 512), sb);
        run(&b, "recover images=1 blocks=1000 expect=60").unwrap();
    }
}
