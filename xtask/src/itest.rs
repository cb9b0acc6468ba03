//! `cargo xtask test`: the README's test command and everything CI runs. Host steps (fmt, clippy,
//! unit/property tests, loom models), then QEMU integration tests that boot the real image and
//! assert on its decoded output and exit status. Ends with a results table and a
//! `keel: N passed, N failed` line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::qemu::{self, Outcome, VmOpts};
use crate::{cargo_cmd, step};

mod zwal;

/// Preemption bound for every loom model (each crate's tests/loom.rs says what it covers).
const LOOM_MAX_PREEMPTIONS: &str = "3";

/// A step's result. A skipped step (a tool it needs is missing; its name says why) counts as
/// neither passed nor failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ran and passed.
    Ok,
    /// Ran and failed.
    Fail,
    /// Did not run.
    Skipped,
}

impl Verdict {
    /// The results table's word for it.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "skipped",
        }
    }
}

impl From<bool> for Verdict {
    fn from(ok: bool) -> Self {
        if ok {
            Verdict::Ok
        } else {
            Verdict::Fail
        }
    }
}

pub fn test_all(with_qemu: bool, crash_states_per_gap: usize) -> Result<()> {
    let mut rows: Vec<(String, Verdict, f64)> = Vec::new();

    let mut c = cargo_cmd();
    c.args(["fmt", "--all", "--", "--check"]);
    let (ok, t) = step("cargo fmt --check", c);
    rows.push(("cargo fmt --check".into(), ok.into(), t));

    // The default members are every host-testable crate and xtask. The firmware is linted on its
    // own: a bare-metal binary has no test harness, and building it together with host crates
    // would unify features (e.g. `bitflags/std`) into it.
    let mut c = cargo_cmd();
    c.args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]);
    let (ok1, t1) = step("cargo clippy --all-targets -- -D warnings", c);
    let mut c = cargo_cmd();
    let pkg = &crate::board::get().package;
    c.args([
        "clippy", "-p", pkg, "--lib", "--bins", "--quiet", "--", "-D", "warnings",
    ]);
    let (ok2, t2) = step(
        &format!("cargo clippy -p {pkg} --lib --bins -- -D warnings"),
        c,
    );
    rows.push((
        "cargo clippy -D warnings (crates, xtask, firmware)".into(),
        (ok1 && ok2).into(),
        t1 + t2,
    ));

    let mut c = cargo_cmd();
    c.args(["test"]);
    let (ok, t) = step(
        "cargo test --workspace (host unit, property and model tests)",
        c,
    );
    rows.push(("host tests".into(), ok.into(), t));
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
        rows.push((name, ok.into(), t));
    }

    let mut qemu_rows = Vec::new();
    if with_qemu {
        let t = Instant::now();
        match qemu::ensure_qemu().and_then(|_| crate::build_firmware()) {
            Ok(fw) => {
                rows.push((
                    "firmware build".into(),
                    Verdict::Ok,
                    t.elapsed().as_secs_f64(),
                ));
                let t = Instant::now();
                for (name, ok) in crate::flash::self_check(&fw) {
                    rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
                }
                qemu_rows = qemu_tests(&fw)?;
                let t = Instant::now();
                let (name, ok) = powercut_replay_check(&fw);
                rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
                let t = Instant::now();
                let (name, ok) = powercut_wal_check(&fw, crash_states_per_gap.max(1));
                rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
                let t = Instant::now();
                let (name, ok) = kill_and_recover_check(&fw);
                rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
                let t = Instant::now();
                let (name, ok) = log_write_error_check(&fw);
                rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
                // Last: it rebuilds the firmware without the lab jobs.
                let t = Instant::now();
                let (name, ok) = appliance_check();
                rows.push((name, ok.into(), t.elapsed().as_secs_f64()));
            }
            Err(e) => {
                eprintln!("xtask: {e:#}");
                rows.push((
                    "firmware build / QEMU".into(),
                    Verdict::Fail,
                    t.elapsed().as_secs_f64(),
                ));
            }
        }
    }

    println!();
    println!("{:<58} {:>7} {:>9}", "step", "result", "seconds");
    println!("{:-<58} {:->7} {:->9}", "", "", "");
    for (n, v, t) in &rows {
        println!("{n:<58} {:>7} {t:>9.1}", v.word());
    }
    let count = |v: Verdict| rows.iter().filter(|r| r.1 == v).count();
    let passed = count(Verdict::Ok) + qemu_rows.iter().filter(|r| **r).count();
    let failed = count(Verdict::Fail) + qemu_rows.iter().filter(|r| !**r).count();
    let skipped = count(Verdict::Skipped);
    println!();
    println!("keel: {passed} passed, {failed} failed, {skipped} skipped");
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

/// The oracle's host check of two drives' images: every block as the record says, and more
/// than `min` blocks checked.
fn oracle_row(w: std::path::PathBuf, bs: u32, min: usize) -> Check {
    (
        "every block as the record says (host)",
        Box::new(
            move |o: &Outcome| match oracle_check(&w, o, 2, bs as usize) {
                Ok(n) => n > min,
                Err(e) => {
                    eprintln!("xtask: oracle check: {e}");
                    false
                }
            },
        ),
    )
}
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
            "critical sections exclude all cores",
            vm(4),
            "cs iters=100000",
            true,
            vec![
                ("no increment lost on 4 cores", |o| {
                    o.has("= 400000 (expected 400000)")
                }),
                ("interrupts restored", |o| {
                    o.has("interrupts left masked 0 times")
                }),
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
            vec![
                ("names the option", |o| o.has("unknown option 'bogus'")),
                ("lists what the job takes", |o| {
                    o.has("job 'boot' takes: wait_ms")
                }),
            ],
        ),
        case(
            "value outside the choices",
            vm(1),
            "fault kind=bogus",
            false,
            vec![("lists the choices", |o| {
                o.has("option kind=bogus: expected one of ud2, pf, gp")
            })],
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
    v.extend(flash_cases(vm(2)));
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

// ---- flash image boots (issue 7); images are written by `prepare_flash_images` ----

fn flash_image(which: &str) -> std::path::PathBuf {
    crate::work_dir().join(format!("itest-flash-{which}.bin"))
}

/// Writes the images the flash cases boot: a good one (job `boot`) and one with a flipped byte.
fn prepare_flash_images(fw: &Path) -> Result<()> {
    let good = flash_image("good");
    crate::flash::make(fw, "boot", &good, true)?;
    crate::flash::make_sized(fw, "boot", &flash_image("1m"), true, Some(1 << 20))?;
    let image = std::fs::read(&good)?;
    let bad = crate::flash::corrupt_copy(&image)
        .ok_or_else(|| anyhow::anyhow!("no banner text in the image to corrupt"))?;
    std::fs::write(flash_image("corrupt"), bad)?;
    Ok(())
}

fn from_flash(o: &Outcome) -> bool {
    o.has("booted from flash image at 0xfff") && o.has("crc ok")
}

fn flash_cases(base: VmOpts) -> Vec<Case> {
    let flash = |which: &str, machine, smp| VmOpts {
        flash_image: Some(flash_image(which)),
        machine,
        smp,
        ..base.clone()
    };
    vec![
        case(
            "flash boot, q35, 2 cores",
            flash("good", qemu::Machine::Q35, 2),
            "boot",
            true,
            vec![
                ("booted from flash, CRC ok", from_flash),
                ("2 of 2 cores online, each ran work", |o| cores_online(o, 2)),
                ("timer fired", timer_fired),
            ],
        ),
        case(
            "flash boot, -machine pc, 2 cores",
            flash("good", qemu::Machine::Pc, 2),
            "boot",
            true,
            vec![
                ("booted from flash, CRC ok", from_flash),
                ("2 of 2 cores online, each ran work", |o| cores_online(o, 2)),
                ("timer fired", timer_fired),
                ("NVMe found", |o| o.has(" nvme")),
            ],
        ),
        case(
            "flash boot as pflash drive, q35",
            VmOpts {
                pflash: true,
                ..flash("good", qemu::Machine::Q35, 1)
            },
            "boot",
            true,
            vec![
                ("booted from flash, CRC ok", from_flash),
                ("1 of 1 cores online", |o| cores_online(o, 1)),
            ],
        ),
        case(
            "flash boot, 1 MiB image, pc",
            flash("1m", qemu::Machine::Pc, 1),
            "boot",
            true,
            vec![
                ("booted from a 1 MiB image", |o| {
                    o.has("booted from flash image at 0xfff00000: 1048576 bytes") && o.has("crc ok")
                }),
                ("1 of 1 cores online", |o| cores_online(o, 1)),
            ],
        ),
        case(
            "flash image, one byte flipped",
            flash("corrupt", qemu::Machine::Q35, 1),
            "boot",
            false,
            vec![
                ("CRC mismatch on COM1", |o| {
                    o.console
                        .iter()
                        .any(|l| l.contains("flash image rejected: image CRC mismatch"))
                }),
                ("CRC mismatch via defmt", |o| {
                    o.log
                        .iter()
                        .any(|l| l.contains("flash image rejected: image CRC mismatch"))
                }),
                ("no job started", |o| !o.has("job boot: start")),
                ("failure exit via isa-debug-exit (status 35)", |o| {
                    o.status == Some(35)
                }),
            ],
        ),
        case(
            "flash: fw_cfg cmdline override",
            VmOpts {
                fw_cfg_cmdline: Some("boot wait_ms=soon".into()),
                ..flash("good", qemu::Machine::Q35, 1)
            },
            "boot wait_ms=soon",
            false,
            vec![("override reached the job parser", |o| {
                o.has("option wait_ms=soon: expected an integer")
            })],
        ),
    ]
}

/// The guest's own clock (defmt timestamp: TSC since machine reset) at the job's first line.
fn guest_start_ms(o: &Outcome) -> Option<f64> {
    let l = o.log.iter().find(|l| l.contains("job boot: start"))?;
    l.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|s| s * 1e3)
}

