//! Every NVMe controller on the board ("drives"), brought up at once, and which core owns
//! which I/O queue on each.
//!
//! Bring-up runs on several cores at a time (drive `i` on core `i % cores`), so the
//! controllers' reset and ready waits overlap instead of adding up. A controller that fails
//! bring-up is reported with its reason and left out; the others are used.
//!
//! Queue ownership follows SPDK's model (one queue pair per core per controller) as far as
//! the controller's grant goes: core `k` owns queue `k + 1` on a drive that granted more than
//! `k` queues; a core beyond the grant sends its I/O for that drive to core `k % granted`,
//! which owns one (see [`Drive::owner`]).

use core::cell::RefCell;

use critical_section::Mutex;
use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Cores, PciFunction};
use keel_nvme::{Config, Controller, ControllerInfo, Namespace};

use crate::{Ctrl, JobError, MAX_CORES};

/// Most controllers a job drives.
pub const MAX_DRIVES: usize = 4;

/// The option of jobs that run on every drive, or one.
pub const ALL_DRIVES: &[OptSpec] = &[OptSpec::text(
    "drive",
    "all",
    "which drive (its index among the NVMe controllers, in PCI order), or all",
)];
/// The option of jobs that run on one drive.
pub const ONE_DRIVE: &[OptSpec] = &[OptSpec::int(
    "drive",
    0,
    "which drive (its index among the NVMe controllers, in PCI order)",
)];

/// One brought-up controller.
pub struct Drive<B: Board> {
    /// Index among the board's NVMe functions, in PCI order.
    pub index: usize,
    /// Where it sits.
    pub pci: PciFunction,
    /// The controller (its admin queue): shared by every core, taken briefly to create or
    /// delete queue pairs.
    pub ctrl: spin::Mutex<Ctrl<B>>,
    /// What Identify Controller said.
    pub info: ControllerInfo,
    /// The namespaces Keel can do I/O on.
    pub namespaces: heapless::Vec<Namespace, { keel_nvme::MAX_NAMESPACES }>,
}

impl<B: Board> Drive<B> {
    /// I/O queue pairs the controller granted.
    pub fn queues(&self) -> usize {
        self.info.io_queues as usize
    }

    /// The core whose queue pair serves core `core`'s I/O to this drive: `core` itself while
    /// the grant lasts, else one that owns a queue pair.
    pub fn owner(&self, core: usize) -> usize {
        let q = self.queues().max(1);
        if core < q {
            core
        } else {
            core % q
        }
    }

    /// A namespace by NSID.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }
}

/// The drives a job runs on.
pub struct Drives<B: Board> {
    /// Brought up, in PCI order.
    pub list: heapless::Vec<Drive<B>, MAX_DRIVES>,
    /// NVMe functions that could not be brought up.
    pub failed: usize,
}

impl<B: Board> Drives<B> {
    /// The drives `drive=` selects: every one (`all`) or the one with that index.
    pub fn selected<'a>(
        &self,
        cl: &Cmdline<'a>,
    ) -> Result<heapless::Vec<usize, MAX_DRIVES>, JobError<'a>> {
        let which = cl.text("drive")?;
        let mut out = heapless::Vec::new();
        if which == "all" {
            for i in 0..self.list.len() {
                let _ = out.push(i);
            }
        } else {
            let want = keel_cmdline::parse_u64(which).ok_or(JobError::Cmdline(
                keel_cmdline::CmdlineError::BadValue {
                    key: "drive",
                    value: which,
                    expected: "all or a drive index",
                },
            ))?;
            match self.list.iter().position(|d| d.index as u64 == want) {
                Some(i) => {
                    let _ = out.push(i);
                }
                None => return Err(JobError::Failed("no such drive")),
            }
        }
        if out.is_empty() {
            return Err(JobError::Failed("no NVMe drive came up"));
        }
        Ok(out)
    }
}

/// Brings up every NVMe controller on the board (`dbbuf` and `lazycq` from the command
/// line), several at a time on different cores. Fails only when none came up.
pub fn open_all<'a, B: Board>(b: &B, cl: &Cmdline<'a>) -> Result<Drives<B>, JobError<'a>> {
    open_some(b, cl, None)
}

/// Brings up drive `index` alone (jobs that take `drive=N`).
pub fn open_one<'a, B: Board>(
    b: &B,
    cl: &Cmdline<'a>,
    index: usize,
) -> Result<Drive<B>, JobError<'a>> {
    let mut d = open_some(b, cl, Some(index))?;
    d.list.pop().ok_or(JobError::Failed("NVMe bring-up failed"))
}

