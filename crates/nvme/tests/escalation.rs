//! Timeout escalation (issue 16): abort → queue-pair reset → controller reset, on the model.
//!
//! Each test holds commands on the model (they time out), runs `Controller::recover` as the
//! worker core would, and checks on the model what the device saw (admin opcodes, CC resets)
//! and on the disk what landed, and that every tag completes exactly once to its owner.

use std::collections::HashMap;

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config, Controller, IoQueuePair, Recovery};

type Ctrl = Controller<ModelMmio, ModelClock>;
type Qp = IoQueuePair<ModelMmio, ModelClock>;

const DELETE_SQ: u8 = 0x00;
const ABORT: u8 = 0x08;

struct Rig {
    model: NvmeModel,
    dma: HostDma,
    clock: ModelClock,
    ctrl: Ctrl,
}

fn rig(cfg: Config, setup: impl FnOnce(&NvmeModel)) -> Rig {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    setup(&model);
    let clock = ModelClock::new();
    let ctrl = Controller::init(model.mmio(), &dma, clock.clone(), cfg).expect("init");
    Rig {
        model,
        dma,
        clock,
        ctrl,
    }
}

fn cfg() -> Config {
    Config {
        io_timeout_ms: 10,
        ..Config::default()
    }
}

fn fill(buf: &DmaRegion, byte: u8) {
    buf.write_bytes(0, &vec![byte; buf.len()]).unwrap();
}

fn write(lba: u64, buf: &DmaRegion) -> BlockOp {
    BlockOp::Write {
        ns: 1,
        lba,
        blocks: (buf.len() / 512) as u32,
        buf: BufRef::whole(buf),
    }
}

/// Polls as the owner does; returns every (tag, result) reported, checking none twice.
fn owner_polls(qp: &mut Qp, done: &mut HashMap<u32, Result<(), IoError>>, passes: usize) {
    for _ in 0..passes {
        qp.poll(64, &mut |t, r| {
            assert!(done.insert(t, r).is_none(), "tag {t} reported twice");
        });
    }
}

/// Submits, lets the held ones pass their deadline, and polls so the timeouts are announced.
fn time_out(r: &mut Rig, qp: &mut Qp, done: &mut HashMap<u32, Result<(), IoError>>) -> usize {
    r.clock.advance_ms(20);
    owner_polls(qp, done, 2);
    core::iter::from_fn(|| qp.pop_timed_out()).count()
}

#[test]
fn a_confirmed_abort_settles_the_command_without_any_reset() {
    let mut r = rig(cfg(), |m| m.set_abort(true, 3));
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let bufs: Vec<_> = (0..4).map(|_| r.dma.alloc(4096, 4096).unwrap()).collect();
    for (k, b) in bufs.iter().enumerate() {
        fill(b, 0x10 + k as u8);
    }
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(0, &bufs[0]), 1).unwrap();
    qp.flush_submissions();
    assert_eq!(time_out(&mut r, &mut qp, &mut done), 1);
    // Three more go through normally while the first sits on the device.
    for k in 1..4u32 {
        qp.submit(write(8 * k as u64, &bufs[k as usize]), 1 + k)
            .unwrap();
    }
    qp.flush_submissions();
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert_eq!(
        rep,
        Recovery {
            reaped: 3,
            aborts_sent: 1,
            aborts_confirmed: 1,
            queue_resets: 0,
            controller_reset: false,
        }
    );
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.len(), 4, "{done:?}");
    assert_eq!(
        done[&1],
        Err(IoError::Aborted),
        "the abort is what hands it back"
    );
    for k in 2..=4 {
        assert_eq!(done[&k], Ok(()));
    }
    assert_eq!(r.model.admin_commands(ABORT), 1);
    assert_eq!(r.model.admin_commands(DELETE_SQ), 0, "no queue reset");
    assert_eq!(r.ctrl.stats().resets, 0, "no controller reset");
    assert_eq!(r.model.held(), 0);
    assert_eq!(
        r.model.disk_read(1, 0, 4096),
        vec![0; 4096],
        "the aborted write never landed"
    );
    assert_eq!(r.model.disk_read(1, 8 * 512, 4096), vec![0x11; 4096]);
    assert_eq!(qp.busy_slots(), 0);
}

