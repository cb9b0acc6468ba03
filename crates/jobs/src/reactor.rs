//! The `reactor` job: one run-to-completion reactor per core, SPDK style, over the real NVMe
//! controller. Every core does I/O at once, cores send requests to each other's queue pairs,
//! core 1 hands its queue pair to a spare core in the middle of I/O, and core 2 shuts its queue
//! pair down in the middle of I/O. At the end every core reports, and the job asserts:
//! submitted == completed + failed on every reactor, every I/O handle back in its array,
//! every issued request answered exactly once, and every queue pair deleted exactly once.
//!
//! Everything the cores share lives in one [`Shared`] value on core 0's stack, borrowed by the
//! work every core runs: no statics.

use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use critical_section::Mutex;
use keel_aio::Aio;
use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError};
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, DmaRegion};
use keel_reactor::{split, Links, MeshStorage, Msg, Reactor, ReactorError};
use keel_slots::{words_for, CloseDuty, Teardown};

use crate::{JobError, JobResult, Qp, MAX_CORES};

/// `reactor`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int("ios", 2000, "I/Os per core"),
    OptSpec::int("qd", 16, "I/Os in flight per core (at most 32)"),
];

/// I/O handle indexes of a job, divided between its cores ([`core_handles`]).
pub const HANDLES: usize = 512;
const W: usize = words_for(HANDLES);
/// Messages each ring holds (16 × 16 rings: 32 keeps the mesh within ~600 KiB of stack).
const RING: usize = 32;
const MAX_QD: usize = 32;

/// One core's I/O handle array (its share of the job's [`HANDLES`] indexes).
pub type Handles = Aio<HANDLES, W>;

/// The handle array of `core` of `cores`: its own share of the [`HANDLES`] indexes, so an
/// index names one core's handle wherever it travels. Built on that core, used only there
/// (`Aio` is `!Sync`: the compiler refuses to share it with another core).
pub fn core_handles(core: usize, cores: usize) -> Handles {
    let per = HANDLES / cores.clamp(1, MAX_CORES);
    Aio::for_range(core * per..(core + 1) * per)
}
/// The message rings between the cores.
pub type Mesh = MeshStorage<Msg, MAX_CORES, RING>;
/// A mesh with shallow rings, for jobs that need one per drive (a core runs a reactor per
/// drive): 8 messages per ring keeps four of them well within core 0's stack.
pub type SmallMesh = MeshStorage<Msg, MAX_CORES, 8>;
/// One core's ends of the [`Mesh`].
pub type MeshLinks<'m> = Links<'m, Msg, MAX_CORES>;
/// A reactor over queue pairs of type `Q`.
pub type R<'m, Q> = Reactor<'m, Q, MAX_CORES, HANDLES, W>;

#[derive(Clone, Copy, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
struct CoreReport {
    issued: u64,
    ok: u64,
    failed: u64,
    /// Failures other than `Aborted` (a send refused because its queue pair was gone).
    failed_other: u64,
    stats: keel_reactor::Stats,
    handed_off: bool,
    shut_down: bool,
    /// This core's handles: how many it owns, how many were free at the end.
    handles: usize,
    handles_back: usize,
}

/// A value one core leaves for another.
type Slot<T> = Mutex<RefCell<Option<T>>>;

/// What the cores of one `reactor` run share.
struct Shared<Q> {
    /// Cores `0..owners` start with a queue pair.
    owners: usize,
    ios: u64,
    qd: usize,
    cores: usize,
    blocks_per_core: u64,
    /// A queue pair in transit from core 1 to the spare core.
    handoff: Mutex<RefCell<Option<Q>>>,
    /// Set by the message core 1 sends the spare: the queue pair is waiting in `handoff`.
    adopt_pending: AtomicBool,
    /// Which core serves the I/O that used to go to core 1 (changes at handoff).
    owner_of_1: AtomicUsize,
    finished: AtomicUsize,
    /// Queue pairs given back at the end, and whether their owner claimed the close mid-run
    /// (core 0, which owns the admin queue, deletes them once every core has returned).
    retired: [Slot<(Q, bool)>; MAX_CORES],
    /// Each queue pair's must-close flag (seed 002): whoever clears it closes.
    teardown: [Teardown; MAX_CORES],
}