/// Boot-to-first-line of the flash path next to the PVH path's (same machine and cores): as the
/// host sees it (QEMU spawn to the line; includes QEMU's own start-up) and as the guest's TSC does.
fn print_boot_times(table: &[(String, Option<f64>, Option<f64>)]) {
    let get = |n: &str| table.iter().find(|r| r.0 == n);
    let fmt = |t: Option<f64>| t.map_or("n/a".into(), |t| format!("{t:.0} ms"));
    let (pvh, flash) = (get("boot, 2 cores"), get("flash boot, q35, 2 cores"));
    println!(
        "boot to the job's first line, q35, 2 cores: PVH (-kernel, qboot) {} ({} after reset), flash (-bios image) {} ({} after reset)",
        fmt(pvh.and_then(|r| r.1)),
        fmt(pvh.and_then(|r| r.2)),
        fmt(flash.and_then(|r| r.1)),
        fmt(flash.and_then(|r| r.2)),
    );
}

/// Boots every case; prints a table; returns one bool per case.
/// `cargo xtask cases FILTER`: builds the firmware and runs only the QEMU cases whose name
/// contains `filter` (for working on one part; `cargo xtask test` runs them all), and the
/// appliance image's check when `filter` is part of its name.
/// The data oracle under faults with the worker core (also `cargo xtask soak`).
pub const FAULT_ORACLE: &str = "oracle: timeouts on 2 pollers and a fatal controller; worker core aborts, resets queue pairs and the controller; host checks every block";
/// The same on 4 KiB LBAs.
pub const FAULT_ORACLE_4K: &str = "oracle: 4 KiB LBAs, timeouts on 2 pollers and a fatal controller; worker core recovers; host checks every block";

pub fn cases_only(filter: &str) -> Result<()> {
    qemu::ensure_qemu()?;
    let fw = crate::build_firmware()?;
    std::env::set_var("KEEL_CASES", filter);
    let mut r = qemu_tests(&fw)?;
    if "appliance image (no lab jobs)".contains(filter) {
        let (name, ok) = appliance_check();
        println!("{name}  {}", if ok { "ok" } else { "FAIL" });
        r.push(ok);
    }
    let failed = r.iter().filter(|ok| !**ok).count();
    println!("keel: {} passed, {failed} failed", r.len() - failed);
    if failed > 0 {
        bail!("{failed} case(s) failed");
    }
    Ok(())
}

fn qemu_tests(fw: &Path) -> Result<Vec<bool>> {
    let work = crate::work_dir();
    std::fs::create_dir_all(&work)?;
    let (accel, why) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    eprintln!("xtask: ── QEMU integration tests, accelerator: {why} ──");
    prepare_flash_images(fw)?;
    let mut cases = cases();
    cases.extend(nvme_cases(&work)?);
    cases.extend(zwal::cases(&work));
    // `cargo xtask cases FILTER`: only the cases whose name contains FILTER.
    if let Ok(f) = std::env::var("KEEL_CASES") {
        cases.retain(|c| c.name.contains(&f));
    }
    let mut results = Vec::new();
    let mut boot_times = Vec::new();
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
        boot_times.push((
            c.name.clone(),
            out.boot_time.map(|t| t.as_secs_f64() * 1e3),
            guest_start_ms(&out),
        ));
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
    print_boot_times(&boot_times);
    println!(
        "qemu: {} passed, {} failed",
        results.iter().filter(|r| **r).count(),
        results.iter().filter(|r| !**r).count()
    );
    Ok(results)
}

/// The `cost` job's rows (`cost | NAME | N ns`) read as numbers: every row parses, names are
/// unique, every top-level row is non-zero, each "of which" breakdown sums to no more than the
/// row above it (the job computes that row as the sum of the parts), and the relations that hold
/// by construction: the reactor's QD1 round trip over a null queue costs more than the null
/// queue's own round trip; a burst of 32 or 4 per pass costs no more per I/O than one at a time.
fn cost_rows_sane(o: &Outcome) -> std::result::Result<(), String> {
    let mut rows: Vec<(String, u64)> = Vec::new();
    for l in &o.log {
        let Some(rest) = l.split("INFO cost | ").nth(1) else {
            continue;
        };
        let (name, v) = rest
            .rsplit_once(" | ")
            .ok_or_else(|| format!("unparsable row {l:?}"))?;
        let v = v
            .strip_suffix(" ns")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("unparsable value in {l:?}"))?;
        rows.push((name.to_string(), v));
    }
    if rows.len() < 40 {
        return Err(format!("{} rows", rows.len()));
    }
    let mut parent: Option<(&str, u64, u64)> = None;
    let check_parent = |p: Option<(&str, u64, u64)>| match p {
        Some((n, total, parts)) if parts > total => Err(format!(
            "{n}: parts sum to {parts} ns, more than the row's {total} ns"
        )),
        _ => Ok(()),
    };
    for (name, v) in &rows {
        if let Some(part) = name.trim_start().strip_prefix("of which ") {
            let p = parent
                .as_mut()
                .ok_or_else(|| format!("'of which {part}' without a row above it"))?;
            p.2 += v;
        } else {
            if *v == 0 {
                return Err(format!("{name}: 0 ns"));
            }
            if rows.iter().filter(|(n, _)| n == name).count() != 1 {
                return Err(format!("{name}: row printed twice"));
            }
            check_parent(parent.take())?;
            parent = Some((name, *v, 0));
        }
    }
    check_parent(parent)?;
    let get = |n: &str| {
        rows.iter()
            .find(|(r, _)| r == n)
            .map(|r| r.1)
            .ok_or_else(|| format!("no row {n:?}"))
    };
    let single = get("reactor: QD1 round trip")?;
    let null = get("null queue: QD1 round trip")?;
    if single <= null {
        return Err(format!(
            "reactor QD1 round trip {single} ns <= the null queue's own {null} ns"
        ));
    }
    for batch in [
        "polled, 32 per pass: reactor (per I/O)",
        "polled, 4 per pass: reactor (per I/O)",
    ] {
        let b = get(batch)?;
        if b > single {
            return Err(format!("{batch} {b} ns > QD1 round trip {single} ns"));
        }
    }
    Ok(())
}

/// The host's own reading of the `reactor` job's results table (`core | issued | ok | failed |
/// submitted here | remote served | completed | failed here | bad tags | lifecycle errs | failed,
/// not aborted`): exactly `cores` rows, each core issued `ios` and got `ios` answers (ok +
/// failed), nothing failed but with `Aborted` (a send refused because its queue pair was gone)
/// and the device failed nothing (failed here, bad tags, lifecycle errors all 0), every submitted I/O
/// completed, and every failure an issuer saw is a request that never reached a device (sum
/// issued - sum failed == sum submitted): the only failures allowed are sends refused because
/// the target's queue pair was gone. With `no_failures` (no handoff or shutdown), failed is 0.
fn reactor_counts_ok(o: &Outcome, cores: usize, ios: u64, no_failures: bool) -> bool {
    let mut rows: Vec<Vec<u64>> = Vec::new();
    for l in &o.log {
        let Some(rest) = l.split(" INFO ").nth(1) else {
            continue;
        };
        let f: Vec<&str> = rest.split(" | ").map(str::trim).collect();
        if f.len() < 11 {
            continue;
        }
        let Ok(v) = f[..11]
            .iter()
            .map(|x| x.parse::<u64>())
            .collect::<Result<Vec<u64>, _>>()
        else {
            continue;
        };
        rows.push(v);
    }
    let say = |m: String| {
        eprintln!("xtask: reactor: {m}");
        false
    };
    if rows.len() != cores || rows.iter().enumerate().any(|(c, r)| r[0] != c as u64) {
        return say(format!("{} result rows, want cores 0..{cores}", rows.len()));
    }
    let sum = |i: usize| rows.iter().map(|r| r[i]).sum::<u64>();
    for r in &rows {
        let [core, issued, ok, failed, _sub, _served, _comp, failed_here, bad_tags, lc, other] =
            r[..]
        else {
            unreachable!()
        };
        if issued != ios || ok + failed != ios {
            return say(format!(
                "core {core}: issued {issued}, ok {ok} + failed {failed}, want {ios}"
            ));
        }
        if failed_here != 0 || bad_tags != 0 || lc != 0 || other != 0 {
            return say(format!(
                "core {core}: device failures {failed_here}, bad tags {bad_tags}, lifecycle {lc}, \
                 failed but not aborted {other}"
            ));
        }
        if no_failures && failed != 0 {
            return say(format!("core {core}: {failed} failed, want 0"));
        }
    }
    if sum(4) != sum(6) {
        return say(format!("submitted {} != completed {}", sum(4), sum(6)));
    }
    if sum(1) - sum(3) != sum(4) {
        return say(format!(
            "issued {} - failed {} != submitted {}: a failure that reached a device, or an I/O \
             counted twice",
            sum(1),
            sum(3),
            sum(4)
        ));
    }
    true
}

