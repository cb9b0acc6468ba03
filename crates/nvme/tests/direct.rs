//! A request of one command (the submission fast path) keeps its tag in its slot record and has
//! no request record until a slow path needs one; one record stays reserved for it. These
//! tests fill the queue with such requests and drive every slow path (error, retry, timeout,
//! late completion, reset, removal), each with every slot busy: every tag must come back exactly
//! once with the right result, and the queue must take a full load again afterwards (no
//! reserved record leaked, none counted twice).

use std::collections::HashMap;

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, SubmitError};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config, Controller, IoQueuePair};

type Ctrl = Controller<ModelMmio, ModelClock>;
type Qp = IoQueuePair<ModelMmio, ModelClock>;
type Reports = HashMap<u32, Vec<Result<(), IoError>>>;

struct Rig {
    model: NvmeModel,
    clock: ModelClock,
    ctrl: Ctrl,
    qp: Qp,
    buf: DmaRegion,
}

fn rig(mcfg: ModelConfig, cfg: Config) -> Rig {
    let dma = HostDma::new();
    let model = NvmeModel::new(mcfg, dma.clone());
    let clock = ModelClock::new();
    let mut ctrl = Controller::init(model.mmio(), &dma, clock.clone(), cfg).expect("init");
    let qp = ctrl.create_io_qpair(&dma, 1, 32).expect("qpair");
    let buf = dma.alloc(64 * 4096, 4096).expect("buffer");
    Rig {
        model,
        clock,
        ctrl,
        qp,
        buf,
    }
}

fn timeouts(ms: u64) -> Config {
    Config {
        io_timeout_ms: ms,
        ..Config::default()
    }
}

/// A 4 KiB read of LBA `8 * i` into page `i` of the buffer: one command, two pages at most
/// (the fast path's shape).
fn read(buf: &DmaRegion, i: u32) -> BlockOp {
    BlockOp::Read {
        ns: 1,
        lba: i as u64 * 8,
        blocks: 8,
        buf: BufRef::new(buf, i as usize * 4096, 4096).expect("bufref"),
    }
}

/// Submits one-command reads, tags `base..`, until the queue is full; returns how many went.
fn fill(r: &mut Rig, base: u32) -> u32 {
    let mut n = 0;
    loop {
        match r.qp.submit(read(&r.buf, n), base + n) {
            Ok(()) => n += 1,
            Err(SubmitError::QueueFull) => break,
            Err(e) => panic!("submit {n}: {e:?}"),
        }
    }
    r.qp.flush_submissions();
    n
}

fn poll(r: &mut Rig, got: &mut Reports) {
    r.qp.poll(64, &mut |t, res| got.entry(t).or_default().push(res));
}

/// Polls (the clock moving 10 ms every 16 polls) until nothing is in flight.
fn drain(r: &mut Rig, got: &mut Reports) {
    for k in 0..100_000u32 {
        if r.qp.in_flight() == 0 {
            return;
        }
        poll(r, got);
        if k % 16 == 15 {
            r.clock.advance_ms(10);
        }
    }
    panic!("did not drain: {} in flight", r.qp.in_flight());
}

/// Every tag `base..base + n` reported exactly once, with `want`.
fn assert_each_once(got: &Reports, base: u32, n: u32, want: Result<(), IoError>) {
    assert_eq!(got.len(), n as usize, "tags reported: {got:?}");
    for t in base..base + n {
        assert_eq!(got.get(&t).map(Vec::as_slice), Some(&[want][..]), "tag {t}");
    }
}

/// The queue takes as many one-command requests as it has slots, and they all succeed.
fn full_load_again(r: &mut Rig, slots: u32) {
    assert_eq!(r.qp.busy_slots(), 0);
    let n = fill(r, 10_000);
    assert_eq!(n, slots, "a full load after the slow paths");
    let mut got = Reports::new();
    drain(r, &mut got);
    assert_each_once(&got, 10_000, n, Ok(()));
}

