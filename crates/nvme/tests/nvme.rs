//! keel-nvme driven against the software NVMe controller.

use std::collections::HashMap;

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, SubmitError, TimedOut};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NsConfig, NvmeModel};
use keel_nvme::{BadIdentify, Config, Controller, IoQueuePair, NvmeError};

type Ctrl = Controller<ModelMmio, ModelClock>;
type Qp = IoQueuePair<ModelMmio, ModelClock>;

struct Rig {
    model: NvmeModel,
    dma: HostDma,
    clock: ModelClock,
    ctrl: Ctrl,
}

/// A default model and controller with an I/O timeout of `ms`, and queue pair 1 of `entries`.
fn timeout_rig(ms: u64, entries: u16) -> (Rig, Qp) {
    let cfg = Config {
        io_timeout_ms: ms,
        ..Config::default()
    };
    let mut r = rig(ModelConfig::default(), cfg);
    let qp = r.ctrl.create_io_qpair(&r.dma, 1, entries).unwrap();
    (r, qp)
}

fn rig(mcfg: ModelConfig, cfg: Config) -> Rig {
    let dma = HostDma::new();
    let model = NvmeModel::new(mcfg, dma.clone());
    let clock = ModelClock::new();
    let ctrl = Controller::init(model.mmio(), &dma, clock.clone(), cfg).expect("init");
    Rig {
        model,
        dma,
        clock,
        ctrl,
    }
}

fn default_rig() -> Rig {
    rig(ModelConfig::default(), Config::default())
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn read_region(r: &DmaRegion, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    r.read_bytes(off, &mut v).unwrap();
    v
}

/// Polls until nothing is in flight; returns every (tag, result) reported.
fn drain(qp: &mut Qp) -> Vec<(u32, Result<(), IoError>)> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        if qp.in_flight() == 0 {
            return out;
        }
        qp.poll(64, &mut |t, r| out.push((t, r)));
    }
    panic!("queue did not drain: {} in flight", qp.in_flight());
}

fn run_one(qp: &mut Qp, op: BlockOp) -> Result<(), IoError> {
    qp.submit(op, 0xABCD).expect("submit");
    qp.flush_submissions();
    let done = drain(qp);
    assert_eq!(done.len(), 1, "exactly one report");
    assert_eq!(done[0].0, 0xABCD);
    done[0].1
}

/// A namespace of `blocks` blocks of `1 << lba_shift` bytes.
fn ns(nsid: u32, blocks: u64, lba_shift: u8) -> NsConfig {
    NsConfig {
        nsid,
        blocks,
        lba_shift,
    }
}

fn write_read_verify(r: &mut Rig, qp: &mut Qp, nsid: u32, lba: u64, blocks: u32, buf_off: usize) {
    let bs = qp.block_size(nsid).unwrap() as usize;
    let len = blocks as usize * bs;
    let wbuf = r.dma.alloc(len + buf_off + 4096, 4096).unwrap();
    let rbuf = r.dma.alloc(len + buf_off + 4096, 4096).unwrap();
    let data = pattern(lba as u32 ^ blocks ^ buf_off as u32, len);
    wbuf.write_bytes(buf_off, &data).unwrap();
    let wref = BufRef::new(&wbuf, buf_off, len).unwrap();
    run_one(
        qp,
        BlockOp::Write {
            ns: nsid,
            lba,
            blocks,
            buf: wref,
        },
    )
    .expect("write");
    assert_eq!(
        r.model.disk_read(nsid, lba as usize * bs, len),
        data,
        "disk content after write"
    );
    let rref = BufRef::new(&rbuf, buf_off, len).unwrap();
    run_one(
        qp,
        BlockOp::Read {
            ns: nsid,
            lba,
            blocks,
            buf: rref,
        },
    )
    .expect("read");
    assert_eq!(read_region(&rbuf, buf_off, len), data, "read back");
    // Bytes around the buffer are untouched.
    assert!(read_region(&rbuf, 0, buf_off).iter().all(|b| *b == 0));
    assert!(read_region(&rbuf, buf_off + len, 64)
        .iter()
        .all(|b| *b == 0));
    r.dma.free(wbuf);
    r.dma.free(rbuf);
}

