//! Jobs: what the firmware does once booted, chosen by the first word of the boot command line.
//! Each job reads its options, then calls `finish()` so an option nobody reads fails the run.

use core::sync::atomic::{AtomicUsize, Ordering};

use keel_cmdline::{Cmdline, CmdlineError};

use crate::pci::{PciDevice, MAX_DEVICES};

pub struct Platform {
    pub devices: heapless::Vec<PciDevice, MAX_DEVICES>,
    pub cores: usize,
    /// DMA-able memory for queues and buffers.
    pub dma: crate::hw::DmaPool,
}

#[derive(Debug)]
pub enum JobError<'a> {
    Cmdline(CmdlineError<'a>),
    Failed(&'static str),
}

impl defmt::Format for JobError<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            Self::Cmdline(e) => defmt::write!(f, "{}", defmt::Display2Format(e)),
            Self::Failed(m) => defmt::write!(f, "{=str}", m),
        }
    }
}

impl<'a> From<CmdlineError<'a>> for JobError<'a> {
    fn from(e: CmdlineError<'a>) -> Self {
        Self::Cmdline(e)
    }
}

/// Every job, with a line of help (printed when the job name is unknown).
pub const JOBS: &[(&str, &str)] = &[
    (
        "demo",
        "what `cargo xtask run` runs: selftest on every namespace, then a 1 s bench",
    ),
    (
        "boot",
        "report cores, PCI devices and timer ticks [wait_ms=50]",
    ),
    (
        "cost",
        "nanoseconds per primitive (MMIO, rdtsc, critical section, ...) here [iters=N]",
    ),
    ("fault", "raise a CPU exception on purpose [kind=ud2|pf|gp]"),
    ("panic", "panic on purpose [msg=text]"),
    ("hang", "spin forever (tests the host-side timeout)"),
    (
        "cs",
        "every core does non-atomic increments inside nested critical sections [iters=200000]",
    ),
    (
        "selftest",
        "write, read back and verify every namespace and transfer shape [ns=N seed=N dbbuf=on lazycq=off]",
    ),
    (
        "scrub",
        "CRC32C of a namespace range [ns=1 lba=0 blocks=all dbbuf=on]",
    ),
    (
        "bench",
        "fio-like load [pattern=randread|randwrite|read|write bs=4K qd=32 secs=2 cores=1 ns=1]",
    ),
];

pub fn run<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let job = cl.job();
    match job {
        "boot" => boot(cl, p),
        "demo" => demo(cl, p),
        "cs" => cs_stress(cl, p),
        "cost" => crate::cost::cost(cl, p),
        "selftest" => crate::nvme_jobs::selftest(cl, p),
        "scrub" => crate::nvme_jobs::scrub(cl, p),
        "log" => crate::wal_jobs::log(cl, p),
        "recover" => crate::wal_jobs::recover(cl, p),
        "logbench" => crate::wal_jobs::logbench(cl, p),
        "scan" => crate::nvme_jobs::scan(cl, p),
        "cfs" => crate::nvme_jobs::cfs(cl, p),
        "bench" => crate::nvme_jobs::bench(cl, p),
        "reactor" => crate::reactor_job::run(cl, p),
        "fault" => fault(cl),
        "panic" => {
            let msg = cl.str("msg").unwrap_or("requested by the panic job");
            cl.finish()?;
            keel_log::info!("job panic: start");
            panic!("{}", msg)
        }
        "hang" => {
            cl.finish()?;
            keel_log::info!("job hang: start");
            loop {
                crate::cpu::relax();
            }
        }
        _ => {
            crate::println!("keel: unknown job '{}'; jobs:", job);
            for (name, help) in JOBS {
                crate::println!("  {:10} {}", name, help);
            }
            Err(JobError::Cmdline(CmdlineError::UnknownJob(job)))
        }
    }
}

static AP_WORK_DONE: AtomicUsize = AtomicUsize::new(0);

fn ap_hello(core: usize, _arg: usize) {
    keel_log::info!("core {=usize}: ran work from its poll loop", core);
    AP_WORK_DONE.fetch_add(1, Ordering::AcqRel);
}

fn boot<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let wait_ms = cl.u64("wait_ms", 50)?;
    cl.finish()?;
    keel_log::info!("job boot: start");
    keel_log::info!(
        "{=usize} PCI functions, {=usize} NVMe controllers",
        p.devices.len(),
        p.devices.iter().filter(|d| d.is_nvme()).count()
    );
    for core in 1..p.cores {
        crate::smp::post(core, ap_hello, 0)
            .map_err(|_| JobError::Failed("could not post work to an AP"))?;
    }
    let t0 = crate::time::now_ns();
    let ticks0 = crate::arch::TICKS.load(Ordering::Relaxed);
    // At least `wait_ms`, and on until two ticks arrived (at most 2 s): a loaded host may
    // deschedule the vCPU, so a fixed window alone would make "the timer fired" flaky.
    loop {
        let waited = crate::time::now_ns() - t0;
        let ticked = crate::arch::TICKS.load(Ordering::Relaxed) - ticks0;
        if (waited >= wait_ms * 1_000_000 && ticked >= 2) || waited >= 2_000_000_000 {
            break;
        }
        crate::cpu::relax();
    }
    let wait_ms = (crate::time::now_ns() - t0) / 1_000_000;
    let ticks = crate::arch::TICKS.load(Ordering::Relaxed) - ticks0;
    let all_returned = (1..p.cores).all(crate::smp::done);
    let done = AP_WORK_DONE.load(Ordering::Acquire);
    keel_log::info!("timer ticks in {=u64} ms: {=u64}", wait_ms, ticks);
    keel_log::info!(
        "application processors that ran work: {=usize} of {=usize}",
        done,
        p.cores - 1
    );
    if ticks == 0 {
        return Err(JobError::Failed("the timer never fired"));
    }
    if done != p.cores - 1 || !all_returned {
        return Err(JobError::Failed(
            "an application processor did not run its work",
        ));
    }
    Ok(())
}

