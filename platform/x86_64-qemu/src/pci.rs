//! PCI enumeration through the legacy 0xCF8/0xCFC configuration ports (works on `pc` and `q35`),
//! memory BAR assignment when firmware left BARs unassigned (qboot assigns none), and uncached
//! mapping of every memory BAR.

use heapless::Vec;

use crate::cpu::{inl, outl};

pub const MAX_DEVICES: usize = 32;

#[derive(Clone, Copy, Debug, Default, defmt::Format)]
pub struct Bar {
    pub base: u64,
    pub size: u64,
    pub is64: bool,
}

#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct PciDevice {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub bars: [Bar; 6],
}

impl PciDevice {
    pub fn is_nvme(&self) -> bool {
        (self.class, self.subclass, self.prog_if) == (0x01, 0x08, 0x02)
    }
}

fn addr(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    0x8000_0000 | (bus as u32) << 16 | (dev as u32) << 11 | (func as u32) << 8 | (off as u32 & 0xFC)
}
pub fn read32(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    critical_section::with(|_| {
        outl(0xCF8, addr(bus, dev, func, off));
        inl(0xCFC)
    })
}
pub fn write32(bus: u8, dev: u8, func: u8, off: u8, v: u32) {
    critical_section::with(|_| {
        outl(0xCF8, addr(bus, dev, func, off));
        outl(0xCFC, v);
    })
}

/// PCI command register: Memory Space Enable and Bus Master Enable.
const CMD_MEMORY_BUS_MASTER: u32 = 0x2 | 0x4;
/// Expansion ROM BAR (type 0 header).
const ROM_BAR: u8 = 0x30;
/// QEMU's `pci-testdev` (1b36:0005): the stand-in whose all-ones ROM takes a removed
/// function's register window.
pub const STANDIN: (u16, u16) = (0x1b36, 0x0005);

/// Why a function could not be made to look removed.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum CutError {
    /// No `pci-testdev` with an expansion ROM on the bus (see [`cut_off`]).
    NoStandin,
    /// The stand-in's ROM is not exactly the size of the removed window (it would leave
    /// registers decoded as zeroes, or cover another function's BAR).
    RomSize(u64),
}

/// **Fault injection**: makes `victim` look surprise-removed (`keel_hal::Board::fault_remove`).
///
/// Clears Memory Space Enable and Bus Master Enable in its command register: it stops
/// decoding its BARs and can no longer DMA. On real PCIe a read of a removed device's window
/// completes with all ones (the root port's master abort); QEMU 7.2 returns **zeroes** for a
/// read nothing decodes (`unassigned_mem_read`), which no driver can tell from a live
/// register. So the stand-in — a `pci-testdev` given a ROM image of all ones
/// (`-device pci-testdev,romfile=...`) — maps its expansion ROM over the victim's BAR0 window:
/// reads there return all ones and writes are dropped (a ROM), as on the real bus.
/// `probe` reads a register of the victim's window; it is called once the victim stops
/// decoding and before the ROM covers the window (for the log: QEMU's zeroes). Returns the
/// victim's command register as read back and what `probe` read.
pub fn cut_off(
    victim: &keel_hal::PciFunction,
    standin: Option<&keel_hal::PciFunction>,
    probe: impl Fn() -> u32,
) -> Result<(u16, u32), CutError> {
    let bar = victim.bars[0];
    let s = standin.ok_or(CutError::NoStandin)?;
    let (b, d, f) = (s.bus, s.dev, s.func);
    let old = read32(b, d, f, ROM_BAR);
    write32(b, d, f, ROM_BAR, 0xFFFF_F800);
    let size = (!(read32(b, d, f, ROM_BAR) & 0xFFFF_F800)).wrapping_add(1) as u64;
    write32(b, d, f, ROM_BAR, old);
    if size != bar.size || !bar.base.is_multiple_of(size.max(1)) || bar.base >> 32 != 0 {
        return Err(CutError::RomSize(size));
    }
    // Only the low 16 bits (command); the status half is written as 0 (its RW1C bits).
    let (vb, vd, vf) = (victim.bus, victim.dev, victim.func);
    let cmd = read32(vb, vd, vf, 4) & 0xFFFF;
    write32(vb, vd, vf, 4, cmd & !CMD_MEMORY_BUS_MASTER);
    let undecoded = probe();
    // The stand-in's ROM where the victim's window was (ROM enable, bit 0), decoded.
    write32(b, d, f, ROM_BAR, bar.base as u32 | 1);
    let scmd = read32(b, d, f, 4) & 0xFFFF;
    write32(b, d, f, 4, scmd | 0x2);
    Ok((read32(vb, vd, vf, 4) as u16, undecoded))
}

