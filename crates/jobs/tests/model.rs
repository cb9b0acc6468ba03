//! The firmware's jobs, run on the software model (`keel_model::ModelBoard`) at host speed:
//! the same code QEMU runs, checked here from the outside (the model's disk, the console).

use keel_cmdline::Cmdline;
use keel_hal::Board;
use keel_jobs::{dispatch, JobError, JOBS};
use keel_model::{HostDma, ModelBoard, ModelConfig, NsConfig, NvmeModel};

fn board(cores: usize, cfg: ModelConfig) -> ModelBoard {
    let dma = HostDma::new();
    let nvme = NvmeModel::new(cfg, dma.clone());
    ModelBoard::new(cores, dma, vec![nvme])
}

fn big() -> ModelConfig {
    ModelConfig {
        namespaces: vec![NsConfig {
            nsid: 1,
            blocks: 32768,
            lba_shift: 9,
        }],
        max_io_queues: 8,
        ..ModelConfig::default()
    }
}

/// Runs `line` on `b` and returns the job's result (the command line must fit its spec).
/// The job runs on a thread with a firmware-sized stack: its core 0 work runs there, and a
/// job keeps its mesh and per-core state on core 0's stack (the board gives core 0 4 MiB).
fn run<'a>(b: &ModelBoard, line: &'a str) -> Result<(), JobError<'a>> {
    on_big_stack(|| {
        let cl = Cmdline::parse_for(line, "boot", JOBS).expect("line fits the spec");
        dispatch(&cl, b)
    })
}

fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn_scoped(s, f)
            .expect("spawn")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[test]
fn selftest_on_every_namespace_and_shape() {
    let b = board(
        2,
        ModelConfig {
            namespaces: vec![
                NsConfig {
                    nsid: 1,
                    blocks: 16384,
                    lba_shift: 9,
                },
                NsConfig {
                    nsid: 2,
                    blocks: 4096,
                    lba_shift: 12,
                },
            ],
            ..ModelConfig::default()
        },
    );
    run(&b, "selftest").unwrap();
    // The host reads the model's disk: every shape's blocks hold the selftest's pattern at
    // the LBA the shape named (a driver that put every block one LBA off, reads included,
    // would pass the job's own read-back check, not this one).
    let seed = 0x6b65_656c_u64;
    for (nsid, bs, lba, blocks) in [
        (1u32, 512usize, 8192u64, 4112u64),
        (1, 512, 4096, 64),
        (2, 4096, 0, 1),
        (2, 4096, 8192 / 8, 1),
    ] {
        if nsid == 2 && lba != 0 {
            continue; // namespace 2 is too small for the large shapes
        }
        let disk = b.nvme()[0].disk_read(nsid, lba as usize * bs, blocks as usize * bs);
        for blk in 0..blocks as usize {
            for off in (0..bs).step_by(8) {
                let want = keel_jobs::storage::pattern(nsid, lba + blk as u64, off, seed ^ lba);
                let got = u64::from_le_bytes(disk[blk * bs + off..][..8].try_into().unwrap());
                assert_eq!(got, want, "ns {nsid} lba {} offset {off}", lba + blk as u64);
            }
        }
    }
}

#[test]
fn selftest_and_scrub_on_every_drive() {
    // Three controllers; the middle one fails bring-up (it never becomes ready): the other
    // two are tested, and each drive's disk holds what its selftest wrote.
    let dma = HostDma::new();
    let nvme: Vec<_> = (0..3).map(|_| NvmeModel::new(big(), dma.clone())).collect();
    nvme[1].set_fault(keel_model::Fault::NeverReady);
    let b = ModelBoard::new(2, dma, nvme);
    run(&b, "selftest").unwrap();
    run(&b, "scrub blocks=64").unwrap();
    let seed = 0x6b65_656c_u64;
    for (d, written) in [(0, true), (1, false), (2, true)] {
        let disk = b.nvme()[d].disk_read(1, 8192 * 512, 512);
        let want = keel_jobs::storage::pattern(1, 8192, 0, seed ^ 8192);
        let got = u64::from_le_bytes(disk[..8].try_into().unwrap());
        assert_eq!(got == want, written, "drive {d}");
    }
    // One drive by index; an index with no drive is an error.
    run(&b, "selftest drive=2").unwrap();
    assert!(run(&b, "selftest drive=1").is_err());
    assert!(run(&b, "selftest drive=7").is_err());
}

