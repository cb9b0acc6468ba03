//! keel-writer over the real NVMe driver (keel-nvme) and the software controller (keel-model).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, SubmitError};
use keel_hal::{Clock, DmaAllocator};
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NvmeModel};
use keel_nvme::{Config as NvmeConfig, Controller, IoQueuePair};
use keel_writer::{CancelToken, Config, Error, NeverCancel, Writer, CANCEL_CHECK_US};

type Qp = IoQueuePair<ModelMmio, ModelClock>;

struct Rig {
    model: NvmeModel,
    dma: HostDma,
    clock: ModelClock,
    qp: Qp,
    _ctrl: Controller<ModelMmio, ModelClock>,
}

fn rig() -> Rig {
    rig_with(64, NvmeConfig::default().io_timeout_ms)
}

/// A rig whose I/O queue pair has `depth` entries (`depth - 1` command slots) and whose driver
/// reports a command `Timeout` after `io_timeout_ms`.
fn rig_with(depth: u16, io_timeout_ms: u64) -> Rig {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let clock = ModelClock::new();
    // No driver-level retries: the writer's own retry loop is under test.
    let ncfg = NvmeConfig {
        max_retries: 0,
        io_timeout_ms,
        ..NvmeConfig::default()
    };
    let mut ctrl = Controller::init(model.mmio(), &dma, clock.clone(), ncfg).expect("init");
    let qp = ctrl.create_io_qpair(&dma, 1, depth).expect("qpair");
    Rig {
        model,
        dma,
        clock,
        qp,
        _ctrl: ctrl,
    }
}

const BUF: usize = 4096;
/// The model's Write Fault with DNR = 1 (SCT 2, SC 0x80).
const MEDIA_DNR: IoError = IoError::Media {
    status: keel_blockdev::DevStatus::from_field(0x8500),
};
/// The model's Internal Error with DNR = 1 (`Fault::PermanentError`).
const INTERNAL_DNR: IoError = IoError::Device {
    status: keel_blockdev::DevStatus::from_field(0x800C),
};
const LBA0: u64 = 16;

fn cfg() -> Config {
    Config {
        buf_size: BUF,
        buffers: 6,
        max_in_flight: 4,
        max_io_bytes: 16 * 1024,
        ..Config::new(1, LBA0, 4096)
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn disk(m: &NvmeModel, off: u64, len: usize) -> Vec<u8> {
    m.disk_read(1, (LBA0 * 512 + off) as usize, len)
}

fn read_all<Q: BlockQueue, K: CancelToken>(
    w: &mut Writer<Q, ModelClock, K>,
    len: usize,
) -> Vec<u8> {
    let mut v = vec![0u8; len];
    w.read_at(0, &mut v).expect("read_at");
    v
}

/// A token that fires after `n` checks (deterministic mid-retry cancellation).
struct CancelAfter(Cell<u32>);
impl CancelToken for CancelAfter {
    fn is_cancelled(&self) -> bool {
        let n = self.0.get();
        if n == 0 {
            return true;
        }
        self.0.set(n - 1);
        false
    }
}

#[test]
fn reads_in_flight_then_flushed_data() {
    let r = rig();
    let data = pattern(1, 3 * BUF + 700);
    r.model.set_fault(Fault::Stall);
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    w.append(&data).unwrap();
    assert_eq!(
        w.in_flight(),
        3,
        "three full buffers submitted in the background"
    );
    assert_eq!(w.written(), 0);
    assert!(
        disk(&r.model, 0, data.len()).iter().all(|&b| b == 0),
        "nothing on disk yet"
    );
    // Served from sealed (in-flight) buffers and the filling one, at odd offsets.
    assert_eq!(read_all(&mut w, data.len()), data);
    let mut mid = vec![0u8; 5000];
    w.read_at(BUF as u64 - 17, &mut mid).unwrap();
    assert_eq!(&mid[..], &data[BUF - 17..BUF - 17 + 5000]);
    // Let the device run.
    r.model.set_fault(Fault::None);
    r.model.step();
    assert_eq!(w.sync().unwrap(), data.len() as u64);
    assert_eq!(w.durable(), data.len() as u64);
    assert_eq!(disk(&r.model, 0, data.len()), data);
    // Flushed data is read from the device: change a byte behind the writer's back.
    r.model
        .disk_write(1, (LBA0 * 512 + 10) as usize, &[data[10] ^ 0xFF]);
    let mut b = [0u8; 1];
    w.read_at(10, &mut b).unwrap();
    assert_eq!(b[0], data[10] ^ 0xFF, "byte 10 came from the device");
    // The partial tail stays in the current buffer after sync.
    let mut t = [0u8; 100];
    w.read_at(data.len() as u64 - 100, &mut t).unwrap();
    assert_eq!(&t[..], &data[data.len() - 100..]);
    // Continue appending past a synced partial block.
    let more = pattern(2, 2000);
    w.append(&more).unwrap();
    w.sync().unwrap();
    assert_eq!(disk(&r.model, data.len() as u64, 2000), more);
    assert_eq!(
        disk(&r.model, data.len() as u64 - 100, 100),
        &data[data.len() - 100..]
    );
}

#[test]
fn in_flight_depth_and_in_order_watermark() {
    let r = rig();
    let c = Config {
        max_in_flight: 2,
        ..cfg()
    };
    r.model.set_fault(Fault::Stall);
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, c).unwrap();
    let data = pattern(3, 4 * BUF);
    w.append(&data).unwrap();
    assert_eq!(w.in_flight(), 2, "depth limit");
    assert_eq!(w.stats().commands, 2);
    // First write fails (transient), the second succeeds: completion out of order.
    r.model.set_fault(Fault::TransientError(1));
    r.model.step();
    w.poll();
    assert_eq!(w.written(), 0, "watermark waits for the first write");
    assert_eq!(
        disk(&r.model, BUF as u64, BUF),
        &data[BUF..2 * BUF],
        "second is on disk"
    );
    assert!(
        disk(&r.model, 0, BUF).iter().all(|&b| b == 0),
        "first is not"
    );
    assert_eq!(read_all(&mut w, data.len()), data);
    assert_eq!(w.write_out().unwrap(), 4 * BUF as u64);
    assert_eq!(w.written(), 4 * BUF as u64);
    assert_eq!(w.stats().retries, 1);
    assert_eq!(w.stats().commands, 5, "4 writes + 1 retry");
    assert_eq!(disk(&r.model, 0, data.len()), data);
    assert_eq!(w.durable(), 0, "no Flush issued yet");
    // 5 writes plus the device reads `read_all` made for the already-written second buffer.
    assert!(r.model.io_commands() > 5);
}

#[test]
fn transient_errors_retried_with_backoff() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    let data = pattern(4, 100);
    r.model.set_fault(Fault::TransientError(5));
    let t0 = r.clock.now_ns();
    w.append(&data).unwrap();
    assert_eq!(w.sync().unwrap(), data.len() as u64);
    assert_eq!(w.stats().retries, 5);
    // backoff 10, 20, 40, 80, 160 us (at least the longest chain must have elapsed)
    assert!(
        r.clock.now_ns() - t0 >= 160_000,
        "backoff waited on the clock"
    );
    assert_eq!(disk(&r.model, 0, data.len()), data);
}