fn fault<'a>(cl: &Cmdline<'a>) -> Result<(), JobError<'a>> {
    let kind = cl.choice("kind", &["ud2", "pf", "gp"], "ud2")?;
    cl.finish()?;
    keel_log::info!("job fault: start ({=str})", kind);
    match kind {
        // SAFETY: deliberately raises #UD; the exception handler reports it and ends the run.
        "ud2" => unsafe { core::arch::asm!("ud2") },
        "pf" => {
            // An address no page table maps (256 GiB); the #PF handler reports it with CR2.
            let p = 0x40_0000_0000u64 as *mut u64;
            // SAFETY: deliberately faults; the page-fault handler never returns here.
            unsafe { p.write_volatile(0xdead) };
        }
        // SAFETY: loading a null selector into SS raises #GP; the handler ends the run.
        _ => unsafe { core::arch::asm!("mov ss, {0:x}", in(reg) 0x1234u16) },
    }
    Err(JobError::Failed("the fault did not fault"))
}

/// A plain (non-atomic) counter: only correct if critical sections exclude every other core
/// and this core's interrupt handlers.
static CS_COUNTER: critical_section::Mutex<core::cell::Cell<u64>> =
    critical_section::Mutex::new(core::cell::Cell::new(0));
static CS_ITERS: AtomicUsize = AtomicUsize::new(0);
static CS_BAD_IF: AtomicUsize = AtomicUsize::new(0);

fn cs_worker(_core: usize, _arg: usize) {
    let iters = CS_ITERS.load(Ordering::Acquire);
    for i in 0..iters {
        critical_section::with(|cs| {
            let c = CS_COUNTER.borrow(cs);
            let v = c.get();
            if i % 8 == 0 {
                // A nested section on the same core must not deadlock.
                critical_section::with(|_| crate::cpu::relax());
            }
            c.set(v + 1);
        });
        if i % 1024 == 0 && !x86_64::instructions::interrupts::are_enabled() {
            CS_BAD_IF.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn cs_stress<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    let iters = cl.u64("iters", 200_000)? as usize;
    cl.finish()?;
    keel_log::info!("job cs: start");
    CS_ITERS.store(iters, Ordering::Release);
    let ticks0 = crate::arch::TICKS.load(Ordering::Relaxed);
    for core in 1..p.cores {
        crate::smp::post(core, cs_worker, 0)
            .map_err(|_| JobError::Failed("could not post work to an AP"))?;
    }
    cs_worker(0, 0);
    while !(1..p.cores).all(crate::smp::done) {
        crate::cpu::relax();
    }
    let total = critical_section::with(|cs| CS_COUNTER.borrow(cs).get());
    let want = (iters * p.cores) as u64;
    let ticks = crate::arch::TICKS.load(Ordering::Relaxed) - ticks0;
    let bad_if = CS_BAD_IF.load(Ordering::Relaxed);
    keel_log::info!(
        "cs: {=usize} cores x {=usize} increments = {=u64} (expected {=u64}); timer ticks meanwhile {=u64}; interrupts left masked {=usize} times",
        p.cores, iters, total, want, ticks, bad_if
    );
    if total != want {
        return Err(JobError::Failed(
            "critical sections did not exclude each other: increments lost",
        ));
    }
    if bad_if != 0 {
        return Err(JobError::Failed(
            "a critical section left interrupts masked",
        ));
    }
    Ok(())
}

/// The default workload of `cargo xtask run`: verify the device, then measure it.
fn demo<'a>(cl: &Cmdline<'a>, p: &Platform) -> Result<(), JobError<'a>> {
    cl.finish()?;
    keel_log::info!("job demo: start");
    let fixed = |line: &'static str| {
        Cmdline::parse(line, "demo").map_err(|_| JobError::Failed("demo command line"))
    };
    crate::nvme_jobs::selftest(&fixed("selftest")?, p)
        .map_err(|_| JobError::Failed("selftest failed"))?;
    // One core: on a small host, more vCPUs mostly measure their contention with QEMU itself
    // (`cargo xtask bench` shows the scaling).
    let bench = "bench pattern=randread bs=4K qd=32 secs=1 cores=1";
    crate::nvme_jobs::bench(&fixed(bench)?, p).map_err(|_| JobError::Failed("bench failed"))
}
