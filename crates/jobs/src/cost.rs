//! `cost`: what the primitives an I/O is made of cost on this machine and accelerator, in
//! nanoseconds each. Under TCG the answer differs a lot from silicon: an MMIO access takes
//! QEMU's global lock, `rdtsc` is a host clock call, and every indirect branch is a lookup of
//! the next translated block. The bench's per-I/O numbers are read against this table.

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, Cores, DmaAllocator, Mmio};

use crate::{JobError, JobResult, MAX_CORES};

/// `cost`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int("iters", 200_000, "iterations per row"),
    OptSpec::flag(
        "nvme",
        true,
        "include the driver's rows (needs a controller)",
    ),
];

/// Runs `f` `n` times and returns nanoseconds per call (loop overhead included).
fn per_call<C: Clock>(clock: &C, n: u64, mut f: impl FnMut(u64)) -> u64 {
    let t0 = clock.ticks();
    for i in 0..n {
        f(i);
    }
    clock.ticks_to_ns(clock.ticks() - t0) / n.max(1)
}

#[inline(never)]
fn direct(x: u64) -> u64 {
    x.wrapping_mul(3)
}

/// `cost`: the table of primitive costs.
pub fn cost<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let n = cl.int("iters")?.max(1);
    let with_nvme = cl.flag("nvme")?;
    let ctrl = if with_nvme {
        Some(crate::nvme::open(p, cl)?)
    } else {
        None
    };
    let clk = p.clock();
    let clock = &clk;
    let rdtsc = || clock.ticks();
    keel_log::info!("job cost: start");
    let mut rows: heapless::Vec<(&'static str, u64), 48> = heapless::Vec::new();
    let mut row = |name, ns| {
        let _ = rows.push((name, ns));
        keel_log::info!("cost | {=str} | {=u64} ns", name, ns);
    };
    row(
        "empty loop iteration",
        per_call(clock, n, |i| {
            black_box(i);
        }),
    );
    row(
        "rdtsc",
        per_call(clock, n, |_| {
            black_box(rdtsc());
        }),
    );
    row(
        "direct call (not inlined)",
        per_call(clock, n, |i| {
            black_box(direct(black_box(i)));
        }),
    );
    let f: &dyn Fn(u64) -> u64 = &|x| x.wrapping_add(1);
    let f = black_box(f);
    row(
        "indirect call (dyn Fn)",
        per_call(clock, n, |i| {
            black_box(f(i));
        }),
    );
    let a = AtomicU64::new(0);
    row(
        "atomic compare-exchange",
        per_call(clock, n, |i| {
            let _ = black_box(&a).compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Relaxed);
        }),
    );
    row(
        "critical section (empty)",
        per_call(clock, n, |_| {
            critical_section::with(|cs| {
                black_box(cs);
            });
        }),
    );
    row(
        "pause (spin-loop hint)",
        per_call(clock, n.min(20_000), |_| core::hint::spin_loop()),
    );
    row(
        "critical section, interrupts already masked",
        p.cores().interrupts_masked(|| {
            per_call(clock, n, |_| {
                critical_section::with(|cs| {
                    black_box(cs);
                })
            })
        }),
    );
    row(
        "u64 division",
        per_call(clock, n, |i| {
            black_box(black_box(i * 1_000_000_007) / black_box(2_400_000_011u64));
        }),
    );
    {
        use keel_aio::{Aio, IoDesc, IoOp};
        let aio: Aio<512, { keel_slots::words_for(512) }> = Aio::new();
        let desc = IoDesc {
            op: IoOp::Read,
            lba: 0,
            blocks: 8,
        };
        let (mut t_start, mut t_rest) = (0u64, 0u64);
        for _ in 0..n.min(50_000) {
            let t0 = rdtsc();
            let io = aio.start(desc);
            let t1 = rdtsc();
            if let Ok(io) = io {
                let _ = aio.submit(io);
                let _ = aio.complete_and_share(io, Ok(0));
                let _ = aio.complete_local_and_reclaim(io);
            }
            t_start += t1 - t0;
            t_rest += rdtsc() - t1;
        }
        let m = n.min(50_000);
        row(
            "aio batch, empty",
            per_call(clock, m, |_| {
                aio.batch(|b| {
                    black_box(b);
                })
            }),
        );
        let bits: keel_slots::FreeBitmap<{ keel_slots::words_for(512) }> =
            keel_slots::FreeBitmap::new_saturating(512);
        row(
            "free bitmap acquire + release",
            per_call(clock, m, |_| {
                if let Some(i) = bits.acquire() {
                    let _ = bits.release(i);
                }
            }),
        );
        // The floor for a start: the bitmap claim and a critical section around a few stores.
        let floor =
            critical_section::Mutex::new(core::cell::RefCell::new([(0u8, 0u32, 0u64, 0u64); 512]));
        row(
            "floor: bitmap + section + stores",
            per_call(clock, m, |i| {
                if let Some(k) = bits.acquire() {
                    critical_section::with(|cs| {
                        let mut f = floor.borrow_ref_mut(cs);
                        if let Some(e) = f.get_mut(k) {
                            if e.0 == 0 {
                                *e = (3, e.1.wrapping_add(1), i, i);
                            }
                            e.0 = 0;
                        }
                    });
                    let _ = bits.release(k);
                }
            }),
        );
        row(
            "aio start (acquire+define+stage)",
            clock.ticks_to_ns(t_start) / m,
        );
        row(
            "aio submit, complete, reclaim",
            clock.ticks_to_ns(t_rest) / m,
        );
    }
    layer_rows(p, &mut row).map_err(JobError::Failed)?;
    let dma = p
        .dma()
        .alloc(4096, 4096)
        .map_err(|_| JobError::Failed("DMA pool exhausted"))?;
    let sqe = [0x5Au8; 64];
    row(
        "DmaRegion 64-byte volatile write",
        per_call(clock, n, |i| {
            let _ = dma.write_bytes((i as usize % 64) * 64, black_box(&sqe));
        }),
    );
    let mut plain = [[0u8; 64]; 64];
    row(
        "plain 64-byte copy",
        per_call(clock, n, |i| {
            plain[i as usize % 64] = black_box(sqe);
            black_box(&plain);
        }),
    );
    let mut big_a = [0u8; 1024];
    let big_b = [7u8; 1024];
    row(
        "memcpy 1 KiB",
        per_call(clock, n.min(5_000), |i| {
            let len = black_box(1024 - (i as usize & 1));
            big_a[..len].copy_from_slice(&big_b[..len]);
            black_box(&big_a);
        }),
    );
    row(
        "memset 1 KiB",
        per_call(clock, n.min(5_000), |i| {
            let len = black_box(1024 - (i as usize & 1));
            big_a[..len].fill(i as u8);
            black_box(&big_a);
        }),
    );
    p.dma().free(dma);
    if let Some(dev) = p.pci_functions().iter().find(|d| d.is_nvme()) {
        if let Ok(mmio) = p.map_bar(dev, 0) {
            let m = n.min(20_000);
            // CSTS: a read with no side effects.
            row(
                "MMIO read (NVMe CSTS)",
                per_call(clock, m, |_| {
                    black_box(mmio.read32(0x1C));
                }),
            );
            // INTMS with 0 masks nothing: a register write with no effect, like a doorbell's
            // path through QEMU without the queue work.
            row(
                "MMIO write (NVMe INTMS = 0)",
                per_call(clock, m, |_| {
                    mmio.write32(0x0C, 0);
                }),
            );
        }
    }
    if let Some((ctrl, _)) = ctrl {
        nvme_rows(ctrl, p, &mut row)?;
    }
    p.print(format_args!(
        "cost of one primitive under this accelerator ({} iterations):",
        n
    ));
    for (name, ns) in &rows {
        p.print(format_args!("  {:34} {:>6} ns", name, ns));
    }
    Ok(())
}