#[test]
fn bring_up_and_identify() {
    let mut r = default_rig();
    let info = *r.ctrl.identify();
    assert_eq!(info.model_str(), "Keel NVMe Model");
    assert_eq!(info.serial_str(), "KEELMODEL0001");
    assert_eq!(info.firmware_str(), "1.0");
    assert_eq!(info.version, 0x0001_0400);
    assert_eq!(info.mdts_bytes, Some(4096 << 5));
    assert_eq!(info.max_transfer, 4096 << 5);
    assert!(info.vwc && info.write_zeroes && info.deallocate && info.doorbell_buffer);
    assert!(
        !info.shadow_doorbells,
        "shadow doorbells are off by default"
    );
    assert_eq!(info.io_queues, 4, "model grants 4 of the 8 asked for");
    assert_eq!(info.nn, 1);
    assert_eq!(r.ctrl.namespaces().len(), 1);
    let ns = r.ctrl.namespaces()[0];
    assert_eq!((ns.nsid, ns.blocks, ns.block_size), (1, 8192, 512));
    assert_eq!(
        r.model.admin_commands(0x06),
        4,
        "identify ctrl, ns list, ns 1, ns 1's descriptors (its command set)"
    );
    assert_eq!(
        r.model.admin_commands(0x09),
        2,
        "set features number of queues, asynchronous event configuration"
    );
    assert_eq!(r.model.aers_outstanding(), 4, "AERL + 1 AERs posted");
    assert!(!r.model.shadow_enabled());
    assert_eq!(
        r.ctrl.create_io_qpair(&r.dma, 5, 16).err(),
        Some(NvmeError::InvalidArgument("qid"))
    );
    assert_eq!(
        r.ctrl.create_io_qpair(&r.dma, 1, 1).err(),
        Some(NvmeError::InvalidArgument("depth"))
    );
    let qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    assert_eq!(
        r.ctrl.create_io_qpair(&r.dma, 1, 16).err(),
        Some(NvmeError::QueueInUse(1))
    );
    assert_eq!(qp.depth(), 15);
    r.ctrl.delete_io_qpair(&r.dma, qp).map_err(|e| e.0).unwrap();
    let _qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    r.ctrl.shutdown().unwrap();
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

/// An absurd Identify Namespace leaves that namespace out, with its reason; the controller
/// itself comes up (its other namespaces, if any, stay usable).
#[test]
fn absurd_identify_is_rejected() {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    model.set_fault(Fault::AbsurdIdentify);
    let ctrl = Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default())
        .expect("the controller comes up");
    assert!(ctrl.namespaces().is_empty());
    assert_eq!(ctrl.skipped_namespaces(), [(1, BadIdentify::LbaSize)]);
}

