//! Keel's portable application: what the firmware does once booted, as a table of jobs.
//!
//! Every job is generic over a [`keel_hal::Board`], so the same selftest, scrub, bench,
//! reactor, log/recover and cost code runs in the firmware under QEMU and in `cargo test`
//! against the software model (`keel-model`). A job is chosen by the first word of the boot
//! command line; its options are checked against its [`JobSpec`] before it runs.
//!
//! [`JOBS`] is the one job table: name, help, options and the function, written once in the
//! [`jobs!`](crate::jobs) invocation below. Dispatch, the unknown-job message, `cargo xtask run
//! --help` and `cargo xtask flash`'s job-line check all read it, so they cannot drift.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod basic;
pub mod cost;
pub mod drives;
pub mod health;
#[cfg(feature = "lab")]
pub mod nschange;
pub mod nvme;
pub mod oracle;
pub mod reactor;
pub mod storage;
pub mod wal;
pub mod zlog;
pub mod zone;

use core::cell::RefCell;
use core::fmt;

use critical_section::Mutex;
use keel_cmdline::{Cmdline, CmdlineError, OptSpec};
use keel_hal::{Board, Cores, CoresError};

pub use keel_cmdline::JobSpec;

/// Most cores a job drives (per-core tables are this long).
pub const MAX_CORES: usize = 16;

/// The NVMe controller type on board `B`.
pub type Ctrl<B> = keel_nvme::Controller<<B as Board>::Mmio, <B as Board>::Clock>;
/// An I/O queue pair on board `B`.
pub type Qp<B> = keel_nvme::IoQueuePair<<B as Board>::Mmio, <B as Board>::Clock>;

/// Why a job failed.
#[derive(Debug, Clone, Copy)]
pub enum JobError<'a> {
    /// The command line did not fit the job's spec.
    Cmdline(CmdlineError<'a>),
    /// The job ran and failed; the reason, in words (details went to the log).
    Failed(&'static str),
}

impl fmt::Display for JobError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cmdline(e) => write!(f, "{e}"),
            Self::Failed(m) => f.write_str(m),
        }
    }
}

#[cfg(feature = "defmt")]
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

impl From<CoresError> for JobError<'_> {
    fn from(e: CoresError) -> Self {
        keel_log::error!("cores: {}", keel_log::Display2Format(&e));
        Self::Failed("could not run work on the cores")
    }
}

/// The result of a job.
pub type JobResult<'a> = Result<(), JobError<'a>>;

/// Runs `f(core)` on cores `0..n` at once (this core runs `f(0)`) and returns each core's
/// result, in core order.
pub fn on_cores<B: Board, R: Send>(
    board: &B,
    n: usize,
    f: impl Fn(usize) -> R + Sync,
) -> Result<heapless::Vec<R, MAX_CORES>, CoresError> {
    let n = n.min(MAX_CORES);
    let slots: [Mutex<RefCell<Option<R>>>; MAX_CORES] =
        core::array::from_fn(|_| Mutex::new(RefCell::new(None)));
    board.cores().run_on_each(n, &|core| {
        let r = f(core);
        if let Some(slot) = slots.get(core) {
            critical_section::with(|cs| *slot.borrow_ref_mut(cs) = Some(r));
        }
    })?;
    let mut out = heapless::Vec::new();
    for slot in slots.iter().take(n) {
        if let Some(r) = critical_section::with(|cs| slot.borrow_ref_mut(cs).take()) {
            let _ = out.push(r);
        }
    }
    Ok(out)
}

/// Options every NVMe job takes (see [`nvme::open`]).
pub const NVME_OPTS: &[OptSpec] = &[
    OptSpec::flag("dbbuf", false, "shadow doorbells (Doorbell Buffer Config)"),
    OptSpec::flag(
        "lazycq",
        true,
        "CQ head doorbell once per half ring (off: every pass)",
    ),
    OptSpec::int(
        "io_timeout_ms",
        30_000,
        "per-command I/O timeout: past it a command is announced timed out (its buffer stays held) and recovery may begin",
    ),
];