/// Where I/O number `i` of `core` goes: three in four to its own queue pair, the rest to
/// another core's; a core without a queue pair (spare, handed off, shut down) sends elsewhere.
fn owner_for<Q>(sh: &Shared<Q>, core: usize, i: u64, owners: usize, has_queue: bool) -> usize {
    let mut t = if i % 4 == 3 || !has_queue {
        (core + 1 + (i as usize / 4)) % owners
    } else {
        core
    };
    if t == core && !has_queue {
        t = 0;
    }
    if t == 1 {
        sh.owner_of_1.load(Ordering::Acquire)
    } else {
        t
    }
}

/// Quiesces `r`, reporting progress while it waits (the wait must end: every I/O either
/// completes or times out in the driver).
fn quiesce<Q: BlockQueue>(core: usize, r: &mut R<'_, Q>) -> usize {
    let mut rounds = 0u64;
    loop {
        let left = r.quiesce(100_000);
        if left == 0 {
            return 0;
        }
        rounds += 1;
        keel_log::warn!(
            "core {=usize}: quiescing: {=usize} in flight, {=usize} staged, stats {}",
            core,
            left,
            r.staged(),
            r.stats()
        );
        if rounds > 1000 {
            return left;
        }
    }
}

/// One core's reactor: issues `ios` I/Os (reads and writes of 8 blocks) at `qd`, serves
/// other cores' requests, and plays its part in the handoff and the shutdown.
fn core_main<Q: BlockQueue>(
    core: usize,
    sh: &Shared<Q>,
    aio: &Handles,
    links: MeshLinks<'_>,
    queue: Option<Q>,
    bufs: &[DmaRegion],
) -> CoreReport {
    let cores = sh.cores;
    let ios = sh.ios;
    let qd = sh.qd.min(bufs.len()).max(1);
    let blocks_per_core = sh.blocks_per_core;
    let spare = cores - 1;
    let owners = sh.owners; // cores 0..owners start with a queue pair
    let mut r: R<'_, Q> = Reactor::new(links, aio, queue);
    let mut rep = CoreReport::default();
    let mut free: heapless::Vec<u32, MAX_QD> = (0..qd as u32).collect();
    let mut i = 0u64;
    let mut done_flagged = false;
    let mut spins = 0u64;
    loop {
        spins += 1;
        if spins.is_multiple_of(1 << 24) {
            keel_log::warn!(
                "core {=usize}: still running: issued {=u64}, outstanding {=usize}, reactor unanswered {=usize}, in flight here {=usize}, staged {=usize}, finished {=usize}, has queue {=bool}, aio free {=usize}",
                core, i, qd - free.len(), r.issued(), r.in_flight(), r.staged(), sh.finished.load(Ordering::Relaxed), r.has_queue(), aio.free_count()
            );
        }
        // Issue.
        while i < ios {
            let Some(&buf_ix) = free.last() else { break };
            let owner = owner_for(sh, core, i, owners, r.has_queue());
            let lba =
                core as u64 * blocks_per_core + (i * 8) % blocks_per_core.saturating_sub(8).max(1);
            let buf = BufRef::whole(&bufs[buf_ix as usize]);
            let op = if i.is_multiple_of(2) {
                BlockOp::Write {
                    ns: 1,
                    lba,
                    blocks: 8,
                    buf,
                }
            } else {
                BlockOp::Read {
                    ns: 1,
                    lba,
                    blocks: 8,
                    buf,
                }
            };
            match r.submit_to(owner, op, buf_ix) {
                Ok(()) => {
                    free.pop();
                    i += 1;
                    rep.issued += 1;
                }
                Err(ReactorError::Backpressure | ReactorError::NoSlot) => break,
                Err(e) => {
                    keel_log::error!("core {=usize}: submit: {}", core, e);
                    break;
                }
            }
        }
        // Staged but not yet submitted or completed: the handoff and the shutdown below
        // happen with this I/O in flight.
        // Core 1 hands its queue pair to the spare core halfway, with I/O in flight.
        if core == 1
            && !rep.handed_off
            && i >= ios / 2
            && cores >= 3
            && owners >= 2
            && owners < cores
        {
            let in_flight = r.in_flight();
            let left = quiesce(core, &mut r);
            match r.take_queue() {
                Ok(q) => {
                    critical_section::with(|cs| *sh.handoff.borrow_ref_mut(cs) = Some(q));
                    // The spare adopts it right after its next poll pass (a pass holds its
                    // reactor, so the flag is what tells it).
                    sh.adopt_pending.store(true, Ordering::Release);
                    rep.handed_off = true;
                    keel_log::info!("core 1: handed its queue pair to core {=usize} with {=usize} I/Os in flight ({=usize} left after quiesce)", spare, in_flight, left);
                }
                Err(e) => keel_log::error!("core 1: handoff failed: {}", e),
            }
        }
        // Core 2 shuts its queue pair down halfway, with I/O in flight.
        if core == 2 && !rep.shut_down && i >= ios / 2 && cores >= 4 && owners >= 3 {
            let in_flight = r.in_flight();
            let left = quiesce(core, &mut r);
            if let Ok(q) = r.take_queue() {
                // Whoever clears the must-close flag closes (seed 002). The owner claims it here;
                // core 0 will ask too at the end and must then leave this queue pair alone.
                let claimed = sh.teardown[core].request_close() == CloseDuty::RunClose;
                critical_section::with(|cs| {
                    *sh.retired[core].borrow_ref_mut(cs) = Some((q, claimed))
                });
                rep.shut_down = true;
                keel_log::info!("core 2: shut its queue pair down with {=usize} I/Os in flight ({=usize} left after quiesce)", in_flight, left);
            }
        }
        r.poll();
        while let Some(c) = r.next_completion() {
            let _ = free.push(c.cookie);
            match c.result {
                Ok(()) => rep.ok += 1,
                Err(e) => {
                    rep.failed += 1;
                    if e != IoError::Aborted {
                        rep.failed_other += 1;
                    }
                }
            }
        }
        if core == spare && sh.adopt_pending.swap(false, Ordering::AcqRel) {
            if let Some(q) = critical_section::with(|cs| sh.handoff.borrow_ref_mut(cs).take()) {
                if r.adopt_queue(q).is_ok() {
                    sh.owner_of_1.store(spare, Ordering::Release);
                    keel_log::info!("core {=usize}: adopted core 1's queue pair", core);
                }
            }
        }
        let outstanding = qd - free.len();
        if i >= ios && outstanding == 0 && !done_flagged {
            done_flagged = true;
            sh.finished.fetch_add(1, Ordering::AcqRel);
        }
        // Keep serving others until every core has all its answers.
        if done_flagged && sh.finished.load(Ordering::Acquire) == cores {
            break;
        }
    }
    let left = quiesce(core, &mut r);
    if left != 0 {
        keel_log::error!(
            "core {=usize}: {=usize} I/Os still in flight at the end",
            core,
            left
        );
    }
    rep.stats = r.stats();
    if let Ok(q) = r.take_queue() {
        critical_section::with(|cs| *sh.retired[core].borrow_ref_mut(cs) = Some((q, false)));
    }
    rep
}

