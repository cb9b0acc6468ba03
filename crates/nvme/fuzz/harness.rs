//! Fuzz harness shared by the libFuzzer target (`fuzz_targets/device_responses.rs`) and the
//! seeded run in `crates/nvme/tests/hostile.rs`: the input bytes decide what the device
//! answers (Identify contents, MDTS, faults, injected completions with arbitrary CID / SQID /
//! SQ head / status, timing, resets) while the driver does I/O. Invariants checked (a panic is a
//! finding): no panic or out-of-bounds access in the driver, every loop bounded, each tag
//! reported at most once, and after a final reset and drain each tag exactly once.

use std::collections::HashMap;

use keel_blockdev::{BlockOp, BlockQueue, BufRef};
use keel_hal::DmaAllocator;
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, NvmeModel};
use keel_nvme::{Config, Controller};

struct Bytes<'a> {
    d: &'a [u8],
    i: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn done(&self) -> bool {
        self.i >= self.d.len()
    }
}

fn fault(b: &mut Bytes) -> Fault {
    match b.u8() % 10 {
        0 => Fault::None,
        1 => Fault::Stall,
        2 => Fault::DuplicateCompletion,
        3 => Fault::WrongPhase,
        4 => Fault::FatalStatus,
        5 => Fault::TransientError(b.u8() as u32 % 8),
        6 => Fault::PermanentError,
        7 => Fault::Status(b.u16()),
        8 => Fault::CorruptCid(b.u16()),
        _ => Fault::None,
    }
}

pub fn run(data: &[u8]) {
    let dma = HostDma::new();
    run_with(data, &dma);
    // SAFETY: `run_with` has returned, so the controller, queue pair and model that used this
    // allocator's regions are gone.
    unsafe { dma.free_all() };
}

fn run_with(data: &[u8], dma: &HostDma) {
    let mut b = Bytes { d: data, i: 0 };
    let mcfg = ModelConfig {
        mdts: b.u8() % 8,
        ..ModelConfig::default()
    };
    let model = NvmeModel::new(mcfg, dma.clone());
    for _ in 0..b.u8() % 4 {
        let cns = b.u8() % 3;
        let off = b.u16() as usize % 4096;
        let bytes: Vec<u8> = (0..b.u8() % 9).map(|_| b.u8()).collect();
        model.patch_identify(cns, off, &bytes);
    }
    let clock = ModelClock::new();
    let cfg = Config {
        io_timeout_ms: 50,
        max_retries: b.u8() % 3,
        ..Config::default()
    };
    let Ok(mut ctrl) = Controller::init(model.mmio(), dma, clock.clone(), cfg) else {
        return; // a typed error is a fine outcome
    };
    let depth = 2 + (b.u8() % 63) as u16;
    let Ok(mut qp) = ctrl.create_io_qpair(dma, 1, depth) else {
        return;
    };
    let Some(ns) = ctrl.namespaces().first().copied() else {
        return;
    };
    let Ok(buf) = dma.alloc(64 * 1024, 4096) else {
        return;
    };
    let mut reported: HashMap<u32, u32> = HashMap::new();
    let mut submitted: Vec<u32> = Vec::new();
    let mut next_tag = 0u32;
    let on_done = |reported: &mut HashMap<u32, u32>, t: u32| {
        let n = reported.entry(t).or_default();
        *n += 1;
        assert!(*n == 1, "tag {t} reported twice");
    };
    for _ in 0..512 {
        if b.done() {
            break;
        }
        match b.u8() % 11 {
            0 => {
                if qp.submit(BlockOp::Flush { ns: ns.nsid }, next_tag).is_ok() {
                    submitted.push(next_tag);
                }
                next_tag += 1;
            }
            1 | 2 => {
                let blocks = 1 + (b.u8() % 16) as u32;
                let lba = b.u16() as u64;
                let len = (blocks as usize * ns.block_size as usize).min(buf.len());
                let Ok(r) = BufRef::new(&buf, 0, len) else {
                    continue;
                };
                let blocks = (len / ns.block_size as usize) as u32;
                let op = if b.u8() & 1 == 0 {
                    BlockOp::Read {
                        ns: ns.nsid,
                        lba,
                        blocks,
                        buf: r,
                    }
                } else {
                    BlockOp::Write {
                        ns: ns.nsid,
                        lba,
                        blocks,
                        buf: r,
                    }
                };
                if qp.submit(op, next_tag).is_ok() {
                    submitted.push(next_tag);
                }
                next_tag += 1;
            }
            3 => qp.flush_submissions(),
            4 => {
                qp.poll(64, &mut |t, _| on_done(&mut reported, t));
            }
            5 => {
                let sqid = (b.u8() % 3) as u16;
                let (head, cid, st) = (b.u16(), b.u16(), b.u16());
                model.inject_completion(1, sqid, head, cid, st);
            }
            6 => model.set_fault(fault(&mut b)),
            7 => clock.advance_ms(b.u8() as u64),
            8 => model.step(),
            9 => {
                let _ = ctrl.reset(&mut [&mut qp]);
            }
            _ => {
                if let Some(cid) = qp.pop_abort_candidate() {
                    let _ = ctrl.abort(1, cid);
                }
            }
        }
    }
    // Wind down: a well-behaved device and a reset; afterwards every tag must come back once.
    model.set_fault(Fault::None);
    model.clear_identify_patches();
    let reset_ok = ctrl.reset(&mut [&mut qp]).is_ok();
    for _ in 0..10_000 {
        if qp.in_flight() == 0 {
            break;
        }
        qp.poll(64, &mut |t, _| on_done(&mut reported, t));
        clock.advance_ms(5);
    }
    assert_eq!(qp.in_flight(), 0, "drain hung (reset ok: {reset_ok})");
    for t in &submitted {
        assert_eq!(reported.get(t), Some(&1), "tag {t} lost");
    }
    assert_eq!(reported.len(), submitted.len(), "unknown tag reported");
    dma.free(buf);
}
