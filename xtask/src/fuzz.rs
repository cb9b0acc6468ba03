//! `cargo xtask fuzz`: the device-responses libFuzzer target (`crates/nvme/fuzz`), built with
//! nightly and SanitizerCoverage the way cargo-fuzz does it (cargo-fuzz itself is not needed),
//! and the misbehaviour-matrix step of `cargo xtask test`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::itest::Verdict;

const TARGET: &str = "device_responses";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
const SANCOV: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

fn fuzz_dir() -> PathBuf {
    crate::root().join("crates/nvme/fuzz")
}

fn out_dir() -> PathBuf {
    crate::root().join("target").join("fuzz")
}

/// A rustup-proxied `cargo` (not `$CARGO`, which is pinned to the stable toolchain).
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly");
    for v in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(v);
    }
    c
}

pub fn nightly_available() -> bool {
    nightly_cargo()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Builds the target and fuzzes for `secs` seconds. Fails on a crash (panic, hang, OOM).
/// Returns libFuzzer's final `#N DONE cov: X ft: Y ...` line.
pub fn run(secs: u64) -> Result<String> {
    if !nightly_available() {
        bail!("the nightly toolchain is not installed (rustup toolchain install nightly)");
    }
    let out = out_dir();
    let st = nightly_cargo()
        .current_dir(fuzz_dir())
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            TRIPLE,
            "--bin",
            TARGET,
        ])
        .env("CARGO_TARGET_DIR", &out)
        .env("RUSTFLAGS", SANCOV)
        .status()
        .context("running cargo +nightly build")?;
    if !st.success() {
        bail!("building the fuzz target failed");
    }
    let bin = out.join(TRIPLE).join("release").join(TARGET);
    let corpus = out.join("corpus");
    let artifacts = out.join("artifacts");
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    eprintln!(
        "xtask: fuzzing {TARGET} for {secs} s (corpus {})",
        corpus.display()
    );
    let t = Instant::now();
    // The first directory collects new inputs; the committed seeds and regression inputs are
    // read from the others (and run in plain `cargo test` by crates/nvme/tests/hostile.rs).
    let o = Command::new(&bin)
        .arg(format!("-max_total_time={secs}"))
        .args(["-max_len=1024", "-rss_limit_mb=1024", "-timeout=10"])
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(fuzz_dir().join("corpus").join(TARGET))
        .arg(fuzz_dir().join("regressions").join(TARGET))
        .output()
        .context("running the fuzz target")?;
    let log = String::from_utf8_lossy(&o.stderr);
    let done_line = log
        .lines()
        .find(|l| l.starts_with('#') && l.contains("DONE"))
        .unwrap_or("")
        .to_string();
    if !o.status.success() || done_line.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        bail!(
            "the fuzz target failed (artifacts in {}; copy the crash input to \
             crates/nvme/fuzz/regressions/{TARGET}/ so plain `cargo test` keeps checking it)",
            artifacts.display()
        );
    }
    println!(
        "xtask: fuzz {TARGET}: {done_line} ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(done_line)
}

/// `cargo xtask test` steps: the misbehaviour matrix (table printed) and a short fuzz run
/// (skipped, not failed, without nightly).
pub fn test_steps(fuzz_secs: u64) -> Vec<(String, Verdict, f64)> {
    let mut rows = Vec::new();
    let mut c = crate::cargo_cmd();
    c.args([
        "test",
        "--quiet",
        "-p",
        "keel-nvme",
        "--test",
        "hostile",
        "--",
        "--nocapture",
    ]);
    let (ok, t) = crate::step("misbehaviour matrix (crates/nvme/tests/hostile.rs)", c);
    rows.push(("misbehaviour matrix".into(), ok.into(), t));
    eprintln!("xtask: ── fuzz {TARGET} ({fuzz_secs} s) ──");
    let t = Instant::now();
    if !nightly_available() {
        println!("xtask: fuzz: SKIPPED: no nightly toolchain (rustup toolchain install nightly)");
        rows.push((
            format!("fuzz {TARGET} (no nightly toolchain)"),
            Verdict::Skipped,
            0.0,
        ));
        return rows;
    }
    let r = run(fuzz_secs);
    if let Err(e) = &r {
        eprintln!("xtask: fuzz: {e:#}");
    }
    rows.push((
        format!("fuzz {TARGET} {fuzz_secs} s"),
        r.is_ok().into(),
        t.elapsed().as_secs_f64(),
    ));
    rows
}
