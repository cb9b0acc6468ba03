//! The NVMe jobs: `selftest`, `scrub`, `scan`, `cfs` and `bench`. Bring-up through
//! `keel-nvme` over the board's MMIO window, DMA memory and clock; the data path is
//! `keel_blockdev::BlockQueue`.

use core::cell::RefCell;

use critical_section::Mutex;
use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, Cores, DmaRegion, PciFunction};

use crate::storage::{self, BenchCfg, BenchResult, Pattern, Shape, StorageError};
use crate::{Ctrl, JobError, JobResult, Qp, MAX_CORES};

/// `selftest`'s options.
pub const SELFTEST_OPTS: &[OptSpec] = &[
    OptSpec::int("ns", 0, "only this namespace (0: every one)"),
    OptSpec::int("seed", 0x6b65_656c, "seed of the data pattern"),
];
/// A namespace range (`scrub`, `scan`).
pub const RANGE_OPTS: &[OptSpec] = &[
    OptSpec::int("ns", 1, "namespace"),
    OptSpec::int("lba", 0, "first block"),
    OptSpec::int("blocks", 0, "blocks (0: to the end)"),
];
/// `scan`'s options.
pub const SCAN_OPTS: &[OptSpec] = &[
    OptSpec::int("chunk", 64, "blocks per read before bisecting"),
    OptSpec::flag("write", false, "write a pattern instead of reading"),
];
/// `cfs`'s options.
pub const CFS_OPTS: &[OptSpec] = &[OptSpec::int(
    "inflight",
    16,
    "reads in flight when the controller fails",
)];
/// `bench`'s options.
pub const BENCH_OPTS: &[OptSpec] = &[
    OptSpec::choice("pattern", &["randread", "randwrite", "read", "write"], "access pattern"),
    OptSpec::size("bs", 4096, "bytes per I/O"),
    OptSpec::int("qd", 32, "I/Os in flight per core (1..=255)"),
    OptSpec::int("secs", 2, "seconds"),
    OptSpec::int("ms", 0, "milliseconds instead of secs (when not 0)"),
    OptSpec::int("cores", 1, "cores, each with its own queue pair"),
    OptSpec::int("ns", 1, "namespace"),
    OptSpec::choice(
        "raw",
        &["off", "on", "both", "ceiling"],
        "off: full stack; on: raw queue-pair loop; both: interleaved rounds of full, raw and ceiling; ceiling: the device's own",
    ),
];

/// Queue depth of every I/O queue pair (entries; depth - 1 commands in flight).
/// 512 so that with lazy CQ doorbells (half the ring is completion slack) 255 commands fit.
const QUEUE_ENTRIES: u16 = 512;

fn fail<'a>(what: &'static str) -> impl FnOnce(StorageError) -> JobError<'a> {
    move |e| {
        keel_log::error!("{=str}: {}", what, e);
        JobError::Failed(what)
    }
}

/// Brings up the drive `drive=N` names (`dbbuf`, `lazycq` from the command line too).
pub fn open<'a, B: Board>(b: &B, cl: &Cmdline<'a>) -> Result<(Ctrl<B>, PciFunction), JobError<'a>> {
    let index = cl.int("drive")? as usize;
    let d = crate::drives::open_one(b, cl, index)?;
    Ok((d.ctrl.into_inner(), d.pci))
}

/// Creates I/O queue pair `qid` with the jobs' depth.
pub fn qpair<'a, B: Board>(ctrl: &mut Ctrl<B>, b: &B, qid: u16) -> Result<Qp<B>, JobError<'a>> {
    ctrl.create_io_qpair(b.dma(), qid, QUEUE_ENTRIES)
        .map_err(|e| {
            keel_log::error!("nvme: create I/O queue pair {=u16}: {}", qid, e);
            JobError::Failed("could not create an I/O queue pair")
        })
}

/// `selftest`: every namespace, every transfer shape, verified byte for byte.
pub fn selftest<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let only = cl.int("ns")? as u32;
    let seed = cl.int("seed")?;
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    keel_log::info!("job selftest: start");
    let mut checks = 0;
    for &i in &which {
        checks += selftest_drive(p, &drives.list[i], only, seed)?;
    }
    keel_log::info!(
        "selftest: {=usize} checks passed on {=usize} drives",
        checks,
        which.len()
    );
    Ok(())
}

/// `selftest` on one drive: its own queue pair, every namespace (or `only`), every shape.
/// The application tag the selftest's protected writes carry.
pub const SELFTEST_APP_TAG: u16 = 0x4b45;
/// Where the metadata round trip writes (4 KiB), and its pattern's seed.
pub const METADATA_LBA: u64 = 512;
/// The seed of the metadata round trip's data pattern.
pub const METADATA_SEED: u64 = 0x6d65_7461;

/// Byte `i` of the metadata the round trip writes (before any PI goes in).
pub fn metadata_byte(nsid: u32, i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ nsid as u8
}

