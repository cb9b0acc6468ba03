//! The data oracle: mixed reads and writes at depth on every core and every drive, through
//! the full stack, where every written block says what it is — and a record, printed at the
//! end, of what was acknowledged, so **the host** can check the disk images block by block.
//!
//! Every block the oracle writes carries a header: magic, LBA, write generation, drive, core,
//! and a CRC32C over the whole block (payload included). Core `c` owns blocks
//! `[c * blocks, (c + 1) * blocks)` of namespace 1 on every drive, and never has two writes
//! to one block in flight, so for each block "the last acknowledged write" is well defined.
//!
//! Checked in the firmware, on every read: the header names the block read, the CRC holds,
//! and the generation is the last acknowledged one — or, after a write to it failed (its
//! result says nothing about whether it reached the medium), that failed one or any later
//! failed one. Checked by the host, on the images (`cargo xtask test`): each block listed
//! holds a block of the same rule, and no block outside the record was touched.
//!
//! The record goes to the console (the host parses it): `oracle block drive=D lba=L
//! acked=A max=M` for every block written.

use core::cell::RefCell;

use critical_section::Mutex;
use keel_blockdev::{BlockOp, BufRef, IoError};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, Cores, DmaRegion};

use crate::drives::{Drive, MAX_DRIVES};
use crate::{JobError, JobResult, Qp, MAX_CORES};

/// `oracle`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int("ms", 1000, "milliseconds of load"),
    OptSpec::int("qd", 32, "I/Os in flight per core (1..=32)"),
    OptSpec::int("cores", 0, "cores (0: every core)"),
    OptSpec::int(
        "blocks",
        256,
        "blocks each core owns on each drive (at most 1024)",
    ),
    OptSpec::int("reads", 40, "percent of I/Os that are reads"),
    OptSpec::int("seed", 1, "seed of the I/O sequence"),
    OptSpec::flag(
        "worker",
        false,
        "one more core is the worker: it recovers a drive (abort, queue reset, controller reset) with every poller's queue pair lent to it",
    ),
    OptSpec::int(
        "fatal_ms",
        0,
        "with worker=on: this many ms into the load the worker makes the first drive fatal (CSTS.CFS, a queue at unmapped memory); 0 = never",
    ),
    OptSpec::int(
        "drain_ms",
        0,
        "after the load, how long I/O still in flight (and the worker's recovery) may take before the job fails instead of waiting; 0 = 4 x io_timeout_ms + 5000",
    ),
    OptSpec::int(
        "remove_ms",
        0,
        "this many ms into the load the first drive is surprise-removed (the board's fault injection, Board::fault_remove): its tags must fail once with Removed, the others go on; 0 = never",
    ),
];

/// Poller cores that can lend their queue pairs to the worker (`worker=on`).
pub const LEND_CORES: usize = 8;
type Lenders<B> = heapless::Vec<keel_reactor::Lender<Qp<B>, LEND_CORES>, MAX_DRIVES>;

/// The header magic.
pub const MAGIC: [u8; 8] = *b"KEELORCL";
/// Bytes of header before the payload.
pub const HEADER: usize = 36;
const MAX_QD: usize = 32;
const MAX_BLOCKS: usize = 1024;

/// CRC32C over a block with its CRC field (bytes 32..36) read as zero.
pub fn block_crc(block: &[u8]) -> u32 {
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut d = crc.digest();
    d.update(&block[..32]);
    d.update(&[0; 4]);
    d.update(&block[HEADER..]);
    d.finalize()
}

/// Fills `block` with what write `gen` of block `lba` (by `core`, on drive `drive`) holds.
pub fn make_block(block: &mut [u8], lba: u64, gen: u64, drive: u32, core: u32) {
    block[..8].copy_from_slice(&MAGIC);
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&gen.to_le_bytes());
    block[24..28].copy_from_slice(&drive.to_le_bytes());
    block[28..32].copy_from_slice(&core.to_le_bytes());
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    for w in block[HEADER..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
    let c = block_crc(block);
    block[32..36].copy_from_slice(&c.to_le_bytes());
}

