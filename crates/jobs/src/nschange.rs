//! `nschange`: a namespace attached and detached while I/O runs (issue 16).
//!
//! Core 1 does write → read → verify on namespace 1 all along, through its own queue pair.
//! Core 0 owns the controller (the worker path): it attaches the detached namespace `ns` to
//! this controller (Namespace Attachment), waits for the namespace-attribute notice, whose
//! Changed Namespace List read and rescan add it (`Controller::poll_events`), checks the
//! attached-controller list, writes `writes` commands of a pattern to it and reads each back,
//! flushes, then detaches it again and waits for the notice that removes it. I/O to it is
//! then refused typed — by the device on a pair created before (`IoError::Invalid`), by the
//! driver on a pair given the new list (`SubmitError::InvalidNamespace`) — while core 1 goes
//! on. The host then checks both images byte for byte.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, SubmitError};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, Cores, DmaAllocator};
use keel_nvme::{AsyncEvent, AttachError, NsState, NvmeError};

use crate::drives::Drive;
use crate::storage::{self, Shape, StorageError};
use crate::{Ctrl, JobError, JobResult};

/// `nschange`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int(
        "ns",
        2,
        "the detached namespace to attach, write, and detach again",
    ),
    OptSpec::int(
        "writes",
        32,
        "commands written (and read back) to it while attached",
    ),
    OptSpec::int("blocks", 16, "blocks per command (both namespaces)"),
    OptSpec::int("lba", 2048, "first block written on both namespaces"),
    OptSpec::int(
        "ns1_blocks",
        256,
        "blocks of namespace 1 core 1 keeps rewriting from `lba` on",
    ),
    OptSpec::int("seed", 0x6e73_6368, "seed of the data pattern"),
];

/// How long core 0 waits for each notice.
const EVENT_WAIT_NS: u64 = 2_000_000_000;
/// Namespace 1 commands core 1 must complete after the detach before the job stops.
const AFTER_DETACH: u64 = 8;

/// The job's phases, as core 1 sees them (what its commands count towards).
const BEFORE: u8 = 0;
const ATTACHED: u8 = 1;
const DETACHED: u8 = 2;
const STOP: u8 = 3;

/// What both cores share: the write shape (on either namespace) and core 1's progress.
struct Shared {
    blocks: u32,
    lba: u64,
    seed: u64,
    /// The job's phase (what core 1's commands count towards).
    phase: AtomicU8,
    /// Namespace 1 commands verified, by phase (before, attached, detached).
    done: [AtomicU64; 3],
    failed: AtomicU64,
}

/// `nschange`: see the module docs.
pub fn nschange<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let nsid = cl.int("ns")? as u32;
    let writes = cl.int("writes")?;
    let blocks = cl.int("blocks")?.clamp(1, 256) as u32;
    let lba = cl.int("lba")?;
    let ns1_blocks = cl.int("ns1_blocks")?.max(blocks as u64);
    let seed = cl.int("seed")?;
    if nsid < 2 {
        return Err(JobError::Failed("ns= must name a namespace other than 1"));
    }
    if p.cores().count() < 2 {
        return Err(JobError::Failed("nschange needs 2 cores"));
    }
    let index = cl.int("drive")? as usize;
    let d = crate::drives::open_one(p, cl, index)?;
    keel_log::info!("job nschange: start");
    let ns1 = *d.namespace(1).ok_or(JobError::Failed("no namespace 1"))?;
    if d.namespace(nsid).is_some() {
        return Err(JobError::Failed("the namespace is attached already"));
    }
    if lba.saturating_add(ns1_blocks) > ns1.blocks {
        return Err(JobError::Failed(
            "namespace 1 is smaller than lba + ns1_blocks",
        ));
    }
    let sh = Shared {
        blocks,
        lba,
        seed,
        phase: AtomicU8::new(BEFORE),
        done: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        failed: AtomicU64::new(0),
    };
    let outs = crate::on_cores(p, 2, |core| -> Result<(), &'static str> {
        if core == 1 {
            return ns1_load(p, &d, ns1_blocks, &sh);
        }
        let r = worker(p, &d, nsid, writes, &sh);
        // Core 1 stops whatever happened here.
        sh.phase.store(STOP, Ordering::Release);
        r
    })?;
    for (c, o) in outs.iter().enumerate() {
        if let Err(e) = o {
            keel_log::error!("nschange core {=usize}: {=str}", c, e);
            return Err(JobError::Failed(e));
        }
    }
    let n = |i: usize| sh.done[i].load(Ordering::Acquire);
    let failed = sh.failed.load(Ordering::Acquire);
    keel_log::info!(
        "nschange ns 1: writes verified {=u64} before the attach, {=u64} while ns {=u32} was attached, {=u64} after the detach; failed {=u64}",
        n(0),
        n(1),
        nsid,
        n(2),
        failed
    );
    if failed > 0 || n(2) < AFTER_DETACH {
        return Err(JobError::Failed("namespace 1 did not keep working"));
    }
    Ok(())
}