#[test]
fn cancellation_mid_retry_keeps_reads_and_abandons_nothing() {
    let r = rig();
    let token = CancelAfter(Cell::new(200));
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), &token, cfg()).unwrap();
    let first = pattern(5, BUF + 300);
    w.append(&first).unwrap();
    assert_eq!(w.sync().unwrap(), first.len() as u64);
    let cmds_before = r.model.io_commands();
    r.model.set_fault(Fault::TransientError(u32::MAX));
    let data = pattern(6, 3 * BUF + 11);
    w.append(&data).unwrap();
    assert_eq!(w.sync(), Err(Error::Cancelled));
    assert!(w.stats().retries >= 2, "it was retrying: {:?}", w.stats());
    assert!(r.model.io_commands() > cmds_before + 3);
    assert_eq!(w.in_flight(), 0, "no command of the writer left in flight");
    assert_eq!(w.queue().in_flight(), 0, "the queue agrees");
    assert_eq!(
        w.durable(),
        first.len() as u64,
        "acknowledged data untouched"
    );
    assert_eq!(w.append(b"x"), Err(Error::Cancelled));
    assert_eq!(
        w.append_dma(&r.dma.alloc(512, 4096).unwrap(), 0, 512),
        Err(Error::Cancelled)
    );
    // Reads still work: the acknowledged part from the device, the rest from buffers.
    r.model.set_fault(Fault::None);
    let mut all = first.clone();
    all.extend_from_slice(&data);
    assert_eq!(read_all(&mut w, all.len()), all);
    assert_eq!(disk(&r.model, 0, first.len()), first);
}

#[test]
fn cancellation_with_atomic_bool_before_sync() {
    let r = rig();
    let flag = AtomicBool::new(false);
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), &flag, cfg()).unwrap();
    r.model.set_fault(Fault::Stall);
    let data = pattern(7, BUF + 1);
    w.append(&data).unwrap();
    assert_eq!(w.in_flight(), 1);
    flag.store(true, std::sync::atomic::Ordering::Release);
    r.model.set_fault(Fault::None);
    r.model.step(); // the in-flight write completes; it is reaped, not abandoned
    assert_eq!(w.sync(), Err(Error::Cancelled));
    w.poll();
    assert_eq!(w.in_flight(), 0);
    assert_eq!(
        w.written(),
        BUF as u64,
        "the write that was on the device was reaped"
    );
    assert_eq!(read_all(&mut w, data.len()), data);
}

#[test]
fn permanent_error_surfaces_typed_nothing_acknowledged_lost() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    let first = pattern(8, 2 * BUF + 123);
    w.append(&first).unwrap();
    let acked = w.sync().unwrap();
    r.model.set_fault(Fault::WriteFault);
    let data = pattern(9, BUF + 77);
    w.append(&data).unwrap();
    assert_eq!(w.sync(), Err(Error::Io(MEDIA_DNR)));
    assert_eq!(w.stats().retries, 0, "permanent errors are not retried");
    assert_eq!(w.health(), Err(Error::Io(MEDIA_DNR)));
    assert_eq!(w.append(b"more"), Err(Error::Io(MEDIA_DNR)));
    assert_eq!(w.durable(), acked);
    assert_eq!(w.in_flight(), 0);
    let mut all = first.clone();
    all.extend_from_slice(&data);
    assert_eq!(read_all(&mut w, all.len()), all, "reads still work");
    assert_eq!(
        disk(&r.model, 0, first.len()),
        first,
        "acknowledged bytes intact"
    );
}

