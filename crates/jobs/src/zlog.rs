//! The zoned log jobs (`keel_wal::zoned`): `zlog` and `zrecover`, on namespace 1 of one drive,
//! a zoned namespace.
//!
//! `zlog` opens the log first. Not formatted (a fresh disk): it formats it, appends `records`
//! records ([`payload`]) with Zone Append, `in_flight` at once, syncing every `sync_every`
//! records and printing each acknowledgement (`zlog: acked N`). With `crash_at=K` it stops
//! after record `K`, appends `burst` more records without waiting for them and resets the
//! machine with those appends in flight (`Board::reset_machine`): a crash. Formatted (the boot
//! after that reset, which keeps the zones): it replays the log and verifies every record
//! byte for byte against [`payload`], printing the count (`zlog: replay verified N records`),
//! then appends from the recovered end up to `records` (a new session: a fresh zone, the next
//! epoch), acknowledging as before. `zrecover expect=N` only replays and verifies.

use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::Board;
use keel_wal::zoned::{Error as ZError, Recovered, ZonedConfig, ZonedWal};

use crate::nvme as nvme_jobs;
use crate::{JobError, JobResult, Qp};

/// Where the log is and how it writes (`zlog`, `zrecover`).
pub const ZWAL_OPTS: &[OptSpec] = &[
    OptSpec::int("first_zone", 0, "the log's first zone"),
    OptSpec::int("zones", 16, "zones the log owns"),
    OptSpec::int("in_flight", 8, "zone appends in flight at once"),
];
/// `zlog`'s options.
pub const ZLOG_OPTS: &[OptSpec] = &[
    OptSpec::int("records", 400, "records to append"),
    OptSpec::int("sync_every", 10, "records per sync (acknowledgement)"),
    OptSpec::int(
        "crash_at",
        0,
        "after this record, append `burst` more and reset the machine with them in flight (0: no crash)",
    ),
    OptSpec::int("burst", 8, "records in flight at the crash"),
];
/// `zrecover`'s options.
pub const ZRECOVER_OPTS: &[OptSpec] = &[OptSpec::int(
    "expect",
    0,
    "fail unless at least this many records come back",
)];

/// Largest payload the jobs write.
pub const MAX_PAYLOAD: usize = 1500;

/// The payload of record `seq` (0 to 1500 bytes, so one to four 512-byte blocks): its length
/// and bytes depend only on `seq`, so the host recomputes every record from the image.
pub fn payload(seq: u64, buf: &mut [u8; MAX_PAYLOAD]) -> usize {
    let len = (seq.wrapping_mul(7919) % (MAX_PAYLOAD as u64 + 1)) as usize;
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7a6c_6f67;
    for b in buf[..len].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    len
}

fn zerr<'a>(what: &'static str) -> impl FnOnce(ZError) -> JobError<'a> {
    move |e| {
        keel_log::error!("{=str}: {}", what, keel_log::Debug2Format(&e));
        JobError::Failed(what)
    }
}

fn config<'a, B: Board>(
    cl: &Cmdline<'a>,
    ctrl: &crate::Ctrl<B>,
) -> Result<ZonedConfig, JobError<'a>> {
    let (in_flight, first_zone, zones) = (
        cl.int("in_flight")? as usize,
        cl.int("first_zone")?,
        cl.int("zones")?,
    );
    let ns = ctrl
        .namespace(1)
        .ok_or(JobError::Failed("zlog: no namespace 1"))?;
    let zoned = ns
        .zoned
        .ok_or(JobError::Failed("zlog: namespace 1 is not zoned"))?;
    Ok(ZonedConfig {
        in_flight,
        max_record: MAX_PAYLOAD,
        ..ZonedConfig::new(1, zoned, first_zone, zones)
    })
}

