//! Log pages, asynchronous events and namespace rescans on the admin queue.
//!
//! Asynchronous Event Requests (AERs) stay outstanding on the admin queue (up to
//! [`MAX_AERS`], bounded by Identify Controller AERL) with command IDs from a range the
//! synchronous admin path never hands out ([`AER_CID_BASE`]..). A synchronous admin command
//! that meets an AER completion while it waits keeps it aside (it is CID-checked: never taken
//! for the awaited command). [`Controller::poll_events`] — called by the core that owns the
//! controller (a worker or a job), never from an I/O poller — reaps what arrived, reads the log
//! page each event names (which clears it on the device), re-posts the AER and hands the caller
//! one typed [`AsyncEvent`] each.

use core::sync::atomic::{fence, Ordering};

use heapless::{Deque, Vec};
use keel_hal::{Clock, Mmio};

use super::{parse_namespace, Controller, Namespace, NsFormat, ADMIN_DEPTH};
use crate::error::{BadIdentify, NvmeError};
use crate::health::{
    parse_error_log, AerResult, ChangedNamespaces, ErrorLogEntry, SmartLog, ERROR_LOG_MAX,
};
use crate::spec::{self, admin_op, cns, feature, log_page, CqEntry, SqEntry, Vs, PAGE_SIZE};

/// Most Asynchronous Event Requests Keel keeps outstanding.
pub const MAX_AERS: usize = 4;
/// The first admin command ID reserved for AERs; the synchronous admin path wraps below it.
pub const AER_CID_BASE: u16 = 0xFFF0;
/// Namespace changes one [`AsyncEvent::NamespacesChanged`] lists (the controller applies all).
pub const MAX_NS_CHANGES: usize = 16;

/// Events enabled with Set Features Asynchronous Event Configuration: every SMART / health
/// critical warning (bits 4:0) and namespace attribute notices (bit 8).
const AEC_ENABLED: u32 = 0x1F | 1 << 8;

/// Asynchronous-event counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EventStats {
    /// AERs posted (bring-up, re-posts, re-arming after a reset).
    pub aers_posted: u64,
    /// AER completions with success status (events).
    pub events: u64,
    /// AER completions with an error status (not re-posted).
    pub aer_errors: u64,
    /// AER completions that arrived while a synchronous admin command waited.
    pub aers_during_commands: u64,
    /// Log pages read for events.
    pub log_reads: u64,
    /// Log pages that could not be read or decoded (the event is still reported).
    pub bad_logs: u64,
    /// Changed Namespace List entries dropped as absurd (above NN, repeated, out of order).
    pub dropped_ns_entries: u64,
}

/// What a rescan found for one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NsState {
    /// New: now active, and usable.
    Added(Namespace),
    /// Was active and still is, with a different size or format (old, new).
    Changed(Namespace, Namespace),
    /// Was active and still is, the same.
    Unchanged(Namespace),
    /// Was active, is not any more (I/O to it is refused from now on).
    Removed(Namespace),
    /// Neither known nor active.
    Inactive,
    /// Active, but its identify data is unusable (left out; if it was known, dropped).
    Unusable(BadIdentify),
}

/// One namespace's new state after a namespace-attribute-changed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct NsChange {
    /// The namespace.
    pub nsid: u32,
    /// Its state now.
    pub state: NsState,
}

/// An asynchronous event, with the log page that cleared it.
// Events are rare and handed over by value without an allocator: the namespace list is inline.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsyncEvent {
    /// SMART / health: `info` says which (reliability 0, temperature 1, spare 2); the health
    /// page as read.
    Health {
        /// The event information.
        info: u8,
        /// The SMART / Health Information page.
        smart: SmartLog,
    },
    /// An error event; the newest entry of the error log, if it holds one.
    Error {
        /// The event information.
        info: u8,
        /// The newest error log entry.
        newest: Option<ErrorLogEntry>,
    },
    /// Namespace attributes changed: each listed namespace identified again.
    NamespacesChanged {
        /// What each changed namespace is now (the first [`MAX_NS_CHANGES`]).
        changes: Vec<NsChange, MAX_NS_CHANGES>,
        /// More changes were applied than `changes` holds.
        truncated: bool,
    },
    /// Any other event (its log page, if it names one, was read to clear it).
    Other(AerResult),
    /// The event's log page could not be read or decoded.
    LogUnreadable {
        /// The event.
        event: AerResult,
        /// Why.
        error: NvmeError,
    },
}

