//! 64-bit guard protection information on the software controller: the driver's commands,
//! field by field. The model executes reads and writes without acting on protection
//! information, so these tests read back the submission queue entries it fetched
//! (`NvmeModel::io_sqes`): PRACT or PRCHK in CDW12, the 48-bit reference tag split between
//! CDW14 (bits 0..31) and CDW3 (bits 32..47), MPTR, for each part of an MDTS split. QEMU's
//! images are too small to reach reference tags past 32 bits; these LBAs are past 2^32.

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError};
use keel_hal::DmaAllocator;
use keel_model::{HostDma, ModelClock, ModelConfig, NsConfig, NvmeModel};
use keel_nvme::{pi, Config, Controller, NsFormat, PiType};

const PRACT: u32 = 1 << 29;
const PRCHK_GUARD: u32 = 1 << 28;
const PRCHK_APP: u32 = 1 << 27;
const PRCHK_REF: u32 = 1 << 26;

fn le32(e: &[u8; 64], at: usize) -> u32 {
    u32::from_le_bytes(e[at..at + 4].try_into().unwrap())
}

fn le64(e: &[u8; 64], at: usize) -> u64 {
    u64::from_le_bytes(e[at..at + 8].try_into().unwrap())
}

/// A model namespace of 512-byte blocks whose Identify data says: 16 bytes of separate
/// metadata, type 1 protection (PI last: here, all of it), NSZE 2^48 blocks, and in the NVM
/// command set's Identify Namespace (CNS 0x05) PIF 2 for LBA format 0.
fn guard64_controller(
    mdts: u8,
) -> (
    NvmeModel,
    HostDma,
    Controller<keel_model::ModelMmio, ModelClock>,
) {
    let dma = HostDma::new();
    let model = NvmeModel::new(
        ModelConfig {
            namespaces: vec![NsConfig {
                nsid: 1,
                blocks: 1024,
                lba_shift: 9,
            }],
            mdts,
            ..ModelConfig::default()
        },
        dma.clone(),
    );
    let nsze = (1u64 << 48).to_le_bytes();
    for off in [0, 8, 16] {
        model.patch_identify(0, off, &nsze); // NSZE, NCAP, NUSE
    }
    model.patch_identify(0, 128, &16u16.to_le_bytes()); // LBAF0.MS = 16
    model.patch_identify(0, 29, &[1]); // DPS: type 1, PI last
    model.patch_identify(5, 12, &(2u32 << 7).to_le_bytes()); // ELBAF0: PIF 2, STS 0
    let ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    (model, dma, ctrl)
}

fn run(
    qp: &mut keel_nvme::IoQueuePair<keel_model::ModelMmio, ModelClock>,
) -> Vec<Result<(), IoError>> {
    qp.flush_submissions();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        if qp.in_flight() == 0 {
            return out;
        }
        qp.poll(64, &mut |_, r| out.push(r));
    }
    panic!("queue did not drain");
}