#[test]
fn multiple_namespaces_512_and_4k() {
    let mcfg = ModelConfig {
        namespaces: vec![ns(1, 4096, 9), ns(2, 1024, 12), ns(5, 300, 12)],
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let got: Vec<(u32, u64, u32)> = r
        .ctrl
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks, n.block_size))
        .collect();
    assert_eq!(got, vec![(1, 4096, 512), (2, 1024, 4096), (5, 300, 4096)]);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    assert_eq!(qp.block_size(2), Some(4096));
    assert_eq!(qp.num_blocks(5), Some(300));
    assert_eq!(qp.block_size(3), None);
    write_read_verify(&mut r, &mut qp, 1, 7, 3, 0);
    write_read_verify(&mut r, &mut qp, 2, 1023, 1, 0);
    write_read_verify(&mut r, &mut qp, 5, 296, 4, 512);
    // Writing ns 2 did not touch ns 5 at the same LBA.
    assert!(r
        .model
        .disk_read(5, 1023 % 300 * 4096, 4096)
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn write_read_sizes_and_alignments() {
    let mcfg = ModelConfig {
        mdts: 1,
        ..ModelConfig::default()
    }; // 8 KiB per command
    let mut r = rig(mcfg, Config::default());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 64).unwrap();
    assert_eq!(qp.max_transfer(), 8192);
    write_read_verify(&mut r, &mut qp, 1, 0, 1, 0);
    for off in [4usize, 12, 508, 4092] {
        write_read_verify(&mut r, &mut qp, 1, 100, 1, off);
        write_read_verify(&mut r, &mut qp, 1, 200, 9, off);
    }
    // > MDTS: 64 KiB in 8 KiB commands, one tag.
    let before = r.model.io_commands();
    write_read_verify(&mut r, &mut qp, 1, 1000, 128, 36);
    assert_eq!(
        r.model.io_commands() - before,
        2 * 8,
        "64 KiB in 8 KiB commands, each way"
    );
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

/// The driver's one-pass submit takes a read or write of one command within two pages on the
/// first namespace; everything else goes the general way. Both sides of each boundary move the
/// right bytes, and refusals still come back typed.
#[test]
fn one_pass_and_general_paths_meet_at_their_boundaries() {
    let mcfg = ModelConfig {
        namespaces: vec![ns(1, 4096, 9), ns(2, 1024, 12)],
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 64).unwrap();
    // (blocks of 512 B, buffer offset): two pages exactly, just inside and just past two pages
    // at an offset, the last LBA, and a transfer past MDTS (split).
    for (lba, blocks, off) in [
        (0, 16, 0),
        (40, 15, 4),
        (80, 16, 4),
        (120, 8, 4092),
        (4095, 1, 508),
        (200, 1024, 0),
    ] {
        write_read_verify(&mut r, &mut qp, 1, lba, blocks, off);
    }
    // Another namespace (4 KiB blocks) goes the general way.
    write_read_verify(&mut r, &mut qp, 2, 7, 1, 0);
    write_read_verify(&mut r, &mut qp, 2, 1023, 1, 12);
    let buf = r.dma.alloc(8192, 4096).unwrap();
    let read = |ns, lba, blocks, len| BlockOp::Read {
        ns,
        lba,
        blocks,
        buf: BufRef::new(&buf, 0, len).unwrap(),
    };
    assert_eq!(
        qp.submit(read(1, 4096, 1, 512), 1),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(qp.submit(read(1, 0, 0, 0), 2), Err(SubmitError::OutOfRange));
    assert_eq!(
        qp.submit(read(1, 0, 2, 512), 3),
        Err(SubmitError::BufferLength)
    );
    assert_eq!(
        qp.submit(read(9, 0, 1, 512), 4),
        Err(SubmitError::InvalidNamespace)
    );
    assert_eq!(qp.in_flight(), 0, "nothing refused is in flight");
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

#[test]
fn prp_list_chained_over_two_pages() {
    let mcfg = ModelConfig {
        mdts: 0,
        namespaces: vec![ns(1, 16384, 9)],
        ..ModelConfig::default()
    };
    let cfg = Config {
        prp_list_pages: 2,
        ..Config::default()
    };
    let mut r = rig(mcfg, cfg);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 8).unwrap();
    assert_eq!(qp.max_transfer(), (511 + 512) * 4096);
    let before = r.model.io_commands();
    // 3 MiB at a 100-byte offset: 769 pages -> two chained PRP list pages, one command.
    write_read_verify(&mut r, &mut qp, 1, 10, 6144, 100);
    assert_eq!(r.model.io_commands() - before, 2);
    // Exactly 2 MiB + 4 KiB page aligned: PRP1 + 512 list entries, spills into page 2.
    write_read_verify(&mut r, &mut qp, 1, 0, 4104, 0);
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

#[test]
fn flush_write_zeroes_deallocate() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let buf = r.dma.alloc(64 * 512, 4096).unwrap();
    let data = pattern(9, 64 * 512);
    buf.write_bytes(0, &data).unwrap();
    run_one(
        &mut qp,
        BlockOp::Write {
            ns: 1,
            lba: 0,
            blocks: 64,
            buf: BufRef::whole(&buf),
        },
    )
    .unwrap();
    let before = r.model.io_commands();
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
    assert_eq!(r.model.io_commands() - before, 1);

    run_one(
        &mut qp,
        BlockOp::WriteZeroes {
            ns: 1,
            lba: 8,
            blocks: 8,
        },
    )
    .unwrap();
    let disk = r.model.disk_read(1, 0, 64 * 512);
    assert_eq!(disk[..8 * 512], data[..8 * 512]);
    assert!(disk[8 * 512..16 * 512].iter().all(|b| *b == 0));
    assert_eq!(disk[16 * 512..], data[16 * 512..]);

    run_one(
        &mut qp,
        BlockOp::Deallocate {
            ns: 1,
            lba: 32,
            blocks: 16,
        },
    )
    .unwrap();
    let disk = r.model.disk_read(1, 0, 64 * 512);
    assert!(disk[32 * 512..48 * 512].iter().all(|b| *b == 0));
    assert_eq!(disk[48 * 512..], data[48 * 512..]);
    assert_eq!(disk[16 * 512..32 * 512], data[16 * 512..32 * 512]);

    // Write zeroes bigger than one command's 65536-block limit is split too.
    let mcfg = ModelConfig {
        namespaces: vec![ns(1, 140_000, 9)],
        ..ModelConfig::default()
    };
    let r2 = rig(mcfg, Config::default());
    let mut r2 = r2;
    let mut qp2 = r2.ctrl.create_io_qpair(&r2.dma, 1, 8).unwrap();
    r2.model.disk_write(1, 139_999 * 512, &[0xAA; 512]);
    let before = r2.model.io_commands();
    run_one(
        &mut qp2,
        BlockOp::WriteZeroes {
            ns: 1,
            lba: 0,
            blocks: 140_000,
        },
    )
    .unwrap();
    assert_eq!(r2.model.io_commands() - before, 3);
    assert!(r2
        .model
        .disk_read(1, 139_999 * 512, 512)
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn submit_validation_errors() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 8).unwrap();
    let buf = r.dma.alloc(8192, 4096).unwrap();
    let b = |len| BufRef::new(&buf, 0, len).unwrap();
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 2,
                lba: 0,
                blocks: 1,
                buf: b(512)
            },
            1
        ),
        Err(SubmitError::InvalidNamespace)
    );
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 8191,
                blocks: 2,
                buf: b(1024)
            },
            1
        ),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 0,
                buf: b(0)
            },
            1
        ),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 2,
                buf: b(512)
            },
            1
        ),
        Err(SubmitError::BufferLength)
    );
    let odd = BufRef::new(&buf, 2, 512).unwrap();
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 1,
                buf: odd
            },
            1
        ),
        Err(SubmitError::BufferAlignment)
    );
    assert_eq!(
        BufRef::new(&buf, 8000, 512),
        Err(keel_blockdev::BufError::OutOfBounds)
    );
    assert_eq!(qp.in_flight(), 0);
    assert_eq!(qp.free_slots(), 7);
}

#[test]
fn queue_full_is_backpressure() {
    let mcfg = ModelConfig {
        mdts: 1,
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 8).unwrap();
    assert_eq!(qp.depth(), 7);
    let buf = r.dma.alloc(64 * 1024, 4096).unwrap();
    for t in 0..7 {
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: t as u64,
                blocks: 1,
                buf: BufRef::new(&buf, t * 512, 512).unwrap(),
            },
            t as u32,
        )
        .unwrap();
    }
    let one = BufRef::new(&buf, 0, 512).unwrap();
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 1,
                buf: one
            },
            99
        ),
        Err(SubmitError::QueueFull)
    );
    // 64 KiB at 8 KiB per command needs 8 slots: more than the queue has.
    assert_eq!(
        qp.submit(
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 128,
                buf: BufRef::whole(&buf)
            },
            98
        ),
        Err(SubmitError::TooLarge)
    );
    assert_eq!(qp.in_flight(), 7);
    let done = drain(&mut qp);
    let mut tags: Vec<u32> = done.iter().map(|d| d.0).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..7).collect::<Vec<_>>());
    assert!(done.iter().all(|d| d.1.is_ok()));
    // A split request that needs 4 slots fits again.
    qp.submit(
        BlockOp::Read {
            ns: 1,
            lba: 0,
            blocks: 64,
            buf: BufRef::new(&buf, 0, 32 * 1024).unwrap(),
        },
        5,
    )
    .unwrap();
    assert_eq!(qp.free_slots(), 3);
    assert_eq!(drain(&mut qp), vec![(5, Ok(()))]);
}