/// QEMU answers every Abort "not aborted": the pair is then deleted and recreated on its own.
/// The held (timed-out) command completes `Timeout` and never lands; commands queued but not
/// yet fetched are resubmitted and land; another pair on the controller is not touched.
#[test]
fn a_refused_abort_resets_only_that_queue_pair() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let mut other = r.ctrl.create_io_qpair(&r.dma, 2, 16).unwrap();
    let bufs: Vec<_> = (0..3).map(|_| r.dma.alloc(4096, 4096).unwrap()).collect();
    for (k, b) in bufs.iter().enumerate() {
        fill(b, 0x20 + k as u8);
    }
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(0, &bufs[0]), 1).unwrap();
    qp.flush_submissions();
    assert_eq!(time_out(&mut r, &mut qp, &mut done), 1);
    // Two more reach the SQ but the device does not fetch them yet.
    r.model.set_fault(Fault::Stall);
    qp.submit(write(8, &bufs[1]), 2).unwrap();
    qp.submit(write(16, &bufs[2]), 3).unwrap();
    qp.flush_submissions();
    r.model.set_fault(Fault::None);
    // The other pair has one in flight across the recovery.
    let ob = r.dma.alloc(4096, 4096).unwrap();
    fill(&ob, 0x77);
    other.submit(write(64, &ob), 9).unwrap();
    other.flush_submissions();

    let rep = r.ctrl.recover(&mut [&mut qp, &mut other]).unwrap();
    assert_eq!(
        (
            rep.aborts_sent,
            rep.aborts_confirmed,
            rep.queue_resets,
            rep.controller_reset
        ),
        (1, 0, 1, false),
        "{rep:?}"
    );
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.len(), 3, "{done:?}");
    assert_eq!(done[&1], Err(IoError::Timeout));
    assert_eq!((done[&2], done[&3]), (Ok(()), Ok(())), "resubmitted");
    let mut od = HashMap::new();
    owner_polls(&mut other, &mut od, 2);
    assert_eq!(od.get(&9), Some(&Ok(())), "the other pair's I/O is its own");
    assert_eq!(r.model.admin_commands(DELETE_SQ), 1, "one pair deleted");
    assert_eq!(r.ctrl.stats().resets, 0, "no controller reset");
    assert_eq!(
        r.model.release_held(),
        0,
        "deleting the SQ aborted the held write"
    );
    assert_eq!(
        r.model.disk_read(1, 0, 4096),
        vec![0; 4096],
        "and it never lands"
    );
    assert_eq!(r.model.disk_read(1, 8 * 512, 4096), vec![0x21; 4096]);
    assert_eq!(r.model.disk_read(1, 16 * 512, 4096), vec![0x22; 4096]);
    assert_eq!(r.model.disk_read(1, 64 * 512, 4096), vec![0x77; 4096]);
    assert_eq!(
        (qp.stats().resubmitted_after_reset, qp.busy_slots()),
        (2, 0)
    );
    // The recreated pair works.
    let b = r.dma.alloc(512, 4096).unwrap();
    fill(&b, 0x5A);
    qp.submit(write(100, &b), 20).unwrap();
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.get(&20), Some(&Ok(())));
}

/// At most `max_aborts` Abort commands per recovery (and never more than the controller's
/// ACL + 1): the rest go straight to a queue reset.
#[test]
fn aborts_are_bounded() {
    let c = Config {
        max_aborts: 2,
        ..cfg()
    };
    let mut r = rig(c, |m| m.set_abort(true, 0)); // ACL 0: one at a time
    assert_eq!(r.ctrl.identify().abort_limit, 1);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let bufs: Vec<_> = (0..5).map(|_| r.dma.alloc(512, 4096).unwrap()).collect();
    let mut done = HashMap::new();
    r.model.hold_next_io(5);
    for (k, b) in bufs.iter().enumerate() {
        qp.submit(write(k as u64, b), k as u32).unwrap();
    }
    qp.flush_submissions();
    assert_eq!(time_out(&mut r, &mut qp, &mut done), 5);
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert_eq!(
        (
            rep.aborts_sent,
            rep.aborts_confirmed,
            rep.queue_resets,
            rep.controller_reset
        ),
        (1, 1, 1, false),
        "{rep:?}"
    );
    assert_eq!(r.model.admin_commands(ABORT), 1);
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.len(), 5);
    let aborted = done
        .values()
        .filter(|v| **v == Err(IoError::Aborted))
        .count();
    let timed_out = done
        .values()
        .filter(|v| **v == Err(IoError::Timeout))
        .count();
    assert_eq!((aborted, timed_out), (1, 4), "{done:?}");
    assert_eq!(r.model.held(), 0);
}

