//! PRP (Physical Region Page) construction (NVMe 1.4 4.3).

use crate::spec::PAGE_SIZE;
use keel_hal::DmaRegion;

const P: u64 = PAGE_SIZE as u64;
/// PRP entries per list page.
pub const ENTRIES_PER_PAGE: usize = PAGE_SIZE / 8;

/// How many data pages after the first a PRP list of `list_pages` pages can describe (the last
/// entry of every page but the last chains to the next page).
pub const fn list_capacity(list_pages: usize) -> usize {
    if list_pages == 0 {
        0
    } else {
        (ENTRIES_PER_PAGE - 1) * (list_pages - 1) + ENTRIES_PER_PAGE
    }
}

/// Largest transfer a command can carry with `list_pages` PRP list pages, for any alignment.
pub const fn max_transfer(list_pages: usize) -> usize {
    if list_pages == 0 {
        2 * PAGE_SIZE - 4 // conservative: PRP1 + PRP2 only, worst-case offset
    } else {
        list_capacity(list_pages) * PAGE_SIZE
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrpError {
    /// Buffer not dword-aligned, empty, or wrapping the address space.
    BadBuffer,
    /// More pages than the list space holds.
    TooLong,
    /// Writing the list failed (list region too small).
    ListRegion,
}

/// Builds PRP1/PRP2 for `len` bytes at bus address `addr`, writing any PRP list into `list`
/// at byte offset `list_off` (`list_pages` whole pages, page-aligned in bus space).
pub fn build(
    addr: u64,
    len: usize,
    list: &DmaRegion,
    list_off: usize,
    list_pages: usize,
) -> Result<(u64, u64), PrpError> {
    if len == 0 || addr % 4 != 0 || addr.checked_add(len as u64).is_none() {
        return Err(PrpError::BadBuffer);
    }
    let first = P - (addr % P);
    let len = len as u64;
    if len <= first {
        return Ok((addr, 0));
    }
    let rest = len - first;
    let next = addr + first;
    if rest <= P {
        return Ok((addr, next));
    }
    let entries = rest.div_ceil(P) as usize;
    if entries > list_capacity(list_pages) {
        return Err(PrpError::TooLong);
    }
    let list_bus = list.bus_addr() + list_off as u64;
    let mut page = 0usize;
    let mut slot = 0usize;
    for i in 0..entries {
        let remaining = entries - i;
        if slot == ENTRIES_PER_PAGE - 1 && remaining > 1 {
            // Chain: the last entry of this page points to the next list page.
            let next_list = list_bus + ((page + 1) * PAGE_SIZE) as u64;
            write_entry(list, list_off + page * PAGE_SIZE + slot * 8, next_list)?;
            page += 1;
            slot = 0;
        }
        write_entry(
            list,
            list_off + page * PAGE_SIZE + slot * 8,
            next + i as u64 * P,
        )?;
        slot += 1;
    }
    Ok((addr, list_bus))
}

fn write_entry(list: &DmaRegion, off: usize, v: u64) -> Result<(), PrpError> {
    list.write(off, &v).map_err(|_| PrpError::ListRegion)
}
