//! keel-wal over keel-writer over the real NVMe driver and the software controller, with
//! simulated power cuts (the model's volatile write cache).

use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config as NvmeConfig, Controller, IoQueuePair};
use keel_wal::{Cursor, Error, Lsn, Wal, HEADER};
use keel_writer::{Config, Error as WError, NeverCancel};

type Qp = IoQueuePair<ModelMmio, ModelClock>;
type Log = Wal<Qp, ModelClock, NeverCancel>;

const LBA0: u64 = 8;
const SB_BYTE: usize = LBA0 as usize * 512;
const STREAM_BYTE: usize = SB_BYTE + 512;

struct Dev {
    model: NvmeModel,
    dma: HostDma,
    clock: ModelClock,
    ctrl: Option<Controller<ModelMmio, ModelClock>>,
}

impl Dev {
    fn new() -> Self {
        let dma = HostDma::new();
        let model = NvmeModel::new(ModelConfig::default(), dma.clone());
        model.set_volatile_cache(true);
        Self {
            model,
            dma,
            clock: ModelClock::new(),
            ctrl: None,
        }
    }

    /// A fresh controller bring-up (as after a reboot) and one I/O queue pair.
    fn qp(&mut self) -> Qp {
        self.ctrl = None;
        let ncfg = NvmeConfig {
            max_retries: 0,
            ..NvmeConfig::default()
        };
        let mut ctrl =
            Controller::init(self.model.mmio(), &self.dma, self.clock.clone(), ncfg).expect("init");
        let qp = ctrl.create_io_qpair(&self.dma, 1, 64).expect("qpair");
        self.ctrl = Some(ctrl);
        qp
    }

    fn format(&mut self) -> Log {
        let q = self.qp();
        Wal::format(q, &self.dma, self.clock.clone(), NeverCancel, cfg()).expect("format")
    }

    fn open(&mut self) -> (Log, keel_wal::Recovered) {
        let q = self.qp();
        Wal::open(q, &self.dma, self.clock.clone(), NeverCancel, cfg()).expect("open")
    }
}

fn cfg() -> Config {
    Config {
        buf_size: 4096,
        buffers: 4,
        max_in_flight: 3,
        ..Config::new(1, LBA0, 2048)
    }
}