/// A late completion that arrives before the recovery runs settles the command: no abort, no
/// reset, and the device's own status.
#[test]
fn a_late_completion_needs_no_escalation() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let b = r.dma.alloc(512, 4096).unwrap();
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(3, &b), 5).unwrap();
    qp.flush_submissions();
    assert_eq!(time_out(&mut r, &mut qp, &mut done), 1);
    assert_eq!(r.model.release_held(), 1);
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert_eq!(
        rep,
        Recovery {
            reaped: 1,
            ..Recovery::default()
        }
    );
    owner_polls(&mut qp, &mut done, 2);
    assert_eq!(done.get(&5), Some(&Ok(())));
    assert_eq!(r.model.admin_commands(ABORT), 0);
}

/// A fatal controller goes straight to the controller reset: the held command completes
/// `Timeout` (CSTS.RDY = 0 quiesced it), everything else is resubmitted or failed once.
#[test]
fn a_fatal_controller_is_reset() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let bufs: Vec<_> = (0..3).map(|_| r.dma.alloc(512, 4096).unwrap()).collect();
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(0, &bufs[0]), 1).unwrap();
    qp.flush_submissions();
    assert_eq!(time_out(&mut r, &mut qp, &mut done), 1);
    r.model.set_fault(Fault::FatalStatus);
    qp.submit(write(1, &bufs[1]), 2).unwrap();
    qp.submit(write(2, &bufs[2]), 3).unwrap();
    qp.flush_submissions();
    assert!(r.ctrl.is_fatal());
    r.model.set_fault(Fault::None);
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert!(rep.controller_reset, "{rep:?}");
    assert_eq!((rep.aborts_sent, rep.queue_resets), (0, 0));
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.len(), 3, "{done:?}");
    assert_eq!(done[&1], Err(IoError::Timeout));
    assert_eq!(r.ctrl.stats().resets, 1);
    assert_eq!(qp.busy_slots(), 0);
}

/// ACRE is enabled through Host Behavior Support when the controller gives retry delay
/// times, and again after a controller reset (features go back to their defaults).
#[test]
fn acre_is_enabled_when_retry_delays_are_offered() {
    let r = rig(cfg(), |_| {});
    assert!(
        !r.ctrl.identify().acre && !r.model.acre(),
        "no CRDT: left off"
    );
    let mut r = rig(cfg(), |m| m.set_crdt([1, 2, 3]));
    assert!(r.ctrl.identify().acre && r.model.acre());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    r.ctrl.reset(&mut [&mut qp]).unwrap();
    assert!(r.model.acre(), "set again after the reset");
}

