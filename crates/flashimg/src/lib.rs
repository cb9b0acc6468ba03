//! Keel's flash image: what `cargo xtask flash` writes and what the firmware checks when a machine
//! boots it as its own firmware (QEMU `-bios` or pflash: the image ends at 4 GiB).
//!
//! Layout (all integers little-endian; offsets from the start of the image):
//!
//! | offset                  | size            | content                                        |
//! |-------------------------|-----------------|------------------------------------------------|
//! | 0                       | [`HEADER_LEN`]  | [`Header`]                                     |
//! | [`CONFIG_OFFSET`]       | [`CONFIG_LEN`]  | the job line, NUL-terminated, NUL-padded        |
//! | [`SEGTAB_OFFSET`]       | 16 per segment  | [`Segment`] table: where each PT_LOAD goes      |
//! | after the table         | ...             | segment bytes (16-aligned), then 0xFF filler    |
//! | `len - STUB_LEN`        | [`STUB_LEN`]    | the reset stub; the reset vector is at `len-16` |
//!
//! The CRC32C (iSCSI polynomial) covers the whole image, header included, with the header's own
//! CRC field read as zero: config, table, segments, filler and stub. The image length is a multiple of [`BLOCK`] (QEMU wants 64 KiB multiples).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

use core::fmt;

/// The first eight bytes of every image.
pub const MAGIC: [u8; 8] = *b"KEELFLSH";
/// The layout version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of header at the start of the image.
pub const HEADER_LEN: usize = 64;
/// Where the config area (the job line) starts.
pub const CONFIG_OFFSET: usize = HEADER_LEN;
/// Capacity of the config area, including the terminating NUL.
pub const CONFIG_LEN: usize = 512;
/// Where the segment table starts.
pub const SEGTAB_OFFSET: usize = CONFIG_OFFSET + CONFIG_LEN;
/// Bytes per segment table entry.
pub const SEGMENT_ENTRY_LEN: usize = 16;
/// Most PT_LOAD segments an image carries.
pub const MAX_SEGMENTS: usize = 16;
/// The reset stub occupies the last 4 KiB, i.e. 0xFFFF_F000..4 GiB once mapped.
pub const STUB_LEN: usize = 4096;
/// Physical address of the stub when the image is mapped ending at 4 GiB.
pub const STUB_PADDR: u64 = (1 << 32) - STUB_LEN as u64;
/// Image sizes are multiples of this.
pub const BLOCK: usize = 64 * 1024;
/// Largest image accepted (QEMU maps at most a few MiB of -bios below 4 GiB comfortably).
pub const MAX_IMAGE_LEN: usize = 8 << 20;

/// CRC32C (Castagnoli, as used by iSCSI), slice-by-16: the boot-time check runs over the whole
/// image under TCG, where the byte-at-a-time table took ~5 ms of the flash boot (16 KiB of
/// tables instead of 1 KiB).
pub static CRC32C: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// CRC32C of the whole image with the header's CRC field taken as zero.
pub fn image_crc(image: &[u8]) -> u32 {
    let mut d = CRC32C.digest();
    if image.len() < H_CRC + 4 {
        d.update(image);
    } else {
        d.update(&image[..H_CRC]);
        d.update(&[0; 4]);
        d.update(&image[H_CRC + 4..]);
    }
    d.finalize()
}

/// A 64-bit build id: CRC-64/XZ of the firmware ELF.
pub fn build_id(elf: &[u8]) -> u64 {
    crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(elf)
}

/// Physical address the image starts at when it ends at 4 GiB.
pub fn base_paddr(image_len: usize) -> u64 {
    (1u64 << 32) - image_len as u64
}

/// The image header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Whole image length in bytes.
    pub image_len: u32,
    /// [`image_crc`]: CRC32C of the image with this field read as zero.
    pub crc: u32,
    /// [`build_id`] of the ELF the image was built from.
    pub build_id: u64,
    /// Entries in the segment table.
    pub seg_count: u32,
    /// 32-bit entry the stub jumps to (informational: the stub has it built in).
    pub entry: u32,
}

