//! keel-wal over keel-writer over the real NVMe driver and the software controller, with
//! simulated power cuts (the model's volatile write cache).

mod common;
use common::Rng;
use keel_blockdev::{BlockOp, BlockQueue, IoError, SubmitError};
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

/// Stream blocks of the log region, as bytes of the disk (superblock included).
const REGION: usize = 2048 * 512;

fn flip(d: &Dev, byte: usize) {
    let b = d.model.disk_read(1, byte, 1)[0];
    d.model.disk_write(1, byte, &[b ^ 1]);
}

/// Media corruption of an acknowledged record — in the middle of the log, in a header, in the
/// very last acknowledged record, or a lost run of acknowledged blocks — is a typed error naming
/// the record; recovery writes nothing, so no append can land over the acknowledged records
/// behind it.
#[test]
fn corrupt_acknowledged_record_is_an_error_naming_it() {
    let mut d = Dev::new();
    let mut log = d.format();
    let mut lsns = Vec::new();
    for i in 0..20 {
        lsns.push(log.append(&payload(i, 2, 300)).unwrap());
        if i == 9 {
            log.sync().unwrap();
        }
    }
    let acked = log.sync().unwrap();
    assert_eq!(acked.seq, 20);
    drop(log);
    let pristine = d.model.disk_read(1, SB_BYTE, REGION);
    // (what, the record named, first damaged byte inside it, bytes zeroed; 0 = flip one bit)
    let cases = [
        ("a payload byte of record 5", 5, HEADER + 10, 0),
        ("the length field of record 5", 5, 4, 0),
        ("the CRC of record 13", 13, 20, 0),
        (
            "the last acknowledged record (nothing follows)",
            19,
            HEADER + 299,
            0,
        ),
        ("acknowledged blocks lost from record 8 on", 8, 0, 4096),
    ];
    for (what, k, at, zeroed) in cases {
        d.model.disk_write(1, SB_BYTE, &pristine);
        let byte = STREAM_BYTE + lsns[k].offset as usize + at;
        if zeroed == 0 {
            flip(&d, byte);
        } else {
            d.model.disk_write(1, byte, &vec![0u8; zeroed]);
        }
        let damaged = d.model.disk_read(1, SB_BYTE, REGION);
        for attempt in 0..2 {
            let q = d.qp();
            let r = Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg());
            assert_eq!(
                r.err(),
                Some(Error::CorruptAcked { at: lsns[k], acked }),
                "{what} (open #{attempt})"
            );
            assert!(
                d.model.disk_read(1, SB_BYTE, REGION) == damaged,
                "{what}: recovery wrote nothing (superblock and records behind the bad one intact)"
            );
        }
    }
    // The undamaged log opens with every record.
    d.model.disk_write(1, SB_BYTE, &pristine);
    let (mut log, rec) = d.open();
    assert_eq!((rec.records, rec.committed), (20, acked));
    let got = collect(&mut log);
    assert_eq!(got.len(), 20);
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p, &payload(i as u64, 2, 300));
    }
}

/// A torn tail — unacknowledged writes, some kept by a power cut and some lost — is cut at the
/// first missing record, even though valid records of the same epoch sit behind the hole; the
/// log then continues there.
#[test]
fn torn_tail_with_valid_records_behind_a_hole_is_cut_cleanly() {
    let mut d = Dev::new();
    let mut log = d.format();
    let epoch = log.epoch();
    let mut lsns = Vec::new();
    for i in 0..10 {
        lsns.push(log.append(&payload(i, 6, 1000)).unwrap());
    }
    let acked = log.sync().unwrap();
    for i in 10..16 {
        lsns.push(log.append(&payload(i, 6, 1000)).unwrap()); // full buffers reach the device
    }
    assert!(
        log.writer().written() >= lsns[14].offset,
        "records 10..14 were written"
    );
    drop(log);
    // Power cut: every unflushed block survives except the one holding record 11's header.
    let hole = LBA0 + 1 + lsns[11].offset / 512;
    assert!(LBA0 + 1 + lsns[12].offset / 512 > hole);
    d.model.power_cut(|_, lba| lba != hole);
    // Records 12 and 13 are intact on the media, with the session's epoch: "valid records of the
    // same epoch after the bad one" does not make record 11 acknowledged.
    for k in [12usize, 13] {
        let h = d
            .model
            .disk_read(1, STREAM_BYTE + lsns[k].offset as usize, HEADER);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), k as u64);
        assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), epoch);
        let body = d
            .model
            .disk_read(1, STREAM_BYTE + lsns[k].offset as usize + HEADER, 1000);
        assert_eq!(body, payload(k as u64, 6, 1000), "record {k} survived");
    }
    let (mut log, rec) = d.open();
    assert_eq!(rec.committed, acked);
    assert_eq!(rec.records, 11, "cut at the hole");
    assert_eq!(rec.end, lsns[11].offset);
    assert_eq!(collect(&mut log).len(), 11);
    // Appending continues at the cut, with the next sequence number.
    assert_eq!(log.append(b"after").unwrap(), lsns[11]);
    log.sync().unwrap();
    drop(log);
    d.model.power_cut(|_, _| false);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 12);
    let got = collect(&mut log);
    assert_eq!(got[11], b"after".to_vec());
    assert_eq!(got[10], payload(10, 6, 1000));
}