/// Issue 16: the default classifier never retries a status the device marked Do Not Retry,
/// in the pool path (sync), a raw write and a flush; the same status with DNR = 0 is retried.
/// The probe bounds the polls, so a writer that retried forever fails here instead of hanging.
#[test]
fn default_classifier_never_retries_dnr() {
    let r = rig();
    let token = CancelAt::new(&r.clock);
    let mut w = probed(&r.dma, r.qp, &token, cfg());
    r.model.set_fault(Fault::PermanentError); // Internal Error, DNR = 1
    w.append(&pattern(10, 100)).unwrap();
    assert_eq!(w.sync(), Err(Error::Io(INTERNAL_DNR)));
    assert_eq!(w.stats().retries, 0, "DNR = 1 is not retried");
    assert_eq!(w.raw_write(0, &[1u8; 512]), Err(Error::Io(INTERNAL_DNR)));
    assert_eq!(w.device_flush(), Err(Error::Io(INTERNAL_DNR)));
    assert_eq!(w.stats().retries, 0);
    assert!(keel_writer::default_is_transient(IoError::Device {
        status: keel_blockdev::DevStatus::from_field(0x000C),
    }));
    assert!(!keel_writer::default_is_transient(INTERNAL_DNR));
}

#[test]
fn custom_classifier_makes_dnr_internal_error_permanent() {
    let r = rig();
    let c = Config {
        is_transient: |_| false,
        ..cfg()
    };
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, c).unwrap();
    r.model.set_fault(Fault::PermanentError);
    w.append(&pattern(10, 100)).unwrap();
    assert_eq!(w.sync(), Err(Error::Io(INTERNAL_DNR)));
    assert_eq!(read_all(&mut w, 100), pattern(10, 100));
}

#[test]
fn aligned_bypass_copies_nothing() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    let len = 64 * 1024;
    let src = r.dma.alloc(len, 4096).unwrap();
    let data = pattern(11, len);
    src.write_bytes(0, &data).unwrap();
    let allocs = r.dma.allocations();
    w.append_dma(&src, 0, len).unwrap();
    let s = w.stats();
    assert_eq!(s.bytes_copied, 0, "aligned bypass copied nothing");
    assert_eq!(s.bytes_bypassed, len as u64);
    assert_eq!(s.bytes_appended, len as u64);
    assert_eq!(s.commands, 4, "64 KiB in 16 KiB commands");
    assert_eq!(r.dma.allocations(), allocs, "no allocation on the I/O path");
    assert_eq!(w.written(), len as u64);
    assert_eq!(disk(&r.model, 0, len), data);
    w.sync().unwrap();
    assert_eq!(read_all(&mut w, len), data);
}

#[test]
fn unaligned_bypass_copies_only_head_and_tail() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    let pre = pattern(12, 100);
    w.append(&pre).unwrap();
    let src = r.dma.alloc(40_000, 4096).unwrap();
    let data = pattern(13, 40_000);
    src.write_bytes(0, &data).unwrap();
    // offset 12 + head 412 keeps the middle 4-byte aligned on the bus
    let (off, len) = (12usize, 30_000usize);
    w.append_dma(&src, off, len).unwrap();
    let head = 412u64;
    let mid = (len as u64 - head) / 512 * 512;
    let tail = len as u64 - head - mid;
    let s = w.stats();
    assert_eq!(s.bytes_bypassed, mid);
    assert_eq!(s.bytes_copied, 100 + head + tail);
    assert_eq!(s.bytes_appended, 100 + len as u64);
    let mut all = pre.clone();
    all.extend_from_slice(&data[off..off + len]);
    assert_eq!(read_all(&mut w, all.len()), all);
    w.sync().unwrap();
    assert_eq!(disk(&r.model, 0, all.len()), all);
    // A bus address that is not 4-aligned falls back to copying, still correct.
    let before = w.stats().bytes_copied;
    w.append_dma(&src, 1, 2048).unwrap();
    assert_eq!(w.stats().bytes_copied - before, 2048);
    all.extend_from_slice(&data[1..2049]);
    w.sync().unwrap();
    assert_eq!(disk(&r.model, 0, all.len()), all);
}

#[test]
fn bypass_failure_rolls_back_append() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    let src = r.dma.alloc(32 * 1024, 4096).unwrap();
    src.write_bytes(0, &pattern(14, 32 * 1024)).unwrap();
    r.model.set_fault(Fault::WriteFault);
    assert_eq!(w.append_dma(&src, 0, 32 * 1024), Err(Error::Io(MEDIA_DNR)));
    assert_eq!(w.appended(), 0, "nothing accepted");
    assert_eq!(w.in_flight(), 0, "caller memory is no longer referenced");
    let mut b = [0u8; 1];
    assert_eq!(w.read_at(0, &mut b), Err(Error::OutOfRange));
}

