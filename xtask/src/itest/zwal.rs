//! The zoned write-ahead log under QEMU (`zlog`): appends on a zoned namespace, a guest reset
//! with appends in flight, the replay on the next boot in the same QEMU process, and the host's
//! check of the disk image against the log's documented layout (`keel_wal::zoned`).
//!
//! Why one QEMU process: QEMU 7.2 keeps a zoned namespace's zone state (write pointers and
//! states) only in memory. `nvme_ns_zoned_init_state` (hw/nvme/ns.c), run at every device
//! realize, makes every zone empty with its write pointer at its start, whatever the image
//! file holds; nothing saves it (the persistent-state file of the early ZNS patches was never
//! merged). So a new QEMU process would report every zone empty and the log would replay as
//! empty: a crash image cannot be replayed in a fresh QEMU. A guest reset keeps the zones: it
//! resets the controller (`nvme_ctrl_reset`: queues freed, namespaces drained — in-flight
//! appends finish), not the namespaces. The firmware resets the machine through port 0xCF9
//! with appends in flight; `-action reboot=reset` (after the board's `-no-reboot`) makes QEMU
//! reboot instead of exiting, and the same job line then finds the log and replays it.
//!
//! Checked by hand (2026-12-03, QEMU 7.2.22): this case's image booted in a new QEMU process
//! with the same zoned namespace (`cargo xtask run --disk IMG --drive ns=1,nsopt=zoned=true,...
//! -- zrecover`) reports `NotFormatted`: every zone empty, though the image holds the log.
//!
//! What a guest reset cannot show: a torn tail. QEMU drains the appends in flight at the reset
//! (all of them land, the replay returns them) and its write cache is the host's page cache, so
//! nothing acknowledged or not is lost; losing unflushed blocks, holes and rewound write pointers
//! are the model's power cuts (`crates/wal/tests/zoned.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use super::Case;
use crate::qemu::{self, Outcome, VmOpts};

/// Blocks per zone of the case's namespace (128 KiB of 512-byte blocks).
const ZONE_BLOCKS: usize = 256;
const BS: usize = 512;
const ZONES: usize = 16;

/// One valid record the host found: sequence number and payload.
type Rec = (u64, Vec<u8>);

/// Zone headers and records of zones `0..ZONES` of `img`, parsed from the layout in
/// `keel_wal::zoned`'s documentation: `(epoch, first_seq, records)` per zone with a valid
/// header of the newest format epoch.
fn parse(img: &[u8]) -> Vec<(u32, u64, Vec<Rec>)> {
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap());
    let mut zones = Vec::new();
    for z in 0..ZONES {
        let start = z * ZONE_BLOCKS * BS;
        if img.len() < start + ZONE_BLOCKS * BS
            || &img[start..start + 8] != b"KEELZWL1"
            || crc.checksum(&img[start..start + 36]) != u32_at(start + 36)
            || u32_at(start + 32) as usize != z
        {
            continue;
        }
        let (fe, epoch, first) = (u32_at(start + 8), u32_at(start + 12), u64_at(start + 16));
        let mut recs = Vec::new();
        let mut b = 1;
        while b < ZONE_BLOCKS {
            let o = start + b * BS;
            let (len, seq, blocks) = (
                u32_at(o + 4) as usize,
                u64_at(o + 8),
                u32_at(o + 20) as usize,
            );
            let ok = &img[o..o + 4] == b"ZREC"
                && u32_at(o + 16) == epoch
                && blocks >= 1
                && b + blocks <= ZONE_BLOCKS
                && len <= BS - 32 + (blocks - 1) * (BS - 8);
            let mut p = Vec::new();
            let mut good = ok;
            if ok {
                p.extend_from_slice(&img[o + 32..o + 32 + len.min(BS - 32)]);
                for k in 1..blocks {
                    let c = o + k * BS;
                    good &= &img[c..c + 4] == b"ZCON" && u32_at(c + 4) == seq as u32;
                    let need = (len - p.len()).min(BS - 8);
                    p.extend_from_slice(&img[c + 8..c + 8 + need]);
                }
                let mut d = crc.digest();
                d.update(&img[o..o + 24]);
                d.update(&img[o + 28..o + 32]);
                d.update(&p);
                good &= p.len() == len && d.finalize() == u32_at(o + 24);
            }
            if good {
                recs.push((seq, p));
                b += blocks;
            } else {
                b += 1;
            }
        }
        zones.push((fe, epoch, first, recs));
    }
    let newest = zones.iter().map(|z| z.0).max();
    zones
        .into_iter()
        .filter(|z| Some(z.0) == newest)
        .map(|z| (z.1, z.2, z.3))
        .collect()
}

/// The log's records on the image, walked as the layout says (zones by epoch and first
/// sequence number, each taken only where the last one ended, its dense run of sequence
/// numbers): `seq -> payload` for `0..end`.
fn walk(img: &[u8]) -> BTreeMap<u64, Vec<u8>> {
    let mut zones = parse(img);
    zones.sort_by_key(|z| (z.0, z.1));
    let mut out = BTreeMap::new();
    let mut end = zones.first().map_or(0, |z| z.1);
    for (_, first, recs) in zones {
        if first != end {
            continue;
        }
        let by_seq: BTreeMap<u64, Vec<u8>> = recs.into_iter().collect();
        while let Some(p) = by_seq.get(&end) {
            out.insert(end, p.clone());
            end += 1;
        }
    }
    out
}