/// The controller's asynchronous-event state.
#[derive(Default)]
pub(crate) struct EventState {
    /// CIDs of AERs on the device.
    outstanding: Vec<u16, MAX_AERS>,
    /// AER completions reaped and not yet handled.
    stash: Deque<CqEntry, MAX_AERS>,
    /// The reset count when the AERs were posted (a reset drops them; re-arm after one).
    armed_at: Option<u64>,
    /// Identify Controller AERL (0-based).
    aerl: u8,
    /// Identify Controller ELPE + 1 (error log entries), capped.
    error_entries: usize,
    stats: EventStats,
}

impl EventState {
    /// AERL and ELPE from Identify Controller.
    pub(crate) fn set_limits(&mut self, aerl: u8, elpe: u8) {
        self.aerl = aerl;
        self.error_entries = (elpe as usize + 1).min(ERROR_LOG_MAX);
    }

    /// [`EventState::take_aer`] for a completion met while a synchronous command waits.
    pub(crate) fn take_aer_waiting(&mut self, cqe: &CqEntry) -> bool {
        let taken = self.take_aer(cqe);
        if taken {
            self.stats.aers_during_commands += 1;
        }
        taken
    }

    /// An admin completion that is not the one a synchronous command waits for: if it is an
    /// outstanding AER's, keep it for [`Controller::poll_events`] and say so.
    pub(crate) fn take_aer(&mut self, cqe: &CqEntry) -> bool {
        if cqe.sq_id != 0 {
            return false;
        }
        let Some(i) = self.outstanding.iter().position(|&c| c == cqe.cid) else {
            return false;
        };
        self.outstanding.swap_remove(i);
        // One stash place per AER: a CID is outstanding or stashed, never both.
        let _ = self.stash.push_back(*cqe);
        true
    }
}

impl<M: Mmio, C: Clock> Controller<M, C> {
    /// Reads log page `lid` (Get Log Page with NUMDL/NUMDU) into `dst` (4..=4096 bytes, a
    /// multiple of 4). `rae` (Retain Asynchronous Event) set leaves an event the page would
    /// clear pending; a plain reader sets it, the event path does not.
    pub fn get_log_page(
        &mut self,
        lid: u8,
        nsid: u32,
        rae: bool,
        dst: &mut [u8],
    ) -> Result<(), NvmeError> {
        let len = dst.len();
        if len == 0 || len > PAGE_SIZE || len % 4 != 0 {
            return Err(NvmeError::InvalidArgument("log page length"));
        }
        self.scratch.fill(0, len, 0)?;
        let numd = (len / 4 - 1) as u32;
        let mut sqe = SqEntry::new(admin_op::GET_LOG_PAGE, 0, nsid);
        sqe.prp1 = self.scratch.bus_addr();
        sqe.cdw10 = lid as u32 | (rae as u32) << 15 | (numd & 0xFFFF) << 16;
        sqe.cdw11 = numd >> 16;
        self.admin_command(sqe)?;
        self.scratch.read_bytes(0, dst)?;
        Ok(())
    }

    fn smart_log_rae(&mut self, rae: bool) -> Result<SmartLog, NvmeError> {
        let mut page = [0u8; SmartLog::LEN];
        // Controller-wide: NSID all ones (0 is refused by some controllers, QEMU among them).
        self.get_log_page(log_page::SMART_HEALTH, u32::MAX, rae, &mut page)?;
        SmartLog::parse(&page).map_err(NvmeError::BadLog)
    }

    /// The SMART / Health Information page (controller-wide). Leaves a pending health event
    /// pending (RAE = 1): [`Controller::poll_events`] is what consumes events.
    pub fn smart_log(&mut self) -> Result<SmartLog, NvmeError> {
        self.smart_log_rae(true)
    }

    /// The entries of the Error Information log that hold errors, newest first (at most
    /// ELPE + 1 entries are read, and at most [`ERROR_LOG_MAX`]). RAE = 1, as
    /// [`Controller::smart_log`].
    pub fn error_log<const N: usize>(
        &mut self,
        out: &mut Vec<ErrorLogEntry, N>,
    ) -> Result<(), NvmeError> {
        self.error_log_rae(true, out)
    }