#[test]
fn bad_input_is_typed_errors() {
    let r = rig();
    let bad = [
        Config {
            buf_size: 1000,
            ..cfg()
        },
        Config {
            buffers: 1,
            ..cfg()
        },
        Config {
            buffers: 17,
            ..cfg()
        },
        Config {
            max_in_flight: 0,
            ..cfg()
        },
        Config {
            max_io_bytes: 100,
            ..cfg()
        },
        Config { ns: 9, ..cfg() },
        Config {
            lba_count: 1 << 40,
            ..cfg()
        },
        Config {
            lba_start: u64::MAX,
            ..cfg()
        },
    ];
    let mut qp = Some(r.qp);
    for c in bad {
        let q = qp.take().unwrap();
        // Writer::new consumes the queue; on error it is gone, so make a fresh rig each time.
        assert!(matches!(
            Writer::new(q, &r.dma, r.clock.clone(), NeverCancel, c),
            Err(Error::Config(_))
        ));
        qp = Some(rig().qp);
    }
    let small = Config {
        lba_count: 4,
        ..cfg()
    };
    let mut w = Writer::new(
        qp.take().unwrap(),
        &r.dma,
        r.clock.clone(),
        NeverCancel,
        small,
    )
    .unwrap();
    assert_eq!(w.append(&[0u8; 2049]), Err(Error::Full));
    w.append(&[7u8; 10]).unwrap();
    let mut b = [0u8; 11];
    assert_eq!(w.read_at(0, &mut b), Err(Error::OutOfRange));
    assert_eq!(w.read_at(u64::MAX, &mut b[..2]), Err(Error::OutOfRange));
    let src = r.dma.alloc(512, 4096).unwrap();
    assert_eq!(w.append_dma(&src, 100, 500), Err(Error::OutOfRange));
    assert_eq!(w.append_dma(&src, usize::MAX, 2), Err(Error::OutOfRange));
    assert_eq!(
        w.raw_write(LBA0, &[0u8; 512]),
        Err(Error::OutOfRange),
        "stream blocks are off limits"
    );
    assert_eq!(w.raw_write(0, &[0u8; 100]), Err(Error::OutOfRange));
    assert_eq!(w.resume(0), Err(Error::NotFresh));
}

#[test]
fn large_unaligned_bypass_ratio() {
    let r = rig();
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), NeverCancel, cfg()).unwrap();
    w.append(&pattern(15, 100)).unwrap();
    let len = 1 << 20;
    let src = r.dma.alloc(len + 512, 4096).unwrap();
    let data = pattern(16, len + 512);
    src.write_bytes(0, &data).unwrap();
    w.append_dma(&src, 12, len).unwrap();
    let s = w.stats();
    eprintln!(
        "1 MiB append_dma at stream offset 100: appended {} copied {} bypassed {}",
        s.bytes_appended, s.bytes_copied, s.bytes_bypassed
    );
    assert_eq!(s.bytes_appended, 100 + len as u64);
    assert!(s.bytes_copied < 1024 + 100, "only head and tail copied");
    assert_eq!(s.bytes_copied + s.bytes_bypassed, s.bytes_appended);
    w.sync().unwrap();
    let mut back = vec![0u8; len];
    w.read_at(100, &mut back).unwrap();
    assert_eq!(&back[..], &data[12..12 + len]);
}

// ---- Cancellation of every wait (issue 16) and seed 001 (issue 18) ----
//
// Every test below runs against a device that does not answer, and bounds everything in steps
// and virtual time: a `Probe` queue panics with `HANG` once the code under test has polled it
// `BUDGET` times (a hang detector that counts polls, not wall time), and the `CancelAt` token
// fires at a chosen instant of the model clock. "Prompt" means the call returned within
// `PROMPT_NS` of virtual time after the token fired.

const HANG: &str = "poll budget exhausted: the call never returned";
const BUDGET: u64 = 200_000;
const PROMPT_NS: u64 = 2 * CANCEL_CHECK_US * 1000;

/// A queue pair wrapper: counts polls and submissions, panics with [`HANG`] past its poll
/// budget, and refuses submissions with `refuse` while that is set. Each poll costs 1 us of
/// virtual time (a polling loop takes time whether or not it reads the clock).
struct Probe<Q> {
    q: Q,
    clock: ModelClock,
    polls: u64,
    submits: u64,
    refuse: Rc<Cell<Option<SubmitError>>>,
    /// Run on every timeout event (a test's stand-in for recovery).
    on_timeout: Option<Box<dyn FnMut()>>,
    timed_out: std::collections::VecDeque<keel_blockdev::TimedOut>,
}

impl<Q> Probe<Q> {
    fn new(q: Q, clock: &ModelClock) -> Self {
        Self {
            q,
            clock: clock.clone(),
            polls: 0,
            submits: 0,
            refuse: Rc::new(Cell::new(None)),
            on_timeout: None,
            timed_out: Default::default(),
        }
    }
}

