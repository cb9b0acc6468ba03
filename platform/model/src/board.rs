//! The software platform as a [`keel_hal::Board`]: the same jobs the firmware runs under QEMU
//! run here at host speed. Cores are threads (started per [`Cores::run_on_each`] with
//! `std::thread::scope`), the PCI bus holds one function per [`NvmeModel`], DMA memory comes
//! from the heap ([`HostDma`]), and the clock is the deterministic [`ModelClock`].

use std::cell::Cell;
use std::fmt;
use std::sync::Mutex;

use keel_hal::{Bar, BarError, Board, Cores, CoresError, PciFunction};

use crate::{HostDma, ModelClock, ModelMmio, NvmeModel};

thread_local! {
    static CORE: Cell<usize> = const { Cell::new(0) };
}

/// Stack of each model core's thread (a reactor and its buffers live on it).
const CORE_STACK: usize = 16 << 20;

/// `n` cores as threads.
#[derive(Debug)]
pub struct ModelCores {
    n: usize,
    busy: Mutex<()>,
}

impl Cores for ModelCores {
    fn count(&self) -> usize {
        self.n
    }

    fn current(&self) -> usize {
        CORE.with(|c| c.get())
    }

    fn run_on_each(&self, n: usize, work: &(dyn Fn(usize) + Sync)) -> Result<(), CoresError> {
        if n > self.n {
            return Err(CoresError::NotOnline {
                wanted: n,
                online: self.n,
            });
        }
        let Ok(_one_at_a_time) = self.busy.try_lock() else {
            return Err(CoresError::Busy);
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..n)
                .map(|core| {
                    std::thread::Builder::new()
                        .name(format!("model core {core}"))
                        .stack_size(CORE_STACK)
                        .spawn_scoped(s, move || {
                            CORE.with(|c| c.set(core));
                            work(core)
                        })
                        .expect("spawning a model core")
                })
                .collect();
            if n > 0 {
                work(0);
            }
            for t in others {
                if let Err(p) = t.join() {
                    std::panic::resume_unwind(p);
                }
            }
        });
        Ok(())
    }

    fn relax(&self) {
        std::thread::yield_now();
    }
}

/// The model machine: cores, DMA memory, a clock and NVMe controllers on a PCI bus.
pub struct ModelBoard {
    clock: ModelClock,
    dma: HostDma,
    cores: ModelCores,
    nvme: Vec<NvmeModel>,
    functions: Vec<PciFunction>,
    console: Mutex<Vec<String>>,
}

impl ModelBoard {
    /// A board with `cores` cores and the given controllers (each one PCI function, in
    /// order), all using `dma`.
    pub fn new(cores: usize, dma: HostDma, nvme: Vec<NvmeModel>) -> Self {
        let functions = (0..nvme.len())
            .map(|i| PciFunction {
                bus: 0,
                dev: i as u8 + 1,
                func: 0,
                vendor: 0x1b36,
                device: 0x0010,
                class: 0x01,
                subclass: 0x08,
                prog_if: 0x02,
                bars: {
                    let mut b = [Bar::default(); 6];
                    b[0] = Bar {
                        base: 0xC000_0000 + ((i as u64) << 16),
                        size: 0x4000,
                        memory: true,
                    };
                    b
                },
            })
            .collect();
        Self {
            clock: ModelClock::new(),
            dma,
            cores: ModelCores {
                n: cores.max(1),
                busy: Mutex::new(()),
            },
            nvme,
            functions,
            console: Mutex::new(Vec::new()),
        }
    }

    /// The controllers.
    pub fn nvme(&self) -> &[NvmeModel] {
        &self.nvme
    }

    /// The board's clock (shared with everything that runs on it).
    pub fn model_clock(&self) -> &ModelClock {
        &self.clock
    }

    /// Every console line printed so far.
    pub fn console(&self) -> Vec<String> {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Board for ModelBoard {
    type Mmio = ModelMmio;
    type Clock = ModelClock;
    type Dma = HostDma;
    type Cores = ModelCores;

    fn name(&self) -> &'static str {
        "model"
    }

    fn clock(&self) -> ModelClock {
        self.clock.clone()
    }

    fn dma(&self) -> &HostDma {
        &self.dma
    }

    fn cores(&self) -> &ModelCores {
        &self.cores
    }

    fn pci_functions(&self) -> &[PciFunction] {
        &self.functions
    }

    fn map_bar(&self, function: &PciFunction, bar: usize) -> Result<ModelMmio, BarError> {
        let i = self
            .functions
            .iter()
            .position(|f| (f.bus, f.dev, f.func) == (function.bus, function.dev, function.func))
            .ok_or(BarError::NoSuchBar)?;
        if bar != 0 {
            return Err(BarError::Unassigned);
        }
        Ok(self.nvme[i].mmio())
    }

    fn fault_remove(&self, function: &PciFunction) -> bool {
        let Some(i) = self
            .functions
            .iter()
            .position(|f| (f.bus, f.dev, f.func) == (function.bus, function.dev, function.func))
        else {
            return false;
        };
        self.nvme[i].set_fault(crate::Fault::Removed);
        true
    }

    fn print(&self, line: fmt::Arguments<'_>) {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.to_string());
    }
}