/// What a block read back says: `None` if it is all zeroes (never written), else
/// `Some(Ok((lba, gen)))` for an intact oracle block, `Some(Err(why))` otherwise.
pub fn parse_block(block: &[u8]) -> Option<Result<(u64, u64), &'static str>> {
    if block.iter().all(|&b| b == 0) {
        return None;
    }
    if block.len() < HEADER || block[..8] != MAGIC {
        return Some(Err("not an oracle block (torn or foreign)"));
    }
    let crc = u32::from_le_bytes([block[32], block[33], block[34], block[35]]);
    if crc != block_crc(block) {
        return Some(Err("CRC mismatch (torn or corrupted)"));
    }
    let lba = u64::from_le_bytes(block[8..16].try_into().unwrap_or_default());
    let gen = u64::from_le_bytes(block[16..24].try_into().unwrap_or_default());
    Some(Ok((lba, gen)))
}

/// Whether a block holding generation `found` is right for a block whose last acknowledged
/// write is `acked`, when writes up to `max` were issued and every one above `acked`
/// failed: exactly `acked`, or one of the failed later ones (0 = never written).
pub fn allowed(found: u64, acked: u64, max: u64) -> bool {
    found == acked || (found > acked && found <= max)
}

/// One block's record.
#[derive(Clone, Copy, Default)]
struct Rec {
    acked: u32,
    max: u32,
    busy: bool,
}

/// What one core of the oracle saw.
#[derive(Clone, Copy, Default)]
struct CoreOut {
    writes_ok: u64,
    writes_failed: u64,
    reads_ok: u64,
    reads_failed: u64,
    /// Reads whose block broke the rule: the finding that fails the job.
    bad_reads: u64,
    error: Option<&'static str>,
    /// The worker's recoveries: calls, queue-pair resets, controller resets, aborts sent.
    recoveries: u64,
    queue_resets: u64,
    controller_resets: u64,
    aborts: u64,
    /// Asynchronous events the worker handled.
    events: u64,
    /// This core's handles: how many it owns, how many were free at the end.
    handles: usize,
    handles_back: usize,
    /// Surprise removal (`remove_ms`): see [`Removal`].
    removal: Removal,
}

/// What one core saw of the first drive's surprise removal (`remove_ms`).
#[derive(Clone, Copy, Default)]
struct Removal {
    /// Its queue pair on the removed drive said `is_removed()` (the pair found CSTS all
    /// ones).
    detected: bool,
    /// Its I/Os in flight on the removed drive just before the poll that detected it.
    in_flight_at_detection: u64,
    /// Completions `IoError::Removed` of I/Os issued before the detection (the tags the pair
    /// failed).
    failed_removed: u64,
    /// Completions `IoError::Removed` of I/Os issued after it (refused by the pair: the
    /// reactor completes a refused I/O with the refusal).
    refused_removed: u64,
    /// The removed drive's I/Os that failed otherwise, or completed Ok after the detection;
    /// `Removed` on another drive.
    unexpected: u64,
    /// Writes acknowledged on the other drives after the removal.
    others_writes_after: u64,
    /// A direct submission to the removed pair at the end was refused `SubmitError::Removed`.
    submit_refused: bool,
}

/// One in-flight I/O.
#[derive(Clone, Copy)]
struct Slot {
    drive: usize,
    block: usize,
    write: bool,
    gen: u32,
    /// Issued after this core's queue pair saw the drive removed.
    after_removal: bool,
}