#[test]
fn errors_with_every_slot_busy_report_each_tag_once() {
    let mut r = rig(ModelConfig::default(), Config::default());
    let slots = r.qp.free_slots() as u32;
    assert!(slots >= 16, "{slots} slots");
    r.model.set_fault(Fault::PermanentError);
    let n = fill(&mut r, 0);
    assert_eq!(n, slots);
    let mut got = Reports::new();
    drain(&mut r, &mut got);
    assert_eq!(got.len(), n as usize);
    for (t, v) in &got {
        assert!(
            matches!(v.as_slice(), [Err(IoError::Device { status })] if status.dnr()),
            "tag {t}: {v:?}"
        );
    }
    r.model.set_fault(Fault::None);
    full_load_again(&mut r, slots);
}

#[test]
fn retried_errors_with_every_slot_busy_succeed_once() {
    let mut r = rig(ModelConfig::default(), Config::default());
    let slots = r.qp.free_slots() as u32;
    // Every command fails once with a retryable status and is issued again.
    r.model.set_fault(Fault::TransientError(slots));
    let n = fill(&mut r, 0);
    let mut got = Reports::new();
    drain(&mut r, &mut got);
    assert_each_once(&got, 0, n, Ok(()));
    assert_eq!(r.qp.stats().retries, u64::from(n));
    full_load_again(&mut r, slots);
}

#[test]
fn timeouts_then_late_completions_with_every_slot_busy() {
    let mut r = rig(ModelConfig::default(), timeouts(100));
    let slots = r.qp.free_slots() as u32;
    r.model.set_fault(Fault::Stall);
    let n = fill(&mut r, 0);
    r.clock.advance_ms(150);
    let mut got = Reports::new();
    poll(&mut r, &mut got);
    assert!(got.is_empty(), "a timeout is an event: {got:?}");
    let mut events: Vec<u32> = core::iter::from_fn(|| r.qp.pop_timed_out())
        .map(|e| e.tag)
        .collect();
    events.sort();
    assert_eq!(events, (0..n).collect::<Vec<_>>(), "one event per tag");
    // Timed out again later: still one event per tag.
    r.clock.advance_ms(150);
    poll(&mut r, &mut got);
    assert_eq!(r.qp.pop_timed_out(), None);
    // The device completes them late: each tag once, with the device's status.
    r.model.set_fault(Fault::None);
    r.model.step();
    drain(&mut r, &mut got);
    assert_each_once(&got, 0, n, Ok(()));
    assert_eq!(r.qp.stats().late_completions, u64::from(n));
    full_load_again(&mut r, slots);
}

#[test]
fn a_reset_with_every_slot_busy_quiesces_or_resubmits_each_once() {
    let mut r = rig(ModelConfig::default(), timeouts(100));
    let slots = r.qp.free_slots() as u32;
    r.model.set_fault(Fault::Stall);
    // Half time out (completed by the reset with Timeout), half are in flight at the reset
    // (issued again after it, and succeed).
    let mut n = 0;
    for t in 0..slots / 2 {
        r.qp.submit(read(&r.buf, t), t).unwrap();
        n += 1;
    }
    r.qp.flush_submissions();
    r.clock.advance_ms(150);
    let mut got = Reports::new();
    poll(&mut r, &mut got);
    assert_eq!(
        core::iter::from_fn(|| r.qp.pop_timed_out()).count(),
        n as usize
    );
    let m = fill(&mut r, 1000);
    assert_eq!(n + m, slots);
    r.model.set_fault(Fault::None);
    r.ctrl.reset(&mut [&mut r.qp]).expect("reset");
    drain(&mut r, &mut got);
    assert_eq!(got.len(), slots as usize, "{got:?}");
    for t in 0..n {
        assert_eq!(got[&t], vec![Err(IoError::Timeout)], "tag {t}");
    }
    for t in 1000..1000 + m {
        assert_eq!(got[&t], vec![Ok(())], "tag {t}");
    }
    assert_eq!(r.qp.stats().resubmitted_after_reset, u64::from(m));
    full_load_again(&mut r, slots);
}