/// `reactor`: see the module docs.
pub fn run<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let ios = cl.int("ios")?;
    let qd = (cl.int("qd")? as usize).clamp(1, MAX_QD);
    let (ctrl, _) = crate::nvme::open(p, cl)?;
    keel_log::info!("job reactor: start");
    let cores = keel_hal::Cores::count(p.cores()).min(MAX_CORES);
    if cores < 2 {
        return Err(JobError::Failed("the reactor job needs at least 2 cores"));
    }
    let ns = *ctrl
        .namespace(1)
        .ok_or(JobError::Failed("no namespace 1"))?;
    let spare = cores - 1;
    // Cores 0..owners start with a queue pair: every core but the spare (both cores when
    // there are two), as far as the controller's grant goes; the others send their I/O to
    // an owner over the rings.
    let granted = (ctrl.identify().io_queues as usize).max(1);
    let owners = granted.min(if cores == 2 { 2 } else { cores - 1 });
    let with_queue = |core: usize| core < owners;
    let qpairs = owners;
    let sh: Shared<Qp<B>> = Shared {
        owners,
        ios,
        qd,
        cores,
        blocks_per_core: ns.blocks / cores as u64,
        handoff: Mutex::new(RefCell::new(None)),
        adopt_pending: AtomicBool::new(false),
        owner_of_1: AtomicUsize::new(1),
        finished: AtomicUsize::new(0),
        retired: core::array::from_fn(|_| Mutex::new(RefCell::new(None))),
        teardown: core::array::from_fn(|_| Teardown::new()),
    };
    let mut mesh = Mesh::new();
    let links: [Mutex<RefCell<Option<MeshLinks<'_>>>>; MAX_CORES] = {
        let mut it = split(&mut mesh).into_iter();
        core::array::from_fn(|_| Mutex::new(RefCell::new(it.next())))
    };
    let ctrl = spin::Mutex::new(ctrl);
    keel_log::info!("reactor: {=usize} cores, {=usize} queue pairs (cores 0..{=usize}), core {=usize} spare; {=u64} I/Os per core at QD {=usize}, {=usize} I/O handles per core", cores, qpairs, owners, spare, ios, qd, HANDLES / cores);
    let clock = p.clock();
    let t0 = clock.now_ns();
    let reports = crate::on_cores(p, cores, |core| -> Result<CoreReport, &'static str> {
        // Each core creates its own queue pair (queue id = core + 1) and buffers.
        let queue = if with_queue(core) {
            Some(
                ctrl.lock()
                    .create_io_qpair(p.dma(), core as u16 + 1, 256)
                    .map_err(|e| {
                        keel_log::error!("create queue pair: {}", e);
                        "queue pair"
                    })?,
            )
        } else {
            None
        };
        let mut bufs: heapless::Vec<DmaRegion, MAX_QD> = heapless::Vec::new();
        for _ in 0..qd {
            let b = crate::storage::dma(p.dma(), 4096).map_err(|_| "DMA pool exhausted")?;
            let _ = bufs.push(b);
        }
        let l = critical_section::with(|cs| links[core].borrow_ref_mut(cs).take())
            .ok_or("no message links")?;
        // This core's own handles, on its stack.
        let aio = core_handles(core, cores);
        let mut rep = core_main(core, &sh, &aio, l, queue, &bufs);
        rep.handles = HANDLES / cores;
        rep.handles_back = aio.free_count();
        for b in bufs {
            keel_hal::DmaAllocator::free(p.dma(), b);
        }
        Ok(rep)
    })?;
    let ms = (clock.now_ns() - t0) / 1_000_000;

    // Teardown: delete every queue pair exactly once. Core 0 asks to close every queue pair
    // (a controller shutdown racing the owners): it deletes those whose flag it cleared, and
    // executes the deletions owners claimed earlier.
    let mut ctrl = ctrl.into_inner();
    let mut deleted = 0;
    for core in 0..cores {
        let closing = sh.teardown[core].request_close() == CloseDuty::RunClose;
        let Some((q, claimed)) =
            critical_section::with(|cs| sh.retired[core].borrow_ref_mut(cs).take())
        else {
            continue;
        };
        if closing == claimed {
            keel_log::error!(
                "queue pair of core {=usize}: close claimed by both or neither",
                core
            );
            continue;
        }
        match ctrl.delete_io_qpair(p.dma(), q) {
            Ok(()) => deleted += 1,
            Err((e, _)) => keel_log::error!("delete queue pair of core {=usize}: {}", core, e),
        }
    }

    let mut ok = true;
    let (mut sub, mut comp) = (0u64, 0u64);
    let (mut free, mut handles) = (0usize, 0usize);
    keel_log::info!("reactor results ({=u64} ms):", ms);
    keel_log::info!("core | issued | ok | failed | submitted here | remote served | completed | failed here | bad tags | lifecycle errs | failed, not aborted | notes");
    for core in 0..cores {
        let rep = match reports.get(core) {
            Some(Ok(r)) => *r,
            Some(Err(e)) => {
                keel_log::error!("core {=usize}: {=str}", core, e);
                ok = false;
                continue;
            }
            None => {
                keel_log::error!("core {=usize} reported nothing", core);
                ok = false;
                continue;
            }
        };
        let s = rep.stats;
        keel_log::info!(
            "{=usize} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=str}",
            core, rep.issued, rep.ok, rep.failed, s.submitted, s.remote_served, s.completed_ok, s.failed, s.bad_tags, s.lifecycle_errors, rep.failed_other,
            if rep.handed_off { "handed its queue pair off" } else if rep.shut_down { "shut its queue pair down" } else if core == spare && cores > 2 { "spare: adopted core 1's queue pair" } else { "" }
        );
        ok &= rep.issued == ios
            && rep.issued == rep.ok + rep.failed
            && s.lifecycle_errors == 0
            && s.dropped == 0;
        sub += s.submitted;
        comp += s.completed_ok + s.failed;
        free += rep.handles_back;
        handles += rep.handles;
    }
    keel_log::info!("reactor: submitted {=u64} == completed + failed {=u64}: {=bool}; I/O handles back in the cores' arrays: {=usize} of {=usize}; queue pairs deleted: {=usize} of {=usize}", sub, comp, sub == comp, free, handles, deleted, qpairs);
    if !ok || sub != comp || free != handles || deleted != qpairs {
        return Err(JobError::Failed("reactor invariants violated"));
    }
    Ok(())
}