/// `oracle`: see the module docs.
pub fn oracle<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let ms = cl.int("ms")?;
    let qd = (cl.int("qd")? as usize).clamp(1, MAX_QD);
    let cores = match cl.int("cores")? as usize {
        0 => p.cores().count(),
        n => n,
    }
    .clamp(1, p.cores().count().min(MAX_CORES));
    let blocks = (cl.int("blocks")? as usize).clamp(1, MAX_BLOCKS);
    let reads = cl.int("reads")?.min(100);
    let seed = cl.int("seed")?;
    let worker = cl.flag("worker")?;
    let fatal_ms = cl.int("fatal_ms")?;
    let drain_ms = match cl.int("drain_ms")? {
        0 => cl
            .int("io_timeout_ms")
            .unwrap_or(30_000)
            .saturating_mul(4)
            .saturating_add(5_000),
        ms => ms,
    };
    let remove_ms = cl.int("remove_ms")?;
    if worker && (cores >= p.cores().count() || cores > LEND_CORES) {
        return Err(JobError::Failed(
            "worker=on needs a core beyond the pollers (and at most 8 pollers)",
        ));
    }
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    let list: heapless::Vec<&Drive<B>, MAX_DRIVES> =
        which.iter().map(|&i| &drives.list[i]).collect();
    keel_log::info!("job oracle: start");
    for d in &list {
        let ns = d
            .namespace(1)
            .ok_or(JobError::Failed("a drive has no namespace 1"))?;
        if ns.blocks < (cores * blocks) as u64 {
            return Err(JobError::Failed(
                "namespace 1 is smaller than the oracle's blocks",
            ));
        }
        if (ns.block_size as usize) < HEADER + 8 {
            return Err(JobError::Failed("blocks too small for the oracle's header"));
        }
    }
    let mut meshes: heapless::Vec<crate::reactor::SmallMesh, MAX_DRIVES> = heapless::Vec::new();
    for _ in 0..list.len() {
        let _ = meshes.push(crate::reactor::SmallMesh::new());
    }
    type LinkSlot<'m> = Mutex<RefCell<Option<crate::reactor::MeshLinks<'m>>>>;
    let mut links: heapless::Vec<[LinkSlot<'_>; MAX_CORES], MAX_DRIVES> = heapless::Vec::new();
    for m in meshes.iter_mut() {
        let mut it = keel_reactor::split(m).into_iter();
        let _ = links.push(core::array::from_fn(|_| {
            Mutex::new(RefCell::new(it.next()))
        }));
    }
    let finished = core::sync::atomic::AtomicUsize::new(0);
    let duration_ns = ms.saturating_mul(1_000_000);
    let mut lenders: Lenders<B> = heapless::Vec::new();
    if worker {
        for _ in 0..list.len() {
            let _ = lenders.push(keel_reactor::Lender::new());
        }
    }
    let wanted: [core::sync::atomic::AtomicBool; MAX_DRIVES] =
        core::array::from_fn(|_| core::sync::atomic::AtomicBool::new(false));
    let worker_done = core::sync::atomic::AtomicBool::new(!worker);
    keel_log::info!(
        "oracle: {=usize} cores x {=usize} drives, {=usize} blocks each, QD {=usize}, {=u64}% reads, {=u64} ms",
        cores,
        list.len(),
        blocks,
        qd,
        reads,
        ms
    );
    let removed_at = core::sync::atomic::AtomicU64::new(0);
    let prm = Params {
        fatal_ms,
        remove_ms,
        qd,
        blocks,
        reads,
        seed,
        duration_ns,
        drain_ns: drain_ms.saturating_mul(1_000_000),
        cores,
    };
    let shared = Shared {
        removed_at: &removed_at,
        finished: &finished,
        lenders: &lenders,
        wanted: &wanted,
        worker_done: &worker_done,
    };
    let outs = crate::on_cores(p, cores + worker as usize, |core| {
        if core == cores {
            return recovery_worker(p, &list, prm, &shared);
        }
        // This core's own handles, on its stack (every drive's reactor on this core uses them).
        let aio = crate::reactor::core_handles(core, cores);
        let mut out = core_oracle(p, core, &list, &links, &aio, prm, &shared);
        out.handles = crate::reactor::HANDLES / cores;
        out.handles_back = aio.free_count();
        out
    })?;
    let mut total = CoreOut::default();
    for (c, o) in outs.iter().enumerate() {
        if let Some(e) = o.error {
            keel_log::error!("oracle core {=usize}: {=str}", c, e);
            return Err(JobError::Failed(e));
        }
        total.writes_ok += o.writes_ok;
        total.writes_failed += o.writes_failed;
        total.reads_ok += o.reads_ok;
        total.reads_failed += o.reads_failed;
        total.bad_reads += o.bad_reads;
        total.handles += o.handles;
        total.handles_back += o.handles_back;
        total.recoveries += o.recoveries;
        total.queue_resets += o.queue_resets;
        total.controller_resets += o.controller_resets;
        total.aborts += o.aborts;
        total.events += o.events;
        let (r, t) = (&o.removal, &mut total.removal);
        t.in_flight_at_detection += r.in_flight_at_detection;
        t.failed_removed += r.failed_removed;
        t.refused_removed += r.refused_removed;
        t.unexpected += r.unexpected;
        t.others_writes_after += r.others_writes_after;
    }
    if remove_ms > 0 {
        removal_verdict(
            &outs,
            cores,
            list.first().map_or(0, |d| d.index),
            list.len(),
        )?;
    }
    if worker {
        keel_log::info!(
            "oracle recovery: {=u64} recoveries on the worker core, {=u64} aborts sent, {=u64} queue-pair resets, {=u64} controller resets, {=u64} async events",
            total.recoveries,
            total.aborts,
            total.queue_resets,
            total.controller_resets,
            total.events
        );
    }
    keel_log::info!(
        "oracle summary: writes acknowledged {=u64}, writes failed {=u64}, reads verified {=u64}, reads failed {=u64}, reads that broke the rule {=u64}; handles back {=usize} of {=usize}",
        total.writes_ok,
        total.writes_failed,
        total.reads_ok,
        total.reads_failed,
        total.bad_reads,
        total.handles_back,
        total.handles
    );
    if total.bad_reads > 0 {
        return Err(JobError::Failed(
            "a read returned a block that breaks the rule",
        ));
    }
    if total.writes_ok == 0 {
        return Err(JobError::Failed("no write was acknowledged"));
    }
    if total.handles_back != total.handles {
        return Err(JobError::Failed("I/O handles were not all given back"));
    }
    Ok(())
}