/// Core 1: write → read → verify on namespace 1, `blocks` at a time over
/// `lba..lba + ns1_blocks`, until core 0 says stop; counted by phase.
fn ns1_load<B: Board>(
    p: &B,
    d: &Drive<B>,
    ns1_blocks: u64,
    sh: &Shared,
) -> Result<(), &'static str> {
    let (blocks, lba, seed) = (sh.blocks, sh.lba, sh.seed);
    let (phase, done, failed) = (&sh.phase, &sh.done, &sh.failed);
    let bs = d.namespace(1).map_or(512, |n| n.block_size) as usize;
    let len = blocks as usize * bs;
    let mut qp = d
        .ctrl
        .lock()
        .create_io_qpair(p.dma(), 2, 64)
        .map_err(|_| "core 1: could not create its queue pair")?;
    let (Ok(wbuf), Ok(rbuf)) = (storage::dma(p.dma(), len), storage::dma(p.dma(), len)) else {
        return Err("DMA pool exhausted");
    };
    let clock = p.clock();
    let groups = ns1_blocks / blocks as u64;
    let mut k = 0u64;
    let mut r = Ok(());
    loop {
        let now = phase.load(Ordering::Acquire);
        if now == STOP {
            break;
        }
        let shape = Shape {
            name: "nschange ns 1",
            buf_offset: 0,
            blocks,
            lba: lba + (k % groups) * blocks as u64,
        };
        k += 1;
        match storage::write_read_verify(&mut qp, &clock, 1, &shape, &wbuf, &rbuf, seed) {
            Ok(()) => {
                done[now as usize].fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                keel_log::error!("nschange core 1: ns 1 lba {=u64}: {}", shape.lba, e);
                failed.fetch_add(1, Ordering::AcqRel);
                r = Err("namespace 1 I/O failed");
                break;
            }
        }
    }
    if storage::sync_op(&mut qp, &clock, BlockOp::Flush { ns: 1 }).is_err() {
        r = Err("namespace 1 flush failed");
    }
    if let Err((e, _)) = d.ctrl.lock().delete_io_qpair(p.dma(), qp) {
        keel_log::warn!("nschange core 1: delete queue pair: {}", e);
    }
    p.dma().free(wbuf);
    p.dma().free(rbuf);
    r
}

/// Waits (polling events on the controller) for a namespace change of `nsid`; returns its
/// new state.
fn wait_change<B: Board>(p: &B, ctrl: &mut Ctrl<B>, nsid: u32) -> Result<NsState, &'static str> {
    let clock = p.clock();
    let t0 = clock.now_ns();
    let mut got = None;
    while got.is_none() {
        if clock.now_ns().saturating_sub(t0) > EVENT_WAIT_NS {
            return Err("no namespace-attribute notice came");
        }
        ctrl.poll_events(|e| {
            if let AsyncEvent::NamespacesChanged { changes, .. } = e {
                for c in changes.iter().filter(|c| c.nsid == nsid) {
                    got = Some(c.state);
                }
            }
        })
        .map_err(|_| "poll events failed")?;
        clock.delay_us(500);
    }
    got.ok_or("no namespace-attribute notice came")
}

/// Whether this controller is in `nsid`'s attached-controller list.
fn listed<B: Board>(ctrl: &mut Ctrl<B>, nsid: u32) -> Result<bool, &'static str> {
    let me = ctrl.identify().cntlid;
    let mut list: heapless::Vec<u16, 16> = heapless::Vec::new();
    ctrl.attached_controllers(nsid, &mut list)
        .map_err(|e| match e {
            NvmeError::Attach(AttachError::NoSuchNamespace) => "no such namespace in the subsystem",
            _ => "could not read the attached-controller list",
        })?;
    Ok(list.contains(&me))
}