/// Defines [`JOBS`] and the dispatch over it from one list, so they cannot drift.
macro_rules! jobs {
    ($( $(#[$m:meta])* $name:literal => $run:path, $help:literal, [$($group:expr),* $(,)?]; )*) => {
        /// Every job: name, help, options. Read by dispatch, the unknown-job message, and by
        /// xtask for `--help` and the flash job-line check.
        pub static JOBS: &[JobSpec] = &[$(
            $(#[$m])* JobSpec { name: $name, help: $help, opts: &[$($group),*] },
        )*];

        /// Runs the job `cl` names (its options already bound to its spec: see
        /// [`Cmdline::parse_for`]).
        pub fn dispatch<'a, B: Board>(cl: &Cmdline<'a>, board: &B) -> JobResult<'a> {
            match cl.job() {
                // Each job in a frame of its own: inlined into one function, the jobs' stack
                // frames (a reactor mesh is ~230 KiB) would add up in every job's call.
                $( $(#[$m])* $name => {
                    #[inline(never)]
                    fn job<'a, B: Board>(cl: &Cmdline<'a>, board: &B) -> JobResult<'a> {
                        $run(cl, board)
                    }
                    job(cl, board)
                } )*
                other => Err(JobError::Cmdline(CmdlineError::UnknownJob(other))),
            }
        }
    };
}