impl<Q: BlockQueue> BlockQueue for Probe<Q> {
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        if let Some(e) = self.refuse.get() {
            return Err(e);
        }
        self.q.submit(op, tag)?;
        self.submits += 1;
        Ok(())
    }
    fn flush_submissions(&mut self) {
        self.q.flush_submissions()
    }
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        self.polls += 1;
        assert!(self.polls <= BUDGET, "{HANG}");
        self.clock.delay_us(1);
        let n = self.q.poll(max, on_done);
        while let Some(e) = self.q.pop_timed_out() {
            if let Some(hook) = self.on_timeout.as_mut() {
                hook();
            }
            self.timed_out.push_back(e);
        }
        n
    }
    fn pop_timed_out(&mut self) -> Option<keel_blockdev::TimedOut> {
        self.timed_out.pop_front()
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

/// `true` if `f` ran into the poll budget (it would have hung).
fn hangs<T>(f: impl FnOnce() -> T) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => false,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            assert!(msg.contains(HANG), "unexpected panic: {msg}");
            true
        }
    }
}

/// Fires once the model clock reaches the armed instant.
struct CancelAt {
    clock: ModelClock,
    at: Cell<u64>,
}

impl CancelAt {
    fn new(clock: &ModelClock) -> Self {
        Self {
            clock: clock.clone(),
            at: Cell::new(u64::MAX),
        }
    }
    /// Fires `ns` of virtual time from now.
    fn arm_in(&self, ns: u64) {
        self.at.set(self.clock.now_ns() + ns);
    }
    /// Asserts that the call that just returned did so within `PROMPT_NS` after the token fired.
    fn assert_prompt(&self, what: &str) {
        let now = self.clock.now_ns();
        let at = self.at.get();
        assert!(now >= at, "{what}: returned before the token fired");
        assert!(
            now - at <= PROMPT_NS,
            "{what}: returned {} us (virtual) after cancellation",
            (now - at) / 1000
        );
    }
}

impl CancelToken for CancelAt {
    fn is_cancelled(&self) -> bool {
        self.clock.now_ns() >= self.at.get()
    }
}

type Probed<'a> = Writer<Probe<Qp>, ModelClock, &'a CancelAt>;

fn probed<'a>(dma: &HostDma, qp: Qp, token: &'a CancelAt, c: Config) -> Probed<'a> {
    Writer::new(
        Probe::new(qp, &token.clock),
        dma,
        token.clock.clone(),
        token,
        c,
    )
    .unwrap()
}

/// Polls until the writer has nothing on the device (bounded).
fn drain<K: CancelToken>(w: &mut Writer<Probe<Qp>, ModelClock, K>) {
    for _ in 0..1000 {
        if w.in_flight() == 0 {
            return;
        }
        w.poll();
    }
    panic!("the writer's commands never came back");
}