/// Corruption inside the unacknowledged tail (a torn last write, no power cut) is cut too;
/// a destroyed superblock is a typed error.
#[test]
fn corrupt_unacknowledged_tail_is_cut_and_appends_continue() {
    let mut d = Dev::new();
    let mut log = d.format();
    let mut lsns = Vec::new();
    for i in 0..10 {
        lsns.push(log.append(&payload(i, 2, 1000)).unwrap());
    }
    log.sync().unwrap();
    for i in 10..16 {
        lsns.push(log.append(&payload(i, 2, 1000)).unwrap());
    }
    assert!(log.writer().written() >= lsns[13].offset);
    drop(log);
    flip(&d, STREAM_BYTE + lsns[12].offset as usize + HEADER + 500);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 12);
    assert_eq!(rec.end, lsns[12].offset);
    assert_eq!(collect(&mut log).len(), 12);
    assert_eq!(log.append(b"after").unwrap(), lsns[12]);
    log.sync().unwrap();
    drop(log);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 13);
    assert_eq!(collect(&mut log)[12], b"after".to_vec());
    // A destroyed superblock is a typed error.
    drop(log);
    d.model.disk_write(1, SB_BYTE, &[0u8; 512]);
    let q = d.qp();
    assert!(matches!(
        Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg()),
        Err(Error::NotFormatted)
    ));
}

/// A queue that refuses Flush commands while `refuse` is set (the sync fails after its writes).
struct NoFlush {
    q: Qp,
    refuse: std::rc::Rc<std::cell::Cell<bool>>,
}

impl BlockQueue for NoFlush {
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        if self.refuse.get() && matches!(op, BlockOp::Flush { .. }) {
            return Err(SubmitError::Unsupported);
        }
        self.q.submit(op, tag)
    }
    fn flush_submissions(&mut self) {
        self.q.flush_submissions()
    }
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        self.q.poll(max, on_done)
    }
    fn depth(&self) -> usize {
        self.q.depth()
    }
    fn in_flight(&self) -> usize {
        self.q.in_flight()
    }
    fn block_size(&self, ns: u32) -> Option<u32> {
        self.q.block_size(ns)
    }
    fn num_blocks(&self, ns: u32) -> Option<u64> {
        self.q.num_blocks(ns)
    }
}

/// The acknowledged end reaches the superblock only after the Flush: a sync whose Flush never
/// ran must not leave a claim behind, even if the power cut keeps exactly the superblock block
/// and drops the records.
#[test]
fn acknowledged_end_is_recorded_only_after_the_flush() {
    let mut d = Dev::new();
    drop(d.format());
    let refuse = std::rc::Rc::new(std::cell::Cell::new(false));
    let q = NoFlush {
        q: d.qp(),
        refuse: refuse.clone(),
    };
    let (mut log, _) = Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg()).unwrap();
    for i in 0..5 {
        log.append(&payload(i, 7, 200)).unwrap();
    }
    let acked = log.sync().unwrap();
    for i in 5..30 {
        log.append(&payload(i, 7, 200)).unwrap();
    }
    refuse.set(true);
    assert_eq!(
        log.sync(),
        Err(Error::Writer(WError::Submit(SubmitError::Unsupported)))
    );
    assert_eq!(log.acked(), acked);
    drop(log);
    d.model.power_cut(|_, lba| lba == LBA0);
    let (mut log, rec) = d.open();
    assert_eq!(
        rec.records, 5,
        "the records of the failed sync are gone, nothing else"
    );
    assert_eq!(rec.committed, acked);
    assert_eq!(collect(&mut log).len(), 5);
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