#[test]
fn scrub_crc_matches_the_hosts() {
    let b = board(1, big());
    let pattern: Vec<u8> = (0..64 * 512).map(|i| (i * 7 + 3) as u8).collect();
    b.nvme()[0].disk_write(1, 100 * 512, &pattern);
    run(&b, "scrub ns=1 lba=100 blocks=64").unwrap();
    // The job logs its CRC through defmt (not on the host); compute both sides here from the
    // same job code path instead: storage::scrub over a queue pair against the host's CRC.
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&pattern);
    let (mut ctrl, _) = {
        let cl = Cmdline::parse_for("scan", "boot", JOBS).unwrap();
        keel_jobs::nvme::open(&b, &cl).unwrap()
    };
    let mut qp = keel_jobs::nvme::qpair(&mut ctrl, &b, 1).unwrap();
    let buf = keel_jobs::storage::dma(b.dma(), 4096).unwrap();
    let got = keel_jobs::storage::scrub(&mut qp, &b.clock(), 1, 100, 64, &buf).unwrap();
    assert_eq!(got, crc);
}

#[test]
fn bench_every_mode_on_two_cores() {
    let b = board(2, big());
    for mode in ["off", "on", "both", "ceiling"] {
        let line = format!("bench ms=2 qd=8 cores=2 raw={mode}");
        let line: &'static str = Box::leak(line.into_boxed_str());
        run(&b, line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
}

#[test]
fn bench_with_one_queue_for_four_cores() {
    // The controller grants one I/O queue: cores 1..3 send their I/O through core 0.
    let b = board(
        4,
        ModelConfig {
            max_io_queues: 1,
            ..big()
        },
    );
    run(&b, "bench ms=2 qd=8 cores=4").unwrap();
    run(&b, "bench ms=2 qd=8 cores=4 raw=on").unwrap();
    run(&b, "reactor ios=200 qd=8").unwrap();
}

#[test]
fn bench_across_two_drives_one_of_them_with_one_queue() {
    let dma = HostDma::new();
    let one_queue = ModelConfig {
        max_io_queues: 1,
        ..big()
    };
    let b = ModelBoard::new(
        3,
        dma.clone(),
        vec![
            NvmeModel::new(big(), dma.clone()),
            NvmeModel::new(one_queue, dma),
        ],
    );
    run(&b, "bench ms=2 qd=8 cores=3").unwrap();
    run(&b, "bench ms=2 qd=8 cores=1 pattern=randwrite").unwrap();
    run(&b, "bench ms=2 qd=8 cores=3 raw=on").unwrap();
    // Both drives saw I/O: the model counts commands per controller.
    assert!(b.nvme().iter().all(|n| n.io_commands() > 100));
    // The interleaved run measures one drive.
    assert!(run(&b, "bench ms=2 raw=both").is_err());
    run(&b, "bench ms=2 raw=both drive=1").unwrap();
}

#[test]
fn reactor_with_handoff_and_shutdown_on_four_cores() {
    let b = board(4, big());
    run(&b, "reactor ios=300 qd=8").unwrap();
}

#[test]
fn log_then_recover() {
    let b = board(1, big());
    run(&b, "log records=120 sync_every=7").unwrap();
    run(&b, "recover expect=120").unwrap();
    // Recovery of more than was written fails: the check can fail.
    assert!(matches!(
        run(&b, "recover expect=121"),
        Err(JobError::Failed(_))
    ));
}

#[test]
fn scan_finds_nothing_on_a_healthy_disk_and_cs_excludes() {
    let b = board(3, big());
    run(&b, "scan blocks=2048 chunk=64").unwrap();
    run(&b, "cs iters=20000").unwrap();
    run(&b, "boot wait_ms=1").unwrap();
}

#[test]
fn every_job_reads_exactly_its_spec() {
    // Each job (but the ones that never return) runs once with its defaults, shortened where
    // the defaults would take long; afterwards no option of its spec is left unread, and no
    // job read an option its spec lacks (that would be CmdlineError::NotInSpec).
    let b = board(2, big());
    let short = |name: &str| -> &'static str {
        match name {
            "bench" => "bench ms=1 qd=4",
            "cost" => "cost iters=200",
            "logbench" => "logbench ms=2",
            "reactor" => "reactor ios=50 qd=4",
            "log" => "log records=10",
            "cs" => "cs iters=100",
            "boot" => "boot wait_ms=1",
            other => Box::leak(other.to_string().into_boxed_str()),
        }
    };
    for job in JOBS {
        if matches!(job.name, "hang" | "panic") {
            continue;
        }
        let line = short(job.name);
        let (r, unread) = on_big_stack(|| {
            let cl = Cmdline::parse_for(line, "boot", JOBS).unwrap();
            let r = dispatch(&cl, &b);
            (r, cl.unread().map(|o| o.name).collect::<Vec<_>>())
        });
        assert!(
            !matches!(r, Err(JobError::Cmdline(_))),
            "{}: {:?}",
            job.name,
            r
        );
        assert!(unread.is_empty(), "{} never read {:?}", job.name, unread);
        // `fault` cannot fault on the model, `cfs` needs QEMU's fatal status, `zone`, `zlog` and
        // `zrecover` a zoned namespace, `nschange` a detached namespace 2 (this board has
        // neither: they say so); every other job passes here.
        if job.name == "nschange" {
            assert!(
                matches!(
                    r,
                    Err(JobError::Failed("no such namespace in the subsystem"))
                ),
                "nschange: {r:?}"
            );
        } else if job.name == "zone" {
            assert!(
                matches!(r, Err(JobError::Failed("no zoned namespace"))),
                "zone: {r:?}"
            );
        } else if matches!(job.name, "zlog" | "zrecover") {
            assert!(
                matches!(r, Err(JobError::Failed("zlog: namespace 1 is not zoned"))),
                "{}: {r:?}",
                job.name
            );
        } else if !matches!(job.name, "fault" | "cfs") {
            r.unwrap_or_else(|e| panic!("{}: {e}", job.name));
        }
    }
}

#[test]
fn the_panic_job_panics_and_unknown_input_is_named() {
    let b = board(1, big());
    let r = std::panic::catch_unwind(|| run(&b, "panic msg=boom"));
    assert!(r.is_err());
    assert!(!keel_jobs::run(&b, "frobnicate", "boot"));
    assert!(!keel_jobs::run(&b, "bench duration=8", "boot"));
    let console = b.console();
    assert!(console
        .iter()
        .any(|l| l == "keel: unknown job 'frobnicate'; jobs:"));
    assert!(console.iter().any(|l| l.starts_with("  selftest ")));
    assert!(console.iter().any(|l| l.starts_with(
        "keel: job 'bench' takes: pattern bs qd secs ms cores ns raw drive dbbuf lazycq"
    )));
}

/// A board of `cores` cores with two drives of the `big()` shape.
fn two_drive_board(cores: usize) -> ModelBoard {
    let dma = HostDma::new();
    ModelBoard::new(
        cores,
        dma.clone(),
        vec![
            NvmeModel::new(big(), dma.clone()),
            NvmeModel::new(big(), dma),
        ],
    )
}

/// The oracle's host check on both drives of `b` after a run: each disk holds what the job's
/// record (from the console) allows, block by block, over `span` blocks; with `rollback`, also
/// that the check fails on this run's disk when one block is rolled back a generation.
fn check_oracle_run(b: &ModelBoard, span: u64, rollback: bool) {
    let recs = oracle_record(&b.console());
    for d in 0..2 {
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r.0 == d)
            .map(|r| (r.1, r.2, r.3))
            .collect();
        assert!(
            mine.len() > 10,
            "drive {d}: only {} blocks written",
            mine.len()
        );
        check_oracle_disk(b, d, &mine, span).unwrap();
        if !rollback {
            continue;
        }
        let &(lba, acked, _) = mine
            .iter()
            .find(|r| r.1 >= 2)
            .expect("a block written twice");
        let mut old = [0u8; 512];
        keel_jobs::oracle::make_block(&mut old, lba, acked - 1, d as u32, 0);
        let keep = b.nvme()[d].disk_read(1, lba as usize * 512, 512);
        b.nvme()[d].disk_write(1, lba as usize * 512, &old);
        assert!(check_oracle_disk(b, d, &mine, span).is_err());
        b.nvme()[d].disk_write(1, lba as usize * 512, &keep);
    }
}

