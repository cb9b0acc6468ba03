//! `zone`: the zoned command set on every zoned namespace of every drive, checked step by
//! step; the records it appends are printed (LBA the device returned, CRC32C) so the host
//! can check the disk image at exactly those LBAs.
//!
//! On each zoned namespace: reset every zone (select all) and check the report (all empty,
//! write pointer at each start); append `records` records of `blocks` blocks to zone 1 with
//! all of them in flight at once (so the device may place them in any order): every returned
//! LBA must lie in zone 1, the records must tile `start .. start + records * blocks` exactly;
//! read each back from its LBA; the report must show the zone implicitly open with the write
//! pointer after the last record; a plain write one block past the write pointer must be
//! refused `ZoneError::InvalidWrite`, one at the write pointer accepted; close / open / finish
//! checked through reports; an append to the full zone refused `ZoneError::Full`; closing an
//! empty zone refused `ZoneError::InvalidTransition`; zone 2 opened then reset (empty again).
//! Zone 1 is left full, with the records in it, for the host. Namespaces that are not zoned
//! get one plain write and read back (the rest of the machine goes on).

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, ZoneError};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, DmaRegion};
use keel_nvme::{parse_zone_report, Namespace, ZoneAction, ZoneDescriptor, ZoneOp, ZoneState};

use crate::nvme::qpair;
use crate::storage::{self, StorageError};
use crate::{JobError, JobResult, Qp};

/// `zone`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int(
        "records",
        8,
        "records appended to zone 1, all in flight at once",
    ),
    OptSpec::int("blocks", 2, "blocks per record"),
];

/// Byte `i` of record `k` appended to namespace `nsid` of drive `drive` (the host recomputes
/// it to check the image): a 16-byte header "KEELZONE", drive, nsid, k, then a pattern.
pub fn record_byte(drive: usize, nsid: u32, k: u32, i: usize) -> u8 {
    const MAGIC: &[u8; 8] = b"KEELZONE";
    match i {
        0..=7 => MAGIC[i],
        8 => drive as u8,
        9 => nsid as u8,
        10..=13 => k.to_le_bytes()[i - 10],
        14 | 15 => 0,
        _ => (storage::pattern(nsid, k as u64, i & !7, 0x7a6f_6e65) >> ((i % 8) * 8)) as u8,
    }
}

