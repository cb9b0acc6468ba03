//! Zoned namespaces (the NVMe Zoned Namespace command set, CSI 2): what a zoned namespace
//! looks like ([`Zoned`]), zone reports ([`parse_zone_report`] into [`ZoneDescriptor`]s) and
//! the zone operations an [`IoQueuePair`](crate::IoQueuePair) submits ([`ZoneOp`]).
//!
//! Everything the device says is range-checked before use: a zone size of 0 or larger than
//! the namespace, a report that claims more descriptors than its buffer holds, a descriptor
//! whose start is not a zone start or whose write pointer lies outside its zone, an unknown
//! zone state: each is a typed error, never an out-of-bounds read. A zone append's returned
//! LBA is checked by the queue pair to lie inside the zone it was sent to, leaving room for
//! the blocks written (a lie completes the tag with
//! [`IoError::BadResult`](keel_blockdev::IoError)).

use keel_blockdev::{BufRef, NsId};

use crate::error::BadIdentify;

/// The zone geometry and limits of a zoned namespace (Identify CNS 5 with CSI 2, and ZASL
/// from CNS 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Zoned {
    /// Blocks per zone (ZSZE of the namespace's LBA format extension). Zone `i` starts at
    /// LBA `i * zone_size`.
    pub zone_size: u64,
    /// Zones in the namespace (`NSZE / zone_size`; a partial zone at the end is not used).
    pub zones: u64,
    /// Most zones that may be active (open or closed) at once (MAR + 1); `None`: no limit.
    pub max_active: Option<u32>,
    /// Most zones that may be open at once (MOR + 1); `None`: no limit.
    pub max_open: Option<u32>,
    /// Largest zone append in bytes (ZASL; MDTS where the controller reports 0). Appends are
    /// never split: a larger one is refused with `SubmitError::TooLarge`.
    pub append_limit: u32,
}

impl Zoned {
    /// The first LBA of the zone holding `lba`.
    pub fn zone_start(&self, lba: u64) -> u64 {
        lba - lba % self.zone_size
    }

    /// `true` when `lba` is the first block of a zone of the namespace.
    pub fn is_zone_start(&self, lba: u64) -> bool {
        lba % self.zone_size == 0 && lba / self.zone_size < self.zones
    }
}

/// Byte offsets in the zoned command set's Identify Namespace data (ZNS 1.1 Figure 49).
mod id_ns {
    pub const MAR: usize = 4;
    pub const MOR: usize = 8;
    /// LBA Format Extension 0; 16 bytes each (ZSZE: 8 bytes, ZDES: 1 byte).
    pub const LBAFE: usize = 2816;
}

fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Validates the zoned command set's Identify Namespace data (`cs_ns`, the 4 KiB of CNS 5
/// with CSI 2) for a namespace of `blocks` blocks in LBA format `lbaf`, with the
/// controller's zone append limit `append_limit` (bytes, already resolved against MDTS).
pub fn parse_zoned(
    blocks: u64,
    lbaf: usize,
    cs_ns: &[u8],
    append_limit: u32,
) -> Result<Zoned, BadIdentify> {
    let bad = Err(BadIdentify::ZoneSize);
    let Some(zone_size) = lbaf
        .checked_mul(16)
        .and_then(|o| le64(cs_ns, id_ns::LBAFE + o))
    else {
        return bad;
    };
    if zone_size == 0 || zone_size > blocks {
        return bad;
    }
    let limit = |v: Option<u32>| match v {
        Some(u32::MAX) => Ok(None),
        Some(n) => Ok(Some(n + 1)),
        None => Err(BadIdentify::ZoneSize),
    };
    let max_active = limit(le32(cs_ns, id_ns::MAR))?;
    let max_open = limit(le32(cs_ns, id_ns::MOR))?;
    let zones = blocks / zone_size;
    if let (Some(a), Some(o)) = (max_active, max_open) {
        if o > a {
            return Err(BadIdentify::ZoneLimits);
        }
    }
    if append_limit == 0 {
        return Err(BadIdentify::ZoneLimits);
    }
    Ok(Zoned {
        zone_size,
        zones,
        max_active,
        max_open,
        append_limit,
    })
}

/// A zone's state (the ZS field of a zone descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZoneState {
    /// ZSE: nothing written; the write pointer is the zone start.
    Empty,
    /// ZSIO: opened by a write.
    ImplicitlyOpened,
    /// ZSEO: opened by Zone Management Send (open).
    ExplicitlyOpened,
    /// ZSC: closed (active, not open).
    Closed,
    /// ZSRO: read only.
    ReadOnly,
    /// ZSF: full (written to its capacity, or finished).
    Full,
    /// ZSO: offline.
    Offline,
}

