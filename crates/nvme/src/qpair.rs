//! I/O queue pairs: one SQ/CQ pair, owned by one core, driven by polling.

use core::sync::atomic::{fence, Ordering};

use heapless::{Deque, Vec};
use keel_blockdev::{
    BlockOp, BlockQueue, BufRef, DevStatus, IoError, NsId, OnDone, SubmitError, TimedOut,
};
use keel_hal::{Clock, DmaAllocator, DmaRegion, DmaRing, Mmio};

use crate::ctrl::{Config, Namespace, NsFormat, PiType, MAX_NAMESPACES};
use crate::error::NvmeError;
use crate::prp;
use crate::spec::{self, io_op, CqEntry, DsmRange, SqEntry, Status, PAGE_SIZE};
use crate::zns::{ZoneOp, REPORT_HEADER, ZONE_DESCRIPTOR};

const NONE: u16 = 0xFFFF;

const FREE: u8 = 0;
/// Submitted; the device owns it.
const ACTIVE: u8 = 1;
/// Timed out (announced as a [`TimedOut`] event) and still the device's: neither its slot (CID,
/// PRP list) nor its tag's buffer is given back until the device completes it (its own status is
/// reported), an abort of it completes it, or a controller reset quiesces it (`Timeout`).
const ZOMBIE: u8 = 2;
/// A zone append submitted; the device owns it. Its own state (not `ACTIVE`) so the completion
/// fast path needs no opcode compare: its returned LBA is checked in `handle_other`.
const APPENDING: u8 = 3;
/// In flight across a controller reset; to be resubmitted or failed.
const PENDING: u8 = 4;

/// The state of a slot (re)issued with `opcode`.
fn issued_state(opcode: u8) -> u8 {
    if opcode == io_op::ZONE_APPEND {
        APPENDING
    } else {
        ACTIVE
    }
}

/// Most commands one queue pair keeps in flight (its command slots). The rings may be deeper;
/// the extra entries are completion-queue slack. The bookkeeping for these slots lives in the
/// queue pair itself (plain memory): it is host-private, so it needs no volatile copies, and
/// under emulation every access to it is cheap.
pub const MAX_COMMANDS: usize = 256;
// CIDs hold the slot index in their low bits and a generation of at least 8 bits above it.
static_assertions::const_assert!(MAX_COMMANDS <= 256);

/// Per command slot bookkeeping (never given to the device).
#[derive(Debug, Clone, Copy, Default)]
struct SlotRec {
    deadline: u64,
    slba: u64,
    buf: u64,
    /// The metadata buffer's bus address for this part (MPTR), 0 = none; bit 0
    /// ([`META_APP_CHECK`], free: MPTR is dword-aligned) asks the device to check `app_tag`.
    meta: u64,
    nsid: u32,
    nlb: u32,
    len: u32,
    gen: u16,
    req: u16,
    next: u16,
    state: u8,
    opcode: u8,
    retries: u8,
    /// The application tag the device checks (PRCHK) where `meta` has [`META_APP_CHECK`].
    app_tag: u16,
    /// The caller's tag where `req` is [`DIRECT`] (a request of this one command).
    tag: u32,
}
static_assertions::const_assert!(core::mem::size_of::<SlotRec>() <= 64);
/// `SlotRec::req` of a request that is this one command (the fast path): its tag is in the
/// slot record and it has no request record until a slow path needs one (an error, a retry
/// report, a timeout, a reset), which [`IoQueuePair::direct_req`] then takes. One request
/// record stays reserved for each such command (`req_credits`), so there always is one.
const DIRECT: u16 = 0xFFFE;
/// `SlotRec::meta` bit 0: the device checks the application tag too.
const META_APP_CHECK: u64 = 1;

/// The phase tag in a CQ entry's upper quadword.
const CQE_PHASE: u64 = 1 << 48;
/// The bits of a CQ entry's upper quadword that [`IoQueuePair::cq_expect`] fixes: status and
/// phase (48..64), SQ id (16..32).
const CQE_FAST_MASK: u64 = 0xFFFF_0000_FFFF_0000;

const ERR_NONE: u8 = 0;
const ERR_STATUS: u8 = 1;
const ERR_RESET: u8 = 2;
/// Timed out, then quiesced by a controller reset: reported as `IoError::Timeout`.
const ERR_TIMEOUT: u8 = 3;
/// The device reported success with an impossible result (a zone append's LBA outside its
/// zone): reported as `IoError::BadResult`.
const ERR_BAD_RESULT: u8 = 4;
/// The device is gone (surprise removal): reported as `IoError::Removed`.
const ERR_REMOVED: u8 = 5;

/// Whether a command changes the namespace's data where it lands (so its order against
/// overlapping writes matters when it is issued again).
fn changes_data(opcode: u8) -> bool {
    matches!(
        opcode,
        io_op::WRITE | io_op::WRITE_ZEROES | io_op::DATASET_MANAGEMENT
    )
}

/// Per tag bookkeeping (a tag may span several commands when split at MDTS).
#[derive(Debug, Clone, Copy, Default)]
struct ReqRec {
    tag: u32,
    outstanding: u16,
    next: u16,
    status: u16,
    err: u8,
    /// A part of it timed out and its [`TimedOut`] event was queued (once per tag).
    timed_out: u8,
}
static_assertions::const_assert!(core::mem::size_of::<ReqRec>() <= 12);

/// See `IoQueuePair::fast_ns`.
#[derive(Clone, Copy, Default)]
struct FastNs {
    nsid: u32,
    block_size: u32,
    blocks: u64,
}

/// Queue-pair counters (for diagnostics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueStats {
    /// Device commands submitted (a split request counts each part; retries count again).
    pub submitted_cmds: u64,
    /// Completions accepted (naming a live command).
    pub completions: u64,
    /// Completions whose CID named a free slot or an old generation (duplicates, stale).
    pub stale_cid: u64,
    /// Completions whose CID slot index is past the queue.
    pub bad_cid: u64,
    /// Completions naming another SQ.
    pub bad_sqid: u64,
    /// Completions with an SQ head pointer past the queue.
    pub bad_sq_head: u64,
    /// Completions of commands that had already timed out (reported with the device's status).
    pub late_completions: u64,
    /// Timed-out commands a controller reset quiesced (reported as `Timeout`).
    pub quiesced_timeouts: u64,
    /// Commands resubmitted after a transient error status.
    pub retries: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Commands resubmitted after a controller reset.
    pub resubmitted_after_reset: u64,
    /// Writes failed instead of reissued (after a reset or a retryable error) because an
    /// overlapping write completed, or is in flight, that was issued after them.
    pub overtaken_writes: u64,
    /// SQ tail doorbell writes (MMIO).
    pub sq_doorbells: u64,
    /// CQ head doorbell writes (MMIO).
    pub cq_doorbells: u64,
    /// Doorbell updates that went only to the shadow buffer (EventIdx said no MMIO needed).
    pub shadow_suppressed: u64,
}

pub(crate) struct QpairParams<M, C> {
    pub mmio: M,
    pub clock: C,
    pub qid: u16,
    pub depth: u16,
    pub stride: usize,
    pub sq: DmaRing<64>,
    pub cq: DmaRing<16>,
    pub prp: DmaRegion,
    pub shadow: Option<(DmaRegion, DmaRegion)>,
    pub namespaces: Vec<Namespace, MAX_NAMESPACES>,
    pub max_transfer: usize,
    pub write_zeroes: bool,
    pub deallocate: bool,
    pub crdt: [u16; 3],
    pub cfg: Config,
}

/// One I/O submission/completion queue pair. Move it to the core that uses it; it needs no
/// locks. Implements [`BlockQueue`].
pub struct IoQueuePair<M: Mmio, C: Clock> {
    mmio: M,
    clock: C,
    qid: u16,
    entries: u16,
    sq_db: usize,
    cq_db: usize,
    stride: usize,
    sq: DmaRing<64>,
    cq: DmaRing<16>,
    prp: DmaRegion,
    slots: [SlotRec; MAX_COMMANDS],
    reqs: [ReqRec; MAX_COMMANDS],
    shadow: Option<(DmaRegion, DmaRegion)>,
    sq_tail: u16,
    sq_tail_rung: u16,
    cq_head: u16,
    /// The CQ head value last written to the device.
    cq_acked: u16,
    /// Entries consumed since then.
    cq_unacked: u16,
    /// How many consumed entries may go unacknowledged: `entries - 1 - nslots`. The device can
    /// post at most `nslots` completions beyond them, so the CQ never looks full to it.
    cq_slack: u16,
    /// The upper quadword of a CQ entry (SQ head, SQ id, CID, status and phase) that reports
    /// success for this SQ in the current phase, under [`CQE_FAST_MASK`]: the phase tag
    /// ([`CQE_PHASE`], the phase the host expects now), this SQ's id, status 0. One compare
    /// finds an entry posted, for this queue and successful.
    cq_expect: u64,
    nslots: u16,
    slot_bits: u32,
    /// The slot index bits of a CID: `(1 << slot_bits) - 1`.
    slot_mask: u16,
    /// Generations a slot cycles through (`0..gen_wrap`): every value of the bits above the
    /// slot index in a CID, less the all-ones one when the last slot is all ones too (that
    /// would be CID 0xFFFF).
    gen_wrap: u16,
    free_slot: u16,
    free_slots: u16,
    free_req: u16,
    /// Request records free and not reserved: the free list holds `req_credits` records plus
    /// one for each command in flight as [`DIRECT`] (taken by [`IoQueuePair::direct_req`]).
    /// There are `nslots` records, and every request accepted and not yet reported holds one
    /// (taken, or reserved if direct) until it is reported, so `nslots - req_credits` is the
    /// count of tags in flight ([`IoQueuePair::unreported`]): no counter of its own.
    req_credits: u16,
    ready_head: u16,
    ready_tail: u16,
    namespaces: Vec<Namespace, MAX_NAMESPACES>,
    max_transfer: usize,
    write_zeroes: bool,
    deallocate: bool,
    /// CRDT1..3 from Identify Controller (100 ms units).
    crdt: [u16; 3],
    list_pages: usize,
    timeout_ns: u64,
    max_retries: u8,
    next_scan: u64,
    /// Polls left before the timeout check next reads the clock (see `scan_due`).
    clock_countdown: core::cell::Cell<u16>,
    /// `Config::timeout_check_polls`.
    clock_every: u16,
    /// Failed: no I/O until a reset (set only through [`IoQueuePair::set_failed`], which
    /// keeps `fast_ns` in step).
    failed: bool,
    /// What the one-pass submission path needs of the first namespace, in one place, where
    /// that namespace is plain and the pair is not failed; else all 0 (no blocks: the path's
    /// range check then refuses everything, so it needs no test of either condition).
    fast_ns: FastNs,
    needs_reset: bool,
    /// Surprise removal seen (CSTS all ones): every tag failed once, no new work.
    removed: bool,
    /// `Config::removal_check_ms` in ns.
    removal_ns: u64,
    /// `stats.completions` at the last removal check, and when it last moved.
    removal_seen: u64,
    removal_since: u64,
    aborts: Deque<u16, 16>,
    /// Timeout events not yet taken by `pop_timed_out` (oldest dropped past the capacity).
    timeout_events: Deque<u32, MAX_COMMANDS>,
    /// `(tag, LBA)` of zone appends that completed, checked, not yet taken by `pop_appended`.
    appended: Deque<(u32, u64), MAX_COMMANDS>,
    /// Slots whose write was overtaken (see [`IoQueuePair::overtaken`]), decided at
    /// `prepare_reset` (before the SQ ring is reused) for `after_reset_ok`.
    overtaken: bitvec::array::BitArray<[u32; MAX_COMMANDS / 32]>,
    stats: QueueStats,
}

