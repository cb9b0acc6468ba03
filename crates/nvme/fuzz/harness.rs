//! Fuzz harness shared by the libFuzzer target (`fuzz_targets/device_responses.rs`) and the
//! seeded, corpus and regression runs in `crates/nvme/tests/hostile.rs`: the input bytes decide
//! what the device answers (a fault at bring-up, Identify contents, MDTS, faults of every kind,
//! injected completions with arbitrary CID / SQID / SQ head / status, timing, resets) while the
//! driver does I/O.
//!
//! Invariants checked (a panic is a finding):
//! - bring-up: a controller that never becomes ready or fails on enable is refused, a failed
//!   bring-up leaks no DMA memory, and no namespace with an absurd block size is accepted;
//! - no panic or out-of-bounds access in the driver, every loop bounded, each tag reported at
//!   most once, and after a final reset and drain each tag exactly once;
//! - data: every command has its own DMA buffer with its own pattern (writes) or poison
//!   (reads), so data from the wrong buffer is detectable. The harness keeps a reference of
//!   the disk (what each acknowledged write put there, as the model holds it). A read reported
//!   Ok must hold the model's bytes for its range, and the reference's where it knows them;
//!   at the end the model's disk must equal the reference wherever it is known; a read
//!   buffer reported Ok must not change afterwards (no DMA after the tag was reported).
//!
//! What the reference cannot judge is left out, never guessed: a command whose lifetime
//! overlapped a device that lied (an injected completion, duplicate completions, a corrupted
//! CID, a forced success status: the driver cannot tell those from the truth), a read
//! overlapping a write in flight, and blocks a failed write may still land on (unknown for
//! the rest of the input).

use std::collections::HashMap;

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError};
use keel_hal::{DmaAllocator, DmaRegion};
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

/// Every kind of [`Fault`].
fn fault(b: &mut Bytes) -> Fault {
    match b.u8() % 14 {
        0 => Fault::None,
        1 => Fault::Stall,
        2 => Fault::DuplicateCompletion,
        3 => Fault::WrongPhase,
        4 => Fault::FatalStatus,
        5 => Fault::TransientError(b.u8() as u32 % 8),
        6 => Fault::PermanentError,
        7 => Fault::Status(b.u16()),
        8 => Fault::CorruptCid(b.u16()),
        9 => Fault::WriteFault,
        10 => Fault::NeverReady,
        11 => Fault::FatalOnEnable,
        12 => Fault::AbsurdIdentify,
        _ => Fault::None,
    }
}

/// Whether the device, under this fault, may report something that did not happen (the driver
/// cannot tell): no data check spans such a time.
fn lies(f: Fault) -> bool {
    match f {
        Fault::DuplicateCompletion => true,
        Fault::CorruptCid(m) => m != 0,
        // SC and SCT both 0: success reported for a command the model did not execute.
        Fault::Status(s) => (s >> 1) & 0xFF == 0 && (s >> 9) & 7 == 0,
        _ => false,
    }
}

/// A buffer's contents: distinct for every tag, every 8-byte word and every direction (writes
/// carry the pattern to the disk, reads start with it as poison).
fn pattern(tag: u32, write: bool, len: usize) -> Vec<u8> {
    let seed = ((tag as u64) << 1 | write as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len.div_ceil(8))
        .flat_map(|w| {
            (seed ^ w as u64)
                .wrapping_mul(0xD6E8_FEB8_6659_FD93)
                .to_le_bytes()
        })
        .take(len)
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
    Flush,
}

