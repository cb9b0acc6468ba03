//! What `instr_io` and `instr_burst` share: the model rig, the 4 KiB read, the raw queue-pair
//! loop, the reactor, and `main` (each example brings its own reactor loop).

use keel_aio::Aio;
use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config, Controller, IoQueuePair};
use keel_reactor::{split, MeshStorage, Msg, Reactor};

pub const N: usize = 64;
pub const W: usize = keel_slots::words_for(N);
pub type Qp = IoQueuePair<ModelMmio, ModelClock>;
pub type Re = Reactor<'static, Qp, 1, N, W>;

/// The 4 KiB read of I/O `i` of a batch (into page `i` of the buffer).
pub fn read(buf: &DmaRegion, i: u32) -> BlockOp {
    BlockOp::Read {
        ns: 1,
        lba: (i as u64 * 8) % 8192,
        blocks: 8,
        buf: BufRef::new(buf, i as usize * 4096, 4096).expect("bufref"),
    }
}

fn raw(mut qp: Qp, buf: &DmaRegion, ios: u32, batch: u32) -> u32 {
    let (mut done, mut tag) = (0u32, 0u32);
    while tag < ios {
        let n = batch.min(ios - tag);
        for i in 0..n {
            qp.submit(read(buf, i), tag).expect("submit");
            tag += 1;
        }
        qp.flush_submissions();
        while qp.in_flight() > 0 {
            qp.poll(64, &mut |_, r| {
                assert!(r.is_ok());
                done += 1;
            });
        }
    }
    done
}

/// A reactor for core 0 of a one-core mesh, owning `qp`.
pub fn reactor(qp: Qp) -> Re {
    let mesh: &'static mut MeshStorage<Msg, 1, 8> = Box::leak(Box::new(MeshStorage::new()));
    let [links] = split(mesh);
    let aio: &'static Aio<N, W> = Box::leak(Box::new(Aio::new()));
    Reactor::new(links, aio, Some(qp))
}

/// Polls the batch back and counts its (successful) completions.
pub fn reap(re: &mut Re) -> u32 {
    while re.in_flight() > 0 || re.staged() > 0 {
        re.poll();
    }
    let mut done = 0;
    while let Some(c) = re.next_completion() {
        assert!(c.result.is_ok());
        done += 1;
    }
    done
}

/// `<ios> <batch> [reactor]`: brings up the model and runs the raw loop, or `with_reactor`.
pub fn main_with(with_reactor: impl FnOnce(Qp, &DmaRegion, u32, u32) -> u32) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u32| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let ios = num(0, 1000);
    let batch = num(1, 16).clamp(1, 32);
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let mut ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    let qp = ctrl.create_io_qpair(&dma, 1, 64).expect("qpair");
    let buf = dma.alloc(batch as usize * 4096, 4096).expect("buffer");
    let done = if args.get(2).is_some_and(|a| a == "reactor") {
        with_reactor(qp, &buf, ios, batch)
    } else {
        raw(qp, &buf, ios, batch)
    };
    assert_eq!(done, ios);
    println!("{done} I/Os");
}