/// The host's own count of the `cfs` job's reports: every tag `0..inflight` reported exactly
/// once (no other tag), each Ok, each read's CRC32C equal to the image's block at its LBA.
fn cfs_reports_match(o: &Outcome, image: &[u8], inflight: u32) -> bool {
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut seen = vec![0u32; inflight as usize];
    let mut good = true;
    for l in &o.log {
        let Some(rest) = l.split("cfs report: ").nth(1) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // tag T lba L ok B crc32c C
        let (Some(tag), Some(lba), Some(okf), Some(c)) = (
            f.get(1).and_then(|t| t.parse::<u32>().ok()),
            f.get(3).and_then(|t| t.parse::<usize>().ok()),
            f.get(5),
            f.get(7).and_then(|t| u32::from_str_radix(t, 16).ok()),
        ) else {
            eprintln!("xtask: cfs: unparsable report {l:?}");
            return false;
        };
        let Some(n) = seen.get_mut(tag as usize) else {
            eprintln!("xtask: cfs: unknown tag {tag}");
            return false;
        };
        *n += 1;
        let want = image
            .get(lba * 512..lba * 512 + 512)
            .map(|b| crc.checksum(b));
        if *okf != "true" || want != Some(c) {
            eprintln!("xtask: cfs: tag {tag} lba {lba} ok {okf} crc {c:08x}, image {want:08x?}");
            good = false;
        }
    }
    if let Some((t, n)) = seen.iter().enumerate().find(|(_, n)| **n != 1) {
        eprintln!("xtask: cfs: tag {t} reported {n} times");
        return false;
    }
    good
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
    // Benches measure the driver and QEMU's emulation, not the host's disk.
    let null_vm = |smp| VmOpts {
        null_backend: true,
        ..vm(smp)
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
                ("device: write cache enabled (the default)", |o| {
                    o.has("selftest drive 0: volatile write cache: present true, enabled true")
                }),
                ("flush sent to the device, once", |o| {
                    o.has("selftest drive 0 ns 1 | flush | commands sent to the device 1 (write cache enabled true) | ok")
                }),
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
                // QEMU 7.2 reports VWC present on the controller whatever the namespaces'
                // cache setting; Get Features (Volatile Write Cache) follows write-cache=.
                ("4 of 4 cores online", |o| o.has("cores online: 4 of 4")),
                ("all shapes verified", shapes_ok),
                ("device: write cache disabled", |o| {
                    o.has("selftest drive 0: volatile write cache: present true, enabled false")
                }),
                ("flush still sent to the device, once", |o| {
                    o.has("selftest drive 0 ns 1 | flush | commands sent to the device 1 (write cache enabled false) | ok")
                }),
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
            null_vm(1),
            "bench pattern=randwrite bs=4K qd=32 secs=1",
            true,
            vec![("I/Os counted, no errors", |o| {
                o.has("errors=0 cores=1") && !o.has("bench total iops=0 ")
            })],
        ),
        case(
            "cost: per-primitive table, driver rows included",
            null_vm(1),
            "cost iters=20000",
            true,
            vec![
                ("every row measured", |o| {
                    [
                        "cost | rdtsc |",
                        "cost | critical section (empty) |",
                        "cost | MMIO write (NVMe INTMS = 0) |",
                        "cost | nvme submit (queued, per I/O) |",
                        "cost | nvme reap (per completion) |",
                        "cost | reactor: QD1 round trip |",
                        "cost | mesh: recv, all rings empty |",
                    ]
                    .iter()
                    .all(|r| o.has(r))
                }),
                (
                    "values parse, non-zero, parts within totals, batch <= single",
                    |o| match cost_rows_sane(o) {
                        Ok(()) => true,
                        Err(e) => {
                            eprintln!("xtask: cost: {e}");
                            false
                        }
                    },
                ),
            ],
        ),
        case(
            "bench: full stack and raw interleaved, 1 s",
            null_vm(1),
            "bench pattern=randread bs=4K qd=16 secs=1 raw=both",
            true,
            vec![
                ("all three kinds of rounds ran", |o| {
                    o.has("raw rounds: ios=")
                        && o.has("full stack / raw = ")
                        && o.has("full stack / ceiling = ")
                }),
                ("no errors", |o| o.has("errors=0 cores=1 stack=full")),
            ],
        ),
        case(
            "bench: device ceiling (prebuilt read resubmitted), 1 s",
            null_vm(1),
            "bench pattern=randread bs=4K qd=32 secs=1 raw=ceiling",
            true,
            vec![("I/Os counted, no errors", |o| {
                o.has("errors=0 cores=1 stack=ceiling") && !o.has("bench total iops=0 ")
            })],
        ),
        case(
            "bench: 2 cores, own queue pairs",
            null_vm(2),
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
                    o.has(": true; I/O handles back in the cores' arrays: 512 of 512")
                }),
                (
                    "host: exact counts per core; failures only refused sends",
                    |o| reactor_counts_ok(o, 4, 2000, false),
                ),
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
            vec![
                ("invariants hold", |o| {
                    o.has(": true; I/O handles back in the cores' arrays: 512 of 512")
                        && o.has("queue pairs deleted: 2 of 2")
                }),
                ("host: every core 1000 ok, 0 failed", |o| {
                    reactor_counts_ok(o, 2, 1000, true)
                }),
            ],
        ),
        case(
            "16 cores: every core does I/O on its own queue pair",
            VmOpts {
                memory: 512,
                timeout: 120,
                ..null_vm(16)
            },
            "bench pattern=randread bs=4K qd=4 ms=400 cores=16",
            true,
            vec![("16 cores online, each with I/O", |o| {
                o.has("cores online: 16 of 16")
                    && (0..16).all(|c| o.has(&format!("bench core={c} ios=")))
                    && o.has("errors=0 cores=16")
            })],
        ),
        case(
            "cores numbered apart from APIC ids (2 sockets x 3 cores)",
            VmOpts {
                topology: Some("sockets=2,cores=3".into()),
                ..vm(6)
            },
            "boot wait_ms=10",
            true,
            vec![("core 3 is APIC id 4 (ids from the MADT)", |o| {
                o.has("core 3 online (apic id 4)")
                    && o.has("core 5 online (apic id 6)")
                    && o.has("cores online: 6 of 6")
            })],
        ),
        case(
            "one I/O queue for four cores: reactor",
            VmOpts {
                max_ioqpairs: 1,
                ..vm(4)
            },
            "reactor ios=600 qd=8",
            true,
            vec![
                ("the boot log says who owns the queue", |o| {
                    o.has("nvme 0: 1 I/O queues for 4 cores")
                }),
                ("invariants hold with one queue pair", |o| {
                    o.has(": true; I/O handles back in the cores' arrays: 512 of 512")
                        && o.has("queue pairs deleted: 1 of 1")
                }),
                ("host: every core 600 ok, 0 failed", |o| {
                    reactor_counts_ok(o, 4, 600, true)
                }),
            ],
        ),
        case(
            "one I/O queue for four cores: bench through core 0",
            VmOpts {
                max_ioqpairs: 1,
                ..null_vm(4)
            },
            "bench pattern=randread bs=4K qd=8 secs=1 cores=4",
            true,
            vec![("cores 1-3 send their I/O through core 0", |o| {
                (1..4).all(|c| {
                    o.has(&format!(
                        "bench core={c} (no queue of its own: I/O through core 0)"
                    ))
                }) && !o.has("errors=1")
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
    // blkdebug: QEMU fails exactly these sectors; the scan must name exactly these LBAs.
    let read_conf = work.join("blkdebug-read.conf");
    std::fs::write(&read_conf, "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"1000\"\n\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"5003\"\n")?;
    let write_conf = work.join("blkdebug-write.conf");
    std::fs::write(
        &write_conf,
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"300\"\n",
    )?;
    v.push(case(
        "blkdebug EIO on reads: exact LBAs",
        VmOpts {
            blkdebug: Some(read_conf),
            ..vm(1)
        },
        "scan blocks=8192",
        true,
        vec![
            ("lba 1000 reported", |o| {
                o.has("read error at lba 1000..=1000 (1 blocks)")
            }),
            ("lba 5003 reported", |o| {
                o.has("read error at lba 5003..=5003 (1 blocks)")
            }),
            ("nothing else, scan continued", |o| {
                o.has("read: 2 bad blocks in 2 ranges, the rest ok")
            }),
        ],
    ));
    v.push(case(
        "blkdebug EIO on writes: exact LBAs",
        VmOpts {
            blkdebug: Some(write_conf),
            ..vm(1)
        },
        "scan blocks=4096 write=on",
        true,
        vec![
            ("lba 300 reported", |o| {
                o.has("write error at lba 300..=300 (1 blocks)")
            }),
            ("nothing else, scan continued", |o| {
                o.has("write: 1 bad blocks in 1 ranges, the rest ok")
            }),
        ],
    ));
    // CSTS.CFS: the in-flight reads are of LBAs 0..16 of a random image; the host counts the
    // reports itself (one line per report) and checks each read's CRC32C against the image.
    let cfs_img = work.join("cfs-src.img");
    random_image(&cfs_img, 8 << 20)?;
    let cfs_data = std::fs::read(&cfs_img)?;
    v.push(Case {
        name: "CSTS.CFS from a queue at unmapped memory".into(),
        vm: VmOpts {
            disk: Some(cfs_img),
            ..vm(1)
        },
        cmdline: "cfs inflight=16",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "fatal status detected",
                Box::new(|o: &Outcome| o.has("cfs: controller fatal status after")),
            ),
            (
                "host: each of the 16 tags reported once, its data the image's",
                Box::new(move |o: &Outcome| cfs_reports_match(o, &cfs_data, 16)),
            ),
            (
                "new I/O verified after recovery",
                Box::new(|o: &Outcome| o.has("controller recovered; new I/O verified")),
            ),
        ],
    });
    v.push(case(
        "demo (what `cargo xtask run` runs)",
        vm(2),
        "demo",
        true,
        vec![
            ("selftest passed", |o| {
                o.has("checks passed on 1 namespaces")
            }),
            ("bench ran without errors", |o| {
                o.has("errors=0 cores=1 stack=full")
            }),
        ],
    ));
    v.push(case(
        "selftest with eager CQ doorbells (one per pass)",
        VmOpts {
            null_backend: false,
            ..vm(1)
        },
        "selftest lazycq=off",
        true,
        vec![("all shapes verified", shapes_ok)],
    ));
    v.push(case(
        "logbench: writer vs raw, bypass copies nothing",
        VmOpts {
            disk_size: "1G".into(),
            ..null_vm(1)
        },
        "logbench ms=200",
        true,
        vec![
            ("copied appends copy each byte once", |o| {
                o.has("(copied) | ")
                    && o.log
                        .iter()
                        .any(|l| l.contains("(copied)") && l.ends_with("| 1.00"))
            }),
            ("DMA appends copy nothing", |o| {
                o.log
                    .iter()
                    .any(|l| l.contains("(bypass)") && l.ends_with("| 0.00"))
            }),
        ],
    ));
    // Several drives: every controller brought up, each selftested, and the host reads each
    // drive's own image for the pattern the selftest wrote there.
    for (drives, shapes) in [
        (2usize, vec![]),
        (
            3,
            vec![
                "ns=2,lba=4096".to_string(),
                "ns=1".into(),
                "qpairs=1".into(),
            ],
        ),
    ] {
        let w = work.to_path_buf();
        let name = format!("{drives} drives: selftest on each, each image checked by the host");
        v.push(Case {
            name,
            vm: VmOpts {
                drives,
                drive_shapes: shapes,
                ..vm(2)
            },
            cmdline: "selftest",
            expect_pass: true,
            expect_timeout: false,
            checks: vec![
                (
                    "every drive up",
                    Box::new(move |o: &Outcome| {
                        o.has(&format!("checks passed on {drives} drives"))
                    }),
                ),
                (
                    "each image holds its selftest pattern",
                    Box::new(move |_o: &Outcome| {
                        (0..drives).all(|d| selftest_pattern_on_disk(&w, d).unwrap_or(false))
                    }),
                ),
            ],
        });
    }
    // Namespace formats (QEMU's nvme-ns ms/mset/pi/pil). Protection information alone (8
    // bytes) is used through PRACT, separate and extended, types 1, 2 (4 KiB LBAs) and 3: the
    // selftest's every shape passes the device's guard and reference-tag checks and the host
    // finds the pattern in each image. Metadata the I/O path cannot supply is refused with a
    // typed error before anything reaches the device, and the image stays untouched.
    let w = work.to_path_buf();
    v.push(Case {
        name: "formats: PI types 1/2/3 through PRACT (separate, extended, 4K), host checks images"
            .into(),
        vm: VmOpts {
            drives: 4,
            drive_shapes: vec![
                "nsopt=ms=8,nsopt=pi=1".into(),
                "nsopt=ms=8,nsopt=pi=2,lba=4096".into(),
                "nsopt=ms=8,nsopt=mset=1,nsopt=pi=3".into(),
                "nsopt=ms=8,nsopt=mset=1,nsopt=pi=1,nsopt=pil=1".into(),
            ],
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "each PI type seen",
                Box::new(|o: &Outcome| {
                    o.count("format Pract(Type1)") >= 2
                        && o.has("format Pract(Type2)")
                        && o.has("format Pract(Type3)")
                }),
            ),
            (
                "every shape on every drive",
                Box::new(|o: &Outcome| {
                    o.count("(PRP list) | lba 8192 | blocks") == 4
                        && o.count("write zeroes, read back zeroes") == 4
                        && o.has("checks passed on 4 drives")
                }),
            ),
            (
                "each image holds its selftest pattern",
                Box::new(move |_o: &Outcome| {
                    (0..4).all(|d| selftest_pattern_on_disk(&w, d).unwrap_or(false))
                }),
            ),
        ],
    });
    // 64-bit guards (PIF 2 in the NVM command set's Identify Namespace, 16 bytes of PI:
    // CRC-64/NVME guard, application tag, 48-bit reference tag). Where the metadata is
    // separate, Keel computes the tuples for its metadata buffer (the selftest's round trip)
    // and the device checks them: a bad guard and a bad reference tag (bits 40..47, the part
    // CDW3 carries) are refused typed. Where the PI is all the metadata, PRACT too (separate
    // and extended, types 1 and 2); more metadata than the PI, interleaved: refused typed,
    // the image untouched. The host recomputes every tuple from the images: Keel's (guard
    // over the data and the 8 metadata bytes before the tuple on drive 2) and the device's
    // PRACT ones. (PRACT on 4 KiB LBAs only: on 512-byte LBAs QEMU 7.2's Write Zeroes stores
    // the 4 KiB guard, see the README.)
    let w = work.to_path_buf();
    v.push(Case {
        name: "formats: 64-bit guard PI computed by Keel (separate, 512 B and 4K) and through PRACT; more metadata interleaved refused; host recomputes the CRC-64 tuples".into(),
        vm: VmOpts {
            drives: 4,
            drive_shapes: vec![
                "nsopt=ms=16,nsopt=pi=1,nsopt=pif=2,lba=4096".into(),
                "nsopt=ms=16,nsopt=mset=1,nsopt=pi=2,nsopt=pif=2,lba=4096".into(),
                "nsopt=ms=24,nsopt=pi=2,nsopt=pif=2".into(),
                "nsopt=ms=24,nsopt=mset=1,nsopt=pi=3,nsopt=pif=2".into(),
            ],
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "64-bit guards read from the NVM Identify Namespace",
                Box::new(|o: &Outcome| {
                    o.count("protection information with a 64-bit guard (16 bytes of 16") == 2
                        && o.count("protection information with a 64-bit guard (16 bytes of 24") == 2
                        && o.has("format Pract(Type1)")
                        && o.has("format Pract(Type2)")
                        && o.has("format UnsupportedProtection")
                }),
            ),
            (
                "Keel's tuples pass the device's checks; a bad guard, application tag and 48-bit reference tag refused typed",
                Box::new(|o: &Outcome| {
                    o.count("metadata 16 B per block, PI computed by Keel (64-bit guard) | round trip | ok") == 1
                        && o.count("metadata 24 B per block, PI computed by Keel (64-bit guard) | round trip | ok") == 1
                        && o.count("bad guard refused by the device: Some(Guard)") == 2
                        && o.count("bad application tag refused by the device: Some(ApplicationTag)") == 2
                        && o.count("bad reference tag refused by the device: Some(ReferenceTag)") == 2
                }),
            ),
            (
                "PRACT shapes pass the device's checks; data-only I/O without the buffer and the unusable format refused typed",
                Box::new(|o: &Outcome| {
                    o.count("(PRP list) | lba 8192 | blocks") == 2
                        && o.count("write zeroes, read back zeroes") == 2
                        && o.has("| format SeparateMetadata | I/O refused: MetadataRequired | ok")
                        && o.has("| format UnsupportedProtection | I/O refused: UnsupportedFormat | ok")
                        && o.has("checks passed on 4 drives")
                }),
            ),
            (
                "host: Keel's tuples in images 0 and 2 (CRC-64/NVME guard, application tag, 48-bit reference tag, metadata before the tuple)",
                Box::new({
                    let w = w.clone();
                    move |_o: &Outcome| {
                        pi64_metadata_on_disk(&w, 0, 4096, 16, 0).unwrap_or(false)
                            && pi64_metadata_on_disk(&w, 2, 512, 24, 8).unwrap_or(false)
                    }
                }),
            ),
            (
                "host: the device's PRACT tuples in image 0 (the 2 MiB shape at LBA 8192, the Write Zeroes block at 64); images 0 and 1 hold the pattern; image 3 untouched",
                Box::new(move |_o: &Outcome| {
                    pract64_on_disk(&w, 0, 4096, 16).unwrap_or(false)
                        && (0..2).all(|d| selftest_pattern_on_disk(&w, d).unwrap_or(false))
                        && image_is_zero(&w, 3, 1)
                }),
            ),
        ],
    });
    // The README's QEMU 7.2 finding, kept under test: on a 64-bit guard namespace with
    // 512-byte LBAs, Write Zeroes with PRACT (no PRCHK, reference tag = LBA) stores the guard
    // of a 4 KiB zero block (nvme_dif_rw's Write Zeroes branch writes the constant
    // 0x6482D367EB22B64E whatever the LBA size), so reading the zeroes back fails the device's
    // own guard check (SCT 2 / SC 0x82). The host reads the stored tuples: Keel's reference
    // tags are right, the guard is QEMU's constant. (If QEMU is fixed, this case fails: then
    // the 64-bit PRACT case above can use 512-byte LBAs too.)
    let w = work.to_path_buf();
    v.push(Case {
        name: "QEMU 7.2 quirk: 64-bit guard Write Zeroes on 512 B LBAs stores the 4 KiB zero guard; host reads the tuples".into(),
        vm: VmOpts {
            drives: 1,
            drive_shapes: vec!["nsopt=ms=16,nsopt=pi=1,nsopt=pif=2".into()],
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: false,
        expect_timeout: false,
        checks: vec![
            (
                "Keel's PI and PRACT pass on 512 B LBAs; only the zeroes' read-back fails, with a guard check error",
                Box::new(|o: &Outcome| {
                    o.has("metadata 16 B per block, PI computed by Keel (64-bit guard) | round trip | ok")
                        && o.has("(PRP list) | lba 8192 | blocks")
                        && o.has("ERROR write zeroes: Io(Media { status: DevStatus(1284) })")
                        && !o.has("write zeroes, read back zeroes")
                }),
            ),
            (
                "host: the PRACT tuples are right; the zeroed blocks carry CRC-64 of 4 KiB of zeroes, not of 512 B, with reference tag = LBA",
                Box::new(move |_o: &Outcome| {
                    crc64_nvme(&[&[0u8; 4096]]) != crc64_nvme(&[&[0u8; 512]])
                        && pract64_on_disk(&w, 0, 512, 16).unwrap_or(false)
                }),
            ),
        ],
    });
    let w = work.to_path_buf();
    v.push(Case {
        name: "20 namespaces on one controller, host checks images 1, 17 and 20".into(),
        vm: VmOpts {
            namespaces: 20,
            disk_size: "16M".into(),
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "all 20 used",
                Box::new(|o: &Outcome| o.has("checks passed on 20 namespaces")),
            ),
            (
                "images hold their own namespace's pattern",
                Box::new(move |_o: &Outcome| {
                    [1, 17, 20]
                        .iter()
                        .all(|&ns| selftest_pattern_in(&w, 0, ns).unwrap_or(false))
                }),
            ),
        ],
    });
    let w = work.to_path_buf();
    v.push(Case {
        name: "zoned namespace: zone append LBAs, states and zone errors; host checks the records at the returned LBAs; the other drive goes on"
            .into(),
        vm: VmOpts {
            drives: 2,
            drive_shapes: vec![
                "ns=1,nsopt=zoned=true,nsopt=zoned.zone_size=4M,nsopt=zoned.zone_capacity=4M"
                    .into(),
                "ns=1".into(),
            ],
            ..vm(2)
        },
        cmdline: "zone records=8 blocks=2",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "zoned command set enabled, the namespace's zones identified",
                Box::new(|o: &Outcome| {
                    o.has("I/O command set profile 0")
                        && o.has("ns 1 zoned: 16 zones of 8192 blocks")
                        && o.has("zone drive 0 ns 1 | 16 zones of 8192 blocks | 8 appends | ok")
                        && o.has("zone: 13 checks passed on 1 zoned namespaces")
                }),
            ),
            (
                "image: each record at the LBA the device returned, byte for byte, CRC32C equal; the records tile zone 1",
                Box::new(move |o: &Outcome| zone_records_on_disk(o, &w, 8, 2, 8192)),
            ),
            (
                "the plain drive written at LBA 0",
                {
                    let w = work.to_path_buf();
                    Box::new(move |o: &Outcome| {
                        o.has("zone drive 1 ns 1 | not zoned | plain write at lba 0 ok")
                            && std::fs::read(qemu::ns_image(&w, 1, 1)).is_ok_and(|img| {
                                (0..512).all(|i| img[i] == keel_jobs::zone::record_byte(1, 1, 0, i))
                            })
                    })
                },
            ),
        ],
    });
    let w = work.to_path_buf();
    v.push(Case {
        name: "metadata buffers: separate metadata, PI computed by Keel (types 1/3, first/last, 4K); host checks data, metadata and PI"
            .into(),
        vm: VmOpts {
            drives: 4,
            drive_shapes: vec![
                "nsopt=ms=8".into(),
                "nsopt=ms=8,nsopt=pi=1".into(),
                "nsopt=ms=16,nsopt=pi=1".into(),
                "nsopt=ms=16,nsopt=pi=3,nsopt=pil=1,lba=4096".into(),
            ],
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "every round trip, PI on three; bad guards, application tags and reference tags refused by the device",
                Box::new(|o: &Outcome| {
                    o.count("| round trip | ok") == 4
                        && o.count("PI computed by Keel | round trip | ok") == 3
                        && o.count("bad guard refused by the device") == 3
                        && o.count("bad application tag refused by the device: Some(ApplicationTag)") == 3
                        && o.count("bad reference tag refused by the device: Some(ReferenceTag)") == 2
                }),
            ),
            (
                "host: each image's data, metadata and PI tuples",
                Box::new(move |_o: &Outcome| {
                    use keel_nvme::PiType::{Type1, Type3};
                    [
                        (0, 512, 8, None, 0),
                        (1, 512, 8, Some(Type1), 0),
                        (2, 512, 16, Some(Type1), 8),
                        (3, 4096, 16, Some(Type3), 0),
                    ]
                    .iter()
                    .all(|&(d, bs, ms, pi, at)| {
                        metadata_on_disk(&w, d, bs, ms, pi, at).unwrap_or(false)
                    })
                }),
            ),
        ],
    });
    let w = work.to_path_buf();
    v.push(Case {
        name: "formats: metadata Keel cannot supply is refused, typed; other drives go on".into(),
        vm: VmOpts {
            drives: 3,
            drive_shapes: vec![
                "ns=2,nsopt=ms=8".into(),
                "nsopt=ms=16,nsopt=mset=1".into(),
                "ns=1".into(),
            ],
            ..vm(2)
        },
        cmdline: "selftest",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "separate metadata: MetadataRequired, twice",
                Box::new(|o: &Outcome| {
                    o.count("format SeparateMetadata | I/O refused: MetadataRequired | ok") == 2
                }),
            ),
            (
                "extended metadata: UnsupportedFormat",
                Box::new(|o: &Outcome| {
                    o.count("format ExtendedMetadata | I/O refused: UnsupportedFormat | ok") == 1
                }),
            ),
            (
                "nothing reached the extended one; data-only I/O nowhere",
                Box::new(|o: &Outcome| {
                    o.count("queue stats QueueStats { submitted_cmds: 0,") == 1
                        && o.count("metadata 8 B per block | round trip | ok") == 2
                }),
            ),
            (
                "the plain drive passes every shape",
                Box::new(|o: &Outcome| o.has("checks passed on 3 drives")),
            ),
            (
                "the extended namespace's image untouched; the others written",
                Box::new(move |_o: &Outcome| {
                    metadata_on_disk(&w, 0, 512, 8, None, 0).unwrap_or(false)
                        && image_is_zero(&w, 1, 1)
                        && selftest_pattern_on_disk(&w, 2).unwrap_or(false)
                }),
            ),
        ],
    });
    // The data oracle: mixed I/O at depth on every core and drive, writes failing at chosen
    // LBAs on drive 0 (blkdebug); the host checks every block of both images against the
    // record of acknowledged writes the firmware printed.
    let oracle_conf = work.join("blkdebug-oracle.conf");
    std::fs::write(
        &oracle_conf,
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"20\"\n\n[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"300\"\n",
    )?;
    for (name, blkdebug, cmd, bs) in [
        (
            "oracle: 2 cores x 2 drives, host checks every block",
            None,
            "oracle ms=600 blocks=256 qd=16",
            512,
        ),
        (
            "oracle: write EIO at LBAs 20 and 300, host checks every block",
            Some(oracle_conf.clone()),
            "oracle ms=600 blocks=256 qd=16",
            512,
        ),
        (
            "oracle: 4 KiB LBAs, 2 cores x 2 drives, host checks every block",
            None,
            "oracle ms=600 blocks=256 qd=16",
            4096,
        ),
    ] {
        let w = work.to_path_buf();
        let eio = blkdebug.is_some();
        v.push(Case {
            name: name.into(),
            vm: VmOpts {
                drives: 2,
                blkdebug,
                lba_size: bs,
                ..vm(2)
            },
            cmdline: cmd,
            expect_pass: true,
            expect_timeout: false,
            checks: vec![
                oracle_row(w.clone(), bs, 100),
                (
                    "failed writes typed, never acknowledged",
                    Box::new(move |o: &Outcome| {
                        let failed = o
                            .log
                            .iter()
                            .find_map(|l| l.split("writes failed ").nth(1))
                            .and_then(|r| r.split(',').next())
                            .and_then(|n| n.parse::<u64>().ok());
                        let rec = oracle_records(o);
                        let unacked_at =
                            |lba| rec.iter().any(|r| r.0 == 0 && r.1 == lba && r.2 == 0);
                        match (eio, failed) {
                            (false, Some(0)) => true,
                            (true, Some(n)) => n > 0 && unacked_at(20) && unacked_at(300),
                            _ => false,
                        }
                    }),
                ),
            ],
        });
    }
    // Recovery across reactors on real QEMU (issue 16): drive 0 is throttled to 100 IOPS and
    // the I/O timeout is 40 ms, so commands really time out at depth on both pollers. The
    // worker core recalls both pollers' queue pairs and escalates: QEMU answers every Abort
    // "not aborted", so the queue pairs are deleted and recreated (Delete SQ quiesces their
    // commands). 700 ms in, the worker makes drive 0 fatal (CSTS.CFS): a controller reset
    // with both pairs lent. Drive 1 goes on untouched. The host checks every block of both
    // images.
    // `cargo xtask soak --secs N` runs this case alone for N seconds.
    let soak: Option<u64> = std::env::var("KEEL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let ms = soak.map_or(1500, |s| s.max(2) * 1000);
    let cmdline: &'static str = Box::leak(
        format!(
            "oracle ms={ms} blocks=256 qd=4 cores=2 worker=on io_timeout_ms=40 fatal_ms={}",
            ms / 2
        )
        .into_boxed_str(),
    );
    // The same faults on 4 KiB LBAs (issue 16: the oracle on 512 B and 4 KiB LBAs); the soak
    // runs the 512 B case only.
    for (name, bs) in [(FAULT_ORACLE, 512u32), (FAULT_ORACLE_4K, 4096)] {
        if soak.is_some() && bs != 512 {
            continue;
        }
        let w = work.to_path_buf();
        v.push(Case {
            name: name.into(),
            vm: VmOpts {
                drives: 2,
                drive_shapes: vec!["iops=100".into()],
                lba_size: bs,
                timeout: soak.map_or(120, |s| s * 2 + 120),
                ..vm(3)
            },
            cmdline,
            expect_pass: true,
            expect_timeout: false,
            checks: vec![
                oracle_row(w.clone(), bs, 50),
                (
                    "aborts sent, queue pairs reset, the fatal controller reset (worker core)",
                    Box::new(|o: &Outcome| {
                        let n = |what: &str| {
                            o.log
                                .iter()
                                .find(|l| l.contains("oracle recovery:"))
                                .and_then(|l| l.split(what).next())
                                .and_then(|l| l.rsplit(' ').next())
                                .and_then(|v| v.trim().parse::<u64>().ok())
                        };
                        matches!(
                            (n(" aborts sent"), n(" queue-pair resets"), n(" controller resets")),
                            (Some(a), Some(q), Some(c)) if a > 0 && q > 0 && c >= 1
                        )
                    }),
                ),
            ],
        });
    }
    // health: the SMART page counts exactly the job's I/O (QEMU: thousands of 512-byte units,
    // rounded up), the written data is on the image, and a temperature threshold at the
    // current temperature raises a real SMART / health asynchronous event.
    let w = work.to_path_buf();
    v.push(Case {
        name: "health: SMART counts the writes, a temperature event".into(),
        vm: vm(1),
        cmdline: "health writes=100 blocks=64 lba=8192 temp=on",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "tables: temperature 323 K (50 C), spare, no warning, empty error log",
                Box::new(|o: &Outcome| {
                    o.count("| temperature           | 323 K (50 C)") == 2
                        && o.count("| critical warning      | none") == 2
                        && o.has("| available spare       | ")
                        && o.has("error log: 0 entries")
                }),
            ),
            (
                "counters: +100 write and read commands, data units as QEMU rounds them",
                Box::new(|o: &Outcome| {
                    let units = (100u64 * 64 * 512 / 512).div_ceil(1000);
                    o.has("before: host_write_commands=0 host_read_commands=0 data_units_written=0 data_units_read=0")
                        && o.has(&format!(
                            "after: host_write_commands=100 host_read_commands=100 data_units_written={units} data_units_read={units}"
                        ))
                }),
            ),
            (
                "the writes are on the image (host)",
                Box::new(move |_o: &Outcome| {
                    health_pattern_on_disk(&w, 8192, 100 * 64, 0x6865_616c).unwrap_or(false)
                }),
            ),
            (
                "temperature event: AER completed, its page warned, cleared after",
                Box::new(|o: &Outcome| {
                    o.has("event: SMART / health, info 0x1, critical warning 0x02")
                        && o.has("warning bits 0x02 in its page; threshold back at 343 K: bits 0x00")
                        && o.has("stale admin completions 0")
                }),
            ),
        ],
    });
    // scrub: the driver's reads against the host's view of the same image.
    let img = work.join("scrub-src.img");
    let crc = random_image(&img, 8 << 20)?;
    let want = format!("drive=0 ns=1 lba=0 blocks=16384 block_size=512 crc32c={crc:08x}");
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
    v.extend(event_cases(work)?);
    Ok(v)
}