/// The host's side of the oracle: each block the record lists holds an intact oracle block of
/// its own LBA whose generation fits the record; every other block of the run is untouched.
fn check_oracle_disk(
    b: &ModelBoard,
    drive: usize,
    recs: &[(u64, u64, u64)],
    blocks: u64,
) -> Result<(), String> {
    let bs = 512usize;
    let disk = b.nvme()[drive].disk_read(1, 0, blocks as usize * bs);
    for lba in 0..blocks {
        let block = &disk[lba as usize * bs..][..bs];
        let rec = recs.iter().find(|r| r.0 == lba);
        match (keel_jobs::oracle::parse_block(block), rec) {
            (None, None) => {}
            (None, Some(&(_, 0, _))) => {}
            (Some(Ok((l, g))), Some(&(_, acked, max)))
                if l == lba && keel_jobs::oracle::allowed(g, acked, max) => {}
            (got, want) => {
                return Err(format!(
                    "drive {drive} lba {lba}: found {got:?}, record {want:?}"
                ))
            }
        }
    }
    Ok(())
}

#[test]
fn oracle_on_two_drives_and_three_cores_checked_on_the_disks() {
    let b = two_drive_board(3);
    run(&b, "oracle ms=3 blocks=64 qd=8").unwrap();
    // The job's record of acknowledged writes, from the console, against the model's disks;
    // the check can fail: a block rolled back to an older generation is caught.
    check_oracle_run(&b, 3 * 64 + 8, true);
    // The checker itself: a torn block and a stale generation are caught.
    let mut blk = [0u8; 512];
    keel_jobs::oracle::make_block(&mut blk, 7, 3, 0, 0);
    assert_eq!(keel_jobs::oracle::parse_block(&blk), Some(Ok((7, 3))));
    assert!(!keel_jobs::oracle::allowed(2, 3, 3), "stale after ack");
    assert!(
        keel_jobs::oracle::allowed(4, 3, 5),
        "a failed later write may have landed"
    );
    blk[300] ^= 1;
    assert!(matches!(keel_jobs::oracle::parse_block(&blk), Some(Err(_))));
}