    fn error_log_rae<const N: usize>(
        &mut self,
        rae: bool,
        out: &mut Vec<ErrorLogEntry, N>,
    ) -> Result<(), NvmeError> {
        let mut page = [0u8; ERROR_LOG_MAX * ErrorLogEntry::LEN];
        let len = self.events.error_entries.clamp(1, ERROR_LOG_MAX) * ErrorLogEntry::LEN;
        let page = &mut page[..len];
        self.get_log_page(log_page::ERROR_INFO, 0, rae, page)?;
        parse_error_log(page, out).map_err(NvmeError::BadLog)
    }

    /// Sets the composite temperature threshold (Set Features 0x04): over (`under` false) or
    /// under, in kelvin. A controller raises a health event when the temperature reaches it.
    pub fn set_temperature_threshold(&mut self, kelvin: u16, under: bool) -> Result<(), NvmeError> {
        let mut sqe = SqEntry::new(admin_op::SET_FEATURES, 0, 0);
        sqe.cdw10 = feature::TEMPERATURE_THRESHOLD;
        sqe.cdw11 = kelvin as u32 | (under as u32) << 20;
        self.admin_command(sqe).map(|_| ())
    }

    /// The composite temperature threshold (over or under), in kelvin.
    pub fn temperature_threshold(&mut self, under: bool) -> Result<u16, NvmeError> {
        self.get_features(feature::TEMPERATURE_THRESHOLD as u8, (under as u32) << 20)
            .map(|dw0| dw0 as u16)
    }

    /// Asynchronous-event counters.
    pub fn event_stats(&self) -> EventStats {
        self.events.stats
    }

    /// AERs outstanding on the device now.
    pub fn aers_outstanding(&self) -> usize {
        self.events.outstanding.len()
    }

    /// Enables SMART / health and namespace-attribute events and posts AERL + 1 (at most
    /// [`MAX_AERS`]) Asynchronous Event Requests. Called at bring-up; [`poll_events`] calls it
    /// again after a controller reset (which drops outstanding AERs).
    ///
    /// [`poll_events`]: Controller::poll_events
    pub fn arm_events(&mut self) -> Result<(), NvmeError> {
        if self.failed {
            return Err(NvmeError::Failed);
        }
        self.events.outstanding.clear();
        self.events.stash.clear();
        self.events.armed_at = Some(self.stats.resets);
        let aerl = self.events.aerl;
        let mut sqe = SqEntry::new(admin_op::SET_FEATURES, 0, 0);
        sqe.cdw10 = feature::ASYNC_EVENT_CONFIG;
        sqe.cdw11 = AEC_ENABLED;
        match self.admin_command(sqe) {
            // A controller without some of these events still sends the others.
            Ok(_) | Err(NvmeError::AdminStatus { .. }) => {}
            Err(e) => return Err(e),
        }
        let n = (aerl as usize + 1).min(MAX_AERS);
        for i in 0..n {
            self.post_aer(AER_CID_BASE + i as u16)?;
        }
        Ok(())
    }

    /// Puts an AER with `cid` on the admin queue without waiting (it completes when an event
    /// comes).
    fn post_aer(&mut self, cid: u16) -> Result<(), NvmeError> {
        if self.events.outstanding.contains(&cid) || self.events.outstanding.is_full() {
            return Ok(());
        }
        let sqe = SqEntry::new(admin_op::ASYNC_EVENT_REQUEST, cid, 0);
        self.admin.sq.write(self.admin.tail as usize * 64, &sqe)?;
        self.admin.tail = (self.admin.tail + 1) % ADMIN_DEPTH;
        self.mmio.doorbell_barrier();
        self.admin_doorbell(false, self.admin.tail);
        let _ = self.events.outstanding.push(cid);
        self.events.stats.aers_posted += 1;
        Ok(())
    }