/// Whether namespace 1 of drive `d` holds the selftest's "2 MiB + 8 KiB at LBA 8192" shape,
/// byte for byte, as the firmware's pattern function defines it (the image's LBA size is
/// told by its size: 64 MiB images of 512 B or 4 KiB blocks, found by trying both).
fn selftest_pattern_on_disk(work: &std::path::Path, d: usize) -> Result<bool> {
    selftest_pattern_in(work, d, 1)
}

/// The host's check of the selftest's metadata round trip on namespace 1 of drive `d` (LBA
/// size `bs`, metadata `ms` bytes per block, protection `pi` with its tuple at `pi_offset`):
/// QEMU keeps the data first and every block's metadata after all the data, so the image
/// holds the 4 KiB written at `METADATA_LBA`, and its metadata — the pattern bytes, or with
/// PI a tuple whose guard, application tag and reference tag the host recomputes.
fn metadata_on_disk(
    work: &std::path::Path,
    d: usize,
    bs: u32,
    ms: u16,
    pi: Option<keel_nvme::PiType>,
    pi_offset: u16,
) -> Result<bool> {
    use keel_jobs::nvme::{metadata_byte, METADATA_LBA, METADATA_SEED, SELFTEST_APP_TAG};
    let img = std::fs::read(qemu::ns_image(work, d, 1))?;
    let nlbas = img.len() as u64 / (bs as u64 + ms as u64);
    let blocks = 4096 / bs;
    let at = (METADATA_LBA * bs as u64) as usize;
    let data = img.get(at..at + 4096).context("image too short")?;
    let data_ok = data.chunks_exact(8).enumerate().all(|(i, w)| {
        let off = i * 8;
        let want = keel_jobs::storage::pattern(
            1,
            METADATA_LBA + (off / bs as usize) as u64,
            off % bs as usize,
            METADATA_SEED,
        );
        w == want.to_le_bytes()
    });
    let mat = (nlbas * bs as u64 + METADATA_LBA * ms as u64) as usize;
    let meta = img
        .get(mat..mat + blocks as usize * ms as usize)
        .context("image too short for the metadata")?;
    let ns = keel_nvme::Namespace {
        nsid: 1,
        blocks: nlbas,
        block_size: bs,
        metadata: ms,
        format: keel_nvme::NsFormat::SeparateMetadata,
        extended: false,
        pi,
        pi_offset,
        pi_guard64: false,
        command_set: 0,
        zoned: None,
    };
    let meta_ok = match pi {
        Some(_) => {
            keel_nvme::pi::verify(&ns, METADATA_LBA, blocks, SELFTEST_APP_TAG, data, meta).is_ok()
                && meta.chunks_exact(ms as usize).enumerate().all(|(b, m)| {
                    (0..ms as usize)
                        .filter(|&i| i < pi_offset as usize || i >= pi_offset as usize + 8)
                        .all(|i| m[i] == metadata_byte(1, b * ms as usize + i))
                })
        }
        None => meta
            .iter()
            .enumerate()
            .all(|(i, &b)| b == metadata_byte(1, i)),
    };
    Ok(data_ok && meta_ok)
}

