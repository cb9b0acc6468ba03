//! End-to-end protection information computed by the host (T10 DIF, 16-bit guard): what a
//! caller puts in a block's metadata when it hands the driver a metadata buffer
//! ([`IoQueuePair::submit_with_metadata`](crate::IoQueuePair::submit_with_metadata)) on a
//! namespace with protection, and checks on the way back.
//!
//! Each block's 8-byte tuple, big-endian: guard (CRC-16/T10-DIF of the block's data and of the
//! metadata bytes before the tuple, where it is the last 8 bytes of more), the
//! application tag, the reference tag (the LBA's low 32 bits for types 1 and 2, where the
//! device checks it; any value for type 3). It sits at `Namespace::pi_offset` in the block's
//! metadata.

use crate::ctrl::{Namespace, PiType};

const T10DIF: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF);

/// The guard of one block: CRC-16/T10-DIF over its data and the metadata bytes before the
/// tuple (when the tuple is the last 8 bytes of a larger metadata area).
fn guard(block: &[u8], meta_before: &[u8]) -> [u8; 2] {
    let mut d = T10DIF.digest();
    d.update(block);
    d.update(meta_before);
    d.finalize().to_be_bytes()
}

/// A protection check that failed on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PiError {
    /// The namespace has no protection information.
    NoProtection,
    /// The data or metadata buffer is shorter than `blocks` blocks.
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

/// The tuple a block at `lba` should carry: guard, application tag, reference tag (big-endian).
fn tuple(block: &[u8], meta_before: &[u8], app_tag: u16, lba: u64) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[0..2].copy_from_slice(&guard(block, meta_before));
    t[2..4].copy_from_slice(&app_tag.to_be_bytes());
    t[4..8].copy_from_slice(&(lba as u32).to_be_bytes());
    t
}

fn layout(ns: &Namespace, blocks: u32, data: usize, meta: usize) -> Result<PiType, PiError> {
    let pi = ns.pi.ok_or(PiError::NoProtection)?;
    let n = blocks as usize;
    let need_meta = n * ns.metadata as usize;
    if data < n * ns.block_size as usize
        || meta < need_meta
        || ns.pi_offset as usize + 8 > ns.metadata as usize
    {
        return Err(PiError::Length);
    }
    Ok(pi)
}

/// Writes each block's protection tuple into `meta` for `data` (`blocks` blocks from `lba`).
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
        let t = tuple(block, &m[..at], app_tag, lba + b as u64);
        m[at..at + 8].copy_from_slice(&t);
    }
    Ok(())
}

/// Checks each block's protection tuple in `meta` against `data`, `app_tag` and the LBAs.
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
    let (bs, ms, at) = (
        ns.block_size as usize,
        ns.metadata as usize,
        ns.pi_offset as usize,
    );
    for (b, (block, m)) in data
        .chunks_exact(bs)
        .zip(meta.chunks_exact(ms))
        .take(blocks as usize)
        .enumerate()
    {
        let (t, want) = (
            &m[at..at + 8],
            tuple(block, &m[..at], app_tag, lba + b as u64),
        );
        let block_no = b as u32;
        if t[0..2] != want[0..2] {
            return Err(PiError::Guard { block: block_no });
        }
        if t[2..4] != want[2..4] {
            return Err(PiError::AppTag { block: block_no });
        }
        if pi != PiType::Type3 && t[4..8] != want[4..8] {
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
        Namespace {
            nsid: 1,
            blocks: 64,
            block_size: 512,
            metadata: ms,
            format: NsFormat::SeparateMetadata,
            extended: false,
            pi: Some(pi),
            pi_offset,
            pi_guard64: false,
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
}
