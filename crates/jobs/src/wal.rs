//! The log jobs: `log` appends records to a `keel-wal` log on namespace 1 and syncs every few
//! records, printing each acknowledgement; `recover` runs recovery on whatever the disk holds
//! (after a clean run, a killed QEMU, or a power-cut image rebuilt by `cargo xtask test`) and
//! verifies every record it returns byte for byte against the payload the `log` job wrote.

use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock};
use keel_wal::{Cursor, Wal};
use keel_writer::{Config as WriterConfig, NeverCancel};

use crate::nvme as nvme_jobs;
use crate::{JobError, JobResult};

/// The log's place on namespace 1 (`log`, `recover`).
pub const WAL_OPTS: &[OptSpec] = &[OptSpec::int(
    "blocks",
    4096,
    "blocks of namespace 1 the log may use",
)];
/// `log`'s options.
pub const LOG_OPTS: &[OptSpec] = &[
    OptSpec::int("records", 400, "records to append"),
    OptSpec::int("sync_every", 10, "records per sync (acknowledgement)"),
    OptSpec::choice(
        "on_error",
        &["fail", "report"],
        "a device error fails the run, or ends it after reporting what was acknowledged",
    ),
];
/// `recover`'s options.
pub const RECOVER_OPTS: &[OptSpec] = &[OptSpec::int(
    "expect",
    0,
    "fail unless at least this many records come back",
)];
/// `logbench`'s options.
pub const LOGBENCH_OPTS: &[OptSpec] = &[OptSpec::int("ms", 1000, "milliseconds per path")];

/// Largest payload the `log` job writes.
const MAX_PAYLOAD: usize = 300;

/// The payload of record `seq`: its length and bytes depend only on `seq`.
fn payload(seq: u64, buf: &mut [u8; MAX_PAYLOAD]) -> usize {
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

fn wal_err<'a>(what: &'static str) -> impl FnOnce(keel_wal::Error) -> JobError<'a> {
    move |e| {
        keel_log::error!("{=str}: {}", what, keel_log::Debug2Format(&e));
        JobError::Failed(what)
    }
}

fn config<'a>(cl: &Cmdline<'a>) -> Result<WriterConfig, JobError<'a>> {
    let blocks = cl.int("blocks")?;
    Ok(WriterConfig::new(1, 0, blocks))
}

/// `log`: format the log, append `records` records, sync every `sync_every`.
pub fn log<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let records = cl.int("records")?;
    let sync_every = cl.int("sync_every")?.max(1);
    // `report`: a device error ends the run normally after saying how many records were
    // acknowledged (for tests that inject errors); `fail` (default): the run fails.
    let on_error = cl.choice("on_error")?;
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
            if (seq + 1) % sync_every == 0 || seq + 1 == records {
                let acked = wal.sync()?;
                keel_log::info!("log: acked {=u64} records", acked.seq);
            }
            Ok(())
        });
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

/// `recover`: recovery, then every record returned is checked against its expected payload.
/// `expect=N` fails the run if fewer than N records come back (N acknowledged ones).
pub fn recover<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let expect = cl.int("expect")?;
    let cfg = config(cl)?;
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    keel_log::info!("job recover: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let (mut wal, rec) = match Wal::open(qp, p.dma(), p.clock(), NeverCancel, cfg) {
        Ok(r) => r,
        // The format itself never became durable: there is no log, so no record was ever
        // acknowledged. That is a correct recovery of nothing, unless records were expected.
        Err(keel_wal::Error::NotFormatted) => {
            keel_log::info!(
                "recover: no log on the device (never formatted durably): 0 records recovered, 0 verified, 0 corrupt; expected at least {=u64}",
                expect
            );
            return if expect == 0 {
                Ok(())
            } else {
                Err(JobError::Failed("recovery lost acknowledged records"))
            };
        }
        Err(e) => return Err(wal_err("recover: open")(e)),
    };
    let mut cur = Cursor::start();
    let (mut got, mut want) = ([0u8; MAX_PAYLOAD], [0u8; MAX_PAYLOAD]);
    let mut valid = 0u64;
    let mut corrupt = 0u64;
    while let Some((lsn, len)) = wal
        .next(&mut cur, &mut got)
        .map_err(wal_err("recover: iterate"))?
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
    keel_log::info!(
        "recover: {=u64} records recovered, {=u64} verified, {=u64} corrupt; end offset {=u64}, new epoch {=u32}; expected at least {=u64}",
        rec.records, valid, corrupt, rec.end, rec.epoch, expect
    );
    if corrupt > 0 || valid != rec.records {
        return Err(JobError::Failed(
            "recovery returned a record that was not written",
        ));
    }
    if valid < expect {
        return Err(JobError::Failed("recovery lost acknowledged records"));
    }
    Ok(())
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