fn open_some<'a, B: Board>(
    b: &B,
    cl: &Cmdline<'a>,
    only: Option<usize>,
) -> Result<Drives<B>, JobError<'a>> {
    let shadow = cl.flag("dbbuf")?;
    let lazy_cq = cl.flag("lazycq")?;
    let io_timeout_ms = cl.int("io_timeout_ms")?.max(1);
    let cfg = Config {
        io_timeout_ms,
        shadow_doorbells: shadow,
        // One per core, and a few spare for jobs that use several queue pairs on one core.
        io_queues: b.cores().count().max(4) as u16,
        lazy_cq_doorbell: lazy_cq,
        ..Config::default()
    };
    let mut fns: heapless::Vec<(usize, PciFunction), MAX_DRIVES> = heapless::Vec::new();
    for (i, f) in b.pci_functions().iter().filter(|f| f.is_nvme()).enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        if fns.push((i, *f)).is_err() {
            keel_log::warn!(
                "nvme: more than {=usize} controllers; using the first {=usize}",
                MAX_DRIVES,
                MAX_DRIVES
            );
            break;
        }
    }
    if fns.is_empty() {
        return Err(JobError::Failed(if only.is_some() {
            "no such drive"
        } else {
            "no NVMe controller on PCI"
        }));
    }
    let slots: [Mutex<RefCell<Option<Ctrl<B>>>>; MAX_DRIVES] =
        core::array::from_fn(|_| Mutex::new(RefCell::new(None)));
    let workers = b.cores().count().clamp(1, MAX_CORES).min(fns.len());
    crate::on_cores(b, workers, |core| {
        for (i, (_, f)) in fns.iter().enumerate().skip(core).step_by(workers) {
            let mmio = match b.map_bar(f, 0) {
                Ok(m) => m,
                Err(e) => {
                    keel_log::error!(
                        "nvme {=u8:02x}:{=u8:02x}.{=u8}: BAR0: {}",
                        f.bus,
                        f.dev,
                        f.func,
                        e
                    );
                    continue;
                }
            };
            match Controller::init(mmio, b.dma(), b.clock(), cfg) {
                Ok(c) => critical_section::with(|cs| *slots[i].borrow_ref_mut(cs) = Some(c)),
                Err(e) => keel_log::error!(
                    "nvme {=u8:02x}:{=u8:02x}.{=u8}: bring-up failed: {}; the other drives go on",
                    f.bus,
                    f.dev,
                    f.func,
                    e
                ),
            }
        }
    })?;
    let mut list = heapless::Vec::new();
    let mut failed = 0;
    for (i, (index, f)) in fns.iter().enumerate() {
        let Some(ctrl) = critical_section::with(|cs| slots[i].borrow_ref_mut(cs).take()) else {
            failed += 1;
            continue;
        };
        let info = *ctrl.identify();
        let namespaces = ctrl.namespaces().iter().copied().collect();
        let d = Drive {
            index: *index,
            pci: *f,
            ctrl: spin::Mutex::new(ctrl),
            info,
            namespaces,
        };
        log_drive(&d, b.cores().count());
        let _ = list.push(d);
    }
    if list.is_empty() {
        return Err(JobError::Failed("NVMe bring-up failed"));
    }
    Ok(Drives { list, failed })
}

fn log_drive<B: Board>(d: &Drive<B>, cores: usize) {
    let id = &d.info;
    keel_log::info!(
        "nvme {=usize} ({=u8:02x}:{=u8:02x}.{=u8}): model '{=str}' serial '{=str}' version {=u32:#x}, {=usize} namespaces, MDTS {=usize} KiB, {=u16} I/O queues, volatile write cache {=bool}, shadow doorbells {=bool}",
        d.index, d.pci.bus, d.pci.dev, d.pci.func, id.model_str(), id.serial_str(), id.version,
        d.namespaces.len(), id.max_transfer / 1024, id.io_queues, id.vwc, id.shadow_doorbells
    );
    for ns in &d.namespaces {
        keel_log::info!(
            "nvme {=usize} ns {=u32}: {=u64} blocks of {=u32} B ({=u64} MiB)",
            d.index,
            ns.nsid,
            ns.blocks,
            ns.block_size,
            (ns.blocks * ns.block_size as u64) >> 20
        );
    }
    let q = d.queues();
    if q < cores {
        keel_log::info!(
            "nvme {=usize}: {=usize} I/O queues for {=usize} cores: cores 0..{=usize} own queues 1..={=usize}; core k >= {=usize} sends its I/O to core k mod {=usize}",
            d.index, q, cores, q, q, q, q
        );
    } else {
        keel_log::info!(
            "nvme {=usize}: every core owns an I/O queue (core k: queue k + 1)",
            d.index
        );
    }
}