impl ZoneState {
    /// From the ZS field (descriptor byte 1, bits 7:4).
    pub fn from_code(zs: u8) -> Option<Self> {
        Some(match zs {
            0x1 => ZoneState::Empty,
            0x2 => ZoneState::ImplicitlyOpened,
            0x3 => ZoneState::ExplicitlyOpened,
            0x4 => ZoneState::Closed,
            0xD => ZoneState::ReadOnly,
            0xE => ZoneState::Full,
            0xF => ZoneState::Offline,
            _ => return None,
        })
    }

    /// `true` where the descriptor's write pointer is valid (empty, open, closed).
    pub fn has_write_pointer(self) -> bool {
        matches!(
            self,
            ZoneState::Empty
                | ZoneState::ImplicitlyOpened
                | ZoneState::ExplicitlyOpened
                | ZoneState::Closed
        )
    }
}

/// One zone, as a report described it (every field checked against the namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ZoneDescriptor {
    /// The zone's state.
    pub state: ZoneState,
    /// The zone type (ZT; 2 = sequential write required, the only type ZNS 1.1 defines).
    pub zone_type: u8,
    /// The first LBA of the zone (ZSLBA).
    pub start: u64,
    /// The write pointer (WP), where the state has one (empty, open, closed).
    pub write_pointer: Option<u64>,
    /// Writable blocks in the zone (ZCAP), at most the zone size.
    pub capacity: u64,
    /// Zone attributes (ZA).
    pub attributes: u8,
}

impl Default for ZoneDescriptor {
    fn default() -> Self {
        Self {
            state: ZoneState::Offline,
            zone_type: ZONE_TYPE_SEQ_WRITE,
            start: 0,
            write_pointer: None,
            capacity: 0,
            attributes: 0,
        }
    }
}

/// Zone type "sequential write required".
pub const ZONE_TYPE_SEQ_WRITE: u8 = 2;
/// Bytes of a zone report's header.
pub const REPORT_HEADER: usize = 64;
/// Bytes of one zone descriptor.
pub const ZONE_DESCRIPTOR: usize = 64;

/// What was wrong with a zone report (the device's data; nothing past the buffer was read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZoneReportError {
    /// The buffer is shorter than the header.
    Short,
    /// The header counts more descriptors than the buffer holds (a partial report counts
    /// only those in it), or more than the namespace has zones.
    Count(u64),
    /// A descriptor's state is not one ZNS defines.
    State(u8),
    /// A descriptor's zone type is not "sequential write required".
    Type(u8),
    /// A descriptor's start is not a zone start of the namespace, not after the previous
    /// one's, or before the LBA the report was asked from.
    Start(u64),
    /// A descriptor's capacity is 0 or larger than the zone size.
    Capacity(u64),
    /// A write pointer outside its zone's `start..=start + capacity` (or not the start of an
    /// empty zone).
    WritePointer(u64),
}

/// Parses a partial zone report (Zone Management Receive, report zones, partial = 1) asked
/// from LBA `from`, into `out`. Returns how many descriptors were parsed: the header's count,
/// which must fit both the buffer and the namespace; descriptors beyond `out.len()` are
/// checked but not kept.
pub fn parse_zone_report(
    report: &[u8],
    zoned: &Zoned,
    from: u64,
    out: &mut [ZoneDescriptor],
) -> Result<usize, ZoneReportError> {
    if report.len() < REPORT_HEADER {
        return Err(ZoneReportError::Short);
    }
    let count = le64(report, 0).ok_or(ZoneReportError::Short)?;
    let room = (report.len() - REPORT_HEADER) / ZONE_DESCRIPTOR;
    if count > room as u64 || count > zoned.zones {
        return Err(ZoneReportError::Count(count));
    }
    let mut prev: Option<u64> = None;
    for i in 0..count as usize {
        let at = REPORT_HEADER + i * ZONE_DESCRIPTOR;
        let Some(d) = report.get(at..at + ZONE_DESCRIPTOR) else {
            return Err(ZoneReportError::Count(count));
        };
        let zone_type = d[0] & 0xF;
        if zone_type != ZONE_TYPE_SEQ_WRITE {
            return Err(ZoneReportError::Type(zone_type));
        }
        let state = ZoneState::from_code(d[1] >> 4).ok_or(ZoneReportError::State(d[1] >> 4))?;
        let capacity = le64(d, 8).ok_or(ZoneReportError::Short)?;
        let start = le64(d, 16).ok_or(ZoneReportError::Short)?;
        let wp = le64(d, 24).ok_or(ZoneReportError::Short)?;
        if !zoned.is_zone_start(start)
            || prev.is_some_and(|p| start <= p)
            || start < from - from % zoned.zone_size
        {
            return Err(ZoneReportError::Start(start));
        }
        prev = Some(start);
        if capacity == 0 || capacity > zoned.zone_size {
            return Err(ZoneReportError::Capacity(capacity));
        }
        let write_pointer = if state.has_write_pointer() {
            let ok = match state {
                ZoneState::Empty => wp == start,
                _ => wp >= start && wp - start <= capacity,
            };
            if !ok {
                return Err(ZoneReportError::WritePointer(wp));
            }
            Some(wp)
        } else {
            None
        };
        if let Some(slot) = out.get_mut(i) {
            *slot = ZoneDescriptor {
                state,
                zone_type,
                start,
                write_pointer,
                capacity,
                attributes: d[2],
            };
        }
    }
    Ok(count as usize)
}