    /// Takes every admin completion already posted (no waiting): AER completions are kept for
    /// handling, anything else is stale (nothing synchronous is waiting now) and counted.
    fn reap_admin(&mut self) -> Result<(), NvmeError> {
        for _ in 0..ADMIN_DEPTH {
            let off = self.admin.head as usize * 16;
            let word = self.admin.cq.read_u16(off + spec::CQE_STATUS_OFFSET)?;
            if (word & 1 != 0) != self.admin.phase {
                break;
            }
            fence(Ordering::Acquire);
            let cqe: CqEntry = self.admin.cq.read(off)?;
            self.admin.head += 1;
            if self.admin.head == ADMIN_DEPTH {
                self.admin.head = 0;
                self.admin.phase = !self.admin.phase;
            }
            self.admin_doorbell(true, self.admin.head);
            if !self.events.take_aer(&cqe) {
                self.stats.stale_completions += 1;
                keel_log::warn!("nvme: stray admin completion cid {}", cqe.cid);
            }
        }
        Ok(())
    }

    /// Handles the asynchronous events that arrived: for each, reads the log page it names
    /// (clearing it on the device), re-posts its AER, applies a namespace change (identify
    /// again; the namespace list is updated) and gives `on_event` the typed event. Returns how
    /// many events were handled. Call it from the core that owns the controller, now and then
    /// (not from an I/O poller: it runs admin commands and waits for them).
    ///
    /// After a controller reset it re-arms the AERs first. Queue pairs created before a
    /// namespace change keep their copy of the namespace list: I/O to a removed namespace is
    /// failed by the device (`IoError::Invalid`), never sent to a new one in its place.
    pub fn poll_events(
        &mut self,
        mut on_event: impl FnMut(AsyncEvent),
    ) -> Result<usize, NvmeError> {
        if self.failed {
            return Err(NvmeError::Failed);
        }
        if self.events.armed_at != Some(self.stats.resets) {
            self.arm_events()?;
        }
        self.reap_admin()?;
        let mut handled = 0;
        while let Some(cqe) = self.events.stash.pop_front() {
            let status = cqe.status();
            if !status.is_success() {
                // Limit exceeded, aborted by a reset or SQ deletion, refused: not re-posted
                // (a reset re-arms them all).
                self.events.stats.aer_errors += 1;
                keel_log::warn!("nvme: AER cid {} failed: {}", cqe.cid, status);
                continue;
            }
            self.events.stats.events += 1;
            handled += 1;
            let ev = AerResult::from_dw0(cqe.dw0);
            keel_log::info!(
                "nvme: async event {} info {=u8:#x} log page {=u8:#x}",
                ev.kind,
                ev.info,
                ev.log_page
            );
            // Re-posted before its page is read: the event type stays masked on the device
            // until then, so it cannot complete twice for one event.
            self.post_aer(cqe.cid)?;
            let event = match self.read_event_page(ev) {
                Ok(e) => e,
                Err(error) => {
                    self.events.stats.bad_logs += 1;
                    AsyncEvent::LogUnreadable { event: ev, error }
                }
            };
            on_event(event);
        }
        Ok(handled)
    }