/// `(drive, lba, acked, max)` from the oracle's console record.
fn oracle_record(console: &[String]) -> Vec<(usize, u64, u64, u64)> {
    console
        .iter()
        .filter_map(|l| l.strip_prefix("oracle block "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
                .collect();
            (v[0] as usize, v[1], v[2], v[3])
        })
        .collect()
}

/// The `zone` job on the model: a zoned namespace beside a plain one; the records land at the
/// LBAs the job printed, byte for byte (the host-side check QEMU's case does on the image).
#[test]
fn zone_job_on_a_zoned_namespace() {
    let dma = HostDma::new();
    let nvme = NvmeModel::new(
        ModelConfig {
            namespaces: vec![
                NsConfig {
                    nsid: 1,
                    blocks: 4096,
                    lba_shift: 9,
                },
                NsConfig {
                    nsid: 2,
                    blocks: 8 * 128,
                    lba_shift: 12,
                },
            ],
            ..ModelConfig::default()
        },
        dma.clone(),
    );
    nvme.set_zoned(
        2,
        keel_model::ZoneConfig {
            zone_blocks: 128,
            capacity: 128,
            max_open: 0,
        },
    );
    let b = ModelBoard::new(1, dma, vec![nvme.clone()]);
    run(&b, "zone records=6 blocks=3").expect("zone job");
    assert_eq!(nvme.zones(2)[1], (0xE, 256), "zone 1 left full");
    assert_eq!(nvme.zones(2)[2], (0x1, 256), "zone 2 reset");
    let want = |ns: u32, k: u32, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| keel_jobs::zone::record_byte(0, ns, k, i))
            .collect()
    };
    assert_eq!(nvme.disk_read(1, 0, 512), want(1, 0, 512));
    let mut slots = Vec::new();
    for k in 0..6u32 {
        let lba = 128 + 3 * k as usize;
        let got = nvme.disk_read(2, lba * 4096, 3 * 4096);
        let k_at = u32::from_le_bytes(got[10..14].try_into().unwrap());
        assert_eq!(got, want(2, k_at, 3 * 4096), "record at lba {lba}");
        slots.push(k_at);
    }
    slots.sort();
    assert_eq!(slots, [0, 1, 2, 3, 4, 5]);
}

