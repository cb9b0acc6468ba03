//! End-to-end protection information computed by the host: what a caller puts in a block's
//! metadata when it hands the driver a metadata buffer
//! ([`IoQueuePair::submit_with_metadata`](crate::IoQueuePair::submit_with_metadata)) on a
//! namespace with protection, and checks on the way back. One API for both guard sizes,
//! chosen by [`Namespace::pi_guard64`]:
//!
//! - 16-bit guard (T10 DIF), an 8-byte tuple, big-endian: guard (CRC-16/T10-DIF), application
//!   tag (16 bits), reference tag (32 bits: the LBA's low 32 bits for types 1 and 2).
//! - 64-bit guard (NVMe NVM command set, PIF 2, no storage tag), a 16-byte tuple, big-endian:
//!   guard (CRC-64/NVME), application tag (16 bits), reference tag (48 bits: the LBA's low 48
//!   bits for types 1 and 2).
//!
//! The guard covers the block's data and then the metadata bytes before the tuple, where the
//! tuple is the last bytes of a larger metadata area, as one CRC. The reference tag is checked
//! for types 1 and 2 only (type 3 carries any value). The tuple sits at
//! [`Namespace::pi_offset`] in the block's metadata.

use crate::ctrl::{Namespace, PiType};

const T10DIF: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF);
/// CRC-64/NVME (the catalogue's, as in crc-catalog 2.5: reflected polynomial
/// 0x9A6C9329AC4BC9B5, initial value and final XOR all ones).
const NVME64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_NVME);

/// A tuple's shape: its size, and the guard's (the application tag follows the guard, the
/// reference tag fills the rest).
#[derive(Clone, Copy)]
struct Shape {
    size: usize,
    guard: usize,
}

impl Shape {
    fn of(ns: &Namespace) -> Self {
        if ns.pi_guard64 {
            Shape { size: 16, guard: 8 }
        } else {
            Shape { size: 8, guard: 2 }
        }
    }

    /// The reference tag's bytes within the tuple.
    fn reftag(self) -> core::ops::Range<usize> {
        self.guard + 2..self.size
    }
}

/// The tuple a block at `lba` should carry (the first `shape.size` bytes are used): guard,
/// application tag, reference tag (the LBA's low 32 or 48 bits), big-endian.
fn tuple(shape: Shape, block: &[u8], meta_before: &[u8], app_tag: u16, lba: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    let g = shape.guard;
    if g == 8 {
        let mut d = NVME64.digest();
        d.update(block);
        d.update(meta_before);
        t[..8].copy_from_slice(&d.finalize().to_be_bytes());
    } else {
        let mut d = T10DIF.digest();
        d.update(block);
        d.update(meta_before);
        t[..2].copy_from_slice(&d.finalize().to_be_bytes());
    }
    t[g..g + 2].copy_from_slice(&app_tag.to_be_bytes());
    // The reference tag: the LBA's low 32 (8-byte tuple) or 48 (16-byte tuple) bits, the
    // low bytes of its big-endian form.
    let r = shape.reftag();
    t[r.clone()].copy_from_slice(&lba.to_be_bytes()[8 - r.len()..]);
    t
}

/// A protection check that failed on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PiError {
    /// The namespace has no protection information.
    NoProtection,
    /// The data or metadata buffer is shorter than `blocks` blocks (or the tuple does not fit
    /// in a block's metadata).
    Length,
    /// Block `block`'s guard does not match its data.
    Guard {
        /// The block (0 = the first of the operation).
        block: u32,
    },
    /// Block `block`'s application tag is not the one expected.
    AppTag {
        /// The block.
        block: u32,
    },
    /// Block `block`'s reference tag is not its LBA's (types 1 and 2).
    RefTag {
        /// The block.
        block: u32,
    },
}

