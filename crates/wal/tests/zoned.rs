//! keel-wal's zoned log ([`ZonedWal`]) over the real NVMe driver and the software controller's
//! zoned namespace, with appends placed out of order and simulated power cuts (the model's
//! volatile write cache, whose cut also rewinds the zones' write pointers).
//!
//! Every check of recovered data is against the payload function here, and the zones' blocks
//! are also parsed from the model's media image by this file's own parser of the documented
//! layout (not the log's code).

mod common;
use common::Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use keel_blockdev::{BlockOp, BlockQueue, DevStatus, IoError, NsId, SubmitError, TimedOut};
use keel_model::{
    Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NsConfig, NvmeModel, ZoneConfig,
};
use keel_nvme::{Config as NvmeConfig, Controller, IoQueuePair, ZoneAction, ZoneOp, ZoneState};
use keel_wal::zoned::{Error, Recovered, ZoneQueue, ZonedConfig, ZonedWal};

type Qp = IoQueuePair<ModelMmio, ModelClock>;
type Log = ZonedWal<Dq, ModelClock>;

const ZONE: u64 = 64;
const CAP: u64 = 60;
const ZONES: u64 = 16;
const BS: usize = 512;
/// The log's zones: 2..2 + range.
const FIRST: u64 = 2;

/// The payload of record `seq` (0 to 1500 bytes: one to four blocks).
fn payload(seq: u64) -> Vec<u8> {
    let len = (seq.wrapping_mul(7919) % 1501) as usize;
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the test does to the queue under the log.
#[derive(Default)]
struct Faults {
    /// Zone appends are held until this many are pending (or nothing else is in flight), then
    /// reach the device in a shuffled order: the device places them out of order.
    shuffle: usize,
    rng: u64,
    /// After this many more submissions, cut the power (keeping each unflushed block with
    /// probability `keep_pct`) and refuse everything from then on: a power cut mid-operation.
    cut_after: Option<u64>,
    keep_pct: u64,
    /// The next completed append is reported at its zone's start (over the zone header).
    lie_at_zone_start: bool,
    /// The next append is held back until nothing else is in flight (a device that lets one
    /// command wait while it serves the others).
    delay_next: bool,
    dead: bool,
}

/// The queue under the log: the driver's queue pair, with [`Faults`].
struct Dq {
    q: Qp,
    model: NvmeModel,
    f: Rc<RefCell<Faults>>,
    pending: Vec<(ZoneOp, u32)>,
    delayed: Option<(ZoneOp, u32)>,
    zone_size: u64,
}

impl Dq {
    fn tick(&mut self) -> Result<(), SubmitError> {
        let mut f = self.f.borrow_mut();
        if f.dead {
            return Err(SubmitError::DeviceUnavailable);
        }
        if let Some(n) = f.cut_after.as_mut() {
            if *n == 0 {
                let (mut rng, pct) = (Rng(f.rng | 1), f.keep_pct);
                self.model.power_cut(|_, _| rng.below(100) < pct);
                f.dead = true;
                self.pending.clear();
                return Err(SubmitError::DeviceUnavailable);
            }
            *n -= 1;
        }
        Ok(())
    }

    fn release(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut rng = {
            let mut f = self.f.borrow_mut();
            f.rng = Rng(f.rng | 1).next();
            Rng(f.rng)
        };
        for i in (1..self.pending.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.pending.swap(i, j);
        }
        for (op, tag) in std::mem::take(&mut self.pending) {
            self.q.submit_zone(op, tag).expect("held append");
        }
        self.q.flush_submissions();
    }
}

impl BlockQueue for Dq {
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        self.tick()?;
        self.q.submit(op, tag)
    }
    fn flush_submissions(&mut self) {
        let hold = self.f.borrow().shuffle;
        if self.pending.len() >= hold.max(1) {
            self.release();
        }
        self.q.flush_submissions()
    }
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        if self.f.borrow().dead {
            return 0;
        }
        if self.q.in_flight() == 0 {
            self.release();
            if self.pending.is_empty() {
                if let Some((op, tag)) = self.delayed.take() {
                    self.q.submit_zone(op, tag).expect("delayed append");
                    self.q.flush_submissions();
                }
            }
        }
        self.q.poll(max, on_done)
    }
    fn depth(&self) -> usize {
        self.q.depth()
    }
    fn in_flight(&self) -> usize {
        self.q.in_flight() + self.pending.len() + self.delayed.is_some() as usize
    }
    fn block_size(&self, ns: NsId) -> Option<u32> {
        self.q.block_size(ns)
    }
    fn num_blocks(&self, ns: NsId) -> Option<u64> {
        self.q.num_blocks(ns)
    }
    fn pop_timed_out(&mut self) -> Option<TimedOut> {
        self.q.pop_timed_out()
    }
    fn retry_delay_us(&self, s: DevStatus) -> u64 {
        self.q.retry_delay_us(s)
    }
}