/// Recovery across reactors (issue 16): two reactor threads (cores 0 and 1), each owning a
/// queue pair of one controller, write their own blocks at depth. Commands are held by the
/// device (they time out) and once the controller goes fatal. A reactor that finds its pair
/// needs recovery raises a flag; the worker thread (never a poller) recalls both pairs through
/// the [`keel_reactor::Lender`], runs `Controller::recover` on them while the reactors keep
/// polling and staging, and gives them back. Every cookie completes exactly once, every
/// handle comes back, and **on the disk** every block holds its last acknowledged write or a
/// later unacknowledged one.
#[test]
fn reactors_lend_their_pairs_to_the_worker_for_recovery() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use keel_aio::Aio;
    use keel_reactor::{split, Lender, MeshStorage, Msg, Reactor};
    const N: usize = 64;
    const W: usize = keel_slots::words_for(N);
    const BLOCKS: u64 = 32;
    const WRITES: u32 = 3000;
    type R = Reactor<'static, Qp, 2, N, W>;

    let mut r = rig(cfg(), |_| {});
    let q0 = r.ctrl.create_io_qpair(&r.dma, 1, 64).unwrap();
    let q1 = r.ctrl.create_io_qpair(&r.dma, 2, 64).unwrap();
    let mesh: &'static mut MeshStorage<Msg, 2, 8> = Box::leak(Box::new(MeshStorage::new()));
    let [l0, l1] = split(mesh);
    let lender: &'static Lender<Qp, 2> = Box::leak(Box::new(Lender::new()));
    let wanted = Arc::new(AtomicBool::new(false));
    let done_cores = Arc::new(AtomicUsize::new(0));
    // Set by the worker once both levels happened: the reactors stop issuing.
    let stop = Arc::new(AtomicBool::new(false));

    let spawn = |core: usize, links, qp: Qp| {
        let (dma, wanted, done_cores) = (r.dma.clone(), wanted.clone(), done_cores.clone());
        let stop = stop.clone();
        std::thread::spawn(move || {
            // This core's own handle array (per-core state: it never leaves the thread).
            let aio: &'static Aio<N, W> = Box::leak(Box::new(Aio::new()));
            let mut re: R = Reactor::new(links, aio, Some(qp));
            let bufs: Vec<_> = (0..BLOCKS).map(|_| dma.alloc(512, 4096).unwrap()).collect();
            let base = core as u64 * BLOCKS;
            // Per block: generation last acknowledged, highest issued, busy.
            let mut acked = vec![0u32; BLOCKS as usize];
            let mut max = vec![0u32; BLOCKS as usize];
            let mut busy = vec![false; BLOCKS as usize];
            let mut seen = std::collections::HashSet::new();
            let (mut issued, mut finished, mut failed) = (0u32, 0u32, 0u32);
            let mut k = 0u64;
            while !(stop.load(Ordering::Acquire) && finished == issued) {
                if issued < WRITES || !stop.load(Ordering::Acquire) {
                    let b = (k * 7 + core as u64) % BLOCKS;
                    k += 1;
                    if !busy[b as usize] {
                        let gen = max[b as usize] + 1;
                        let mut data = vec![0u8; 512];
                        data[..4].copy_from_slice(&gen.to_le_bytes());
                        data[4..12].copy_from_slice(&(base + b).to_le_bytes());
                        bufs[b as usize].write_bytes(0, &data).unwrap();
                        let cookie = (b as u32) << 16 | gen;
                        if re
                            .submit(write(base + b, &bufs[b as usize]), cookie)
                            .is_ok()
                        {
                            busy[b as usize] = true;
                            max[b as usize] = gen;
                            issued += 1;
                        }
                    }
                }
                re.poll();
                lender.service(&mut re);
                if re.with_queue(|q| q.needs_recovery()).unwrap_or(false) {
                    wanted.store(true, Ordering::Release);
                }
                while let Some(c) = re.next_completion() {
                    assert!(seen.insert(c.cookie), "cookie {:#x} twice", c.cookie);
                    let (b, gen) = ((c.cookie >> 16) as usize, c.cookie & 0xFFFF);
                    busy[b] = false;
                    finished += 1;
                    match c.result {
                        Ok(()) => acked[b] = gen,
                        Err(_) => failed += 1,
                    }
                }
            }
            done_cores.fetch_add(1, Ordering::AcqRel);
            // Keep answering the lender until the worker is done with everyone.
            while done_cores.load(Ordering::Acquire) < 3 {
                re.poll();
                lender.service(&mut re);
            }
            assert_eq!(re.in_flight(), 0);
            assert_eq!(aio.free_count(), N, "every handle back");
            (acked, max, failed, re.stats())
        })
    };
    let t0 = spawn(0, l0, q0);
    let t1 = spawn(1, l1, q1);

    // The worker (this thread): injects faults and recovers.
    let mut reports = Vec::new();
    let mut round = 0u32;
    let mut fatal_sent = false;
    while done_cores.load(Ordering::Acquire) < 2 {
        round += 1;
        let both = reports.iter().any(|p: &Recovery| p.queue_resets > 0)
            && reports.iter().any(|p: &Recovery| p.controller_reset);
        if both || round > 20_000_000 {
            stop.store(true, Ordering::Release);
        }
        if round % 300 == 50 {
            r.model.hold_next_io(3);
        }
        if !fatal_sent && reports.len() >= 2 {
            fatal_sent = true;
            r.model.set_fault(Fault::FatalStatus);
        }
        if round % 20 == 0 {
            r.clock.advance_ms(3); // the pairs' timeout checks see time pass
        }
        let fatal = r.ctrl.is_fatal();
        if !(wanted.swap(false, Ordering::AcqRel) || fatal) {
            std::thread::yield_now();
            continue;
        }
        if fatal {
            r.model.set_fault(Fault::None); // the reset brings it back
        }
        for c in 0..2 {
            // A pair given back last round may not be home yet.
            while !lender.recall(c) {
                std::thread::yield_now();
            }
        }
        while !(0..2).all(|c| lender.answered(c)) {
            std::thread::yield_now();
        }
        let mut p0 = lender.take(0).expect("core 0 lent its pair");
        let mut p1 = lender.take(1).expect("core 1 lent its pair");
        reports.push(r.ctrl.recover(&mut [&mut p0, &mut p1]).unwrap());
        lender.give_back(0, p0).ok().unwrap();
        lender.give_back(1, p1).ok().unwrap();
    }
    done_cores.fetch_add(1, Ordering::AcqRel);
    let outs = [t0.join().unwrap(), t1.join().unwrap()];
    assert!(
        reports.iter().any(|p| p.queue_resets > 0) && reports.iter().any(|p| p.controller_reset),
        "both levels exercised: {reports:?}"
    );
    let failed: u32 = outs.iter().map(|o| o.2).sum();
    assert!(failed > 0, "some writes failed (timed out): {reports:?}");
    for (core, (acked, max, _, stats)) in outs.iter().enumerate() {
        assert_eq!(stats.submitted, stats.completed_ok + stats.failed);
        for b in 0..BLOCKS as usize {
            let lba = core as u64 * BLOCKS + b as u64;
            let disk = r.model.disk_read(1, lba as usize * 512, 512);
            let gen = u32::from_le_bytes(disk[..4].try_into().unwrap());
            if gen != 0 {
                assert_eq!(
                    u64::from_le_bytes(disk[4..12].try_into().unwrap()),
                    lba,
                    "misplaced"
                );
            }
            assert!(
                acked[b] <= gen && gen <= max[b],
                "core {core} block {b}: disk has gen {gen}, acked {}, max {}",
                acked[b],
                max[b]
            );
        }
    }
}