/// Separate metadata through the metadata-buffer path: a 4 KiB write with its metadata (with
/// protection, the guard and tags computed here and checked by the device), read back and
/// compared byte for byte, PI verified here; a metadata buffer one byte short is refused before
/// the device sees it; with protection, a write whose guard is wrong is failed by the device.
/// Returns the checks passed.
fn metadata_round_trip<'a, B: Board>(
    p: &B,
    qp: &mut crate::Qp<B>,
    clock: &B::Clock,
    drive: usize,
    ns: &keel_nvme::Namespace,
    wbuf: &keel_hal::DmaRegion,
    rbuf: &keel_hal::DmaRegion,
) -> Result<usize, JobError<'a>> {
    use keel_blockdev::BufRef;
    const LEN: usize = 4096;
    let bs = ns.block_size as usize;
    let blocks = (LEN / bs) as u32;
    let (lba, ms) = (METADATA_LBA, ns.metadata as usize);
    let dma_fail = |_| JobError::Failed("DMA buffer");
    let mw = storage::dma(p.dma(), blocks as usize * ms).map_err(fail("DMA pool exhausted"))?;
    let mr = storage::dma(p.dma(), blocks as usize * ms).map_err(fail("DMA pool exhausted"))?;
    let mut data = [0u8; LEN];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        let off = i * 8;
        let v = storage::pattern(ns.nsid, lba + (off / bs) as u64, off % bs, METADATA_SEED);
        w.copy_from_slice(&v.to_le_bytes());
    }
    let mut meta = [0u8; 64 * 64];
    let meta = meta
        .get_mut(..blocks as usize * ms)
        .ok_or(JobError::Failed("metadata too large"))?;
    for (i, b) in meta.iter_mut().enumerate() {
        *b = metadata_byte(ns.nsid, i);
    }
    if ns.pi.is_some() {
        keel_nvme::pi::generate(ns, lba, blocks, SELFTEST_APP_TAG, &data, meta)
            .map_err(|_| JobError::Failed("PI generation"))?;
    }
    wbuf.write_bytes(0, &data)
        .map_err(|_| JobError::Failed("DMA write"))?;
    mw.write_bytes(0, meta)
        .map_err(|_| JobError::Failed("DMA write"))?;
    let (w, r) = (
        BufRef::new(wbuf, 0, LEN).map_err(dma_fail)?,
        BufRef::new(rbuf, 0, LEN).map_err(dma_fail)?,
    );
    let write = BlockOp::Write {
        ns: ns.nsid,
        lba,
        blocks,
        buf: w,
    };
    let read = BlockOp::Read {
        ns: ns.nsid,
        lba,
        blocks,
        buf: r,
    };
    let mut checks = 0;
    // Too short: refused, typed, nothing sent.
    let short = BufRef::new(&mw, 0, blocks as usize * ms - 1).map_err(dma_fail)?;
    let sent = qp.stats().submitted_cmds;
    match qp.submit_with_metadata(write, short, 0) {
        Err(keel_blockdev::SubmitError::MetadataLength) if qp.stats().submitted_cmds == sent => {
            checks += 1
        }
        other => {
            keel_log::error!(
                "selftest ns {=u32}: short metadata buffer: {}",
                ns.nsid,
                other
            );
            return Err(JobError::Failed(
                "selftest: short metadata buffer not refused",
            ));
        }
    }
    let mwr = BufRef::whole(&mw);
    let mrr = BufRef::whole(&mr);
    // The device checks the application tag too (PRCHK, where the namespace has PI).
    let app = SELFTEST_APP_TAG;
    storage::sync_with(qp, clock, |q, t| q.submit_protected(write, mwr, app, t))
        .map_err(fail("write with metadata"))?;
    rbuf.fill(0, LEN, 0).map_err(|_| JobError::Failed("DMA"))?;
    mr.fill(0, mr.len(), 0)
        .map_err(|_| JobError::Failed("DMA"))?;
    storage::sync_with(qp, clock, |q, t| q.submit_protected(read, mrr, app, t))
        .map_err(fail("read with metadata"))?;
    let mut got = [0u8; LEN];
    let mut got_meta = [0u8; 64 * 64];
    let got_meta = &mut got_meta[..meta.len()];
    rbuf.read_bytes(0, &mut got)
        .map_err(|_| JobError::Failed("DMA read"))?;
    mr.read_bytes(0, got_meta)
        .map_err(|_| JobError::Failed("DMA read"))?;
    if got != data || got_meta != meta {
        keel_log::error!(
            "selftest ns {=u32}: data or metadata read back differs",
            ns.nsid
        );
        return Err(JobError::Failed("selftest: metadata round trip"));
    }
    checks += 1;
    if ns.pi.is_some() {
        keel_nvme::pi::verify(ns, lba, blocks, SELFTEST_APP_TAG, &got, got_meta).map_err(|e| {
            keel_log::error!("selftest ns {=u32}: PI read back: {}", ns.nsid, e);
            JobError::Failed("selftest: PI check")
        })?;
        // Metadata byte `at` flipped by `mask`: the device must refuse the write, its `want`
        // check failing; the byte is restored afterwards.
        let mut refused = |meta: &mut [u8],
                           at: usize,
                           mask: u8,
                           want: keel_blockdev::ProtectionCheck,
                           what: &'static str|
         -> Result<(), JobError<'a>> {
            meta[at] ^= mask;
            mw.write_bytes(0, meta)
                .map_err(|_| JobError::Failed("DMA write"))?;
            let r = storage::sync_with(qp, clock, |q, t| q.submit_protected(write, mwr, app, t));
            meta[at] ^= mask;
            match r {
                Err(storage::StorageError::Io(e)) if e.protection() == Some(want) => {
                    keel_log::info!(
                        "selftest drive {=usize} ns {=u32} | bad {=str} refused by the device: {} ({}) | ok",
                        drive,
                        ns.nsid,
                        what,
                        e.protection(),
                        e
                    );
                    Ok(())
                }
                other => {
                    keel_log::error!(
                        "selftest ns {=u32}: bad {=str} written: {}",
                        ns.nsid,
                        what,
                        other
                    );
                    Err(JobError::Failed(
                        "selftest: the device took bad protection information",
                    ))
                }
            }
        };
        // A guard that does not match the data.
        let at = ns.pi_offset as usize;
        refused(
            meta,
            at,
            0xFF,
            keel_blockdev::ProtectionCheck::Guard,
            "guard",
        )?;
        checks += 2;
        // An application tag that is not the one the command names (big-endian: its low
        // byte, after the 2- or 8-byte guard).
        refused(
            meta,
            at + if ns.pi_guard64 { 9 } else { 3 },
            0x01,
            keel_blockdev::ProtectionCheck::ApplicationTag,
            "application tag",
        )?;
        checks += 1;
        if ns.pi != Some(keel_nvme::PiType::Type3) {
            // A reference tag that is not the LBA's (types 1 and 2): its first byte, bits
            // 40..47 with a 64-bit guard (the part of a 48-bit tag that CDW3 carries).
            let r = at + if ns.pi_guard64 { 10 } else { 4 };
            refused(
                meta,
                r,
                0x01,
                keel_blockdev::ProtectionCheck::ReferenceTag,
                "reference tag",
            )?;
            checks += 1;
        }
    }
    keel_log::info!(
        "selftest drive {=usize} ns {=u32} | metadata {=usize} B per block{=str} | round trip | ok",
        drive,
        ns.nsid,
        ms,
        match ns.pi {
            Some(_) if ns.pi_guard64 => ", PI computed by Keel (64-bit guard)",
            Some(_) => ", PI computed by Keel",
            None => "",
        }
    );
    Ok(checks)
}