/// The removal's outcome over every core (`remove_ms`): every pair saw the drive gone,
/// every tag in flight then failed once with `Removed`, new work was refused typed, nothing
/// else happened to the drive's I/O, and the other drives went on.
fn removal_verdict<'a>(
    outs: &[CoreOut],
    cores: usize,
    drive: usize,
    drives: usize,
) -> Result<(), JobError<'a>> {
    let detected = outs.iter().filter(|o| o.removal.detected).count();
    let refused = outs.iter().filter(|o| o.removal.submit_refused).count();
    let sum = |f: fn(&Removal) -> u64| outs.iter().map(|o| f(&o.removal)).sum::<u64>();
    let at = sum(|r| r.in_flight_at_detection);
    let failed = sum(|r| r.failed_removed);
    let later = sum(|r| r.refused_removed);
    let unexpected = sum(|r| r.unexpected);
    let others = sum(|r| r.others_writes_after);
    keel_log::info!(
        "oracle removal: drive {=usize} removed; detected by {=usize} of {=usize} queue pairs; in flight at detection {=u64}, failed Removed {=u64}; later I/Os refused Removed {=u64}; a submit after refused SubmitError::Removed on {=usize} pairs; unexpected outcomes {=u64}; writes acknowledged on the other drives after the removal {=u64}",
        drive,
        detected,
        cores,
        at,
        failed,
        later,
        refused,
        unexpected,
        others
    );
    if detected != cores || refused != cores {
        return Err(JobError::Failed(
            "not every queue pair of the removed drive saw it gone and refused new work",
        ));
    }
    if failed != at || unexpected > 0 {
        return Err(JobError::Failed(
            "the removed drive's tags did not all fail once with Removed",
        ));
    }
    if drives > 1 && others == 0 {
        return Err(JobError::Failed(
            "the other drives did no work after the removal",
        ));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Params {
    fatal_ms: u64,
    remove_ms: u64,
    qd: usize,
    blocks: usize,
    reads: u64,
    seed: u64,
    duration_ns: u64,
    /// `drain_ms`: the most the end of the load may wait for I/O and recovery to settle.
    drain_ns: u64,
    cores: usize,
}

/// What the pollers and the worker share.
struct Shared<'s, B: Board> {
    /// When the first drive was removed (`remove_ms`; board clock ns, 0 = not yet).
    removed_at: &'s core::sync::atomic::AtomicU64,
    /// Pollers past their load.
    finished: &'s core::sync::atomic::AtomicUsize,
    /// One per drive with `worker=on` (else empty).
    lenders: &'s Lenders<B>,
    /// Per drive: a poller found its queue pair needs recovery.
    wanted: &'s [core::sync::atomic::AtomicBool; MAX_DRIVES],
    /// The worker is done (or there is none): pollers may stop answering the lender.
    worker_done: &'s core::sync::atomic::AtomicBool,
}

