//! `cargo xtask bench`: the firmware's `bench` job over a matrix of workloads on QEMU's NVMe
//! (null-backed, so the device costs what QEMU's emulation costs and no disk I/O), then the host
//! criterion benchmarks. Results print as a table; speed claims are ratios inside one run.

use std::path::Path;

use anyhow::{bail, Result};

use crate::qemu::{self, VmOpts};

/// Parsed `bench total ...` line of the firmware.
#[derive(Default, Debug, Clone)]
pub struct BenchLine {
    pub iops: f64,
    pub mbps: f64,
    pub avg_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

pub fn parse_total(lines: &[String]) -> Option<BenchLine> {
    let l = lines.iter().find(|l| l.contains("bench total"))?;
    let mut b = BenchLine::default();
    for kv in l.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let f = v.parse::<f64>().unwrap_or(0.0);
        match k {
            "iops" => b.iops = f,
            "mbps" => b.mbps = f,
            "avg_us" => b.avg_us = f,
            "p99_us" => b.p99_us = f,
            "errors" => b.errors = f as u64,
            _ => {}
        }
    }
    Some(b)
}

pub fn run_matrix(fw: &Path, secs: u64, cores: &[usize]) -> Result<()> {
    let work = crate::work_dir();
    std::fs::create_dir_all(&work)?;
    let (accel, why) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    // (workload, pattern, bs, qd, stack, cores)
    let mut loads: Vec<(&str, &str, &str, usize, &str, usize)> = vec![
        ("4K randread QD1", "randread", "4K", 1, "raw", 1),
        ("4K randread QD1", "randread", "4K", 1, "full", 1),
        ("4K randread QD32", "randread", "4K", 32, "raw", 1),
        ("4K randread QD32", "randread", "4K", 32, "full", 1),
        ("4K randwrite QD1", "randwrite", "4K", 1, "full", 1),
        ("4K randwrite QD32", "randwrite", "4K", 32, "full", 1),
        ("128K seq write QD32", "write", "128K", 32, "full", 1),
    ];
    for &c in cores.iter().filter(|&&c| c > 1) {
        loads.push(("4K randread QD32", "randread", "4K", 32, "full", c));
    }
    println!("xtask: NVMe bench on QEMU ({why}), null-backed namespace, {secs} s per workload");
    let mut rows = vec![];
    for (i, &(name, pat, bs, qd, stack, c)) in loads.iter().enumerate() {
        let cmdline = format!(
            "bench pattern={pat} bs={bs} qd={qd} secs={secs} cores={c} raw={}",
            if stack == "raw" { "on" } else { "off" }
        );
        qemu::progress(
            false,
            &format!("xtask: [{}/{}] {cmdline}", i + 1, loads.len()),
        );
        let vm = VmOpts {
            accel,
            smp: c,
            timeout: secs * 4 + 30,
            null_backend: true,
            ..VmOpts::default()
        };
        let out = qemu::run(fw, &vm, &cmdline, &work, qemu::Verbosity::Quiet)?;
        let b = parse_total(&out.log);
        if !out.passed() || b.is_none() {
            for line in out.all_lines() {
                eprintln!("    {line}");
            }
            bail!("bench '{cmdline}' failed: {}", out.verdict());
        }
        rows.push((name, stack, c, b.unwrap_or_default()));
    }
    println!();
    println!(
        "{:<22} {:<6} {:>5} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "workload", "stack", "cores", "IOPS", "MB/s", "avg µs", "p99 µs", "errors"
    );
    println!(
        "{:-<22} {:-<6} {:->5} {:->11} {:->9} {:->9} {:->9} {:->7}",
        "", "", "", "", "", "", "", ""
    );
    for (n, st, c, b) in &rows {
        println!(
            "{n:<22} {st:<6} {c:>5} {:>11.0} {:>9.1} {:>9.2} {:>9.0} {:>7}",
            b.iops, b.mbps, b.avg_us, b.p99_us, b.errors
        );
    }
    let find = |n: &str, st: &str, c: usize| {
        rows.iter()
            .find(|r| r.0 == n && r.1 == st && r.2 == c)
            .map(|r| r.3.clone())
    };
    println!();
    println!("ratios measured in this run:");
    for n in ["4K randread QD1", "4K randread QD32"] {
        if let (Some(full), Some(raw)) = (find(n, "full", 1), find(n, "raw", 1)) {
            println!(
                "  {n:<18} full stack / raw loop IOPS = {:.2} (goal >= 0.90)",
                full.iops / raw.iops.max(1.0)
            );
        }
    }
    if let Some(one) = find("4K randread QD32", "full", 1) {
        for &c in cores.iter().filter(|&&c| c > 1) {
            if let Some(b) = find("4K randread QD32", "full", c) {
                println!(
                    "  4K randread QD32    {c} cores / 1 core IOPS = {:.2}",
                    b.iops / one.iops.max(1.0)
                );
            }
        }
    }
    println!("  reference (issue text, same device under TCG): SPDK perf 327k IOPS QD32, 39k IOPS / 25 µs QD1");
    Ok(())
}