fn selftest_drive<'a, B: Board>(
    p: &B,
    d: &crate::drives::Drive<B>,
    only: u32,
    seed: u64,
) -> Result<usize, JobError<'a>> {
    let clock = p.clock();
    let clock = &clock;
    let mut qp = qpair(&mut d.ctrl.lock(), p, 1)?;
    // What the device says about its volatile write cache: Identify Controller VWC (present)
    // and Get Features Volatile Write Cache (enabled). QEMU reports VWC present whatever the
    // namespaces' cache, but the feature follows `write-cache=` (the host asserts both).
    let vwc_enabled = match d.ctrl.lock().get_features(0x06, 0) {
        Ok(dw0) => dw0 & 1 != 0,
        Err(e) => {
            keel_log::error!(
                "selftest drive {=usize}: Get Features (VWC): {}",
                d.index,
                e
            );
            return Err(JobError::Failed("Get Features (volatile write cache)"));
        }
    };
    keel_log::info!(
        "selftest drive {=usize}: volatile write cache: present {=bool}, enabled {=bool}",
        d.index,
        d.info.vwc,
        vwc_enabled
    );
    let max_transfer = qp.max_transfer();
    let big = (2 * max_transfer + 64 * 1024).max(2 * 1024 * 1024 + 8192);
    let wbuf = storage::dma(p.dma(), big + 8192).map_err(fail("DMA pool exhausted"))?;
    let rbuf = storage::dma(p.dma(), big + 8192).map_err(fail("DMA pool exhausted"))?;
    let namespaces: heapless::Vec<_, { keel_nvme::MAX_NAMESPACES }> = d
        .namespaces
        .iter()
        .copied()
        .filter(|n| only == 0 || n.nsid == only)
        .collect();
    if namespaces.is_empty() {
        return Err(JobError::Failed("no such namespace"));
    }
    let mut checks = 0;
    for ns in &namespaces {
        if ns.metadata > 0 && !ns.extended {
            checks += metadata_round_trip(p, &mut qp, clock, d.index, ns, &wbuf, &rbuf)?;
        }
        if ns.zoned.is_some() {
            // Writes must follow the write pointer: the `zone` job checks zoned namespaces.
            keel_log::info!(
                "selftest drive {=usize} ns {=u32} | zoned | skipped (see the zone job)",
                d.index,
                ns.nsid
            );
            continue;
        }
        if let Some(refusal) = ns.format.refusal() {
            // A format this I/O path cannot use: the refusal must be the typed one, before
            // anything reaches the device, and the drive's other namespaces go on.
            let buf = keel_blockdev::BufRef::new(&rbuf, 0, ns.block_size as usize)
                .map_err(|_| JobError::Failed("DMA buffer"))?;
            let read = BlockOp::Read {
                ns: ns.nsid,
                lba: 0,
                blocks: 1,
                buf,
            };
            match storage::sync_op(&mut qp, clock, read) {
                Err(storage::StorageError::Submit(e)) if e == refusal => {
                    checks += 1;
                    keel_log::info!(
                        "selftest drive {=usize} ns {=u32} | format {} | I/O refused: {} | ok",
                        d.index,
                        ns.nsid,
                        ns.format,
                        e
                    );
                    continue;
                }
                other => {
                    keel_log::error!(
                        "selftest ns {=u32} | format {} | expected refusal {}, got {}",
                        ns.nsid,
                        ns.format,
                        refusal,
                        other
                    );
                    return Err(JobError::Failed("selftest: unusable format not refused"));
                }
            }
        }
        let bs = ns.block_size as usize;
        let blocks_of = |bytes: usize| bytes.div_ceil(bs) as u32;
        let shapes = [
            Shape {
                name: "one block",
                buf_offset: 0,
                blocks: 1,
                lba: 0,
            },
            Shape {
                name: "4 KiB",
                buf_offset: 0,
                blocks: blocks_of(4096),
                lba: 64,
            },
            Shape {
                name: "odd length, buffer offset 1 KiB (PRP1 offset)",
                buf_offset: 1024,
                blocks: blocks_of(5 * 4096 + bs),
                lba: 256,
            },
            Shape {
                name: "larger than MDTS (split)",
                buf_offset: 0,
                blocks: blocks_of(max_transfer + 3 * 4096),
                lba: 4096,
            },
            Shape {
                name: "2 MiB + 8 KiB at offset 512 (PRP list)",
                buf_offset: 512,
                blocks: blocks_of(2 * 1024 * 1024 + 8192),
                lba: 8192,
            },
        ];
        keel_log::info!(
            "selftest drive {=usize} ns {=u32} ({=u32} B blocks, format {}, max transfer {=usize} KiB):",
            d.index,
            ns.nsid,
            ns.block_size,
            ns.format,
            max_transfer / 1024
        );
        for s in &shapes {
            let bytes = s.blocks as usize * bs;
            if s.lba + s.blocks as u64 > ns.blocks || bytes + s.buf_offset > wbuf.len() {
                keel_log::warn!(
                    "selftest ns {=u32} | {=str} | skipped (namespace or buffer too small)",
                    ns.nsid,
                    s.name
                );
                continue;
            }
            storage::write_read_verify(&mut qp, clock, ns.nsid, s, &wbuf, &rbuf, seed ^ s.lba)
                .map_err(|e| {
                    keel_log::error!(
                        "selftest ns {=u32} | {=str} | lba {=u64} | blocks {=u32} | FAILED: {}",
                        ns.nsid,
                        s.name,
                        s.lba,
                        s.blocks,
                        e
                    );
                    JobError::Failed("selftest: data mismatch or I/O error")
                })?;
            checks += 1;
            keel_log::info!(
                "selftest ns {=u32} | {=str} | lba {=u64} | blocks {=u32} | bytes {=usize} | ok",
                ns.nsid,
                s.name,
                s.lba,
                s.blocks,
                bytes
            );
        }
        let before = qp.stats().submitted_cmds;
        storage::sync_op(&mut qp, clock, BlockOp::Flush { ns: ns.nsid }).map_err(fail("flush"))?;
        let flush_cmds = qp.stats().submitted_cmds - before;
        checks += 1;
        keel_log::info!(
            "selftest drive {=usize} ns {=u32} | flush | commands sent to the device {=u64} (write cache enabled {=bool}) | ok",
            d.index,
            ns.nsid,
            flush_cmds,
            vwc_enabled
        );
        let zb = blocks_of(4096);
        if d.info.write_zeroes {
            storage::zeroes_verify(&mut qp, clock, ns.nsid, 64, zb, &rbuf)
                .map_err(fail("write zeroes"))?;
            checks += 1;
            keel_log::info!(
                "selftest ns {=u32} | {=str} | lba {=u64} | blocks {=u32} | ok",
                ns.nsid,
                "write zeroes, read back zeroes",
                64,
                zb
            );
        }
        if d.info.deallocate {
            storage::sync_op(
                &mut qp,
                clock,
                BlockOp::Deallocate {
                    ns: ns.nsid,
                    lba: 256,
                    blocks: zb,
                },
            )
            .map_err(fail("deallocate"))?;
            checks += 1;
            keel_log::info!(
                "selftest ns {=u32} | {=str} | lba {=u64} | blocks {=u32} | ok",
                ns.nsid,
                "deallocate",
                256,
                zb
            );
        }
        // Bad input from the caller gets a typed error, not a device command.
        let past_end = BlockOp::Read {
            ns: ns.nsid,
            lba: ns.blocks,
            blocks: 1,
            buf: BufRef::new(&rbuf, 0, bs).map_err(|_| JobError::Failed("buf"))?,
        };
        match qp.submit(past_end, 1) {
            Err(keel_blockdev::SubmitError::OutOfRange) => checks += 1,
            other => {
                keel_log::error!("read past the end was not refused: {}", other);
                return Err(JobError::Failed("out-of-range read accepted"));
            }
        }
    }
    let st = qp.stats();
    keel_log::info!(
        "selftest drive {=usize}: {=usize} checks passed on {=usize} namespaces; queue stats {}",
        d.index,
        checks,
        namespaces.len(),
        st
    );
    if let Err((e, _)) = d.ctrl.lock().delete_io_qpair(p.dma(), qp) {
        keel_log::warn!("selftest drive {=usize}: delete queue pair: {}", d.index, e);
    }
    keel_hal::DmaAllocator::free(p.dma(), wbuf);
    keel_hal::DmaAllocator::free(p.dma(), rbuf);
    Ok(checks)
}

/// `scrub`: CRC32C of a namespace range on every selected drive, for the host to compare
/// against each disk image.
pub fn scrub<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let nsid = cl.int("ns")? as u32;
    let lba = cl.int("lba")?;
    let blocks_opt = cl.int("blocks")?;
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    let clock = p.clock();
    keel_log::info!("job scrub: start");
    for &i in &which {
        let d = &drives.list[i];
        let ns = *d
            .namespace(nsid)
            .ok_or(JobError::Failed("no such namespace"))?;
        let blocks = if blocks_opt == 0 {
            ns.blocks.saturating_sub(lba)
        } else {
            blocks_opt
        };
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(JobError::Failed(
                "scrub range past the end of the namespace",
            ));
        }
        let mut qp = qpair(&mut d.ctrl.lock(), p, 1)?;
        let buf = storage::dma(p.dma(), qp.max_transfer().min(1 << 20))
            .map_err(fail("DMA pool exhausted"))?;
        let t0 = clock.now_ns();
        let crc =
            storage::scrub(&mut qp, &clock, nsid, lba, blocks, &buf).map_err(fail("scrub read"))?;
        let ms = (clock.now_ns() - t0) / 1_000_000;
        keel_log::info!(
            "scrub drive={=usize} ns={=u32} lba={=u64} blocks={=u64} block_size={=u32} crc32c={=u32:08x} ({=u64} ms)",
            d.index,
            nsid,
            lba,
            blocks,
            ns.block_size,
            crc,
            ms
        );
        if let Err((e, _)) = d.ctrl.lock().delete_io_qpair(p.dma(), qp) {
            keel_log::warn!("scrub drive {=usize}: delete queue pair: {}", d.index, e);
        }
        keel_hal::DmaAllocator::free(p.dma(), buf);
    }
    Ok(())
}

// ---- scan: find exactly which blocks fail, report them, keep going ------------------------

/// Most failing ranges one scan reports.
const MAX_BAD_RANGES: usize = 32;

