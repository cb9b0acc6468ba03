//! A software platform for host tests, fuzzing and instruction counts.
//!
//! * [`HostDma`]: a [`DmaAllocator`](keel_hal::DmaAllocator) over the heap whose bus addresses are
//!   host virtual addresses, with a registry so device models only touch live allocations.
//! * [`ModelClock`]: a manual clock (`delay_us` advances it; tests advance it to trigger timeouts).
//! * [`nvme::NvmeModel`]: a software NVMe 1.4 controller behind [`nvme::ModelMmio`].
//! * [`ModelBoard`]: all of it as a [`keel_hal::Board`] (cores are threads), so the firmware's
//!   jobs (`keel-jobs`) run here too.
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![allow(
    unsafe_code,
    reason = "HostDma hands heap memory to the driver as DMA regions"
)]

pub mod board;
pub mod clock;
pub mod dma;
pub mod nvme;

pub use board::{ModelBoard, ModelCores};
pub use clock::ModelClock;
pub use dma::{HostDma, MemError};
pub use nvme::{Fault, ModelConfig, ModelMmio, NsConfig, NvmeModel, ZoneConfig};