/// The namespace is seen as 64-bit guard PI (PRACT for data-only I/O), and a write with a
/// metadata buffer of Keel's tuples goes out with PRCHK guard and reference tag (no PRACT,
/// no application tag check), MPTR at the buffer, and the reference tag = the LBA's low 48
/// bits: bits 0..31 in CDW14, 32..47 in CDW3. A data-only read of the same blocks goes out
/// with PRACT and the same reference tag.
#[test]
fn guard64_metadata_write_sets_prchk_and_the_48_bit_reference_tag() {
    let (model, dma, mut ctrl) = guard64_controller(5);
    let ns = *ctrl.namespace(1).expect("namespace 1");
    assert!(ns.pi_guard64);
    assert_eq!(ns.pi, Some(PiType::Type1));
    assert_eq!(ns.format, NsFormat::Pract(PiType::Type1));
    assert_eq!(ns.pi_offset, 0);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    let lba = 0x0000_ABCD_1234_5678u64;
    let (data, meta) = (
        dma.alloc(2 * 512, 4096).unwrap(),
        dma.alloc(2 * 16, 4096).unwrap(),
    );
    let bytes: Vec<u8> = (0..1024).map(|i| (i * 13 % 256) as u8).collect();
    let mut tuples = [0u8; 32];
    pi::generate(&ns, lba, 2, 0x4B45, &bytes, &mut tuples).unwrap();
    assert_eq!(tuples[16 + 10..32], [0xAB, 0xCD, 0x12, 0x34, 0x56, 0x79]);
    data.write_bytes(0, &bytes).unwrap();
    meta.write_bytes(0, &tuples).unwrap();
    let write = BlockOp::Write {
        ns: 1,
        lba,
        blocks: 2,
        buf: BufRef::whole(&data),
    };
    qp.submit_with_metadata(write, BufRef::whole(&meta), 1)
        .expect("a metadata buffer on a 64-bit guard namespace is taken");
    // The model's disk is 1024 blocks: it answers LBA Out of Range; the command is the point.
    assert_eq!(run(&mut qp).len(), 1);
    let e = *model.io_sqes().last().unwrap();
    assert_eq!(e[0], 0x01, "a write");
    let cdw12 = le32(&e, 48);
    assert_eq!(
        cdw12 & (PRACT | PRCHK_GUARD | PRCHK_APP | PRCHK_REF),
        PRCHK_GUARD | PRCHK_REF
    );
    assert_eq!(le64(&e, 16), meta.bus_addr(), "MPTR");
    assert_eq!(le32(&e, 56), 0x1234_5678, "CDW14: reference tag bits 0..31");
    assert_eq!(le32(&e, 12), 0xABCD, "CDW3: reference tag bits 32..47");
    assert_eq!(
        le32(&e, 60),
        0,
        "CDW15: no application tag without submit_protected"
    );
    // The same with the application tag checked by the device: PRCHK's application tag bit,
    // CDW15 = mask (every bit) and tag; MPTR still the buffer's (the flag bit is Keel's).
    qp.submit_protected(write, BufRef::whole(&meta), 0x4B45, 3)
        .expect("a protected write is taken");
    assert_eq!(run(&mut qp).len(), 1);
    let e = *model.io_sqes().last().unwrap();
    assert_eq!(
        le32(&e, 48) & (PRACT | PRCHK_GUARD | PRCHK_APP | PRCHK_REF),
        PRCHK_GUARD | PRCHK_APP | PRCHK_REF
    );
    assert_eq!(
        le32(&e, 60),
        0xFFFF_4B45,
        "CDW15: ELBATM all ones, ELBAT the tag"
    );
    assert_eq!(le64(&e, 16), meta.bus_addr(), "MPTR");
    let read = BlockOp::Read {
        ns: 1,
        lba,
        blocks: 2,
        buf: BufRef::whole(&data),
    };
    qp.submit(read, 2).unwrap();
    assert_eq!(run(&mut qp).len(), 1);
    let e = *model.io_sqes().last().unwrap();
    assert_eq!(e[0], 0x02, "a read");
    assert_eq!(
        le32(&e, 48) & (PRACT | PRCHK_GUARD | PRCHK_REF),
        PRACT | PRCHK_GUARD | PRCHK_REF
    );
    assert_eq!(le64(&e, 16), 0, "no metadata pointer with PRACT");
    assert_eq!((le32(&e, 56), le32(&e, 12)), (0x1234_5678, 0xABCD));
}

/// Split at MDTS (8 KiB: 16 blocks per command) across a 2^32 boundary: each part carries its
/// own LBA as reference tag, CDW3 stepping from 0x00AB to 0x00AC, and its own part of the
/// metadata buffer.
#[test]
fn guard64_split_parts_carry_their_own_reference_tags() {
    let (model, dma, mut ctrl) = guard64_controller(1);
    assert!(ctrl.namespace(1).unwrap().pi_guard64);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    assert_eq!(qp.max_transfer(), 8192);
    let lba = 0x00AB_FFFF_FFF8u64; // 8 blocks below 0x00AC_0000_0000
    let blocks = 24u32;
    let (data, meta) = (
        dma.alloc(blocks as usize * 512, 4096).unwrap(),
        dma.alloc(blocks as usize * 16, 4096).unwrap(),
    );
    let write = BlockOp::Write {
        ns: 1,
        lba,
        blocks,
        buf: BufRef::whole(&data),
    };
    qp.submit_with_metadata(write, BufRef::whole(&meta), 7)
        .unwrap();
    run(&mut qp);
    let sqes = model.io_sqes();
    let parts: Vec<_> = sqes.iter().filter(|e| e[0] == 0x01).collect();
    assert_eq!(parts.len(), 2, "24 blocks at 16 per command");
    for (i, e) in parts.iter().enumerate() {
        let slba = lba + 16 * i as u64;
        assert_eq!(le64(e, 40), slba, "SLBA");
        assert_eq!(le32(e, 56), slba as u32, "CDW14");
        assert_eq!(le32(e, 12), (slba >> 32) as u32 & 0xFFFF, "CDW3");
        assert_eq!(
            le64(e, 16),
            meta.bus_addr() + 16 * 16 * i as u64,
            "MPTR of part {i}"
        );
        assert_eq!(
            le32(e, 48) & (PRACT | PRCHK_GUARD | PRCHK_REF),
            PRCHK_GUARD | PRCHK_REF
        );
    }
    assert_eq!((le32(parts[0], 12), le32(parts[1], 12)), (0xAB, 0xAC));
}
