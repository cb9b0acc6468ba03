//! Log pages (Error Information, SMART / Health Information, Changed Namespace List) and
//! asynchronous events, decoded from the bytes the device wrote.
//!
//! Everything here is parsed with explicit little-endian reads at the spec's offsets, each
//! range-checked against the bytes actually there: a short or absurd page gives a typed
//! [`LogError`] (or drops the absurd entry and counts it), never a panic.

use heapless::Vec;

/// Most NSIDs one Changed Namespace List holds (the page is 1024 entries).
pub const CHANGED_NS_MAX: usize = 1024;
/// Error log entries Keel reads at most (64 bytes each: one 4 KiB page).
pub const ERROR_LOG_MAX: usize = 64;

/// Why a log page could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LogError {
    /// Fewer bytes than the structure needs.
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes there.
        got: usize,
    },
    /// A field outside the values the spec allows (its name).
    Field(&'static str),
}

fn le_u16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}
fn le_u128(b: &[u8], o: usize) -> Option<u128> {
    Some(u128::from_le_bytes(b.get(o..o + 16)?.try_into().ok()?))
}

/// SMART / Health critical warning bits (byte 0 of log page 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CriticalWarning(pub u8);

impl CriticalWarning {
    /// Available spare below its threshold.
    pub const SPARE: u8 = 1 << 0;
    /// A temperature at or past a threshold (over or under).
    pub const TEMPERATURE: u8 = 1 << 1;
    /// NVM subsystem reliability degraded (media or internal errors).
    pub const RELIABILITY: u8 = 1 << 2;
    /// Media placed in read-only mode.
    pub const READ_ONLY: u8 = 1 << 3;
    /// Volatile memory backup device failed.
    pub const VOLATILE_BACKUP: u8 = 1 << 4;
    /// Persistent memory region unreliable.
    pub const PMR: u8 = 1 << 5;
    /// Bits the spec defines.
    pub const DEFINED: u8 = 0x3F;

    /// No warning.
    pub fn none(self) -> bool {
        self.0 == 0
    }
    /// Bit `b` (one of the constants) is set.
    pub fn has(self, b: u8) -> bool {
        self.0 & b != 0
    }
    /// The warnings' names, for a table (`"none"` when clear).
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        const NAMES: [&str; 6] = [
            "spare",
            "temperature",
            "reliability",
            "read-only",
            "volatile backup",
            "pmr",
        ];
        let v = self.0;
        NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| v & (1 << i) != 0)
            .map(|(_, n)| *n)
    }
}

/// The SMART / Health Information log page (LID 2, 512 bytes), controller-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SmartLog {
    /// Critical warnings.
    pub critical_warning: CriticalWarning,
    /// Composite temperature in kelvin (`None`: 0, not reported).
    pub temperature_k: Option<u16>,
    /// Available spare, percent of the original (0..=100).
    pub available_spare: u8,
    /// The spare threshold that raises a warning, percent (0..=100).
    pub spare_threshold: u8,
    /// Estimated life used, percent (may exceed 100, saturating at 255).
    pub percentage_used: u8,
    /// Data read, in thousands of 512-byte units (rounded up).
    pub data_units_read: u128,
    /// Data written, in thousands of 512-byte units (rounded up).
    pub data_units_written: u128,
    /// Read commands completed.
    pub host_read_commands: u128,
    /// Write commands completed.
    pub host_write_commands: u128,
    /// Controller busy time, minutes.
    pub busy_minutes: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Error information log entries over the controller's life.
    pub error_log_entries: u128,
    /// Minutes spent at or above the warning composite temperature.
    pub warning_temp_minutes: u32,
    /// Minutes spent at or above the critical composite temperature.
    pub critical_temp_minutes: u32,
}

impl SmartLog {
    /// The page's size.
    pub const LEN: usize = 512;

