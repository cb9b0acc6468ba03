//! Pinned-core reactors, SPDK style.
//!
//! * [`mesh`]: one fixed-capacity single-producer/single-consumer ring ([`ring`]) per ordered
//!   pair of cores.
//!   A full ring is backpressure returned to the sender, never a silent drop. A per-core mail
//!   flag lets an idle core find out it has no messages with one load.
//! * [`Reactor`]: the run-to-completion loop of one core. It owns at most one queue pair
//!   (anything implementing [`keel_blockdev::BlockQueue`]), polls its completions, its inbound
//!   rings and its registered pollers, and never blocks. Requests from other cores arrive as
//!   messages and are submitted on the owner's queue pair; their completions travel back.
//! * [`lend`]: a reactor lends its queue pair (with its I/O in flight) to the worker core for a
//!   controller's recovery and takes it back, without either side blocking.
//! * [`worker`]: the channel to a dedicated core for slow work (checksums, verification). A
//!   poller hands work over and keeps polling; it never waits on something that needs a poller
//!   to make progress (seed 003's deadlock).
//!
//! Every I/O a reactor accepts is carried by a `keel-aio` handle through its whole lifecycle; the
//! device tag is the handle's index and generation, so a completion for a recycled or forged tag
//! is detected and counted instead of being routed to the wrong requester.
#![no_std]
#![warn(missing_docs)]
// The rings (`ring`) are the one place with `unsafe`: the cells of their slots.
#![deny(unsafe_code)]

pub mod lend;
pub mod mesh;
mod reactor;
#[allow(unsafe_code)]
pub mod ring;
mod sync;
pub mod worker;

pub use lend::{LendState, Lender};
pub use mesh::{split, Links, MeshStorage, SendError};
pub use reactor::{Completion, Msg, Origin, Reactor, ReactorError, Stats};
