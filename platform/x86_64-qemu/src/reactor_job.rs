//! The `reactor` job: one run-to-completion reactor per core, SPDK style, over the real NVMe
//! controller. Every core does I/O at once, cores send requests to each other's queue pairs,
//! core 1 hands its queue pair to a spare core in the middle of I/O, and core 2 shuts its queue
//! pair down in the middle of I/O. At the end every core reports, and the job asserts:
//! submitted == completed + failed on every reactor, every I/O handle back in its array,
//! every issued request answered exactly once, and every queue pair deleted exactly once.

use core::cell::{RefCell, UnsafeCell};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use critical_section::Mutex;
use keel_aio::Aio;
use keel_blockdev::{BlockOp, BufRef};
use keel_cmdline::Cmdline;
use keel_hal::DmaRegion;
use keel_reactor::{split, Links, MeshStorage, Msg, Reactor, ReactorError};
use keel_slots::{words_for, CloseDuty, Teardown};

use crate::cpu::MAX_CORES;
use crate::jobs::{JobError, Platform};
use crate::nvme_jobs::{self, Qp};

/// I/O handles shared by every reactor.
pub const HANDLES: usize = 512;
const W: usize = words_for(HANDLES);
const RING: usize = 64;
const MAX_QD: usize = 32;

pub type R = Reactor<'static, Qp, MAX_CORES, HANDLES, W>;

static AIO: Aio<HANDLES, W> = Aio::new();

struct MeshCell(UnsafeCell<MeshStorage<Msg, MAX_CORES, RING>>);
// SAFETY: the storage is borrowed mutably exactly once (guarded by MESH_TAKEN) to split it;
// afterwards only the SPSC ends touch it, each owned by one core.
unsafe impl Sync for MeshCell {}
static MESH: MeshCell = MeshCell(UnsafeCell::new(MeshStorage::new()));
static MESH_TAKEN: AtomicBool = AtomicBool::new(false);

fn take_mesh() -> Option<[Links<'static, Msg, MAX_CORES>; MAX_CORES]> {
    if MESH_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: MESH_TAKEN makes this the only mutable borrow ever taken of MESH.
    Some(split(unsafe { &mut *MESH.0.get() }))
}

/// What core 0 hands each core before it starts.
struct CoreCtx {
    links: Links<'static, Msg, MAX_CORES>,
    queue: Option<Qp>,
    bufs: heapless::Vec<DmaRegion, MAX_QD>,
}

#[derive(Clone, Copy, Default, defmt::Format)]
struct CoreReport {
    issued: u64,
    ok: u64,
    failed: u64,
    stats: keel_reactor::Stats,
    handed_off: bool,
    shut_down: bool,
}

static CTX: [Mutex<RefCell<Option<CoreCtx>>>; MAX_CORES] =
    [const { Mutex::new(RefCell::new(None)) }; MAX_CORES];
static REPORT: [Mutex<RefCell<Option<CoreReport>>>; MAX_CORES] =
    [const { Mutex::new(RefCell::new(None)) }; MAX_CORES];
/// Queue pairs given back for deletion, each guarded by its must-close flag.
static PARKED: [Mutex<RefCell<Option<Qp>>>; MAX_CORES] =
    [const { Mutex::new(RefCell::new(None)) }; MAX_CORES];
static TEARDOWN: [Teardown; MAX_CORES] = [const { Teardown::new() }; MAX_CORES];
static DELETIONS: AtomicUsize = AtomicUsize::new(0);
/// A queue pair in transit from core 1 to the spare core.
static HANDOFF: Mutex<RefCell<Option<Qp>>> = Mutex::new(RefCell::new(None));
/// Which core serves the I/O that used to go to core 1 (changes at handoff).
static OWNER_OF_1: AtomicUsize = AtomicUsize::new(1);
static FINISHED: AtomicUsize = AtomicUsize::new(0);
static CFG_IOS: AtomicU64 = AtomicU64::new(0);
static CFG_QD: AtomicUsize = AtomicUsize::new(0);
static CFG_CORES: AtomicUsize = AtomicUsize::new(0);
static CFG_BLOCKS_PER_CORE: AtomicU64 = AtomicU64::new(0);