/// CRC-64/NVME, the host's own (the `crc` crate's catalogue entry, not Keel's code).
fn crc64_nvme(parts: &[&[u8]]) -> u64 {
    let c = crc::Crc::<u64>::new(&crc::CRC_64_NVME);
    let mut d = c.digest();
    for p in parts {
        d.update(p);
    }
    d.finalize()
}

/// Whether `t` is the 16-byte 64-bit-guard tuple of a block with data `block` (and metadata
/// `before` ahead of the tuple) at `lba` with application tag `app`: guard, application tag,
/// the LBA's low 48 bits, big-endian.
fn tuple64_ok(t: &[u8], block: &[u8], before: &[u8], app: u16, lba: u64) -> bool {
    t.len() == 16
        && t[..8] == crc64_nvme(&[block, before]).to_be_bytes()
        && t[8..10] == app.to_be_bytes()
        && t[10..16] == lba.to_be_bytes()[2..]
}

/// The host's check of the selftest's metadata round trip with 64-bit-guard PI on namespace
/// 1 of drive `d` (LBA size `bs`, metadata `ms`, the tuple at `pi_offset`), recomputed from
/// the image alone: QEMU keeps all the data first and every block's metadata after it
/// (`moff` = NLBAs × LBA size, hw/nvme/ns.c), so the 4 KiB written at `METADATA_LBA` is the
/// pattern, its metadata bytes outside the tuple are the pattern bytes, and each tuple holds
/// the CRC-64/NVME of the block's data and the metadata before the tuple, the selftest's
/// application tag and the LBA as a 48-bit reference tag.
fn pi64_metadata_on_disk(
    work: &std::path::Path,
    d: usize,
    bs: usize,
    ms: usize,
    pi_offset: usize,
) -> Result<bool> {
    use keel_jobs::nvme::{metadata_byte, METADATA_LBA, METADATA_SEED, SELFTEST_APP_TAG};
    let img = std::fs::read(qemu::ns_image(work, d, 1))?;
    let nlbas = img.len() / (bs + ms);
    let (lba, blocks) = (METADATA_LBA as usize, 4096 / bs);
    let data = img
        .get(lba * bs..lba * bs + 4096)
        .context("image too short")?;
    let meta = img
        .get(nlbas * bs + lba * ms..nlbas * bs + (lba + blocks) * ms)
        .context("image too short for the metadata")?;
    let data_ok = data.chunks_exact(8).enumerate().all(|(i, w)| {
        let off = i * 8;
        let want = keel_jobs::storage::pattern(1, (lba + off / bs) as u64, off % bs, METADATA_SEED);
        w == want.to_le_bytes()
    });
    let meta_ok = meta.chunks_exact(ms).enumerate().all(|(b, m)| {
        let block = &data[b * bs..(b + 1) * bs];
        let (before, t) = (&m[..pi_offset], &m[pi_offset..pi_offset + 16]);
        tuple64_ok(t, block, before, SELFTEST_APP_TAG, (lba + b) as u64)
            && (0..ms)
                .filter(|&i| i < pi_offset || i >= pi_offset + 16)
                .all(|i| m[i] == metadata_byte(1, b * ms + i))
    });
    Ok(data_ok && meta_ok)
}