/// The full stack for `bench`: a reactor with I/O handles from the shared array.
pub struct Stack<'m, Q>(pub R<'m, Q>);

impl<Q: BlockQueue> crate::storage::BenchTarget for Stack<'_, Q> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> bool {
        self.0.submit(op, tag).is_ok()
    }
    fn submit_burst(&mut self, ops: &[(BlockOp, u32)]) -> usize {
        self.0.submit_burst(ops).unwrap_or(0)
    }
    fn kick(&mut self) {
        self.0.flush();
    }
    fn reap(&mut self, on_done: &mut dyn FnMut(u32, Result<(), keel_blockdev::IoError>)) {
        self.0.poll();
        while let Some(c) = self.0.next_completion() {
            on_done(c.cookie, c.result);
        }
    }
    fn block_size(&self, _ns: keel_blockdev::NsId) -> Option<u32> {
        None
    }
}

/// The full stack for `bench` on a core without a queue pair: every I/O goes to `owner`'s.
pub struct Remote<'m, Q> {
    /// This core's reactor (no queue of its own).
    pub reactor: R<'m, Q>,
    /// The core whose queue pair serves this one.
    pub owner: usize,
}

impl<Q: BlockQueue> crate::storage::BenchTarget for Remote<'_, Q> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> bool {
        self.reactor.submit_to(self.owner, op, tag).is_ok()
    }
    fn kick(&mut self) {
        self.reactor.flush();
    }
    fn reap(&mut self, on_done: &mut dyn FnMut(u32, Result<(), keel_blockdev::IoError>)) {
        self.reactor.poll();
        while let Some(c) = self.reactor.next_completion() {
            on_done(c.cookie, c.result);
        }
    }
    fn block_size(&self, _ns: keel_blockdev::NsId) -> Option<u32> {
        None
    }
}

/// A reactor over `qp` for one bench core.
pub fn bench_reactor<'m, Q: BlockQueue>(links: MeshLinks<'m>, aio: &'m Handles, qp: Q) -> R<'m, Q> {
    Reactor::new(links, aio, Some(qp))
}
