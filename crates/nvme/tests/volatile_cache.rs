//! The model's volatile write cache: writes reach the media image only on Flush; a power cut
//! drops (or, block by block, keeps) what was not flushed.

use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::DmaAllocator;
use keel_model::{HostDma, ModelClock, ModelConfig, NvmeModel};
use keel_nvme::{Config, Controller};

#[test]
fn flush_makes_durable_power_cut_drops_the_rest() {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    model.set_volatile_cache(true);
    let mut ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).unwrap();
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    let buf = dma.alloc(1024, 4096).unwrap();
    buf.fill(0, 1024, 0xAB).unwrap();
    let mut run = |op: BlockOp| {
        qp.submit(op, 1).unwrap();
        qp.flush_submissions();
        let mut res = None;
        while res.is_none() {
            qp.poll(8, &mut |_, r| res = Some(r));
        }
        res.unwrap().unwrap();
    };
    let w = |lba| BlockOp::Write {
        ns: 1,
        lba,
        blocks: 2,
        buf: BufRef::whole(&buf),
    };
    run(w(0));
    assert_eq!(
        model.disk_read(1, 0, 4),
        vec![0xAB; 4],
        "visible in the cache"
    );
    assert_eq!(model.durable_image(1)[..4], [0; 4], "not on the media yet");
    run(BlockOp::Flush { ns: 1 });
    assert_eq!(model.durable_image(1)[..1024], [0xAB; 1024]);
    run(w(10)); // blocks 10, 11 unflushed
    model.power_cut(|_, lba| lba == 11);
    assert_eq!(
        model.disk_read(1, 10 * 512, 512),
        vec![0; 512],
        "block 10 dropped"
    );
    assert_eq!(
        model.disk_read(1, 11 * 512, 512),
        vec![0xAB; 512],
        "block 11 kept"
    );
    assert_eq!(
        model.disk_read(1, 0, 1024),
        vec![0xAB; 1024],
        "flushed data survives"
    );
}