/// The device's own (PRACT) 64-bit-guard tuples on namespace 1 of drive `d` (metadata all
/// PI, `ms` = 16), recomputed by the host from the image: every block of the selftest's
/// 2 MiB + 8 KiB shape at LBA 8192 (application tag 0: Keel sends none), and the 4 KiB of
/// Write Zeroes at LBA 64: zero data, reference tag = LBA, and the guard QEMU stores there,
/// CRC-64/NVME of 4 KiB of zeroes (right for 4 KiB LBAs; QEMU 7.2's constant on 512 B ones).
fn pract64_on_disk(work: &std::path::Path, d: usize, bs: usize, ms: usize) -> Result<bool> {
    let img = std::fs::read(qemu::ns_image(work, d, 1))?;
    let nlbas = img.len() / (bs + ms);
    let moff = nlbas * bs;
    let tuple_ok = |lba: usize| match (
        img.get(lba * bs..(lba + 1) * bs),
        img.get(moff + lba * ms..moff + lba * ms + 16),
    ) {
        (Some(block), Some(t)) => tuple64_ok(t, block, &[], 0, lba as u64),
        _ => false,
    };
    let blocks = (2 * 1024 * 1024 + 8192usize).div_ceil(bs);
    let zero_guard = crc64_nvme(&[&[0u8; 4096]]).to_be_bytes();
    let zeroed_ok = |lba: usize| {
        img.get(lba * bs..(lba + 1) * bs)
            .is_some_and(|b| b.iter().all(|&x| x == 0))
            && img
                .get(moff + lba * ms..moff + lba * ms + 16)
                .is_some_and(|t| {
                    t[..8] == zero_guard && t[8..10] == [0, 0] && t[10..] == lba.to_be_bytes()[2..]
                })
    };
    Ok((8192..8192 + blocks).all(tuple_ok) && (64..64 + 4096 / bs).all(zeroed_ok))
}

/// The `zone` job's appended records, checked on drive 0's namespace 1 image: `records`
/// lines, each naming a distinct record; the bytes at the LBA the device returned are the
/// record (recomputed here) and their CRC32C is the printed one; together the records tile
/// `zone_start .. zone_start + records * blocks` (512-byte blocks).
fn zone_records_on_disk(
    o: &Outcome,
    work: &Path,
    records: u32,
    blocks: u64,
    zone_start: u64,
) -> bool {
    let Ok(img) = std::fs::read(qemu::ns_image(work, 0, 1)) else {
        eprintln!("xtask: zone: no image");
        return false;
    };
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut seen = vec![false; records as usize];
    let mut slots = vec![false; records as usize];
    for l in &o.log {
        let Some(rest) = l.split("zone append: ").nth(1) else {
            continue;
        };
        // drive D ns N record K lba L blocks B crc32c C
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|t| t.parse::<u64>().ok());
        let (Some(0), Some(1), Some(k), Some(lba), Some(b), Some(c)) = (
            num(1),
            num(3),
            num(5),
            num(7),
            num(9),
            f.get(11).and_then(|t| u32::from_str_radix(t, 16).ok()),
        ) else {
            eprintln!("xtask: zone: unparsable line {l:?}");
            return false;
        };
        if b != blocks || k >= records as u64 || std::mem::replace(&mut seen[k as usize], true) {
            eprintln!("xtask: zone: record {k} blocks {b}: unexpected or repeated");
            return false;
        }
        let slot = lba.wrapping_sub(zone_start) / blocks;
        if lba < zone_start || !(lba - zone_start).is_multiple_of(blocks) || slot >= records as u64
        {
            eprintln!("xtask: zone: record {k} at lba {lba}: outside the records' range");
            return false;
        }
        if std::mem::replace(&mut slots[slot as usize], true) {
            eprintln!("xtask: zone: two records at lba {lba}");
            return false;
        }
        let at = lba as usize * 512;
        let Some(bytes) = img.get(at..at + blocks as usize * 512) else {
            eprintln!("xtask: zone: lba {lba} past the image");
            return false;
        };
        let bad =
            (0..bytes.len()).find(|&i| bytes[i] != keel_jobs::zone::record_byte(0, 1, k as u32, i));
        if let Some(i) = bad {
            eprintln!("xtask: zone: record {k} at lba {lba}: image byte {i} differs");
            return false;
        }
        if crc.checksum(bytes) != c {
            eprintln!("xtask: zone: record {k} at lba {lba}: crc32c differs from the image's");
            return false;
        }
    }
    if !seen.iter().all(|&s| s) {
        eprintln!(
            "xtask: zone: {} of {records} records reported",
            seen.iter().filter(|&&s| s).count()
        );
        return false;
    }
    true
}

/// Whether namespace `ns` of drive `d`'s image is all zeroes (nothing was ever written).
fn image_is_zero(work: &std::path::Path, d: usize, ns: u32) -> bool {
    std::fs::read(qemu::ns_image(work, d, ns))
        .map(|b| b.iter().all(|&x| x == 0))
        .unwrap_or(false)
}

