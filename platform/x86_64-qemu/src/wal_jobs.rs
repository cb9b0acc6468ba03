//! The log jobs: `log` appends records to a `keel-wal` log on namespace 1 and syncs every few
//! records, printing each acknowledgement; `recover` runs recovery on whatever the disk holds
//! (after a clean run, a killed QEMU, or a power-cut image rebuilt by `cargo xtask test`) and
//! verifies every record it returns byte for byte against the payload the `log` job wrote.

use keel_cmdline::Cmdline;
use keel_wal::{Cursor, Wal};
use keel_writer::{Config as WriterConfig, NeverCancel};

use crate::hw::TscClock;
use crate::jobs::{JobError, Platform};
use crate::nvme_jobs;

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
        keel_log::error!("{=str}: {}", what, defmt::Debug2Format(&e));
        JobError::Failed(what)
    }
}

fn config<'a>(cl: &Cmdline<'a>) -> Result<WriterConfig, JobError<'a>> {
    let blocks = cl.u64("blocks", 4096)?;
    Ok(WriterConfig::new(1, 0, blocks))
}

/// `log`: format the log, append `records` records, sync every `sync_every`.
pub fn log<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let records = cl.u64("records", 400)?;
    let sync_every = cl.u64("sync_every", 10)?.max(1);
    let cfg = config(cl)?;
    let mut ctrl = nvme_jobs::open(p, cl)?;
    cl.finish()?;
    keel_log::info!("job log: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let mut wal =
        Wal::format(qp, &p.dma, TscClock, NeverCancel, cfg).map_err(wal_err("log: format"))?;
    keel_log::info!("log: formatted, epoch {=u32}", wal.epoch());
    let mut buf = [0u8; MAX_PAYLOAD];
    let t0 = crate::time::now_ns();
    let mut bytes = 0u64;
    for seq in 0..records {
        let n = payload(seq, &mut buf);
        bytes += n as u64;
        wal.append(&buf[..n]).map_err(wal_err("log: append"))?;
        if (seq + 1) % sync_every == 0 || seq + 1 == records {
            let acked = wal.sync().map_err(wal_err("log: sync"))?;
            keel_log::info!("log: acked {=u64} records", acked.seq);
        }
    }
    let us = (crate::time::now_ns() - t0) / 1000;
    keel_log::info!(
        "log: appended {=u64} records ({=u64} payload bytes), acknowledged {=u64}, in {=u64} us; writer {}",
        records, bytes, wal.acked().seq, us, defmt::Debug2Format(&wal.writer().stats())
    );
    Ok(())
}

/// `recover`: recovery, then every record returned is checked against its expected payload.
/// `expect=N` fails the run if fewer than N records come back (N acknowledged ones).
pub fn recover<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let expect = cl.u64("expect", 0)?;
    let cfg = config(cl)?;
    let mut ctrl = nvme_jobs::open(p, cl)?;
    cl.finish()?;
    keel_log::info!("job recover: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let (mut wal, rec) = match Wal::open(qp, &p.dma, TscClock, NeverCancel, cfg) {
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