impl ZoneQueue for Dq {
    fn submit_zone(&mut self, op: ZoneOp, tag: u32) -> Result<(), SubmitError> {
        self.tick()?;
        if matches!(op, ZoneOp::Append { .. }) && self.delayed.is_none() {
            let mut f = self.f.borrow_mut();
            if f.delay_next {
                f.delay_next = false;
                self.delayed = Some((op, tag));
                return Ok(());
            }
        }
        if matches!(op, ZoneOp::Append { .. }) && self.f.borrow().shuffle > 1 {
            self.pending.push((op, tag));
            return Ok(());
        }
        self.q.submit_zone(op, tag)
    }
    fn pop_appended(&mut self) -> Option<(u32, u64)> {
        let (tag, lba) = self.q.pop_appended()?;
        let mut f = self.f.borrow_mut();
        if f.lie_at_zone_start {
            f.lie_at_zone_start = false;
            return Some((tag, lba - lba % self.zone_size));
        }
        Some((tag, lba))
    }
}

struct Dev {
    model: NvmeModel,
    dma: HostDma,
    clock: ModelClock,
    ctrl: Option<Controller<ModelMmio, ModelClock>>,
    f: Rc<RefCell<Faults>>,
    range: u64,
    in_flight: usize,
}

impl Dev {
    fn new(range: u64) -> Self {
        Self::with_max_open(range, 0)
    }

    fn with_max_open(range: u64, max_open: u32) -> Self {
        let dma = HostDma::new();
        let mcfg = ModelConfig {
            namespaces: vec![NsConfig {
                nsid: 1,
                blocks: ZONES * ZONE,
                lba_shift: 9,
            }],
            ..ModelConfig::default()
        };
        let model = NvmeModel::new(mcfg, dma.clone());
        model.set_zoned(
            1,
            ZoneConfig {
                zone_blocks: ZONE,
                capacity: CAP,
                max_open,
            },
        );
        model.set_volatile_cache(true);
        Self {
            model,
            dma,
            clock: ModelClock::new(),
            ctrl: None,
            f: Rc::new(RefCell::new(Faults::default())),
            range,
            in_flight: 8,
        }
    }

    /// A fresh bring-up (as after a reboot), one queue pair, the faults cleared.
    fn dq(&mut self) -> (Dq, ZonedConfig) {
        self.ctrl = None;
        *self.f.borrow_mut() = Faults::default();
        let ncfg = NvmeConfig {
            max_retries: 0,
            ..NvmeConfig::default()
        };
        let mut ctrl =
            Controller::init(self.model.mmio(), &self.dma, self.clock.clone(), ncfg).expect("init");
        let q = ctrl.create_io_qpair(&self.dma, 1, 64).expect("qpair");
        let zoned = ctrl.namespace(1).unwrap().zoned.expect("zoned");
        self.ctrl = Some(ctrl);
        let dq = Dq {
            q,
            model: self.model.clone(),
            f: self.f.clone(),
            pending: Vec::new(),
            delayed: None,
            zone_size: ZONE,
        };
        let cfg = ZonedConfig {
            in_flight: self.in_flight,
            max_record: 1500,
            ..ZonedConfig::new(1, zoned, FIRST, self.range)
        };
        (dq, cfg)
    }