/// [`selftest_pattern_on_disk`] for namespace `ns`.
fn selftest_pattern_in(work: &std::path::Path, d: usize, ns: u32) -> Result<bool> {
    let img = std::fs::read(qemu::ns_image(work, d, ns))?;
    let seed = 0x6b65_656c_u64;
    let ok = |bs: usize| {
        let lba = 8192u64;
        let blocks = (2 * 1024 * 1024 + 8192usize).div_ceil(bs);
        (0..blocks).all(|b| {
            let at = (lba as usize + b) * bs;
            (0..bs).step_by(8).all(|off| {
                let want = keel_jobs::storage::pattern(ns, lba + b as u64, off, seed ^ lba);
                img.get(at + off..at + off + 8) == Some(&want.to_le_bytes()[..])
            })
        })
    };
    Ok(ok(512) || ok(4096))
}

/// Whether namespace 1 of drive 0 (512-byte blocks) holds the `health` job's writes: blocks
/// `lba..lba + blocks` in the storage pattern with `seed`.
fn health_pattern_on_disk(
    work: &std::path::Path,
    lba: u64,
    blocks: u64,
    seed: u64,
) -> Result<bool> {
    let img = std::fs::read(qemu::ns_image(work, 0, 1))?;
    Ok((lba..lba + blocks).all(|b| {
        let at = b as usize * 512;
        (0..512).step_by(8).all(|off| {
            let want = keel_jobs::storage::pattern(1, b, off, seed);
            img.get(at + off..at + off + 8) == Some(&want.to_le_bytes()[..])
        })
    }))
}

/// `(drive, lba, acked, max)` for every block of the oracle's console record.
fn oracle_records(o: &Outcome) -> Vec<(usize, u64, u64, u64)> {
    o.console
        .iter()
        .filter_map(|l| l.trim().strip_prefix("oracle block "))
        .filter_map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
                .collect();
            (v.len() == 4).then(|| (v[0] as usize, v[1], v[2], v[3]))
        })
        .collect()
}

/// The host's side of the data oracle: every block of each drive's image (`bs`-byte LBAs) up to
/// the highest one the record names holds what the record allows — an intact oracle block of
/// its own LBA whose generation is the last acknowledged one (or a later failed one), or
/// zeroes where nothing was acknowledged — and nothing the record does not list was written.
/// Returns how many blocks the record listed.
fn oracle_check(work: &std::path::Path, o: &Outcome, drives: usize, bs: usize) -> Result<usize> {
    use keel_jobs::oracle::{allowed, parse_block};
    let recs = oracle_records(o);
    if recs.is_empty() {
        bail!("no oracle record on the console");
    }
    for d in 0..drives {
        let img = std::fs::read(qemu::ns_image(work, d, 1))?;
        let mine: std::collections::HashMap<u64, (u64, u64)> = recs
            .iter()
            .filter(|r| r.0 == d)
            .map(|r| (r.1, (r.2, r.3)))
            .collect();
        let top = mine.keys().copied().max().unwrap_or(0) + 64;
        for lba in 0..top {
            let block = img
                .get(lba as usize * bs..lba as usize * bs + bs)
                .context("image shorter than the record")?;
            let rec = mine.get(&lba).copied();
            let ok = match (parse_block(block), rec) {
                (None, None) => true,
                (None, Some((acked, _))) => acked == 0,
                (Some(Ok((l, g))), Some((acked, max))) => l == lba && allowed(g, acked, max),
                _ => false,
            };
            if !ok {
                bail!(
                    "drive {d} lba {lba}: found {:?}, record (acked, max) {rec:?}",
                    parse_block(block)
                );
            }
        }
    }
    Ok(recs.len())
}

fn shapes_ok(o: &Outcome) -> bool {
    o.count("| ok") >= 8 && !o.has("FAILED")
}

// ---- host-side checks of the log and the power-cut tooling --------------------------------

/// Runs a host-side check: its `Ok` label, or `fail_name` after printing why, becomes a row.
fn check_row(fail_name: &str, f: impl FnOnce() -> Result<String>) -> (String, bool) {
    match f() {
        Ok(label) => (label, true),
        Err(e) => {
            eprintln!("xtask: {fail_name}: {e:#}");
            (fail_name.to_string(), false)
        }
    }
}

