//! The real page tables, built from the boot memory map: RAM write-back, the APIC/firmware window
//! and PCI BARs uncached, everything else (including page 0, so null dereferences fault) absent.
//! Identity-mapped; 2 MiB pages except for the first 2 MiB, which uses 4 KiB pages.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::pvh::MemRegion;

const P: u64 = 1;
const RW: u64 = 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
const TWO_MIB: u64 = 2 << 20;

pub const WRITE_BACK: u64 = P | RW;
pub const UNCACHED: u64 = P | RW | PWT | PCD;

const POOL: usize = 96;

#[repr(C, align(4096))]
struct Table([u64; 512]);

struct Pool(UnsafeCell<[Table; POOL]>);
// SAFETY: tables are handed out once each (NEXT is a bump index) and only modified inside a
// critical section (`map`), or before other cores run.
unsafe impl Sync for Pool {}
static TABLES: Pool = Pool(UnsafeCell::new([const { Table([0; 512]) }; POOL]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, defmt::Format)]
pub enum PagingError {
    OutOfTables,
}

fn alloc() -> Result<*mut Table, PagingError> {
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    if i >= POOL {
        return Err(PagingError::OutOfTables);
    }
    // SAFETY: index `i` is handed out exactly once; the pool is zero-initialised in .bss.
    Ok(unsafe { (*TABLES.0.get()).as_mut_ptr().add(i) })
}

fn pml4() -> *mut Table {
    // SAFETY: table 0 is the PML4, allocated first by `init`.
    unsafe { (*TABLES.0.get()).as_mut_ptr() }
}

/// Physical address of the PML4 (tables are identity-mapped, so it equals the pointer).
pub fn root() -> u64 {
    pml4() as u64
}

/// The next-level table under `entry`, creating it when absent.
///
/// # Safety
/// `entry` points into a live table of this pool; caller holds the critical section or runs
/// before other cores start.
unsafe fn next(entry: *mut u64) -> Result<*mut Table, PagingError> {
    // SAFETY: per the contract, `entry` is valid.
    let e = unsafe { *entry };
    if e & P != 0 {
        return Ok((e & ADDR) as *mut Table);
    }
    let t = alloc()?;
    // SAFETY: as above.
    unsafe { *entry = t as u64 | P | RW };
    Ok(t)
}

/// Identity-maps the 2 MiB page holding `addr` unless something already maps it.
fn map_2m(addr: u64, flags: u64) -> Result<(), PagingError> {
    let addr = addr & !(TWO_MIB - 1);
    let (i4, i3, i2) = ((addr >> 39) & 511, (addr >> 30) & 511, (addr >> 21) & 511);
    // SAFETY: every pointer comes from this pool; callers serialise (see `map`).
    unsafe {
        let pdpt = next(&raw mut (*pml4()).0[i4 as usize])?;
        let pd = next(&raw mut (*pdpt).0[i3 as usize])?;
        let e = &raw mut (*pd).0[i2 as usize];
        if *e & P == 0 {
            *e = addr | flags | PS;
        }
    }
    Ok(())
}

/// Identity-maps `[start, start+len)` (rounded out to 2 MiB) with `flags`; already-mapped pages
/// keep their mapping. Safe to call after boot: it runs in a critical section and flushes the TLB.
pub fn map(start: u64, len: u64, flags: u64) -> Result<(), PagingError> {
    critical_section::with(|_| {
        let mut a = start & !(TWO_MIB - 1);
        let end = start.saturating_add(len);
        while a < end {
            if a >= TWO_MIB {
                map_2m(a, flags)?;
            }
            a += TWO_MIB;
        }
        flush();
        Ok(())
    })
}

fn flush() {
    let (frame, f) = x86_64::registers::control::Cr3::read();
    // SAFETY: reloading the current CR3 only flushes non-global TLB entries.
    unsafe { x86_64::registers::control::Cr3::write(frame, f) };
}

/// Builds the tables from the memory map and switches to them. Boot core, before APs start.
pub fn init(memmap: &[MemRegion]) -> Result<(), PagingError> {
    let root = alloc()?; // PML4
    debug_assert_eq!(root, pml4());
    // First 2 MiB with 4 KiB pages: page 0 left out so a null dereference faults.
    // SAFETY: fresh tables from the pool, single-threaded boot.
    unsafe {
        let pdpt = next(&raw mut (*root).0[0])?;
        let pd = next(&raw mut (*pdpt).0[0])?;
        let pt = alloc()?;
        for i in 1..512u64 {
            (*pt).0[i as usize] = (i << 12) | WRITE_BACK;
        }
        (*pd).0[0] = pt as u64 | P | RW;
    }
    for r in memmap.iter().filter(|r| matches!(r.kind, 1 | 3 | 4)) {
        map(r.addr, r.size, WRITE_BACK)?;
    }
    // IOAPIC, HPET, local APIC and the firmware ROM at the top of 4 GiB.
    map(0xFEC0_0000, 0x0140_0000, UNCACHED)?;
    let cr3 = root as u64;
    // SAFETY: the new tables identity-map the image, stacks, .bss and everything mapped before.
    unsafe {
        x86_64::registers::control::Cr3::write(
            x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new(cr3)),
            x86_64::registers::control::Cr3Flags::empty(),
        )
    };
    Ok(())
}