    fn format(&mut self) -> Log {
        let (q, cfg) = self.dq();
        ZonedWal::format(q, &self.dma, self.clock.clone(), cfg).expect("format")
    }

    fn try_open(&mut self) -> Result<(Log, Recovered), Error> {
        let (q, cfg) = self.dq();
        ZonedWal::open(q, &self.dma, self.clock.clone(), cfg)
    }

    fn open(&mut self) -> (Log, Recovered) {
        self.try_open().expect("open")
    }

    fn faults(&self) -> std::cell::RefMut<'_, Faults> {
        self.f.borrow_mut()
    }
}

/// Every acknowledged record from the log's first, each checked against [`payload`].
fn check_all(log: &mut Log) -> u64 {
    let mut cur = log.cursor();
    let mut buf = vec![0u8; 1500];
    let mut want = log.first();
    while let Some((seq, n)) = log.next(&mut cur, &mut buf).expect("next") {
        assert_eq!(seq, want, "in order, dense");
        assert_eq!(&buf[..n], &payload(seq)[..], "record {seq} byte for byte");
        want += 1;
    }
    assert_eq!(want, log.acked());
    want
}

/// A record found on the image: sequence number, LBA, payload.
type Found = (u64, u64, Vec<u8>);

/// This file's own parser of the documented layout: every valid record in the zones of the
/// range on `img`, per zone (with a valid header) in LBA order.
fn parse_image(img: &[u8], range: u64) -> Vec<(u64, Vec<Found>)> {
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap());
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut out = Vec::new();
    for z in FIRST..FIRST + range {
        let start = (z * ZONE) as usize * BS;
        if &img[start..start + 8] != b"KEELZWL1"
            || crc.checksum(&img[start..start + 36]) != u32_at(start + 36)
        {
            continue;
        }
        let epoch = u32_at(start + 12);
        let mut recs = Vec::new();
        let mut b = 1u64;
        while b < CAP {
            let o = start + b as usize * BS;
            let (len, seq, blocks) = (u32_at(o + 4) as usize, u64_at(o + 8), u32_at(o + 20) as u64);
            let ok = &img[o..o + 4] == b"ZREC"
                && u32_at(o + 16) == epoch
                && blocks >= 1
                && b + blocks <= CAP;
            if !ok {
                b += 1;
                continue;
            }
            let mut p = img[o + 32..o + BS.min(32 + len)].to_vec();
            for k in 1..blocks as usize {
                let c = o + k * BS;
                assert_eq!(&img[c..c + 4], b"ZCON");
                let need = len - p.len();
                p.extend_from_slice(&img[c + 8..c + 8 + need.min(BS - 8)]);
            }
            let mut d = crc.digest();
            d.update(&img[o..o + 24]);
            d.update(&img[o + 28..o + 32]);
            d.update(&p);
            if p.len() == len && d.finalize() == u32_at(o + 24) {
                recs.push((seq, z * ZONE + b, p));
                b += blocks;
            } else {
                b += 1;
            }
        }
        out.push((z, recs));
    }
    out
}