impl<M: Mmio, C: Clock> IoQueuePair<M, C> {
    /// Command slots for a ring of `depth` entries.
    pub(crate) fn slots_for(depth: u16, cfg: &Config) -> u16 {
        // With lazy CQ doorbells, half the entries are completion-queue slack (see `poll`).
        let n = if cfg.lazy_cq_doorbell {
            ((depth.max(2) - 1) / 2).max(1)
        } else {
            depth.max(2) - 1
        };
        n.min(MAX_COMMANDS as u16)
    }

    pub(crate) fn new(p: QpairParams<M, C>) -> Result<Self, NvmeError> {
        let nslots = Self::slots_for(p.depth, &p.cfg);
        let slot_bits = u16::BITS - (nslots - 1).leading_zeros().min(16);
        let mut qp = Self {
            sq_db: spec::sq_doorbell(p.qid, p.stride),
            cq_db: spec::cq_doorbell(p.qid, p.stride),
            mmio: p.mmio,
            clock: p.clock,
            qid: p.qid,
            entries: p.depth,
            stride: p.stride,
            sq: p.sq,
            cq: p.cq,
            prp: p.prp,
            slots: [SlotRec::default(); MAX_COMMANDS],
            reqs: [ReqRec::default(); MAX_COMMANDS],
            shadow: p.shadow,
            sq_tail: 0,
            sq_tail_rung: 0,
            cq_head: 0,
            cq_acked: 0,
            cq_unacked: 0,
            // Eager: no slack, one CQ doorbell per pass that consumed entries (even when the
            // slot cap leaves room in a deep ring).
            cq_slack: if p.cfg.lazy_cq_doorbell {
                p.depth - 1 - nslots
            } else {
                0
            },
            cq_expect: CQE_PHASE | (p.qid as u64) << 16,
            nslots,
            slot_bits: slot_bits.max(1),
            slot_mask: (1u16 << slot_bits.max(1)) - 1,
            gen_wrap: {
                let gens = 1u16 << (u16::BITS - slot_bits.max(1)); // at most 0x8000
                let top_reserved = (1u32 << slot_bits.max(1)) - 1 == (nslots - 1) as u32;
                gens - u16::from(top_reserved)
            },
            free_slot: NONE,
            free_slots: 0,
            free_req: NONE,
            req_credits: 0,
            ready_head: NONE,
            ready_tail: NONE,
            namespaces: p.namespaces,
            max_transfer: p.max_transfer,
            write_zeroes: p.write_zeroes,
            deallocate: p.deallocate,
            crdt: p.crdt,
            list_pages: p.cfg.prp_list_pages,
            timeout_ns: p.cfg.io_timeout_ms.saturating_mul(1_000_000),
            max_retries: p.cfg.max_retries,
            next_scan: 0,
            clock_countdown: core::cell::Cell::new(1),
            clock_every: p.cfg.timeout_check_polls.max(1),
            failed: false,
            fast_ns: FastNs::default(),
            needs_reset: false,
            removed: false,
            removal_ns: p.cfg.removal_check_ms.saturating_mul(1_000_000).max(1),
            removal_seen: 0,
            removal_since: 0,
            aborts: Deque::new(),
            timeout_events: Deque::new(),
            appended: Deque::new(),
            overtaken: bitvec::array::BitArray::ZERO,
            stats: QueueStats::default(),
        };
        // Build the free lists (slot 0 first).
        for i in (0..nslots).rev() {
            let s = SlotRec {
                next: qp.free_slot,
                ..SlotRec::default()
            };
            qp.put_slot(i, &s);
            qp.free_slot = i;
            let r = ReqRec {
                next: qp.free_req,
                ..ReqRec::default()
            };
            qp.put_req(i, &r);
            qp.free_req = i;
        }
        qp.free_slots = nslots;
        qp.req_credits = nslots;
        qp.refresh_fast_ns();
        qp.cq.region().fill(0, qp.cq.region().len(), 0)?;
        if let Some((db, ei)) = &qp.shadow {
            db.fill(0, db.len(), 0)?;
            ei.fill(0, ei.len(), 0)?;
        }
        Ok(qp)
    }

    /// The queue id of this pair (its SQ and CQ share it).
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Entries per ring (the `depth` given at creation).
    pub fn entries(&self) -> u16 {
        self.entries
    }
    pub(crate) fn sq_bus(&self) -> u64 {
        self.sq.region().bus_addr()
    }
    pub(crate) fn cq_bus(&self) -> u64 {
        self.cq.region().bus_addr()
    }
    /// The pair's counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// Largest transfer a single device command carries; larger requests are split.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    /// Command slots in use (in flight, including timed-out commands the device still owns).
    pub fn busy_slots(&self) -> usize {
        self.busy() as usize
    }
    /// Marks the pair failed (no I/O until a reset) or working again.
    fn set_failed(&mut self, failed: bool) {
        self.failed = failed;
        self.refresh_fast_ns();
    }

    /// `fast_ns` from the first namespace and `failed`.
    fn refresh_fast_ns(&mut self) {
        self.fast_ns = match self.namespaces.first() {
            Some(ns) if ns.is_plain() && !self.failed => FastNs {
                nsid: ns.nsid,
                block_size: ns.block_size,
                blocks: ns.blocks,
            },
            _ => FastNs::default(),
        };
    }

