//! `IoQueuePair::device_ceiling`: the diagnostic loop that keeps one prebuilt read in flight
//! `qd` times over. It must leave the pair idle and usable, refuse to run beside real I/O or
//! with bad arguments, count error statuses, and give up on a stalled device instead of
//! spinning forever.

use keel_blockdev::{BlockOp, BlockQueue, BufRef, SubmitError};
use keel_hal::DmaAllocator;
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, NvmeModel};
use keel_nvme::{Config, Controller};

fn setup(
    cfg: Config,
) -> (
    NvmeModel,
    HostDma,
    keel_nvme::IoQueuePair<keel_model::ModelMmio, ModelClock>,
) {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let mut ctrl = Controller::init(model.mmio(), &dma, ModelClock::new(), cfg).expect("init");
    let qp = ctrl.create_io_qpair(&dma, 1, 64).expect("qpair");
    (model, dma, qp)
}

/// A `keep_going` that says yes `n - 1` times, then stops.
fn passes(mut n: u32) -> impl FnMut() -> bool {
    move || {
        n = n.saturating_sub(1);
        n > 0
    }
}

/// One 512-byte read of `lba` into the start of `buf`.
fn read(buf: &keel_hal::DmaRegion, lba: u64) -> BlockOp {
    BlockOp::Read {
        ns: 1,
        lba,
        blocks: 1,
        buf: BufRef::new(buf, 0, 512).unwrap(),
    }
}

#[test]
fn runs_counts_and_leaves_the_pair_usable() {
    for lazy in [false, true] {
        let (model, dma, mut qp) = setup(Config {
            lazy_cq_doorbell: lazy,
            ..Config::default()
        });
        let buf = dma.alloc(4096, 4096).unwrap();
        let before = model.io_commands();
        let (done, errors) = qp
            .device_ceiling(1, 8, 8, BufRef::whole(&buf), 16, &mut passes(500))
            .unwrap();
        assert_eq!(errors, 0);
        assert!(done >= 500, "every completion counted ({done})");
        assert_eq!(
            model.io_commands() - before,
            done,
            "and each was a device command"
        );
        // Idle and consistent afterwards: ordinary I/O still works, many times round the ring.
        assert_eq!(qp.busy_slots(), 0);
        for round in 0..100u32 {
            qp.submit(read(&buf, round as u64), round).unwrap();
            let mut got = None;
            for _ in 0..100 {
                qp.poll(8, &mut |t, r| got = Some((t, r)));
                if got.is_some() {
                    break;
                }
            }
            assert_eq!(got, Some((round, Ok(()))), "lazy={lazy} round {round}");
        }
    }
}

#[test]
fn refuses_bad_arguments_and_busy_pairs() {
    let (_model, dma, mut qp) = setup(Config::default());
    let buf = dma.alloc(8192, 4096).unwrap();
    let mut never = || false;
    let whole = BufRef::whole(&buf);
    let page = BufRef::new(&buf, 0, 4096).unwrap();
    assert_eq!(
        qp.device_ceiling(9, 0, 8, page, 4, &mut never),
        Err(SubmitError::InvalidNamespace)
    );
    assert_eq!(
        qp.device_ceiling(1, 8191, 8, page, 4, &mut never),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.device_ceiling(1, 0, 16, whole, 4, &mut never),
        Err(SubmitError::BufferLength),
        "more than one page"
    );
    assert_eq!(
        qp.device_ceiling(1, 0, 8, page, 0, &mut never),
        Err(SubmitError::QueueFull)
    );
    assert_eq!(
        qp.device_ceiling(1, 0, 8, page, 4096, &mut never),
        Err(SubmitError::QueueFull),
        "deeper than the pair's command slots"
    );
    qp.submit(read(&buf, 0), 1).unwrap();
    assert_eq!(
        qp.device_ceiling(1, 0, 8, page, 4, &mut never),
        Err(SubmitError::QueueFull),
        "real I/O in flight"
    );
}

#[test]
fn error_statuses_are_counted() {
    let (model, dma, mut qp) = setup(Config::default());
    let buf = dma.alloc(4096, 4096).unwrap();
    model.set_fault(Fault::PermanentError);
    let (done, errors) = qp
        .device_ceiling(1, 0, 8, BufRef::whole(&buf), 4, &mut passes(50))
        .unwrap();
    assert_eq!(errors, done);
    assert!(done >= 50);
}

#[test]
fn a_stalled_device_ends_in_an_error_not_a_hang() {
    let (model, dma, mut qp) = setup(Config {
        io_timeout_ms: 5,
        ..Config::default()
    });
    let buf = dma.alloc(4096, 4096).unwrap();
    model.set_fault(Fault::Stall);
    assert_eq!(
        qp.device_ceiling(1, 0, 8, BufRef::whole(&buf), 4, &mut || true),
        Err(SubmitError::DeviceUnavailable)
    );
    assert!(qp.needs_reset(), "the pair asks for a reset");
    assert!(qp.is_failed(), "and refuses work until then");
    assert_eq!(
        qp.submit(read(&buf, 0), 1),
        Err(SubmitError::DeviceUnavailable)
    );
}

#[test]
fn duplicate_and_forged_completions_are_counted_never_reissued() {
    let (model, dma, mut qp) = setup(Config {
        io_timeout_ms: 5,
        ..Config::default()
    });
    let buf = dma.alloc(4096, 4096).unwrap();
    model.set_fault(Fault::DuplicateCompletion);
    let (done, errors) = qp
        .device_ceiling(1, 0, 8, BufRef::whole(&buf), 4, &mut passes(40))
        .unwrap();
    assert!(done >= 40);
    // Every duplicate is counted, none taken for a completion; the last one may arrive after
    // the loop finished, and the pair's own poll then drops it as stale.
    assert!(errors == done || errors + 1 == done, "{errors} of {done}");
    let mut reported = 0;
    for _ in 0..10 {
        reported += qp.poll(8, &mut |_, _| {});
    }
    assert_eq!(
        reported, 0,
        "no tag reported for a command the pair never issued"
    );
    assert_eq!(qp.stats().stale_cid, done - errors);
    model.set_fault(Fault::CorruptCid(0x80));
    assert_eq!(
        qp.device_ceiling(1, 0, 8, BufRef::whole(&buf), 4, &mut passes(1)),
        Err(SubmitError::DeviceUnavailable),
        "ids it never issued complete nothing: the loop times out instead of hanging"
    );
}