#[test]
fn a_failed_reset_with_every_slot_busy_fails_each_once() {
    let mut r = rig(ModelConfig::default(), timeouts(100));
    r.model.set_fault(Fault::Stall);
    let n = fill(&mut r, 0);
    assert_eq!(n as usize, r.qp.busy_slots());
    r.model.set_fault(Fault::NeverReady);
    assert!(r.ctrl.reset(&mut [&mut r.qp]).is_err());
    let mut got = Reports::new();
    drain(&mut r, &mut got);
    assert_each_once(&got, 0, n, Err(IoError::DeviceReset));
}

#[test]
fn removal_with_every_slot_busy_fails_each_once() {
    let mut r = rig(ModelConfig::default(), Config::default());
    let slots = r.qp.free_slots() as u32;
    r.model.set_fault(Fault::Stall);
    let n = fill(&mut r, 0);
    assert_eq!(n, slots);
    r.model.set_fault(Fault::Removed);
    let mut got = Reports::new();
    drain(&mut r, &mut got);
    assert_each_once(&got, 0, n, Err(IoError::Removed));
}

#[test]
fn one_command_and_split_requests_share_the_records() {
    // MDTS of 2 pages: a 16 KiB read is two commands (a request record from the start).
    let mcfg = ModelConfig {
        mdts: 1,
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let slots = r.qp.free_slots() as u32;
    r.model.set_fault(Fault::PermanentError);
    let mut split = 0;
    for t in 0..slots / 4 {
        let op = BlockOp::Read {
            ns: 1,
            lba: t as u64 * 32,
            blocks: 32,
            buf: BufRef::new(&r.buf, t as usize * 16384, 16384).unwrap(),
        };
        r.qp.submit(op, 5000 + t).unwrap();
        split += 1;
    }
    let one = fill(&mut r, 0);
    assert_eq!(2 * split + one, slots);
    let mut got = Reports::new();
    drain(&mut r, &mut got);
    assert_eq!(got.len(), (split + one) as usize);
    for (t, v) in &got {
        assert!(
            matches!(v.as_slice(), [Err(IoError::Device { .. })]),
            "tag {t}: {v:?}"
        );
    }
    r.model.set_fault(Fault::None);
    full_load_again(&mut r, slots);
}

#[test]
fn hostile_completions_naming_a_live_one_command_request_are_dropped() {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let mut ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).unwrap();
    // 4 entries: 3 slots, CID = slot | generation << 2.
    let mut qp = ctrl.create_io_qpair(&dma, 1, 4).unwrap();
    let buf = dma.alloc(2 * 4096, 4096).unwrap();
    let mut got = Reports::new();
    let poll = |qp: &mut Qp, got: &mut Reports| {
        qp.poll(8, &mut |t, res| got.entry(t).or_default().push(res))
    };
    // Slot 0, generation 1, completes; then slot 0, generation 2 (CID 8), tag 7, stays the
    // device's.
    qp.submit(read(&buf, 0), 1).unwrap();
    qp.flush_submissions();
    poll(&mut qp, &mut got);
    assert_each_once(&got, 1, 1, Ok(()));
    got.clear();
    model.set_fault(Fault::Stall);
    qp.submit(read(&buf, 1), 7).unwrap();
    qp.flush_submissions();
    model.inject_completion(1, 2, 0, 8, 0); // another SQ
    model.inject_completion(1, 1, 500, 8, 0); // SQ head past the queue
    poll(&mut qp, &mut got); // (a CQ of 4 entries holds 3)
    model.inject_completion(1, 1, 1, 4, 0); // the slot's old generation
    model.inject_completion(1, 1, 1, 3, 0); // slot 3 of 3 (its record exists, never used)
    poll(&mut qp, &mut got);
    assert!(got.is_empty(), "{got:?}");
    let s = qp.stats();
    assert_eq!(
        (s.bad_sqid, s.bad_sq_head, s.stale_cid, s.bad_cid),
        (1, 1, 1, 1)
    );
    assert_eq!(qp.in_flight(), 1);
    // The real completion, then a duplicate of it.
    model.set_fault(Fault::None);
    model.step();
    model.inject_completion(1, 1, 2, 8, 0);
    poll(&mut qp, &mut got);
    poll(&mut qp, &mut got);
    assert_each_once(&got, 7, 1, Ok(()));
    assert_eq!(qp.stats().stale_cid, 2);
    assert_eq!(qp.in_flight(), 0);
}