/// A Zone Management Send action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZoneAction {
    /// Close an open zone (it stays active).
    Close,
    /// Finish a zone: it becomes full, whatever its write pointer.
    Finish,
    /// Open a zone explicitly.
    Open,
    /// Reset a zone: empty, write pointer at its start, its data gone.
    Reset,
    /// Take a zone offline.
    Offline,
}

impl ZoneAction {
    /// The ZSA code (CDW13 7:0).
    pub fn code(self) -> u8 {
        match self {
            ZoneAction::Close => 1,
            ZoneAction::Finish => 2,
            ZoneAction::Open => 3,
            ZoneAction::Reset => 4,
            ZoneAction::Offline => 5,
        }
    }
}

/// An operation of the zoned command set, for
/// [`IoQueuePair::submit_zone`](crate::IoQueuePair::submit_zone). Each is one device command
/// (never split) and completes through `poll` like any other tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZoneOp {
    /// Zone Append: write `blocks` blocks from `buf` at the write pointer of the zone starting
    /// at `zone`. The LBA the device wrote them at comes back with the tag
    /// ([`IoQueuePair::pop_appended`](crate::IoQueuePair::pop_appended)), checked to lie in
    /// that zone with room for the blocks.
    Append {
        /// Namespace.
        ns: NsId,
        /// The zone's first LBA (ZSLBA).
        zone: u64,
        /// Blocks (at most the zone size and the append limit).
        blocks: u32,
        /// The data (`blocks * block_size` bytes).
        buf: BufRef,
    },
    /// Zone Management Send: `action` on the zone starting at `zone`, or on every zone the
    /// action applies to (Select All; `zone` is then ignored).
    Manage {
        /// Namespace.
        ns: NsId,
        /// The zone's first LBA (ZSLBA).
        zone: u64,
        /// What to do.
        action: ZoneAction,
        /// Select All.
        all: bool,
    },
    /// Zone Management Receive: a partial report of the zones from the one holding `from`,
    /// into `buf` (a multiple of 4 bytes, at least header + one descriptor); parse it with
    /// [`parse_zone_report`] once the tag completes.
    Report {
        /// Namespace.
        ns: NsId,
        /// The first LBA to report from.
        from: u64,
        /// Where the report goes.
        buf: BufRef,
    },
}

impl ZoneOp {
    /// The namespace the operation addresses.
    pub fn ns(&self) -> NsId {
        match *self {
            ZoneOp::Append { ns, .. } | ZoneOp::Manage { ns, .. } | ZoneOp::Report { ns, .. } => ns,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    fn zoned() -> Zoned {
        Zoned {
            zone_size: 1024,
            zones: 8,
            max_active: Some(4),
            max_open: Some(4),
            append_limit: 128 * 1024,
        }
    }

    fn desc(zs: u8, start: u64, wp: u64, cap: u64) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0] = 2;
        d[1] = zs << 4;
        d[8..16].copy_from_slice(&cap.to_le_bytes());
        d[16..24].copy_from_slice(&start.to_le_bytes());
        d[24..32].copy_from_slice(&wp.to_le_bytes());
        d
    }

    fn report(count: u64, descs: &[[u8; 64]]) -> Vec<u8> {
        let mut r = vec![0u8; 64];
        r[..8].copy_from_slice(&count.to_le_bytes());
        for d in descs {
            r.extend_from_slice(d);
        }
        r
    }

    #[test]
    fn good_report_parsed() {
        let r = report(
            3,
            &[
                desc(1, 0, 0, 1024),
                desc(2, 1024, 1030, 1000),
                desc(0xE, 2048, 0xdead, 1024),
            ],
        );
        let mut out = [ZoneDescriptor::default(); 4];
        assert_eq!(parse_zone_report(&r, &zoned(), 0, &mut out), Ok(3));
        assert_eq!(out[0].state, ZoneState::Empty);
        assert_eq!(out[0].write_pointer, Some(0));
        assert_eq!(
            (
                out[1].state,
                out[1].start,
                out[1].write_pointer,
                out[1].capacity
            ),
            (ZoneState::ImplicitlyOpened, 1024, Some(1030), 1000)
        );
        assert_eq!(
            (out[2].state, out[2].write_pointer),
            (ZoneState::Full, None)
        );
        // Fewer slots than descriptors: all are checked, the first ones kept.
        let mut one = [ZoneDescriptor::default(); 1];
        assert_eq!(parse_zone_report(&r, &zoned(), 0, &mut one), Ok(3));
        assert_eq!(one[0].start, 0);
    }

