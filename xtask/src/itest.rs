//! `cargo xtask test`: the README's test command and everything CI runs. Host steps (fmt, clippy,
//! unit/property tests, loom models), then QEMU integration tests that boot the real image and
//! assert on its decoded output and exit status. Ends with a results table and a
//! `keel: N passed, N failed` line.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::qemu::{self, Outcome, VmOpts};
use crate::{cargo_cmd, step};

/// Preemption bound for every loom model (each crate's tests/loom.rs says what it covers).
const LOOM_MAX_PREEMPTIONS: &str = "3";

pub fn test_all(with_qemu: bool) -> Result<()> {
    let mut rows: Vec<(String, bool, f64)> = Vec::new();

    let mut c = cargo_cmd();
    c.args(["fmt", "--all", "--", "--check"]);
    let (ok, t) = step("cargo fmt --check", c);
    rows.push(("cargo fmt --check".into(), ok, t));

    // The default members are every host-testable crate and xtask. The firmware is linted on its
    // own: a bare-metal binary has no test harness, and building it together with host crates
    // would unify features (e.g. `bitflags/std`) into it.
    let mut c = cargo_cmd();
    c.args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]);
    let (ok1, t1) = step("cargo clippy --all-targets -- -D warnings", c);
    let mut c = cargo_cmd();
    c.args([
        "clippy", "-p", "keel-fw", "--bins", "--quiet", "--", "-D", "warnings",
    ]);
    let (ok2, t2) = step("cargo clippy -p keel-fw --bins -- -D warnings", c);
    rows.push((
        "cargo clippy -D warnings (crates, xtask, firmware)".into(),
        ok1 && ok2,
        t1 + t2,
    ));

    let mut c = cargo_cmd();
    c.args(["test"]);
    let (ok, t) = step(
        "cargo test --workspace (host unit, property and model tests)",
        c,
    );
    rows.push(("host tests".into(), ok, t));
    rows.extend(crate::fuzz::test_steps(25));

    for (pkg, dir) in loom_crates() {
        let mut c = cargo_cmd();
        c.args(["test", "--release", "-p", &pkg, "--test", "loom"])
            .env("RUSTFLAGS", "--cfg loom")
            .env("LOOM_MAX_PREEMPTIONS", LOOM_MAX_PREEMPTIONS)
            .env(
                "CARGO_TARGET_DIR",
                crate::root().join("target").join("loom"),
            );
        let name = format!("loom {pkg} (preemption bound {LOOM_MAX_PREEMPTIONS})");
        let (ok, t) = step(&name, c);
        let _ = dir;
        rows.push((name, ok, t));
    }

    let mut qemu_rows = Vec::new();
    if with_qemu {
        let t = Instant::now();
        match qemu::ensure_qemu().and_then(|_| crate::build_firmware()) {
            Ok(fw) => {
                rows.push(("firmware build".into(), true, t.elapsed().as_secs_f64()));
                qemu_rows = qemu_tests(&fw)?;
            }
            Err(e) => {
                eprintln!("xtask: {e:#}");
                rows.push((
                    "firmware build / QEMU".into(),
                    false,
                    t.elapsed().as_secs_f64(),
                ));
            }
        }
    }

    println!();
    println!("{:<58} {:>6} {:>9}", "step", "result", "seconds");
    println!("{:-<58} {:->6} {:->9}", "", "", "");
    for (n, ok, t) in &rows {
        println!("{n:<58} {:>6} {t:>9.1}", if *ok { "ok" } else { "FAIL" });
    }
    let passed = rows.iter().filter(|r| r.1).count() + qemu_rows.iter().filter(|r| **r).count();
    let failed = rows.iter().filter(|r| !r.1).count() + qemu_rows.iter().filter(|r| !**r).count();
    println!();
    println!("keel: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

/// Crates with a `tests/loom.rs`, as (package name, directory).
fn loom_crates() -> Vec<(String, std::path::PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(crate::root().join("crates")) else {
        return out;
    };
    let mut dirs: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    dirs.sort();
    for d in dirs {
        if !d.join("tests/loom.rs").is_file() {
            continue;
        }
        let toml = std::fs::read_to_string(d.join("Cargo.toml")).unwrap_or_default();
        if let Some(name) = toml.lines().find_map(|l| {
            l.trim()
                .strip_prefix("name = ")
                .map(|n| n.trim_matches('"').to_string())
        }) {
            out.push((name, d));
        }
    }
    out
}

type Check = (&'static str, Box<dyn Fn(&Outcome) -> bool>);
/// A named check that needs no captured state.
type PlainCheck = (&'static str, fn(&Outcome) -> bool);

struct Case {
    name: String,
    vm: VmOpts,
    cmdline: &'static str,
    expect_pass: bool,
    expect_timeout: bool,
    checks: Vec<Check>,
}

fn case(
    name: impl Into<String>,
    vm: VmOpts,
    cmdline: &'static str,
    expect_pass: bool,
    checks: Vec<PlainCheck>,
) -> Case {
    let checks = checks
        .into_iter()
        .map(|(n, f)| (n, Box::new(f) as Box<dyn Fn(&Outcome) -> bool>))
        .collect();
    Case {
        name: name.into(),
        vm,
        cmdline,
        expect_pass,
        expect_timeout: false,
        checks,
    }
}

fn cores_online(o: &Outcome, n: usize) -> bool {
    o.has(&format!("cores online: {n} of {n}"))
        && o.count("entering its poll loop") == n - 1
        && o.count("ran work from its poll loop") == n - 1
}

fn timer_fired(o: &Outcome) -> bool {
    o.log
        .iter()
        .filter_map(|l| l.split("timer ticks in ").nth(1))
        .filter_map(|r| r.rsplit(": ").next())
        .any(|n| n.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false))
}

fn cases() -> Vec<Case> {
    let vm = |smp| VmOpts {
        smp,
        timeout: 60,
        ..VmOpts::default()
    };
    let mut v = vec![
        case(
            "boot, 1 core",
            vm(1),
            "boot",
            true,
            vec![
                ("1 of 1 cores online", |o| cores_online(o, 1)),
                ("timer fired", timer_fired),
                ("NVMe found on PCI", |o| {
                    o.has("class 01:08:02") && o.has(" nvme")
                }),
            ],
        ),
        case(
            "boot, 2 cores",
            vm(2),
            "boot",
            true,
            vec![
                ("2 of 2 cores online, each ran work", |o| cores_online(o, 2)),
                ("timer fired", timer_fired),
            ],
        ),
        case(
            "boot, 4 cores",
            vm(4),
            "boot",
            true,
            vec![
                ("4 of 4 cores online, each ran work", |o| cores_online(o, 4)),
                ("timer fired", timer_fired),
            ],
        ),
        case(
            "boot on -machine pc with SeaBIOS",
            VmOpts {
                machine: qemu::Machine::Pc,
                seabios: true,
                ..vm(2)
            },
            "boot",
            true,
            vec![
                ("2 of 2 cores online", |o| cores_online(o, 2)),
                ("NVMe found", |o| o.has(" nvme")),
            ],
        ),
        case(
            "fault: ud2",
            vm(1),
            "fault kind=ud2",
            false,
            vec![("#UD reported (vector 6)", |o| {
                o.has("exception vector=6 (invalid opcode)") && o.has("rip=0x")
            })],
        ),
        case(
            "fault: unmapped page",
            vm(1),
            "fault kind=pf",
            false,
            vec![("#PF reported with CR2", |o| {
                o.has("exception vector=14 (page fault)") && o.has("cr2=0x4000000000")
            })],
        ),
        case(
            "fault: #GP",
            vm(1),
            "fault kind=gp",
            false,
            vec![("#GP reported (vector 13)", |o| {
                o.has("exception vector=13 (general protection)")
            })],
        ),
        case(
            "unknown option",
            vm(1),
            "boot bogus=1",
            false,
            vec![("names the option", |o| o.has("unknown option 'bogus'"))],
        ),
        case(
            "unknown job",
            vm(1),
            "frobnicate",
            false,
            vec![
                ("names the job", |o| o.has("unknown job 'frobnicate'")),
                ("lists the jobs", |o| o.has("  boot")),
            ],
        ),
        case(
            "malformed option",
            vm(1),
            "boot wait_ms=soon",
            false,
            vec![("says what was expected", |o| {
                o.has("option wait_ms=soon: expected an integer")
            })],
        ),
        case(
            "panic",
            vm(2),
            "panic msg=keel-test-panic",
            false,
            vec![("message reported via defmt", |o| {
                o.log
                    .iter()
                    .any(|l| l.contains("panic on core 0") && l.contains("keel-test-panic"))
            })],
        ),
    ];
    v.push(Case {
        name: "hang is killed at the timeout".into(),
        vm: VmOpts {
            smp: 1,
            timeout: 4,
            ..VmOpts::default()
        },
        cmdline: "hang",
        expect_pass: false,
        expect_timeout: true,
        checks: vec![(
            "job started before the hang",
            Box::new(|o: &Outcome| o.has("job hang: start")),
        )],
    });
    v
}

/// Boots every case; prints a table; returns one bool per case.
fn qemu_tests(fw: &Path) -> Result<Vec<bool>> {
    let work = crate::work_dir();
    std::fs::create_dir_all(&work)?;
    let (accel, why) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    eprintln!("xtask: ── QEMU integration tests, accelerator: {why} ──");
    let mut cases = cases();
    cases.extend(nvme_cases(&work)?);
    let mut results = Vec::new();
    let mut table = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        qemu::progress(
            false,
            &format!("xtask: [{}/{}] {}", i + 1, cases.len(), c.name),
        );
        let vm = VmOpts {
            accel,
            ..c.vm.clone()
        };
        let out = qemu::run(fw, &vm, c.cmdline, &work, qemu::Verbosity::Quiet)?;
        let status_ok = if c.expect_timeout {
            out.timed_out
        } else {
            out.passed() == c.expect_pass && !out.timed_out
        };
        let mut failed_checks = vec![];
        for (what, f) in &c.checks {
            if !f(&out) {
                failed_checks.push(*what);
            }
        }
        let ok = status_ok && failed_checks.is_empty();
        if !ok {
            eprintln!(
                "xtask: case '{}' failed (status {}, failed checks {:?}); its output:",
                c.name,
                out.verdict(),
                failed_checks
            );
            for l in out.all_lines() {
                eprintln!("    {l}");
            }
        }
        let expected = if c.expect_timeout {
            "timeout"
        } else if c.expect_pass {
            "pass"
        } else {
            "fail"
        };
        let checks = format!(
            "{}/{}",
            c.checks.len() - failed_checks.len(),
            c.checks.len()
        );
        let boot = out
            .boot_time
            .map(|t| format!("{:.0}", t.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into());
        table.push((
            c.name.clone(),
            c.cmdline,
            expected,
            out.verdict(),
            checks,
            boot,
            out.wall.as_secs_f64(),
            ok,
        ));
        results.push(ok);
    }
    println!();
    println!("QEMU integration tests ({why})");
    println!(
        "{:<34} {:<26} {:<8} {:<24} {:>6} {:>8} {:>6} {:>5}",
        "case", "command line", "expect", "got", "checks", "boot ms", "wall s", "ok"
    );
    println!(
        "{:-<34} {:-<26} {:-<8} {:-<24} {:->6} {:->8} {:->6} {:->5}",
        "", "", "", "", "", "", "", ""
    );
    for (n, cl, e, g, ch, b, w, ok) in &table {
        println!(
            "{n:<34} {cl:<26} {e:<8} {g:<24} {ch:>6} {b:>8} {w:>6.2} {:>5}",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    println!(
        "qemu: {} passed, {} failed",
        results.iter().filter(|r| **r).count(),
        results.iter().filter(|r| !**r).count()
    );
    Ok(results)
}

/// Writes `len` bytes of deterministic pseudo-random data to `path`; returns their CRC32C.
fn random_image(path: &Path, len: usize) -> Result<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut data = vec![0u8; len];
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, &data)?;
    Ok(crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&data))
}

/// The storage cases: the driver against QEMU's real NVMe emulation, on several device shapes.
fn nvme_cases(work: &Path) -> Result<Vec<Case>> {
    let vm = |smp| VmOpts {
        smp,
        timeout: 120,
        ..VmOpts::default()
    };
    let mut v = vec![
        case(
            "selftest: 512 B LBAs, MDTS 512 KiB",
            vm(1),
            "selftest",
            true,
            vec![
                ("all shapes verified", shapes_ok),
                ("1 namespace", |o| o.has("checks passed on 1 namespaces")),
                ("no bad completions", |o| o.has("stale_cid: 0, bad_cid: 0")),
            ],
        ),
        case(
            "selftest: 4K LBAs, 3 ns, MDTS 16K, dbbuf",
            VmOpts {
                namespaces: 3,
                lba_size: 4096,
                mdts: 2,
                ..vm(2)
            },
            "selftest dbbuf=on",
            true,
            vec![
                ("3 namespaces verified", |o| {
                    o.has("checks passed on 3 namespaces") && o.count("| ok") >= 24
                }),
                ("shadow doorbells in use", |o| {
                    o.has("shadow doorbells true")
                }),
                ("split at 16 KiB", |o| o.has("max transfer 16 KiB")),
            ],
        ),
        case(
            "selftest: write cache off, 4 cores",
            VmOpts {
                write_cache: "off".into(),
                ..vm(4)
            },
            "selftest",
            true,
            vec![
                ("no volatile cache reported", |o| {
                    o.has("volatile write cache false")
                }),
                ("all shapes verified", shapes_ok),
            ],
        ),
        case(
            "selftest: -machine pc, SeaBIOS",
            VmOpts {
                machine: qemu::Machine::Pc,
                seabios: true,
                ..vm(1)
            },
            "selftest",
            true,
            vec![("all shapes verified", shapes_ok)],
        ),
        case(
            "bench: 4K randwrite QD32, 1 s",
            VmOpts {
                null_backend: true,
                ..vm(1)
            },
            "bench pattern=randwrite bs=4K qd=32 secs=1",
            true,
            vec![("I/Os counted, no errors", |o| {
                o.has("errors=0 cores=1") && !o.has("bench total iops=0 ")
            })],
        ),
        case(
            "bench: 2 cores, own queue pairs",
            VmOpts {
                null_backend: true,
                ..vm(2)
            },
            "bench pattern=randread bs=4K qd=8 secs=1 cores=2",
            true,
            vec![("both cores ran", |o| {
                o.has("bench core=0") && o.has("bench core=1") && o.has("errors=0 cores=2")
            })],
        ),
        case(
            "reactor: 4 cores, handoff + shutdown mid-I/O",
            vm(4),
            "reactor ios=2000 qd=16",
            true,
            vec![
                ("submitted == completed + failed", |o| {
                    o.has(": true; I/O handles back in the array: 512 of 512")
                }),
                ("3 queue pairs deleted exactly once", |o| {
                    o.has("queue pairs deleted: 3 of 3")
                }),
                ("handoff with I/O in flight", |o| {
                    o.has("core 1: handed its queue pair to core 3")
                        && o.has("adopted core 1's queue pair")
                }),
                ("shutdown with I/O in flight", |o| {
                    o.has("core 2: shut its queue pair down")
                }),
                ("every core issued and got every answer", |o| {
                    (0..4).all(|c| {
                        o.log
                            .iter()
                            .any(|l| l.contains(&format!("INFO {c} | 2000 |")))
                    })
                }),
            ],
        ),
        case(
            "reactor: 2 cores",
            vm(2),
            "reactor ios=1000",
            true,
            vec![("invariants hold", |o| {
                o.has(": true; I/O handles back in the array: 512 of 512")
                    && o.has("queue pairs deleted: 2 of 2")
            })],
        ),
        case(
            "bench: bad option value",
            vm(1),
            "bench qd=lots",
            false,
            vec![("names the option", |o| {
                o.has("option qd=lots: expected an integer")
            })],
        ),
    ];
    // scrub: the driver's reads against the host's view of the same image.
    let img = work.join("scrub-src.img");
    let crc = random_image(&img, 8 << 20)?;
    let want = format!("crc32c={crc:08x}");
    v.push(Case {
        name: "scrub: CRC32C matches the host's".into(),
        vm: VmOpts {
            disk: Some(img),
            ..vm(1)
        },
        cmdline: "scrub ns=1 lba=0 blocks=16384",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![(
            "crc32c equal to the image's",
            Box::new(move |o: &Outcome| o.has(&want)),
        )],
    });
    Ok(v)
}

fn shapes_ok(o: &Outcome) -> bool {
    o.count("| ok") >= 8 && !o.has("FAILED")
}
