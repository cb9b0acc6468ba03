//! Workload for `cargo xtask instr` (run under callgrind): `instr_burst <ios> <batch> [reactor]`
//! is `instr_io`, but with `reactor` each batch goes in with one `Reactor::submit_burst` (the
//! firmware bench job's path) instead of one `Reactor::submit` per I/O. A binary of its own, so
//! that `instr_io`'s code (and its rows) stay what they were: the compiler inlines differently
//! when one binary has both loops.

use keel_aio::Aio;
use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config, Controller, IoQueuePair};
use keel_reactor::{split, MeshStorage, Msg, Reactor};

const N: usize = 64;
const W: usize = keel_slots::words_for(N);
type Qp = IoQueuePair<ModelMmio, ModelClock>;

fn read(buf: &DmaRegion, i: u32) -> BlockOp {
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

fn reactor(qp: Qp, buf: &DmaRegion, ios: u32, batch: u32) -> u32 {
    let mesh: &'static mut MeshStorage<Msg, 1, 8> = Box::leak(Box::new(MeshStorage::new()));
    let [links] = split(mesh);
    let aio: &'static Aio<N, W> = Box::leak(Box::new(Aio::new()));
    let mut re: Reactor<'static, Qp, 1, N, W> = Reactor::new(links, aio, Some(qp));
    let (mut done, mut tag) = (0u32, 0u32);
    let mut ops = [(read(buf, 0), 0u32); 32];
    while tag < ios {
        let n = batch.min(ios - tag);
        let m = n as usize;
        for (i, o) in ops.iter_mut().enumerate().take(m) {
            *o = (read(buf, i as u32), tag + i as u32);
        }
        assert_eq!(re.submit_burst(&ops[..m]).expect("burst"), m);
        tag += n;
        while re.in_flight() > 0 || re.staged() > 0 {
            re.poll();
        }
        while let Some(c) = re.next_completion() {
            assert!(c.result.is_ok());
            done += 1;
        }
    }
    done
}

fn main() {
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
        reactor(qp, &buf, ios, batch)
    } else {
        raw(qp, &buf, ios, batch)
    };
    assert_eq!(done, ios);
    println!("{done} I/Os");
}
