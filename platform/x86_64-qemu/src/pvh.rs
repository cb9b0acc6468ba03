//! The PVH `hvm_start_info` QEMU hands over in EBX, and QEMU's fw_cfg interface.
//! Everything is copied out into [`BootInfo`] before the boot page tables are replaced.

use heapless::Vec;

const MAGIC: u32 = 0x336e_c578;
pub const MAX_MEMMAP: usize = 64;
pub const MAX_CMDLINE: usize = 512;

#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
    pub kind: u32,
}

pub struct BootInfo {
    pub memmap: Vec<MemRegion, MAX_MEMMAP>,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
}

#[derive(Debug, defmt::Format)]
pub enum BootInfoError {
    BadMagic(u32),
    NoMemoryMap,
    CmdlineNotUtf8,
}

impl BootInfo {
    pub fn cmdline(&self) -> Result<&str, BootInfoError> {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len])
            .map_err(|_| BootInfoError::CmdlineNotUtf8)
    }

    pub fn ram_bytes(&self) -> u64 {
        self.memmap
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.size)
            .sum()
    }
}

fn read<T: Copy>(paddr: u64) -> T {
    // SAFETY: callers pass addresses inside the start-info structures QEMU placed in RAM below
    // 4 GiB, which the boot page tables identity-map; unaligned reads are allowed.
    unsafe { (paddr as *const T).read_unaligned() }
}

/// Copies the start info at `paddr` (from EBX at entry).
pub fn parse(paddr: u32) -> Result<BootInfo, BootInfoError> {
    let p = paddr as u64;
    let magic: u32 = read(p);
    if magic != MAGIC {
        return Err(BootInfoError::BadMagic(magic));
    }
    let version: u32 = read(p + 4);
    let cmdline_paddr: u64 = read(p + 24);
    let mut info = BootInfo {
        memmap: Vec::new(),
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
    };
    if cmdline_paddr != 0 {
        while info.cmdline_len < MAX_CMDLINE {
            let b: u8 = read(cmdline_paddr + info.cmdline_len as u64);
            if b == 0 {
                break;
            }
            info.cmdline[info.cmdline_len] = b;
            info.cmdline_len += 1;
        }
    }
    if version >= 1 {
        let memmap_paddr: u64 = read(p + 40);
        let entries: u32 = read(p + 48);
        for i in 0..(entries as u64).min(MAX_MEMMAP as u64) {
            let e = memmap_paddr + i * 24;
            let _ = info.memmap.push(MemRegion {
                addr: read(e),
                size: read(e + 8),
                kind: read(e + 16),
            });
        }
    }
    if info.memmap.is_empty() {
        fw_cfg_e820(&mut info.memmap);
    }
    if info.memmap.is_empty() {
        return Err(BootInfoError::NoMemoryMap);
    }
    Ok(info)
}

// ---- fw_cfg (I/O ports 0x510 selector, 0x511 data) ----

const FW_CFG_SEL: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const FW_CFG_SIGNATURE: u16 = 0x00;
const FW_CFG_NB_CPUS: u16 = 0x05;
const FW_CFG_FILE_DIR: u16 = 0x19;

fn fw_cfg_select(key: u16) {
    crate::cpu::outw(FW_CFG_SEL, key);
}
fn fw_cfg_bytes(out: &mut [u8]) {
    for b in out {
        *b = crate::cpu::inb(FW_CFG_DATA);
    }
}

fn fw_cfg_present() -> bool {
    fw_cfg_select(FW_CFG_SIGNATURE);
    let mut sig = [0u8; 4];
    fw_cfg_bytes(&mut sig);
    &sig == b"QEMU"
}

/// Number of CPUs QEMU was started with (`-smp`), or 1 without fw_cfg.
pub fn cpu_count() -> usize {
    if !fw_cfg_present() {
        return 1;
    }
    fw_cfg_select(FW_CFG_NB_CPUS);
    let mut n = [0u8; 2];
    fw_cfg_bytes(&mut n);
    u16::from_le_bytes(n).max(1) as usize
}

/// Finds a fw_cfg file by name: (selector, size).
fn fw_cfg_file(name: &[u8]) -> Option<(u16, u32)> {
    if !fw_cfg_present() {
        return None;
    }
    fw_cfg_select(FW_CFG_FILE_DIR);
    let mut n = [0u8; 4];
    fw_cfg_bytes(&mut n);
    for _ in 0..u32::from_be_bytes(n).min(4096) {
        let mut e = [0u8; 64];
        fw_cfg_bytes(&mut e);
        let size = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let sel = u16::from_be_bytes([e[4], e[5]]);
        let fname = &e[8..];
        let len = fname.iter().position(|&b| b == 0).unwrap_or(56);
        if &fname[..len] == name {
            return Some((sel, size));
        }
    }
    None
}

const FW_CFG_ID: u16 = 0x01;
const FW_CFG_DMA_HI: u16 = 0x514;
const FW_CFG_DMA_LO: u16 = 0x518;
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SKIP: u32 = 4;
const DMA_SELECT: u32 = 8;

/// One fw_cfg DMA request (every field big-endian), as the device reads it from memory.
#[repr(C, align(16))]
struct DmaAccess {
    control: u32,
    length: u32,
    address: u64,
}

/// Whether fw_cfg offers its DMA interface (FW_CFG_ID bit 1).
fn fw_cfg_dma_present() -> bool {
    if !fw_cfg_present() {
        return false;
    }
    fw_cfg_select(FW_CFG_ID);
    let mut id = [0u8; 4];
    fw_cfg_bytes(&mut id);
    u32::from_le_bytes(id) & 2 != 0
}