/// Why an image is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Fewer bytes than a header.
    TooShort(usize),
    /// Not a Keel image at all.
    BadMagic,
    /// A format version this crate does not read.
    UnsupportedVersion(u32),
    /// The header's length field disagrees with the image's size.
    LengthMismatch {
        /// What the header says.
        header: u32,
        /// The image's size.
        actual: usize,
    },
    /// Length not a multiple of [`BLOCK`], too large, or too small for its tables.
    BadLength(usize),
    /// More segments than [`MAX_SEGMENTS`].
    TooManySegments(u32),
    /// A segment table entry points outside the image.
    BadSegment(u32),
    /// The payload's CRC32C differs from the header's.
    CrcMismatch {
        /// The header's CRC.
        expected: u32,
        /// The image's.
        actual: u32,
    },
    /// The config area has no NUL terminator or is not UTF-8.
    BadConfig,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "{n} bytes is too short for a Keel image header"),
            Self::BadMagic => write!(f, "not a Keel flash image (bad magic)"),
            Self::UnsupportedVersion(v) => {
                write!(f, "format version {v} (this build reads {FORMAT_VERSION})")
            }
            Self::LengthMismatch { header, actual } => {
                write!(f, "header says {header} bytes, image has {actual}")
            }
            Self::BadLength(n) => write!(
                f,
                "length {n} is not a multiple of {BLOCK} between {BLOCK} and {MAX_IMAGE_LEN}"
            ),
            Self::TooManySegments(n) => write!(f, "{n} segments (at most {MAX_SEGMENTS})"),
            Self::BadSegment(i) => write!(f, "segment {i} lies outside the image"),
            Self::CrcMismatch { expected, actual } => write!(
                f,
                "image CRC mismatch: header {expected:#010x}, computed {actual:#010x}"
            ),
            Self::BadConfig => write!(f, "config area is not a NUL-terminated UTF-8 line"),
        }
    }
}

impl core::error::Error for ImageError {}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

// Header field offsets.
const H_VERSION: usize = 8;
const H_HEADER_LEN: usize = 12;
const H_IMAGE_LEN: usize = 16;
/// Offset of the header's CRC field.
pub const H_CRC: usize = 20;
const H_BUILD_ID: usize = 24;
/// Read by the reset stub: offset of the config area.
pub const H_CONFIG_OFFSET: usize = 32;
const H_CONFIG_LEN: usize = 36;
/// Read by the reset stub: offset of the segment table.
pub const H_SEGTAB_OFFSET: usize = 40;
/// Read by the reset stub: number of segments.
pub const H_SEG_COUNT: usize = 44;
const H_ENTRY: usize = 48;

impl Header {
    /// Checks the magic and version and decodes the fields; nothing else.
    pub fn parse(image: &[u8]) -> Result<Self, ImageError> {
        if image.len() < HEADER_LEN {
            return Err(ImageError::TooShort(image.len()));
        }
        if image[..8] != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let version = u32_at(image, H_VERSION);
        if version != FORMAT_VERSION {
            return Err(ImageError::UnsupportedVersion(version));
        }
        Ok(Self {
            version,
            image_len: u32_at(image, H_IMAGE_LEN),
            crc: u32_at(image, H_CRC),
            build_id: u64_at(image, H_BUILD_ID),
            seg_count: u32_at(image, H_SEG_COUNT),
            entry: u32_at(image, H_ENTRY),
        })
    }

    /// Encodes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out.fill(0);
        out[..8].copy_from_slice(&MAGIC);
        let mut put = |off: usize, v: u32| out[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(H_VERSION, self.version);
        put(H_HEADER_LEN, HEADER_LEN as u32);
        put(H_IMAGE_LEN, self.image_len);
        put(H_CRC, self.crc);
        put(H_CONFIG_OFFSET, CONFIG_OFFSET as u32);
        put(H_CONFIG_LEN, CONFIG_LEN as u32);
        put(H_SEGTAB_OFFSET, SEGTAB_OFFSET as u32);
        put(H_SEG_COUNT, self.seg_count);
        put(H_ENTRY, self.entry);
        out[H_BUILD_ID..H_BUILD_ID + 8].copy_from_slice(&self.build_id.to_le_bytes());
    }
}

/// One PT_LOAD segment: `filesz` bytes at image offset `offset` go to `paddr`; the rest up to
/// `memsz` is zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address.
    pub paddr: u32,
    /// Offset of its bytes in the image.
    pub offset: u32,
    /// Bytes stored.
    pub filesz: u32,
    /// Bytes in memory (the rest zeroed).
    pub memsz: u32,
}

impl Segment {
    /// Encodes the entry into `out` (at least [`SEGMENT_ENTRY_LEN`] bytes).
    pub fn write(&self, out: &mut [u8]) {
        for (i, v) in [self.paddr, self.offset, self.filesz, self.memsz]
            .into_iter()
            .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    fn read(b: &[u8]) -> Self {
        Self {
            paddr: u32_at(b, 0),
            offset: u32_at(b, 4),
            filesz: u32_at(b, 8),
            memsz: u32_at(b, 12),
        }
    }
}

/// The segment table of a structurally valid image.
pub fn segments<'a>(image: &'a [u8], h: &Header) -> impl Iterator<Item = Segment> + 'a {
    let count = h.seg_count as usize;
    (0..count).map(move |i| {
        let off = SEGTAB_OFFSET + i * SEGMENT_ENTRY_LEN;
        Segment::read(&image[off..off + SEGMENT_ENTRY_LEN])
    })
}

