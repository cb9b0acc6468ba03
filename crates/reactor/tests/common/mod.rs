#![allow(dead_code)] // shared by several test binaries; each uses a subset
//! A scriptable in-memory `BlockQueue` for reactor tests (no data moves; completions come back
//! after a configurable number of polls; tags can be stalled, failed or forged).

use keel_blockdev::{BlockOp, BlockQueue, IoError, NsId, SubmitError};
use std::collections::VecDeque;

#[derive(Debug)]
pub struct FakeQueue {
    pub depth: usize,
    pub delay: u32,
    pub inflight: VecDeque<(u32, u32, Result<(), IoError>)>,
    pub stalled: Vec<u32>,
    pub stall_next: bool,
    pub forged: Vec<u32>,
    /// Doorbell writes: flushes that had something queued to announce.
    pub doorbells: u64,
    unflushed: bool,
    pub fail_lba_from: u64,
    /// Submissions at or past this LBA are refused outright (`OutOfRange`), never queued.
    pub refuse_lba_from: u64,
}

impl FakeQueue {
    pub fn new(depth: usize, delay: u32) -> Self {
        Self {
            depth,
            delay,
            inflight: VecDeque::new(),
            stalled: vec![],
            stall_next: false,
            forged: vec![],
            doorbells: 0,
            unflushed: false,
            fail_lba_from: u64::MAX,
            refuse_lba_from: u64::MAX,
        }
    }
    /// Completes every stalled tag with `Timeout` (what the driver's per-command timeout does).
    pub fn time_out_stalled(&mut self) {
        for t in self.stalled.drain(..) {
            self.inflight.push_back((t, 0, Err(IoError::Timeout)));
        }
    }
}

impl BlockQueue for FakeQueue {
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        if let BlockOp::Read { lba, .. } | BlockOp::Write { lba, .. } = op {
            if lba >= self.refuse_lba_from {
                return Err(SubmitError::OutOfRange);
            }
        }
        if self.inflight.len() + self.stalled.len() >= self.depth {
            return Err(SubmitError::QueueFull);
        }
        self.unflushed = true;
        if std::mem::take(&mut self.stall_next) {
            self.stalled.push(tag);
            return Ok(());
        }
        let res = match op {
            BlockOp::Read { lba, .. } | BlockOp::Write { lba, .. } if lba >= self.fail_lba_from => {
                Err(IoError::Media {
                    status: keel_blockdev::DevStatus::from_field(0x8500),
                })
            }
            _ => Ok(()),
        };
        self.inflight.push_back((tag, self.delay, res));
        Ok(())
    }
    fn flush_submissions(&mut self) {
        if std::mem::take(&mut self.unflushed) {
            self.doorbells += 1;
        }
    }
    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        let mut n = 0;
        for t in self.forged.drain(..) {
            on_done(t, Ok(()));
        }
        for e in self.inflight.iter_mut() {
            e.1 = e.1.saturating_sub(1);
        }
        while n < max {
            match self.inflight.front() {
                Some(&(tag, 0, res)) => {
                    self.inflight.pop_front();
                    on_done(tag, res);
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }
    fn depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.inflight.len() + self.stalled.len()
    }
    fn block_size(&self, _ns: NsId) -> Option<u32> {
        Some(512)
    }
    fn num_blocks(&self, _ns: NsId) -> Option<u64> {
        Some(1 << 20)
    }
}

pub fn read(lba: u64) -> BlockOp {
    BlockOp::Read {
        ns: 1,
        lba,
        blocks: 1,
        buf: keel_blockdev::BufRef::from_bus(0x1000, 512),
    }
}