    /// Tags accepted and not yet reported (see `req_credits`).
    #[inline(always)]
    fn unreported(&self) -> usize {
        usize::from(self.nslots.saturating_sub(self.req_credits))
    }
    /// Slots not FREE (every slot is either on the free list or busy).
    #[inline(always)]
    fn busy(&self) -> u16 {
        self.nslots - self.free_slots
    }
    /// Free command slots.
    pub fn free_slots(&self) -> usize {
        self.free_slots as usize
    }
    /// `true` after a timeout or fatal controller status: call `Controller::reset`.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }
    /// `true` when the pair refuses new work (controller failed and could not be recovered).
    pub fn is_failed(&self) -> bool {
        self.failed
    }
    /// CIDs of timed-out commands, for `Controller::abort(qid, cid)`.
    pub fn pop_abort_candidate(&mut self) -> Option<u16> {
        self.aborts.pop_front()
    }
    /// Whether shadow doorbells are in use on this pair.
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }

    pub(crate) fn take_shadow(&mut self) -> Option<(DmaRegion, DmaRegion)> {
        self.shadow.take()
    }

    /// Diagnostics: the device's ceiling. Keeps `qd` copies of one prebuilt 4 KiB-or-smaller
    /// read (`blocks` blocks at `lba` of namespace `ns` into `buf`) in flight, writing a copy
    /// back onto the ring for each completion, with one SQ doorbell per pass and CQ doorbells
    /// as the pair's policy says (see [`Config::lazy_cq_doorbell`]), until `keep_going()` says
    /// stop; then drains. No command slots and no tags: each completion's status and command id
    /// are read (the id must name one of this loop's commands still in flight, and is reused
    /// for the copy that replaces it, so ids stay unique among outstanding commands), nothing
    /// else. What it measures is the device and the platform's doorbell: the most any driver
    /// could get from them at this depth. Runs only on an idle pair and leaves it idle and
    /// consistent. Returns (completions, error statuses and stray completions).
    ///
    /// # Errors
    /// [`SubmitError::QueueFull`] when commands are in flight or `qd` exceeds the command slots,
    /// [`SubmitError::InvalidNamespace`], [`SubmitError::OutOfRange`],
    /// [`SubmitError::BufferLength`] for a buffer that is not `blocks` blocks within one page,
    /// [`SubmitError::DeviceUnavailable`] if the pair has failed, or if the device stops
    /// completing: then commands this loop no longer tracks may still be on the device, so the
    /// pair refuses work until `Controller::reset` ([`IoQueuePair::needs_reset`]).
    pub fn device_ceiling(
        &mut self,
        ns: NsId,
        lba: u64,
        blocks: u32,
        buf: keel_blockdev::BufRef,
        qd: u16,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<(u64, u64), SubmitError> {
        if self.failed {
            return Err(SubmitError::DeviceUnavailable);
        }
        if self.busy() != 0 || self.unreported() != 0 || qd == 0 || qd > self.nslots {
            return Err(SubmitError::QueueFull);
        }
        let ns = self.ns(ns).ok_or(SubmitError::InvalidNamespace)?;
        Self::check_range(ns, lba, blocks)?;
        let len = blocks as u64 * ns.block_size as u64;
        let addr = buf.bus_addr();
        if blocks == 0
            || buf.len() as u64 != len
            || addr % 4 != 0
            || addr % PAGE_SIZE as u64 + len > PAGE_SIZE as u64
        {
            return Err(SubmitError::BufferLength);
        }
        let mut e = SqEntry::read_write(io_op::READ, 0, ns.nsid, lba, blocks, (addr, 0));
        // Command ids 0..qd: `free` holds those to (re)issue, `on_device` those in flight.
        let mut free = [0u16; MAX_COMMANDS];
        let mut on_device = [false; MAX_COMMANDS];
        for (i, f) in free.iter_mut().enumerate().take(qd as usize) {
            *f = i as u16;
        }
        let mut n_free = qd as usize;
        // A stalled device gets the pair's own command timeout (at least 1 ms) to make progress.
        let timeout = self.timeout_ns.max(1_000_000);
        let (mut done, mut errors, mut outstanding) = (0u64, 0u64, 0u16);
        let mut last_progress = self.clock.now_ns();
        let mut stopping = false;
        let mut idle = 0u32;
        loop {
            if !stopping {
                while n_free > 0 {
                    n_free -= 1;
                    let cid = free[n_free];
                    e.set_cid(cid);
                    if self
                        .sq
                        .region()
                        .write(self.sq_tail as usize * 64, &e)
                        .is_err()
                    {
                        return Err(self.abandon(outstanding));
                    }
                    self.sq_tail = self.next_pos(self.sq_tail);
                    on_device[cid as usize] = true;
                    outstanding += 1;
                }
            }
            self.flush_submissions();
            let mut n = 0u16;
            let mut consumed = 0u16;
            // At most `outstanding` entries per pass (a device posting junk cannot keep us here).
            while consumed < outstanding {
                let Some(word) = self.cq_posted() else {
                    break;
                };
                fence(Ordering::Acquire);
                let cid = self
                    .cq
                    .region()
                    .read_u16(self.cq_head as usize * 16 + spec::CQE_CID_OFFSET)
                    .unwrap_or(u16::MAX);
                self.advance_cq_head();
                consumed += 1;
                match on_device.get_mut(cid as usize) {
                    Some(live) if *live && cid < qd => {
                        *live = false;
                        free[n_free] = cid;
                        n_free += 1;
                        n += 1;
                        if word >> 1 != 0 {
                            errors += 1;
                        }
                    }
                    // A duplicate or an id we never issued: counted, nothing reissued.
                    _ => errors += 1,
                }
            }
            self.ack_consumed(consumed);
            if n > 0 {
                done += n as u64;
                outstanding -= n;
                stopping = stopping || !keep_going();
                last_progress = self.clock.now_ns();
            } else {
                // The clock only every so often: an idle pass here is a few loads.
                idle = idle.wrapping_add(1);
                if idle % 64 == 0 && self.clock.now_ns().saturating_sub(last_progress) > timeout {
                    return Err(self.abandon(outstanding));
                }
            }
            if stopping && outstanding == 0 {
                return Ok((done, errors));
            }
        }
    }

    /// `device_ceiling` gives up with `outstanding` commands it no longer tracks possibly still
    /// on the device: the pair must not be used until a controller reset.
    fn abandon(&mut self, outstanding: u16) -> SubmitError {
        if outstanding > 0 || self.sq_tail != self.sq_tail_rung {
            self.needs_reset = true;
            self.set_failed(true);
        }
        SubmitError::DeviceUnavailable
    }

    pub(crate) fn release(self, dma: &impl DmaAllocator) {
        dma.free(self.sq.into_region());
        dma.free(self.cq.into_region());
        dma.free(self.prp);
    }

    // Slot and request indices come from the free lists or from a CID already range-checked
    // against `nslots`; an index past the arrays reads a default record and writes nothing.
    #[inline]
    fn slot(&self, i: u16) -> SlotRec {
        self.slots.get(i as usize).copied().unwrap_or_default()
    }
    #[inline]
    fn req(&self, i: u16) -> ReqRec {
        self.reqs.get(i as usize).copied().unwrap_or_default()
    }
    #[inline]
    fn put_slot(&mut self, i: u16, s: &SlotRec) {
        if let Some(d) = self.slots.get_mut(i as usize) {
            *d = *s;
        }
    }
    #[inline]
    fn put_req(&mut self, i: u16, r: &ReqRec) {
        if let Some(d) = self.reqs.get_mut(i as usize) {
            *d = *r;
        }
    }

    /// The status word of the CQ entry at the head, if the device has posted it (its phase
    /// bit is the current phase). Read once; the caller copies what else it needs after an
    /// acquire fence.
    #[inline(always)]
    fn cq_posted(&self) -> Option<u16> {
        let off = self.cq_head as usize * 16 + spec::CQE_STATUS_OFFSET;
        let word = self.cq.region().read_u16(off).ok()?;
        ((word & 1 != 0) == self.phase()).then_some(word)
    }

    /// The CQ entry at the head, if the device has posted it, and its byte offset in the CQ.
    /// Its upper quadword (SQ head, SQ id, CID and status with the phase tag) is read with one
    /// load and used only if that load saw the current phase: every field the fast path uses
    /// comes from the same load as the phase bit. The lower quadword (DW0/DW1, the
    /// command-specific result) is left 0 here: only [`Self::handle_other`] needs it, and
    /// reads it (after this acquire fence, before the CQ head doorbell gives the entry back).
    /// One load and one bounds check per entry instead of a phase peek and a copy of all 16
    /// bytes.
    ///
    /// The flag says the entry is for this SQ and reports success (one compare against
    /// `cq_expect`, which also tests the phase): [`Self::handle_fast`] may take it.
    #[inline(always)]
    fn next_cqe(&self) -> Option<(CqEntry, usize, bool)> {
        let off = self.cq_head as usize * 16;
        let hi = self.cq.read_u64_le(self.cq_head, 1).ok()?;
        let fast = hi & CQE_FAST_MASK == self.cq_expect;
        if !fast && (hi ^ self.cq_expect) & CQE_PHASE != 0 {
            return None;
        }
        fence(Ordering::Acquire);
        Some((CqEntry::from_qwords(0, hi), off, fast))
    }

    /// The phase tag the host expects of the next CQ entry.
    fn phase(&self) -> bool {
        self.cq_expect & CQE_PHASE != 0
    }

    /// Moves the CQ head past the entry just consumed (flipping the phase at the wrap).
    #[inline]
    fn advance_cq_head(&mut self) {
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.cq_expect ^= CQE_PHASE;
        }
    }

    /// The CQ head doorbell after consuming `consumed` entries. Eager (no slack): one per pass
    /// that consumed entries. Lazy: only once the unacknowledged entries reach the slack, which
    /// keeps room for every command that can still be in flight.
    #[inline]
    fn ack_consumed(&mut self, consumed: u16) {
        if consumed == 0 {
            return;
        }
        self.cq_unacked = self.cq_unacked.saturating_add(consumed);
        if self.cq_unacked >= self.cq_slack {
            let (new, old) = (self.cq_head, self.cq_acked);
            self.ring(true, new, old);
            self.cq_acked = new;
            self.cq_unacked = 0;
        }
    }

    /// The ring position after `pos`.
    #[inline]
    fn next_pos(&self, pos: u16) -> u16 {
        if pos + 1 >= self.entries {
            0
        } else {
            pos + 1
        }
    }

    #[inline]
    fn cid_of(&self, slot: u16, gen: u16) -> u16 {
        slot | (gen << self.slot_bits)
    }

    /// The generation after `gen` (wrapping within the bits above the slot index). Never one
    /// that would make CID 0xFFFF (reserved as "no command" in error logs).
    #[inline]
    fn next_gen(&self, gen: u16) -> u16 {
        let g = gen.wrapping_add(1);
        if g >= self.gen_wrap {
            0
        } else {
            g
        }
    }

    fn alloc_slot(&mut self) -> Option<u16> {
        let i = self.free_slot;
        if i == NONE {
            return None;
        }
        let s = self.slot(i);
        self.free_slot = s.next;
        self.free_slots -= 1;
        Some(i)
    }

    /// Returns slot `i` to the free list (only its state and list link change).
    #[inline]
    fn release_slot(&mut self, i: u16) {
        if let Some(d) = self.slots.get_mut(i as usize) {
            d.state = FREE;
            d.next = self.free_slot;
        }
        self.free_slot = i;
        self.free_slots += 1;
    }

    fn alloc_req(&mut self) -> Option<u16> {
        let i = self.free_req;
        if i == NONE || self.req_credits == 0 {
            return None;
        }
        self.req_credits -= 1;
        self.free_req = self.req(i).next;
        Some(i)
    }

    /// Returns request record `i` to the free list. Only its link is written: every
    /// allocation writes the whole record.
    fn free_req_rec(&mut self, i: u16) {
        if let Some(r) = self.reqs.get_mut(i as usize) {
            r.next = self.free_req;
        }
        self.free_req = i;
        self.req_credits += 1;
    }

    /// The request record for a [`DIRECT`] command with `tag` that a slow path is about to
    /// finish or mark: taken from the free list without a credit (its credit was reserved
    /// when the command was submitted), one command outstanding. The list cannot be empty
    /// here: it holds a record for every direct command in flight (see `req_credits`; debug
    /// builds assert it, and `tests/direct.rs` drives every slow path with a full queue).
    #[cold]
    fn direct_req(&mut self, tag: u32) -> u16 {
        let i = self.free_req;
        let Some(next) = self.reqs.get(i as usize).map(|r| r.next) else {
            debug_assert!(false, "no request record for a direct command");
            keel_log::error!("nvme: q{} no request record for tag {}", self.qid, tag);
            return NONE;
        };
        self.free_req = next;
        self.put_req(
            i,
            &ReqRec {
                tag,
                outstanding: 1,
                next: NONE,
                ..ReqRec::default()
            },
        );
        i
    }

    /// One command of the request of slot record `s` is finished (as [`Self::finish_part`]),
    /// a [`DIRECT`] one given its request record first.
    fn finish_slot(&mut self, s: &SlotRec, err: u8, status: u16) {
        let req = if s.req == DIRECT {
            self.direct_req(s.tag)
        } else {
            s.req
        };
        self.finish_part(req, err, status);
    }

    /// The caller's tag of slot record `s`'s request.
    fn tag_of_slot(&self, s: &SlotRec) -> u32 {
        if s.req == DIRECT {
            s.tag
        } else {
            self.req(s.req).tag
        }
    }

    #[inline(always)]
    fn push_ready(&mut self, i: u16, mut r: ReqRec) {
        r.next = NONE;
        self.put_req(i, &r);
        if self.ready_tail == NONE {
            self.ready_head = i;
        } else {
            let mut t = self.req(self.ready_tail);
            t.next = i;
            self.put_req(self.ready_tail, &t);
        }
        self.ready_tail = i;
    }

    /// One command (part) of request `req` is finished, with `err` (`ERR_NONE` = success).
    #[inline(always)]
    fn finish_part(&mut self, req: u16, err: u8, status: u16) {
        let mut r = self.req(req);
        r.outstanding = r.outstanding.saturating_sub(1);
        if err != ERR_NONE && r.err == ERR_NONE {
            r.err = err;
            r.status = status;
        }
        if r.outstanding == 0 {
            self.push_ready(req, r);
        } else {
            self.put_req(req, &r);
        }
    }

    /// A command of request `req` succeeded. Returns the request's tag when that finished it
    /// and it can be reported at once (no failed part): the common case, a request of one
    /// command. Otherwise as [`Self::finish_part`] (the ready list).
    #[inline(always)]
    fn finish_ok(&mut self, req: u16) -> Option<u32> {
        let r = self.req(req);
        if r.outstanding == 1 && r.err == ERR_NONE {
            self.free_req_rec(req);
            return Some(r.tag);
        }
        self.finish_part(req, ERR_NONE, 0);
        None
    }

    /// The body of [`BlockQueue::poll`] and [`BlockQueue::poll_with`]: with a concrete
    /// `on_done` the successful completion's report is inlined into the reaping loop; the cold
    /// paths (ready list, timeouts) take it through one indirect call.
    #[inline(always)]
    fn poll_impl<D: OnDone + ?Sized>(&mut self, max: usize, on_done: &mut D) -> usize {
        self.flush_submissions();
        // The ready list is almost always empty: check it here, not in a call.
        let mut reported = if self.ready_head != NONE {
            self.drain_ready(&mut |t, r| on_done.done(t, r))
        } else {
            0
        };
        let mut consumed = 0usize;
        while consumed < max {
            let Some((e, off, fast)) = self.next_cqe() else {
                break;
            };
            self.advance_cq_head();
            consumed += 1;
            let tag = match fast.then(|| self.handle_fast(&e)).flatten() {
                Some(tag) => Some(tag),
                None => self.handle::<false>(e, off),
            };
            if let Some(tag) = tag {
                on_done.done(tag, Ok(()));
                reported += 1;
            }
        }
        self.ack_consumed(u16::try_from(consumed).unwrap_or(u16::MAX));
        if self.ready_head != NONE {
            reported += self.drain_ready(&mut |t, r| on_done.done(t, r));
        }
        if let Some(now) = self.scan_due() {
            self.scan_timeouts(now);
            if self.check_removed(now) {
                reported += self.drain_ready(&mut |t, r| on_done.done(t, r));
            }
        }
        // Retries queued by `handle` go out with one doorbell.
        self.flush_submissions();
        reported
    }

    /// Reports the requests on the ready list (rare: split requests, errors, timeouts).
    #[inline(never)]
    fn drain_ready(&mut self, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        let mut n = 0;
        while self.ready_head != NONE {
            let i = self.ready_head;
            let r = self.req(i);
            self.ready_head = r.next;
            if self.ready_head == NONE {
                self.ready_tail = NONE;
            }
            let result = match r.err {
                ERR_NONE => Ok(()),
                ERR_STATUS => Err(Status::from_field(r.status).to_io_error()),
                ERR_RESET => Err(IoError::DeviceReset),
                ERR_TIMEOUT => Err(IoError::Timeout),
                ERR_BAD_RESULT => Err(IoError::BadResult),
                ERR_REMOVED => Err(IoError::Removed),
                _ => Err(IoError::Invalid),
            };
            self.free_req_rec(i);
            on_done(r.tag, result);
            n += 1;
        }
        n
    }

    /// Builds the SQ entry for slot `i` (writing its PRP list or DSM range).
    fn build_sqe(&self, i: u16, s: &SlotRec) -> Result<SqEntry, prp::PrpError> {
        let cid = self.cid_of(i, s.gen);
        let mut e = SqEntry::new(s.opcode, cid, s.nsid);
        let list_off = i as usize * self.list_pages * PAGE_SIZE;
        match s.opcode {
            io_op::READ | io_op::WRITE | io_op::ZONE_APPEND => {
                let prp = prp::build(s.buf, s.len as usize, &self.prp, list_off, self.list_pages)?;
                e = SqEntry::read_write(s.opcode, cid, s.nsid, s.slba, s.nlb, prp);
                self.protect(&mut e, s);
            }
            io_op::ZONE_MGMT_SEND => {
                // `nlb` carries CDW13 (action, select all).
                e.cdw10 = s.slba as u32;
                e.cdw11 = (s.slba >> 32) as u32;
                e.cdw13 = s.nlb;
            }
            io_op::ZONE_MGMT_RECV => {
                // `nlb` carries CDW13 (report zones, all states, partial report).
                let prp = prp::build(s.buf, s.len as usize, &self.prp, list_off, self.list_pages)?;
                e.prp1 = prp.0;
                e.prp2 = prp.1;
                e.cdw10 = s.slba as u32;
                e.cdw11 = (s.slba >> 32) as u32;
                e.cdw12 = s.len / 4 - 1;
                e.cdw13 = s.nlb;
            }
            io_op::WRITE_ZEROES => {
                e.cdw10 = s.slba as u32;
                e.cdw11 = (s.slba >> 32) as u32;
                e.cdw12 = s.nlb - 1;
                self.protect(&mut e, s);
                // Write Zeroes with PRACT: the controller writes PI for the zeroes; a PRCHK
                // there is an Invalid Protection Information error (nothing to check).
                e.cdw12 &= !NsFormat::PRCHK_MASK;
            }
            io_op::DATASET_MANAGEMENT => {
                let range = DsmRange {
                    cattr: 0,
                    nlb: s.nlb,
                    slba: s.slba,
                };
                self.prp
                    .write(list_off, &range)
                    .map_err(|_| prp::PrpError::ListRegion)?;
                e.prp1 = self.prp.bus_addr() + list_off as u64;
                e.cdw10 = 0; // NR = 0: one range
                e.cdw11 = 1 << 2; // AD: deallocate
            }
            _ => {}
        }
        Ok(e)
    }

    /// Protection information for a read, write or write zeroes on a PI namespace: PRACT and
    /// PRCHK in CDW12, and the reference tag (the part's LBA) in CDW14 where the type wants it.
    ///
    /// With a metadata buffer (`s.meta`), the caller's protection information travels in it:
    /// no PRACT, and the device checks the guard and reference tag the caller computed.
    fn protect(&self, e: &mut SqEntry, s: &SlotRec) {
        if let Some(ns) = self.ns(s.nsid).filter(|ns| !ns.is_plain()) {
            let (mut prinfo, mut reftag) = ns.format.prinfo();
            if s.meta != 0 {
                e.mptr = s.meta & !META_APP_CHECK;
                (prinfo, reftag) = match ns.pi {
                    Some(t) => (
                        NsFormat::Pract(t).prinfo().0 & NsFormat::PRCHK_MASK,
                        t != PiType::Type3,
                    ),
                    None => (0, false),
                };
            }
            if s.meta & META_APP_CHECK != 0 && ns.pi.is_some() {
                // PRCHK application tag: every bit of the tag compared (ELBATM all ones).
                prinfo |= 1 << 27;
                e.cdw15 = 0xFFFF_0000 | u32::from(s.app_tag);
            }
            e.cdw12 |= prinfo;
            if reftag {
                e.cdw14 = s.slba as u32;
                if ns.pi_guard64 {
                    // A 48-bit reference tag: its upper 16 bits in CDW3 (NVMe 2.0, 64-bit
                    // guard formats).
                    e.cdw3 = ((s.slba >> 32) & 0xFFFF) as u32;
                }
            }
        }
    }

    /// Writes slot `i`'s command at SQ position `pos` (not yet visible to the device).
    fn place(&mut self, pos: u16, i: u16, s: &SlotRec) -> Result<(), prp::PrpError> {
        let e = self.build_sqe(i, s)?;
        self.sq
            .region()
            .write(pos as usize * 64, &e)
            .map_err(|_| prp::PrpError::ListRegion)
    }

    /// Re-issues slot `i` (retry or after reset) with a new generation, at the SQ tail.
    fn reissue(&mut self, i: u16, mut s: SlotRec) -> bool {
        s.gen = self.next_gen(s.gen);
        s.state = issued_state(s.opcode);
        s.retries = s.retries.saturating_add(1);
        s.deadline = self.clock.now_ns().saturating_add(self.timeout_ns);
        let pos = self.sq_tail;
        if self.place(pos, i, &s).is_err() {
            return false;
        }
        self.put_slot(i, &s);
        self.sq_tail = self.next_pos(self.sq_tail);
        self.stats.submitted_cmds += 1;
        true
    }

    #[inline(always)]
    fn ring(&mut self, cq: bool, new: u16, old: u16) {
        // The SQ entries (and PRP lists, and a write's data) must reach the device before it
        // sees the new tail: the board's barrier (keel-hal, "Doorbell ordering").
        self.mmio.doorbell_barrier();
        if let Some((db, ei)) = &self.shadow {
            let off = if cq { self.stride } else { 0 };
            let _ = db.write_u32(off, new as u32);
            // A store to the shadow doorbell, then a load of EventIdx, both in DMA memory:
            // store-to-load order needs a full fence on every CPU (x86 included).
            fence(Ordering::SeqCst);
            let event = ei.read_u16(off).unwrap_or(old);
            if !spec::shadow_needs_mmio(event, new, old) {
                self.stats.shadow_suppressed += 1;
                return;
            }
        }
        if cq {
            self.mmio.write32(self.cq_db, new as u32);
            self.stats.cq_doorbells += 1;
        } else {
            self.mmio.write32(self.sq_db, new as u32);
            self.stats.sq_doorbells += 1;
        }
    }

    /// Handles one completion entry (already copied out of the ring) in full: every entry
    /// [`Self::handle_fast`] did not take. Returns the tag of a request it finished
    /// successfully and that can be reported at once; everything else goes through the ready
    /// list. A call: the common completion is `handle_fast`'s, inlined into the reaping loop.
    ///
    /// With `DEFER` (recovery, off the I/O path) a success goes to the ready list too, so the
    /// pair's owner hears of it on its next poll instead of whoever reaped it.
    #[inline(never)]
    fn handle<const DEFER: bool>(&mut self, e: CqEntry, off: usize) -> Option<u32> {
        let e = &e;
        if e.sq_id != self.qid {
            self.stats.bad_sqid += 1;
            return None;
        }
        if e.sq_head >= self.entries {
            self.stats.bad_sq_head += 1;
            return None;
        }
        // `slot_bits` is 1..=8 (at most `MAX_COMMANDS` = 256 slots): the shift is in range,
        // and the slot index fits a byte (said with the cast, so the lookup in the 256 slot
        // records below needs no bounds check of its own).
        let i = u16::from((e.cid & self.slot_mask) as u8);
        let gen = e.cid >> self.slot_bits;
        if i >= self.nslots {
            self.stats.bad_cid += 1;
            return None;
        }
        let Some(&SlotRec {
            gen: live_gen,
            state,
            req,
            tag,
            ..
        }) = self.slots.get(i as usize)
        else {
            self.stats.bad_cid += 1;
            return None;
        };
        if live_gen != gen || !matches!(state, ACTIVE | ZOMBIE | APPENDING) {
            self.reject_stale(e.cid);
            return None;
        }
        self.stats.completions += 1;
        if state == ACTIVE && e.status >> 1 == 0 {
            self.release_slot(i);
            // A one-command request's success is [`Self::handle_fast`]'s; here it is one that
            // went the long way (recovery, or a completion the fast check did not take).
            let req = if req == DIRECT {
                self.direct_req(tag)
            } else {
                req
            };
            if DEFER {
                self.finish_part(req, ERR_NONE, 0);
                return None;
            }
            return self.finish_ok(req);
        }
        self.handle_other(e, i, off);
        None
    }

    /// The common completion, for an entry [`Self::next_cqe`] found for this SQ and successful:
    /// a live [`DIRECT`] command (the CID's slot active in that generation) finishes here and
    /// its tag is returned. `None` for anything else, having changed nothing: [`Self::handle`]
    /// then checks the entry in full and gives each case its count. No check of the slot
    /// index against `nslots`: the records past it are never active.
    #[inline(always)]
    fn handle_fast(&mut self, e: &CqEntry) -> Option<u32> {
        if e.sq_head >= self.entries {
            return None;
        }
        // `slot_bits` is 1..=8: the shift is in range and the index fits a byte (the lookup in
        // the 256 slot records needs no bounds check of its own).
        let i = u16::from((e.cid & self.slot_mask) as u8);
        let s = self.slots.get(i as usize)?;
        if s.gen != e.cid >> self.slot_bits || s.state != ACTIVE || s.req != DIRECT {
            return None;
        }
        let tag = s.tag;
        self.stats.completions += 1;
        self.release_slot(i);
        // A request of this one command: done, its reserved record back.
        self.req_credits += 1;
        Some(tag)
    }

    /// A completion whose command ID names no live command (stale, duplicate or forged).
    #[cold]
    #[inline(never)]
    fn reject_stale(&mut self, cid: u16) {
        self.stats.stale_cid += 1;
        keel_log::warn!("nvme: q{} stale/duplicate cid {}", self.qid, cid);
    }

    /// [`IoQueuePair::handle`] for everything but a first-time success: a late completion of
    /// an abandoned command, an error (retried or reported), or a part of a split request.
    ///
    /// `e` came from [`Self::next_cqe`] without its DW0/DW1: they are read here, from the
    /// entry at byte `off` of the CQ (still the host's: the CQ head doorbell has not given it
    /// back yet).
    #[inline(never)]
    fn handle_other(&mut self, e: &CqEntry, i: u16, off: usize) {
        let mut e = *e;
        if let Ok(lo) = self.cq.region().read_u64_le(off) {
            e.dw0 = lo as u32;
            e.dw1 = (lo >> 32) as u32;
        }
        let e = &e;
        let s = self.slot(i);
        let status = e.status();
        if status.is_success() && s.opcode == io_op::ZONE_APPEND {
            self.release_slot(i);
            if s.state == ZOMBIE {
                self.stats.late_completions += 1;
            }
            let err = self.check_append(&s, e);
            self.finish_slot(&s, err, 0);
            return;
        }
        if s.state == ZOMBIE {
            // The device is done with it at last: its tag (and buffer) goes back now, with the
            // device's own status. Not retried: the caller has heard of the timeout and decides.
            self.stats.late_completions += 1;
            self.release_slot(i);
            if status.is_success() {
                self.finish_slot(&s, ERR_NONE, 0);
            } else {
                self.finish_slot(&s, ERR_STATUS, e.status);
            }
            return;
        }
        // A status asking for a retry delay (CRD != 0) is not retried here at once: it is
        // reported, and the caller waits `BlockQueue::retry_delay_us` before its own retry.
        if !status.is_success()
            && status.is_retryable()
            && status.crd == 0
            && s.retries < self.max_retries
            && !self.failed
        {
            if self.overtaken(i, &s, self.sq_tail) {
                self.stats.overtaken_writes += 1;
            } else {
                self.stats.retries += 1;
                if self.reissue(i, s) {
                    return;
                }
            }
        }
        self.release_slot(i);
        if status.is_success() {
            self.finish_slot(&s, ERR_NONE, 0);
        } else {
            self.finish_slot(&s, ERR_STATUS, e.status);
        }
    }

    /// `true` when data-changing slot `i` (`s`) must not be issued again: issued again it could
    /// land behind a newer write to overlapping blocks. "Newer" is submission order, read off
    /// the SQ ring itself, which still holds the last `entries` commands submitted (the device
    /// never writes it): a data-changing command placed after this one's entry, to the same
    /// namespace and overlapping blocks (a Dataset Management, whose ranges are not in its
    /// entry, counts as overlapping), completed or not. If the slot's own entry was already
    /// overwritten (more than `entries` commands since), its order is unknown and the answer is
    /// `true`. `tail` is the SQ tail those entries were placed before. Such a write fails once
    /// instead; the blocks then hold one of the writes, never an older one behind a newer one.
    /// Only run off the I/O path (a retryable error, a reset): it reads up to `entries` entries.
    fn overtaken(&self, i: u16, s: &SlotRec, tail: u16) -> bool {
        if !changes_data(s.opcode) {
            return false;
        }
        let n = self.entries;
        let entry = |p: u16| self.sq.region().read::<SqEntry>(p as usize * 64).ok();
        let cid = self.cid_of(i, s.gen);
        // Ranks: 0 = the oldest entry still in the ring (at the tail), n - 1 = the newest.
        let rank = |p: u16| (p + n - tail % n) % n;
        // The live command's entry is the newest with its CID (an older use of the same slot and
        // generation may still be further back in the ring).
        let Some(own) = (0..n)
            .filter(|&p| entry(p).is_some_and(|e| (e.cdw0 >> 16) as u16 == cid))
            .max_by_key(|&p| rank(p))
        else {
            return true;
        };
        let end = s.slba.saturating_add(s.nlb.max(1) as u64);
        (0..n).filter(|&p| rank(p) > rank(own)).any(|p| {
            let Some(e) = entry(p) else {
                return true;
            };
            let op = e.cdw0 as u8;
            if !changes_data(op) || e.nsid != s.nsid {
                return false;
            }
            if op == io_op::DATASET_MANAGEMENT {
                return true;
            }
            let slba = e.cdw10 as u64 | (e.cdw11 as u64) << 32;
            let nlb = (e.cdw12 & 0xFFFF) as u64 + 1;
            slba < end && s.slba < slba.saturating_add(nlb)
        })
    }

    /// A zone append completed successfully: the LBA it returns (DW0 low, DW1 high) must lie in
    /// the zone it was sent to (`s.slba`) with room for its blocks, and in the namespace.
    /// Records `(tag, lba)` for [`IoQueuePair::pop_appended`]; a lie is `ERR_BAD_RESULT`.
    #[cold]
    fn check_append(&mut self, s: &SlotRec, e: &CqEntry) -> u8 {
        let lba = e.dw0 as u64 | (e.dw1 as u64) << 32;
        let Some(z) = self.ns(s.nsid).and_then(|ns| ns.zoned) else {
            return ERR_BAD_RESULT;
        };
        let zone_end = s.slba.saturating_add(z.zone_size);
        let ok = lba >= s.slba
            && lba
                .checked_add(s.nlb as u64)
                .is_some_and(|end| end <= zone_end);
        if !ok {
            keel_log::warn!(
                "nvme: q{} zone append to zone {} returned lba {} (blocks {}): outside the zone",
                self.qid,
                s.slba,
                lba,
                s.nlb
            );
            return ERR_BAD_RESULT;
        }
        let tag = self.tag_of_slot(s);
        if self.appended.is_full() {
            self.appended.pop_front();
        }
        let _ = self.appended.push_back((tag, lba));
        ERR_NONE
    }

    /// The LBA a zone append was written at: `(tag, lba)` of appends that completed
    /// successfully, oldest first, each once. An append's entry is there by the time `poll`
    /// reports its tag (`Ok`); take it after that `poll` returns. A queue keeps its depth of
    /// entries and drops the oldest beyond that.
    pub fn pop_appended(&mut self) -> Option<(u32, u64)> {
        self.appended.pop_front()
    }

    /// Queues a zoned command set operation (see [`ZoneOp`]) under `tag`; it completes through
    /// `poll` like any other. One device command each, never split.
    ///
    /// # Errors
    /// [`SubmitError::InvalidNamespace`]; the namespace's format refusal (a zoned namespace
    /// Keel cannot use is `UnsupportedFormat`); [`SubmitError::Unsupported`] on a namespace
    /// that is not zoned; [`SubmitError::OutOfRange`] for a zone LBA that is not a zone start
    /// (a report's `from` past the end); [`SubmitError::BufferLength`] for an append buffer
    /// that is not `blocks * block_size`, `blocks` 0 or beyond the zone, or a report buffer
    /// shorter than a header and one descriptor or not a multiple of 4 bytes;
    /// [`SubmitError::TooLarge`] for an append above the append limit or a transfer above
    /// the per-command limit; `BufferAlignment`, `QueueFull`, `DeviceUnavailable` as `submit`.
    pub fn submit_zone(&mut self, op: ZoneOp, tag: u32) -> Result<(), SubmitError> {
        if self.failed {
            return Err(SubmitError::DeviceUnavailable);
        }
        let ns = *self.ns(op.ns()).ok_or(SubmitError::InvalidNamespace)?;
        if let Some(refused) = ns.format.refusal() {
            // Management and reports move no block data: only an append needs the format.
            if matches!(op, ZoneOp::Append { .. }) || matches!(ns.format, NsFormat::CommandSet(_)) {
                return Err(refused);
            }
        }
        let z = ns.zoned.ok_or(SubmitError::Unsupported)?;
        let bs = ns.block_size as u64;
        // (opcode, slba, nlb or CDW13, buffer, bytes)
        let (opcode, slba, nlb, buf, len) = match op {
            ZoneOp::Append {
                zone, blocks, buf, ..
            } => {
                if !z.is_zone_start(zone) {
                    return Err(SubmitError::OutOfRange);
                }
                if blocks == 0
                    || blocks as u64 > z.zone_size
                    || buf.len() as u64 != blocks as u64 * bs
                {
                    return Err(SubmitError::BufferLength);
                }
                if buf.len() > z.append_limit as usize || buf.len() > self.max_transfer {
                    return Err(SubmitError::TooLarge);
                }
                (io_op::ZONE_APPEND, zone, blocks, buf, buf.len())
            }
            ZoneOp::Manage {
                zone, action, all, ..
            } => {
                if !all && !z.is_zone_start(zone) {
                    return Err(SubmitError::OutOfRange);
                }
                let cdw13 = action.code() as u32 | (all as u32) << 8;
                (
                    io_op::ZONE_MGMT_SEND,
                    if all { 0 } else { zone },
                    cdw13,
                    BufRef::from_bus(0, 0),
                    0,
                )
            }
            ZoneOp::Report { from, buf, .. } => {
                if from >= ns.blocks {
                    return Err(SubmitError::OutOfRange);
                }
                if buf.len() < REPORT_HEADER + ZONE_DESCRIPTOR || buf.len() % 4 != 0 {
                    return Err(SubmitError::BufferLength);
                }
                if buf.len() > self.max_transfer {
                    return Err(SubmitError::TooLarge);
                }
                // ZRA 0 (report zones), ZRASF 0 (all states), partial report (bit 16): the
                // count in the header is then that of the descriptors in the buffer.
                (io_op::ZONE_MGMT_RECV, from, 1 << 16, buf, buf.len())
            }
        };
        if len != 0 && buf.bus_addr() % 4 != 0 {
            return Err(SubmitError::BufferAlignment);
        }
        if buf.bus_addr().checked_add(len as u64).is_none() {
            return Err(SubmitError::BufferLength);
        }
        if self.free_slots == 0 {
            return Err(SubmitError::QueueFull);
        }
        let req = self.alloc_req().ok_or(SubmitError::QueueFull)?;
        let Some(i) = self.alloc_slot() else {
            self.free_req_rec(req);
            return Err(SubmitError::QueueFull);
        };
        let old = self.slot(i);
        let s = SlotRec {
            deadline: self.clock.now_ns().saturating_add(self.timeout_ns),
            slba,
            buf: buf.bus_addr(),
            meta: 0,
            nsid: ns.nsid,
            nlb,
            len: len as u32,
            gen: self.next_gen(old.gen),
            req,
            next: NONE,
            state: issued_state(opcode),
            opcode,
            retries: 0,
            app_tag: 0,
            tag: 0,
        };
        self.put_slot(i, &s);
        let pos = self.sq_tail;
        if self.place(pos, i, &s).is_err() {
            self.release_slot(i);
            self.free_req_rec(req);
            return Err(SubmitError::BufferAlignment);
        }
        self.put_req(
            req,
            &ReqRec {
                tag,
                outstanding: 1,
                next: NONE,
                ..ReqRec::default()
            },
        );
        self.sq_tail = self.next_pos(pos);
        self.stats.submitted_cmds += 1;
        Ok(())
    }

    /// The time, if the periodic timeout scan is due: commands are outstanding and the clock
    /// has passed `next_scan`. The clock is read on every `Config::timeout_check_polls`-th
    /// check only (32 by default): under emulation a TSC read is a call into the emulator that
    /// takes a lock its device thread also takes, and at queue depth 32 a poller checks ~10
    /// times per I/O. So a scan comes due at most that many checks late (microseconds for a
    /// spinning poller, against a scan period of an eighth of the command timeout). Once the
    /// clock says due it stays due until the scan has run, whichever of `poll_due` and `poll`
    /// asked.
    #[inline(always)]
    fn scan_due(&self) -> Option<u64> {
        if self.free_slots == self.nslots {
            return None; // nothing in flight
        }
        let left = self.clock_countdown.get();
        if left > 1 {
            self.clock_countdown.set(left - 1);
            return None;
        }
        let now = self.clock.now_ns();
        if now >= self.next_scan {
            return Some(now); // the countdown stays at 1: the next check reads the clock again
        }
        self.clock_countdown.set(self.clock_every);
        None
    }

    /// The periodic timeout scan, due at `now` (the caller checked `busy` and `next_scan`).
    ///
    /// A command past its deadline becomes a zombie and its tag is announced once as a
    /// [`TimedOut`] event; nothing is reported through `on_done`: the tag, and with it the
    /// buffer, stays the device's until the device completes the command, an abort completes
    /// it, or a controller reset quiesces it.
    #[inline(never)]
    fn scan_timeouts(&mut self, now: u64) {
        self.next_scan = now.saturating_add((self.timeout_ns / 8).max(1));
        let mut any = false;
        for i in 0..self.nslots {
            let mut s = self.slot(i);
            if !matches!(s.state, ACTIVE | APPENDING) || s.deadline > now {
                continue;
            }
            any = true;
            self.stats.timeouts += 1;
            s.state = ZOMBIE;
            if s.req == DIRECT {
                // The request record keeps the "timed out" mark (one event per tag).
                s.req = self.direct_req(s.tag);
            }
            self.put_slot(i, &s);
            let _ = self.aborts.push_back(self.cid_of(i, s.gen));
            let mut r = self.req(s.req);
            if r.timed_out == 0 {
                r.timed_out = 1;
                self.put_req(s.req, &r);
                keel_log::warn!(
                    "nvme: q{} cid {} timed out (still owned by the device)",
                    self.qid,
                    self.cid_of(i, s.gen)
                );
                if self.timeout_events.is_full() {
                    self.timeout_events.pop_front();
                }
                let _ = self.timeout_events.push_back(r.tag);
            }
        }
        if any {
            self.needs_reset = true;
            if spec::Csts::from_bits(self.mmio.read32(spec::reg::CSTS)).fatal() {
                keel_log::error!("nvme: controller fatal status");
                self.set_failed(true);
            }
        }
    }

    /// The surprise-removal check, from the periodic scan (cold): when no completion came
    /// for `Config::removal_check_ms` with commands outstanding, CSTS is read; all ones means
    /// the device fell off the bus. Then every command in flight (timed out or not) fails
    /// once with `IoError::Removed` — its buffer goes back only now, a gone device cannot DMA
    /// — and the pair refuses new work (`SubmitError::Removed`). Returns whether it did.
    #[cold]
    #[inline(never)]
    fn check_removed(&mut self, now: u64) -> bool {
        // Come due again within the check interval (the timeout scan alone waits longer).
        self.next_scan = self.next_scan.min(now.saturating_add(self.removal_ns));
        if self.removed || self.busy() == 0 {
            return false;
        }
        if self.stats.completions != self.removal_seen {
            self.removal_seen = self.stats.completions;
            self.removal_since = now;
            return false;
        }
        if now.saturating_sub(self.removal_since) < self.removal_ns {
            return false;
        }
        self.removal_since = now;
        if !spec::Csts::from_bits(self.mmio.read32(spec::reg::CSTS)).device_gone() {
            return false;
        }
        keel_log::error!(
            "nvme: q{} device gone (CSTS all ones): failing {} commands",
            self.qid,
            self.busy()
        );
        self.removed = true;
        self.set_failed(true);
        self.needs_reset = false;
        self.aborts.clear();
        self.timeout_events.clear();
        for i in 0..self.nslots {
            let s = self.slot(i);
            if matches!(s.state, ACTIVE | APPENDING | ZOMBIE | PENDING) {
                self.release_slot(i);
                self.finish_slot(&s, ERR_REMOVED, 0);
            }
        }
        // Entries written but not rung are dropped with their slots.
        self.sq_tail_rung = self.sq_tail;
        true
    }

    /// `true` once the pair saw its device gone (surprise removal); it takes no more work.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Replaces the pair's copy of the namespace list (`Controller::refresh_namespaces`).
    pub(crate) fn set_namespaces(&mut self, namespaces: &[Namespace]) {
        self.namespaces.clear();
        let _ = self.namespaces.extend_from_slice(namespaces);
        self.refresh_fast_ns();
    }

    /// Tags whose commands timed out and are still on the device (their slots are zombies).
    pub fn timed_out_slots(&self) -> usize {
        (0..self.nslots)
            .filter(|&i| self.slot(i).state == ZOMBIE)
            .count()
    }

    // ---- recovery support (called by Controller::recover / reset_queue / reset) ----

    /// Consumes every completion the device has posted, without reporting any: each outcome
    /// goes to the ready list, so the pair's owner reports it on its next poll (recovery runs
    /// on another core, with the pair lent to it). Returns the entries consumed.
    pub(crate) fn reap_deferred(&mut self) -> usize {
        let mut consumed = 0usize;
        while consumed < self.entries as usize {
            let Some((e, off, _)) = self.next_cqe() else {
                break;
            };
            self.advance_cq_head();
            consumed += 1;
            let _ = self.handle::<true>(e, off);
        }
        self.ack_consumed(u16::try_from(consumed).unwrap_or(u16::MAX));
        self.flush_submissions();
        consumed
    }

    /// Recovery found nothing left on the device for this pair: it no longer needs a reset.
    pub(crate) fn settled(&mut self) {
        if !self.failed && self.timed_out_slots() == 0 {
            self.needs_reset = false;
            self.aborts.clear();
        }
    }

    /// `true` when `cid` names a command that timed out and the device still owns (a zombie
    /// slot of the current generation).
    pub(crate) fn is_zombie(&self, cid: u16) -> bool {
        let i = cid & self.slot_mask;
        if i >= self.nslots {
            return false;
        }
        let s = self.slot(i);
        s.state == ZOMBIE && self.cid_of(i, s.gen) == cid
    }

    /// `true` when something on this pair needs recovery ([`crate::Controller::recover`]): a
    /// command timed out (the device still owns it), the pair asked for a reset, or it failed.
    /// Two loads: cheap enough for every poll pass.
    #[inline]
    pub fn needs_recovery(&self) -> bool {
        self.needs_reset || self.failed
    }

    pub(crate) fn prepare_reset(&mut self) {
        // Which in-flight writes a newer overlapping write overtook: read off the SQ ring now,
        // before the tail goes back to 0 and reissues overwrite it.
        self.overtaken = bitvec::array::BitArray::ZERO;
        for i in 0..self.nslots {
            let s = self.slot(i);
            if s.state == ACTIVE && self.overtaken(i, &s, self.sq_tail) {
                self.overtaken.set(i as usize, true);
            }
        }
        let _ = self.cq.region().fill(0, self.cq.region().len(), 0);
        if let Some((db, ei)) = &self.shadow {
            let _ = db.fill(0, db.len(), 0);
            let _ = ei.fill(0, ei.len(), 0);
        }
        self.sq_tail = 0;
        self.sq_tail_rung = 0;
        self.cq_head = 0;
        self.cq_acked = 0;
        self.cq_unacked = 0;
        self.cq_expect |= CQE_PHASE;
        self.needs_reset = false;
        self.aborts.clear();
        // Every timed-out tag completes (with `Timeout`) below: events not yet read are moot.
        self.timeout_events.clear();
        for i in 0..self.nslots {
            let mut s = self.slot(i);
            match s.state {
                ZOMBIE => {
                    // CSTS.RDY = 0: the device no longer owns it. Its tag completes now.
                    self.stats.quiesced_timeouts += 1;
                    self.release_slot(i);
                    self.finish_slot(&s, ERR_TIMEOUT, 0);
                }
                ACTIVE | APPENDING => {
                    s.state = PENDING;
                    self.put_slot(i, &s);
                }
                _ => {}
            }
        }
    }

    pub(crate) fn after_reset_ok(&mut self) {
        self.set_failed(false);
        // Decided in `prepare_reset`, while the SQ ring still held the order of submission.
        let overtaken = core::mem::take(&mut self.overtaken);
        for i in 0..self.nslots {
            let s = self.slot(i);
            if s.state != PENDING {
                continue;
            }
            if overtaken[i as usize] {
                self.stats.overtaken_writes += 1;
                self.release_slot(i);
                self.finish_slot(&s, ERR_RESET, 0);
                continue;
            }
            // A zone append in flight at the reset may have landed: issued again it could land
            // twice, at another LBA. It fails (`DeviceReset`); the caller reads the zone.
            if s.opcode != io_op::ZONE_APPEND && s.retries < self.max_retries && self.reissue(i, s)
            {
                self.stats.resubmitted_after_reset += 1;
            } else {
                self.release_slot(i);
                self.finish_slot(&s, ERR_RESET, 0);
            }
        }
        self.flush_submissions();
    }

    pub(crate) fn after_reset_failed(&mut self) {
        self.set_failed(true);
        self.timeout_events.clear();
        // Timed-out commands complete with `Timeout` here even when the controller never
        // reached CSTS.RDY = 0 (the reset failed before `prepare_reset`): the pair is failed for
        // good, and leaving their tags in flight forever would hang every owner. A board that
        // cannot trust such a device must also stop its DMA (bus mastering off) before reuse.
        for i in 0..self.nslots {
            let s = self.slot(i);
            match s.state {
                PENDING | ACTIVE | APPENDING => {
                    self.release_slot(i);
                    self.finish_slot(&s, ERR_RESET, 0);
                }
                ZOMBIE => {
                    self.stats.quiesced_timeouts += 1;
                    self.release_slot(i);
                    self.finish_slot(&s, ERR_TIMEOUT, 0);
                }
                _ => {}
            }
        }
    }

    /// Any operation: validation with a typed error for each refusal, MDTS splitting, PRP
    /// lists, DSM ranges.
    #[inline(never)]
    fn submit_general(
        &mut self,
        op: BlockOp,
        tag: u32,
        meta: Option<BufRef>,
        app: Option<u16>,
    ) -> Result<(), SubmitError> {
        if self.removed {
            return Err(SubmitError::Removed);
        }
        if self.failed {
            return Err(SubmitError::DeviceUnavailable);
        }
        let ns = *self.ns(op.ns()).ok_or(SubmitError::InvalidNamespace)?;
        let ms = ns.metadata as u64;
        let meta_base = match meta {
            None => {
                if let Some(refused) = ns.format.refusal() {
                    return Err(refused);
                }
                0
            }
            Some(m) => {
                // A metadata buffer: separate metadata only (interleaved metadata travels in
                // the data buffer), for reads and writes, `blocks * ms` bytes at least.
                match ns.format {
                    NsFormat::SeparateMetadata | NsFormat::Pract(_) if !ns.extended => {}
                    NsFormat::Plain => return Err(SubmitError::Unsupported),
                    _ => return Err(SubmitError::UnsupportedFormat),
                }
                let blocks = match op {
                    BlockOp::Read { blocks, .. } | BlockOp::Write { blocks, .. } => blocks,
                    _ => return Err(SubmitError::Unsupported),
                };
                if (m.len() as u64) < blocks as u64 * ms {
                    return Err(SubmitError::MetadataLength);
                }
                if m.bus_addr() % 4 != 0 || m.bus_addr() == 0 {
                    return Err(SubmitError::BufferAlignment);
                }
                m.bus_addr()
            }
        };
        let bs = ns.block_size as u64;
        // (opcode, lba, blocks, buffer, blocks per command)
        let (opcode, lba, blocks, buf, per_cmd) = match op {
            BlockOp::Read {
                lba, blocks, buf, ..
            }
            | BlockOp::Write {
                lba, blocks, buf, ..
            } => {
                Self::check_range(&ns, lba, blocks)?;
                if buf.len() as u64 != blocks as u64 * bs {
                    return Err(SubmitError::BufferLength);
                }
                if buf.bus_addr() % 4 != 0 {
                    return Err(SubmitError::BufferAlignment);
                }
                if buf.bus_addr().checked_add(buf.len() as u64).is_none() {
                    return Err(SubmitError::BufferLength);
                }
                // Block sizes are powers of two (2^LBADS): a shift, not a division per I/O.
                let per = ((self.max_transfer as u64 >> bs.trailing_zeros()).min(65536)) as u32;
                if per == 0 {
                    return Err(SubmitError::Unsupported);
                }
                let opc = if matches!(op, BlockOp::Read { .. }) {
                    io_op::READ
                } else {
                    io_op::WRITE
                };
                (opc, lba, blocks, buf.bus_addr(), per)
            }
            BlockOp::Flush { .. } => (io_op::FLUSH, 0, 0, 0, 1),
            BlockOp::WriteZeroes { lba, blocks, .. } => {
                if !self.write_zeroes {
                    return Err(SubmitError::Unsupported);
                }
                Self::check_range(&ns, lba, blocks)?;
                (io_op::WRITE_ZEROES, lba, blocks, 0, 65536)
            }
            BlockOp::Deallocate { lba, blocks, .. } => {
                if !self.deallocate {
                    return Err(SubmitError::Unsupported);
                }
                Self::check_range(&ns, lba, blocks)?;
                (io_op::DATASET_MANAGEMENT, lba, blocks, 0, u32::MAX)
            }
        };
        let parts = if blocks == 0 {
            1
        } else {
            if blocks <= per_cmd {
                1
            } else {
                blocks.div_ceil(per_cmd)
            }
        };
        if parts > self.nslots as u32 {
            return Err(SubmitError::TooLarge);
        }
        if parts > self.free_slots as u32 {
            return Err(SubmitError::QueueFull);
        }
        let req = self.alloc_req().ok_or(SubmitError::QueueFull)?;
        let now = self.clock.now_ns();
        let deadline = now.saturating_add(self.timeout_ns);
        // Write every part's SQ entry past the tail first; publish the tail only if all fit.
        let mut pos = self.sq_tail;
        let mut done_blocks = 0u32;
        let mut first_slot = NONE;
        let mut last_slot = NONE;
        let mut failed = false;
        for _ in 0..parts {
            let Some(i) = self.alloc_slot() else {
                failed = true;
                break;
            };
            let nlb = if blocks == 0 {
                0
            } else {
                (blocks - done_blocks).min(per_cmd)
            };
            let old = self.slot(i);
            let s = SlotRec {
                deadline,
                slba: lba + done_blocks as u64,
                buf: buf + done_blocks as u64 * bs,
                meta: if meta_base == 0 {
                    0
                } else {
                    (meta_base + done_blocks as u64 * ms) | app.map_or(0, |_| META_APP_CHECK)
                },
                nsid: ns.nsid,
                nlb,
                len: (nlb as u64 * bs) as u32,
                gen: self.next_gen(old.gen),
                req,
                next: NONE,
                state: ACTIVE,
                opcode,
                retries: 0,
                app_tag: app.unwrap_or(0),
                tag: 0,
            };
            // Chain the parts through `next` so a failure can release them.
            if last_slot != NONE {
                let mut l = self.slot(last_slot);
                l.next = i;
                self.put_slot(last_slot, &l);
            } else {
                first_slot = i;
            }
            self.put_slot(i, &s);
            last_slot = i;
            if self.place(pos, i, &s).is_err() {
                failed = true;
                break;
            }
            pos = self.next_pos(pos);
            done_blocks += nlb;
        }
        if failed {
            let mut i = first_slot;
            while i != NONE {
                let s = self.slot(i);
                let next = s.next;
                self.release_slot(i);
                i = next;
            }
            self.free_req_rec(req);
            return Err(SubmitError::BufferAlignment);
        }
        let r = ReqRec {
            tag,
            outstanding: parts as u16,
            next: NONE,
            ..ReqRec::default()
        };
        self.put_req(req, &r);
        self.sq_tail = pos;
        self.stats.submitted_cmds += parts as u64;
        Ok(())
    }

    /// The common case in one pass, with no intermediate records: a read or write on the first
    /// namespace that needs one command (no MDTS split) and at most two pages (PRP1/PRP2, no
    /// list). Returns `false`, having changed nothing, for anything else (including every
    /// refusal): the general path then takes it and gives the typed error.
    #[inline(always)]
    fn submit_simple(&mut self, op: &BlockOp, tag: u32) -> bool {
        let (opcode, nsid, lba, blocks, buf) = match *op {
            BlockOp::Read {
                ns,
                lba,
                blocks,
                buf,
            } => (io_op::READ, ns, lba, blocks, buf),
            BlockOp::Write {
                ns,
                lba,
                blocks,
                buf,
            } => (io_op::WRITE, ns, lba, blocks, buf),
            _ => return false,
        };
        let ns = &self.fast_ns;
        let len = blocks as u64 * ns.block_size as u64;
        let addr = buf.bus_addr();
        // A disabled `fast_ns` (all 0) has no blocks: the range check refuses everything.
        if ns.nsid != nsid
            || blocks == 0
            || lba
                .checked_add(blocks as u64)
                .is_none_or(|end| end > ns.blocks)
            || buf.len() as u64 != len
            || len > self.max_transfer as u64
            || addr % 4 != 0
        {
            return false;
        }
        let Some(prp2) = prp::direct(addr, len) else {
            return false;
        };
        let i = self.free_slot;
        let Some(old) = self.slots.get(i as usize).filter(|_| self.req_credits > 0) else {
            return false; // none free (NONE is past the arrays): the general path says QueueFull
        };
        let (next_slot, gen) = (old.next, self.next_gen(old.gen));
        let e = SqEntry::read_write(opcode, self.cid_of(i, gen), nsid, lba, blocks, (addr, prp2));
        let pos = self.sq_tail;
        if self.sq.write_u64s_le(pos, e.to_qwords()).is_err() {
            return false;
        }
        let deadline = self.clock.now_ns().saturating_add(self.timeout_ns);
        self.put_slot(
            i,
            &SlotRec {
                deadline,
                slba: lba,
                buf: addr,
                meta: 0,
                nsid,
                nlb: blocks,
                len: len as u32,
                gen,
                req: DIRECT,
                next: NONE,
                state: ACTIVE,
                opcode,
                retries: 0,
                app_tag: 0,
                tag,
            },
        );
        self.free_slot = next_slot;
        self.free_slots -= 1;
        self.req_credits -= 1;
        self.sq_tail = self.next_pos(pos);
        self.stats.submitted_cmds += 1;
        true
    }

    /// A read or write with a separate metadata buffer (MPTR) on a namespace that keeps its
    /// metadata apart from the data: `meta` holds `blocks * metadata` bytes (at least), split
    /// with the data at MDTS. On a namespace with protection information, the PI in `meta`
    /// is the caller's (see [`crate::pi`]): the device checks its guard and reference tag
    /// (PRCHK) instead of generating them. Completes like [`BlockQueue::submit`]; `meta`,
    /// like the data buffer, is the device's until the tag completes.
    ///
    /// # Errors
    /// As [`BlockQueue::submit`], and [`SubmitError::MetadataLength`] for a buffer shorter than
    /// the operation's metadata, [`SubmitError::Unsupported`] on a namespace without metadata
    /// or for an operation other than a read or write, [`SubmitError::UnsupportedFormat`]
    /// where the metadata is interleaved with the data.
    pub fn submit_with_metadata(
        &mut self,
        op: BlockOp,
        meta: BufRef,
        tag: u32,
    ) -> Result<(), SubmitError> {
        self.submit_general(op, tag, Some(meta), None)
    }

    /// [`Self::submit_with_metadata`] on a namespace with protection information, the device
    /// also checking each block's application tag against `app_tag` (PRCHK application tag,
    /// every bit compared): a mismatch fails the command with
    /// [`ProtectionCheck::ApplicationTag`](keel_blockdev::ProtectionCheck::ApplicationTag).
    /// On a namespace without protection information it is `submit_with_metadata`.
    ///
    /// # Errors
    /// As [`Self::submit_with_metadata`].
    pub fn submit_protected(
        &mut self,
        op: BlockOp,
        meta: BufRef,
        app_tag: u16,
        tag: u32,
    ) -> Result<(), SubmitError> {
        self.submit_general(op, tag, Some(meta), Some(app_tag))
    }

    /// By reference: a `Namespace` is large (formats, zones) and the hot paths want one or two
    /// of its fields, so copying it per I/O cost ~40 instructions (`cargo xtask instr`).
    #[inline(always)]
    fn ns(&self, nsid: NsId) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    fn check_range(ns: &Namespace, lba: u64, blocks: u32) -> Result<(), SubmitError> {
        match lba.checked_add(blocks as u64) {
            Some(end) if blocks > 0 && end <= ns.blocks => Ok(()),
            _ => Err(SubmitError::OutOfRange),
        }
    }
}