/// `scan`: reads (or writes a pattern to) a range in chunks; a failing chunk is bisected to
/// single blocks so the exact failing LBA ranges are reported, and the scan continues.
pub fn scan<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let nsid = cl.int("ns")? as u32;
    let lba0 = cl.int("lba")?;
    let blocks_opt = cl.int("blocks")?;
    let chunk = cl.int("chunk")?.clamp(1, 256) as u32;
    let write = cl.flag("write")?;
    let (mut ctrl, _) = open(p, cl)?;
    let clock = p.clock();
    let clock = &clock;
    keel_log::info!("job scan: start");
    let ns = *ctrl
        .namespace(nsid)
        .ok_or(JobError::Failed("no such namespace"))?;
    let blocks = if blocks_opt == 0 {
        ns.blocks.saturating_sub(lba0)
    } else {
        blocks_opt
    };
    if lba0.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
        return Err(JobError::Failed("scan range past the end of the namespace"));
    }
    let mut qp = qpair(&mut ctrl, p, 1)?;
    let bs = ns.block_size as usize;
    let buf = storage::dma(p.dma(), chunk as usize * bs).map_err(fail("DMA pool exhausted"))?;
    let op = |lba: u64, n: u32| -> Result<BlockOp, JobError<'a>> {
        let b = BufRef::new(&buf, 0, n as usize * bs).map_err(|_| JobError::Failed("buffer"))?;
        Ok(if write {
            BlockOp::Write {
                ns: nsid,
                lba,
                blocks: n,
                buf: b,
            }
        } else {
            BlockOp::Read {
                ns: nsid,
                lba,
                blocks: n,
                buf: b,
            }
        })
    };
    let mut bad: heapless::Vec<(u64, u64), MAX_BAD_RANGES> = heapless::Vec::new();
    let mut bad_blocks = 0u64;
    let mut at = lba0;
    while at < lba0 + blocks {
        let n = (chunk as u64).min(lba0 + blocks - at) as u32;
        if storage::sync_op(&mut qp, clock, op(at, n)?).is_err() {
            // Bisect the chunk to single blocks.
            for lba in at..at + n as u64 {
                if let Err(e) = storage::sync_op(&mut qp, clock, op(lba, 1)?) {
                    bad_blocks += 1;
                    match bad.last_mut() {
                        Some((_, end)) if *end + 1 == lba => *end = lba,
                        _ => {
                            if bad.push((lba, lba)).is_err() {
                                keel_log::warn!(
                                    "scan: more than {=usize} bad ranges; counting only",
                                    MAX_BAD_RANGES
                                );
                            }
                        }
                    }
                    keel_log::debug!("scan: lba {=u64}: {}", lba, e);
                }
            }
        }
        at += n as u64;
    }
    let what = if write { "write" } else { "read" };
    for (a, b) in &bad {
        keel_log::info!(
            "scan: {=str} error at lba {=u64}..={=u64} ({=u64} blocks)",
            what,
            *a,
            *b,
            b - a + 1
        );
    }
    keel_log::info!(
        "scan ns={=u32} lba={=u64} blocks={=u64} {=str}: {=u64} bad blocks in {=usize} ranges, the rest ok; queue stats {}",
        nsid, lba0, blocks, what, bad_blocks, bad.len(), qp.stats()
    );
    Ok(())
}

// ---- cfs: a queue pointed at unmapped memory, controller fatal status, recovery ------------

/// Makes controller `ctrl` (PCI function `dev`) fatal: creates I/O queue pair `qid` by hand
/// (an unused qid) with a real completion queue and a submission queue at an address no RAM
/// backs, and rings its doorbell, so the controller fails to fetch a command and sets
/// CSTS.CFS. Returns at once; the caller watches `is_fatal`. (The completion queue's page is
/// left to the device: it is not handed back, a controller reset frees the qid.)
pub fn make_fatal<B: Board>(
    ctrl: &mut Ctrl<B>,
    p: &B,
    dev: &keel_hal::PciFunction,
    qid: u16,
) -> Result<(), JobError<'static>> {
    use keel_hal::{DmaAllocator, Mmio};
    use keel_nvme::spec::{admin_op, sq_doorbell, SqEntry};
    let cq = p
        .dma()
        .alloc(4096, 4096)
        .map_err(|_| JobError::Failed("DMA pool exhausted"))?;
    let mut c = SqEntry::new(admin_op::CREATE_IO_CQ, 0, 0);
    c.prp1 = cq.bus_addr();
    c.cdw10 = (1u32 << 16) | qid as u32; // 2 entries
    c.cdw11 = 1; // physically contiguous, no interrupts
    ctrl.admin_command(c).map_err(|e| {
        keel_log::error!("create CQ: {}", e);
        JobError::Failed("create CQ")
    })?;
    let mut s = SqEntry::new(admin_op::CREATE_IO_SQ, 0, 0);
    s.prp1 = 0x7F_0000_0000; // 508 GiB: no memory there
    s.cdw10 = (1u32 << 16) | qid as u32;
    s.cdw11 = ((qid as u32) << 16) | 1;
    ctrl.admin_command(s).map_err(|e| {
        keel_log::error!("create SQ: {}", e);
        JobError::Failed("create SQ")
    })?;
    let bar0 = p
        .map_bar(dev, 0)
        .map_err(|_| JobError::Failed("NVMe BAR0 unusable"))?;
    bar0.write32(sq_doorbell(qid, ctrl.cap().doorbell_stride()), 1);
    Ok(())
}

/// `cfs`: creates an extra I/O queue pair by hand whose submission queue lives at an address no
/// RAM backs, rings its doorbell so the controller fails to fetch a command and sets CSTS.CFS,
/// then recovers with a controller reset. Commands that were on a healthy queue pair at the
/// time are resubmitted or failed (each reported exactly once), and new I/O is verified.
pub fn cfs<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let inflight = cl.int("inflight")?.clamp(1, 64) as u32;
    let (mut ctrl, dev) = open(p, cl)?;
    let clock = p.clock();
    keel_log::info!("job cfs: start");
    let ns = *ctrl
        .namespace(1)
        .ok_or(JobError::Failed("no namespace 1"))?;
    let mut qp = qpair(&mut ctrl, p, 1)?;
    let bs = ns.block_size as usize;
    let bufs = storage::dma(p.dma(), inflight as usize * bs).map_err(fail("DMA pool exhausted"))?;
    // Half of these reach the device before the failure (doorbell rung), half only sit in the SQ.
    for tag in 0..inflight {
        let buf =
            BufRef::new(&bufs, tag as usize * bs, bs).map_err(|_| JobError::Failed("buffer"))?;
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: tag as u64,
                blocks: 1,
                buf,
            },
            tag,
        )
        .map_err(|_| JobError::Failed("submit"))?;
        if tag == inflight / 2 {
            qp.flush_submissions();
        }
    }

    let t0 = clock.now_ns();
    make_fatal(&mut ctrl, p, &dev, 2)?; // the driver's own pair is qid 1
    while !ctrl.is_fatal() {
        if clock.now_ns() - t0 > 2_000_000_000 {
            return Err(JobError::Failed("the controller never reported CSTS.CFS"));
        }
        p.cores().relax();
    }
    keel_log::info!(
        "cfs: controller fatal status after {=u64} us; resetting",
        (clock.now_ns() - t0) / 1000
    );

    ctrl.reset(&mut [&mut qp]).map_err(|e| {
        keel_log::error!("reset: {}", e);
        JobError::Failed("controller reset failed")
    })?;
    let (mut ok, mut failed, mut seen) = (0u32, 0u32, [0u8; 64]);
    let t1 = clock.now_ns();
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    while ok + failed < inflight {
        qp.poll(usize::MAX, &mut |tag, r| {
            if let Some(n) = seen.get_mut(tag as usize) {
                *n += 1;
            }
            if r.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
            // One line per report, with the CRC32C of the block the read returned: the host
            // counts these lines itself and checks each CRC against the disk image.
            let mut block = [0u8; 4096];
            let n = bs.min(block.len());
            let c = match bufs.read_bytes(tag as usize * bs, &mut block[..n]) {
                Ok(()) => crc.checksum(&block[..n]),
                Err(_) => 0,
            };
            keel_log::info!(
                "cfs report: tag {=u32} lba {=u32} ok {=bool} crc32c {=u32:08x}",
                tag,
                tag,
                r.is_ok(),
                c
            );
        });
        if clock.now_ns() - t1 > 5_000_000_000 {
            keel_log::error!(
                "cfs: only {=u32} of {=u32} in-flight commands reported",
                ok + failed,
                inflight
            );
            return Err(JobError::Failed("in-flight commands lost across the reset"));
        }
    }
    if seen[..inflight as usize].iter().any(|&n| n != 1) {
        return Err(JobError::Failed("a command was reported twice or never"));
    }
    keel_log::info!(
        "cfs: {=u32} commands in flight at the failure: {=u32} completed after resubmission, {=u32} failed; queue stats {}",
        inflight, ok, failed, qp.stats()
    );
    let wbuf = storage::dma(p.dma(), 64 * 1024).map_err(fail("DMA pool exhausted"))?;
    let rbuf = storage::dma(p.dma(), 64 * 1024).map_err(fail("DMA pool exhausted"))?;
    let shape = Shape {
        name: "after reset",
        buf_offset: 0,
        blocks: (16 * 1024 / bs) as u32,
        lba: 2048,
    };
    storage::write_read_verify(&mut qp, &clock, 1, &shape, &wbuf, &rbuf, 0xC5)
        .map_err(fail("I/O after the reset"))?;
    keel_log::info!(
        "cfs: controller recovered; new I/O verified; admin stats {}",
        ctrl.stats()
    );
    Ok(())
}