/// Sent by core 1 as a `Msg::Call` to the spare core: the queue pair is waiting in HANDOFF.
/// The call runs inside the spare's poll pass, which holds its reactor, so it only raises a
/// flag; the spare's loop adopts the queue right after the pass.
fn adopt_handoff(_core: usize, _arg: usize) {
    ADOPT_PENDING.store(true, Ordering::Release);
}
static ADOPT_PENDING: AtomicBool = AtomicBool::new(false);
/// Queue pairs whose owner claimed the close mid-run; core 0 (which owns the admin queue)
/// executes those deletions.
static TO_DELETE: [Mutex<RefCell<Option<Qp>>>; MAX_CORES] =
    [const { Mutex::new(RefCell::new(None)) }; MAX_CORES];

/// Where I/O number `i` of `core` goes: three in four to its own queue pair, the rest to
/// another core's; a core without a queue pair (spare, handed off, shut down) sends elsewhere.
fn owner_for(core: usize, i: u64, owners: usize, has_queue: bool) -> usize {
    let mut t = if i % 4 == 3 || !has_queue {
        (core + 1 + (i as usize / 4)) % owners
    } else {
        core
    };
    if t == core && !has_queue {
        t = 0;
    }
    if t == 1 {
        OWNER_OF_1.load(Ordering::Acquire)
    } else {
        t
    }
}

/// Quiesces `r`, reporting progress while it waits (the wait must end: every I/O either
/// completes or times out in the driver).
fn quiesce(core: usize, r: &mut R) -> usize {
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

fn core_main(core: usize, _arg: usize) {
    let Some(ctx) = critical_section::with(|cs| CTX[core].borrow_ref_mut(cs).take()) else {
        return;
    };
    let cores = CFG_CORES.load(Ordering::Acquire);
    let ios = CFG_IOS.load(Ordering::Acquire);
    let qd = CFG_QD.load(Ordering::Acquire).min(ctx.bufs.len()).max(1);
    let blocks_per_core = CFG_BLOCKS_PER_CORE.load(Ordering::Acquire);
    let spare = cores - 1;
    let owners = spare; // cores 0..spare-1 start with a queue pair
    let mut r: R = Reactor::new(ctx.links, &AIO, ctx.queue);
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
                core, i, qd - free.len(), r.issued(), r.in_flight(), r.staged(), FINISHED.load(Ordering::Relaxed), r.has_queue(), AIO.free_count()
            );
        }
        // Issue.
        while i < ios {
            let Some(&buf_ix) = free.last() else { break };
            let owner = owner_for(core, i, owners, r.has_queue());
            let lba =
                core as u64 * blocks_per_core + (i * 8) % blocks_per_core.saturating_sub(8).max(1);
            let buf = BufRef::whole(&ctx.bufs[buf_ix as usize]);
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
        if core == 1 && !rep.handed_off && i >= ios / 2 && cores >= 3 {
            let in_flight = r.in_flight();
            let left = quiesce(core, &mut r);
            match r.take_queue() {
                Ok(q) => {
                    critical_section::with(|cs| *HANDOFF.borrow_ref_mut(cs) = Some(q));
                    let _ = r.call(spare, adopt_handoff, 0);
                    rep.handed_off = true;
                    keel_log::info!("core 1: handed its queue pair to core {=usize} with {=usize} I/Os in flight ({=usize} left after quiesce)", spare, in_flight, left);
                }
                Err(e) => keel_log::error!("core 1: handoff failed: {}", e),
            }
        }
        // Core 2 shuts its queue pair down halfway, with I/O in flight.
        if core == 2 && !rep.shut_down && i >= ios / 2 && cores >= 4 {
            let in_flight = r.in_flight();
            let left = quiesce(core, &mut r);
            if let Ok(q) = r.take_queue() {
                // Whoever clears the must-close flag closes (seed 002). The owner claims it here;
                // core 0 will ask too at the end and must then leave this queue pair alone.
                if TEARDOWN[core].request_close() == CloseDuty::RunClose {
                    critical_section::with(|cs| *TO_DELETE[core].borrow_ref_mut(cs) = Some(q));
                } else {
                    critical_section::with(|cs| *PARKED[core].borrow_ref_mut(cs) = Some(q));
                }
                rep.shut_down = true;
                keel_log::info!("core 2: shut its queue pair down with {=usize} I/Os in flight ({=usize} left after quiesce)", in_flight, left);
            }
        }
        r.poll();
        while let Some(c) = r.next_completion() {
            let _ = free.push(c.cookie);
            if c.result.is_ok() {
                rep.ok += 1;
            } else {
                rep.failed += 1;
            }
        }
        if core == spare && ADOPT_PENDING.swap(false, Ordering::AcqRel) {
            if let Some(q) = critical_section::with(|cs| HANDOFF.borrow_ref_mut(cs).take()) {
                if r.adopt_queue(q).is_ok() {
                    OWNER_OF_1.store(spare, Ordering::Release);
                    keel_log::info!("core {=usize}: adopted core 1's queue pair", core);
                }
            }
        }
        let outstanding = qd - free.len();
        if i >= ios && outstanding == 0 && !done_flagged {
            done_flagged = true;
            FINISHED.fetch_add(1, Ordering::AcqRel);
        }
        // Keep serving others until every core has all its answers.
        if done_flagged && FINISHED.load(Ordering::Acquire) == cores {
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
        critical_section::with(|cs| *PARKED[core].borrow_ref_mut(cs) = Some(q));
    }
    critical_section::with(|cs| *REPORT[core].borrow_ref_mut(cs) = Some(rep));
}