#[test]
fn format_append_sync_reopen() {
    let mut d = Dev::new(8);
    let (q, cfg) = d.dq();
    let live = d.dma.live_allocations();
    assert!(matches!(
        ZonedWal::open(q, &d.dma, d.clock.clone(), cfg),
        Err(Error::NotFormatted)
    ));
    // The queue pair's rings stay; the log's own buffers went back.
    assert_eq!(
        d.dma.live_allocations(),
        live,
        "a failed open frees its buffers"
    );
    let mut log = d.format();
    for i in 0..100u64 {
        assert_eq!(log.append(&payload(i)).unwrap(), i);
        if i % 10 == 9 {
            assert_eq!(log.sync().unwrap(), i + 1);
        }
    }
    assert_eq!(log.acked(), 100);
    assert_eq!(check_all(&mut log), 100);
    assert!(log.zones().count() > 2, "rolled over zones");
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(
        (rec.first, rec.end, rec.epoch, rec.discarded),
        (0, 100, 2, 0)
    );
    assert_eq!(check_all(&mut log), 100);
    let old_zones: Vec<u64> = log.zones().map(|z| z.0).collect();
    for i in 100..130 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    // The new session went to a fresh zone, not the last one of the previous session.
    let zones: Vec<(u64, u64)> = log.zones().collect();
    assert_eq!(zones[old_zones.len()].1, 100);
    assert!(!old_zones.contains(&zones[old_zones.len()].0));
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!((rec.end, rec.epoch), (130, 3));
    assert_eq!(check_all(&mut log), 130);
    // The host's parser sees the same records on the media.
    let img = d.model.durable_image(1);
    let mut seen = BTreeMap::new();
    for (_, recs) in parse_image(&img, 8) {
        for (seq, _, p) in recs {
            seen.insert(seq, p);
        }
    }
    assert_eq!(seen.len(), 130);
    assert!(seen.iter().all(|(s, p)| *p == payload(*s)));
}

#[test]
fn appends_placed_out_of_order_recover_in_order() {
    let mut d = Dev::new(14);
    let mut log = d.format();
    d.faults().shuffle = 8;
    d.faults().rng = 7;
    for i in 0..150u64 {
        log.append(&payload(i)).unwrap();
        if i % 37 == 36 {
            log.sync().unwrap();
        }
    }
    log.sync().unwrap();
    assert_eq!(check_all(&mut log), 150, "iteration in order");
    drop(log);
    // The device really placed them out of order.
    let img = d.model.durable_image(1);
    let mut inversions = 0;
    for (_, recs) in parse_image(&img, 14) {
        inversions += recs.windows(2).filter(|w| w[1].0 < w[0].0).count();
    }
    assert!(inversions > 10, "only {inversions} records out of order");
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 150);
    assert_eq!(check_all(&mut log), 150);
    // One append held back while the others complete: the window keeps the log from running
    // more than `in_flight` records past it, so iteration still finds every record.
    for k in 0..3u64 {
        d.faults().delay_next = true;
        for i in 150 + k * 40..190 + k * 40 {
            log.append(&payload(i)).unwrap();
        }
        log.sync().unwrap();
    }
    assert_eq!(check_all(&mut log), 270);
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 270);
    assert_eq!(check_all(&mut log), 270);
}

/// A reboot without power loss: recovery returns records still in the device's volatile
/// cache (never synced); it makes them durable before returning, so a power cut right after
/// cannot take back what it returned.
#[test]
fn recovery_makes_what_it_returns_durable() {
    let mut d = Dev::new(6);
    let mut log = d.format();
    for i in 0..30u64 {
        log.append(&payload(i)).unwrap();
        if i == 9 {
            log.sync().unwrap();
        }
    }
    while log.poll() > 0 {}
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 30, "the cache's records are read back");
    assert_eq!(check_all(&mut log), 30);
    drop(log);
    d.model.power_cut(|_, _| false);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 30, "what recovery returned survives a power cut");
    assert_eq!(check_all(&mut log), 30);
}

/// A device with one open zone at most: the log finishes each zone it leaves, and recovery
/// finishes the zones it took, so it never needs two.
#[test]
fn one_open_zone_is_enough() {
    let mut d = Dev::with_max_open(10, 1);
    let mut log = d.format();
    for i in 0..150u64 {
        log.append(&payload(i)).unwrap();
        if i % 20 == 19 {
            log.sync().unwrap();
        }
    }
    log.sync().unwrap();
    assert!(log.zones().count() >= 4);
    drop(log);
    // A reboot without power loss: the log's last zone is still open on the device.
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 150);
    for i in 150..200u64 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    assert_eq!(check_all(&mut log), 200);
    let open = d
        .model
        .zones(1)
        .iter()
        .filter(|z| z.0 == 0x2 || z.0 == 0x3)
        .count();
    assert_eq!(open, 1);
}