#[test]
fn qd32_burst_rings_one_doorbell() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 64).unwrap();
    let buf = r.dma.alloc(32 * 4096, 4096).unwrap();
    let sq0 = r.model.sq_doorbell_writes(1);
    let cq0 = r.model.cq_doorbell_writes(1);
    for t in 0..32u32 {
        let b = BufRef::new(&buf, t as usize * 4096, 4096).unwrap();
        qp.submit(
            BlockOp::Write {
                ns: 1,
                lba: t as u64 * 8,
                blocks: 8,
                buf: b,
            },
            1000 + t,
        )
        .unwrap();
    }
    assert_eq!(
        r.model.sq_doorbell_writes(1),
        sq0,
        "submit alone rings nothing"
    );
    assert_eq!(r.model.io_commands(), 0);
    qp.flush_submissions();
    qp.flush_submissions(); // nothing new: no second doorbell
    assert_eq!(r.model.sq_doorbell_writes(1) - sq0, 1);
    assert_eq!(r.model.io_commands(), 32);
    let mut seen = HashMap::new();
    let n = qp.poll(usize::MAX, &mut |t, res| {
        res.unwrap();
        *seen.entry(t).or_insert(0) += 1;
    });
    assert_eq!(n, 32);
    assert_eq!(seen.len(), 32);
    assert!(seen.values().all(|c| *c == 1));
    assert_eq!(
        r.model.cq_doorbell_writes(1) - cq0,
        1,
        "one CQ head doorbell per poll pass"
    );
    assert_eq!(qp.stats().sq_doorbells, 1);
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn poll_without_flush_still_submits() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    qp.submit(BlockOp::Flush { ns: 1 }, 3).unwrap();
    assert_eq!(drain(&mut qp), vec![(3, Ok(()))]);
}

#[test]
fn duplicate_and_bogus_completions_are_rejected() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    r.model.set_fault(Fault::DuplicateCompletion);
    for t in 0..4u32 {
        qp.submit(BlockOp::Flush { ns: 1 }, t).unwrap();
    }
    let done = drain(&mut qp);
    assert_eq!(done.len(), 4, "{done:?}");
    // Let the duplicates (posted after each real one) be consumed too.
    let mut extra = 0;
    qp.poll(64, &mut |_, _| extra += 1);
    assert_eq!(extra, 0);
    assert_eq!(qp.stats().stale_cid, 4);
    r.model.set_fault(Fault::None);

    // Out-of-range CID, wrong SQID, SQ head past the queue: all dropped and counted.
    r.model.inject_completion(1, 1, 0, 0x001F, 0); // slot 31 >= 31 slots
    r.model.inject_completion(1, 2, 0, 0x0001, 0);
    r.model.inject_completion(1, 1, 500, 0x0001, 0);
    let mut spurious = 0;
    qp.poll(64, &mut |_, _| spurious += 1);
    assert_eq!(spurious, 0);
    let s = qp.stats();
    assert_eq!((s.bad_cid, s.bad_sqid, s.bad_sq_head), (1, 1, 1));
    // The queue still works afterwards.
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
}

#[test]
fn stale_generation_is_rejected_when_slot_is_reused() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 4).unwrap();
    // Use slot 0 once (generation 1), then keep it busy with a stalled command (generation 2).
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
    r.model.set_fault(Fault::Stall);
    qp.submit(BlockOp::Flush { ns: 1 }, 7).unwrap();
    qp.flush_submissions();
    // A completion carrying the old generation for the (now busy) slot must not finish tag 7.
    let slot_bits = 2; // 3 slots
    r.model.inject_completion(1, 1, 1, 1 << slot_bits, 0);
    let mut got = Vec::new();
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert!(got.is_empty());
    assert_eq!(qp.stats().stale_cid, 1);
    r.model.set_fault(Fault::None);
    r.model.step();
    assert_eq!(drain(&mut qp), vec![(7, Ok(()))]);
}

#[test]
fn transient_errors_are_retried_permanent_are_not() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    r.model.set_fault(Fault::TransientError(2));
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
    assert_eq!(qp.stats().retries, 2);
    r.model.set_fault(Fault::TransientError(10));
    assert!(matches!(
        run_one(&mut qp, BlockOp::Flush { ns: 1 }),
        Err(IoError::Device { status }) if status.code() == 0x0006 && !status.dnr()
    ));
    assert_eq!(qp.stats().retries, 2 + 3, "bounded by max_retries");
    r.model.set_fault(Fault::PermanentError);
    assert!(matches!(
        run_one(&mut qp, BlockOp::Flush { ns: 1 }),
        Err(IoError::Device { status }) if status.code() == 0x0006 && status.dnr()
    ));
    assert_eq!(qp.stats().retries, 5, "DNR=1 is not retried");
    // Device-side LBA check maps to a typed error (the driver's own check is bypassed by a
    // namespace that shrank: write past the model's end through a raw bus buffer).
    r.model.set_fault(Fault::None);
}