/// The oracle with its recovery worker on two drives of the model, drive 0 faulted mid-run:
/// `held` of its reads and writes (after the first `after`) never complete, so they time out.
/// Returns the board; the job itself checks every read and that every handle came back.
fn oracle_under_faults(line: &'static str, after: u64, held: u32, aborts_work: bool) -> ModelBoard {
    let dma = HostDma::new();
    let nvme: Vec<_> = (0..2).map(|_| NvmeModel::new(big(), dma.clone())).collect();
    nvme[0].hold_io_after(after, held);
    nvme[0].set_abort(aborts_work, 3);
    let b = ModelBoard::new(3, dma, nvme);
    run(&b, line).unwrap_or_else(|e| panic!("{line}: {e}"));
    // Host side, block by block: each drive's disk holds what the record allows; the check
    // can fail on this run's disk (a block rolled back one generation is caught).
    check_oracle_run(&b, 2 * 64 + 8, true);
    b
}

/// Aborts (0x08) and Delete I/O SQs (0x00) the drive saw; a fault-free run deletes its two
/// pollers' queues once, at the end.
fn aborts_and_sq_deletes(b: &ModelBoard, d: usize) -> (u64, u64) {
    (
        b.nvme()[d].admin_commands(0x08),
        b.nvme()[d].admin_commands(0x00),
    )
}

#[test]
fn oracle_with_worker_through_timeouts_with_aborts_refused_and_a_fatal_controller() {
    // Held commands time out; the model refuses every Abort, so the worker resets the queue
    // pairs; 40 ms in it makes drive 0 fatal, so the worker resets the controller.
    let b = oracle_under_faults(
        "oracle ms=80 blocks=64 qd=8 cores=2 worker=on io_timeout_ms=5 fatal_ms=40",
        300,
        3,
        false,
    );
    let (aborts, deletes) = aborts_and_sq_deletes(&b, 0);
    assert!(aborts > 0, "no Abort sent");
    assert!(deletes > 2, "no queue-pair reset: {deletes} SQ deletes");
    assert!(b.nvme()[0].controller_resets() >= 1, "no controller reset");
    assert_eq!(b.nvme()[0].held(), 0, "held commands left after the reset");
    // The healthy drive went on untouched by recovery.
    assert_eq!(aborts_and_sq_deletes(&b, 1), (0, 2));
    assert_eq!(b.nvme()[1].controller_resets(), 0);
}

#[test]
fn oracle_with_worker_through_timeouts_with_aborts_honoured() {
    // The model aborts each held command it is asked to: aborts alone recover, no queue pair
    // or controller is reset.
    let b = oracle_under_faults(
        "oracle ms=60 blocks=64 qd=8 cores=2 worker=on io_timeout_ms=5",
        300,
        3,
        true,
    );
    let (aborts, deletes) = aborts_and_sq_deletes(&b, 0);
    assert!(aborts >= 3, "{aborts} Aborts for 3 held commands");
    assert_eq!(
        deletes, 2,
        "a queue pair was reset though the aborts worked"
    );
    assert_eq!(b.nvme()[0].controller_resets(), 0);
    assert_eq!(b.nvme()[0].held(), 0);
}

#[test]
fn oracle_with_worker_through_a_burst_of_timeouts_with_aborts_refused() {
    // Held commands, every Abort refused, no fatal status: queue-pair resets recover, the
    // controller is never reset.
    let b = oracle_under_faults(
        "oracle ms=60 blocks=64 qd=8 cores=2 worker=on io_timeout_ms=5",
        200,
        12,
        false,
    );
    let (aborts, deletes) = aborts_and_sq_deletes(&b, 0);
    assert!(aborts > 0, "no Abort sent");
    assert!(deletes > 2, "no queue-pair reset: {deletes} SQ deletes");
    assert_eq!(
        b.nvme()[0].controller_resets(),
        0,
        "escalated past the queue pair"
    );
    assert_eq!(b.nvme()[0].held(), 0);
}