/// Reissue ordering (issue 16): a write still pending at a controller reset is not reissued
/// when a newer write to overlapping blocks completed before the reset (issued again it would
/// land behind the acknowledged one). It fails once (`DeviceReset`); a pending write nothing
/// overtook is reissued and lands. The disk is checked block by block.
#[test]
fn a_write_overtaken_before_a_reset_fails_instead_of_landing_behind_the_newer_one() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let w1 = r.dma.alloc(4096, 4096).unwrap(); // blocks 0..8, held on the device
    let w2 = r.dma.alloc(512, 4096).unwrap(); // block 4: newer, completes
    let w3 = r.dma.alloc(4096, 4096).unwrap(); // blocks 100..108, held, nothing overlaps
    let w4 = r.dma.alloc(512, 4096).unwrap(); // block 200, sent once the controller is fatal
    fill(&w1, 0xA1);
    fill(&w2, 0xB2);
    fill(&w3, 0xC3);
    fill(&w4, 0xD4);
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(0, &w1), 1).unwrap();
    qp.flush_submissions();
    r.model.hold_next_io(1);
    qp.submit(write(100, &w3), 3).unwrap();
    qp.flush_submissions();
    qp.submit(write(4, &w2), 2).unwrap();
    qp.flush_submissions();
    owner_polls(&mut qp, &mut done, 2);
    assert_eq!(
        done.get(&2),
        Some(&Ok(())),
        "the newer write is acknowledged"
    );
    assert_eq!(r.model.held(), 2);
    r.model.set_fault(Fault::FatalStatus);
    qp.submit(write(200, &w4), 4).unwrap();
    qp.flush_submissions();
    assert!(r.ctrl.is_fatal());
    r.model.set_fault(Fault::None);
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert!(rep.controller_reset, "{rep:?}");
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done.len(), 4, "every tag once: {done:?}");
    assert_eq!(
        done[&1],
        Err(IoError::DeviceReset),
        "the overtaken write fails once, it is not reissued"
    );
    assert_eq!(
        done[&3],
        Ok(()),
        "a pending write nothing overtook is reissued"
    );
    assert_eq!(done[&4], Ok(()));
    assert_eq!(qp.stats().overtaken_writes, 1);
    assert_eq!(
        r.model.disk_read(1, 4 * 512, 512),
        vec![0xB2; 512],
        "block 4 holds the acknowledged newer write"
    );
    assert_eq!(r.model.disk_read(1, 100 * 512, 4096), vec![0xC3; 4096]);
    assert_eq!(r.model.disk_read(1, 200 * 512, 512), vec![0xD4; 512]);
    assert_eq!(qp.busy_slots(), 0);
}