#[test]
fn full_range_is_typed_and_reclaim_frees_zones() {
    let mut d = Dev::new(3);
    let mut log = d.format();
    let mut n = 0u64;
    let err = loop {
        match log.append(&payload(n)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        if n % 5 == 0 {
            log.sync().unwrap();
        }
    };
    assert_eq!(err, Error::Full);
    assert_eq!(log.failed(), None, "Full is not sticky");
    log.sync().unwrap();
    assert_eq!(log.acked(), n);
    assert_eq!(check_all(&mut log), n);
    // Everything below the second zone's first record can go.
    let second = log.zones().nth(1).unwrap().1;
    assert_eq!(log.reclaim(n + 1), Err(Error::BadCursor));
    assert_eq!(log.reclaim(second), Ok(1));
    assert_eq!(log.first(), second);
    for i in n..n + 10 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    assert_eq!(check_all(&mut log), n + 10);
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!((rec.first, rec.end), (second, n + 10));
    assert_eq!(check_all(&mut log), n + 10);
}

/// One crash run: append `n` records with syncs at random points, the device placing them
/// out of order, then a power cut keeping `keep_pct` % of the unflushed blocks; recovery must
/// return a prefix of what was appended holding every acknowledged record. Then a second cut
/// and recovery, then more appends, a cut and recovery again.
/// Returns how many recoveries came back with more than the acknowledged records, and with
/// fewer than the appended ones.
fn crash_run(seed: u64, keep_pct: u64) -> (u32, u32) {
    let mut stats = (0, 0);
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut d = Dev::new(6);
    d.in_flight = 1 + rng.below(8) as usize;
    let mut log = d.format();
    let mut next = 0u64;
    let mut acked = 0u64;
    for round in 0..3 {
        let shuffle = 1 + rng.below(6) as usize;
        {
            let mut f = d.faults();
            f.shuffle = shuffle;
            f.rng = rng.next();
        }
        let n = 5 + rng.below(60);
        for _ in 0..n {
            match log.append(&payload(next)) {
                Ok(s) => assert_eq!(s, next),
                Err(Error::Full) => break,
                Err(e) => panic!("append: {e:?}"),
            }
            next += 1;
            if rng.below(8) == 0 {
                acked = log.sync().unwrap();
            }
        }
        let appended = log.appended();
        // The cut, with appends possibly still in flight (or held back).
        drop(log);
        let mut cut = Rng(rng.next() | 1);
        d.model.power_cut(|_, _| cut.below(100) < keep_pct);
        let (mut l, rec) = d.open();
        assert!(
            rec.end >= acked && rec.end <= appended,
            "seed {seed} keep {keep_pct} round {round}: recovered {} not in {acked}..={appended}",
            rec.end
        );
        assert_eq!(check_all(&mut l), rec.end);
        if keep_pct == 0 {
            assert_eq!(rec.end, acked, "seed {seed}: nothing unflushed kept");
        }
        if keep_pct == 100 && shuffle == 1 {
            assert_eq!(rec.end, appended, "seed {seed}: everything kept");
        }
        stats.0 += (rec.end > acked) as u32;
        stats.1 += (rec.end < appended) as u32;
        // Write pointers: every zone of the log is closed or full after a cut.
        for (z, _) in l.zones() {
            let (st, _) = d.model.zones(1)[z as usize];
            assert!(
                st == 0x4 || st == 0xE || st == 0x1,
                "zone {z} state {st:#x}"
            );
        }
        // Recovery again after another cut: it wrote nothing the first one did not return.
        drop(l);
        let mut cut2 = Rng(rng.next() | 1);
        d.model.power_cut(|_, _| cut2.below(2) == 0);
        let (mut l, rec2) = d.open();
        assert_eq!(rec2.end, rec.end, "seed {seed}: a second recovery differs");
        assert_eq!(check_all(&mut l), rec.end);
        // Whatever came back is acknowledged now (recovery made it durable).
        acked = rec.end;
        next = rec.end;
        log = l;
        if log.reclaim(acked.saturating_sub(30)).is_err() {
            panic!("reclaim");
        }
    }
    stats
}

#[test]
fn power_cut_keep_nothing() {
    for seed in 0..40 {
        crash_run(seed, 0);
    }
}

#[test]
fn power_cut_keep_random_subsets() {
    let (mut more, mut fewer) = (0, 0);
    for seed in 0..120 {
        let (m, f) = crash_run(1000 + seed, [10, 50, 90][seed as usize % 3]);
        more += m;
        fewer += f;
    }
    // Both kinds of torn tail happened: unacknowledged records kept, and holes that cut.
    assert!(more > 20 && fewer > 20, "{more} / {fewer}");
}

#[test]
fn power_cut_keep_everything() {
    for seed in 0..40 {
        crash_run(5000 + seed, 100);
    }
}

/// A power cut in the middle of recovery itself (after each of its commands in turn), then a
/// full recovery: still a prefix holding every acknowledged record, and then stable.
#[test]
fn power_cut_during_recovery() {
    let (mut cut, mut whole) = (0, 0);
    for cut_at in 0..40u64 {
        let mut d = Dev::new(5);
        let mut log = d.format();
        d.faults().shuffle = 4;
        for i in 0..60u64 {
            log.append(&payload(i)).unwrap();
            if i == 39 {
                log.sync().unwrap();
            }
        }
        let appended = log.appended();
        drop(log);
        d.model.power_cut(|_, lba| lba % 3 != 0);
        let (q, cfg) = d.dq();
        {
            let mut f = d.faults();
            f.cut_after = Some(cut_at);
            f.keep_pct = 50;
            f.rng = cut_at;
        }
        let first = ZonedWal::open(q, &d.dma, d.clock.clone(), cfg);
        let (mut log, rec) = d.open();
        assert!(
            (40..=appended).contains(&rec.end),
            "cut at {cut_at}: {}",
            rec.end
        );
        assert_eq!(check_all(&mut log), rec.end);
        match first {
            Ok((_, r1)) => {
                assert_eq!(
                    r1.end, rec.end,
                    "cut at {cut_at}: after a complete recovery"
                );
                whole += 1;
            }
            Err(_) => cut += 1,
        }
    }
    assert!(cut > 5 && whole > 5, "{cut} cut, {whole} whole");
}

#[test]
fn corrupt_blocks_are_never_returned() {
    let mut d = Dev::new(6);
    let mut log = d.format();
    for i in 0..80u64 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let img = d.model.durable_image(1);
    let zones = parse_image(&img, 6);
    // Flip one payload byte of record 50 on the media.
    let (_, lba, _) = zones
        .iter()
        .flat_map(|(_, r)| r.iter())
        .find(|r| r.0 == 50)
        .cloned()
        .unwrap();
    let at = lba as usize * BS + 40;
    let b = d.model.disk_read(1, at, 1)[0];
    d.model.disk_write(1, at, &[b ^ 0x40]);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 50, "the log ends before the corrupt record");
    assert_eq!(check_all(&mut log), 50);
    drop(log);
    // A zone header destroyed: that zone and everything after it are not the log's.
    let mut d = Dev::new(6);
    let mut log = d.format();
    for i in 0..80u64 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    let (z2, fs2) = log.zones().nth(1).unwrap();
    drop(log);
    d.model
        .disk_write(1, (z2 * ZONE) as usize * BS + 20, &[0xFF]);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, fs2);
    assert!(rec.discarded >= 1);
    assert_eq!(check_all(&mut log), fs2);
}

