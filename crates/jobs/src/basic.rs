//! Jobs about the board itself: `boot`, `cs`, `fault`, `panic`, `hang`, and `demo` (what
//! `cargo xtask run` runs).

use core::cell::Cell;
use core::sync::atomic::{AtomicUsize, Ordering};

use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock, Cores, CpuException};

use crate::{JobError, JobResult};

/// `boot`'s options.
pub const BOOT_OPTS: &[OptSpec] = &[OptSpec::int("wait_ms", 50, "how long to count timer ticks")];
/// `fault`'s options.
pub const FAULT_OPTS: &[OptSpec] = &[OptSpec::choice(
    "kind",
    &["ud2", "pf", "gp"],
    "which exception",
)];
/// `panic`'s options.
pub const PANIC_OPTS: &[OptSpec] = &[OptSpec::text(
    "msg",
    "requested by the panic job",
    "the panic message (one word)",
)];
/// `cs`'s options.
pub const CS_OPTS: &[OptSpec] = &[OptSpec::int("iters", 200_000, "increments per core")];

/// `boot`: reports cores, PCI functions and timer ticks; every other core runs work.
pub fn boot<'a, B: Board>(cl: &Cmdline<'a>, b: &B) -> JobResult<'a> {
    let wait_ms = cl.int("wait_ms")?;
    keel_log::info!("job boot: start");
    let f = b.pci_functions();
    keel_log::info!(
        "{=usize} PCI functions, {=usize} NVMe controllers",
        f.len(),
        f.iter().filter(|d| d.is_nvme()).count()
    );
    let cores = b.cores().count();
    let ran = AtomicUsize::new(0);
    crate::on_cores(b, cores, |core| {
        if core != 0 {
            keel_log::info!("core {=usize}: ran work from its poll loop", core);
            ran.fetch_add(1, Ordering::AcqRel);
        }
    })?;
    let clock = b.clock();
    let t0 = clock.now_ns();
    let ticks0 = b.timer_ticks();
    // At least `wait_ms`, and on until two ticks arrived (at most 2 s): a loaded host may
    // deschedule the vCPU, so a fixed window alone would make "the timer fired" flaky.
    let ticked = || b.timer_ticks().zip(ticks0).map_or(0, |(t, t0)| t - t0);
    loop {
        let waited = clock.now_ns() - t0;
        if (waited >= wait_ms * 1_000_000 && (ticks0.is_none() || ticked() >= 2))
            || waited >= 2_000_000_000
        {
            break;
        }
        b.cores().relax();
    }
    let wait_ms = (clock.now_ns() - t0) / 1_000_000;
    let ticks = ticked();
    let done = ran.load(Ordering::Acquire);
    keel_log::info!("timer ticks in {=u64} ms: {=u64}", wait_ms, ticks);
    keel_log::info!(
        "application processors that ran work: {=usize} of {=usize}",
        done,
        cores - 1
    );
    if ticks0.is_some() && ticks == 0 {
        return Err(JobError::Failed("the timer never fired"));
    }
    if done != cores - 1 {
        return Err(JobError::Failed(
            "an application processor did not run its work",
        ));
    }
    Ok(())
}

/// `fault`: raises a CPU exception; the board's handler reports it and ends the run.
pub fn fault<'a, B: Board>(cl: &Cmdline<'a>, b: &B) -> JobResult<'a> {
    let kind = cl.choice("kind")?;
    keel_log::info!("job fault: start ({=str})", kind);
    b.raise(match kind {
        "ud2" => CpuException::InvalidOpcode,
        "pf" => CpuException::PageFault,
        _ => CpuException::GeneralProtection,
    });
    Err(JobError::Failed("the fault did not fault"))
}

/// `panic`: panics with `msg`.
pub fn panic<'a, B: Board>(cl: &Cmdline<'a>, _b: &B) -> JobResult<'a> {
    let msg = cl.text("msg")?;
    keel_log::info!("job panic: start");
    panic!("{}", msg)
}

/// `hang`: spins forever, so the host's timeout is what ends the run.
pub fn hang<'a, B: Board>(_cl: &Cmdline<'a>, b: &B) -> JobResult<'a> {
    keel_log::info!("job hang: start");
    loop {
        b.cores().relax();
    }
}

/// `cs`: every core does plain (non-atomic) read-modify-writes inside nested critical
/// sections: only correct if a section excludes every other core and this core's interrupt
/// handlers, and if it gives interrupts back.
pub fn cs<'a, B: Board>(cl: &Cmdline<'a>, b: &B) -> JobResult<'a> {
    let iters = cl.int("iters")? as usize;
    keel_log::info!("job cs: start");
    let counter = critical_section::Mutex::new(Cell::new(0u64));
    let bad_if = AtomicUsize::new(0);
    let cores = b.cores().count();
    let ticks0 = b.timer_ticks().unwrap_or(0);
    crate::on_cores(b, cores, |_| {
        for i in 0..iters {
            critical_section::with(|cs| {
                let c = counter.borrow(cs);
                let v = c.get();
                if i % 8 == 0 {
                    // A nested section on the same core must not deadlock.
                    critical_section::with(|_| b.cores().relax());
                }
                c.set(v + 1);
            });
            if i % 1024 == 0 && !b.cores().interrupts_enabled() {
                bad_if.fetch_add(1, Ordering::Relaxed);
            }
        }
    })?;
    let total = critical_section::with(|cs| counter.borrow(cs).get());
    let want = (iters * cores) as u64;
    let ticks = b.timer_ticks().unwrap_or(0) - ticks0;
    let bad_if = bad_if.load(Ordering::Relaxed);
    keel_log::info!(
        "cs: {=usize} cores x {=usize} increments = {=u64} (expected {=u64}); timer ticks meanwhile {=u64}; interrupts left masked {=usize} times",
        cores, iters, total, want, ticks, bad_if
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

/// `demo`, the default workload of `cargo xtask run`: verify the device, then measure it.
pub fn demo<'a, B: Board>(_cl: &Cmdline<'a>, b: &B) -> JobResult<'a> {
    keel_log::info!("job demo: start");
    crate::run_fixed(b, "selftest").map_err(|_| JobError::Failed("selftest failed"))?;
    // One core: on a small host, more vCPUs mostly measure their contention with QEMU itself
    // (`cargo xtask bench` shows the scaling).
    crate::run_fixed(b, "bench pattern=randread bs=4K qd=32 secs=1 cores=1")
        .map_err(|_| JobError::Failed("bench failed"))
}