    /// A forged report is refused with the reason, and never read past its buffer.
    #[test]
    fn forged_reports_refused() {
        let z = zoned();
        let mut out = [ZoneDescriptor::default(); 8];
        let p = |r: &[u8]| parse_zone_report(r, &z, 0, &mut [ZoneDescriptor::default(); 8]);
        use ZoneReportError::*;
        assert_eq!(p(&[0u8; 10]), Err(Short));
        // More descriptors than the buffer holds (a buffer of 2), or than the namespace has.
        let two = report(3, &[desc(1, 0, 0, 1024), desc(1, 1024, 1024, 1024)]);
        assert_eq!(p(&two), Err(Count(3)));
        assert_eq!(p(&report(u64::MAX, &[])), Err(Count(u64::MAX)));
        let nine: Vec<[u8; 64]> = (0..9).map(|i| desc(1, i * 1024, i * 1024, 1024)).collect();
        assert_eq!(p(&report(9, &nine)), Err(Count(9)));
        assert_eq!(p(&report(1, &[desc(7, 0, 0, 1024)])), Err(State(7)));
        let mut conv = desc(1, 0, 0, 1024);
        conv[0] = 1;
        assert_eq!(p(&report(1, &[conv])), Err(Type(1)));
        assert_eq!(p(&report(1, &[desc(1, 5, 5, 1024)])), Err(Start(5)));
        assert_eq!(
            p(&report(1, &[desc(1, 8 * 1024, 8 * 1024, 1024)])),
            Err(Start(8 * 1024))
        );
        assert_eq!(
            p(&report(
                2,
                &[desc(1, 1024, 1024, 1024), desc(1, 0, 0, 1024)]
            )),
            Err(Start(0))
        );
        assert_eq!(
            parse_zone_report(&report(1, &[desc(1, 0, 0, 1024)]), &z, 2048, &mut out),
            Err(Start(0))
        );
        assert_eq!(p(&report(1, &[desc(1, 0, 0, 0)])), Err(Capacity(0)));
        assert_eq!(p(&report(1, &[desc(1, 0, 0, 1025)])), Err(Capacity(1025)));
        assert_eq!(p(&report(1, &[desc(1, 0, 3, 1024)])), Err(WritePointer(3)));
        assert_eq!(
            p(&report(1, &[desc(2, 1024, 1024 + 1001, 1000)])),
            Err(WritePointer(2025))
        );
        assert_eq!(
            p(&report(1, &[desc(4, 1024, 1000, 1000)])),
            Err(WritePointer(1000))
        );
    }

    #[test]
    fn zoned_identify_checked() {
        let mut id = vec![0u8; 4096];
        id[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        id[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        id[2816 + 16..2816 + 24].copy_from_slice(&2048u64.to_le_bytes());
        let z = parse_zoned(8192, 1, &id, 65536).unwrap();
        assert_eq!(
            (z.zone_size, z.zones, z.max_active, z.max_open),
            (2048, 4, None, None)
        );
        id[4..8].copy_from_slice(&3u32.to_le_bytes());
        id[8..12].copy_from_slice(&1u32.to_le_bytes());
        let z = parse_zoned(8192, 1, &id, 65536).unwrap();
        assert_eq!((z.max_active, z.max_open), (Some(4), Some(2)));
        assert_eq!(parse_zoned(8192, 0, &id, 65536), Err(BadIdentify::ZoneSize));
        assert_eq!(parse_zoned(1024, 1, &id, 65536), Err(BadIdentify::ZoneSize));
        assert_eq!(
            parse_zoned(8192, 64, &id, 65536),
            Err(BadIdentify::ZoneSize)
        );
        assert_eq!(
            parse_zoned(8192, usize::MAX, &id, 65536),
            Err(BadIdentify::ZoneSize)
        );
        assert_eq!(
            parse_zoned(8192, 1, &id[..100], 65536),
            Err(BadIdentify::ZoneSize)
        );
        assert_eq!(parse_zoned(8192, 1, &id, 0), Err(BadIdentify::ZoneLimits));
        id[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            parse_zoned(8192, 1, &id, 65536),
            Err(BadIdentify::ZoneLimits)
        );
    }
}