    /// Decodes the page. Refuses a short page and percentages the spec bounds (available
    /// spare and its threshold are 0..=100).
    pub fn parse(b: &[u8]) -> Result<Self, LogError> {
        if b.len() < Self::LEN {
            return Err(LogError::Short {
                need: Self::LEN,
                got: b.len(),
            });
        }
        let short = LogError::Short {
            need: Self::LEN,
            got: b.len(),
        };
        let u8_at = |o: usize| b.get(o).copied().ok_or(short);
        let u128_at = |o: usize| le_u128(b, o).ok_or(short);
        let available_spare = u8_at(3)?;
        let spare_threshold = u8_at(4)?;
        if available_spare > 100 {
            return Err(LogError::Field("available spare"));
        }
        if spare_threshold > 100 {
            return Err(LogError::Field("available spare threshold"));
        }
        let temp = le_u16(b, 1).ok_or(short)?;
        Ok(Self {
            critical_warning: CriticalWarning(u8_at(0)?),
            temperature_k: (temp != 0).then_some(temp),
            available_spare,
            spare_threshold,
            percentage_used: u8_at(5)?,
            data_units_read: u128_at(32)?,
            data_units_written: u128_at(48)?,
            host_read_commands: u128_at(64)?,
            host_write_commands: u128_at(80)?,
            busy_minutes: u128_at(96)?,
            power_cycles: u128_at(112)?,
            power_on_hours: u128_at(128)?,
            unsafe_shutdowns: u128_at(144)?,
            media_errors: u128_at(160)?,
            error_log_entries: u128_at(176)?,
            warning_temp_minutes: le_u32(b, 192).ok_or(short)?,
            critical_temp_minutes: le_u32(b, 196).ok_or(short)?,
        })
    }

    /// Composite temperature in whole degrees Celsius (kelvin - 273, rounded down).
    pub fn temperature_c(&self) -> Option<i32> {
        self.temperature_k.map(|k| k as i32 - 273)
    }
}

/// One Error Information log entry (64 bytes), for an entry that holds an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ErrorLogEntry {
    /// The error's number (unique, increasing; 0 marks an empty entry, never returned).
    pub error_count: u64,
    /// Submission queue of the command (0xFFFF: not command-specific).
    pub sqid: u16,
    /// Command ID (0xFFFF: not command-specific).
    pub cid: u16,
    /// The status field the command completed with (phase bit dropped).
    pub status: u16,
    /// Byte and bit of the command parameter in error (0xFFFF: none).
    pub param_location: u16,
    /// First LBA that failed, if the error names one.
    pub lba: u64,
    /// Namespace (0 or 0xFFFF_FFFF: none).
    pub nsid: u32,
    /// Vendor-specific log page with more information (0: none).
    pub vendor_log: u8,
    /// Command-specific information.
    pub command_info: u64,
}

impl ErrorLogEntry {
    /// The size of one entry.
    pub const LEN: usize = 64;

    /// Decodes one entry; `Ok(None)` for an empty one (error count 0).
    pub fn parse(b: &[u8]) -> Result<Option<Self>, LogError> {
        let short = LogError::Short {
            need: Self::LEN,
            got: b.len(),
        };
        if b.len() < Self::LEN {
            return Err(short);
        }
        let error_count = le_u64(b, 0).ok_or(short)?;
        if error_count == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            error_count,
            sqid: le_u16(b, 8).ok_or(short)?,
            cid: le_u16(b, 10).ok_or(short)?,
            status: le_u16(b, 12).ok_or(short)? & !1,
            param_location: le_u16(b, 14).ok_or(short)?,
            lba: le_u64(b, 16).ok_or(short)?,
            nsid: le_u32(b, 24).ok_or(short)?,
            vendor_log: b.get(28).copied().ok_or(short)?,
            command_info: le_u64(b, 32).ok_or(short)?,
        }))
    }

    /// The status as the block layer keeps it.
    pub fn dev_status(&self) -> keel_blockdev::DevStatus {
        keel_blockdev::DevStatus::from_field(self.status)
    }
}