// ---- bench -------------------------------------------------------------------------------

/// Rounds of each kind in a `raw=both` run.
const BOTH_ROUNDS: u64 = 16;

/// What `bench` runs on each core.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The full stack (reactor + I/O handles).
    Full,
    /// The raw queue-pair loop.
    Raw,
    /// Interleaved rounds of full stack, raw loop and device ceiling on one queue pair.
    Both,
    /// The device's ceiling (`IoQueuePair::device_ceiling`).
    Ceiling,
}

/// One core's bench results.
#[derive(Clone, Copy, Default)]
struct CoreResults {
    /// The job's own (the full stack's with `raw=both`).
    main: BenchResult,
    /// `raw=both`: the raw loop's rounds.
    raw: BenchResult,
    /// `raw=both`: the device-ceiling rounds.
    ceiling: BenchResult,
    /// Set when the core could not run its part.
    error: Option<&'static str>,
}

/// Sum of `rounds` (I/Os and errors) over the cores and the longest elapsed time:
/// (IOPS, errors).
fn rounds_iops(rounds: impl Iterator<Item = BenchResult>) -> (u64, u64) {
    let (mut ios, mut elapsed, mut errors) = (0u64, 0u64, 0u64);
    for r in rounds {
        ios += r.ios;
        errors += r.errors;
        elapsed = elapsed.max(r.elapsed_ns);
    }
    (ios * 1_000_000_000 / elapsed.max(1), errors)
}

/// Nanoseconds per I/O spent submitting, ringing, reaping and in idle polls.
fn time_split<C: Clock>(clock: &C, r: &BenchResult) -> [u64; 4] {
    [r.t_submit, r.t_kick, r.t_reap, r.t_idle].map(|t| clock.ticks_to_ns(t) / r.ios.max(1))
}

/// How the cores of one `bench` share the controller's queues.
struct Sharing {
    /// Cores `0..owners` own a queue pair; the others send their I/O to core
    /// `core % owners` (full stack only).
    owners: usize,
    /// Cores taking part.
    cores: usize,
    /// Cores whose own load is done (owners keep serving the others until all are).
    finished: core::sync::atomic::AtomicUsize,
}

/// One core's part of `bench`: its own queue pair (created here, deleted at the end) if the
/// controller granted one for it, its buffers, and the loop `mode` asks for, run with the
/// core's interrupts masked.
#[allow(clippy::too_many_arguments)]
fn core_bench<B: Board>(
    b: &B,
    core: usize,
    ctrl: &spin::Mutex<Ctrl<B>>,
    links: &Mutex<RefCell<Option<crate::reactor::MeshLinks<'_>>>>,
    aio: &crate::reactor::Handles,
    cfg: BenchCfg,
    mode: Mode,
    share: &Sharing,
) -> CoreResults {
    let mut out = CoreResults::default();
    if core >= share.owners {
        return remote_core_bench(b, core, links, aio, cfg, share);
    }
    let clock = b.clock();
    let qp = match ctrl
        .lock()
        .create_io_qpair(b.dma(), core as u16 + 1, QUEUE_ENTRIES)
    {
        Ok(q) => q,
        Err(e) => {
            keel_log::error!("bench core {=usize}: create I/O queue pair: {}", core, e);
            out.error = Some("could not create an I/O queue pair");
            return out;
        }
    };
    let mut bufs: heapless::Vec<DmaRegion, 256> = heapless::Vec::new();
    for _ in 0..cfg.qd {
        match storage::dma(b.dma(), cfg.bs) {
            Ok(d) => {
                let _ = bufs.push(d);
            }
            Err(_) => {
                out.error = Some("DMA pool exhausted");
                return out;
            }
        }
    }
    let links = critical_section::with(|cs| links.borrow_ref_mut(cs).take());
    let mut hist = [0u32; storage::HIST + 1];
    let qp = b.cores().polled(|| match (mode, links) {
        (Mode::Both, Some(links)) => {
            // Same queue pair, same boot, interleaved: what the layers cost, with the device
            // and the host's noise shared by both sides.
            let mut stack = crate::reactor::Stack(crate::reactor::bench_reactor(links, aio, qp));
            let mut round = cfg;
            round.duration_ns = (cfg.duration_ns / (3 * BOTH_ROUNDS)).max(1);
            for _ in 0..BOTH_ROUNDS {
                if let Ok(mut qp) = stack.0.take_queue() {
                    let r = storage::bench(
                        &mut storage::Raw(&mut qp),
                        &clock,
                        &round,
                        &bufs,
                        &mut hist,
                    );
                    out.raw.add(&r);
                    out.ceiling.add(&ceiling(&mut qp, &clock, &round, &bufs));
                    let _ = stack.0.adopt_queue(qp);
                }
                let r = storage::bench(&mut stack, &clock, &round, &bufs, &mut hist);
                let _ = stack.0.quiesce(1_000_000);
                out.main.add(&r);
            }
            stack.0.take_queue().ok()
        }
        (Mode::Full, Some(links)) => {
            let mut stack = crate::reactor::Stack(crate::reactor::bench_reactor(links, aio, qp));
            out.main = storage::bench(&mut stack, &clock, &cfg, &bufs, &mut hist);
            // Serve the cores without a queue pair of their own until every core is done.
            share
                .finished
                .fetch_add(1, core::sync::atomic::Ordering::AcqRel);
            while share.finished.load(core::sync::atomic::Ordering::Acquire) < share.cores {
                stack.0.poll();
                while stack.0.next_completion().is_some() {}
            }
            let _ = stack.0.quiesce(1_000_000);
            let qs = stack.0.with_queue(|q| q.stats());
            keel_log::info!(
                "bench core={=usize} reactor {} queue {}",
                core,
                stack.0.stats(),
                qs
            );
            stack.0.take_queue().ok()
        }
        (Mode::Ceiling, _) => {
            let mut qp = qp;
            out.main = ceiling(&mut qp, &clock, &cfg, &bufs);
            Some(qp)
        }
        (Mode::Raw, _) => {
            let mut qp = qp;
            out.main = storage::bench(&mut storage::Raw(&mut qp), &clock, &cfg, &bufs, &mut hist);
            Some(qp)
        }
        (_, None) => {
            out.error = Some("no message links for the reactor");
            Some(qp)
        }
    });
    match qp {
        Some(qp) => {
            if let Err((e, _)) = ctrl.lock().delete_io_qpair(b.dma(), qp) {
                keel_log::warn!("bench core {=usize}: delete queue pair: {}", core, e);
            }
        }
        None => out.error = Some("the reactor kept I/O in flight"),
    }
    for d in bufs {
        keel_hal::DmaAllocator::free(b.dma(), d);
    }
    out
}