/// The worker core (`worker=on`): never a poller. When a poller flags a drive (a queue pair
/// needs recovery) or the controller is fatal, it recalls every poller's queue pair of that
/// drive through the drive's lender — the pollers keep polling and staging meanwhile — runs
/// `Controller::recover` on them (abort → queue-pair reset → controller reset), and gives them
/// back; every outcome reaches its issuer on the owner's next polls. Other drives go on.
fn recovery_worker<B: Board>(
    b: &B,
    list: &[&Drive<B>],
    prm: Params,
    sh: &Shared<'_, B>,
) -> CoreOut {
    use core::sync::atomic::Ordering;
    let mut out = CoreOut::default();
    let clock = b.clock();
    let fatal_at = match prm.fatal_ms {
        0 => None,
        ms => Some(clock.now_ns().saturating_add(ms.saturating_mul(1_000_000))),
    };
    let mut fatal_done = false;
    let mut next_events = 0u64;
    let give_up_at = clock
        .now_ns()
        .saturating_add(prm.duration_ns)
        .saturating_add(prm.drain_ns);
    b.cores().polled(|| loop {
        let pollers_done = sh.finished.load(Ordering::Acquire) >= prm.cores;
        // Asynchronous events are the worker's too (seed 003: admin commands wait), every
        // millisecond: each event's log page is read, its AER re-posted.
        if clock.now_ns() >= next_events {
            next_events = clock.now_ns().saturating_add(1_000_000);
            for drive in list.iter() {
                let mut ctrl = drive.ctrl.lock();
                if !ctrl.is_fatal() {
                    let _ = ctrl.poll_events(|_| out.events += 1);
                }
            }
        }
        if let (Some(at), false, Some(d0)) = (fatal_at, fatal_done, list.first()) {
            if clock.now_ns() >= at {
                fatal_done = true;
                // A qid beyond the pollers' (1..=cores).
                let qid = prm.cores as u16 + 1;
                let r = if (qid as usize) <= d0.queues() {
                    crate::nvme::make_fatal(&mut d0.ctrl.lock(), b, &d0.pci, qid)
                } else {
                    Err(JobError::Failed("no spare queue id to make the drive fatal with"))
                };
                match r {
                    Ok(()) => keel_log::warn!(
                        "oracle worker: drive {=usize} made fatal (queue {=u16} at unmapped memory)",
                        d0.index,
                        qid
                    ),
                    Err(_) => out.error = Some("could not make the drive fatal"),
                }
            }
        }
        let mut any = false;
        for (d, drive) in list.iter().enumerate() {
            let Some(lender) = sh.lenders.get(d) else {
                continue;
            };
            let flagged = sh.wanted[d].swap(false, Ordering::AcqRel);
            if !(flagged || drive.ctrl.lock().is_fatal()) {
                continue;
            }
            any = true;
            for c in 0..prm.cores {
                // A pair given back last time may not be home yet: its poller takes it soon.
                while !lender.recall(c) {
                    b.cores().relax();
                }
            }
            let deadline = clock.now_ns().saturating_add(5_000_000_000);
            while !(0..prm.cores).all(|c| lender.answered(c)) {
                if clock.now_ns() > deadline {
                    out.error = Some("a poller did not lend its queue pair within 5 s");
                    break;
                }
                b.cores().relax();
            }
            let mut qps: heapless::Vec<(usize, Qp<B>), LEND_CORES> = heapless::Vec::new();
            for c in 0..prm.cores {
                if let Some(q) = lender.take(c) {
                    let _ = qps.push((c, q));
                }
            }
            let r = {
                let mut refs: heapless::Vec<&mut Qp<B>, LEND_CORES> =
                    qps.iter_mut().map(|(_, q)| q).collect();
                drive.ctrl.lock().recover(&mut refs)
            };
            out.recoveries += 1;
            match r {
                Ok(rep) => {
                    out.queue_resets += rep.queue_resets as u64;
                    out.controller_resets += rep.controller_reset as u64;
                    out.aborts += rep.aborts_sent as u64;
                    keel_log::info!("oracle worker: drive {=usize} {}", drive.index, rep);
                }
                Err(e) => {
                    out.controller_resets += 1;
                    keel_log::error!(
                        "oracle worker: drive {=usize} recovery failed: {}",
                        drive.index,
                        e
                    );
                }
            }
            for (c, q) in qps {
                if lender.give_back(c, q).is_err() {
                    out.error = Some("a lent queue pair could not be given back");
                }
            }
        }
        if pollers_done && !any {
            sh.worker_done.store(true, Ordering::Release);
            break;
        }
        // A recovery that never settles must fail the job, not hang it.
        if pollers_done && clock.now_ns() >= give_up_at {
            out.error = Some("recovery did not settle a drive within drain_ms of the load's end");
            keel_log::error!("oracle worker: a drive still needs recovery after drain_ms: giving up");
            sh.worker_done.store(true, Ordering::Release);
            break;
        }
        if !any {
            b.cores().relax();
        }
    });
    out
}