/// Issue 16: a status the device marks Do Not Retry (here Internal Error, which would be
/// retried with DNR = 0) ends the sync at once, with the status and its DNR bit: never retried.
#[test]
fn a_dnr_status_is_never_retried() {
    let mut d = Dev::new();
    let mut log = d.format();
    log.append(b"one").unwrap();
    assert_eq!(log.sync().unwrap().seq, 1);
    let retries = log.writer().stats().retries;
    d.model.set_fault(Fault::PermanentError); // Internal Error, DNR = 1
    log.append(b"two").unwrap();
    // On a thread with a deadline: a log that retried DNR = 1 forever fails here, not hangs.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let e = log.sync();
        let _ = tx.send((e, log));
    });
    let (e, log) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("sync retried a DNR = 1 status forever");
    assert!(
        matches!(e, Err(Error::Writer(WError::Io(IoError::Device { status })))
            if status.dnr() && status.code() == 0x0006),
        "{e:?}"
    );
    assert_eq!(log.writer().stats().retries, retries, "not retried");
    assert_eq!(log.acked().seq, 1);
    // DNR = 0, the same status: retried until it goes through.
    d.model.set_fault(Fault::None);
    drop(log);
    let (mut log, _) = d.open();
    d.model.set_fault(Fault::TransientError(3));
    log.append(b"three").unwrap();
    assert!(log.sync().is_ok());
    assert!(log.writer().stats().retries >= 3);
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
        Err(Error::Writer(WError::Io(IoError::Media {
            status: keel_blockdev::DevStatus::from_field(0x8500)
        })))
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

/// A superblock of the older layout (no acknowledged end) still opens, as "nothing recorded";
/// a damaged acknowledged-end part is a damaged superblock.
#[test]
fn older_superblock_layout_opens() {
    let mut d = Dev::new();
    let mut log = d.format();
    for i in 0..7 {
        log.append(&payload(i, 8, 100)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let sb = d.model.disk_read(1, SB_BYTE, 512);
    d.model.disk_write(1, SB_BYTE + 20, &[0u8; 28]);
    let (mut log, rec) = d.open();
    assert_eq!(rec.committed, Lsn { seq: 0, offset: 0 });
    assert_eq!((rec.records, collect(&mut log).len()), (7, 7));
    drop(log);
    // open wrote the current layout again, recording the recovered end.
    assert_eq!(d.open().1.committed.seq, 7);
    let mut bad = sb.clone();
    bad[30] ^= 1; // the acknowledged end's sequence number, under the second CRC
    d.model.disk_write(1, SB_BYTE, &bad);
    let q = d.qp();
    assert!(matches!(
        Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg()),
        Err(Error::NotFormatted)
    ));
}

/// Recovery itself may crash: records it found in the device's volatile cache are flushed
/// before the superblock records them as the acknowledged end, so a power cut that keeps only
/// the new superblock cannot leave a claim over lost records.
#[test]
fn crash_during_recovery_leaves_no_claim_over_cached_records() {
    let mut d = Dev::new();
    let mut log = d.format();
    for i in 0..10 {
        log.append(&payload(i, 9, 1000)).unwrap();
    }
    let acked = log.sync().unwrap();
    for i in 10..20 {
        log.append(&payload(i, 9, 1000)).unwrap();
    }
    assert!(log.writer().written() > log.acked().offset + 8000);
    drop(log); // no power cut: the unflushed records stay in the device's cache
    let refuse = std::rc::Rc::new(std::cell::Cell::new(true));
    let q = NoFlush {
        q: d.qp(),
        refuse: refuse.clone(),
    };
    assert!(matches!(
        Wal::open(q, &d.dma, d.clock.clone(), NeverCancel, cfg()),
        Err(Error::Writer(WError::Submit(SubmitError::Unsupported)))
    ));
    // Power cut during that recovery: of the unflushed blocks only the superblock survives.
    d.model.power_cut(|_, lba| lba == LBA0);
    let (mut log, rec) = d.open();
    assert_eq!(rec.records, 10);
    assert_eq!(rec.committed, acked);
    assert_eq!(collect(&mut log).len(), 10);
}