fn layout(ns: &Namespace, blocks: u32, data: usize, meta: usize) -> Result<PiType, PiError> {
    let pi = ns.pi.ok_or(PiError::NoProtection)?;
    let n = blocks as usize;
    let need_meta = n * ns.metadata as usize;
    if data < n * ns.block_size as usize
        || meta < need_meta
        || ns.pi_offset as usize + Shape::of(ns).size > ns.metadata as usize
    {
        return Err(PiError::Length);
    }
    Ok(pi)
}

/// Writes each block's protection tuple into `meta` for `data` (`blocks` blocks from `lba`):
/// 8 bytes with a 16-bit guard, 16 with a 64-bit guard ([`Namespace::pi_guard64`]).
///
/// # Errors
/// [`PiError::NoProtection`], [`PiError::Length`].
pub fn generate(
    ns: &Namespace,
    lba: u64,
    blocks: u32,
    app_tag: u16,
    data: &[u8],
    meta: &mut [u8],
) -> Result<(), PiError> {
    layout(ns, blocks, data.len(), meta.len())?;
    let shape = Shape::of(ns);
    let (bs, ms, at) = (
        ns.block_size as usize,
        ns.metadata as usize,
        ns.pi_offset as usize,
    );
    for (b, (block, m)) in data
        .chunks_exact(bs)
        .zip(meta.chunks_exact_mut(ms))
        .take(blocks as usize)
        .enumerate()
    {
        let t = tuple(shape, block, &m[..at], app_tag, lba + b as u64);
        m[at..at + shape.size].copy_from_slice(&t[..shape.size]);
    }
    Ok(())
}