#[test]
fn split_request_fails_if_one_part_fails() {
    let mcfg = ModelConfig {
        mdts: 1,
        ..ModelConfig::default()
    };
    let mut r = rig(
        mcfg,
        Config {
            max_retries: 0,
            ..Config::default()
        },
    );
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    let buf = r.dma.alloc(32 * 1024, 4096).unwrap();
    r.model.set_fault(Fault::TransientError(1)); // first part fails, no retries allowed
    let res = run_one(
        &mut qp,
        BlockOp::Write {
            ns: 1,
            lba: 0,
            blocks: 64,
            buf: BufRef::whole(&buf),
        },
    );
    assert!(matches!(res, Err(IoError::Device { status }) if status.code() == 0x0006));
    assert_eq!(qp.busy_slots(), 0);
}

#[test]
fn timeout_reports_once_and_offers_abort() {
    let (mut r, mut qp) = timeout_rig(100, 16);
    r.model.set_fault(Fault::Stall);
    qp.submit(BlockOp::Flush { ns: 1 }, 42).unwrap();
    qp.flush_submissions();
    let mut got = Vec::new();
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert!(got.is_empty());
    r.clock.advance_ms(150);
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert!(got.is_empty(), "a timeout is an event, not the completion");
    assert_eq!(qp.pop_timed_out(), Some(TimedOut { tag: 42 }));
    assert_eq!(qp.pop_timed_out(), None, "announced once");
    r.clock.advance_ms(150);
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert_eq!(qp.pop_timed_out(), None, "announced once");
    assert!(qp.needs_reset());
    assert_eq!(qp.in_flight(), 1, "the tag is still the device's");
    assert_eq!(qp.busy_slots(), 1, "the device still owns the command");
    let cid = qp.pop_abort_candidate().expect("abort candidate");
    assert_eq!(r.ctrl.abort(1, cid), Ok(false), "model never aborts");
    // The late completion reports the tag, once, with the device's own status.
    r.model.set_fault(Fault::None);
    r.model.step();
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert_eq!(got, vec![(42, Ok(()))]);
    r.clock.advance_ms(150);
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert_eq!(got.len(), 1, "reported once");
    assert_eq!(qp.stats().late_completions, 1);
    assert_eq!(qp.busy_slots(), 0);
    assert_eq!(qp.in_flight(), 0);
}

/// A queue pair (I/O timeout 100 ms, `timeout_check_polls` as given) whose one command, tag
/// `tag`, the device never completes; polled 45 times before the deadline (leaving the clock
/// countdown anywhere in its range), then the clock moved past it.
fn stalled_past_deadline(timeout_check_polls: u16, tag: u32) -> (Rig, Qp) {
    let cfg = Config {
        io_timeout_ms: 100,
        timeout_check_polls,
        ..Config::default()
    };
    let mut r = rig(ModelConfig::default(), cfg);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    r.model.set_fault(Fault::Stall);
    qp.submit(BlockOp::Flush { ns: 1 }, tag).unwrap();
    qp.flush_submissions();
    for _ in 0..45 {
        qp.poll(8, &mut |t, res| {
            panic!("reported before the deadline: {t} {res:?}")
        });
    }
    r.clock.advance_ms(150);
    (r, qp)
}

#[test]
fn a_timeout_is_seen_within_timeout_check_polls_when_gated_by_poll_due() {
    // The timeout check reads the clock on every `timeout_check_polls`-th poll only. A caller
    // that polls only when `poll_due` says so (the reactor) must still see the timeout within
    // that many checks after the deadline, and a "due" seen by `poll_due` must not be lost
    // before `poll`.
    let every = Config::default().timeout_check_polls;
    assert!(every > 1, "the default shares clock reads");
    let (_r, mut qp) = stalled_past_deadline(every, 7);
    let mut got = Vec::new();
    let mut events = Vec::new();
    let mut checks = 0;
    while events.is_empty() && checks < 2 * every {
        checks += 1;
        if qp.poll_due() {
            qp.poll(8, &mut |t, res| got.push((t, res)));
            events.extend(core::iter::from_fn(|| qp.pop_timed_out()));
        }
    }
    assert_eq!(events, vec![TimedOut { tag: 7 }]);
    assert!(got.is_empty(), "an event, not a completion: {got:?}");
    assert!(checks <= every, "seen after {checks} checks");
    // A caller that polls from a timer tick sets `timeout_check_polls: 1`: the first poll
    // after the deadline sees the timeout.
    let (_r, mut qp) = stalled_past_deadline(1, 8);
    assert!(qp.poll_due());
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert_eq!(qp.pop_timed_out(), Some(TimedOut { tag: 8 }));
    assert!(got.is_empty());
}