/// A fresh log with records `0..n`, synced after every `every`.
fn synced(d: &mut Dev, n: u64, every: u64) -> Log {
    let mut log = d.format();
    for i in 0..n {
        log.append(&payload(i)).unwrap();
        if i % every == every - 1 {
            log.sync().unwrap();
        }
    }
    log
}

/// A corrupt acknowledged record that a later record proves acknowledged is a typed error at
/// recovery, not a silently shorter log; recovery writes nothing then. Corruption in the last
/// `sync`'s group, with nothing framed after that `sync`, still looks like a torn tail.
#[test]
fn corrupt_acknowledged_record_is_a_typed_error() {
    let corrupt = |d: &mut Dev, seq: u64| {
        let img = d.model.durable_image(1);
        let (_, lba, _) = parse_image(&img, 6)
            .iter()
            .flat_map(|(_, r)| r.iter())
            .find(|r| r.0 == seq)
            .cloned()
            .unwrap();
        let at = lba as usize * BS + 40;
        let b = d.model.disk_read(1, at, 1)[0];
        d.model.disk_write(1, at, &[b ^ 0x40]);
    };
    // Syncs every 10 records: record 5 was acknowledged by the sync after record 9, and
    // records 10.. (in the same zone, and later ones) were framed after it.
    let mut d = Dev::new(6);
    let log = synced(&mut d, 80, 10);
    drop(log);
    corrupt(&mut d, 5);
    let before = d.model.durable_image(1);
    assert_eq!(
        d.try_open().map(|(_, r)| r.end).err(),
        Some(Error::Corrupt { seq: 5 }),
        "recovery must not end the log silently before an acknowledged record"
    );
    assert!(
        d.model.durable_image(1) == before,
        "a recovery that found corruption wrote nothing"
    );
    // The same within one zone (the proof is in the zone the walk stops in).
    let mut d = Dev::new(6);
    let log = synced(&mut d, 12, 4);
    assert_eq!(log.zones().count(), 1, "twelve records fit one zone");
    drop(log);
    corrupt(&mut d, 2);
    assert_eq!(
        d.try_open().map(|(_, r)| r.end).err(),
        Some(Error::Corrupt { seq: 2 })
    );
    // The same, with the proof in later zones only: zone 2 of the log lost its header.
    let mut d = Dev::new(6);
    let log = synced(&mut d, 80, 10);
    let zs: Vec<(u64, u64)> = log.zones().collect();
    drop(log);
    assert!(zs.len() >= 3, "the records span three zones: {zs:?}");
    let (z1, fs1) = zs[1];
    d.model
        .disk_write(1, (z1 * ZONE) as usize * BS + 20, &[0xFF]);
    assert_eq!(
        d.try_open().map(|(_, r)| r.end).err(),
        Some(Error::Corrupt { seq: fs1 })
    );
    // Corruption among the last sync's records, nothing framed after that sync: a torn tail.
    let mut d = Dev::new(6);
    let log = synced(&mut d, 40, 10);
    drop(log);
    corrupt(&mut d, 35);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 35);
    assert_eq!(check_all(&mut log), 35);
}