/// Driver costs with the device idle: a burst of submissions queued without a doorbell, then
/// one doorbell, then the completions reaped; per I/O, over several rounds.
fn nvme_rows<'a, B: Board>(
    mut ctrl: crate::Ctrl<B>,
    p: &B,
    row: &mut impl FnMut(&'static str, u64),
) -> Result<(), JobError<'a>> {
    use keel_blockdev::{BlockOp, BlockQueue, BufRef};
    let clk = p.clock();
    let clock = &clk;
    let rdtsc = || clock.ticks();
    let mut qp = crate::nvme::qpair(&mut ctrl, p, 1)?;
    let buf = crate::storage::dma(p.dma(), 4096).map_err(|_| JobError::Failed("DMA pool"))?;
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
    let idle = per_call(clock, 20_000, |_| {
        black_box(qp.poll(usize::MAX, &mut |_, _| {}));
    });
    row("nvme idle poll pass", idle);
    let ns_per = |t: u64| clock.ticks_to_ns(t) / ios.max(1);
    row("nvme submit (queued, per I/O)", ns_per(t_sub));
    row("nvme SQ doorbell, device idle", ns_per(t_db) * burst);
    row("nvme reap (per completion)", ns_per(t_reap));
    Ok(())
}

/// A queue that completes every command on the next poll: what is left is the layers' cost.
struct NullQueue {
    done: heapless::Deque<u32, 512>,
}

