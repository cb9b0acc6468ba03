//! `cargo xtask instr`: instructions per I/O (submit + complete) on the host, counted by
//! valgrind's callgrind. Runs `platform/model/examples/instr_io.rs` (the raw queue pair, and the
//! reactor with one `submit` per I/O) and `instr_burst.rs` (the reactor with one `submit_burst`
//! per batch, the firmware bench's path) with two I/O counts and takes the difference, so bring-up and setup cancel out. The model controller executes
//! commands inside the driver's doorbell writes; its cost (everything inside the model's
//! `Mmio::write32`/`read32`, counted by a second run with callgrind's `--toggle-collect` on
//! them) is reported separately and subtracted for the driver figure.

use std::process::Command;

use anyhow::{bail, Context, Result};

struct Count {
    total: u64,
    model: Option<u64>,
}

fn num(s: &str) -> Option<u64> {
    s.trim().replace(',', "").parse().ok()
}

/// Instructions valgrind's callgrind counted in one run of the example; with `model_only`,
/// only inside the model's MMIO entry points (`--toggle-collect` on `write32` / `read32`: their
/// whole inclusive cost, once, whatever was inlined into them).
fn collected(
    bin: &std::path::Path,
    ios: u64,
    batch: u64,
    mode: &str,
    model_only: bool,
) -> Result<u64> {
    let what = if model_only { "model" } else { "all" };
    let ex = bin.file_name().and_then(|n| n.to_str()).unwrap_or("instr");
    let out = crate::work_dir().join(format!("callgrind.{ex}.{mode}.{ios}.{batch}.{what}.out"));
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()));
    if model_only {
        c.arg("--collect-atstart=no");
        for f in ["write32", "read32"] {
            c.arg(format!(
                "--toggle-collect=<keel_model::nvme::ModelMmio as keel_hal::Mmio>::{f}"
            ));
        }
    }
    let o = c
        .arg(bin)
        .args([ios.to_string(), batch.to_string(), mode.to_string()])
        .output()
        .context("running valgrind (is it installed?)")?;
    if !o.status.success() {
        bail!(
            "valgrind failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .find_map(|l| l.split("Collected :").nth(1).and_then(num))
        .context("no 'Collected' line in callgrind output")
}

fn measure(bin: &std::path::Path, ios: u64, batch: u64, mode: &str) -> Result<Count> {
    let total = collected(bin, ios, batch, mode, false)?;
    // Before 2026-12-03 the model's cost was summed from `callgrind_annotate --inclusive`
    // rows, which list a function once per source file inlined into it: the model's inlined
    // parts were counted twice and the driver figures came out too low (by ~190 at batch 1).
    let model = collected(bin, ios, batch, mode, true)
        .ok()
        .filter(|&m| m > 0);
    Ok(Count { total, model })
}

pub fn run() -> Result<()> {
    let mut c = crate::cargo_cmd();
    c.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "keel-model",
        "--example",
        "instr_io",
        "--example",
        "instr_burst",
    ]);
    if !c.status()?.success() {
        bail!("building the instr_io / instr_burst examples failed");
    }
    std::fs::create_dir_all(crate::work_dir())?;
    let examples = crate::target_dir().join("release/examples");
    let (lo, hi) = (1_000u64, 11_000u64);
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "4 KiB reads, instructions per I/O", "total", "model", "driver"
    );
    // (example, mode, row name)
    let rows = [
        ("instr_io", "raw", "raw queue pair"),
        ("instr_io", "reactor", "reactor + aio handles"),
        ("instr_burst", "reactor", "the same, submit_burst"),
    ];
    for (example, mode, label) in rows {
        let bin = examples.join(example);
        for batch in [1u64, 16, 32] {
            let a = measure(&bin, lo, batch, mode)?;
            let b = measure(&bin, hi, batch, mode)?;
            let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / (hi - lo) as f64;
            let total = per(a.total, b.total);
            let (model, driver) = match (a.model, b.model) {
                (Some(x), Some(y)) if y > 0 => {
                    let m = per(x, y);
                    (format!("{m:.0}"), format!("{:.0}", total - m))
                }
                _ => ("n/a".into(), "n/a".into()),
            };
            let name = format!("{label}, batch {batch}");
            println!("{name:<36} {total:>10.0} {model:>10} {driver:>10}");
        }
    }
    println!("driver = total - model (the software controller runs inside the doorbell write);");
    println!("(instructions per submit + complete; {lo} vs {hi} I/Os, callgrind)");
    Ok(())
}