/// The first number after `prefix` in `lines`, from the last such line.
fn last_number<'a>(
    lines: impl DoubleEndedIterator<Item = &'a String>,
    prefix: &str,
) -> Option<u64> {
    lines
        .rev()
        .filter_map(|l| l.split(prefix).nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
}

/// The log lines before the crash (the first boot) and after it.
fn boots(o: &Outcome) -> (&[String], &[String]) {
    let crash = o
        .log
        .iter()
        .position(|l| l.contains("zlog: crash:"))
        .map_or(o.log.len(), |i| i + 1);
    o.log.split_at(crash)
}

/// The host's check: every record the firmware acknowledged before the crash is on the image,
/// intact (its payload recomputed here), and so is every record the second boot acknowledged
/// after its replay; the replay's count is at least the first boot's acknowledged count; the
/// second session's first zone has the next epoch and starts where the replay ended; the
/// records the host walks are exactly those of the last acknowledgement.
fn image_holds_acked(o: &Outcome, work: &Path) -> bool {
    let (first, second) = boots(o);
    let (Some(acked), Some(replayed), Some(final_acked)) = (
        last_number(first.iter(), "zlog: acked "),
        last_number(second.iter(), "zlog: replay verified "),
        last_number(second.iter(), "zlog: acked "),
    ) else {
        eprintln!("xtask: zlog: acknowledgements or the replay count not printed");
        return false;
    };
    let Ok(img) = std::fs::read(qemu::ns_image(work, 0, 1)) else {
        eprintln!("xtask: zlog: no image");
        return false;
    };
    let recs = walk(&img);
    let mut buf = [0u8; keel_jobs::zlog::MAX_PAYLOAD];
    for seq in 0..final_acked {
        let n = keel_jobs::zlog::payload(seq, &mut buf);
        match recs.get(&seq) {
            Some(p) if p[..] == buf[..n] => {}
            Some(_) => {
                eprintln!("xtask: zlog: acknowledged record {seq} differs on the image");
                return false;
            }
            None => {
                eprintln!("xtask: zlog: acknowledged record {seq} missing from the image");
                return false;
            }
        }
    }
    let zones = parse(&img);
    let epoch1 = zones.iter().filter(|z| z.0 == 1).count();
    let session2 = zones.iter().filter(|z| z.0 == 2).map(|z| z.1).min();
    let on_image = recs.len() as u64;
    eprintln!(
        "xtask: zlog: acknowledged {acked} before the crash, replayed {replayed}, acknowledged {final_acked} after; \
         the host walks {on_image} records on the image ({epoch1} zones of epoch 1, the second session from {session2:?})"
    );
    replayed >= acked
        && on_image == final_acked
        && session2 == Some(replayed)
        && recs.keys().copied().eq(0..on_image)
}

/// The QEMU case.
pub(super) fn cases(work: &Path) -> Vec<Case> {
    let w = work.to_path_buf();
    vec![Case {
        name: "zoned WAL: zone appends, a guest reset with appends in flight, replay in the same QEMU; host checks every acknowledged record on the image"
            .into(),
        vm: VmOpts {
            smp: 1,
            timeout: 60,
            drive_shapes: vec![
                "ns=1,nsopt=zoned=true,nsopt=zoned.zone_size=128K,nsopt=zoned.zone_capacity=128K"
                    .into(),
            ],
            qemu_args: vec!["-action".into(), "reboot=reset".into()],
            ..VmOpts::default()
        },
        cmdline: "zlog records=400 sync_every=10 crash_at=250 burst=8 zones=16 in_flight=8",
        expect_pass: true,
        expect_timeout: false,
        checks: vec![
            (
                "first boot: formatted, 25 acknowledgements, the crash with 9 appends unacknowledged",
                Box::new(|o: &Outcome| {
                    let (first, _) = boots(o);
                    o.has("zlog: formatted zones 0..16, 512 B blocks")
                        && first.iter().filter(|l| l.contains("zlog: acked ")).count() == 25
                        && o.has("zlog: crash: 259 appended, 250 acknowledged")
                }),
            ),
            (
                "second boot in the same QEMU: the log found and replayed, every record verified, then appended to 400",
                Box::new(|o: &Outcome| {
                    let (_, second) = boots(o);
                    o.count("job zlog: start") == 2
                        && o.has("zlog: the log is there: replaying")
                        && last_number(second.iter(), "zlog: replay verified ")
                            .is_some_and(|n| (250..=259).contains(&n))
                        && o.has("zlog: appended 400 records, acknowledged 400")
                }),
            ),
            (
                "image: every acknowledged record intact (both boots); replay >= acknowledged; the second session in a fresh zone, epoch 2, from the replay's end",
                Box::new(move |o: &Outcome| image_holds_acked(o, &w)),
            ),
        ],
    }]
}