#[test]
fn wrong_phase_completion_times_out() {
    let (mut r, mut qp) = timeout_rig(10, 16);
    r.model.set_fault(Fault::WrongPhase);
    qp.submit(BlockOp::Flush { ns: 1 }, 1).unwrap();
    qp.flush_submissions();
    r.clock.advance_ms(20);
    let mut got = Vec::new();
    for _ in 0..64 {
        qp.poll(8, &mut |t, res| got.push((t, res)));
    }
    assert!(got.is_empty());
    assert_eq!(qp.pop_timed_out(), Some(TimedOut { tag: 1 }));
    r.model.set_fault(Fault::None);
    r.ctrl.reset(&mut [&mut qp]).unwrap();
    assert_eq!(drain(&mut qp), vec![(1, Err(IoError::Timeout))]);
}

#[test]
fn reset_with_in_flight_reports_each_tag_exactly_once() {
    let (mut r, mut qp) = timeout_rig(100, 32);
    let mut qp2 = r.ctrl.create_io_qpair(&r.dma, 2, 8).unwrap();
    let buf = r.dma.alloc(16 * 4096, 4096).unwrap();
    let data = pattern(77, 16 * 4096);
    buf.write_bytes(0, &data).unwrap();
    r.model.set_fault(Fault::Stall);
    let mut counts: HashMap<u32, Vec<Result<(), IoError>>> = HashMap::new();
    // Tags 0..4 stall and time out.
    for t in 0..4u32 {
        qp.submit(BlockOp::Flush { ns: 1 }, t).unwrap();
    }
    qp.flush_submissions();
    r.clock.advance_ms(150);
    qp.poll(64, &mut |t, res| counts.entry(t).or_default().push(res));
    assert!(
        counts.is_empty(),
        "timed-out tags complete only at the reset"
    );
    assert_eq!(core::iter::from_fn(|| qp.pop_timed_out()).count(), 4);
    // Tags 10..26 are in flight (stalled) when the reset happens.
    for t in 0..16u32 {
        let b = BufRef::new(&buf, t as usize * 4096, 4096).unwrap();
        qp.submit(
            BlockOp::Write {
                ns: 1,
                lba: t as u64 * 8,
                blocks: 8,
                buf: b,
            },
            10 + t,
        )
        .unwrap();
    }
    qp.flush_submissions();
    qp2.submit(BlockOp::Flush { ns: 1 }, 100).unwrap();
    qp2.flush_submissions();
    assert_eq!(
        r.ctrl.reset(&mut [&mut qp]).err(),
        Some(NvmeError::MissingQueuePair(2))
    );
    r.model.set_fault(Fault::None);
    r.ctrl.reset(&mut [&mut qp, &mut qp2]).expect("reset");
    assert!(!qp.needs_reset());
    assert_eq!(qp.stats().resubmitted_after_reset, 16);
    for res in drain(&mut qp) {
        counts.entry(res.0).or_default().push(res.1);
    }
    assert_eq!(drain(&mut qp2), vec![(100, Ok(()))]);
    assert_eq!(counts.len(), 4 + 16);
    for (t, v) in &counts {
        assert_eq!(v.len(), 1, "tag {t} reported {} times", v.len());
        if *t < 4 {
            assert_eq!(v[0], Err(IoError::Timeout));
        } else {
            assert_eq!(v[0], Ok(()));
        }
    }
    assert_eq!(r.model.disk_read(1, 0, 16 * 4096), data);
    assert_eq!(qp.busy_slots(), 0);
    assert_eq!(r.ctrl.stats().resets, 1);
}

#[test]
fn fatal_status_then_reset_recovers() {
    let cfg = Config {
        io_timeout_ms: 50,
        max_retries: 0,
        ..Config::default()
    };
    let mut r = rig(ModelConfig::default(), cfg);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    r.model.set_fault(Fault::FatalStatus);
    qp.submit(BlockOp::Flush { ns: 1 }, 1).unwrap();
    qp.submit(BlockOp::Flush { ns: 1 }, 2).unwrap();
    qp.flush_submissions();
    assert!(r.ctrl.is_fatal());
    r.clock.advance_ms(60);
    qp.submit(BlockOp::Flush { ns: 1 }, 3).unwrap(); // not timed out yet at reset time
    let mut got = Vec::new();
    qp.poll(8, &mut |t, res| got.push((t, res)));
    assert!(got.is_empty(), "timed out, still the device's: {got:?}");
    let mut events: Vec<u32> = core::iter::from_fn(|| qp.pop_timed_out())
        .map(|e| e.tag)
        .collect();
    events.sort();
    assert_eq!(events, vec![1, 2]);
    assert!(qp.is_failed() && qp.needs_reset());
    assert_eq!(
        qp.submit(BlockOp::Flush { ns: 1 }, 4),
        Err(SubmitError::DeviceUnavailable)
    );
    r.model.set_fault(Fault::None);
    r.ctrl.reset(&mut [&mut qp]).unwrap();
    assert!(!r.ctrl.is_fatal() && !qp.is_failed());
    // Tags 1 and 2 had timed out: the reset quiesced them, so they complete now, with Timeout.
    // Tag 3 was in flight with no retries left: failed with DeviceReset. Each exactly once.
    let mut got = drain(&mut qp);
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        vec![
            (1, Err(IoError::Timeout)),
            (2, Err(IoError::Timeout)),
            (3, Err(IoError::DeviceReset))
        ]
    );
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
}