impl keel_blockdev::BlockQueue for NullQueue {
    fn submit(
        &mut self,
        _op: keel_blockdev::BlockOp,
        tag: u32,
    ) -> Result<(), keel_blockdev::SubmitError> {
        self.done
            .push_back(tag)
            .map_err(|_| keel_blockdev::SubmitError::QueueFull)
    }
    fn flush_submissions(&mut self) {}
    fn poll(
        &mut self,
        max: usize,
        on_done: &mut dyn FnMut(u32, Result<(), keel_blockdev::IoError>),
    ) -> usize {
        self.poll_impl(max, on_done)
    }
    fn poll_with<D: keel_blockdev::OnDone>(&mut self, max: usize, on_done: &mut D) -> usize {
        self.poll_impl(max, on_done)
    }
    fn poll_due(&self) -> bool {
        !self.done.is_empty()
    }
    fn depth(&self) -> usize {
        512
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn block_size(&self, _ns: keel_blockdev::NsId) -> Option<u32> {
        Some(512)
    }
    fn num_blocks(&self, _ns: keel_blockdev::NsId) -> Option<u64> {
        Some(1 << 30)
    }
}

impl NullQueue {
    #[inline(always)]
    fn poll_impl<D: keel_blockdev::OnDone + ?Sized>(
        &mut self,
        max: usize,
        on_done: &mut D,
    ) -> usize {
        let mut n = 0;
        while n < max {
            let Some(t) = self.done.pop_front() else {
                break;
            };
            on_done.done(t, Ok(()));
            n += 1;
        }
        n
    }
}

/// Per I/O (bursts of 32) over [`NullQueue`]: straight calls, then a reactor with I/O handles
/// (the bench's configuration: 512 handles, the full core mesh).
fn layer_rows<B: Board>(
    p: &B,
    row: &mut impl FnMut(&'static str, u64),
) -> Result<(), &'static str> {
    use keel_blockdev::{BlockOp, BlockQueue, BufRef};
    use keel_reactor::{split, MeshStorage, Msg, Reactor};
    const HANDLES: usize = 512;
    const W: usize = keel_slots::words_for(HANDLES);
    let clk = p.clock();
    let clock = &clk;
    let rdtsc = || clock.ticks();
    let buf = crate::storage::dma(p.dma(), 4096).map_err(|_| "DMA pool")?;
    let op = |i: u64| BlockOp::Read {
        ns: 1,
        lba: i * 8,
        blocks: 8,
        buf: BufRef::whole(&buf),
    };
    let rounds = 2000u64;
    let ios = rounds * 32;
    let mut q = NullQueue {
        done: heapless::Deque::new(),
    };
    let t0 = rdtsc();
    for r in 0..rounds {
        for i in 0..32 {
            let _ = q.submit(op(r * 32 + i), i as u32);
        }
        q.flush_submissions();
        q.poll(usize::MAX, &mut |t, _| {
            black_box(t);
        });
    }
    row(
        "null queue: submit+poll (per I/O)",
        clock.ticks_to_ns(rdtsc() - t0) / ios,
    );
    // One I/O at a time (queue depth 1): the latency each layer adds to every I/O.
    let qd1 = per_call(clock, 20_000, |i| {
        let _ = q.submit(op(i), 0);
        q.flush_submissions();
        q.poll(usize::MAX, &mut |t, _| {
            black_box(t);
        });
    });
    row("null queue: QD1 round trip", qd1);
    {
        let mut mesh2 = MeshStorage::<Msg, MAX_CORES, 4>::new();
        let [mut l0, ..] = split(&mut mesh2);
        row(
            "mesh: recv, all rings empty",
            per_call(clock, 20_000, |_| {
                black_box(l0.recv());
            }),
        );
    }
    let aio = keel_aio::Aio::<HANDLES, W>::new();
    let mut mesh = MeshStorage::<Msg, MAX_CORES, 4>::new();
    let [links, ..] = split(&mut mesh);
    let mut r: Reactor<'_, NullQueue, MAX_CORES, HANDLES, W> = Reactor::new(links, &aio, Some(q));
    // Bursts of 32, then one I/O at a time (the latency each I/O pays at queue depth 1).
    let burst = reactor_rounds(clock, &mut r, rounds, |r, round| {
        submit_each(r, &op, round, 32)
    })?;
    let single = reactor_rounds(clock, &mut r, 20_000, |r, round| {
        submit_each(r, &op, round, 1)
    })?;
    let per = |t: u64, n: u64| clock.ticks_to_ns(t) / n;
    row("reactor: QD1 round trip", per(single.iter().sum(), 20_000));
    row("  of which submit", per(single[0], 20_000));
    row("  of which flush", per(single[1], 20_000));
    row("  of which poll", per(single[2], 20_000));
    row("  of which next_completion", per(single[3], 20_000));
    let idle = per_call(clock, 20_000, |_| {
        black_box(r.poll());
    });
    row("reactor: idle poll pass", idle);
    row("reactor: submit (per I/O)", per(burst[0], ios));
    row(
        "reactor: poll pass (per I/O)",
        per(burst[1] + burst[2], ios),
    );
    row("reactor: next_completion (per I/O)", per(burst[3], ios));
    // Shaped like the bench loop: interrupts masked (`arch::polled`), bursts through
    // `submit_burst`, the raw queue and the reactor measured back to back in the same boot;
    // the best of five runs of each (the host's noise only ever adds).
    const PARTS: [&str; 4] = [
        "  of which submit_burst",
        "  of which flush",
        "  of which poll",
        "  of which next_completion",
    ];
    for (k, raw_name, full_name) in [
        (
            32usize,
            "polled, 32 per pass: null queue (per I/O)",
            "polled, 32 per pass: reactor (per I/O)",
        ),
        (
            4,
            "polled, 4 per pass: null queue (per I/O)",
            "polled, 4 per pass: reactor (per I/O)",
        ),
    ] {
        let ops: heapless::Vec<(BlockOp, u32), 32> =
            (0..k as u64).map(|i| (op(i), i as u32)).collect();
        let n = ios / k as u64;
        let mut best = [u64::MAX; 6];
        for _ in 0..5 {
            let t = p.cores().polled(|| {
                let t_raw = r
                    .with_queue(|q| {
                        let t0 = rdtsc();
                        for _ in 0..n {
                            for &(o, t) in &ops {
                                let _ = q.submit(o, t);
                            }
                            q.flush_submissions();
                            q.poll(usize::MAX, &mut |t, _| {
                                black_box(t);
                            });
                        }
                        rdtsc() - t0
                    })
                    .unwrap_or(0);
                let parts = reactor_rounds(clock, &mut r, n, |r, _| {
                    r.submit_burst(&ops)
                        .map(|_| ())
                        .map_err(|_| "reactor refused a burst")
                })?;
                let sum = parts.iter().sum();
                Ok::<_, &'static str>([t_raw, sum, parts[0], parts[1], parts[2], parts[3]])
            })?;
            for (b, t) in best.iter_mut().zip(t) {
                *b = (*b).min(t);
            }
        }
        let names = [raw_name, full_name].into_iter().chain(PARTS);
        for (name, t) in names.zip(best) {
            row(name, per(t, n * k as u64));
        }
    }
    Ok(())
}

/// `rounds` rounds of `submit(r, round)`, then the reactor's doorbell, one poll pass and the
/// hand-out of the completions: TSC ticks spent in each of those four steps.
fn reactor_rounds<K: Clock, const C: usize, const N: usize, const W: usize>(
    clock: &K,
    r: &mut keel_reactor::Reactor<'_, NullQueue, C, N, W>,
    rounds: u64,
    mut submit: impl FnMut(
        &mut keel_reactor::Reactor<'_, NullQueue, C, N, W>,
        u64,
    ) -> Result<(), &'static str>,
) -> Result<[u64; 4], &'static str> {
    let rdtsc = || clock.ticks();
    let mut parts = [0u64; 4];
    for round in 0..rounds {
        let t0 = rdtsc();
        submit(r, round)?;
        let t1 = rdtsc();
        r.flush();
        let t2 = rdtsc();
        r.poll();
        let t3 = rdtsc();
        while let Some(c) = r.next_completion() {
            black_box(c);
        }
        let t4 = rdtsc();
        for (p, d) in parts.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *p += d;
        }
    }
    Ok(parts)
}

/// One round of `burst` single submissions (`Reactor::submit`, one critical section each).
fn submit_each<const C: usize, const N: usize, const W: usize>(
    r: &mut keel_reactor::Reactor<'_, NullQueue, C, N, W>,
    op: &impl Fn(u64) -> keel_blockdev::BlockOp,
    round: u64,
    burst: u64,
) -> Result<(), &'static str> {
    for i in 0..burst {
        r.submit(op(round * burst + i), i as u32)
            .map_err(|_| "reactor refused a submission")?;
    }
    Ok(())
}
