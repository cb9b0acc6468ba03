//! `cargo xtask instr`: instructions per I/O (submit + complete) on the host, counted by
//! valgrind's callgrind. Runs `platform/model/examples/instr_io.rs` with two I/O counts and
//! takes the difference, so bring-up and setup cancel out. The model controller executes
//! commands inside the driver's doorbell writes; its cost (inclusive cost of the model's
//! `Mmio::write32`/`read32`) is reported separately and subtracted for the driver figure.

use std::process::Command;

use anyhow::{bail, Context, Result};

struct Count {
    total: u64,
    model: Option<u64>,
}

fn num(s: &str) -> Option<u64> {
    s.trim().replace(',', "").parse().ok()
}

fn measure(bin: &std::path::Path, ios: u64, batch: u64, mode: &str) -> Result<Count> {
    let out = crate::work_dir().join(format!("callgrind.{mode}.{ios}.{batch}.out"));
    let o = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
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
    let log = String::from_utf8_lossy(&o.stderr);
    let total = log
        .lines()
        .find_map(|l| l.split("Collected :").nth(1).and_then(num))
        .context("no 'Collected' line in callgrind output")?;
    // Inclusive cost of the model's MMIO entry points (top-level rows, not call rows).
    let model = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(&out)
        .output()
        .ok()
        .map(|a| {
            String::from_utf8_lossy(&a.stdout)
                .lines()
                .filter(|l| !l.contains("=>"))
                .filter(|l| {
                    ["write32", "read32"].iter().any(|f| {
                        let pat = format!("ModelMmio as keel_hal::Mmio>::{f}");
                        l.split_once(&pat)
                            .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with(" ["))
                    })
                })
                .filter_map(|l| l.split_whitespace().next().and_then(num))
                .sum()
        });
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
    ]);
    if !c.status()?.success() {
        bail!("building the instr_io example failed");
    }
    std::fs::create_dir_all(crate::work_dir())?;
    let bin = crate::target_dir().join("release/examples/instr_io");
    let (lo, hi) = (1_000u64, 11_000u64);
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "4 KiB reads, instructions per I/O", "total", "model", "driver"
    );
    for mode in ["raw", "reactor"] {
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
            let name = if mode == "raw" {
                format!("raw queue pair, batch {batch}")
            } else {
                format!("reactor + aio handles, batch {batch}")
            };
            println!("{name:<36} {total:>10.0} {model:>10} {driver:>10}");
        }
    }
    println!("driver = total - model (the software controller runs inside the doorbell write);");
    println!("(instructions per submit + complete; {lo} vs {hi} I/Os, callgrind)");
    Ok(())
}