#[test]
fn shadow_doorbells_follow_event_idx() {
    let cfg = Config {
        shadow_doorbells: true,
        ..Config::default()
    };
    let mut r = rig(ModelConfig::default(), cfg);
    assert!(r.ctrl.identify().shadow_doorbells);
    assert!(r.model.shadow_enabled());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    assert!(qp.uses_shadow_doorbells());
    // Event-driven controller: EventIdx follows the tail, so every update needs the MMIO write.
    write_read_verify(&mut r, &mut qp, 1, 3, 2, 0);
    assert_eq!(qp.stats().shadow_suppressed, 0);
    assert_eq!(r.model.sq_doorbell_writes(1), 2);

    // Polling controller: EventIdx stays behind; after the first write no MMIO doorbells.
    let mcfg = ModelConfig {
        shadow_polling: true,
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, cfg);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
    let mmio_before = r.model.sq_doorbell_writes(1);
    for round in 0..3u32 {
        for t in 0..5 {
            qp.submit(BlockOp::Flush { ns: 1 }, round * 10 + t).unwrap();
        }
        qp.flush_submissions();
        r.model.step(); // the controller polls the shadow tail
        assert_eq!(drain(&mut qp).len(), 5);
    }
    assert_eq!(
        r.model.sq_doorbell_writes(1),
        mmio_before,
        "no MMIO SQ doorbell while EventIdx is behind"
    );
    assert!(qp.stats().shadow_suppressed >= 3);
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

#[test]
fn shadow_off_by_config_even_if_offered() {
    let r = default_rig();
    assert!(r.ctrl.identify().doorbell_buffer);
    assert_eq!(r.model.admin_commands(0x7C), 0);
}

#[test]
fn queue_pairs_on_two_threads() {
    let mut r = default_rig();
    let qps: Vec<Qp> = (1..=2)
        .map(|q| r.ctrl.create_io_qpair(&r.dma, q, 16).unwrap())
        .collect();
    let mut handles = Vec::new();
    for (i, mut qp) in qps.into_iter().enumerate() {
        let dma = r.dma.clone();
        handles.push(std::thread::spawn(move || {
            let buf = dma.alloc(4096, 4096).unwrap();
            for k in 0..20u64 {
                let data = pattern((i as u32) << 16 | k as u32, 4096);
                buf.write_bytes(0, &data).unwrap();
                let lba = (i as u64) * 1000 + k * 8;
                run_one(
                    &mut qp,
                    BlockOp::Write {
                        ns: 1,
                        lba,
                        blocks: 8,
                        buf: BufRef::whole(&buf),
                    },
                )
                .unwrap();
            }
            qp.qid()
        }));
    }
    let mut qids: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    qids.sort_unstable();
    assert_eq!(qids, vec![1, 2]);
    for i in 0..2u32 {
        let k = 19u64;
        let lba = i as u64 * 1000 + k * 8;
        assert_eq!(
            r.model.disk_read(1, lba as usize * 512, 4096),
            pattern(i << 16 | k as u32, 4096)
        );
    }
}

#[test]
fn dstrd_and_many_tags_wrap_the_rings() {
    let mcfg = ModelConfig {
        dstrd: 2,
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 3, 4).unwrap();
    let mut total = 0;
    for round in 0..50u32 {
        for t in 0..3 {
            qp.submit(BlockOp::Flush { ns: 1 }, round * 3 + t).unwrap();
        }
        total += drain(&mut qp).len();
    }
    assert_eq!(total, 150);
    assert_eq!(qp.stats().stale_cid, 0);
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

#[test]
fn delete_busy_queue_pair_is_refused() {
    let mut r = default_rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 2, 8).unwrap();
    r.model.set_fault(Fault::Stall);
    qp.submit(BlockOp::Flush { ns: 1 }, 1).unwrap();
    qp.flush_submissions();
    let (err, mut qp) = r.ctrl.delete_io_qpair(&r.dma, qp).unwrap_err();
    assert_eq!(err, NvmeError::QueueBusy);
    r.model.set_fault(Fault::None);
    r.model.step();
    assert_eq!(drain(&mut qp), vec![(1, Ok(()))]);
    r.ctrl.delete_io_qpair(&r.dma, qp).map_err(|e| e.0).unwrap();
    assert_eq!(r.model.admin_commands(0x00), 1);
    assert_eq!(r.model.admin_commands(0x04), 1);
    // The qid can be reused.
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 2, 8).unwrap();
    run_one(&mut qp, BlockOp::Flush { ns: 1 }).unwrap();
}

#[test]
fn shadow_doorbells_survive_reset() {
    let cfg = Config {
        shadow_doorbells: true,
        io_timeout_ms: 100,
        ..Config::default()
    };
    let mut r = rig(ModelConfig::default(), cfg);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 16).unwrap();
    write_read_verify(&mut r, &mut qp, 1, 0, 4, 0);
    r.model.set_fault(Fault::Stall);
    for t in 0..5 {
        qp.submit(BlockOp::Flush { ns: 1 }, t).unwrap();
    }
    qp.flush_submissions();
    r.model.set_fault(Fault::None);
    r.ctrl.reset(&mut [&mut qp]).unwrap();
    assert!(
        r.model.shadow_enabled(),
        "doorbell buffer configured again after reset"
    );
    assert_eq!(r.model.admin_commands(0x7C), 2);
    let mut tags: Vec<u32> = drain(&mut qp)
        .into_iter()
        .map(|(t, res)| {
            res.unwrap();
            t
        })
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![0, 1, 2, 3, 4]);
    write_read_verify(&mut r, &mut qp, 1, 100, 4, 8);
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