/// Checks everything about an image: header, length, segment table, config area and CRC.
pub fn verify(image: &[u8]) -> Result<Header, ImageError> {
    let h = Header::parse(image)?;
    if h.image_len as usize != image.len() {
        return Err(ImageError::LengthMismatch {
            header: h.image_len,
            actual: image.len(),
        });
    }
    if !image.len().is_multiple_of(BLOCK) || image.len() > MAX_IMAGE_LEN || image.len() < BLOCK {
        return Err(ImageError::BadLength(image.len()));
    }
    if h.seg_count as usize > MAX_SEGMENTS {
        return Err(ImageError::TooManySegments(h.seg_count));
    }
    for (i, s) in segments(image, &h).enumerate() {
        let end = s.offset as u64 + s.filesz as u64;
        if end > (image.len() - STUB_LEN) as u64 || s.memsz < s.filesz {
            return Err(ImageError::BadSegment(i as u32));
        }
    }
    let actual = image_crc(image);
    if actual != h.crc {
        return Err(ImageError::CrcMismatch {
            expected: h.crc,
            actual,
        });
    }
    config(image)?;
    Ok(h)
}

/// The job line stored in the config area.
pub fn config(image: &[u8]) -> Result<&str, ImageError> {
    let area = image
        .get(CONFIG_OFFSET..CONFIG_OFFSET + CONFIG_LEN)
        .ok_or(ImageError::BadConfig)?;
    let n = area
        .iter()
        .position(|&b| b == 0)
        .ok_or(ImageError::BadConfig)?;
    core::str::from_utf8(&area[..n]).map_err(|_| ImageError::BadConfig)
}

/// Writes `line` into the config area; `None` if it does not fit with its NUL or contains NUL.
pub fn set_config(image: &mut [u8], line: &str) -> Option<()> {
    if line.len() >= CONFIG_LEN || line.as_bytes().contains(&0) {
        return None;
    }
    let area = image.get_mut(CONFIG_OFFSET..CONFIG_OFFSET + CONFIG_LEN)?;
    area.fill(0);
    area[..line.len()].copy_from_slice(line.as_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn sample() -> std::vec::Vec<u8> {
        let mut img = vec![0xFFu8; BLOCK];
        set_config(&mut img, "boot wait_ms=10").unwrap();
        let seg = Segment {
            paddr: 0x10_0000,
            offset: 0x400,
            filesz: 16,
            memsz: 32,
        };
        seg.write(&mut img[SEGTAB_OFFSET..]);
        let mut h = Header {
            version: FORMAT_VERSION,
            image_len: BLOCK as u32,
            crc: 0,
            build_id: 42,
            seg_count: 1,
            entry: 0x10_1000,
        };
        h.write(&mut img);
        h.crc = image_crc(&img);
        h.write(&mut img);
        img
    }

    #[test]
    fn round_trip() {
        let img = sample();
        let h = verify(&img).unwrap();
        assert_eq!(h.build_id, 42);
        assert_eq!(config(&img).unwrap(), "boot wait_ms=10");
        assert_eq!(segments(&img, &h).count(), 1);
    }

    #[test]
    fn every_flipped_payload_byte_is_caught() {
        let img = sample();
        for i in (0..HEADER_LEN).chain((HEADER_LEN..img.len()).step_by(97)) {
            let mut bad = img.clone();
            bad[i] ^= 0x01;
            assert!(verify(&bad).is_err(), "flip at {i} not caught");
        }
    }

    #[test]
    fn rejects() {
        assert_eq!(verify(&[0u8; 10]), Err(ImageError::TooShort(10)));
        assert_eq!(verify(&[0u8; 100]), Err(ImageError::BadMagic));
        let mut img = sample();
        img.truncate(BLOCK - 1);
        assert!(matches!(
            verify(&img),
            Err(ImageError::LengthMismatch { .. })
        ));
        let mut img = sample();
        img[H_VERSION] = 9;
        assert_eq!(verify(&img), Err(ImageError::UnsupportedVersion(9)));
        let mut img = sample();
        img[100] ^= 0x80;
        assert!(matches!(verify(&img), Err(ImageError::CrcMismatch { .. })));
        let mut img = sample();
        assert!(set_config(&mut img, &"x".repeat(CONFIG_LEN)).is_none());
    }
}