/// Checks each block's protection tuple in `meta` against `data`, `app_tag` and the LBAs
/// (the reference tag for types 1 and 2 only).
///
/// # Errors
/// The first failing block, as [`PiError::Guard`], [`PiError::AppTag`] or [`PiError::RefTag`];
/// [`PiError::NoProtection`], [`PiError::Length`].
pub fn verify(
    ns: &Namespace,
    lba: u64,
    blocks: u32,
    app_tag: u16,
    data: &[u8],
    meta: &[u8],
) -> Result<(), PiError> {
    let pi = layout(ns, blocks, data.len(), meta.len())?;
    let shape = Shape::of(ns);
    let (bs, ms, at, g) = (
        ns.block_size as usize,
        ns.metadata as usize,
        ns.pi_offset as usize,
        shape.guard,
    );
    for (b, (block, m)) in data
        .chunks_exact(bs)
        .zip(meta.chunks_exact(ms))
        .take(blocks as usize)
        .enumerate()
    {
        let (t, want) = (
            &m[at..at + shape.size],
            tuple(shape, block, &m[..at], app_tag, lba + b as u64),
        );
        let block_no = b as u32;
        if t[..g] != want[..g] {
            return Err(PiError::Guard { block: block_no });
        }
        if t[g..g + 2] != want[g..g + 2] {
            return Err(PiError::AppTag { block: block_no });
        }
        let r = shape.reftag();
        if pi != PiType::Type3 && t[r.clone()] != want[r] {
            return Err(PiError::RefTag { block: block_no });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctrl::NsFormat;

    fn ns(pi: PiType, ms: u16, pi_offset: u16) -> Namespace {
        ns_guard(pi, ms, pi_offset, false)
    }

    fn ns64(pi: PiType, ms: u16, pi_offset: u16) -> Namespace {
        ns_guard(pi, ms, pi_offset, true)
    }

    fn ns_guard(pi: PiType, ms: u16, pi_offset: u16, pi_guard64: bool) -> Namespace {
        Namespace {
            nsid: 1,
            blocks: 64,
            block_size: 512,
            metadata: ms,
            format: NsFormat::SeparateMetadata,
            extended: false,
            pi: Some(pi),
            pi_offset,
            pi_guard64,
            command_set: 0,
            zoned: None,
        }
    }

    /// CRC-16/T10-DIF's check value (the catalogue's "123456789" → 0xD0DB), so the guard is
    /// the one a device computes.
    #[test]
    fn guard_is_t10_dif() {
        assert_eq!(T10DIF.checksum(b"123456789"), 0xD0DB);
    }

    #[test]
    fn round_trip_and_each_failure() {
        let n = ns(PiType::Type1, 16, 8);
        let mut data = [0u8; 4 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let mut meta = [0u8; 4 * 16];
        generate(&n, 100, 4, 0xBEEF, &data, &mut meta).unwrap();
        assert_eq!(verify(&n, 100, 4, 0xBEEF, &data, &meta), Ok(()));
        assert_eq!(
            meta[16 + 12..16 + 16],
            101u32.to_be_bytes(),
            "ref tag = LBA, last 8 bytes"
        );
        let mut d = data;
        d[512 * 2 + 5] ^= 1;
        assert_eq!(
            verify(&n, 100, 4, 0xBEEF, &d, &meta),
            Err(PiError::Guard { block: 2 })
        );
        assert_eq!(
            verify(&n, 100, 4, 0xBEE0, &data, &meta),
            Err(PiError::AppTag { block: 0 })
        );
        assert_eq!(
            verify(&n, 101, 4, 0xBEEF, &data, &meta),
            Err(PiError::RefTag { block: 0 })
        );
        // Type 3 has no reference tag to check.
        let t3 = ns(PiType::Type3, 16, 8);
        assert_eq!(verify(&t3, 101, 4, 0xBEEF, &data, &meta), Ok(()));
        assert_eq!(
            verify(&n, 100, 5, 0xBEEF, &data, &meta),
            Err(PiError::Length)
        );
    }

    /// CRC-64/NVME: the catalogue's check value ("123456789"), and the NVM command set
    /// specification's 4096-byte vectors (all zeroes, all ones, incrementing bytes), so the
    /// 64-bit guard is the one a device computes. 512 zero bytes: the guard a 512-byte block
    /// of zeroes carries (QEMU 7.2 writes the 4096-byte value there on Write Zeroes, see the
    /// README).
    #[test]
    fn guard64_is_crc64_nvme() {
        assert_eq!(NVME64.checksum(b"123456789"), 0xAE8B_1486_0A79_9888);
        assert_eq!(NVME64.checksum(&[0u8; 4096]), 0x6482_D367_EB22_B64E);
        assert_eq!(NVME64.checksum(&[0xFFu8; 4096]), 0xC0DD_BA73_02EC_A3AC);
        let inc: [u8; 4096] = core::array::from_fn(|i| i as u8);
        assert_eq!(NVME64.checksum(&inc), 0x3E72_9F5F_6750_449C);
        assert_eq!(NVME64.checksum(&[0u8; 512]), 0x1DE6_0E28_68A7_82E9);
    }

    fn data4() -> [u8; 4 * 512] {
        core::array::from_fn(|i| (i * 7 % 251) as u8)
    }

    /// The 16-byte tuple's bytes: the CRC-64/NVME guard of the block, big-endian, at 0..8; the
    /// application tag at 8..10; the LBA's low 48 bits at 10..16 (a reference tag past 32
    /// bits); and each typed failure, the upper reference-tag bits included.
    #[test]
    fn guard64_layout_round_trip_and_each_failure() {
        let n = ns64(PiType::Type1, 16, 0);
        let data = data4();
        let lba = 0xABCD_0012_3456_7F00u64; // low 48 bits 0x0012_3456_7F00
        let mut meta = [0u8; 4 * 16];
        generate(&n, lba, 4, 0xBEEF, &data, &mut meta).unwrap();
        assert_eq!(verify(&n, lba, 4, 0xBEEF, &data, &meta), Ok(()));
        let t1 = &meta[16..32];
        assert_eq!(
            t1[0..8],
            NVME64.checksum(&data[512..1024]).to_be_bytes(),
            "guard = CRC-64/NVME, big-endian"
        );
        assert_eq!(t1[8..10], 0xBEEFu16.to_be_bytes(), "application tag");
        assert_eq!(
            t1[10..16],
            [0x00, 0x12, 0x34, 0x56, 0x7F, 0x01],
            "reference tag = the LBA's low 48 bits"
        );
        let mut d = data;
        d[512 * 3 + 511] ^= 0x80;
        assert_eq!(
            verify(&n, lba, 4, 0xBEEF, &d, &meta),
            Err(PiError::Guard { block: 3 })
        );
        let mut m = meta;
        m[16 + 7] ^= 1; // the guard's last byte
        assert_eq!(
            verify(&n, lba, 4, 0xBEEF, &data, &m),
            Err(PiError::Guard { block: 1 })
        );
        assert_eq!(
            verify(&n, lba, 4, 0xBEE0, &data, &meta),
            Err(PiError::AppTag { block: 0 })
        );
        assert_eq!(
            verify(&n, lba + 1, 4, 0xBEEF, &data, &meta),
            Err(PiError::RefTag { block: 0 })
        );
        // Bits 32..47 of the reference tag are checked too.
        assert_eq!(
            verify(&n, lba ^ (1 << 40), 4, 0xBEEF, &data, &meta),
            Err(PiError::RefTag { block: 0 })
        );
        // Bits past 48 are not in the tuple.
        assert_eq!(verify(&n, lba ^ (1 << 60), 4, 0xBEEF, &data, &meta), Ok(()));
        // Type 3 has no reference tag to check.
        let t3 = ns64(PiType::Type3, 16, 0);
        assert_eq!(verify(&t3, lba + 1, 4, 0xBEEF, &data, &meta), Ok(()));
        // The 16-byte tuple must fit: 8 bytes of metadata cannot hold it.
        let short = ns64(PiType::Type1, 8, 0);
        assert_eq!(
            generate(&short, lba, 4, 0xBEEF, &data, &mut meta),
            Err(PiError::Length)
        );
        assert_eq!(
            verify(&n, lba, 5, 0xBEEF, &data, &meta),
            Err(PiError::Length)
        );
        // The same namespace with a 16-bit guard reads other bytes: not interchangeable.
        assert_ne!(
            verify(&ns(PiType::Type1, 16, 0), lba, 4, 0xBEEF, &data, &meta),
            Ok(())
        );
    }

    /// The tuple last in 24 bytes of metadata: the guard is one CRC-64/NVME over the block's
    /// data and then the 8 metadata bytes before the tuple, which are left as they are.
    #[test]
    fn guard64_covers_the_metadata_before_the_tuple() {
        let n = ns64(PiType::Type2, 24, 8);
        let data = data4();
        let mut meta: [u8; 4 * 24] = core::array::from_fn(|i| (i as u8) ^ 0x5A);
        let before = meta;
        generate(&n, 7, 4, 0x0102, &data, &mut meta).unwrap();
        assert_eq!(verify(&n, 7, 4, 0x0102, &data, &meta), Ok(()));
        for b in 0..4 {
            let m = &meta[b * 24..b * 24 + 24];
            assert_eq!(
                m[..8],
                before[b * 24..b * 24 + 8],
                "bytes before the tuple kept"
            );
            let mut whole = [0u8; 512 + 8];
            whole[..512].copy_from_slice(&data[b * 512..b * 512 + 512]);
            whole[512..].copy_from_slice(&m[..8]);
            assert_eq!(m[8..16], NVME64.checksum(&whole).to_be_bytes());
            assert_eq!(m[18..24], (7 + b as u64).to_be_bytes()[2..]);
        }
        let mut m = meta;
        m[24 + 3] ^= 1; // block 1's metadata before its tuple
        assert_eq!(
            verify(&n, 7, 4, 0x0102, &data, &m),
            Err(PiError::Guard { block: 1 })
        );
    }
}