jobs! {
    #[cfg(feature = "lab")]
    "demo" => basic::demo, "what `cargo xtask run` runs: selftest on every namespace, then a 1 s bench", [];
    "boot" => basic::boot, "report cores, PCI devices and timer ticks; every core runs work", [basic::BOOT_OPTS];
    #[cfg(feature = "lab")]
    "cost" => cost::cost, "nanoseconds per primitive (MMIO, clock, critical section, driver, reactor) here", [cost::OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "fault" => basic::fault, "raise a CPU exception on purpose", [basic::FAULT_OPTS];
    #[cfg(feature = "lab")]
    "panic" => basic::panic, "panic on purpose", [basic::PANIC_OPTS];
    #[cfg(feature = "lab")]
    "hang" => basic::hang, "spin forever (tests the host-side timeout)", [];
    #[cfg(feature = "lab")]
    "cs" => basic::cs, "every core does non-atomic increments inside nested critical sections", [basic::CS_OPTS];
    "selftest" => nvme::selftest, "write, read back and verify every namespace and transfer shape, on every drive", [nvme::SELFTEST_OPTS, drives::ALL_DRIVES, NVME_OPTS];
    "scrub" => nvme::scrub, "CRC32C of a namespace range on every drive (for the host to compare with the images)", [nvme::RANGE_OPTS, drives::ALL_DRIVES, NVME_OPTS];
    "health" => health::health, "SMART / health page and error log of every drive, as tables; writes= or temp=on in between", [health::OPTS, drives::ALL_DRIVES, NVME_OPTS];
    #[cfg(feature = "lab")]
    "nschange" => nschange::nschange, "attach a detached namespace while namespace 1 does I/O: notice, changed list, rescan; write it; detach it: refused typed", [nschange::OPTS, drives::ONE_DRIVE, NVME_OPTS];
    "scan" => nvme::scan, "read (or write) a range; failing chunks bisected to the exact bad LBAs", [nvme::RANGE_OPTS, nvme::SCAN_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "cfs" => nvme::cfs, "a queue at unmapped memory makes the controller fatal; reset, nothing lost", [nvme::CFS_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "bench" => nvme::bench, "fio-like load: a queue pair per core, full stack, raw loop or device ceiling", [nvme::BENCH_OPTS, drives::ALL_DRIVES, NVME_OPTS];
    #[cfg(feature = "lab")]
    "oracle" => oracle::oracle, "the data oracle: mixed I/O on every core and drive; blocks say what they are; the host checks the images", [oracle::OPTS, drives::ALL_DRIVES, NVME_OPTS];
    "reactor" => reactor::run, "a reactor per core: cross-core I/O, queue-pair handoff and shutdown mid-I/O", [reactor::OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "zone" => zone::zone, "zoned namespaces: reset, appends in flight (LBAs checked, printed for the host), zone states and errors", [zone::OPTS, drives::ALL_DRIVES, NVME_OPTS];
    #[cfg(feature = "lab")]
    "zlog" => zlog::zlog, "a write-ahead log on a zoned namespace (zone append): format, append, sync; crash_at= resets mid-run, the next boot replays and verifies", [zlog::ZLOG_OPTS, zlog::ZWAL_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "zrecover" => zlog::zrecover, "replay the zoned write-ahead log and verify every record", [zlog::ZRECOVER_OPTS, zlog::ZWAL_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    "log" => wal::log, "append records to a write-ahead log on namespace 1, syncing every few", [wal::LOG_OPTS, wal::WAL_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    "recover" => wal::recover, "recover the write-ahead log and verify every record", [wal::RECOVER_OPTS, wal::WAL_OPTS, drives::ONE_DRIVE, NVME_OPTS];
    #[cfg(feature = "lab")]
    "logbench" => wal::logbench, "the writer against the raw queue pair: MB/s and bytes copied", [wal::LOGBENCH_OPTS, drives::ONE_DRIVE, NVME_OPTS];
}

/// Prints the job table on the console (for an unknown job).
pub fn print_jobs<B: Board>(board: &B) {
    for j in JOBS {
        board.print(format_args!("  {:10} {}", j.name, j.help));
    }
}

/// Parses `line` (an empty line runs `default_job`), checks it against the job's spec, runs
/// the job and reports the outcome on the console and the log. Returns whether it passed.
pub fn run<B: Board>(board: &B, line: &str, default_job: &str) -> bool {
    let cl = match Cmdline::parse_for(line, default_job, JOBS) {
        Ok(c) => c,
        Err(e) => {
            report_cmdline_error(board, line, default_job, e);
            return false;
        }
    };
    match dispatch(&cl, board) {
        Ok(()) => {
            keel_log::info!("job {=str}: PASS", cl.job());
            true
        }
        Err(JobError::Cmdline(e)) => {
            report_cmdline_error(board, line, default_job, e);
            false
        }
        Err(e) => {
            keel_log::error!("job {=str}: FAIL: {}", cl.job(), e);
            board.print(format_args!("keel: job {}: FAIL: {}", cl.job(), e));
            false
        }
    }
}

fn report_cmdline_error<B: Board>(board: &B, line: &str, default_job: &str, e: CmdlineError<'_>) {
    match e {
        CmdlineError::UnknownJob(job) => {
            board.print(format_args!("keel: unknown job '{}'; jobs:", job));
            print_jobs(board);
        }
        _ => board.print(format_args!("keel: command line rejected: {}", e)),
    }
    keel_log::error!("command line rejected: {}", keel_log::Display2Format(&e));
    if let CmdlineError::UnknownOption(_) = e {
        let job = line.split_ascii_whitespace().next().unwrap_or(default_job);
        if let Some(spec) = JobSpec::find(JOBS, job) {
            board.print(format_args!(
                "keel: job '{}' takes: {}",
                spec.name,
                keel_cmdline::OptionNames(spec)
            ));
        }
    }
}

/// Runs a fixed command line (jobs that run other jobs, like `demo`).
pub(crate) fn run_fixed<'a, B: Board>(board: &B, line: &'static str) -> JobResult<'a> {
    let cl = Cmdline::parse_for(line, "boot", JOBS)
        .map_err(|_| JobError::Failed("a fixed command line does not fit its spec"))?;
    dispatch(&cl, board).map_err(|e| match e {
        JobError::Cmdline(_) => JobError::Failed("a fixed command line does not fit its spec"),
        JobError::Failed(m) => JobError::Failed(m),
    })
}

/// `a / b` as (units, thousandths), for `{=u64}.{=u64:03}`.
pub(crate) fn ratio(a: u64, b: u64) -> (u64, u64) {
    let permille = a * 1000 / b.max(1);
    (permille / 1000, permille % 1000)
}
