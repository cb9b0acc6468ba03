//! `cost`: what the primitives an I/O is made of cost on this machine and accelerator, in
//! nanoseconds each. Under TCG the answer differs a lot from silicon: an MMIO access takes
//! QEMU's global lock, `rdtsc` is a host clock call, and every indirect branch is a lookup of
//! the next translated block. The bench's per-I/O numbers are read against this table.

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use keel_cmdline::Cmdline;
use keel_hal::{DmaAllocator, Mmio};

use crate::cpu::rdtsc;
use crate::hw::MmioWindow;
use crate::jobs::{JobError, Platform};

/// Runs `f` `n` times and returns nanoseconds per call (loop overhead included).
fn per_call(n: u64, mut f: impl FnMut(u64)) -> u64 {
    let hz = crate::time::tsc_hz();
    let t0 = rdtsc();
    for i in 0..n {
        f(i);
    }
    (rdtsc() - t0) * 1_000_000_000 / hz / n.max(1)
}

#[inline(never)]
fn direct(x: u64) -> u64 {
    x.wrapping_mul(3)
}

pub fn cost<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let n = cl.u64("iters", 200_000)?.max(1);
    let with_nvme = cl.bool("nvme", true)?;
    let ctrl = if with_nvme {
        Some(crate::nvme_jobs::open(p, cl)?)
    } else {
        None
    };
    cl.finish()?;
    keel_log::info!("job cost: start");
    let mut rows: heapless::Vec<(&'static str, u64), 24> = heapless::Vec::new();
    let mut row = |name, ns| {
        let _ = rows.push((name, ns));
        keel_log::info!("cost | {=str} | {=u64} ns", name, ns);
    };
    row(
        "empty loop iteration",
        per_call(n, |i| {
            black_box(i);
        }),
    );
    row(
        "rdtsc",
        per_call(n, |_| {
            black_box(rdtsc());
        }),
    );
    row(
        "direct call (not inlined)",
        per_call(n, |i| {
            black_box(direct(black_box(i)));
        }),
    );
    let f: &dyn Fn(u64) -> u64 = &|x| x.wrapping_add(1);
    let f = black_box(f);
    row(
        "indirect call (dyn Fn)",
        per_call(n, |i| {
            black_box(f(i));
        }),
    );
    let a = AtomicU64::new(0);
    row(
        "atomic compare-exchange",
        per_call(n, |i| {
            let _ = black_box(&a).compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Relaxed);
        }),
    );
    row(
        "critical section (empty)",
        per_call(n, |_| {
            critical_section::with(|cs| {
                black_box(cs);
            });
        }),
    );
    row(
        "u64 division",
        per_call(n, |i| {
            black_box(black_box(i * 1_000_000_007) / black_box(2_400_000_011u64));
        }),
    );
    {
        use keel_aio::{Aio, IoDesc, IoOp};
        static AIO: Aio<512, { keel_slots::words_for(512) }> = Aio::new();
        let desc = IoDesc {
            op: IoOp::Read,
            lba: 0,
            blocks: 8,
        };
        let (mut t_start, mut t_rest) = (0u64, 0u64);
        for _ in 0..n.min(50_000) {
            let t0 = rdtsc();
            let io = AIO.start(desc);
            let t1 = rdtsc();
            if let Ok(io) = io {
                let _ = AIO.submit(io);
                let _ = AIO.complete_and_share(io, Ok(0));
                let _ = AIO.complete_local_and_reclaim(io);
            }
            t_start += t1 - t0;
            t_rest += rdtsc() - t1;
        }
        let m = n.min(50_000);
        row(
            "aio batch, empty",
            per_call(m, |_| {
                AIO.batch(|b| {
                    black_box(b);
                })
            }),
        );
        static BITS: keel_slots::FreeBitmap<{ keel_slots::words_for(512) }> =
            keel_slots::FreeBitmap::new_saturating(512);
        row(
            "free bitmap acquire + release",
            per_call(m, |_| {
                if let Some(i) = BITS.acquire() {
                    let _ = BITS.release(i);
                }
            }),
        );
        row(
            "aio start (acquire+define+stage)",
            crate::time::ticks_to_ns(t_start) / m,
        );
        row(
            "aio submit, complete, reclaim",
            crate::time::ticks_to_ns(t_rest) / m,
        );
    }
    let dma = p
        .dma
        .alloc(4096, 4096)
        .map_err(|_| JobError::Failed("DMA pool exhausted"))?;
    let sqe = [0x5Au8; 64];
    row(
        "DmaRegion 64-byte volatile write",
        per_call(n, |i| {
            let _ = dma.write_bytes((i as usize % 64) * 64, black_box(&sqe));
        }),
    );
    let mut plain = [[0u8; 64]; 64];
    row(
        "plain 64-byte copy",
        per_call(n, |i| {
            plain[i as usize % 64] = black_box(sqe);
            black_box(&plain);
        }),
    );
    p.dma.free(dma);
    if let Some(dev) = p.devices.iter().find(|d| d.is_nvme()) {
        let bar = dev.bars[0];
        if bar.base != 0 && bar.size != 0 {
            // SAFETY: BAR0 of an NVMe function, assigned and mapped uncached by `pci::enumerate`.
            let mmio = unsafe { MmioWindow::new(bar.base, bar.size) };
            let m = n.min(20_000);
            // CSTS: a read with no side effects.
            row(
                "MMIO read (NVMe CSTS)",
                per_call(m, |_| {
                    black_box(mmio.read32(0x1C));
                }),
            );
            // INTMS with 0 masks nothing: a register write with no effect, like a doorbell's
            // path through QEMU without the queue work.
            row(
                "MMIO write (NVMe INTMS = 0)",
                per_call(m, |_| {
                    mmio.write32(0x0C, 0);
                }),
            );
        }
    }
    if let Some(ctrl) = ctrl {
        nvme_rows(ctrl, p, &mut row)?;
    }
    crate::println!(
        "cost of one primitive under this accelerator ({} iterations):",
        n
    );
    for (name, ns) in &rows {
        crate::println!("  {:34} {:>6} ns", name, ns);
    }
    Ok(())
}

