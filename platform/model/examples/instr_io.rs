//! Workload for `cargo xtask instr` (run under callgrind): `instr_io <ios> <batch>` brings up
//! the model controller and does `ios` 4 KiB reads on one queue pair, `batch` per doorbell,
//! polling each batch back. xtask runs two I/O counts and subtracts to cancel setup cost.

use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::DmaAllocator;
use keel_model::{HostDma, ModelClock, ModelConfig, NvmeModel};
use keel_nvme::{Config, Controller};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u32>().expect("number"));
    let ios = args.next().unwrap_or(1000);
    let batch = args.next().unwrap_or(16).max(1);
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let mut ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    let mut qp = ctrl.create_io_qpair(&dma, 1, 64).expect("qpair");
    let buf = dma.alloc(batch as usize * 4096, 4096).expect("buffer");
    let mut done = 0u32;
    let mut tag = 0u32;
    while tag < ios {
        let n = batch.min(ios - tag);
        for i in 0..n {
            let b = BufRef::new(&buf, i as usize * 4096, 4096).expect("bufref");
            let op = BlockOp::Read {
                ns: 1,
                lba: (i as u64 * 8) % 8192,
                blocks: 8,
                buf: b,
            };
            qp.submit(op, tag).expect("submit");
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
    assert_eq!(done, ios);
    println!("{done} I/Os");
}