struct Cmd {
    kind: Kind,
    lba: u64,
    blocks: u64,
    buf: Option<DmaRegion>,
    /// The lie counter when it was submitted.
    lies_at_submit: u64,
    /// An overlapping command of the other direction (or another write) was in flight at
    /// some point of its lifetime.
    overlapped: bool,
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
    let disk = mcfg.namespaces[0];
    let model = NvmeModel::new(mcfg, dma.clone());
    // Bring-up: a fault active from the start (every kind, NeverReady, FatalOnEnable and
    // AbsurdIdentify among them), then Identify patches.
    let boot_fault = if b.u8() % 4 == 0 {
        fault(&mut b)
    } else {
        Fault::None
    };
    model.set_fault(boot_fault);
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
    let mut ctrl = match Controller::init(model.mmio(), dma, clock.clone(), cfg) {
        Ok(c) => c,
        Err(e) => {
            // A typed error is a fine outcome; it must not leak the admin queues.
            assert_eq!(
                dma.live_allocations(),
                0,
                "failed bring-up ({e:?}) leaked DMA"
            );
            return;
        }
    };
    assert!(
        !matches!(boot_fault, Fault::NeverReady | Fault::FatalOnEnable),
        "bring-up succeeded on a controller that never became ready ({boot_fault:?})"
    );
    for ns in ctrl.namespaces() {
        assert!(
            ns.block_size >= 512 && ns.block_size.is_power_of_two(),
            "namespace {} accepted with block size {}",
            ns.nsid,
            ns.block_size
        );
    }
    let depth = 2 + (b.u8() % 63) as u16;
    let Ok(mut qp) = ctrl.create_io_qpair(dma, 1, depth) else {
        return;
    };
    let Some(ns) = ctrl.namespaces().first().copied() else {
        return;
    };
    let bs = ns.block_size as usize;
    // The model's own view of the namespace: the reference is kept only where they agree.
    if ns.nsid != disk.nsid || ns.blocks != disk.blocks || bs != 1 << disk.lba_shift {
        return; // a patched Identify lied about the shape; nothing to compare against
    }

    let mut fault_now = boot_fault;
    let mut lie_count: u64 = 0;
    // The reference: what each known block holds, by LBA. Absent = never written (zeroes).
    let mut known: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut unknown: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut cmds: HashMap<u32, Cmd> = HashMap::new();
    let mut reported: HashMap<u32, u32> = HashMap::new();
    // Read buffers reported Ok, with their contents then: checked again at the end.
    let mut settled: Vec<(u32, DmaRegion, Vec<u8>)> = Vec::new();
    let mut submitted: Vec<u32> = Vec::new();
    let mut next_tag = 0u32;

    macro_rules! on_done {
        ($t:expr, $r:expr) => {{
            let (t, r): (u32, Result<(), IoError>) = ($t, $r);
            let n = reported.entry(t).or_default();
            *n += 1;
            assert!(*n == 1, "tag {t} reported twice");
            let c = cmds
                .remove(&t)
                .unwrap_or_else(|| panic!("unknown tag {t} reported"));
            let honest = c.lies_at_submit == lie_count && !lies(fault_now);
            match (c.kind, &r) {
                (Kind::Write, Ok(())) if honest && !c.overlapped => {
                    let buf = c.buf.as_ref().unwrap();
                    let mut d = vec![0u8; bs];
                    for i in 0..c.blocks {
                        let lba = c.lba + i;
                        buf.read_bytes(i as usize * bs, &mut d).unwrap();
                        if !unknown.contains(&lba) {
                            known.insert(lba, d.clone());
                        }
                    }
                }
                (Kind::Write, _) => {
                    // Failed, overlapped or unjudgeable: the blocks may hold anything now, and
                    // a failed write may still land later.
                    for i in 0..c.blocks {
                        known.remove(&(c.lba + i));
                        unknown.insert(c.lba + i);
                    }
                }
                (Kind::Read, Ok(())) if honest && !c.overlapped => {
                    let buf = c.buf.unwrap();
                    let len = c.blocks as usize * bs;
                    let mut got = vec![0u8; len];
                    buf.read_bytes(0, &mut got).unwrap();
                    let dev = model.disk_read(ns.nsid, c.lba as usize * bs, len);
                    // Blocks a failed write may still land on are left out.
                    for i in 0..c.blocks {
                        let lba = c.lba + i;
                        if unknown.contains(&lba) {
                            continue;
                        }
                        let got = &got[i as usize * bs..][..bs];
                        assert!(
                            got == &dev[i as usize * bs..][..bs],
                            "tag {t}: read of lba {}+{} reported Ok but lba {lba} in its buffer \
                             is not what the device holds",
                            c.lba,
                            c.blocks
                        );
                        let ok = match known.get(&lba) {
                            Some(w) => got == &w[..],
                            None => got.iter().all(|&x| x == 0),
                        };
                        assert!(
                            ok,
                            "tag {t}: lba {lba} read back differs from the last acknowledged write"
                        );
                    }
                    settled.push((t, buf, got));
                }
                _ => {}
            }
        }};
    }