/// Verifies every record the recovered log holds; returns how many.
fn verify<B: Board>(
    wal: &mut ZonedWal<Qp<B>, B::Clock>,
    rec: &Recovered,
) -> Result<u64, JobError<'static>> {
    keel_log::info!(
        "zlog: replay: records {=u64}..{=u64} from {=usize} zones, {=usize} discarded, next epoch {=u32}",
        rec.first,
        rec.end,
        rec.zones,
        rec.discarded,
        rec.epoch
    );
    let mut cur = wal.cursor();
    let (mut buf, mut want) = ([0u8; MAX_PAYLOAD], [0u8; MAX_PAYLOAD]);
    let mut n = 0u64;
    while let Some((seq, len)) = wal
        .next(&mut cur, &mut buf)
        .map_err(zerr("zlog: reading a recovered record"))?
    {
        let wlen = payload(seq, &mut want);
        if seq != rec.first + n || len != wlen || buf[..len] != want[..wlen] {
            keel_log::error!("zlog: record {=u64} differs from its payload", seq);
            return Err(JobError::Failed("zlog: a recovered record differs"));
        }
        n += 1;
    }
    keel_log::info!("zlog: replay verified {=u64} records byte for byte", n);
    Ok(n)
}

/// `zlog`: see the module documentation.
pub fn zlog<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let records = cl.int("records")?;
    let sync_every = cl.int("sync_every")?.max(1);
    let crash_at = cl.int("crash_at")?;
    let burst = cl.int("burst")?;
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    let cfg = config::<B>(cl, &ctrl)?;
    keel_log::info!("job zlog: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let (mut wal, from, crash_at) = match ZonedWal::open(qp, p.dma(), p.clock(), cfg) {
        Ok((mut wal, rec)) => {
            // The boot after a crash: the zones kept the log. Replay it, then go on from its
            // end (a new session, in a fresh zone), without crashing again.
            keel_log::info!("zlog: the log is there: replaying");
            verify::<B>(&mut wal, &rec)?;
            (wal, rec.end, 0)
        }
        Err(ZError::NotFormatted) => {
            // The failed open took its queue pair with it: a new one for the new log.
            let qp = nvme_jobs::qpair(&mut ctrl, p, 2)?;
            let wal =
                ZonedWal::format(qp, p.dma(), p.clock(), cfg).map_err(zerr("zlog: format"))?;
            keel_log::info!(
                "zlog: formatted zones {=u64}..{=u64}, {=u32} B blocks",
                cfg.first_zone,
                cfg.first_zone + cfg.zones,
                wal.block_size() as u32
            );
            (wal, 0, crash_at)
        }
        Err(e) => return Err(zerr("zlog: open")(e)),
    };
    let mut buf = [0u8; MAX_PAYLOAD];
    for seq in from..records {
        let n = payload(seq, &mut buf);
        wal.append(&buf[..n]).map_err(zerr("zlog: append"))?;
        if crash_at != 0 && seq == crash_at {
            for s in seq + 1..seq + 1 + burst {
                let n = payload(s, &mut buf);
                wal.append(&buf[..n]).map_err(zerr("zlog: append"))?;
            }
            keel_log::info!(
                "zlog: crash: {=u64} appended, {=u64} acknowledged; resetting the machine with appends in flight",
                wal.appended(),
                wal.acked()
            );
            p.reset_machine();
            return Err(JobError::Failed("zlog: the board cannot reset the machine"));
        }
        if (seq + 1) % sync_every == 0 || seq + 1 == records {
            let acked = wal.sync().map_err(zerr("zlog: sync"))?;
            keel_log::info!("zlog: acked {=u64}", acked);
        }
    }
    let zones = wal.zones().count();
    keel_log::info!(
        "zlog: appended {=u64} records, acknowledged {=u64}, in {=usize} zones",
        wal.appended(),
        wal.acked(),
        zones
    );
    Ok(())
}

/// `zrecover`: replays the log and verifies every record.
pub fn zrecover<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let expect = cl.int("expect")?;
    let (mut ctrl, _) = nvme_jobs::open(p, cl)?;
    let cfg = config::<B>(cl, &ctrl)?;
    keel_log::info!("job zrecover: start");
    let qp = nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let (mut wal, rec) =
        ZonedWal::open(qp, p.dma(), p.clock(), cfg).map_err(zerr("zrecover: open"))?;
    let n = verify::<B>(&mut wal, &rec)?;
    if n < expect {
        keel_log::error!(
            "zrecover: {=u64} records, expected at least {=u64}",
            n,
            expect
        );
        return Err(JobError::Failed("zrecover: records missing"));
    }
    Ok(())
}