#[test]
fn randomized_write_read_against_model() {
    let mcfg = ModelConfig {
        mdts: 2, // 16 KiB per command
        namespaces: vec![ns(1, 4096, 9), ns(2, 512, 12)],
        ..ModelConfig::default()
    };
    let mut r = rig(mcfg, Config::default());
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 64).unwrap();
    let buf = r.dma.alloc(256 * 1024, 4096).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |m: u64| {
        x ^= x << 7;
        x ^= x >> 9;
        x % m
    };
    let mut shadow: HashMap<u32, Vec<u8>> = HashMap::new();
    shadow.insert(1, vec![0; 4096 * 512]);
    shadow.insert(2, vec![0; 512 * 4096]);
    for round in 0..150u32 {
        let nsid = 1 + next(2) as u32;
        let bs = if nsid == 1 { 512 } else { 4096 };
        let nblocks = if nsid == 1 { 4096 } else { 512 };
        let max_blocks = (64 * 1024 / bs) as u64;
        let blocks = 1 + next(max_blocks) as u32;
        let lba = next(nblocks - blocks as u64 + 1);
        let off = (next(4096) & !3) as usize;
        let len = blocks as usize * bs;
        let b = BufRef::new(&buf, off, len).unwrap();
        if next(2) == 0 {
            let data = pattern(round, len);
            buf.write_bytes(off, &data).unwrap();
            run_one(
                &mut qp,
                BlockOp::Write {
                    ns: nsid,
                    lba,
                    blocks,
                    buf: b,
                },
            )
            .unwrap();
            let s = shadow.get_mut(&nsid).unwrap();
            s[lba as usize * bs..lba as usize * bs + len].copy_from_slice(&data);
        } else {
            run_one(
                &mut qp,
                BlockOp::Read {
                    ns: nsid,
                    lba,
                    blocks,
                    buf: b,
                },
            )
            .unwrap();
            let s = &shadow[&nsid];
            assert_eq!(
                read_region(&buf, off, len),
                s[lba as usize * bs..lba as usize * bs + len],
                "round {round}"
            );
        }
    }
    for nsid in [1u32, 2] {
        let s = &shadow[&nsid];
        assert_eq!(&r.model.disk_read(nsid, 0, s.len()), s);
    }
    assert_eq!(qp.stats().stale_cid + qp.stats().bad_cid, 0);
    assert!(r.model.log().is_empty(), "{:?}", r.model.log());
}

/// Issue 16: a read that times out keeps its buffer until the device is done with it. The
/// owner reuses the buffer as soon as its tag completes (the completion is what hands it
/// back); the model then finishes the read late and DMAs into the buffer. Because the tag
/// completes only after that, the owner's data is untouched.
#[test]
fn a_timed_out_read_keeps_its_buffer_until_the_device_is_done() {
    let (r, mut qp) = timeout_rig(10, 16);
    let on_disk = pattern(5, 4096);
    r.model.disk_write(1, 0, &on_disk);
    let buf = r.dma.alloc(4096, 4096).unwrap();
    r.model.hold_next_io(1);
    let read = BlockOp::Read {
        ns: 1,
        lba: 0,
        blocks: 8,
        buf: BufRef::whole(&buf),
    };
    qp.submit(read, 7).unwrap();
    qp.flush_submissions();
    assert_eq!(r.model.held(), 1, "the device took the read and sits on it");
    // The owner: when its tag completes, it looks at what was read and reuses the buffer.
    let mine = pattern(6, 4096);
    let mut results = Vec::new();
    let mut events = Vec::new();
    let mut read_back = None;
    let mut owner_pass = |qp: &mut Qp, results: &mut Vec<_>, events: &mut Vec<_>| {
        qp.poll(8, &mut |t, res| results.push((t, res)));
        events.extend(core::iter::from_fn(|| qp.pop_timed_out()));
        if !results.is_empty() && read_back.is_none() {
            let mut got = vec![0u8; 4096];
            buf.read_bytes(0, &mut got).unwrap();
            read_back = Some(got);
            buf.write_bytes(0, &mine).unwrap();
        }
    };
    for _ in 0..50 {
        owner_pass(&mut qp, &mut results, &mut events);
        r.clock.advance_ms(1);
    }
    let announced = events.clone();
    // The device finishes the read late: its DMA lands in the buffer now.
    assert_eq!(r.model.release_held(), 1);
    for _ in 0..4 {
        owner_pass(&mut qp, &mut results, &mut events);
    }
    let mut now = vec![0u8; 4096];
    buf.read_bytes(0, &mut now).unwrap();
    assert!(now == mine, "the late DMA scribbled over the owner's data");
    assert_eq!(announced, vec![TimedOut { tag: 7 }], "announced promptly");
    assert_eq!(
        results,
        vec![(7, Ok(()))],
        "one completion, with the device's status"
    );
    assert_eq!(
        read_back.as_deref(),
        Some(&on_disk[..]),
        "and the data read"
    );
    assert_eq!((qp.stats().late_completions, qp.busy_slots()), (1, 0));
}