fn payload(seq: u64, salt: u64, len: usize) -> Vec<u8> {
    let mut x = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(salt)
        .wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every acknowledged record from the start.
fn collect(log: &mut Log) -> Vec<Vec<u8>> {
    let mut cur = Cursor::start();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    while let Some((lsn, n)) = log.next(&mut cur, &mut buf).expect("next") {
        assert_eq!(lsn.seq, out.len() as u64, "dense sequence numbers");
        out.push(buf[..n].to_vec());
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn append_sync_iterate() {
    let mut d = Dev::new();
    let mut log = d.format();
    let mut lsns = Vec::new();
    let mut expect = Vec::new();
    for i in 0..40u64 {
        let p = payload(i, 0, (i as usize * 97) % 3000);
        lsns.push(log.append(&p).unwrap());
        expect.push(p);
        if i % 7 == 6 {
            log.sync().unwrap();
        }
    }
    // 35 acknowledged (synced at i = 6, 13, ..., 34), 5 not yet.
    assert_eq!(log.acked().seq, 35);
    assert_eq!(log.appended().seq, 40);
    assert_eq!(
        collect(&mut log),
        expect[..35].to_vec(),
        "only acknowledged records"
    );
    assert_eq!(log.sync().unwrap().seq, 40);
    assert_eq!(collect(&mut log), expect);
    // From any acknowledged position.
    let mut cur = Cursor::at(lsns[17]);
    let mut buf = vec![0u8; 4096];
    let (lsn, n) = log.next(&mut cur, &mut buf).unwrap().unwrap();
    assert_eq!(lsn, lsns[17]);
    assert_eq!(&buf[..n], &expect[17][..]);
    assert_eq!(cur.position(), lsns[18]);
    // Small buffer, bad cursors: typed errors.
    let mut tiny = [0u8; 1];
    let mut c = Cursor::at(lsns[1]);
    assert_eq!(
        log.next(&mut c, &mut tiny),
        Err(Error::BufferTooSmall { need: 97 })
    );
    let mut bad = Cursor::at(Lsn {
        seq: 99,
        offset: 1 << 40,
    });
    assert_eq!(log.next(&mut bad, &mut buf), Err(Error::BadCursor));
    let mut mid = Cursor::at(Lsn {
        seq: 3,
        offset: lsns[3].offset + 5,
    });
    assert!(matches!(
        log.next(&mut mid, &mut buf),
        Err(Error::Corrupt { .. })
    ));
    // Durable on the media (the model's image as of the last Flush).
    let img = d.model.durable_image(1);
    let end = log.acked().offset as usize;
    let mut raw = vec![0u8; end];
    raw.copy_from_slice(&img[STREAM_BYTE..STREAM_BYTE + end]);
    assert_eq!(&raw[HEADER..HEADER + expect[0].len()], &expect[0][..]);
    // Recovery sees the same.
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 40);
    assert_eq!(rec.end, end as u64);
    assert_eq!(collect(&mut log), expect);
}

#[test]
fn unsynced_records_are_lost_on_power_cut_synced_ones_survive() {
    let mut d = Dev::new();
    let mut log = d.format();
    let mut expect = Vec::new();
    for i in 0..10 {
        let p = payload(i, 1, 700);
        log.append(&p).unwrap();
        expect.push(p);
    }
    log.sync().unwrap();
    for i in 10..30 {
        log.append(&payload(i, 1, 700)).unwrap(); // several buffers reach the device cache
    }
    assert!(
        log.writer().written() > log.acked().offset,
        "unsynced data was written"
    );
    drop(log);
    d.model.power_cut(|_, _| false);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 10);
    assert_eq!(collect(&mut log), expect);
}

#[test]
fn torn_or_corrupt_tail_is_discarded() {
    let mut d = Dev::new();
    let mut log = d.format();
    let mut lsns = Vec::new();
    for i in 0..12 {
        lsns.push(log.append(&payload(i, 2, 300)).unwrap());
    }
    log.sync().unwrap();
    drop(log);
    // Flip one payload byte of record 11 (a torn last write): records 0..11 remain.
    let off = STREAM_BYTE + lsns[11].offset as usize + HEADER + 10;
    let b = d.model.disk_read(1, off, 1)[0];
    d.model.disk_write(1, off, &[b ^ 1]);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 11);
    assert_eq!(rec.end, lsns[11].offset);
    assert_eq!(collect(&mut log).len(), 11);
    // Zero the tail from record 8's header on (a truncated write stream).
    drop(log);
    let z = vec![0u8; 4096];
    d.model
        .disk_write(1, STREAM_BYTE + lsns[8].offset as usize, &z);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 8);
    let got = collect(&mut log);
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p, &payload(i as u64, 2, 300));
    }
    // Appending continues after the valid prefix, with the next sequence number.
    let l = log.append(b"after").unwrap();
    assert_eq!(l, lsns[8]);
    log.sync().unwrap();
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 9);
    assert_eq!(collect(&mut log)[8], b"after".to_vec());
    // A destroyed superblock is a typed error.
    drop(log);
    d.model.disk_write(1, SB_BYTE, &[0u8; 512]);
    let q = d.qp();
    assert!(matches!(
        Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg()),
        Err(Error::NotFormatted)
    ));
}

/// A stale record behind a hole, at exactly the offset and sequence number a later session
/// expects, must be rejected (the epoch check).
#[test]
fn stale_records_behind_a_hole_are_never_resurrected() {
    let mut d = Dev::new();
    let mut log = d.format();
    for i in 0..10 {
        log.append(&payload(i, 3, 1000)).unwrap();
    }
    log.sync().unwrap();
    let r10 = log.append(&payload(10, 3, 1000)).unwrap();
    let r11 = log.append(&payload(11, 3, 1000)).unwrap();
    for i in 12..16 {
        log.append(&payload(i, 3, 1000)).unwrap();
    }
    log.writer().written();
    drop(log);
    // Power cut: every unflushed block survives except the one holding record 10's header.
    let hole = LBA0 + 1 + r10.offset / 512;
    assert!(LBA0 + 1 + r11.offset / 512 > hole);
    let written_out = d.model.disk_read(1, STREAM_BYTE + r11.offset as usize, 4);
    d.model.power_cut(|_, lba| lba != hole);
    assert_eq!(
        d.model.disk_read(1, STREAM_BYTE + r11.offset as usize, 4),
        written_out,
        "record 11 survived the power cut"
    );
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 10, "stops at the hole");
    // Same length as the lost record 10: the stale record 11 sits exactly where 11 is expected.
    let new10 = payload(10, 99, 1000);
    assert_eq!(log.append(&new10).unwrap(), r10);
    log.sync().unwrap();
    drop(log);
    d.model.power_cut(|_, _| false);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 11, "stale record 11 (older epoch) rejected");
    let got = collect(&mut log);
    assert_eq!(got[10], new10);
}