/// Reads BAR `i` and its size (by writing all ones and reading back, then restoring).
fn probe_bar(b: u8, d: u8, f: u8, i: usize) -> (Bar, bool) {
    let off = 0x10 + 4 * i as u8;
    let lo = read32(b, d, f, off);
    if lo & 1 != 0 {
        return (Bar::default(), false); // I/O BAR: unused by Keel
    }
    let is64 = (lo >> 1) & 3 == 2;
    write32(b, d, f, off, u32::MAX);
    let size_lo = read32(b, d, f, off) & !0xF;
    write32(b, d, f, off, lo);
    let (hi, size_hi) = if is64 && i < 5 {
        let hi = read32(b, d, f, off + 4);
        write32(b, d, f, off + 4, u32::MAX);
        let sh = read32(b, d, f, off + 4);
        write32(b, d, f, off + 4, hi);
        (hi, sh)
    } else {
        (0, if is64 { u32::MAX } else { 0 })
    };
    let mask = ((size_hi as u64) << 32) | size_lo as u64;
    let mask = if is64 {
        mask
    } else {
        mask | 0xFFFF_FFFF_0000_0000
    };
    let size = if size_lo == 0 && size_hi == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    (
        Bar {
            base: ((hi as u64) << 32) | (lo & !0xF) as u64,
            size,
            is64,
        },
        is64,
    )
}

fn scan_function(
    b: u8,
    d: u8,
    f: u8,
    out: &mut Vec<PciDevice, MAX_DEVICES>,
    buses: &mut Vec<u8, 32>,
) {
    let id = read32(b, d, f, 0);
    if id & 0xFFFF == 0xFFFF {
        return;
    }
    let class = read32(b, d, f, 8);
    let header = (read32(b, d, f, 0x0C) >> 16) as u8 & 0x7F;
    let mut dev = PciDevice {
        bus: b,
        dev: d,
        func: f,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: (class >> 24) as u8,
        subclass: (class >> 16) as u8,
        prog_if: (class >> 8) as u8,
        bars: [Bar::default(); 6],
    };
    if header == 0 {
        let mut i = 0;
        while i < 6 {
            let (bar, is64) = probe_bar(b, d, f, i);
            dev.bars[i] = bar;
            i += if is64 { 2 } else { 1 };
        }
    } else if header == 1 {
        let secondary = (read32(b, d, f, 0x18) >> 8) as u8;
        if secondary != 0 {
            let _ = buses.push(secondary);
        }
    }
    if out.push(dev).is_err() {
        keel_log::warn!(
            "pci: more than {=usize} functions, ignoring {=u8}:{=u8}.{=u8}",
            MAX_DEVICES,
            b,
            d,
            f
        );
    }
}

/// Lists every function reachable from bus 0, assigns unassigned memory BARs from a window below
/// 4 GiB that avoids RAM and firmware-assigned BARs, enables memory decoding and bus mastering,
/// and maps every memory BAR uncached.
pub fn enumerate(ram_top_below_4g: u64) -> Vec<PciDevice, MAX_DEVICES> {
    let mut out = Vec::new();
    let mut buses: Vec<u8, 32> = Vec::new();
    let _ = buses.push(0);
    let mut next_bus = 0;
    while next_bus < buses.len() {
        let b = buses[next_bus];
        next_bus += 1;
        for d in 0..32u8 {
            if read32(b, d, 0, 0) & 0xFFFF == 0xFFFF {
                continue;
            }
            let multi = (read32(b, d, 0, 0x0C) >> 16) & 0x80 != 0;
            for f in 0..if multi { 8 } else { 1 } {
                scan_function(b, d, f, &mut out, &mut buses);
            }
        }
    }

    // Allocation window: above RAM, below the q35 MMCONFIG / IOAPIC region.
    let mut cursor = ram_top_below_4g
        .max(0xC000_0000)
        .next_multiple_of(0x1000_0000);
    let limit = if cursor < 0xE000_0000 {
        0xE000_0000
    } else {
        0xFEC0_0000
    };
    if cursor >= 0xE000_0000 {
        cursor = 0xF000_0000;
    }
    for dev in out.iter() {
        for bar in dev.bars.iter().filter(|b| b.base != 0 && b.size != 0) {
            if bar.base >= cursor && bar.base < limit {
                cursor = cursor.max(bar.base + bar.size);
            }
        }
    }
    for dev in out.iter_mut() {
        let mut cmd_bits = 0u32;
        for i in 0..6 {
            let bar = dev.bars[i];
            if bar.size == 0 {
                continue;
            }
            if bar.base == 0 {
                let base = cursor.next_multiple_of(bar.size.max(0x1000));
                if base + bar.size > limit {
                    keel_log::error!(
                        "pci: no room for bar{=usize} of {=u8}:{=u8}.{=u8}",
                        i,
                        dev.bus,
                        dev.dev,
                        dev.func
                    );
                    continue;
                }
                cursor = base + bar.size;
                let off = 0x10 + 4 * i as u8;
                let lo = read32(dev.bus, dev.dev, dev.func, off);
                write32(
                    dev.bus,
                    dev.dev,
                    dev.func,
                    off,
                    (base as u32 & !0xF) | (lo & 0xF),
                );
                if bar.is64 {
                    write32(dev.bus, dev.dev, dev.func, off + 4, (base >> 32) as u32);
                }
                dev.bars[i].base = base;
            }
            if let Err(e) = crate::paging::map(dev.bars[i].base, bar.size, crate::paging::UNCACHED)
            {
                keel_log::error!("pci: cannot map bar: {}", e);
            }
            cmd_bits |= CMD_MEMORY_BUS_MASTER;
        }
        if cmd_bits != 0 {
            let cmd = read32(dev.bus, dev.dev, dev.func, 4);
            write32(dev.bus, dev.dev, dev.func, 4, cmd | cmd_bits);
        }
    }
    out
}