/// The entries of an Error Information page that hold errors, newest (highest count) first.
/// Entries past `out`'s capacity are left out; the count of empty entries is not kept.
pub fn parse_error_log<const N: usize>(
    b: &[u8],
    out: &mut Vec<ErrorLogEntry, N>,
) -> Result<(), LogError> {
    out.clear();
    for chunk in b.chunks_exact(ErrorLogEntry::LEN) {
        if let Some(e) = ErrorLogEntry::parse(chunk)? {
            if out.push(e).is_err() {
                break;
            }
        }
    }
    out.sort_unstable_by_key(|e| core::cmp::Reverse(e.error_count));
    Ok(())
}

/// The Changed Namespace List (LID 4), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedNamespaces {
    /// The NSIDs that changed, increasing, each 1..=NN.
    pub nsids: Vec<u32, CHANGED_NS_MAX>,
    /// More than 1024 namespaces changed (first entry 0xFFFF_FFFF): rescan them all.
    pub all: bool,
    /// Entries dropped as absurd (0 inside the list is its end; above NN, repeated or out of
    /// order are dropped).
    pub dropped: u32,
}

impl ChangedNamespaces {
    /// The page's size.
    pub const LEN: usize = 4096;

    /// Decodes the list against `nn` (Identify Controller NN).
    pub fn parse(b: &[u8], nn: u32) -> Result<Self, LogError> {
        if b.len() < Self::LEN {
            return Err(LogError::Short {
                need: Self::LEN,
                got: b.len(),
            });
        }
        let mut out = Self {
            nsids: Vec::new(),
            all: false,
            dropped: 0,
        };
        let mut prev = 0u32;
        for i in 0..CHANGED_NS_MAX {
            let Some(id) = le_u32(b, i * 4) else { break };
            if id == 0 {
                break;
            }
            if i == 0 && id == u32::MAX {
                out.all = true;
                break;
            }
            if id > nn || id <= prev {
                out.dropped += 1;
                continue;
            }
            prev = id;
            if out.nsids.push(id).is_err() {
                out.dropped += 1;
            }
        }
        Ok(out)
    }
}

/// Asynchronous event types (completion DW0 bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EventType {
    /// Error status (info: invalid doorbell, persistent internal error, ...).
    Error,
    /// SMART / health status (info: reliability, temperature, spare).
    Health,
    /// Notice (info 0: namespace attribute changed; 1 firmware activation; ...).
    Notice,
    /// I/O command set specific.
    CommandSet,
    /// Vendor specific.
    Vendor,
    /// A type the spec reserves (its value).
    Reserved(u8),
}

/// An Asynchronous Event Request completion's DW0, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AerResult {
    /// Event type.
    pub kind: EventType,
    /// Event information (meaning per type).
    pub info: u8,
    /// The log page to read to clear the event.
    pub log_page: u8,
}

impl AerResult {
    /// Notice information: namespace attribute changed.
    pub const NOTICE_NS_CHANGED: u8 = 0x00;
    /// Health information: NVM subsystem reliability.
    pub const HEALTH_RELIABILITY: u8 = 0x00;
    /// Health information: temperature threshold.
    pub const HEALTH_TEMPERATURE: u8 = 0x01;
    /// Health information: spare below threshold.
    pub const HEALTH_SPARE: u8 = 0x02;