fn fail(what: &'static str) -> impl Fn(StorageError) -> JobError<'static> {
    move |e| {
        keel_log::error!("zone: {=str}: {}", what, e);
        JobError::Failed(what)
    }
}

fn check(ok: bool, what: &'static str) -> Result<(), JobError<'static>> {
    if ok {
        Ok(())
    } else {
        keel_log::error!("zone: check failed: {=str}", what);
        Err(JobError::Failed(what))
    }
}

/// Runs one zone operation to completion; returns the appended LBA, if any.
fn zone_op<B: Board>(
    qp: &mut Qp<B>,
    clock: &impl Clock,
    op: ZoneOp,
) -> Result<Option<u64>, StorageError> {
    storage::sync_with(qp, clock, |q, tag| q.submit_zone(op, tag))?;
    Ok(qp.pop_appended().map(|(_, lba)| lba))
}

/// A report of the zones from `from`, parsed (at most 63 zones: one page).
fn report<B: Board>(
    qp: &mut Qp<B>,
    clock: &impl Clock,
    ns: &Namespace,
    from: u64,
    page: &DmaRegion,
    out: &mut [ZoneDescriptor; 63],
) -> Result<usize, JobError<'static>> {
    let z = ns.zoned.ok_or(JobError::Failed("not zoned"))?;
    let buf = BufRef::new(page, 0, 4096).map_err(|_| JobError::Failed("DMA buffer"))?;
    zone_op::<B>(
        qp,
        clock,
        ZoneOp::Report {
            ns: ns.nsid,
            from,
            buf,
        },
    )
    .map_err(fail("report zones"))?;
    let mut bytes = [0u8; 4096];
    page.read_bytes(0, &mut bytes)
        .map_err(|_| JobError::Failed("DMA buffer"))?;
    parse_zone_report(&bytes, &z, from, out).map_err(|e| {
        keel_log::error!("zone: ns {=u32}: bad zone report: {}", ns.nsid, e);
        JobError::Failed("bad zone report")
    })
}

fn expect_zone_err(r: Result<Option<u64>, StorageError>, want: ZoneError) -> bool {
    match r {
        Err(StorageError::Io(e)) if e.zone() == Some(want) => true,
        other => {
            keel_log::error!("zone: expected {}, got {}", want, other);
            false
        }
    }
}

/// `zone`: see the module documentation.
pub fn zone<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let records = cl.int("records")?.clamp(1, 64) as u32;
    let rb = cl.int("blocks")?.clamp(1, 64) as u32;
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    let clock = p.clock();
    keel_log::info!("job zone: start");
    let (mut checks, mut zoned) = (0usize, 0usize);
    for &di in &which {
        let d = &drives.list[di];
        let mut qp = qpair(&mut d.ctrl.lock(), p, 1)?;
        for ns in d.namespaces.iter() {
            let bs = ns.block_size as usize;
            let Some(z) = ns.zoned else {
                if ns.format.refusal().is_some() {
                    keel_log::info!(
                        "zone drive {=usize} ns {=u32} | format {} | refused, skipped",
                        d.index,
                        ns.nsid,
                        ns.format
                    );
                    continue;
                }
                // Not zoned: one block written and read back, so the host sees this drive work.
                let buf = storage::dma(p.dma(), bs).map_err(fail("DMA pool exhausted"))?;
                let v: heapless::Vec<u8, 4096> = (0..bs.min(4096))
                    .map(|i| record_byte(d.index, ns.nsid, 0, i))
                    .collect();
                buf.write_bytes(0, &v)
                    .map_err(|_| JobError::Failed("DMA buffer"))?;
                let op = BlockOp::Write {
                    ns: ns.nsid,
                    lba: 0,
                    blocks: 1,
                    buf: BufRef::whole(&buf),
                };
                storage::sync_op(&mut qp, &clock, op).map_err(fail("plain write"))?;
                keel_log::info!(
                    "zone drive {=usize} ns {=u32} | not zoned | plain write at lba 0 ok",
                    d.index,
                    ns.nsid
                );
                keel_hal::DmaAllocator::free(p.dma(), buf);
                checks += 1;
                continue;
            };
            zoned += 1;
            check(z.zones >= 4, "a zoned namespace of fewer than 4 zones")?;
            check(
                (records * rb) as u64 <= z.zone_size,
                "records do not fit a zone",
            )?;
            let page = storage::dma(p.dma(), 4096).map_err(fail("DMA pool exhausted"))?;
            let rec_bytes = rb as usize * bs;
            let data = storage::dma(p.dma(), records as usize * rec_bytes)
                .map_err(fail("DMA pool exhausted"))?;
            let rdata = storage::dma(p.dma(), rec_bytes).map_err(fail("DMA pool exhausted"))?;
            let mut zs = [ZoneDescriptor::default(); 63];
            let nsid = ns.nsid;
            let manage = |qp: &mut Qp<B>, zone: u64, action, all| {
                zone_op::<B>(
                    qp,
                    &clock,
                    ZoneOp::Manage {
                        ns: nsid,
                        zone,
                        action,
                        all,
                    },
                )
            };

            // 1. Reset all; every zone reported empty with its write pointer at its start.
            manage(&mut qp, 0, ZoneAction::Reset, true).map_err(fail("reset all"))?;
            let n = report::<B>(&mut qp, &clock, ns, 0, &page, &mut zs)?;
            check(
                n as u64 == z.zones.min(63)
                    && zs[..n].iter().enumerate().all(|(i, d)| {
                        d.state == ZoneState::Empty
                            && d.start == i as u64 * z.zone_size
                            && d.write_pointer == Some(d.start)
                    }),
                "after reset all, every zone empty at its start",
            )?;
            checks += 1;

            // 2. Appends to zone 1, all in flight at once.
            let zslba = z.zone_size;
            for k in 0..records {
                let mut rec = [0u8; 512];
                for off in (0..rec_bytes).step_by(512) {
                    for (i, b) in rec.iter_mut().enumerate() {
                        *b = record_byte(d.index, nsid, k, off + i);
                    }
                    data.write_bytes(k as usize * rec_bytes + off, &rec)
                        .map_err(|_| JobError::Failed("DMA buffer"))?;
                }
            }
            let mut lbas = [u64::MAX; 64];
            for k in 0..records {
                let buf = BufRef::new(&data, k as usize * rec_bytes, rec_bytes)
                    .map_err(|_| JobError::Failed("DMA buffer"))?;
                qp.submit_zone(
                    ZoneOp::Append {
                        ns: nsid,
                        zone: zslba,
                        blocks: rb,
                        buf,
                    },
                    k,
                )
                .map_err(|e| {
                    keel_log::error!("zone: append submit: {}", e);
                    JobError::Failed("zone append refused")
                })?;
            }
            qp.flush_submissions();
            let t0 = clock.now_ns();
            let mut done = 0;
            let mut failed: Option<IoError> = None;
            while done < records {
                qp.poll(64, &mut |_, r| {
                    done += 1;
                    if let Err(e) = r {
                        failed = Some(e);
                    }
                });
                while let Some((tag, lba)) = qp.pop_appended() {
                    if let Some(slot) = lbas.get_mut(tag as usize) {
                        *slot = lba;
                    }
                }
                if clock.now_ns() - t0 > 5_000_000_000 {
                    return Err(JobError::Failed("zone appends never completed"));
                }
            }
            if let Some(e) = failed {
                keel_log::error!("zone: append failed: {}", e);
                return Err(JobError::Failed("zone append failed"));
            }
            let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
            let mut covered = [false; 64];
            for k in 0..records {
                let lba = lbas[k as usize];
                let slot = lba.wrapping_sub(zslba) / rb as u64;
                check(
                    lba >= zslba
                        && (lba - zslba) % rb as u64 == 0
                        && slot < records as u64
                        && !covered[slot as usize],
                    "appended records tile the zone's start",
                )?;
                covered[slot as usize] = true;
                // Read back from the LBA the device returned.
                let op = BlockOp::Read {
                    ns: nsid,
                    lba,
                    blocks: rb,
                    buf: BufRef::whole(&rdata),
                };
                storage::sync_op(&mut qp, &clock, op).map_err(fail("read back"))?;
                let mut digest = crc.digest();
                let mut chunk = [0u8; 512];
                for off in (0..rec_bytes).step_by(512) {
                    rdata
                        .read_bytes(off, &mut chunk)
                        .map_err(|_| JobError::Failed("DMA buffer"))?;
                    let same = chunk
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == record_byte(d.index, nsid, k, off + i));
                    check(same, "a record read back from its LBA differs")?;
                    digest.update(&chunk);
                }
                keel_log::info!(
                    "zone append: drive {=usize} ns {=u32} record {=u32} lba {=u64} blocks {=u32} crc32c {=u32:08x}",
                    d.index,
                    nsid,
                    k,
                    lba,
                    rb,
                    digest.finalize()
                );
            }
            checks += 1;
            let wp = zslba + (records * rb) as u64;
            report::<B>(&mut qp, &clock, ns, zslba, &page, &mut zs)?;
            check(
                zs[0].start == zslba
                    && zs[0].state == ZoneState::ImplicitlyOpened
                    && zs[0].write_pointer == Some(wp),
                "after the appends, zone 1 implicitly open, write pointer after the records",
            )?;
            checks += 1;

            // 3. Plain writes: past the write pointer refused, at it accepted.
            let one = BufRef::new(&rdata, 0, bs).map_err(|_| JobError::Failed("DMA buffer"))?;
            let w = |lba| BlockOp::Write {
                ns: nsid,
                lba,
                blocks: 1,
                buf: one,
            };
            let r = storage::sync_op(&mut qp, &clock, w(wp + 1)).map(|()| None);
            check(
                expect_zone_err(r, ZoneError::InvalidWrite),
                "a write past the write pointer not refused InvalidWrite",
            )?;
            storage::sync_op(&mut qp, &clock, w(wp)).map_err(fail("write at the write pointer"))?;
            checks += 2;

            // 4. Close, open, finish, each seen in a report.
            let state = |qp: &mut Qp<B>, zs: &mut [ZoneDescriptor; 63]| {
                report::<B>(qp, &clock, ns, zslba, &page, zs)
                    .map(|_| (zs[0].state, zs[0].write_pointer))
            };
            manage(&mut qp, zslba, ZoneAction::Close, false).map_err(fail("close"))?;
            check(
                state(&mut qp, &mut zs)? == (ZoneState::Closed, Some(wp + 1)),
                "closed",
            )?;
            manage(&mut qp, zslba, ZoneAction::Open, false).map_err(fail("open"))?;
            check(
                state(&mut qp, &mut zs)?.0 == ZoneState::ExplicitlyOpened,
                "explicitly opened",
            )?;
            manage(&mut qp, zslba, ZoneAction::Finish, false).map_err(fail("finish"))?;
            check(state(&mut qp, &mut zs)?.0 == ZoneState::Full, "full")?;
            checks += 3;

            // 5. Append to the full zone; close an empty zone.
            let buf =
                BufRef::new(&data, 0, rec_bytes).map_err(|_| JobError::Failed("DMA buffer"))?;
            let r = zone_op::<B>(
                &mut qp,
                &clock,
                ZoneOp::Append {
                    ns: nsid,
                    zone: zslba,
                    blocks: rb,
                    buf,
                },
            );
            check(
                expect_zone_err(r, ZoneError::Full),
                "an append to a full zone not refused Full",
            )?;
            let r = manage(&mut qp, 3 * z.zone_size, ZoneAction::Close, false);
            check(
                expect_zone_err(r, ZoneError::InvalidTransition),
                "closing an empty zone not refused InvalidTransition",
            )?;
            checks += 2;

            // 6. Zone 2: open, then reset: empty again.
            let z2 = 2 * z.zone_size;
            manage(&mut qp, z2, ZoneAction::Open, false).map_err(fail("open zone 2"))?;
            report::<B>(&mut qp, &clock, ns, z2, &page, &mut zs)?;
            check(zs[0].state == ZoneState::ExplicitlyOpened, "zone 2 opened")?;
            manage(&mut qp, z2, ZoneAction::Reset, false).map_err(fail("reset zone 2"))?;
            report::<B>(&mut qp, &clock, ns, z2, &page, &mut zs)?;
            check(
                zs[0].state == ZoneState::Empty && zs[0].write_pointer == Some(z2),
                "zone 2 reset to empty",
            )?;
            checks += 2;
            keel_log::info!(
                "zone drive {=usize} ns {=u32} | {=u64} zones of {=u64} blocks | {=u32} appends | ok",
                d.index,
                nsid,
                z.zones,
                z.zone_size,
                records
            );
            for r in [page, data, rdata] {
                keel_hal::DmaAllocator::free(p.dma(), r);
            }
        }
        if let Err((e, _)) = d.ctrl.lock().delete_io_qpair(p.dma(), qp) {
            keel_log::warn!("zone drive {=usize}: delete queue pair: {}", d.index, e);
        }
    }
    check(zoned > 0, "no zoned namespace")?;
    keel_log::info!(
        "zone: {=usize} checks passed on {=usize} zoned namespaces",
        checks,
        zoned
    );
    Ok(())
}