    fn read_event_page(&mut self, ev: AerResult) -> Result<AsyncEvent, NvmeError> {
        self.events.stats.log_reads += 1;
        match ev.log_page {
            log_page::SMART_HEALTH => Ok(AsyncEvent::Health {
                info: ev.info,
                smart: self.smart_log_rae(false)?,
            }),
            log_page::ERROR_INFO => {
                let mut out: Vec<ErrorLogEntry, 1> = Vec::new();
                self.error_log_rae(false, &mut out)?;
                Ok(AsyncEvent::Error {
                    info: ev.info,
                    newest: out.first().copied(),
                })
            }
            log_page::CHANGED_NS_LIST => {
                let mut page = [0u8; ChangedNamespaces::LEN];
                self.get_log_page(log_page::CHANGED_NS_LIST, 0, false, &mut page)?;
                let list =
                    ChangedNamespaces::parse(&page, self.info.nn).map_err(NvmeError::BadLog)?;
                self.events.stats.dropped_ns_entries += list.dropped as u64;
                self.rescan(&list)
            }
            0 => {
                self.events.stats.log_reads -= 1;
                Ok(AsyncEvent::Other(ev))
            }
            lid => {
                // Read (and so clear) a page Keel does not decode; a controller that refuses
                // it leaves the event as it is.
                let mut page = [0u8; 512];
                match self.get_log_page(lid, 0, false, &mut page) {
                    Ok(()) | Err(NvmeError::AdminStatus { .. }) => Ok(AsyncEvent::Other(ev)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The active NSIDs (CNS 2), checked as at bring-up; `None` before NVMe 1.1.
    fn active_ids(&mut self) -> Result<Option<Vec<u32, { super::MAX_NAMESPACES }>>, NvmeError> {
        if !Vs::from_bits(self.info.version).at_least(1, 1) {
            return Ok(None);
        }
        self.identify_raw(cns::ACTIVE_NS_LIST, 0)?;
        let mut ids = Vec::new();
        let mut prev = 0u32;
        for i in 0..1024 {
            let nsid: u32 = self.scratch.read(i * 4)?;
            if nsid == 0 {
                break;
            }
            if nsid <= prev || nsid > self.info.nn {
                self.events.stats.dropped_ns_entries += 1;
                continue;
            }
            prev = nsid;
            if ids.push(nsid).is_err() {
                break;
            }
        }
        Ok(Some(ids))
    }

    /// Identifies each changed namespace again and updates the namespace list.
    fn rescan(&mut self, list: &ChangedNamespaces) -> Result<AsyncEvent, NvmeError> {
        let mut todo: Vec<u32, { super::MAX_NAMESPACES * 2 }> = Vec::new();
        if list.all {
            // Every known namespace and every active one.
            for ns in self.namespaces.iter() {
                let _ = todo.push(ns.nsid);
            }
            if let Some(ids) = self.active_ids()? {
                for id in ids {
                    if !todo.contains(&id) {
                        let _ = todo.push(id);
                    }
                }
            }
            todo.sort_unstable();
        } else {
            for &id in list.nsids.iter() {
                if todo.push(id).is_err() {
                    break;
                }
            }
        }
        let mut changes = Vec::new();
        let mut truncated = false;
        for nsid in todo {
            let state = self.reidentify(nsid)?;
            keel_log::info!("nvme: ns {} now {}", nsid, state);
            if changes.push(NsChange { nsid, state }).is_err() {
                truncated = true;
            }
        }
        Ok(AsyncEvent::NamespacesChanged { changes, truncated })
    }

    fn reidentify(&mut self, nsid: u32) -> Result<NsState, NvmeError> {
        let known = self.namespaces.iter().position(|n| n.nsid == nsid);
        self.identify_raw(cns::NAMESPACE, nsid)?;
        let id: spec::IdentifyNamespace = self.scratch.read(0)?;
        if id.nsze.get() == 0 {
            // Inactive: an inactive NSID identifies as all zeroes.
            return Ok(match known {
                Some(i) => NsState::Removed(self.namespaces.remove(i)),
                None => NsState::Inactive,
            });
        }
        let ns = match parse_namespace(nsid, &id) {
            Ok(ns) => match self.command_set(nsid)? {
                spec::csi::NVM => self.protection_format(ns, &id)?,
                other => Namespace {
                    format: NsFormat::CommandSet(other),
                    ..ns
                },
            },
            Err(NvmeError::BadIdentify(why)) => {
                if let Some(i) = known {
                    self.namespaces.remove(i);
                }
                if !self.skipped.iter().any(|(n, _)| *n == nsid) {
                    let _ = self.skipped.push((nsid, why));
                }
                return Ok(NsState::Unusable(why));
            }
            Err(e) => return Err(e),
        };
        Ok(match known {
            Some(i) => {
                let Some(slot) = self.namespaces.get_mut(i) else {
                    return Ok(NsState::Inactive);
                };
                let old = core::mem::replace(slot, ns);
                if old == ns {
                    NsState::Unchanged(ns)
                } else {
                    NsState::Changed(old, ns)
                }
            }
            None => {
                let at = self
                    .namespaces
                    .iter()
                    .position(|n| n.nsid > nsid)
                    .unwrap_or(self.namespaces.len());
                if self.namespaces.insert(at, ns).is_err() {
                    keel_log::warn!("nvme: no room for ns {}", nsid);
                }
                self.skipped.retain(|(n, _)| *n != nsid);
                NsState::Added(ns)
            }
        })
    }
}