/// The numbers printed right after `marker` in the decoded log, in order.
fn numbers_after<'a>(o: &'a Outcome, marker: &'a str) -> impl Iterator<Item = u64> + 'a {
    o.log.iter().filter_map(move |l| {
        l.split(marker)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// One quiet single-core boot for these checks.
fn boot(
    fw: &Path,
    timeout: u64,
    disk: Option<PathBuf>,
    write_log: Option<PathBuf>,
    cmdline: &str,
) -> Result<Outcome> {
    let work = crate::work_dir();
    let (accel, _) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    let vm = VmOpts {
        smp: 1,
        accel,
        timeout,
        disk,
        write_log,
        ..VmOpts::default()
    };
    qemu::run(fw, &vm, cmdline, &work, qemu::Verbosity::Quiet)
}

/// Boots `recover expect=N` (plus `extra` options) on `img`: fails unless recovery passed,
/// returned at least `expect` records and nothing corrupt.
fn recover_on(fw: &Path, img: &Path, expect: u64, extra: &str, what: &str) -> Result<Outcome> {
    let out = boot(
        fw,
        60,
        Some(img.to_path_buf()),
        None,
        format!("recover expect={expect} {extra}").trim(),
    )?;
    if !out.passed() || !out.has(" 0 corrupt;") {
        for l in out.all_lines() {
            eprintln!("    {l}");
        }
        bail!(
            "{what} (expecting {expect} acknowledged records): {}",
            out.verdict()
        );
    }
    Ok(out)
}

fn flush_count(log: &crate::powercut::Log) -> usize {
    log.entries
        .iter()
        .filter(|e| **e == crate::powercut::Entry::Flush)
        .count()
}

/// The replay tool, checked against reality: record a selftest run with QEMU's blklogwrites,
/// replay the whole log over the initial (zero) image and compare with the disk QEMU left.
fn powercut_replay_check(fw: &Path) -> (String, bool) {
    check_row("power-cut log: replay reproduces the disk", || {
        let work = crate::work_dir();
        let log_path = work.join("powercut-selftest.log");
        let out = boot(fw, 120, None, Some(log_path.clone()), "selftest")?;
        if !out.passed() {
            bail!("selftest under blklogwrites failed: {}", out.verdict());
        }
        let log = crate::powercut::parse(&std::fs::read(&log_path)?)?;
        let disk = std::fs::read(work.join("nvme-ns1.img"))?;
        let replayed = crate::powercut::replay(&vec![0u8; disk.len()], &log.entries);
        if let Some(first) = replayed.iter().zip(&disk).position(|(a, b)| a != b) {
            bail!("replaying {} log entries does not reproduce the disk (first difference at byte {first})", log.entries.len());
        }
        let flushes = flush_count(&log);
        if flushes == 0 {
            bail!("the selftest's flush never reached the log");
        }
        // The superblock is rewritten at each flush: it must count exactly the entries up to
        // and including the last flush.
        let last_flush = log
            .entries
            .iter()
            .rposition(|e| *e == crate::powercut::Entry::Flush)
            .map_or(0, |i| i + 1);
        if log.flushed_entries as usize != last_flush {
            bail!(
                "superblock counts {} entries, the last flush is entry {last_flush}",
                log.flushed_entries
            );
        }
        Ok(format!(
            "power-cut log ({} B sectors): replay of {} entries == disk; {flushes} flushes",
            log.sector_size,
            log.entries.len()
        ))
    })
}

/// The power-cut test proper (`crate::powercut::replay_suite`): several `log` configurations
/// under blklogwrites, 512 B and 4 KiB blocks; their distinct crash states (torn writes, random
/// subsets of the unflushed writes) recovered in packed boots and checked against the exact
/// record count the oracle gives; recovery's own writes replayed and recovered again.
fn powercut_wal_check(fw: &Path, per_gap: usize) -> (String, bool) {
    check_row("power-cut replay of the log job", || {
        crate::powercut::replay_suite(fw, per_gap)
    })
}

/// Writes failing under the log (QEMU blkdebug EIO on one sector inside the log region): the
/// error surfaces (the writer does not retry a permanent media error forever), and recovery on
/// the same disk returns every record acknowledged before it, nothing corrupt.
fn log_write_error_check(fw: &Path) -> (String, bool) {
    check_row("log under blkdebug write EIO", || {
        let work = crate::work_dir();
        let img = work.join("eio-log.img");
        std::fs::File::create(&img)?.set_len(64 << 20)?;
        let conf = work.join("blkdebug-log.conf");
        std::fs::write(
            &conf,
            "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"300\"\n",
        )?;
        let (accel, _) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
        let vm = VmOpts {
            smp: 1,
            accel,
            timeout: 60,
            disk: Some(img.clone()),
            blkdebug: Some(conf),
            ..VmOpts::default()
        };
        let out = qemu::run(
            fw,
            &vm,
            "log records=2000 sync_every=10 on_error=report",
            &work,
            qemu::Verbosity::Quiet,
        )?;
        let Some(acked) = numbers_after(&out, "stopped by a device error after ").next() else {
            bail!("the injected write error never surfaced: {}", out.verdict());
        };
        let out = recover_on(fw, &img, acked, "", "recovery after the write error")?;
        let recovered = numbers_after(&out, "recover: ").next().unwrap_or(0);
        Ok(format!("log under blkdebug write EIO: error surfaced at {acked} acked; recovered {recovered}, 0 corrupt"))
    })
}

/// The appliance image (`--no-default-features`: no lab jobs, the one `cargo xtask size`
/// measures) boots and selftests, and refuses a lab job by name.
fn appliance_check() -> (String, bool) {
    check_row("appliance image (no lab jobs)", || {
        let work = crate::work_dir();
        let built = crate::build_firmware_with(false)?;
        let fw = work.join("keel-fw.appliance");
        std::fs::copy(&built, &fw)?;
        let (accel, _) = qemu::choose_accel(qemu::Accel::Auto, &fw, &work);
        let vm = VmOpts {
            smp: 2,
            accel,
            timeout: 60,
            ..VmOpts::default()
        };
        let out = qemu::run(&fw, &vm, "selftest", &work, qemu::Verbosity::Quiet)?;
        if !out.passed() || !out.has("selftest") {
            bail!("selftest on the appliance image: {}", out.verdict());
        }
        let out = qemu::run(&fw, &vm, "bench", &work, qemu::Verbosity::Quiet)?;
        if out.passed() || !out.has("unknown job 'bench'") {
            bail!(
                "the appliance image ran or misreported a lab job: {}",
                out.verdict()
            );
        }
        Ok("appliance image (no lab jobs): selftest passes, `bench` is an unknown job".into())
    })
}

/// Kill QEMU in the middle of a long `log` run, then recover the disk a power cut at that
/// instant would leave (rebuilt from blklogwrites: QEMU has no cache of its own to lose), and
/// the one a guest crash, recovery and a power cut would (see `crate::powercut::kill_suite`).
fn kill_and_recover_check(fw: &Path) -> (String, bool) {
    check_row("kill QEMU mid-log, reboot, recover", || {
        crate::powercut::kill_suite(fw)
    })
}

/// `cargo xtask powercut`: only the power-cut and kill checks (for iterating on them).
pub fn powercut_only(crash_states_per_gap: usize, which: &str) -> Result<()> {
    qemu::ensure_qemu()?;
    let fw = crate::build_firmware()?;
    let mut rows = Vec::new();
    let t = Instant::now();
    if matches!(which, "all" | "selftest") {
        rows.push((powercut_replay_check(&fw), t.elapsed().as_secs_f64()));
    }
    let t = Instant::now();
    if matches!(which, "all" | "replay") {
        rows.push((
            powercut_wal_check(&fw, crash_states_per_gap.max(1)),
            t.elapsed().as_secs_f64(),
        ));
    }
    let t = Instant::now();
    if matches!(which, "all" | "kill") {
        rows.push((kill_and_recover_check(&fw), t.elapsed().as_secs_f64()));
    }
    for ((name, ok), secs) in &rows {
        println!(
            "{name:<58} {:>6} {secs:>9.1}",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    if rows.iter().any(|r| !r.0 .1) {
        bail!("power-cut checks failed");
    }
    Ok(())
}

// ---- issue 16: namespace change and surprise removal under QEMU ---------------------------

/// The surprise-removal stand-in's ROM: one NVMe BAR0 (16 KiB in QEMU 7.2) of all ones.
fn removal_rom(work: &Path) -> Result<PathBuf> {
    let rom = work.join("removed-window.rom");
    std::fs::write(&rom, vec![0xFFu8; 16 << 10])?;
    Ok(rom)
}

/// The numbers of the oracle's `oracle removal:` line, by the words before each.
fn removal_numbers(o: &Outcome) -> Option<Vec<u64>> {
    let line = o
        .log
        .iter()
        .find(|l| l.contains("oracle removal: drive 0 removed"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let pick = |after: &str| -> Option<u64> {
        let n = after.split_whitespace().count();
        (0..words.len().saturating_sub(n)).find_map(|i| {
            (words[i..i + n].join(" ") == after)
                .then(|| words.get(i + n)?.trim_end_matches([',', ';']).parse().ok())
                .flatten()
        })
    };
    [
        "detected by",
        "in flight at detection",
        "failed Removed",
        "later I/Os refused Removed",
        "refused SubmitError::Removed on",
        "unexpected outcomes",
        "the removal",
    ]
    .iter()
    .map(|w| pick(w))
    .collect()
}

/// Whether namespace `ns` of drive 0 (512-byte blocks) holds the storage pattern of `seed`
/// on blocks `lba..lba + blocks` and zeroes everywhere else, byte for byte.
fn pattern_alone_on(work: &Path, ns: u32, lba: u64, blocks: u64, seed: u64) -> Result<bool> {
    let img = std::fs::read(qemu::ns_image(work, 0, ns))?;
    let mut bad = None;
    for (b, block) in img.chunks(512).enumerate() {
        let b = b as u64;
        let ok = if (lba..lba + blocks).contains(&b) {
            (0..512).step_by(8).all(|off| {
                block[off..off + 8] == keel_jobs::storage::pattern(ns, b, off, seed).to_le_bytes()
            })
        } else {
            block.iter().all(|&x| x == 0)
        };
        if !ok {
            bad = Some(b);
            break;
        }
    }
    if let Some(b) = bad {
        eprintln!("xtask: ns {ns} image: block {b} is not what it should be");
    }
    Ok(bad.is_none())
}

/// Namespace attachment and surprise removal on QEMU's NVMe emulation (issue 16).
fn event_cases(work: &Path) -> Result<Vec<Case>> {
    let mut v = Vec::new();
    // Namespace change: namespace 2 of drive 0 is in the NVM subsystem but detached
    // (`nvme-ns,detached=true`). While core 1 rewrites namespace 1, core 0 attaches it
    // (Namespace Attachment), QEMU sends the namespace-attribute notice, the driver reads the
    // Changed Namespace List and rescans; 32 writes of 16 blocks go to it; it is detached
    // again, and I/O to it is refused typed (device, then driver). The host checks both
    // images byte for byte: the pattern exactly where each namespace was written, zeroes
    // everywhere else.
    let w = work.to_path_buf();
    v.push(Case {
        name: "namespace change: attach ns 2 while ns 1 does I/O; notice, changed list, rescan; write it; detach: refused typed; host checks both images"
            .into(),
        vm: VmOpts {
            smp: 2,
            drive_shapes: vec!["ns=2,detached=2".into()],
            timeout: 60,
            ..VmOpts::default()
        },
        cmdline: "nschange writes=32 blocks=16 lba=2048 ns1_blocks=256",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "ns 2: the pattern at 2048..2560, zeroes elsewhere; ns 1: core 1's pattern at 2048..2304, zeroes elsewhere (host)",
                Box::new(move |_o: &Outcome| {
                    let seed = 0x6e73_6368;
                    pattern_alone_on(&w, 2, 2048, 32 * 16, seed).unwrap_or(false)
                        && pattern_alone_on(&w, 1, 2048, 256, seed).unwrap_or(false)
                }),
            ),
            (
                "attach: notice, rescan added ns 2, the controller list names us",
                Box::new(|o: &Outcome| {
                    o.has("nschange ns 2 attached to controller 0: notice, changed list read, rescan: added, 131072 blocks of 512 B; attached-controller list names us true")
                        && o.count("nvme: async event Notice info 0x0 log page 0x4") == 2
                }),
            ),
            (
                "detach: rescan removed it, refused by the device (Invalid) and then the driver (InvalidNamespace)",
                Box::new(|o: &Outcome| {
                    o.has("rescan: removed; attached-controller list names us false; a read on the pair created before: Err(Io(Invalid)) (device); after refresh_namespaces: Err(InvalidNamespace) (driver)")
                }),
            ),
            (
                "ns 1 kept working before, during and after, nothing failed",
                Box::new(|o: &Outcome| {
                    let n: Vec<u64> = o
                        .log
                        .iter()
                        .find_map(|l| l.split("nschange ns 1: writes verified ").nth(1))
                        .map(|r| {
                            r.split(|c: char| !c.is_ascii_digit())
                                .filter_map(|w| w.parse().ok())
                                .collect()
                        })
                        .unwrap_or_default();
                    // before, during, (ns 2), after, failed
                    matches!(n[..], [b, d, 2, a, 0] if b > 0 && d > 0 && a >= 8)
                }),
            ),
        ],
    });
    // Surprise removal: QMP `device_del` cannot take an NVMe function away without the guest
    // (ACPI or native PCIe hotplug waits for it to eject / power off the slot; on the q35 root
    // bus it is refused), so the firmware pulls drive 0 itself, 400 ms into the oracle's load
    // on 2 cores x 2 drives: Memory Space and Bus Master Enable off (no more decoding, no
    // DMA), and — as QEMU reads an undecoded window as zeroes, where a real root port
    // returns all ones — a pci-testdev's all-ones ROM over its BAR0. Every tag in flight on
    // drive 0 fails once with Removed, later ones are refused, drive 1 goes on; the host
    // checks every block of both images (drive 0: what was acknowledged before).
    let rom = removal_rom(work)?;
    let w = work.to_path_buf();
    v.push(Case {
        name: "surprise removal: drive 0 pulled mid-load on 2 cores x 2 drives; its tags fail once Removed; drive 1 goes on; host checks every block"
            .into(),
        vm: VmOpts {
            smp: 2,
            drives: 2,
            timeout: 60,
            qemu_args: vec![
                "-device".into(),
                format!("pci-testdev,romfile={}", rom.display()),
            ],
            ..VmOpts::default()
        },
        cmdline: "oracle ms=1200 blocks=256 qd=16 remove_ms=400",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "every block as the record says, both drives (host)",
                Box::new(move |o: &Outcome| match oracle_check(&w, o, 2, 512) {
                    Ok(n) => n > 100,
                    Err(e) => {
                        eprintln!("xtask: oracle check: {e}");
                        false
                    }
                }),
            ),
            (
                "the window reads zeroes undecoded, all ones with the stand-in",
                Box::new(|o: &Outcome| {
                    o.has("CSTS reads 0x00000000 undecoded (QEMU), 0xffffffff with the all-ones ROM")
                }),
            ),
            (
                "both pairs saw CSTS all ones",
                Box::new(|o: &Outcome| {
                    o.has("nvme: q1 device gone (CSTS all ones)")
                        && o.has("nvme: q2 device gone (CSTS all ones)")
                }),
            ),
            (
                "every tag in flight failed once with Removed, later ones refused, drive 1 went on",
                Box::new(|o: &Outcome| {
                    matches!(
                        removal_numbers(o).as_deref(),
                        Some(&[2, at, failed, later, 2, 0, others])
                            if at > 0 && failed == at && later > 0 && others > 0
                    )
                }),
            ),
        ],
    });
    // Without the stand-in the board cannot make the window read all ones: it refuses to
    // fake the removal (QEMU's zeroes would look like a live controller), typed, at once.
    v.push(case(
        "surprise removal without the all-ones stand-in: the board refuses, typed",
        VmOpts {
            smp: 2,
            drives: 2,
            timeout: 60,
            ..VmOpts::default()
        },
        "oracle ms=600 blocks=64 qd=4 remove_ms=100",
        false,
        vec![
            ("the job fails: the board cannot remove a drive", |o| {
                o.has("job oracle: FAIL: the board cannot remove a drive (Board::fault_remove)")
            }),
            ("the board says why", |o| {
                o.has("cannot fake a removal: NoStandin")
            }),
        ],
    ));
    Ok(v)
}