#[test]
fn lying_device_is_a_typed_error_and_nothing_is_acknowledged() {
    // An append LBA outside its zone: refused by the driver (BadResult).
    let mut d = Dev::new(4);
    let mut log = d.format();
    for i in 0..5 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    d.model.set_fault(Fault::AppendLba(1 << 20));
    log.append(&payload(5)).unwrap();
    assert_eq!(log.sync(), Err(Error::Io(IoError::BadResult)));
    assert_eq!(log.acked(), 5);
    assert_eq!(
        log.append(&payload(6)),
        Err(Error::Io(IoError::BadResult)),
        "sticky"
    );
    d.model.set_fault(Fault::None);
    drop(log);
    let (mut log, rec) = d.open();
    assert!(rec.end >= 5);
    check_all(&mut log);
    // A record reported over its zone's header: caught by the log.
    let mut d = Dev::new(4);
    let mut log = d.format();
    log.append(&payload(0)).unwrap();
    log.sync().unwrap();
    d.faults().lie_at_zone_start = true;
    log.append(&payload(1)).unwrap();
    assert_eq!(log.sync(), Err(Error::BadDevice));
    assert_eq!(log.acked(), 1);
}

#[test]
fn offline_zone_is_a_typed_error() {
    let mut d = Dev::new(4);
    let mut log = d.format();
    log.append(&payload(0)).unwrap();
    log.sync().unwrap();
    drop(log);
    let (mut q, _) = d.dq();
    let zone = (FIRST + 2) * ZONE;
    q.q.submit_zone(
        ZoneOp::Manage {
            ns: 1,
            zone,
            action: ZoneAction::Offline,
            all: false,
        },
        1,
    )
    .unwrap();
    q.q.flush_submissions();
    while q.q.in_flight() > 0 {
        q.q.poll(8, &mut |_, r| r.unwrap());
    }
    let unusable = Error::ZoneUnusable {
        zone: FIRST + 2,
        state: ZoneState::Offline,
    };
    assert_eq!(d.try_open().err(), Some(unusable));
    let (q, cfg) = d.dq();
    assert_eq!(
        ZonedWal::format(q, &d.dma, d.clock.clone(), cfg).err(),
        Some(unusable)
    );
}