    /// Decodes DW0.
    pub fn from_dw0(dw0: u32) -> Self {
        let kind = match (dw0 & 0x7) as u8 {
            0 => EventType::Error,
            1 => EventType::Health,
            2 => EventType::Notice,
            6 => EventType::CommandSet,
            7 => EventType::Vendor,
            t => EventType::Reserved(t),
        };
        Self {
            kind,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smart_page() -> [u8; 512] {
        let mut p = [0u8; 512];
        p[0] = CriticalWarning::TEMPERATURE;
        p[1..3].copy_from_slice(&323u16.to_le_bytes());
        p[3] = 100;
        p[4] = 10;
        p[5] = 3;
        p[32..48].copy_from_slice(&7u128.to_le_bytes());
        p[48..64].copy_from_slice(&((1u128 << 64) + 5).to_le_bytes());
        p[80..96].copy_from_slice(&42u128.to_le_bytes());
        p[160..176].copy_from_slice(&2u128.to_le_bytes());
        p
    }

    #[test]
    fn smart_fields_at_their_offsets() {
        let s = SmartLog::parse(&smart_page()).unwrap();
        assert!(s.critical_warning.has(CriticalWarning::TEMPERATURE));
        assert_eq!(
            s.critical_warning.names().collect::<Vec<_, 6>>().as_slice(),
            &["temperature"]
        );
        assert_eq!(s.temperature_k, Some(323));
        assert_eq!(s.temperature_c(), Some(50));
        assert_eq!((s.available_spare, s.spare_threshold), (100, 10));
        assert_eq!(s.percentage_used, 3);
        assert_eq!(s.data_units_read, 7);
        assert_eq!(s.data_units_written, (1u128 << 64) + 5);
        assert_eq!(s.host_write_commands, 42);
        assert_eq!(s.media_errors, 2);
    }

    #[test]
    fn smart_absurd_or_short_refused() {
        let mut p = smart_page();
        p[3] = 101;
        assert_eq!(SmartLog::parse(&p), Err(LogError::Field("available spare")));
        let p = smart_page();
        assert_eq!(
            SmartLog::parse(&p[..511]),
            Err(LogError::Short {
                need: 512,
                got: 511
            })
        );
        let mut p = smart_page();
        p[1..3].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(SmartLog::parse(&p).unwrap().temperature_k, None);
    }

    #[test]
    fn error_log_entries_newest_first_empty_skipped() {
        let mut page = [0u8; 256];
        let mut put = |slot: usize, count: u64, cid: u16, status: u16| {
            let e = &mut page[slot * 64..slot * 64 + 64];
            e[0..8].copy_from_slice(&count.to_le_bytes());
            e[8..10].copy_from_slice(&1u16.to_le_bytes());
            e[10..12].copy_from_slice(&cid.to_le_bytes());
            e[12..14].copy_from_slice(&status.to_le_bytes());
            e[16..24].copy_from_slice(&77u64.to_le_bytes());
            e[24..28].copy_from_slice(&1u32.to_le_bytes());
        };
        put(0, 3, 9, 0x0281 << 1 | 1);
        put(2, 5, 10, 0x0002 << 1);
        let mut out: Vec<ErrorLogEntry, 8> = Vec::new();
        parse_error_log(&page, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].error_count, out[0].cid), (5, 10));
        assert_eq!((out[1].error_count, out[1].cid), (3, 9));
        assert_eq!(out[1].status & 1, 0, "phase bit dropped");
        assert_eq!(out[1].lba, 77);
        assert_eq!(
            ErrorLogEntry::parse(&page[..63]),
            Err(LogError::Short { need: 64, got: 63 })
        );
    }

    #[test]
    fn changed_ns_list_checked() {
        let mut p = [0u8; 4096];
        for (i, id) in [1u32, 3, 3, 2, 9, 4].iter().enumerate() {
            p[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
        }
        let c = ChangedNamespaces::parse(&p, 8).unwrap();
        assert_eq!(c.nsids.as_slice(), &[1, 3, 4]);
        assert_eq!(c.dropped, 3, "repeat, out of order, above NN");
        assert!(!c.all);
        let mut p = [0u8; 4096];
        p[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let c = ChangedNamespaces::parse(&p, 8).unwrap();
        assert!(c.all && c.nsids.is_empty());
        assert!(ChangedNamespaces::parse(&p[..100], 8).is_err());
    }

    #[test]
    fn aer_dw0_decoded() {
        let r = AerResult::from_dw0(0x0002_0101);
        assert_eq!(r.kind, EventType::Health);
        assert_eq!(r.info, AerResult::HEALTH_TEMPERATURE);
        assert_eq!(r.log_page, 2);
        let r = AerResult::from_dw0(0x0004_0002);
        assert_eq!((r.kind, r.info, r.log_page), (EventType::Notice, 0, 4));
        assert_eq!(AerResult::from_dw0(3).kind, EventType::Reserved(3));
    }
}
