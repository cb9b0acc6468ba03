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

/// Why a buffer cannot be described with PRPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrpError {
    /// Buffer not dword-aligned, empty, or wrapping the address space.
    BadBuffer,
    /// More pages than the list space holds.
    TooLong,
    /// Writing the list failed (list region too small).
    ListRegion,
}

/// PRP2 for `len` bytes at `addr` when PRP1/PRP2 alone describe them (0 when they fit in
/// PRP1's page), `None` when they need a list. `addr` must be dword-aligned, `len` nonzero.
#[inline]
pub fn direct(addr: u64, len: u64) -> Option<u64> {
    let first = P - (addr % P);
    if len <= first {
        Some(0)
    } else if len - first <= P {
        Some(addr + first)
    } else {
        None
    }
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
    if let Some(prp2) = direct(addr, len as u64) {
        return Ok((addr, prp2));
    }
    let first = P - (addr % P);
    let rest = len as u64 - first;
    let next = addr + first;
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

#[cfg(test)]
mod tests {
    use super::*;
    use keel_hal::DmaAllocator;
    use keel_model::HostDma;

    #[test]
    fn direct_covers_exactly_what_needs_no_list() {
        assert_eq!(direct(0x10000, 4096), Some(0), "one page");
        assert_eq!(
            direct(0x10004, 4092),
            Some(0),
            "to the end of the first page"
        );
        assert_eq!(
            direct(0x10004, 4093),
            Some(0x11000),
            "one byte into the second"
        );
        assert_eq!(direct(0x10000, 8192), Some(0x11000), "two whole pages");
        assert_eq!(
            direct(0x10004, 4092 + 4096),
            Some(0x11000),
            "to the end of the second"
        );
        assert_eq!(
            direct(0x10004, 4092 + 4097),
            None,
            "a third page needs a list"
        );
        assert_eq!(direct(0x10000, 8193), None);
    }

    fn entry(list: &DmaRegion, i: usize) -> u64 {
        list.read(i * 8).unwrap()
    }

    #[test]
    fn capacities() {
        assert_eq!(list_capacity(1), 512);
        assert_eq!(list_capacity(2), 1023);
        assert_eq!(max_transfer(1), 2 * 1024 * 1024);
    }

    #[test]
    fn one_and_two_pages() {
        let dma = HostDma::new();
        let list = dma.alloc(PAGE_SIZE, PAGE_SIZE).unwrap();
        let base = 0x10_0000u64;
        assert_eq!(build(base, 4096, &list, 0, 1), Ok((base, 0)));
        assert_eq!(build(base + 4092, 4, &list, 0, 1), Ok((base + 4092, 0)));
        assert_eq!(
            build(base + 4092, 8, &list, 0, 1),
            Ok((base + 4092, base + 4096))
        );
        assert_eq!(build(base, 8192, &list, 0, 1), Ok((base, base + 4096)));
        assert_eq!(build(base + 2, 8, &list, 0, 1), Err(PrpError::BadBuffer));
        assert_eq!(build(base, 0, &list, 0, 1), Err(PrpError::BadBuffer));
        assert_eq!(entry(&list, 0), 0, "no list written for <= 2 pages");
    }

    #[test]
    fn list_with_offset() {
        let dma = HostDma::new();
        let list = dma.alloc(PAGE_SIZE, PAGE_SIZE).unwrap();
        let base = 0x20_0000u64;
        // 100 bytes into a page, 3 pages long: touches 4 pages.
        let (p1, p2) = build(base + 100, 3 * 4096, &list, 0, 1).unwrap();
        assert_eq!(p1, base + 100);
        assert_eq!(p2, list.bus_addr());
        assert_eq!(
            [entry(&list, 0), entry(&list, 1), entry(&list, 2)],
            [base + 4096, base + 8192, base + 12288]
        );
        assert_eq!(entry(&list, 3), 0);
    }

    #[test]
    fn chained_lists() {
        let dma = HostDma::new();
        let list = dma.alloc(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let base = 0x4000_0000u64;
        // PRP1 covers page 0; 600 more pages: 511 in list page 0, then a chain, 89 in page 1.
        let (_, p2) = build(base, 601 * 4096, &list, 0, 2).unwrap();
        assert_eq!(p2, list.bus_addr());
        assert_eq!(entry(&list, 510), base + 511 * 4096);
        assert_eq!(entry(&list, 511), list.bus_addr() + 4096, "chain pointer");
        assert_eq!(entry(&list, 512), base + 512 * 4096);
        assert_eq!(entry(&list, 512 + 88), base + 600 * 4096);
        // Exactly 512 entries fit one page without a chain.
        let list1 = dma.alloc(PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(build(base, 513 * 4096, &list1, 0, 1).is_ok());
        assert_eq!(entry(&list1, 511), base + 512 * 4096);
        assert_eq!(
            build(base, 514 * 4096, &list1, 0, 1),
            Err(PrpError::TooLong)
        );
    }
}