/// `nschange` on the model: namespace 2 starts detached; the job attaches it while core 1
/// writes namespace 1, sees the notice and the rescan add it, writes and verifies it, detaches
/// it, and I/O to it is refused typed. Checked from outside on the model's disks: namespace 2
/// holds the pattern exactly where it was written (zeroes around it), namespace 1 core 1's
/// pattern (zeroes around it).
#[test]
fn nschange_attaches_writes_and_detaches_while_ns1_works() {
    let dma = HostDma::new();
    let ns = |nsid| NsConfig {
        nsid,
        blocks: 8192,
        lba_shift: 9,
    };
    let nvme = NvmeModel::new(
        ModelConfig {
            namespaces: vec![ns(1), ns(2)],
            max_io_queues: 8,
            ..ModelConfig::default()
        },
        dma.clone(),
    );
    nvme.start_detached(2);
    let b = ModelBoard::new(2, dma, vec![nvme]);
    run(&b, "nschange writes=8 blocks=16 lba=2048 ns1_blocks=64").unwrap();
    let m = &b.nvme()[0];
    let seed = 0x6e73_6368;
    let holds = |nsid: u32, from: u64, n: u64| {
        (from..from + n).all(|lba| {
            let blk = m.disk_read(nsid, lba as usize * 512, 512);
            (0..512).step_by(8).all(|off| {
                blk[off..off + 8] == keel_jobs::storage::pattern(nsid, lba, off, seed).to_le_bytes()
            })
        })
    };
    let zero = |nsid: u32, from: u64, n: u64| {
        m.disk_read(nsid, from as usize * 512, n as usize * 512)
            .iter()
            .all(|&x| x == 0)
    };
    assert!(holds(2, 2048, 8 * 16), "namespace 2 holds the pattern");
    assert!(
        zero(2, 0, 2048) && zero(2, 2048 + 128, 1024),
        "and nothing else"
    );
    assert!(holds(1, 2048, 64), "namespace 1 holds core 1's pattern");
    assert!(
        zero(1, 0, 2048) && zero(1, 2048 + 64, 1024),
        "and nothing else"
    );
    let c = m.admin_commands(0x15);
    assert_eq!(c, 2, "one attach, one detach");
}

/// The oracle with drive 0 surprise-removed mid-load (`remove_ms`, the model board's
/// `fault_remove`): every tag in flight on it fails once with `Removed`, new work is refused,
/// drive 1 goes on; both disks hold what the record allows.
#[test]
fn oracle_with_drive_0_surprise_removed() {
    let b = two_drive_board(2);
    run(&b, "oracle ms=150 blocks=64 qd=8 remove_ms=20").unwrap();
    check_oracle_run(&b, 2 * 64 + 8, false);
    // Drive 0 saw no command after it was gone.
    assert!(b.nvme()[0].io_commands() < b.nvme()[1].io_commands());
}

/// `zlog` and `zrecover` on the model's zoned namespace: a clean run replays every record; a
/// run with `crash_at` (the model cannot reset, so the job stops there) leaves the log with the
/// records in flight at the crash, and the next `zlog` replays instead of formatting.
#[test]
fn zlog_and_zrecover_on_a_zoned_namespace() {
    let zoned = || {
        let dma = HostDma::new();
        let nvme = NvmeModel::new(
            ModelConfig {
                namespaces: vec![NsConfig {
                    nsid: 1,
                    blocks: 16 * 256,
                    lba_shift: 9,
                }],
                ..ModelConfig::default()
            },
            dma.clone(),
        );
        nvme.set_zoned(
            1,
            keel_model::ZoneConfig {
                zone_blocks: 256,
                capacity: 256,
                max_open: 0,
            },
        );
        (ModelBoard::new(1, dma, vec![nvme.clone()]), nvme)
    };
    let (b, nvme) = zoned();
    run(&b, "zlog records=200 sync_every=7").expect("zlog");
    assert!(
        nvme.zones(1).iter().filter(|z| z.0 != 0x1).count() >= 2,
        "the log rolled over zones"
    );
    run(&b, "zrecover expect=200").expect("zrecover");
    assert!(run(&b, "zrecover expect=201").is_err());

    let (b, _) = zoned();
    let e = run(&b, "zlog records=200 crash_at=50 burst=8").unwrap_err();
    assert_eq!(e.to_string(), "zlog: the board cannot reset the machine");
    // No volatile cache here: all 59 appended records (0..=58) are on the disk.
    run(&b, "zrecover expect=59").expect("zrecover");
    assert!(run(&b, "zrecover expect=60").is_err());
    // The next zlog replays them and goes on to 200.
    run(&b, "zlog records=200 crash_at=50 burst=8").expect("the second zlog replays");
    run(&b, "zrecover expect=200").expect("zrecover");
    assert!(run(&b, "zrecover expect=201").is_err());
}
