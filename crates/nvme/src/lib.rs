//! Keel's NVMe driver: `no_std`, polled (no interrupts), kernel-bypass, NVMe 1.4.
//!
//! All hardware access goes through `keel-hal` ([`Mmio`](keel_hal::Mmio) for BAR0,
//! [`DmaRegion`](keel_hal::DmaRegion) for queues and buffers, [`Clock`](keel_hal::Clock) for
//! timeouts), so this crate has no `unsafe` code.
//!
//! # Use
//!
//! ```
//! use keel_blockdev::{BlockOp, BlockQueue, BufRef};
//! use keel_hal::DmaAllocator;
//! use keel_nvme::{Config, Controller};
//! # use keel_model::{HostDma, ModelClock, ModelConfig, NvmeModel};
//! # let dma = HostDma::new();
//! # let model = NvmeModel::new(ModelConfig::default(), dma.clone());
//! # let (bar0, clock) = (model.mmio(), ModelClock::new());
//!
//! // 1. Bring-up: reset, enable, identify controller + namespaces, negotiate queues.
//! let mut ctrl = Controller::init(bar0, &dma, clock, Config::default())?;
//! let info = *ctrl.identify(); // model_str(), serial_str(), mdts_bytes, vwc, io_queues, ...
//! let ns = ctrl.namespaces()[0]; // nsid, blocks, block_size
//!
//! // 2. One I/O queue pair per core (qid 1..=info.io_queues); move each to its core.
//! let mut qp = ctrl.create_io_qpair(&dma, 1, 256)?;
//!
//! // 3. Submit with DMA buffers; one doorbell for the burst.
//! let buf = dma.alloc(8 * 4096, 4096).unwrap();
//! let blocks = (buf.len() / ns.block_size as usize) as u32;
//! qp.submit(BlockOp::Write { ns: ns.nsid, lba: 0, blocks, buf: BufRef::whole(&buf) }, 7).unwrap();
//! qp.submit(BlockOp::Flush { ns: ns.nsid }, 8).unwrap();
//! qp.flush_submissions();
//!
//! // 4. Poll: each tag is reported exactly once.
//! let mut done = 0;
//! while qp.in_flight() > 0 {
//!     qp.poll(64, &mut |tag, result| {
//!         assert!(result.is_ok(), "tag {tag}");
//!         done += 1;
//!     });
//! }
//! assert_eq!(done, 2);
//!
//! // Recovery: after a timeout (`qp.needs_recovery()`) or fatal status (`ctrl.is_fatal()`),
//! // gather every live queue pair (lent by their owners) and escalate: abort, then reset the
//! // queue pair, then the controller (`ctrl.reset(&mut [&mut qp, ...])` is the last level).
//! let what = ctrl.recover(&mut [&mut qp])?;
//! assert_eq!(what, keel_nvme::Recovery::default(), "nothing to do");
//! # Ok::<(), keel_nvme::NvmeError>(())
//! ```
//!
//! # Design notes
//!
//! * A queue pair's command slots are `depth - 1`; SQ space is tracked from the driver's own
//!   completions (the SQ head hint in completions is range-checked but never trusted as space).
//! * Command IDs are `slot | generation << slot_bits`; completions with an unknown, free or
//!   old-generation CID, another SQID or an out-of-range SQ head are dropped and counted
//!   ([`QueueStats`]).
//! * Requests larger than the per-command limit (MDTS, PRP list space) are split; the tag
//!   completes when all parts complete and fails with the first part's error.
//! * A timed-out command is announced at once as a `TimedOut` event
//!   (`BlockQueue::pop_timed_out`), but its tag — which hands the buffer back — completes only
//!   when the device is done with it: late, with the device's own status; `Aborted` after a
//!   confirmed abort; `Timeout` once a queue-pair reset (Delete I/O SQ) or a controller reset
//!   (CSTS.RDY = 0) quiesced it. Its slot stays reserved meanwhile, and
//!   `IoQueuePair::needs_recovery` says so.
//! * Escalation ([`Controller::recover`]), as SPDK and Linux do it: reap late completions →
//!   Abort (at most `Config::max_aborts` and the controller's ACL + 1 per call) → delete and
//!   recreate the one queue pair ([`Controller::reset_queue`]) → controller reset. Every wait
//!   has a deadline: admin commands `Config::admin_timeout_ms`, CSTS.RDY transitions CAP.TO
//!   (or CRTO.CRWMT where the controller has it). ACRE is enabled through Host Behavior
//!   Support when the controller gives retry delay times.
//! * Shadow doorbells ([`Config::shadow_doorbells`], default off) follow the EventIdx rule.
#![no_std]
#![forbid(unsafe_code)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod ctrl;
pub mod error;
pub mod health;
pub mod pi;
pub mod prp;
pub mod qpair;
pub mod spec;
pub mod zns;

pub use ctrl::{
    parse_namespace, AdminStats, AsyncEvent, AttachError, Config, Controller, ControllerInfo,
    EventStats, Namespace, NsChange, NsFormat, NsState, PiType, Recovery, MAX_AERS, MAX_IO_DEPTH,
    MAX_IO_QUEUES, MAX_NAMESPACES,
};
pub use error::{BadIdentify, NvmeError, Step};
pub use health::{AerResult, CriticalWarning, ErrorLogEntry, EventType, LogError, SmartLog};
pub use qpair::{IoQueuePair, QueueStats, MAX_COMMANDS};
pub use spec::{Status, StatusKind};
pub use zns::{
    parse_zone_report, parse_zoned, ZoneAction, ZoneDescriptor, ZoneOp, ZoneReportError, ZoneState,
    Zoned,
};