/// `bench` on a core without a queue pair of its own (the controller granted fewer queues
/// than there are cores): the full stack, every I/O sent over the message rings to the core
/// that owns the queue (`core % owners`), completions back the same way.
fn remote_core_bench<B: Board>(
    b: &B,
    core: usize,
    links: &Mutex<RefCell<Option<crate::reactor::MeshLinks<'_>>>>,
    aio: &crate::reactor::Handles,
    cfg: BenchCfg,
    share: &Sharing,
) -> CoreResults {
    let mut out = CoreResults::default();
    let clock = b.clock();
    let mut bufs: heapless::Vec<DmaRegion, 256> = heapless::Vec::new();
    for _ in 0..cfg.qd {
        match storage::dma(b.dma(), cfg.bs) {
            Ok(d) => {
                let _ = bufs.push(d);
            }
            Err(_) => {
                out.error = Some("DMA pool exhausted");
                return out;
            }
        }
    }
    let Some(links) = critical_section::with(|cs| links.borrow_ref_mut(cs).take()) else {
        out.error = Some("no message links for the reactor");
        return out;
    };
    let owner = core % share.owners.max(1);
    let mut hist = [0u32; storage::HIST + 1];
    b.cores().polled(|| {
        let mut target = crate::reactor::Remote {
            reactor: keel_reactor::Reactor::new(links, aio, None::<Qp<B>>),
            owner,
        };
        out.main = storage::bench(&mut target, &clock, &cfg, &bufs, &mut hist);
        share
            .finished
            .fetch_add(1, core::sync::atomic::Ordering::AcqRel);
        // Answers still owed to other cores (none: this core owns no queue) and the last
        // completions; then wait for the others to finish, so no ring end goes away early.
        while share.finished.load(core::sync::atomic::Ordering::Acquire) < share.cores {
            target.reactor.poll();
            while target.reactor.next_completion().is_some() {}
        }
        keel_log::info!(
            "bench core={=usize} (no queue of its own: I/O through core {=usize}) reactor {}",
            core,
            owner,
            target.reactor.stats()
        );
    });
    for d in bufs {
        keel_hal::DmaAllocator::free(b.dma(), d);
    }
    out
}

/// `raw=ceiling`: `cfg.qd` copies of one prebuilt read kept in flight with no per-I/O driver
/// work (see `IoQueuePair::device_ceiling`): the most any driver could get from this device
/// and platform at this depth. Its average latency follows from the depth (Little's law); it
/// has no latency histogram or time split.
fn ceiling<Q, C: Clock>(
    qp: &mut keel_nvme::IoQueuePair<Q, C>,
    clock: &C,
    cfg: &BenchCfg,
    bufs: &[DmaRegion],
) -> BenchResult
where
    Q: keel_hal::Mmio,
{
    let mut r = BenchResult::default();
    let Some(buf) = bufs.first() else {
        return r;
    };
    let blocks = (cfg.bs as u64 / cfg.block_size.max(1) as u64).max(1) as u32;
    let start = clock.ticks();
    let end = start + clock.ns_to_ticks(cfg.duration_ns);
    let qd = cfg.qd.min(u16::MAX as usize) as u16;
    match qp.device_ceiling(
        cfg.ns,
        cfg.lba0,
        blocks,
        BufRef::whole(buf),
        qd,
        &mut || clock.ticks() < end,
    ) {
        Ok((ios, errors)) => {
            r.ios = ios;
            r.errors = errors;
        }
        Err(e) => {
            keel_log::error!("bench: device ceiling refused: {}", e);
            r.errors = 1;
        }
    }
    r.elapsed_ns = clock.ticks_to_ns(clock.ticks() - start);
    r.lat_sum_ns = r.elapsed_ns.saturating_mul(qd as u64);
    r
}

/// `bench`: fio-like load, one queue pair per core, each driven by its own core.
pub fn bench<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let pattern = Pattern::parse(cl.choice("pattern")?).unwrap_or(Pattern::RandRead);
    let bs = cl.size("bs")? as usize;
    let qd = cl.int("qd")? as usize;
    let secs = cl.int("secs")?;
    let duration_ns = match cl.int("ms")? {
        0 => secs.saturating_mul(1_000_000_000),
        ms => ms.saturating_mul(1_000_000),
    };
    let cores = (cl.int("cores")? as usize).clamp(1, p.cores().count().min(MAX_CORES));
    let nsid = cl.int("ns")? as u32;
    let mode = match cl.choice("raw")? {
        "on" => Mode::Raw,
        "both" => Mode::Both,
        "ceiling" => Mode::Ceiling,
        _ => Mode::Full,
    };
    if qd == 0 || qd > 255 || bs == 0 || !bs.is_multiple_of(512) {
        return Err(JobError::Failed(
            "bench: qd must be 1..=255 and bs a multiple of 512",
        ));
    }
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    keel_log::info!("job bench: start");
    let load = Load {
        pattern,
        bs,
        qd,
        duration_ns,
        cores,
        nsid,
        mode,
    };
    if let [one] = which[..] {
        return bench_one(p, &drives.list[one], load);
    }
    if !matches!(mode, Mode::Full | Mode::Raw) {
        return Err(JobError::Failed(
            "raw=both and raw=ceiling measure one drive: add drive=N",
        ));
    }
    let list: heapless::Vec<&crate::drives::Drive<B>, { crate::drives::MAX_DRIVES }> =
        which.iter().map(|&i| &drives.list[i]).collect();
    bench_many(p, &list, load)
}

/// What a `bench` run does on each core.
#[derive(Clone, Copy)]
struct Load {
    pattern: Pattern,
    bs: usize,
    qd: usize,
    duration_ns: u64,
    cores: usize,
    nsid: u32,
    mode: Mode,
}

