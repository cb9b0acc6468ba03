//! Lazy completion-queue doorbells: the head is written only when the CQ slack is used up.
//! The model keeps completions pending while the CQ looks full, as a device does, so a wrong
//! rule would stall these tests (bounded by a pass limit) rather than pass.

use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::DmaAllocator;
use keel_model::{HostDma, ModelClock, ModelConfig, NvmeModel};
use keel_nvme::{Config, Controller};

fn run(lazy: bool, depth: u16, rounds: usize) -> (usize, u64, u64, usize) {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let cfg = Config {
        lazy_cq_doorbell: lazy,
        ..Config::default()
    };
    let mut ctrl = Controller::init(model.mmio(), &dma, ModelClock::new(), cfg).expect("init");
    let mut qp = ctrl.create_io_qpair(&dma, 1, depth).expect("qpair");
    let slots = qp.depth();
    let buf = dma.alloc(slots * 512, 4096).unwrap();
    let mut done = 0usize;
    let mut passes = 0u64;
    for _ in 0..rounds {
        for tag in 0..slots as u32 {
            let b = BufRef::new(&buf, tag as usize * 512, 512).unwrap();
            qp.submit(
                BlockOp::Read {
                    ns: 1,
                    lba: tag as u64,
                    blocks: 1,
                    buf: b,
                },
                tag,
            )
            .unwrap();
        }
        qp.flush_submissions();
        let mut got = 0;
        while got < slots {
            got += qp.poll(4, &mut |_, r| assert!(r.is_ok()));
            passes += 1;
            assert!(
                passes < 1_000_000,
                "stalled: the device saw a full completion queue"
            );
        }
        done += got;
    }
    (done, model.cq_doorbell_writes(1), passes, slots)
}

#[test]
fn lazy_keeps_slack_and_rings_far_less() {
    let (done, lazy_db, lazy_passes, slots) = run(true, 16, 200);
    assert_eq!(slots, 7, "half of 15 command slots kept as CQ slack");
    assert_eq!(done, 200 * 7);
    let (done_e, eager_db, _, slots_e) = run(false, 16, 200);
    assert_eq!((done_e, slots_e), (200 * 15, 15));
    // Eager: one CQ doorbell per pass that consumed entries (at most 4 per pass here).
    assert!(eager_db >= (200 * 15 / 4) as u64, "eager rang {eager_db}");
    // Lazy: one per `slack` (8) consumed entries.
    assert!(
        lazy_db <= (done as u64).div_ceil(8),
        "lazy rang {lazy_db} for {done} completions"
    );
    assert!(lazy_db < lazy_passes / 2);
}

#[test]
fn lazy_never_lets_the_device_see_a_full_queue_at_any_depth() {
    for depth in [2u16, 3, 4, 8, 33, 64] {
        let (done, db, _, slots) = run(true, depth, 50);
        assert_eq!(done, 50 * slots, "depth {depth}");
        assert!(db > 0 || done == 0);
    }
}

#[test]
fn eager_rings_every_pass_even_when_the_slot_cap_leaves_ring_room() {
    // 512 entries, but at most MAX_COMMANDS (256) slots: the spare ring entries must not turn
    // eager doorbells into lazy ones.
    let (done, db, passes, slots) = run(false, 512, 4);
    assert_eq!(slots, keel_nvme::MAX_COMMANDS);
    assert_eq!(done, 4 * slots);
    // Every pass consumes up to 4 entries and rings once.
    assert!(
        db >= (done as u64).div_ceil(4),
        "eager rang {db} in {passes} passes"
    );
}

#[test]
fn deep_lazy_ring_keeps_every_slot_usable() {
    let (done, db, _, slots) = run(true, 512, 4);
    assert_eq!(slots, 255, "half of 511 entries, under the 256-slot cap");
    assert_eq!(done, 4 * slots);
    assert!(db <= (done as u64).div_ceil(256) + 1, "lazy rang {db}");
}
