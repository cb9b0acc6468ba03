//! Unit tests of the queue pair's private arithmetic (the rest is tested through the public
//! API in `tests/`).

extern crate std;

use std::collections::HashSet;

use keel_model::{HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};

use super::IoQueuePair;
use crate::{Config, Controller};

fn pair(depth: u16, lazy: bool) -> IoQueuePair<ModelMmio, ModelClock> {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let cfg = Config {
        lazy_cq_doorbell: lazy,
        ..Config::default()
    };
    let mut ctrl = Controller::init(model.mmio(), &dma, ModelClock::new(), cfg).expect("init");
    ctrl.create_io_qpair(&dma, 1, depth).expect("qpair")
}

/// Every slot's generation cycles through every value the CID has room for, each once per
/// cycle, and never gives the last slot CID 0xFFFF: with the last slot index all ones (2, 4,
/// 256 slots) the all-ones generation is skipped, otherwise (3, 31 slots) it is used.
#[test]
fn generations_cycle_through_every_cid_but_ffff() {
    for (depth, lazy, slots, cycle) in [
        (3, false, 2, 0x7FFF),
        (4, false, 3, 0x4000),
        (9, true, 4, 0x3FFF),
        (64, true, 31, 0x0800),
        (257, false, 256, 0x00FF),
    ] {
        let qp = pair(depth, lazy);
        assert_eq!(qp.nslots, slots, "depth {depth}");
        for slot in [0, slots - 1] {
            let mut gen = 0u16;
            let mut cids = HashSet::new();
            for _ in 0..cycle {
                let cid = qp.cid_of(slot, gen);
                assert_ne!(cid, 0xFFFF, "{slots} slots: slot {slot} gen {gen:#x}");
                assert_eq!(cid & qp.slot_mask, slot, "{slots} slots: gen {gen:#x}");
                assert_eq!(cid >> qp.slot_bits, gen, "{slots} slots: slot {slot}");
                assert!(
                    cids.insert(cid),
                    "{slots} slots: cid {cid:#x} twice in a cycle"
                );
                gen = qp.next_gen(gen);
            }
            assert_eq!(gen, 0, "{slots} slots: the cycle is {cycle:#x} generations");
        }
    }
}