/// `bench` on one drive (the interleaved `raw=both` and `raw=ceiling` runs too).
fn bench_one<'a, B: Board>(p: &B, d: &crate::drives::Drive<B>, load: Load) -> JobResult<'a> {
    let Load {
        pattern,
        bs,
        qd,
        duration_ns,
        cores,
        nsid,
        mode,
    } = load;
    let ctrl = &d.ctrl;
    let ns = *d
        .namespace(nsid)
        .ok_or(JobError::Failed("no such namespace"))?;
    // Fewer queues than cores: the full stack sends the extra cores' I/O to queue owners; the
    // raw loop and the ceiling drive queue pairs directly, so they run on the owners alone.
    let granted = d.queues().max(1);
    let owners = granted.min(cores);
    let cores = if mode == Mode::Full { cores } else { owners };
    if owners < cores {
        keel_log::info!(
            "bench: {=usize} I/O queues for {=usize} cores: cores {=usize}.. send their I/O to core k mod {=usize}",
            granted, cores, owners, owners
        );
    }
    let share = Sharing {
        owners,
        cores,
        finished: core::sync::atomic::AtomicUsize::new(0),
    };
    let per_core_blocks = ns.blocks / cores as u64;
    let mut mesh = crate::reactor::Mesh::new();
    let links: [Mutex<RefCell<Option<crate::reactor::MeshLinks<'_>>>>; MAX_CORES] = {
        let mut it = keel_reactor::split(&mut mesh).into_iter();
        core::array::from_fn(|_| Mutex::new(RefCell::new(it.next())))
    };
    keel_log::info!(
        "bench {} bs={=usize} qd={=usize} cores={=usize} for {=u64} ms through {=str}",
        pattern,
        bs,
        qd,
        cores,
        duration_ns / 1_000_000,
        match mode {
            Mode::Ceiling =>
                "one prebuilt read resubmitted with no driver work (the device's ceiling)",
            Mode::Raw => "the raw queue-pair loop",
            Mode::Both =>
                "the full stack and the raw loop, alternating rounds on the same queue pairs",
            Mode::Full => "the full stack (reactor + I/O handles)",
        }
    );
    let results = crate::on_cores(p, cores, |core| {
        let cfg = BenchCfg {
            pattern,
            ns: nsid,
            bs,
            qd,
            duration_ns,
            lba0: core as u64 * per_core_blocks,
            blocks: per_core_blocks,
            block_size: ns.block_size,
        };
        let aio = crate::reactor::core_handles(core, cores);
        core_bench(p, core, ctrl, &links[core], &aio, cfg, mode, &share)
    })?;
    if let Some(e) = results.iter().find_map(|r| r.error) {
        return Err(JobError::Failed(e));
    }
    let clock = p.clock();
    let mut total = BenchResult::default();
    let mut elapsed = 0;
    for (core, r) in results.iter().map(|r| r.main).enumerate() {
        let iops = r.ios * 1_000_000_000 / r.elapsed_ns.max(1);
        keel_log::info!(
            "bench core={=usize} ios={=u64} iops={=u64} mbps={=u64} avg_us={=u64}.{=u64:02} p99_us={=u64} errors={=u64}",
            core, r.ios, iops, iops * bs as u64 / 1_000_000, r.lat_sum_ns / r.ios.max(1) / 1000, r.lat_sum_ns / r.ios.max(1) / 10 % 100, r.p99_us, r.errors
        );
        let [sub, kick, reap, idle] = time_split(&clock, &r);
        keel_log::info!(
            "bench core={=usize} ns per I/O: submit {=u64}, doorbell {=u64}, reap {=u64}, idle polls {=u64}",
            core, sub, kick, reap, idle
        );
        total.ios += r.ios;
        total.errors += r.errors;
        total.lat_sum_ns += r.lat_sum_ns;
        total.p99_us = total.p99_us.max(r.p99_us);
        elapsed = elapsed.max(r.elapsed_ns);
    }
    let iops = total.ios * 1_000_000_000 / elapsed.max(1);
    keel_log::info!(
        "bench total iops={=u64} mbps={=u64} avg_us={=u64}.{=u64:02} p99_us={=u64} errors={=u64} cores={=usize} stack={=str}",
        iops, iops * bs as u64 / 1_000_000, total.lat_sum_ns / total.ios.max(1) / 1000, total.lat_sum_ns / total.ios.max(1) / 10 % 100, total.p99_us, total.errors, cores,
        match mode { Mode::Ceiling => "ceiling", Mode::Raw => "raw", _ => "full" }
    );
    if mode == Mode::Both {
        for (core, r) in results.iter().map(|r| r.raw).enumerate() {
            let [sub, kick, reap, idle] = time_split(&clock, &r);
            keel_log::info!(
                "bench core={=usize} raw rounds: ios={=u64} avg_us={=u64}.{=u64:02}; ns per I/O: submit {=u64}, doorbell {=u64}, reap {=u64}, idle polls {=u64}",
                core, r.ios, r.lat_sum_ns / r.ios.max(1) / 1000, r.lat_sum_ns / r.ios.max(1) / 10 % 100,
                sub, kick, reap, idle
            );
        }
        let (raw_iops, raw_errors) = rounds_iops(results.iter().map(|r| r.raw));
        let (ceiling_iops, ceiling_errors) = rounds_iops(results.iter().map(|r| r.ceiling));
        let (fr, fr_m) = crate::ratio(iops, raw_iops);
        let (fc, fc_m) = crate::ratio(iops, ceiling_iops);
        let (rc, rc_m) = crate::ratio(raw_iops, ceiling_iops);
        keel_log::info!(
            "bench raw iops={=u64}; full stack / raw = {=u64}.{=u64:03} ({=u64} interleaved rounds of each)",
            raw_iops, fr, fr_m, BOTH_ROUNDS
        );
        keel_log::info!(
            "bench ceiling iops={=u64}; full stack / ceiling = {=u64}.{=u64:03}; raw / ceiling = {=u64}.{=u64:03}",
            ceiling_iops, fc, fc_m, rc, rc_m
        );
        total.errors += raw_errors + ceiling_errors;
    }
    if total.errors > 0 || total.ios == 0 {
        return Err(JobError::Failed("bench saw I/O errors"));
    }
    if results.iter().any(|r| r.main.ios == 0) {
        return Err(JobError::Failed("a bench core completed no I/O"));
    }
    Ok(())
}

// ---- bench across several drives ----------------------------------------------------------

/// One core's results across drives.
#[derive(Clone, Copy, Default)]
struct ManyResults {
    main: BenchResult,
    /// I/Os completed per drive (in the order of the drive list).
    per_drive: [u64; crate::drives::MAX_DRIVES],
    error: Option<&'static str>,
}

/// The bench loop's target over several drives: I/O `tag` goes to drive `tag % drives`.
struct Multi<'t, T> {
    targets: &'t mut [T],
    per_drive: [u64; crate::drives::MAX_DRIVES],
}

impl<T: storage::BenchTarget> storage::BenchTarget for Multi<'_, T> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> bool {
        let n = self.targets.len().max(1);
        self.targets[tag as usize % n].submit(op, tag)
    }
    fn kick(&mut self) {
        for t in self.targets.iter_mut() {
            t.kick();
        }
    }
    fn reap(&mut self, on_done: &mut dyn FnMut(u32, Result<(), keel_blockdev::IoError>)) {
        let n = self.targets.len().max(1);
        let per = &mut self.per_drive;
        for t in self.targets.iter_mut() {
            t.reap(&mut |tag, r| {
                per[tag as usize % n] += 1;
                on_done(tag, r)
            });
        }
    }
    fn block_size(&self, _ns: keel_blockdev::NsId) -> Option<u32> {
        None
    }
}