    // Marks in-flight commands that conflict with a new one (and the new one).
    let overlap = |cmds: &mut HashMap<u32, Cmd>, kind: Kind, lba: u64, blocks: u64| -> bool {
        let mut any = false;
        for c in cmds.values_mut() {
            let conflict = (kind == Kind::Write || c.kind == Kind::Write)
                && c.kind != Kind::Flush
                && lba < c.lba + c.blocks
                && c.lba < lba + blocks;
            if conflict {
                c.overlapped = true;
                any = true;
            }
        }
        any
    };

    for _ in 0..512 {
        if b.done() {
            break;
        }
        if lies(fault_now) {
            lie_count += 1;
        }
        match b.u8() % 11 {
            0 => {
                if qp.submit(BlockOp::Flush { ns: ns.nsid }, next_tag).is_ok() {
                    submitted.push(next_tag);
                    cmds.insert(
                        next_tag,
                        Cmd {
                            kind: Kind::Flush,
                            lba: 0,
                            blocks: 0,
                            buf: None,
                            lies_at_submit: lie_count,
                            overlapped: false,
                        },
                    );
                }
                next_tag += 1;
            }
            1 | 2 => {
                // Up to 32 KiB: larger than small MDTS values, so transfers are split.
                let blocks = 1 + (b.u8() % 64) as u64;
                // Mostly in range, sometimes past the end.
                let lba = b.u16() as u64 % (ns.blocks + 8);
                let write = b.u8() & 1 == 1;
                let tag = next_tag;
                next_tag += 1;
                let len = blocks as usize * bs;
                let Ok(buf) = dma.alloc(len, 4096) else {
                    continue;
                };
                buf.write_bytes(0, &pattern(tag, write, len)).unwrap();
                let r = BufRef::whole(&buf);
                let op = if write {
                    BlockOp::Write {
                        ns: ns.nsid,
                        lba,
                        blocks: blocks as u32,
                        buf: r,
                    }
                } else {
                    BlockOp::Read {
                        ns: ns.nsid,
                        lba,
                        blocks: blocks as u32,
                        buf: r,
                    }
                };
                if qp.submit(op, tag).is_ok() {
                    assert!(lba + blocks <= ns.blocks, "out-of-range I/O accepted");
                    let kind = if write { Kind::Write } else { Kind::Read };
                    let overlapped = overlap(&mut cmds, kind, lba, blocks);
                    submitted.push(tag);
                    cmds.insert(
                        tag,
                        Cmd {
                            kind,
                            lba,
                            blocks,
                            buf: Some(buf),
                            lies_at_submit: lie_count,
                            overlapped,
                        },
                    );
                } else {
                    dma.free(buf);
                }
            }
            3 => qp.flush_submissions(),
            4 => {
                let mut done = Vec::new();
                qp.poll(64, &mut |t, r| done.push((t, r)));
                for (t, r) in done {
                    on_done!(t, r);
                }
            }
            5 => {
                let sqid = (b.u8() % 3) as u16;
                let (head, cid, st) = (b.u16(), b.u16(), b.u16());
                lie_count += 1;
                model.inject_completion(1, sqid, head, cid, st);
            }
            6 => {
                fault_now = fault(&mut b);
                if lies(fault_now) {
                    lie_count += 1;
                }
                model.set_fault(fault_now);
            }
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
    fault_now = Fault::None;
    model.set_fault(Fault::None);
    model.clear_identify_patches();
    let reset_ok = ctrl.reset(&mut [&mut qp]).is_ok();
    for _ in 0..10_000 {
        if qp.in_flight() == 0 {
            break;
        }
        let mut done = Vec::new();
        qp.poll(64, &mut |t, r| done.push((t, r)));
        for (t, r) in done {
            on_done!(t, r);
        }
        clock.advance_ms(5);
    }
    let _ = fault_now;
    assert_eq!(qp.in_flight(), 0, "drain hung (reset ok: {reset_ok})");
    for t in &submitted {
        assert_eq!(reported.get(t), Some(&1), "tag {t} lost");
    }
    assert_eq!(reported.len(), submitted.len(), "unknown tag reported");
    // The disk against the reference, wherever it is known.
    for (lba, want) in &known {
        let got = model.disk_read(ns.nsid, *lba as usize * bs, bs);
        assert!(
            &got == want,
            "lba {lba}: the disk does not hold the last acknowledged write"
        );
    }
    // No DMA into a read buffer after its tag was reported Ok.
    for (t, buf, then) in &settled {
        let mut now = vec![0u8; then.len()];
        buf.read_bytes(0, &mut now).unwrap();
        assert!(
            &now == then,
            "tag {t}: its read buffer changed after the tag was reported"
        );
    }
}