/// One core's oracle: a reactor per drive, its own blocks, its record printed at the end.
#[allow(clippy::too_many_arguments)]
fn core_oracle<B: Board>(
    b: &B,
    core: usize,
    list: &[&Drive<B>],
    links: &[[Mutex<RefCell<Option<crate::reactor::MeshLinks<'_>>>>; MAX_CORES]],
    aio: &crate::reactor::Handles,
    prm: Params,
    sh: &Shared<'_, B>,
) -> CoreOut {
    use core::sync::atomic::Ordering;
    let finished = sh.finished;
    let mut out = CoreOut::default();
    let nd = list.len();
    let bs = list
        .iter()
        .filter_map(|d| d.namespace(1))
        .map(|n| n.block_size as usize)
        .max()
        .unwrap_or(512);
    let mut bufs: heapless::Vec<DmaRegion, MAX_QD> = heapless::Vec::new();
    for _ in 0..prm.qd {
        match crate::storage::dma(b.dma(), bs) {
            Ok(d) => {
                let _ = bufs.push(d);
            }
            Err(_) => out.error = Some("DMA pool exhausted"),
        }
    }
    let mut reactors: heapless::Vec<crate::reactor::Remote<'_, Qp<B>>, MAX_DRIVES> =
        heapless::Vec::new();
    for (d, drive) in list.iter().enumerate() {
        let qp = if core < drive.queues().max(1) {
            match drive
                .ctrl
                .lock()
                .create_io_qpair(b.dma(), core as u16 + 1, 256)
            {
                Ok(q) => Some(q),
                Err(_) => {
                    out.error = Some("could not create an I/O queue pair");
                    None
                }
            }
        } else {
            None
        };
        let Some(l) = critical_section::with(|cs| links[d][core].borrow_ref_mut(cs).take()) else {
            out.error = Some("no message links");
            continue;
        };
        let _ = reactors.push(crate::reactor::Remote {
            reactor: keel_reactor::Reactor::new(l, aio, qp),
            owner: drive.owner(core),
        });
    }
    let mut recs = [[Rec::default(); MAX_BLOCKS]; MAX_DRIVES];
    let mut slots: [Option<Slot>; MAX_QD] = [None; MAX_QD];
    let mut scratch = [0u8; 4096];
    let clock = b.clock();
    let mut rng = prm.seed ^ (core as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let base = |c: usize| (c * prm.blocks) as u64;
    let start = clock.now_ns();
    let end = start.saturating_add(prm.duration_ns);
    let drain_by = end.saturating_add(prm.drain_ns);
    let remove_at = match prm.remove_ms {
        0 => None,
        ms => Some(start.saturating_add(ms.saturating_mul(1_000_000))),
    };
    let mut stopping = out.error.is_some() || reactors.len() != nd;
    let mut in_flight = 0usize;
    b.cores().polled(|| loop {
        // Core 0 pulls the first drive out at `remove_ms` (fault injection: the board makes
        // it look removed; the driver finds out on its own).
        if let (0, Some(at)) = (core, remove_at) {
            if sh.removed_at.load(Ordering::Acquire) == 0 && clock.now_ns() >= at {
                if !b.fault_remove(&list[0].pci) {
                    out.error = Some("the board cannot remove a drive (Board::fault_remove)");
                }
                keel_log::warn!(
                    "oracle: drive {=usize} surprise-removed ({=u64} ms into the load)",
                    list[0].index,
                    prm.remove_ms
                );
                sh.removed_at.store(clock.now_ns().max(1), Ordering::Release);
            }
        }
        // Issue into every free slot (none once stopping: the loop below breaks at once).
        for _ in 0..if stopping { 0 } else { prm.qd } {
            let Some(s) = slots[..prm.qd].iter().position(|s| s.is_none()) else {
                break;
            };
            let d = (next() % nd as u64) as usize;
            let blk = (next() % prm.blocks as u64) as usize;
            let rec = &mut recs[d][blk];
            if rec.busy {
                break;
            }
            let lba = base(core) + blk as u64;
            let len = list[d].namespace(1).map_or(512, |n| n.block_size as usize);
            let Ok(buf) = BufRef::new(&bufs[s], 0, len) else {
                break;
            };
            let read = rec.max > 0 && next() % 100 < prm.reads;
            let (op, gen) = if read {
                (
                    BlockOp::Read {
                        ns: 1,
                        lba,
                        blocks: 1,
                        buf,
                    },
                    0,
                )
            } else {
                let gen = rec.max + 1;
                make_block(&mut scratch[..len], lba, gen as u64, list[d].index as u32, core as u32);
                if bufs[s].write_bytes(0, &scratch[..len]).is_err() {
                    break;
                }
                (
                    BlockOp::Write {
                        ns: 1,
                        lba,
                        blocks: 1,
                        buf,
                    },
                    gen,
                )
            };
            let t = &mut reactors[d];
            match t.reactor.submit_to(t.owner, op, s as u32) {
                Ok(()) => {
                    rec.busy = true;
                    if !read {
                        rec.max = gen;
                    }
                    slots[s] = Some(Slot {
                        drive: d,
                        block: blk,
                        write: !read,
                        gen,
                        after_removal: d == 0 && out.removal.detected,
                    });
                    in_flight += 1;
                }
                Err(_) => break,
            }
        }
        // Reap (and answer the worker: lend a queue pair it recalls, take it back).
        for (d, t) in reactors.iter_mut().enumerate() {
            let watch = d == 0 && remove_at.is_some() && !out.removal.detected;
            let before = if watch {
                slots.iter().flatten().filter(|s| s.drive == 0).count()
            } else {
                0
            };
            t.reactor.poll();
            if watch && t.reactor.with_queue(|q| q.is_removed()) == Some(true) {
                out.removal.detected = true;
                out.removal.in_flight_at_detection = before as u64;
            }
            if let Some(lender) = sh.lenders.get(d) {
                lender.service(&mut t.reactor);
                if t.reactor.with_queue(|q| q.needs_recovery()) == Some(true) {
                    sh.wanted[d].store(true, Ordering::Release);
                }
            }
            while let Some(c) = t.reactor.next_completion() {
                let Some(slot) = slots.get_mut(c.cookie as usize).and_then(|s| s.take()) else {
                    out.bad_reads += 1; // a cookie the oracle never issued
                    continue;
                };
                in_flight -= 1;
                let rec = &mut recs[slot.drive][slot.block];
                rec.busy = false;
                if remove_at.is_some() {
                    let r = &mut out.removal;
                    let removed = sh.removed_at.load(Ordering::Acquire) != 0;
                    match (slot.drive, c.result) {
                        (0, Err(IoError::Removed)) if slot.after_removal => r.refused_removed += 1,
                        (0, Err(IoError::Removed)) => r.failed_removed += 1,
                        (0, Err(_)) => r.unexpected += 1,
                        (0, Ok(())) if r.detected => r.unexpected += 1,
                        (_, Err(IoError::Removed)) => r.unexpected += 1,
                        (_, Ok(())) if slot.write && removed => r.others_writes_after += 1,
                        _ => {}
                    }
                }
                match (slot.write, c.result) {
                    (true, Ok(())) => {
                        out.writes_ok += 1;
                        rec.acked = slot.gen;
                    }
                    (true, Err(e)) => {
                        out.writes_failed += 1;
                        log_error(core, "write", e);
                    }
                    (false, Err(e)) => {
                        out.reads_failed += 1;
                        log_error(core, "read", e);
                    }
                    (false, Ok(())) => {
                        let len = list[slot.drive].namespace(1).map_or(512, |n| n.block_size as usize);
                        let lba = base(core) + slot.block as u64;
                        let ok = bufs[c.cookie as usize].read_bytes(0, &mut scratch[..len]).is_ok()
                            && match parse_block(&scratch[..len]) {
                                None => rec.acked == 0,
                                Some(Ok((l, g))) => l == lba && allowed(g, rec.acked as u64, rec.max as u64),
                                Some(Err(_)) => false,
                            };
                        if ok {
                            out.reads_ok += 1;
                        } else {
                            out.bad_reads += 1;
                            keel_log::error!(
                                "oracle core {=usize}: drive {=usize} lba {=u64} read back wrong (acked gen {=u32}, max {=u32})",
                                core,
                                list[slot.drive].index,
                                lba,
                                rec.acked,
                                rec.max
                            );
                        }
                    }
                }
            }
        }
        if !stopping && clock.now_ns() >= end {
            stopping = true;
            finished.fetch_add(1, Ordering::AcqRel);
        }
        // Done when this core's I/O is back and every core is done (owners serve the others).
        if stopping && in_flight == 0 && finished.load(Ordering::Acquire) >= prm.cores {
            break;
        }
        // I/O that never comes back (a recovery that never settles it) fails the job instead of
        // hanging it. Its buffers stay with the device: nothing here touches them again.
        if stopping && in_flight > 0 && clock.now_ns() >= drain_by {
            out.error = Some("I/O still in flight drain_ms after the load's end");
            keel_log::error!(
                "oracle core {=usize}: {=usize} I/Os still in flight drain_ms after the load: giving up",
                core,
                in_flight
            );
            break;
        }
        if stopping && out.error.is_some() && in_flight == 0 {
            finished.fetch_add(1, Ordering::AcqRel);
            break;
        }
    });
    // Answer the worker until it is done (a pair it holds comes back first).
    while !sh.worker_done.load(Ordering::Acquire)
        || reactors
            .iter()
            .enumerate()
            .any(|(d, t)| sh.lenders.get(d).is_some_and(|_| t.reactor.is_lent()))
    {
        for (d, t) in reactors.iter_mut().enumerate() {
            t.reactor.poll();
            if let Some(lender) = sh.lenders.get(d) {
                lender.service(&mut t.reactor);
            }
        }
        b.cores().relax();
    }
    // Make the acknowledged writes durable, then give the queues back.
    for (d, t) in reactors.iter_mut().enumerate() {
        let _ = t.reactor.quiesce(1_000_000);
        if let Ok(mut q) = t.reactor.take_queue() {
            let clock = b.clock();
            if q.is_removed() {
                // Nothing to flush on a gone device; new work is refused, typed.
                out.removal.submit_refused =
                    keel_blockdev::BlockQueue::submit(&mut q, BlockOp::Flush { ns: 1 }, 0)
                        == Err(keel_blockdev::SubmitError::Removed);
            } else if crate::storage::sync_op(&mut q, &clock, BlockOp::Flush { ns: 1 }).is_err() {
                out.error = Some("flush failed");
            }
            if let Err((e, _)) = list[d].ctrl.lock().delete_io_qpair(b.dma(), q) {
                keel_log::warn!("oracle core {=usize}: delete queue pair: {}", core, e);
            }
        }
    }
    for (d, drive) in list.iter().enumerate() {
        for (blk, r) in recs[d].iter().enumerate().take(prm.blocks) {
            if r.max > 0 {
                // On the console (not the binary log): the host parses it, and so does a test
                // on the model board.
                b.print(format_args!(
                    "oracle block drive={} lba={} acked={} max={}",
                    drive.index,
                    base(core) + blk as u64,
                    r.acked,
                    r.max
                ));
            }
        }
    }
    for d in bufs {
        keel_hal::DmaAllocator::free(b.dma(), d);
    }
    out
}

fn log_error(core: usize, what: &'static str, e: IoError) {
    keel_log::debug!("oracle core {=usize}: {=str} failed: {}", core, what, e);
}