/// A zone of the log turned read-only by the drive: recovery still reads it (to its capacity)
/// and returns every record; the log never writes to it; format cannot reset it (typed).
#[test]
fn read_only_zone_is_read_not_written() {
    let mut d = Dev::new(14);
    let mut log = d.format();
    for i in 0..60u64 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    let zones: Vec<(u64, u64)> = log.zones().collect();
    drop(log);
    let ro = zones[1].0;
    d.model.set_zone_state(1, ro as usize, 0xD);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 60);
    assert_eq!(check_all(&mut log), 60);
    for i in 60..200u64 {
        log.append(&payload(i)).unwrap();
    }
    log.sync().unwrap();
    assert!(log.zones().filter(|z| z.0 == ro).count() == 1, "not reused");
    assert_eq!(check_all(&mut log), 200);
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.end, 200);
    assert_eq!(check_all(&mut log), 200);
    drop(log);
    let (q, cfg) = d.dq();
    assert_eq!(
        ZonedWal::format(q, &d.dma, d.clock.clone(), cfg).err(),
        Some(Error::ZoneUnusable {
            zone: ro,
            state: ZoneState::ReadOnly
        })
    );
}

#[test]
fn bad_configurations_refused() {
    let mut d = Dev::new(4);
    let (q, cfg) = d.dq();
    let bad = ZonedConfig { zones: 1, ..cfg };
    assert!(matches!(
        ZonedWal::format(q, &d.dma, d.clock.clone(), bad),
        Err(Error::Config)
    ));
    for bad in [
        ZonedConfig {
            first_zone: ZONES - 1,
            ..cfg
        },
        ZonedConfig {
            in_flight: 0,
            ..cfg
        },
        ZonedConfig {
            in_flight: 33,
            ..cfg
        },
        ZonedConfig {
            max_record: 64 * 512,
            ..cfg
        },
    ] {
        let (q, _) = d.dq();
        assert!(matches!(
            ZonedWal::format(q, &d.dma, d.clock.clone(), bad),
            Err(Error::Config)
        ));
    }
    let mut log = d.format();
    assert_eq!(log.append(&[0u8; 1501]), Err(Error::TooLarge));
    log.append(&payload(3)).unwrap();
    log.sync().unwrap();
    let mut tiny = [0u8; 1];
    let mut cur = log.cursor();
    assert_eq!(
        log.next(&mut cur, &mut tiny),
        Err(Error::BufferTooSmall {
            need: payload(3).len()
        })
    );
}
