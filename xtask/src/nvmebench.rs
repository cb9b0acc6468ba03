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

/// One workload: (name, pattern, bs, qd, stack, cores, firmware options, QEMU nvme ioeventfd).
type Load = (
    &'static str,
    &'static str,
    &'static str,
    usize,
    &'static str,
    usize,
    &'static str,
    bool,
);

/// A measured row: (name, stack, cores, device settings, result).
type Row = (&'static str, &'static str, usize, &'static str, BenchLine);

/// QEMU arguments that turn on the NVMe device's ioeventfd doorbells.
fn ioeventfd_args() -> Vec<String> {
    vec!["-global".to_string(), "nvme.ioeventfd=on".to_string()]
}

pub fn run_matrix(fw: &Path, secs: u64, cores: &[usize]) -> Result<()> {
    let work = crate::work_dir();
    std::fs::create_dir_all(&work)?;
    let (accel, why) = qemu::choose_accel(qemu::Accel::Auto, fw, &work);
    // QD1 rows run with ioeventfd too: the doorbell then costs an eventfd write instead of
    // running QEMU's doorbell handler in the vCPU thread, which measured faster at both depths.
    let r1 = ("4K randread QD1", "randread", "4K", 1);
    let r32 = ("4K randread QD32", "randread", "4K", 32);
    let mut loads: Vec<Load> = vec![
        (r1.0, r1.1, r1.2, r1.3, "raw", 1, "", false),
        (r1.0, r1.1, r1.2, r1.3, "raw", 1, "dbbuf=on", false),
        (r1.0, r1.1, r1.2, r1.3, "raw", 1, "", true),
        (r1.0, r1.1, r1.2, r1.3, "full", 1, "", true),
        (r32.0, r32.1, r32.2, r32.3, "raw", 1, "", false),
        (r32.0, r32.1, r32.2, r32.3, "full", 1, "", false),
        (r32.0, r32.1, r32.2, r32.3, "ceil", 1, "", true),
        (r32.0, r32.1, r32.2, r32.3, "raw", 1, "", true),
        (r32.0, r32.1, r32.2, r32.3, "full", 1, "", true),
        (
            "4K randwrite QD1",
            "randwrite",
            "4K",
            1,
            "full",
            1,
            "",
            true,
        ),
        (
            "4K randwrite QD32",
            "randwrite",
            "4K",
            32,
            "full",
            1,
            "",
            true,
        ),
        (
            "128K seq write QD32",
            "write",
            "128K",
            32,
            "full",
            1,
            "",
            true,
        ),
    ];
    for &c in cores.iter().filter(|&&c| c > 1) {
        loads.push((
            "4K randread QD32",
            "randread",
            "4K",
            32,
            "full",
            c,
            "",
            true,
        ));
    }
    println!("xtask: NVMe bench on QEMU ({why}), null-backed namespace, {secs} s per workload");
    let mut rows: Vec<Row> = vec![];
    for (i, &(name, pat, bs, qd, stack, c, extra, ioeventfd)) in loads.iter().enumerate() {
        let raw = match stack {
            "raw" => "on",
            "ceil" => "ceiling",
            _ => "off",
        };
        let cmdline =
            format!("bench pattern={pat} bs={bs} qd={qd} secs={secs} cores={c} raw={raw} {extra}");
        let cmdline = cmdline.trim().to_string();
        let note = if ioeventfd {
            " (QEMU nvme.ioeventfd=on)"
        } else {
            ""
        };
        qemu::progress(
            false,
            &format!("xtask: [{}/{}] {cmdline}{note}", i + 1, loads.len()),
        );
        let qemu_args = if ioeventfd { ioeventfd_args() } else { vec![] };
        let vm = VmOpts {
            accel,
            smp: c,
            timeout: secs * 4 + 30,
            null_backend: true,
            qemu_args,
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
        let device = match (extra.contains("dbbuf=on"), ioeventfd) {
            (true, true) => "dbbuf+ioeventfd",
            (true, false) => "dbbuf",
            (false, true) => "ioeventfd",
            (false, false) => "default",
        };
        rows.push((name, stack, c, device, b.unwrap_or_default()));
    }
    println!();
    println!(
        "{:<22} {:<6} {:<10} {:>5} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "workload", "stack", "device", "cores", "IOPS", "MB/s", "avg µs", "p99 µs", "errors"
    );
    println!(
        "{:-<22} {:-<6} {:-<10} {:->5} {:->11} {:->9} {:->9} {:->9} {:->7}",
        "", "", "", "", "", "", "", "", ""
    );
    for (n, st, c, dev, b) in &rows {
        println!(
            "{n:<22} {st:<6} {dev:<10} {c:>5} {:>11.0} {:>9.1} {:>9.2} {:>9.0} {:>7}",
            b.iops, b.mbps, b.avg_us, b.p99_us, b.errors
        );
    }
    println!("device: default = QEMU 7.2 nvme defaults; dbbuf = shadow doorbells (firmware dbbuf=on); ioeventfd = -global nvme.ioeventfd=on");
    println!("stack: raw = the leanest loop on the queue pair; full = reactor + I/O handles; ceil = the device's ceiling (one prebuilt read resubmitted, no driver work: bench raw=ceiling)");
    let find = |n: &str, st: &str, c: usize, dev: &str| {
        rows.iter()
            .find(|r| r.0 == n && r.1 == st && r.2 == c && r.3 == dev)
            .map(|r| r.4.clone())
    };
    println!();
    println!("ratios measured in this run:");
    let ratio = |label: String, num: Option<BenchLine>, den: Option<BenchLine>| {
        if let (Some(n), Some(d)) = (num, den) {
            println!("  {label} = {:.2}", n.iops / d.iops.max(1.0));
        }
    };
    let qd1 = "4K randread QD1";
    let qd32 = "4K randread QD32";
    let io = "ioeventfd";
    // (workload, what, numerator (stack, device), denominator (stack, device)), one core.
    for (w, what, (ns, nd), (ds, dd)) in [
        (
            qd1,
            "full stack / raw loop IOPS, separate boots (goal: interleaved rows below)",
            ("full", io),
            ("raw", io),
        ),
        (
            qd32,
            "full stack / raw loop IOPS, separate boots (goal: interleaved rows below)",
            ("full", io),
            ("raw", io),
        ),
        (
            qd32,
            "raw loop / device ceiling IOPS",
            ("raw", io),
            ("ceil", io),
        ),
        (
            qd32,
            "full stack / device ceiling IOPS",
            ("full", io),
            ("ceil", io),
        ),
        (
            qd1,
            "raw, ioeventfd / default device IOPS",
            ("raw", io),
            ("raw", "default"),
        ),
        (
            qd1,
            "raw, dbbuf / default device IOPS",
            ("raw", "dbbuf"),
            ("raw", "default"),
        ),
        (
            qd32,
            "raw, ioeventfd / default device IOPS",
            ("raw", io),
            ("raw", "default"),
        ),
        (
            qd32,
            "full, ioeventfd / default device IOPS",
            ("full", io),
            ("full", "default"),
        ),
    ] {
        ratio(
            format!("{w:<18} {what}"),
            find(w, ns, 1, nd),
            find(w, ds, 1, dd),
        );
    }
    // The reference: SPDK v24.09 spdk_nvme_perf on this machine's QEMU (TCG), same
    // device shape, null backend, one core: ~327k IOPS at QD32, ~39k IOPS (25 µs) at QD1.
    for device in ["default", "ioeventfd"] {
        if let Some(f) = find(qd32, "full", 1, device) {
            println!(
                "  {qd32:<18} full stack, {device} device / SPDK reference (327k IOPS) = {:.2} (goal >= 1.30)",
                f.iops / 327_000.0
            );
        }
    }
    if let Some(f) = find(qd1, "full", 1, "ioeventfd") {
        println!(
            "  {qd1:<18} full stack average latency = {:.1} µs (goal <= 20; SPDK reference 25 µs)",
            f.avg_us
        );
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    for &c in cores.iter().filter(|&&c| c > 1) {
        ratio(
            format!("{qd32:<18} {c} cores / 1 core IOPS (this host has {cpus} CPUs for all vCPUs and QEMU's device thread)"),
            find(qd32, "full", c, "ioeventfd"),
            find(qd32, "full", 1, "ioeventfd"),
        );
    }
    // The layers' cost with the host's noise shared: raw and full-stack rounds interleaved on
    // the same queue pair in one boot.
    println!();
    println!("full stack vs raw loop vs device ceiling, interleaved rounds in one boot (same queue pair):");
    for (label, qd, dev_args, fw_extra) in [
        ("4K randread QD1 ", 1, ioeventfd_args(), ""),
        ("4K randread QD32", 32, ioeventfd_args(), ""),
    ] {
        qemu::progress(false, &format!("xtask: interleaved full/raw, {label}"));
        let vm = VmOpts {
            accel,
            smp: 1,
            timeout: secs * 4 + 30,
            null_backend: true,
            qemu_args: dev_args,
            ..VmOpts::default()
        };
        let cmdline = format!(
            "bench pattern=randread bs=4K qd={qd} secs={} raw=both {fw_extra}",
            secs * 2
        );
        let out = qemu::run(fw, &vm, cmdline.trim(), &work, qemu::Verbosity::Quiet)?;
        let find_line = |key: &str| {
            out.log
                .iter()
                .find_map(|l| l.split(key).nth(1).map(str::to_string))
        };
        match (
            out.passed(),
            find_line("bench raw iops="),
            find_line("bench ceiling iops="),
        ) {
            (true, Some(raw), Some(ceiling)) => {
                println!("  {label}: raw iops={raw} (goal >= 0.90)");
                println!("  {label}: ceiling iops={ceiling}");
            }
            _ => bail!("interleaved bench failed: {}", out.verdict()),
        }
    }
    // Deployment shapes: two drives driven by one core, and four cores on two queues (cores
    // 2 and 3 send their I/O through the queue owners). Per-drive and total rows.
    println!();
    println!("topology (4K randread QD32 per core, full stack, null-backed, ioeventfd):");
    println!(
        "  {:<38} {:>8} {:>11} {:>9} {:>9}",
        "shape", "drive", "IOPS", "MB/s", "avg µs"
    );
    for (label, drives, smp, qpairs) in [
        ("two drives, one core", 2usize, 1usize, 64u32),
        ("four cores, two queues (one drive)", 1, 4, 2),
    ] {
        qemu::progress(false, &format!("xtask: topology: {label}"));
        let vm = VmOpts {
            accel,
            smp,
            drives,
            max_ioqpairs: qpairs,
            timeout: secs * 4 + 30,
            null_backend: true,
            qemu_args: ioeventfd_args(),
            ..VmOpts::default()
        };
        let cmdline = format!("bench pattern=randread bs=4K qd=32 secs={secs} cores={smp}");
        let out = qemu::run(fw, &vm, &cmdline, &work, qemu::Verbosity::Quiet)?;
        let total = parse_total(&out.log);
        if !out.passed() || total.is_none() {
            bail!("topology bench '{label}' failed: {}", out.verdict());
        }
        for l in out.log.iter().filter(|l| l.contains("bench drive=")) {
            let v = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or("-")
                    .to_string()
            };
            println!(
                "  {label:<38} {:>8} {:>11} {:>9} {:>9}",
                v("drive="),
                v("iops="),
                v("mbps="),
                "-"
            );
        }
        if let Some(t) = total {
            println!(
                "  {label:<38} {:>8} {:>11.0} {:>9.1} {:>9.2}",
                "total", t.iops, t.mbps, t.avg_us
            );
        }
    }
    // The writer against the raw sequential write, in one boot.
    qemu::progress(false, "xtask: logbench (writer vs raw sequential write)");
    let vm = VmOpts {
        accel,
        smp: 1,
        timeout: secs * 6 + 30,
        null_backend: true,
        disk_size: "2G".into(),
        ..VmOpts::default()
    };
    let out = qemu::run(
        fw,
        &vm,
        &format!("logbench ms={}", secs * 1000),
        &work,
        qemu::Verbosity::Quiet,
    )?;
    if !out.passed() {
        bail!("logbench failed: {}", out.verdict());
    }
    println!();
    println!("writer vs raw sequential write (one boot, null-backed, {secs} s each):");
    for l in out.log.iter().filter_map(|l| l.split("logbench | ").nth(1)) {
        println!("  {}", l.replace(" | ", "  |  "));
    }
    println!();
    println!("  reference (issue text, same device under TCG): SPDK perf 327k IOPS QD32, 39k IOPS / 25 µs QD1");
    Ok(())
}
