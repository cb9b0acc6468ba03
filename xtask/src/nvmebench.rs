//! `cargo xtask bench`: the firmware's `bench` job over a matrix of workloads on QEMU's NVMe
//! (null-backed, so the device costs what QEMU's emulation costs and no disk I/O), then the host
//! criterion benchmarks. Results print as a table; speed claims are ratios inside one run.

use std::path::Path;

use anyhow::{bail, Result};

use crate::qemu::{self, VmOpts};

/// One workload of the matrix.
struct Load {
    name: &'static str,
    cmdline: String,
}

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
    let mut loads = vec![];
    for (name, pat, bs, qd) in [
        ("4K randread QD1", "randread", "4K", 1),
        ("4K randread QD32", "randread", "4K", 32),
        ("4K randwrite QD1", "randwrite", "4K", 1),
        ("4K randwrite QD32", "randwrite", "4K", 32),
        ("128K seq write QD32", "write", "128K", 32),
    ] {
        for &c in cores {
            loads.push(Load {
                name,
                cmdline: format!("bench pattern={pat} bs={bs} qd={qd} secs={secs} cores={c}"),
            });
        }
    }
    println!("xtask: NVMe bench on QEMU ({why}), null-backed namespace, {secs} s per workload");
    let mut rows = vec![];
    for (i, l) in loads.iter().enumerate() {
        qemu::progress(
            false,
            &format!("xtask: [{}/{}] {}", i + 1, loads.len(), l.cmdline),
        );
        let cores = l
            .cmdline
            .rsplit("cores=")
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1usize);
        let vm = VmOpts {
            accel,
            smp: cores.max(1),
            timeout: secs * 4 + 30,
            qemu_args: vec![],
            null_backend: true,
            ..VmOpts::default()
        };
        let out = qemu::run(fw, &vm, &l.cmdline, &work, qemu::Verbosity::Quiet)?;
        let b = parse_total(&out.log);
        if !out.passed() || b.is_none() {
            for line in out.all_lines() {
                eprintln!("    {line}");
            }
            bail!("bench '{}' failed: {}", l.cmdline, out.verdict());
        }
        rows.push((l.name, cores, b.unwrap_or_default()));
    }
    println!();
    println!(
        "{:<22} {:>5} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "workload", "cores", "IOPS", "MB/s", "avg µs", "p99 µs", "errors"
    );
    println!(
        "{:-<22} {:->5} {:->11} {:->9} {:->9} {:->9} {:->7}",
        "", "", "", "", "", "", ""
    );
    for (n, c, b) in &rows {
        println!(
            "{n:<22} {c:>5} {:>11.0} {:>9.1} {:>9.2} {:>9.0} {:>7}",
            b.iops, b.mbps, b.avg_us, b.p99_us, b.errors
        );
    }
    if cores.len() > 1 {
        println!();
        println!("scaling (IOPS with N cores / IOPS with {} core):", cores[0]);
        for name in rows
            .iter()
            .map(|r| r.0)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let base = rows
                .iter()
                .find(|r| r.0 == name && r.1 == cores[0])
                .map(|r| r.2.iops)
                .unwrap_or(0.0);
            let ratios: Vec<String> = rows
                .iter()
                .filter(|r| r.0 == name)
                .map(|r| {
                    format!(
                        "{}c {:.2}x",
                        r.1,
                        if base > 0.0 { r.2.iops / base } else { 0.0 }
                    )
                })
                .collect();
            println!("  {name:<22} {}", ratios.join("  "));
        }
    }
    Ok(())
}