/// Driver costs with the device idle: a burst of submissions queued without a doorbell, then
/// one doorbell, then the completions reaped; per I/O, over several rounds.
fn nvme_rows<'a>(
    mut ctrl: crate::nvme_jobs::Ctrl,
    p: &Platform,
    row: &mut impl FnMut(&'static str, u64),
) -> Result<(), JobError<'a>> {
    use keel_blockdev::{BlockOp, BlockQueue, BufRef};
    let mut qp = crate::nvme_jobs::qpair(&mut ctrl, p, 1)?;
    let buf = crate::storage::dma(&p.dma, 4096).map_err(|_| JobError::Failed("DMA pool"))?;
    let ns = ctrl
        .namespaces()
        .first()
        .copied()
        .ok_or(JobError::Failed("no namespace"))?;
    let blocks = (4096 / ns.block_size).max(1);
    let burst = 32u64;
    let (mut t_sub, mut t_db, mut t_reap, mut ios) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..200u64 {
        let t0 = rdtsc();
        for i in 0..burst {
            let op = BlockOp::Read {
                ns: ns.nsid,
                lba: ((round * burst + i) * blocks as u64) % (ns.blocks - blocks as u64),
                blocks,
                buf: BufRef::whole(&buf),
            };
            if qp.submit(op, i as u32).is_err() {
                return Err(JobError::Failed("cost: submit refused"));
            }
        }
        let t1 = rdtsc();
        qp.flush_submissions();
        let t2 = rdtsc();
        // Wait for the device without counting it, then time the reaping alone.
        while qp.in_flight() > 0 {
            let t3 = rdtsc();
            let n = qp.poll(usize::MAX, &mut |_, _| {});
            if n > 0 {
                t_reap += rdtsc() - t3;
            }
        }
        t_sub += t1 - t0;
        t_db += t2 - t1;
        ios += burst;
    }
    let ns_per = |t: u64| crate::time::ticks_to_ns(t) / ios.max(1);
    row("nvme submit (queued, per I/O)", ns_per(t_sub));
    row("nvme SQ doorbell, device idle", ns_per(t_db) * burst);
    row("nvme reap (per completion)", ns_per(t_reap));
    Ok(())
}