impl<M: Mmio, C: Clock> BlockQueue for IoQueuePair<M, C> {
    #[inline(always)]
    fn submit(&mut self, op: BlockOp, tag: u32) -> Result<(), SubmitError> {
        if self.submit_simple(&op, tag) {
            return Ok(());
        }
        // The general path takes `op` by address. Left to itself the compiler keeps `op` in
        // memory for it and stores it there ahead of the one-pass path too (6 stores per
        // submission above the driver: the reactor's `place_submitted`, measured with
        // `cargo xtask instr`). `black_box` makes the copy here, on this path only.
        let general = core::hint::black_box(op);
        self.submit_general(general, tag, None, None)
    }

    #[inline(always)]
    fn flush_submissions(&mut self) {
        if self.sq_tail != self.sq_tail_rung {
            let (new, old) = (self.sq_tail, self.sq_tail_rung);
            self.ring(false, new, old);
            self.sq_tail_rung = new;
        }
    }

    fn poll(&mut self, max: usize, on_done: &mut dyn FnMut(u32, Result<(), IoError>)) -> usize {
        self.poll_impl(max, on_done)
    }

    #[inline]
    fn poll_with<D: OnDone>(&mut self, max: usize, on_done: &mut D) -> usize {
        self.poll_impl(max, on_done)
    }

    fn poll_due(&self) -> bool {
        if self.ready_head != NONE || self.sq_tail != self.sq_tail_rung || self.failed {
            return true;
        }
        // A peek at the phase bit of the next entry only: `poll` copies the entry before use.
        self.cq_posted().is_some() || self.scan_due().is_some()
    }

    fn depth(&self) -> usize {
        self.nslots as usize
    }

    fn in_flight(&self) -> usize {
        self.unreported()
    }

    #[inline(always)]
    fn pop_timed_out(&mut self) -> Option<TimedOut> {
        self.timeout_events.pop_front().map(|tag| TimedOut { tag })
    }

    fn retry_delay_us(&self, status: DevStatus) -> u64 {
        match status.crd() {
            0 => 0,
            i => self
                .crdt
                .get(i as usize - 1)
                .map_or(0, |&t| t as u64 * 100_000),
        }
    }

    fn block_size(&self, ns: NsId) -> Option<u32> {
        self.ns(ns).map(|n| n.block_size)
    }

    fn num_blocks(&self, ns: NsId) -> Option<u64> {
        self.ns(ns).map(|n| n.blocks)
    }
}

#[cfg(test)]
#[path = "qpair_tests.rs"]
mod tests;