#[allow(clippy::needless_range_loop)] // `core` indexes several per-core tables at once
pub fn run<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let ios = cl.u64("ios", 2000)?;
    let qd = (cl.u64("qd", 16)? as usize).clamp(1, MAX_QD);
    let mut ctrl = nvme_jobs::open(p, cl)?;
    cl.finish()?;
    keel_log::info!("job reactor: start");
    let cores = p.cores;
    if cores < 2 {
        return Err(JobError::Failed("the reactor job needs at least 2 cores"));
    }
    let ns = *ctrl
        .namespace(1)
        .ok_or(JobError::Failed("no namespace 1"))?;
    let blocks_per_core = ns.blocks / cores as u64;
    CFG_IOS.store(ios, Ordering::Release);
    CFG_QD.store(qd, Ordering::Release);
    CFG_CORES.store(cores, Ordering::Release);
    CFG_BLOCKS_PER_CORE.store(blocks_per_core, Ordering::Release);
    let links = take_mesh().ok_or(JobError::Failed("mesh already in use"))?;
    let spare = cores - 1;
    let mut qpairs = 0;
    for (core, l) in links.into_iter().enumerate().take(cores) {
        let queue = if core != spare || cores == 2 {
            qpairs += 1;
            Some(
                ctrl.create_io_qpair(&p.dma, core as u16 + 1, 256)
                    .map_err(|e| {
                        keel_log::error!("create queue pair: {}", e);
                        JobError::Failed("queue pair")
                    })?,
            )
        } else {
            None
        };
        let mut bufs = heapless::Vec::new();
        for _ in 0..qd {
            let b = crate::storage::dma(&p.dma, 4096)
                .map_err(|_| JobError::Failed("DMA pool exhausted"))?;
            let _ = bufs.push(b);
        }
        critical_section::with(|cs| {
            *CTX[core].borrow_ref_mut(cs) = Some(CoreCtx {
                links: l,
                queue,
                bufs,
            })
        });
    }
    keel_log::info!("reactor: {=usize} cores, {=usize} queue pairs, core {=usize} spare; {=u64} I/Os per core at QD {=usize}, {=usize} shared I/O handles", cores, qpairs, spare, ios, qd, HANDLES);
    let t0 = crate::time::now_ns();
    for core in 1..cores {
        crate::smp::post(core, core_main, 0)
            .map_err(|_| JobError::Failed("could not start a reactor"))?;
    }
    core_main(0, 0);
    while !(1..cores).all(crate::smp::done) {
        crate::cpu::relax();
    }
    let ms = (crate::time::now_ns() - t0) / 1_000_000;

    // Teardown: delete every queue pair exactly once. Core 0 asks to close every queue pair
    // (a controller shutdown racing the owners): it deletes those whose flag it cleared, and
    // executes the deletions owners claimed earlier.
    for core in 0..cores {
        let mut victims: heapless::Vec<Qp, 2> = heapless::Vec::new();
        if TEARDOWN[core].request_close() == CloseDuty::RunClose {
            if let Some(q) = critical_section::with(|cs| PARKED[core].borrow_ref_mut(cs).take()) {
                let _ = victims.push(q);
            }
        }
        if let Some(q) = critical_section::with(|cs| TO_DELETE[core].borrow_ref_mut(cs).take()) {
            let _ = victims.push(q);
        }
        for q in victims {
            match ctrl.delete_io_qpair(&p.dma, q) {
                Ok(()) => {
                    DELETIONS.fetch_add(1, Ordering::AcqRel);
                }
                Err((e, _)) => keel_log::error!("delete queue pair of core {=usize}: {}", core, e),
            }
        }
    }

    let mut ok = true;
    let (mut sub, mut comp) = (0u64, 0u64);
    keel_log::info!("reactor results ({=u64} ms):", ms);
    keel_log::info!("core | issued | ok | failed | submitted here | remote served | completed | failed here | bad tags | lifecycle errs | notes");
    for core in 0..cores {
        let Some(rep) = critical_section::with(|cs| *REPORT[core].borrow_ref(cs)) else {
            keel_log::error!("core {=usize} reported nothing", core);
            ok = false;
            continue;
        };
        let s = rep.stats;
        keel_log::info!(
            "{=usize} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=u64} | {=str}",
            core, rep.issued, rep.ok, rep.failed, s.submitted, s.remote_served, s.completed_ok, s.failed, s.bad_tags, s.lifecycle_errors,
            if rep.handed_off { "handed its queue pair off" } else if rep.shut_down { "shut its queue pair down" } else if core == spare && cores > 2 { "spare: adopted core 1's queue pair" } else { "" }
        );
        ok &= rep.issued == ios
            && rep.issued == rep.ok + rep.failed
            && s.lifecycle_errors == 0
            && s.dropped == 0;
        sub += s.submitted;
        comp += s.completed_ok + s.failed;
    }
    let free = AIO.free_count();
    let deleted = DELETIONS.load(Ordering::Acquire);
    keel_log::info!("reactor: submitted {=u64} == completed + failed {=u64}: {=bool}; I/O handles back in the array: {=usize} of {=usize}; queue pairs deleted: {=usize} of {=usize}", sub, comp, sub == comp, free, HANDLES, deleted, qpairs);
    if !ok || sub != comp || free != HANDLES || deleted != qpairs {
        return Err(JobError::Failed("reactor invariants violated"));
    }
    Ok(())
}

/// The full stack for `bench`: a reactor with I/O handles from the shared array.
pub struct Stack(pub R);

impl crate::storage::BenchTarget for Stack {
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

/// Takes this boot's mesh for `bench` (one job per boot).
pub fn bench_links() -> Option<[Links<'static, Msg, MAX_CORES>; MAX_CORES]> {
    take_mesh()
}

/// A reactor over `qp` for one bench core.
pub fn bench_reactor(links: Links<'static, Msg, MAX_CORES>, qp: Qp) -> R {
    Reactor::new(links, &AIO, Some(qp))
}