#[test]
fn format_hides_an_older_log() {
    let mut d = Dev::new();
    let mut log = d.format();
    for i in 0..5 {
        log.append(&payload(i, 4, 100)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let log = d.format();
    assert!(log.epoch() >= 2);
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(
        rec.records, 0,
        "old records have an epoch below the new format epoch"
    );
    assert!(collect(&mut log).is_empty());
    // Same when the superblock was destroyed before the re-format.
    for i in 0..5 {
        log.append(&payload(i, 5, 100)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    assert_eq!(d.open().1.records, 5);
    d.model.disk_write(1, SB_BYTE, &[0u8; 512]);
    drop(d.format());
    // Later sessions raise the epoch past the old records' epochs.
    for _ in 0..4 {
        drop(d.open());
    }
    let (mut log, rec) = d.open();
    assert_eq!(
        rec.records, 0,
        "old log not resurrected after a format over a lost superblock"
    );
    assert!(collect(&mut log).is_empty());
}

#[test]
fn failed_sync_acknowledges_nothing() {
    let mut d = Dev::new();
    let mut log = d.format();
    log.append(b"one").unwrap();
    assert_eq!(log.sync().unwrap().seq, 1);
    d.model.set_fault(Fault::WriteFault);
    log.append(b"two").unwrap();
    assert_eq!(
        log.sync(),
        Err(Error::Writer(WError::Io(keel_blockdev::IoError::Media)))
    );
    assert_eq!(log.acked().seq, 1);
    assert_eq!(collect(&mut log), vec![b"one".to_vec()]);
    assert!(log.append(b"three").is_err());
    d.model.set_fault(Fault::None);
    drop(log);
    d.model.power_cut(|_, _| false);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 1);
    assert_eq!(collect(&mut log), vec![b"one".to_vec()]);
}

/// Random appends and syncs; power cuts at sync points and in between, dropping every unflushed
/// write (strict: recovery == acknowledged) or keeping a random subset of unflushed blocks
/// (relaxed: acknowledged ⊆ recovered ⊆ appended, as a prefix, contents intact).
#[test]
fn randomized_crash_recovery() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed * 0x2545_F491_4F6C_DD1D);
        let mut d = Dev::new();
        let mut log = d.format();
        let mut appended: Vec<Vec<u8>> = Vec::new(); // every record appended, by seq
        let mut acked = 0usize;
        let mut crashes = 0;
        let mut salt = 1000 * seed;
        for step in 0..400 {
            match rng.below(10) {
                0..=6 => {
                    let len = rng.below(1500) as usize;
                    let p = payload(appended.len() as u64, salt, len);
                    match log.append(&p) {
                        Ok(l) => {
                            assert_eq!(l.seq, appended.len() as u64);
                            appended.push(p);
                        }
                        Err(Error::Writer(WError::Full)) => break,
                        Err(e) => panic!("append: {e:?}"),
                    }
                }
                7 | 8 => {
                    acked = log.sync().unwrap().seq as usize;
                    assert_eq!(acked, appended.len());
                }
                _ => {
                    crashes += 1;
                    let strict = rng.below(2) == 0;
                    drop(log);
                    let mut r2 = Rng(rng.next() | 1);
                    if strict {
                        d.model.power_cut(|_, _| false);
                    } else {
                        d.model.power_cut(|_, _| r2.below(3) != 0);
                    }
                    let (mut l2, rec) = d.open();
                    let got = collect(&mut l2);
                    assert_eq!(got.len() as u64, rec.records);
                    if strict {
                        assert_eq!(
                            got.len(),
                            acked,
                            "seed {seed} step {step}: exactly the acknowledged records"
                        );
                    } else {
                        assert!(
                            got.len() >= acked,
                            "seed {seed} step {step}: acknowledged record lost"
                        );
                        assert!(got.len() <= appended.len());
                    }
                    for (i, p) in got.iter().enumerate() {
                        assert_eq!(
                            p, &appended[i],
                            "seed {seed} step {step}: record {i} differs"
                        );
                    }
                    appended.truncate(got.len());
                    acked = got.len();
                    salt += 1; // new payloads differ from stale ones
                    log = l2;
                }
            }
        }
        assert!(crashes > 10, "seed {seed}: only {crashes} crashes");
        // Final check: a clean sync and recovery returns everything appended.
        acked = log.sync().unwrap().seq as usize;
        drop(log);
        d.model.power_cut(|_, _| false);
        let (mut l2, _) = d.open();
        let got = collect(&mut l2);
        assert_eq!(got.len(), acked);
        assert_eq!(got, appended[..acked].to_vec());
    }
}