/// `bench` across several drives: every core drives a queue pair on each drive (or, past a
/// drive's queue grant, sends that drive's I/O to a core that owns one), its I/Os spread over
/// the drives; prints a row per drive and the total.
fn bench_many<'a, B: Board>(p: &B, list: &[&crate::drives::Drive<B>], load: Load) -> JobResult<'a> {
    let Load {
        pattern,
        bs,
        qd,
        duration_ns,
        cores,
        nsid,
        mode,
    } = load;
    let nd = list.len();
    let (mut blocks, mut block_size) = (u64::MAX, 0u32);
    for d in list {
        let ns = d
            .namespace(nsid)
            .ok_or(JobError::Failed("a drive lacks the namespace"))?;
        blocks = blocks.min(ns.blocks);
        if block_size != 0 && block_size != ns.block_size {
            return Err(JobError::Failed(
                "bench across drives needs one block size on all of them",
            ));
        }
        block_size = ns.block_size;
    }
    let owners: heapless::Vec<usize, { crate::drives::MAX_DRIVES }> =
        list.iter().map(|d| d.queues().max(1).min(cores)).collect();
    // The raw loop drives queue pairs itself: only cores that own one on every drive.
    let cores = match mode {
        Mode::Full => cores,
        _ => owners.iter().copied().min().unwrap_or(1),
    };
    let per_core_blocks = blocks / cores as u64;
    // One mesh per drive (a core runs a reactor per drive); shallow rings keep them small.
    let mut meshes: heapless::Vec<crate::reactor::SmallMesh, { crate::drives::MAX_DRIVES }> =
        heapless::Vec::new();
    for _ in 0..nd {
        let _ = meshes.push(crate::reactor::SmallMesh::new());
    }
    type LinkSlot<'m> = Mutex<RefCell<Option<crate::reactor::MeshLinks<'m>>>>;
    let mut links: heapless::Vec<[LinkSlot<'_>; MAX_CORES], { crate::drives::MAX_DRIVES }> =
        heapless::Vec::new();
    for m in meshes.iter_mut() {
        let mut it = keel_reactor::split(m).into_iter();
        let _ = links.push(core::array::from_fn(|_| {
            Mutex::new(RefCell::new(it.next()))
        }));
    }
    let finished = core::sync::atomic::AtomicUsize::new(0);
    keel_log::info!(
        "bench {} bs={=usize} qd={=usize} cores={=usize} drives={=usize} for {=u64} ms through {=str}",
        pattern,
        bs,
        qd,
        cores,
        nd,
        duration_ns / 1_000_000,
        if mode == Mode::Raw { "the raw queue-pair loop" } else { "the full stack (a reactor per core per drive)" }
    );
    let results = crate::on_cores(p, cores, |core| {
        let cfg = BenchCfg {
            pattern,
            ns: nsid,
            bs,
            qd,
            duration_ns,
            lba0: core as u64 * per_core_blocks,
            blocks: per_core_blocks,
            block_size,
        };
        core_bench_many(
            p,
            core,
            list,
            &owners,
            &links,
            &crate::reactor::core_handles(core, cores),
            cfg,
            mode,
            &finished,
            cores,
        )
    })?;
    if let Some(e) = results.iter().find_map(|r| r.error) {
        return Err(JobError::Failed(e));
    }
    let mut total = BenchResult::default();
    let mut elapsed = 0;
    for (core, r) in results.iter().map(|r| r.main).enumerate() {
        let iops = r.ios * 1_000_000_000 / r.elapsed_ns.max(1);
        keel_log::info!(
            "bench core={=usize} ios={=u64} iops={=u64} avg_us={=u64}.{=u64:02} p99_us={=u64} errors={=u64}",
            core, r.ios, iops, r.lat_sum_ns / r.ios.max(1) / 1000, r.lat_sum_ns / r.ios.max(1) / 10 % 100, r.p99_us, r.errors
        );
        total.ios += r.ios;
        total.errors += r.errors;
        total.lat_sum_ns += r.lat_sum_ns;
        total.p99_us = total.p99_us.max(r.p99_us);
        elapsed = elapsed.max(r.elapsed_ns);
    }
    for (i, d) in list.iter().enumerate() {
        let ios: u64 = results.iter().map(|r| r.per_drive[i]).sum();
        let iops = ios * 1_000_000_000 / elapsed.max(1);
        keel_log::info!(
            "bench drive={=usize} ios={=u64} iops={=u64} mbps={=u64}",
            d.index,
            ios,
            iops,
            iops * bs as u64 / 1_000_000
        );
        if ios == 0 {
            return Err(JobError::Failed("a drive completed no I/O"));
        }
    }
    let iops = total.ios * 1_000_000_000 / elapsed.max(1);
    keel_log::info!(
        "bench total iops={=u64} mbps={=u64} avg_us={=u64}.{=u64:02} p99_us={=u64} errors={=u64} cores={=usize} drives={=usize} stack={=str}",
        iops, iops * bs as u64 / 1_000_000, total.lat_sum_ns / total.ios.max(1) / 1000, total.lat_sum_ns / total.ios.max(1) / 10 % 100, total.p99_us, total.errors, cores, nd,
        if mode == Mode::Raw { "raw" } else { "full" }
    );
    if total.errors > 0 || total.ios == 0 {
        return Err(JobError::Failed("bench saw I/O errors"));
    }
    if results.iter().any(|r| r.main.ios == 0) {
        return Err(JobError::Failed("a bench core completed no I/O"));
    }
    Ok(())
}

/// One core's part of a bench across drives.
#[allow(clippy::too_many_arguments)]
fn core_bench_many<B: Board>(
    b: &B,
    core: usize,
    list: &[&crate::drives::Drive<B>],
    owners: &[usize],
    links: &[[Mutex<RefCell<Option<crate::reactor::MeshLinks<'_>>>>; MAX_CORES]],
    aio: &crate::reactor::Handles,
    cfg: BenchCfg,
    mode: Mode,
    finished: &core::sync::atomic::AtomicUsize,
    cores: usize,
) -> ManyResults {
    use core::sync::atomic::Ordering;
    let mut out = ManyResults::default();
    let clock = b.clock();
    let mut qps: heapless::Vec<Option<Qp<B>>, { crate::drives::MAX_DRIVES }> = heapless::Vec::new();
    for (d, drive) in list.iter().enumerate() {
        let qp = if core < owners[d] {
            match drive
                .ctrl
                .lock()
                .create_io_qpair(b.dma(), core as u16 + 1, QUEUE_ENTRIES)
            {
                Ok(q) => Some(q),
                Err(e) => {
                    keel_log::error!(
                        "bench core {=usize} drive {=usize}: create I/O queue pair: {}",
                        core,
                        drive.index,
                        e
                    );
                    out.error = Some("could not create an I/O queue pair");
                    None
                }
            }
        } else {
            None
        };
        let _ = qps.push(qp);
    }
    let mut bufs: heapless::Vec<DmaRegion, 256> = heapless::Vec::new();
    for _ in 0..cfg.qd {
        match storage::dma(b.dma(), cfg.bs) {
            Ok(d) => {
                let _ = bufs.push(d);
            }
            Err(_) => out.error = Some("DMA pool exhausted"),
        }
    }
    if out.error.is_none() {
        let mut hist = [0u32; storage::HIST + 1];
        b.cores().polled(|| match mode {
            Mode::Raw => {
                let mut raws: heapless::Vec<
                    storage::Raw<'_, Qp<B>>,
                    { crate::drives::MAX_DRIVES },
                > = qps
                    .iter_mut()
                    .filter_map(|q| q.as_mut().map(storage::Raw))
                    .collect();
                let mut m = Multi {
                    targets: &mut raws,
                    per_drive: [0; crate::drives::MAX_DRIVES],
                };
                out.main = storage::bench(&mut m, &clock, &cfg, &bufs, &mut hist);
                out.per_drive = m.per_drive;
            }
            _ => {
                let mut targets: heapless::Vec<
                    crate::reactor::Remote<'_, Qp<B>>,
                    { crate::drives::MAX_DRIVES },
                > = heapless::Vec::new();
                for (d, l) in links.iter().enumerate() {
                    let Some(l) = critical_section::with(|cs| l[core].borrow_ref_mut(cs).take())
                    else {
                        out.error = Some("no message links for the reactor");
                        return;
                    };
                    let _ = targets.push(crate::reactor::Remote {
                        reactor: keel_reactor::Reactor::new(l, aio, qps[d].take()),
                        owner: list[d].owner(core),
                    });
                }
                let mut m = Multi {
                    targets: &mut targets,
                    per_drive: [0; crate::drives::MAX_DRIVES],
                };
                out.main = storage::bench(&mut m, &clock, &cfg, &bufs, &mut hist);
                out.per_drive = m.per_drive;
                // Serve the other cores until every core is done, then give the queues back.
                finished.fetch_add(1, Ordering::AcqRel);
                while finished.load(Ordering::Acquire) < cores {
                    for t in targets.iter_mut() {
                        t.reactor.poll();
                        while t.reactor.next_completion().is_some() {}
                    }
                }
                for (d, t) in targets.iter_mut().enumerate() {
                    let _ = t.reactor.quiesce(1_000_000);
                    qps[d] = t.reactor.take_queue().ok();
                }
            }
        });
    } else if mode == Mode::Full {
        finished.fetch_add(1, Ordering::AcqRel);
    }
    for (d, qp) in qps.into_iter().enumerate() {
        if let Some(qp) = qp {
            if let Err((e, _)) = list[d].ctrl.lock().delete_io_qpair(b.dma(), qp) {
                keel_log::warn!("bench core {=usize}: delete queue pair: {}", core, e);
            }
        }
    }
    for d in bufs {
        keel_hal::DmaAllocator::free(b.dma(), d);
    }
    out
}