/// One fw_cfg DMA transfer: `control` (READ or SKIP, optionally SELECT), `len` bytes into
/// `buf` (READ) or skipped. Port I/O moves one byte per exit; DMA moves a table at once.
fn fw_cfg_dma(control: u32, buf: &mut [u8], len: u32) -> bool {
    let len = if control & DMA_READ != 0 {
        len.min(buf.len() as u32)
    } else {
        len
    };
    let acc = DmaAccess {
        control: control.to_be(),
        length: len.to_be(),
        address: (buf.as_mut_ptr() as u64).to_be(),
    };
    let at = &acc as *const DmaAccess as u64;
    // The port writes are `nomem` asm: without fences the compiler may keep `acc` in
    // registers past them, and take `buf` as unchanged after the device filled it.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // The address register is big-endian; writing its low half starts the transfer.
    crate::cpu::outl(FW_CFG_DMA_HI, ((at >> 32) as u32).swap_bytes());
    crate::cpu::outl(FW_CFG_DMA_LO, (at as u32).swap_bytes());
    for _ in 0..1_000_000 {
        // SAFETY: `acc` is alive on this stack; the device clears `control` when done.
        let c = u32::from_be(unsafe { core::ptr::addr_of!(acc.control).read_volatile() });
        if c & !DMA_ERROR == 0 {
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            return c & DMA_ERROR == 0;
        }
    }
    false
}

/// The local APIC ids of the machine's processors, in the order the firmware's ACPI MADT
/// lists them (enabled or online-capable ones), read from fw_cfg's `etc/acpi/tables` (which
/// QEMU builds for every boot path, flash included). Empty if there is no MADT to read.
pub fn apic_ids<const N: usize>() -> Vec<u32, N> {
    let mut ids = Vec::new();
    if !fw_cfg_dma_present() {
        return ids;
    }
    let Some((sel, size)) = fw_cfg_file(b"etc/acpi/tables") else {
        return ids;
    };
    let mut hdr = [0u8; 36];
    let mut at = 0u32;
    let mut first = true;
    while at + 36 <= size {
        let ctl = if first {
            DMA_SELECT | DMA_READ | (sel as u32) << 16
        } else {
            DMA_READ
        };
        first = false;
        if !fw_cfg_dma(ctl, &mut hdr, 36) {
            return ids;
        }
        let sig = &hdr[0..4];
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        // Tables follow each other; anything that is not a table header ends the walk.
        if !sig
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            || len < 36
            || at + len > size
        {
            return ids;
        }
        if sig == b"APIC" {
            let mut body = [0u8; 4096];
            let n = (len - 36) as usize;
            if n > body.len() || !fw_cfg_dma(DMA_READ, &mut body, n as u32) {
                return ids;
            }
            // No checksum check: in the fw_cfg blob checksums are still zero; QEMU's table
            // loader has a BIOS fill them in once the tables are placed in memory. The walk
            // checks structure instead (signatures, lengths within bounds).
            // Local APIC address and flags (8 bytes), then entries: type, length, ...
            let mut e = 8;
            while e + 2 <= n {
                let (kind, elen) = (body[e], body[e + 1] as usize);
                if elen < 2 || e + elen > n {
                    break;
                }
                let f = |o: usize| {
                    u32::from_le_bytes([
                        body[e + o],
                        body[e + o + 1],
                        body[e + o + 2],
                        body[e + o + 3],
                    ])
                };
                let id = match (kind, elen) {
                    // Processor Local APIC: ACPI id, APIC id, flags (enabled | online capable).
                    (0, 8) if f(4) & 3 != 0 => Some(body[e + 3] as u32),
                    // Processor Local x2APIC: reserved, x2APIC id, flags, ACPI uid.
                    (9, 16) if f(8) & 3 != 0 => Some(f(4)),
                    _ => None,
                };
                if let Some(id) = id {
                    if !ids.contains(&id) && ids.push(id).is_err() {
                        break;
                    }
                }
                e += elen;
            }
            return ids;
        }
        if !fw_cfg_dma(DMA_SKIP, &mut [], len - 36) {
            return ids;
        }
        at += len;
    }
    ids
}

/// The memory map from fw_cfg's `etc/e820`, for loaders that give no PVH memory map.
fn fw_cfg_e820(out: &mut Vec<MemRegion, MAX_MEMMAP>) {
    let Some((sel, size)) = fw_cfg_file(b"etc/e820") else {
        return;
    };
    fw_cfg_select(sel);
    for _ in 0..(size / 20).min(MAX_MEMMAP as u32) {
        let mut e = [0u8; 20];
        fw_cfg_bytes(&mut e);
        let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
        let kind = u32::from_le_bytes(e[16..20].try_into().unwrap_or_default());
        let _ = out.push(MemRegion {
            addr,
            size: len,
            kind,
        });
    }
}

/// fw_cfg file that overrides a flash image's config area (`-fw_cfg name=opt/keel/cmdline,...`).
const CMDLINE_OVERRIDE: &[u8] = b"opt/keel/cmdline";

/// Replaces the command line with fw_cfg `opt/keel/cmdline` when QEMU provides one.
pub fn fw_cfg_cmdline_override(info: &mut BootInfo) {
    let Some((sel, size)) = fw_cfg_file(CMDLINE_OVERRIDE) else {
        return;
    };
    fw_cfg_select(sel);
    let n = (size as usize).min(MAX_CMDLINE);
    fw_cfg_bytes(&mut info.cmdline[..n]);
    info.cmdline_len = info.cmdline[..n].iter().position(|&b| b == 0).unwrap_or(n);
}