/// The same rule on the retry path: a write that failed with a retryable status is not
/// retried while a newer write to overlapping blocks is on the device (it would land behind
/// it); it is reported with its status instead. A retryable failure nothing overtook is retried.
#[test]
fn a_retryable_write_is_not_retried_behind_a_newer_overlapping_write() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let w1 = r.dma.alloc(4096, 4096).unwrap(); // blocks 0..8, fails transiently
    let w2 = r.dma.alloc(512, 4096).unwrap(); // block 4, newer
    let w3 = r.dma.alloc(512, 4096).unwrap(); // block 50, fails transiently, alone
    fill(&w1, 0xA1);
    fill(&w2, 0xB2);
    fill(&w3, 0xC3);
    let mut done = HashMap::new();
    r.model.set_fault(Fault::TransientError(1));
    qp.submit(write(0, &w1), 1).unwrap();
    qp.flush_submissions();
    r.model.set_fault(Fault::None);
    qp.submit(write(4, &w2), 2).unwrap();
    qp.flush_submissions();
    owner_polls(&mut qp, &mut done, 3);
    r.model.set_fault(Fault::TransientError(1));
    qp.submit(write(50, &w3), 3).unwrap();
    qp.flush_submissions();
    r.model.set_fault(Fault::None);
    owner_polls(&mut qp, &mut done, 3);
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(
        done[&1].is_err(),
        "not retried behind the newer write: {done:?}"
    );
    assert_eq!(done[&2], Ok(()));
    assert_eq!(done[&3], Ok(()), "retried: nothing overlaps it");
    assert_eq!(qp.stats().overtaken_writes, 1);
    assert_eq!(qp.stats().retries, 1);
    assert_eq!(r.model.disk_read(1, 4 * 512, 512), vec![0xB2; 512]);
    assert_eq!(r.model.disk_read(1, 50 * 512, 512), vec![0xC3; 512]);
}

/// The reissue check reads submission order off the SQ ring, and is conservative where the
/// ring's memory ends: a pending write whose entry the ring has since reused (more commands
/// submitted after it than the ring holds) is failed once instead of reissued, though nothing
/// overlapped it.
#[test]
fn a_write_whose_sq_entry_was_reused_is_failed_not_reissued() {
    let mut r = rig(cfg(), |_| {});
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let w1 = r.dma.alloc(512, 4096).unwrap();
    let other = r.dma.alloc(512, 4096).unwrap();
    fill(&w1, 0xA1);
    fill(&other, 0x55);
    let mut done = HashMap::new();
    r.model.hold_next_io(1);
    qp.submit(write(0, &w1), 1).unwrap();
    qp.flush_submissions();
    for k in 0..100u32 {
        qp.submit(write(1000 + k as u64, &other), 10 + k).unwrap();
        qp.flush_submissions();
        owner_polls(&mut qp, &mut done, 1);
    }
    assert_eq!(done.len(), 100);
    r.model.set_fault(Fault::FatalStatus);
    qp.submit(write(2000, &other), 2).unwrap();
    qp.flush_submissions();
    r.model.set_fault(Fault::None);
    let rep = r.ctrl.recover(&mut [&mut qp]).unwrap();
    assert!(rep.controller_reset, "{rep:?}");
    owner_polls(&mut qp, &mut done, 4);
    assert_eq!(done[&1], Err(IoError::DeviceReset));
    assert_eq!(done[&2], Ok(()));
    assert_eq!(qp.stats().overtaken_writes, 1);
    assert_eq!(r.model.disk_read(1, 0, 512), vec![0; 512]);
}