/// Seed 001: cancellation while the device is stuck (it fetches no command; the driver's 30 s
/// timeout is far away) returns `Cancelled` promptly in virtual time, the stuck writes stay the
/// writer's, and everything appended stays readable: from the buffers while the device is
/// stuck, and from the device once it answers again.
#[test]
fn seed001_cancel_with_the_device_stuck_is_prompt_and_the_writer_stays_readable() {
    let r = rig();
    let token = CancelAt::new(&r.clock);
    let mut w = probed(&r.dma, r.qp, &token, cfg());
    let first = pattern(20, BUF + 300);
    w.append(&first).unwrap();
    assert_eq!(w.sync().unwrap(), first.len() as u64);
    r.model.set_fault(Fault::Stall);
    let data = pattern(21, 3 * BUF + 11);
    w.append(&data).unwrap();
    assert!(w.in_flight() >= 3, "writes on the stuck device");
    token.arm_in(1_000_000);
    assert_eq!(w.sync(), Err(Error::Cancelled));
    token.assert_prompt("sync");
    let stuck = w.in_flight();
    assert!(
        stuck >= 3,
        "the stuck writes are still tracked, not abandoned"
    );
    assert_eq!(w.append(b"x"), Err(Error::Cancelled));
    assert_eq!(w.sync(), Err(Error::Cancelled));
    // Read availability with the device still stuck: the unacknowledged part is in the buffers.
    let submits = w.queue().submits;
    let mut got = vec![0u8; data.len()];
    w.read_at(first.len() as u64, &mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(w.queue().submits, submits, "served without the device");
    // The device answers again: the writes are reaped, everything reads back.
    r.model.set_fault(Fault::None);
    r.model.step();
    drain(&mut w);
    assert_eq!(w.queue().in_flight(), 0);
    let mut all = first.clone();
    all.extend_from_slice(&data);
    assert_eq!(read_all(&mut w, all.len()), all);
    assert_eq!(
        disk(&r.model, 0, first.len()),
        first,
        "acknowledged bytes intact"
    );
}

/// Seed 001's naive baseline, the seed's own design (neon's `BufferedWriter` flush before
/// #11052): a flush retried forever, with no cancellation check in its retry/wait loop.
struct NaiveWriter<Q> {
    q: Q,
    buf: keel_hal::DmaRegion,
}

impl<Q: BlockQueue> NaiveWriter<Q> {
    /// Writes the buffer at `lba` and retries until it succeeds. `_cancel` is never looked at.
    fn flush(&mut self, lba: u64, _cancel: &dyn CancelToken) {
        let op = BlockOp::Write {
            ns: 1,
            lba,
            blocks: (self.buf.len() / 512) as u32,
            buf: BufRef::whole(&self.buf),
        };
        loop {
            if self.q.submit(op, 1).is_err() {
                self.q.poll(8, &mut |_, _| {});
                continue;
            }
            self.q.flush_submissions();
            let mut res = None;
            while res.is_none() {
                self.q.poll(8, &mut |_, r| res = Some(r));
            }
            if res == Some(Ok(())) {
                return;
            }
        }
    }
}

/// Seed 001's baseline hangs: with the device stuck and the token set, the naive flush loop
/// never returns (its retries go on: the driver times each attempt out), and neither does the
/// writer when nothing can cancel it; the writer with a token returns `Cancelled`.
#[test]
fn seed001_baseline_without_cancellation_hangs() {
    let r = rig_with(64, 1); // the driver times a stuck command out after 1 ms
    r.model.set_fault(Fault::Stall);
    let set = AtomicBool::new(true);
    let mut naive = NaiveWriter {
        q: Probe::new(r.qp, &r.clock),
        buf: r.dma.alloc(BUF, 4096).unwrap(),
    };
    assert!(
        hangs(|| naive.flush(LBA0, &set)),
        "the naive flush loop returned"
    );
    assert_eq!(
        naive.q.submits, 1,
        "no retry while the device owns the write (a timeout is not a completion)"
    );

    let r = rig_with(64, 1);
    r.model.set_fault(Fault::Stall);
    let mut w = Writer::new(
        Probe::new(r.qp, &r.clock),
        &r.dma,
        r.clock.clone(),
        NeverCancel,
        cfg(),
    )
    .unwrap();
    w.append(&pattern(22, 100)).unwrap();
    assert!(
        hangs(|| w.sync()),
        "a writer that cannot be cancelled returned"
    );
    assert_eq!(
        w.stats().retries,
        0,
        "never retried while the device owns it"
    );
    assert!(
        w.stats().timeouts >= 1,
        "the timeout was announced: {:?}",
        w.stats()
    );

    let r = rig_with(64, 1);
    r.model.set_fault(Fault::Stall);
    let token = CancelAt::new(&r.clock);
    let mut w = probed(&r.dma, r.qp, &token, cfg());
    w.append(&pattern(22, 100)).unwrap();
    token.arm_in(5_000_000);
    assert_eq!(w.sync(), Err(Error::Cancelled));
    token.assert_prompt("sync, retrying on timeouts");
}

/// Waiting for a free pool buffer (every buffer sealed and stuck on the device) ends.
#[test]
fn cancel_ends_the_wait_for_a_free_buffer() {
    let r = rig();
    let token = CancelAt::new(&r.clock);
    let c = Config {
        buffers: 2,
        ..cfg()
    };
    let mut w = probed(&r.dma, r.qp, &token, c);
    r.model.set_fault(Fault::Stall);
    let data = pattern(23, 3 * BUF);
    token.arm_in(1_000_000);
    assert_eq!(w.append(&data), Err(Error::Cancelled));
    token.assert_prompt("append waiting for a buffer");
    let n = w.appended() as usize;
    assert_eq!(n, 2 * BUF, "the prefix that fit was appended");
    assert_eq!(w.in_flight(), 2);
    assert_eq!(
        read_all(&mut w, n),
        &data[..n],
        "readable from the stuck buffers"
    );
}

/// `raw_op` spinning on `QueueFull` (every slot taken by stuck writes) ends.
#[test]
fn cancel_ends_a_raw_op_waiting_for_a_queue_slot() {
    let r = rig_with(4, 30_000); // 3 command slots
    let token = CancelAt::new(&r.clock);
    let c = Config {
        max_in_flight: 3,
        ..cfg()
    };
    let mut w = probed(&r.dma, r.qp, &token, c);
    r.model.set_fault(Fault::Stall);
    w.append(&pattern(24, 3 * BUF)).unwrap();
    assert_eq!(w.queue().in_flight(), 3, "the queue is full");
    let submits = w.queue().submits;
    token.arm_in(1_000_000);
    let mut b = [0u8; 512];
    assert_eq!(w.raw_read(0, &mut b), Err(Error::Cancelled));
    token.assert_prompt("raw_read waiting for a slot");
    assert_eq!(w.queue().submits, submits, "never submitted");
}

/// `raw_op` waiting for its command's completion ends; the command stays the writer's (a
/// second raw op is refused while it is on the device); once it is reaped, a read asked for
/// after cancellation works (read availability), a write does not start.
#[test]
fn cancel_ends_a_raw_op_waiting_for_its_completion() {
    let r = rig();
    r.model.disk_write(1, 0, &pattern(25, 512));
    let token = CancelAt::new(&r.clock);
    let mut w = probed(&r.dma, r.qp, &token, cfg());
    r.model.set_fault(Fault::Stall);
    token.arm_in(1_000_000);
    let mut b = [0u8; 512];
    assert_eq!(w.raw_read(0, &mut b), Err(Error::Cancelled));
    token.assert_prompt("raw_read waiting for completion");
    assert_eq!(w.in_flight(), 1, "the read is still the writer's");
    let submits = w.queue().submits;
    assert_eq!(w.raw_read(0, &mut b), Err(Error::Cancelled));
    assert_eq!(
        w.queue().submits,
        submits,
        "bounce buffer still the device's"
    );
    r.model.set_fault(Fault::None);
    r.model.step();
    drain(&mut w);
    w.raw_read(0, &mut b).unwrap();
    assert_eq!(
        &b[..],
        &pattern(25, 512)[..],
        "a read after cancellation works"
    );
    assert_eq!(w.raw_write(0, &[1u8; 512]), Err(Error::Cancelled));
    assert_eq!(w.device_flush(), Err(Error::Cancelled));
    assert_eq!(
        r.model.disk_read(1, 0, 512),
        pattern(25, 512),
        "nothing written"
    );
}

/// A read asked for after cancellation is awaited, never retried; when the queue announces that
/// its command timed out it fails with `Timeout` (it does not hang on a stuck device), and the
/// bounce buffer stays the device's until the late completion: no raw op starts before that.
#[test]
fn a_read_after_cancellation_ends_on_its_timeout_event() {
    let r = rig_with(64, 1);
    r.model.disk_write(1, 0, &pattern(26, 512));
    let token = CancelAt::new(&r.clock);
    let mut w = probed(&r.dma, r.qp, &token, cfg());
    token.arm_in(0);
    w.poll(); // the writer sees the token
    r.model.set_fault(Fault::Stall);
    let mut b = [0u8; 512];
    assert_eq!(w.raw_read(0, &mut b), Err(Error::Io(IoError::Timeout)));
    assert_eq!(w.in_flight(), 1, "the bounce buffer is still the device's");
    let submits = w.queue().submits;
    assert_eq!(w.raw_read(0, &mut b), Err(Error::Cancelled));
    assert_eq!(w.queue().submits, submits, "nothing submitted over it");
    r.model.set_fault(Fault::None);
    r.model.step();
    drain(&mut w);
    w.raw_read(0, &mut b).unwrap();
    assert_eq!(&b[..], &pattern(26, 512)[..]);
}

fn slow_backoff() -> Config {
    Config {
        backoff_base_us: 1_000_000,
        backoff_max_us: 1_000_000,
        ..cfg()
    }
}

/// `raw_op`'s backoff after `DeviceUnavailable` and after a transient error ends.
#[test]
fn cancel_ends_raw_op_backoffs() {
    for transient in [false, true] {
        let r = rig();
        let token = CancelAt::new(&r.clock);
        let mut w = probed(&r.dma, r.qp, &token, slow_backoff());
        if transient {
            r.model.set_fault(Fault::TransientError(u32::MAX));
        } else {
            w.queue().refuse.set(Some(SubmitError::DeviceUnavailable));
        }
        token.arm_in(1_500_000);
        let mut b = [0u8; 512];
        assert_eq!(w.raw_read(0, &mut b), Err(Error::Cancelled));
        token.assert_prompt(if transient {
            "raw_read backing off after a transient error"
        } else {
            "raw_read backing off on DeviceUnavailable"
        });
    }
}

/// The background writes' retry backoff (after a transient error, and after
/// `DeviceUnavailable`), slept in `wait`, ends.
#[test]
fn cancel_ends_the_backoff_of_background_writes() {
    for transient in [false, true] {
        let r = rig();
        let token = CancelAt::new(&r.clock);
        let mut w = probed(&r.dma, r.qp, &token, slow_backoff());
        if transient {
            r.model.set_fault(Fault::TransientError(u32::MAX));
        } else {
            w.queue().refuse.set(Some(SubmitError::DeviceUnavailable));
        }
        w.append(&pattern(26, BUF + 5)).unwrap();
        token.arm_in(1_500_000);
        assert_eq!(w.sync(), Err(Error::Cancelled));
        token.assert_prompt(if transient {
            "sync backing off after a transient error"
        } else {
            "sync backing off on DeviceUnavailable"
        });
        assert_eq!(read_all(&mut w, BUF + 5), pattern(26, BUF + 5));
    }
}

/// A cancelled `append_dma` returns only once the device gave back every bypass command it
/// held (they read the caller's region, which is borrowed for the call only): it waits for the
/// driver's verdict on the stuck commands (a 5 ms timeout here), retries and submits nothing.
#[test]
fn cancelled_append_dma_returns_once_the_device_is_done_with_the_callers_memory() {
    let r = rig_with(64, 5);
    let token = CancelAt::new(&r.clock);
    let c = Config {
        max_in_flight: 2,
        ..cfg()
    };
    let mut w = probed(&r.dma, r.qp, &token, c);
    // The device stalls until the driver announces a timeout; then it completes late (as a
    // recovery would end it): only then is the caller's memory free again.
    let model = r.model.clone();
    w.queue_mut().on_timeout = Some(Box::new(move || {
        model.set_fault(Fault::None);
        model.step();
    }));
    let src = r.dma.alloc(64 * 1024, 4096).unwrap();
    src.write_bytes(0, &pattern(27, 64 * 1024)).unwrap();
    r.model.set_fault(Fault::Stall);
    let t0 = r.clock.now_ns();
    token.arm_in(1_000_000);
    assert_eq!(w.append_dma(&src, 0, 64 * 1024), Err(Error::Cancelled));
    assert_eq!(
        w.in_flight(),
        0,
        "no command references the caller's region"
    );
    assert_eq!(
        w.queue().submits,
        2,
        "two commands reached the device, none retried"
    );
    assert!(
        r.clock.now_ns() - t0 >= 5_000_000,
        "the driver timed them out"
    );
    // The two commands completed late, successfully: at most what they carried is accepted.
    assert!(w.appended() <= 32 * 1024, "appended {}", w.appended());
    assert_eq!(w.stats().timeouts, 2);
}

/// The device of the write-race test: it finishes the held original write once the clock
/// passes `at` (checked from the writer's every wait, through the cancellation token, which
/// it never sets), or when the test says so.
struct LateOriginal {
    model: NvmeModel,
    clock: ModelClock,
    at: Cell<u64>,
}

impl LateOriginal {
    fn release(&self) {
        if self.model.held() > 0 {
            self.model.release_held();
        }
        self.at.set(u64::MAX);
    }
}

impl CancelToken for LateOriginal {
    fn is_cancelled(&self) -> bool {
        if self.clock.now_ns() >= self.at.get() {
            self.release();
        }
        false
    }
}

/// Issue 16 (OpenVMM PR #210's race): a write times out; the device completes the original
/// late, after the writer could have retried it and written newer data over the same blocks.
/// The newer data must win on the disk: the writer may retry or rewrite those blocks only once
/// the original's completion handed the buffer back.
#[test]
fn a_late_original_write_never_lands_over_newer_data() {
    let r = rig_with(64, 1); // the driver times a command out after 1 ms
    let late = LateOriginal {
        model: r.model.clone(),
        clock: r.clock.clone(),
        at: Cell::new(u64::MAX),
    };
    let c = Config {
        backoff_base_us: 10,
        backoff_max_us: 10,
        ..cfg()
    };
    let mut w = Writer::new(r.qp, &r.dma, r.clock.clone(), &late, c).unwrap();
    let old = pattern(40, 100);
    let new = pattern(41, 100);
    // The device takes the first write (block LBA0: `old` and zero padding) and sits on it
    // for 20 ms, 20 command timeouts.
    r.model.hold_next_io(1);
    late.at.set(r.clock.now_ns() + 20_000_000);
    w.append(&old).unwrap();
    assert_eq!(w.sync().unwrap(), 100);
    // The same block again, with more data.
    w.append(&new).unwrap();
    assert_eq!(w.sync().unwrap(), 200);
    // If the original is still on the device, it lands now, after everything else.
    late.release();
    let want: Vec<u8> = [old.clone(), new.clone()].concat();
    assert!(
        disk(&r.model, 0, 200) == want,
        "the late original overwrote newer data"
    );
    let s = w.stats();
    assert_eq!((s.timeouts, s.retries), (1, 0), "{s:?}");
    assert_eq!(read_all(&mut w, 200), want);
}

/// Clears the device's fault once its first failed attempt happened, and notes when.
struct AfterFirstFailure {
    model: NvmeModel,
    clock: ModelClock,
    commands: u64,
    failed_at: Cell<Option<u64>>,
}

impl CancelToken for AfterFirstFailure {
    fn is_cancelled(&self) -> bool {
        if self.failed_at.get().is_none() && self.model.io_commands() > self.commands {
            self.model.set_fault(Fault::None);
            self.failed_at.set(Some(self.clock.now_ns()));
        }
        false
    }
}

/// Issue 16: Command Retry Delay. The device reports CRDT1 = 500 ms in Identify Controller and
/// fails a write with a transient status whose CRD = 1: the driver does not retry it at once
/// (it reports it), and the writer's retry waits at least 500 ms, not its own 10 us backoff.
#[test]
fn a_retry_waits_the_command_retry_delay_the_device_asks_for() {
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    model.patch_identify(1, 134, &5u16.to_le_bytes()); // CRDT1 = 5 x 100 ms
    let clock = ModelClock::new();
    let ncfg = NvmeConfig {
        max_retries: 3,
        ..NvmeConfig::default()
    };
    let mut ctrl = Controller::init(model.mmio(), &dma, clock.clone(), ncfg).expect("init");
    assert_eq!(ctrl.identify().crdt, [5, 0, 0]);
    let qp = ctrl.create_io_qpair(&dma, 1, 64).expect("qpair");
    let st = keel_blockdev::DevStatus::from_field(0x000C | 1 << 12); // Internal Error, CRD 1
    assert_eq!(qp.retry_delay_us(st), 500_000);
    let token = AfterFirstFailure {
        model: model.clone(),
        clock: clock.clone(),
        commands: model.io_commands(),
        failed_at: Cell::new(None),
    };
    let c = Config {
        backoff_base_us: 10,
        backoff_max_us: 10,
        ..cfg()
    };
    let mut w = Writer::new(qp, &dma, clock.clone(), &token, c).unwrap();
    model.set_fault(Fault::Status(st.field()));
    w.append(&pattern(50, 100)).unwrap();
    assert_eq!(w.sync().unwrap(), 100);
    let waited = clock.now_ns() - token.failed_at.get().expect("one attempt failed");
    assert!(waited >= 500_000_000, "retried after {waited} ns");
    assert_eq!(w.stats().retries, 1);
    assert_eq!(
        w.queue().stats().retries,
        0,
        "the driver left the retry to the caller"
    );
    assert_eq!(disk(&model, 0, 100), pattern(50, 100));
}