/// Core 0, the controller's owner: attach, write and verify, detach, refusals.
fn worker<B: Board>(
    p: &B,
    d: &Drive<B>,
    nsid: u32,
    writes: u64,
    sh: &Shared,
) -> Result<(), &'static str> {
    let (blocks, lba, seed) = (sh.blocks, sh.lba, sh.seed);
    let (phase, done) = (&sh.phase, &sh.done);
    let clock = p.clock();
    // Namespace 1 I/O is under way first.
    let t0 = clock.now_ns();
    while done[0].load(Ordering::Acquire) < 4 {
        if clock.now_ns().saturating_sub(t0) > EVENT_WAIT_NS {
            return Err("namespace 1 I/O did not start");
        }
        p.cores().relax();
    }
    let mut ctrl = d.ctrl.lock();
    let me = ctrl.identify().cntlid;
    if !ctrl.identify().namespace_attachment {
        return Err("the controller has no Namespace Attachment (OACS bit 3)");
    }
    if listed::<B>(&mut ctrl, nsid)? {
        return Err("the namespace is attached already");
    }
    ctrl.attach_namespace(nsid, &[me]).map_err(|e| {
        keel_log::error!("nschange: attach: {}", e);
        "attach refused"
    })?;
    phase.store(ATTACHED, Ordering::Release);
    let ns = match wait_change::<B>(p, &mut ctrl, nsid)? {
        NsState::Added(ns) => ns,
        other => {
            keel_log::error!("nschange: ns {=u32} after attach: {}", nsid, other);
            return Err("the rescan did not add the attached namespace");
        }
    };
    let on_list = listed::<B>(&mut ctrl, nsid)?;
    keel_log::info!(
        "nschange ns {=u32} attached to controller {=u16}: notice, changed list read, rescan: added, {=u64} blocks of {=u32} B; attached-controller list names us {=bool}",
        nsid,
        me,
        ns.blocks,
        ns.block_size,
        on_list
    );
    if !on_list {
        return Err("the attached-controller list does not name this controller");
    }
    if lba.saturating_add(writes * blocks as u64) > ns.blocks {
        return Err("writes past the end of the attached namespace");
    }
    let mut qp = crate::nvme::qpair(&mut ctrl, p, 1).map_err(|_| "core 0: no queue pair")?;
    let len = blocks as usize * ns.block_size as usize;
    let (Ok(wbuf), Ok(rbuf)) = (storage::dma(p.dma(), len), storage::dma(p.dma(), len)) else {
        return Err("DMA pool exhausted");
    };
    let r = (|| {
        for k in 0..writes {
            let shape = Shape {
                name: "nschange",
                buf_offset: 0,
                blocks,
                lba: lba + k * blocks as u64,
            };
            storage::write_read_verify(&mut qp, &clock, nsid, &shape, &wbuf, &rbuf, seed).map_err(
                |e| {
                    keel_log::error!("nschange: ns {=u32} write {=u64}: {}", nsid, k, e);
                    "write, read back, verify on the attached namespace"
                },
            )?;
        }
        storage::sync_op(&mut qp, &clock, BlockOp::Flush { ns: nsid })
            .map_err(|_| "flush of the attached namespace")?;
        keel_log::info!(
            "nschange ns {=u32}: {=u64} writes of {=u32} blocks at lba {=u64} read back and verified, flushed",
            nsid,
            writes,
            blocks,
            lba
        );
        ctrl.detach_namespace(nsid, &[me]).map_err(|e| {
            keel_log::error!("nschange: detach: {}", e);
            "detach refused"
        })?;
        match wait_change::<B>(p, &mut ctrl, nsid)? {
            NsState::Removed(_) => {}
            other => {
                keel_log::error!("nschange: ns {=u32} after detach: {}", nsid, other);
                return Err("the rescan did not remove the detached namespace");
            }
        }
        let still = listed::<B>(&mut ctrl, nsid)?;
        let read = BlockOp::Read {
            ns: nsid,
            lba,
            blocks,
            buf: BufRef::new(&rbuf, 0, len).map_err(|_| "DMA")?,
        };
        // The pair still lists the namespace: the device answers.
        let device = storage::sync_op(&mut qp, &clock, read);
        ctrl.refresh_namespaces(&mut qp);
        let driver = qp.submit(read, 1);
        keel_log::info!(
            "nschange ns {=u32} detached: notice, changed list read, rescan: removed; attached-controller list names us {=bool}; a read on the pair created before: {} (device); after refresh_namespaces: {} (driver)",
            nsid,
            still,
            device,
            driver
        );
        if still {
            return Err("the attached-controller list still names this controller");
        }
        if device != Err(StorageError::Io(IoError::Invalid)) {
            return Err("the device did not refuse I/O to the detached namespace");
        }
        if driver != Err(SubmitError::InvalidNamespace) {
            return Err("the driver did not refuse I/O to the detached namespace");
        }
        Ok(())
    })();
    phase.store(DETACHED, Ordering::Release);
    drop(ctrl);
    // Namespace 1 goes on after the detach.
    let t0 = clock.now_ns();
    while r.is_ok() && done[2].load(Ordering::Acquire) < AFTER_DETACH {
        if clock.now_ns().saturating_sub(t0) > EVENT_WAIT_NS {
            break; // the job's verdict says so
        }
        p.cores().relax();
    }
    if let Err((e, _)) = d.ctrl.lock().delete_io_qpair(p.dma(), qp) {
        keel_log::warn!("nschange core 0: delete queue pair: {}", e);
    }
    p.dma().free(wbuf);
    p.dma().free(rbuf);
    r
}
