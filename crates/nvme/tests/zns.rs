//! Zoned namespaces against the software controller: bring-up (CC.CSS = 6, profile, zoned
//! Identify), zone append with checked LBAs, zone management transitions seen in reports, the
//! typed zone errors, and a device that lies (append LBA outside the zone, a forged report).

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError, SubmitError, ZoneError};
use keel_hal::{DmaAllocator, DmaRegion};
use keel_model::{
    Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NsConfig, NvmeModel, ZoneConfig,
};
use keel_nvme::{
    parse_zone_report, Config, Controller, IoQueuePair, NsFormat, ZoneAction, ZoneDescriptor,
    ZoneOp, ZoneReportError, ZoneState,
};

type Qp = IoQueuePair<ModelMmio, ModelClock>;

const ZONE: u64 = 64;

struct Rig {
    model: NvmeModel,
    dma: HostDma,
    ctrl: Controller<ModelMmio, ModelClock>,
}

/// ns 1: NVM, 512 B; ns 2: zoned, 8 zones of 64 blocks (capacity 48), at most 2 open.
fn rig() -> Rig {
    let dma = HostDma::new();
    let mcfg = ModelConfig {
        namespaces: vec![
            NsConfig {
                nsid: 1,
                blocks: 1024,
                lba_shift: 9,
            },
            NsConfig {
                nsid: 2,
                blocks: 8 * ZONE,
                lba_shift: 9,
            },
        ],
        ..ModelConfig::default()
    };
    let model = NvmeModel::new(mcfg, dma.clone());
    model.set_zoned(
        2,
        ZoneConfig {
            zone_blocks: ZONE,
            capacity: 48,
            max_open: 2,
        },
    );
    let ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    Rig { model, dma, ctrl }
}

fn run(qp: &mut Qp, op: ZoneOp) -> Result<Option<u64>, IoError> {
    qp.submit_zone(op, 9).expect("submit");
    let mut res = None;
    while qp.in_flight() > 0 {
        qp.poll(16, &mut |t, r| {
            assert_eq!(t, 9);
            res = Some(r);
        });
    }
    let appended = qp.pop_appended();
    res.expect("reported").map(|()| {
        appended.map(|(t, lba)| {
            assert_eq!(t, 9);
            lba
        })
    })
}

fn io(qp: &mut Qp, op: BlockOp) -> Result<(), IoError> {
    qp.submit(op, 5).expect("submit");
    let mut res = None;
    while qp.in_flight() > 0 {
        qp.poll(16, &mut |_, r| res = Some(r));
    }
    res.expect("reported")
}

fn report(r: &Rig, qp: &mut Qp, from: u64) -> Vec<ZoneDescriptor> {
    let buf = r.dma.alloc(4096, 4096).unwrap();
    run(
        qp,
        ZoneOp::Report {
            ns: 2,
            from,
            buf: BufRef::whole(&buf),
        },
    )
    .expect("report");
    let mut bytes = vec![0u8; 4096];
    buf.read_bytes(0, &mut bytes).unwrap();
    let z = r.ctrl.namespace(2).unwrap().zoned.unwrap();
    let mut out = [ZoneDescriptor::default(); 16];
    let n = parse_zone_report(&bytes, &z, from, &mut out).expect("parse");
    out[..n].to_vec()
}

fn fill(buf: &DmaRegion, seed: u8) {
    let v: Vec<u8> = (0..buf.len()).map(|i| seed ^ (i as u8)).collect();
    buf.write_bytes(0, &v).unwrap();
}

fn manage(qp: &mut Qp, zone: u64, action: ZoneAction) -> Result<(), IoError> {
    run(
        qp,
        ZoneOp::Manage {
            ns: 2,
            zone,
            action,
            all: false,
        },
    )
    .map(|_| ())
}

#[test]
fn zoned_namespace_identified() {
    let r = rig();
    let info = r.ctrl.identify();
    assert!(info.io_command_sets);
    assert_eq!(info.command_set_profile, Some((0, 0b101)));
    let plain = r.ctrl.namespace(1).unwrap();
    assert_eq!((plain.command_set, plain.zoned), (0, None));
    let zns = r.ctrl.namespace(2).unwrap();
    assert_eq!(zns.command_set, 2);
    assert_eq!(zns.format, NsFormat::Plain);
    let z = zns.zoned.expect("zoned");
    assert_eq!(
        (z.zone_size, z.zones, z.max_open, z.max_active),
        (ZONE, 8, Some(2), None)
    );
    assert_eq!(z.append_limit as usize, info.max_transfer);
}

/// Appends land at the write pointer; each returned LBA is where the data is; management
/// transitions show in the reports; the zone errors come back typed.
#[test]
fn append_manage_report_and_zone_errors() {
    let mut r = rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let zs = report(&r, &mut qp, 0);
    assert_eq!(zs.len(), 8);
    assert!(zs
        .iter()
        .enumerate()
        .all(|(i, z)| z.state == ZoneState::Empty
            && z.start == i as u64 * ZONE
            && z.capacity == 48));

    let buf = r.dma.alloc(4 * 512, 4096).unwrap();
    let mut at = Vec::new();
    for k in 0..3u8 {
        fill(&buf, k);
        let lba = run(
            &mut qp,
            ZoneOp::Append {
                ns: 2,
                zone: ZONE,
                blocks: 4,
                buf: BufRef::whole(&buf),
            },
        )
        .expect("append")
        .expect("an LBA");
        at.push(lba);
    }
    assert_eq!(at, [ZONE, ZONE + 4, ZONE + 8]);
    for (k, lba) in at.iter().enumerate() {
        let want: Vec<u8> = (0..2048).map(|i| k as u8 ^ i as u8).collect();
        assert_eq!(
            r.model.disk_read(2, *lba as usize * 512, 2048),
            want,
            "record {k}"
        );
    }
    let z1 = report(&r, &mut qp, ZONE)[0];
    assert_eq!(
        (z1.start, z1.state, z1.write_pointer),
        (ZONE, ZoneState::ImplicitlyOpened, Some(ZONE + 12))
    );

    // A plain write not at the write pointer: the device refuses it, typed.
    let one = r.dma.alloc(512, 4096).unwrap();
    let w = |lba| BlockOp::Write {
        ns: 2,
        lba,
        blocks: 1,
        buf: BufRef::whole(&one),
    };
    assert_eq!(
        io(&mut qp, w(ZONE + 20)).unwrap_err().zone(),
        Some(ZoneError::InvalidWrite)
    );
    assert_eq!(io(&mut qp, w(ZONE + 12)), Ok(()));

    manage(&mut qp, ZONE, ZoneAction::Close).unwrap();
    assert_eq!(report(&r, &mut qp, ZONE)[0].state, ZoneState::Closed);
    manage(&mut qp, ZONE, ZoneAction::Open).unwrap();
    assert_eq!(
        report(&r, &mut qp, ZONE)[0].state,
        ZoneState::ExplicitlyOpened
    );
    manage(&mut qp, ZONE, ZoneAction::Finish).unwrap();
    let z1 = report(&r, &mut qp, ZONE)[0];
    assert_eq!((z1.state, z1.write_pointer), (ZoneState::Full, None));
    // Append to a full zone: Zone Is Full.
    let e = run(
        &mut qp,
        ZoneOp::Append {
            ns: 2,
            zone: ZONE,
            blocks: 4,
            buf: BufRef::whole(&buf),
        },
    )
    .unwrap_err();
    assert_eq!(e.zone(), Some(ZoneError::Full));
    // Close an empty zone: Invalid Zone State Transition.
    let e = manage(&mut qp, 3 * ZONE, ZoneAction::Close).unwrap_err();
    assert_eq!(e.zone(), Some(ZoneError::InvalidTransition));
    // Two zones open at most: the third open is refused.
    manage(&mut qp, 4 * ZONE, ZoneAction::Open).unwrap();
    manage(&mut qp, 5 * ZONE, ZoneAction::Open).unwrap();
    let e = manage(&mut qp, 6 * ZONE, ZoneAction::Open).unwrap_err();
    assert_eq!(e.zone(), Some(ZoneError::TooManyOpen));
    // Past the capacity (48 of 64 blocks): Zone Boundary Error.
    manage(&mut qp, 4 * ZONE, ZoneAction::Close).unwrap();
    let big = r.dma.alloc(49 * 512, 4096).unwrap();
    let e = io(
        &mut qp,
        BlockOp::Write {
            ns: 2,
            lba: 4 * ZONE,
            blocks: 49,
            buf: BufRef::whole(&big),
        },
    )
    .unwrap_err();
    assert_eq!(e.zone(), Some(ZoneError::Boundary));

    // Reset: empty again, the data gone; select all resets every zone.
    manage(&mut qp, ZONE, ZoneAction::Reset).unwrap();
    let z1 = report(&r, &mut qp, ZONE)[0];
    assert_eq!((z1.state, z1.write_pointer), (ZoneState::Empty, Some(ZONE)));
    assert_eq!(
        r.model.disk_read(2, ZONE as usize * 512, 512),
        vec![0u8; 512]
    );
    run(
        &mut qp,
        ZoneOp::Manage {
            ns: 2,
            zone: 0,
            action: ZoneAction::Reset,
            all: true,
        },
    )
    .unwrap();
    assert!(report(&r, &mut qp, 0)
        .iter()
        .all(|z| z.state == ZoneState::Empty));
    // The NVM namespace beside it keeps working.
    assert_eq!(
        io(
            &mut qp,
            BlockOp::Write {
                ns: 1,
                lba: 77,
                blocks: 1,
                buf: BufRef::whole(&one)
            }
        ),
        Ok(())
    );
}

/// What the driver refuses before anything reaches the device.
#[test]
fn zone_submissions_validated() {
    let mut r = rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let buf = r.dma.alloc(4096, 4096).unwrap();
    let b = |n: usize| BufRef::new(&buf, 0, n).unwrap();
    let append = |ns, zone, blocks, buf| ZoneOp::Append {
        ns,
        zone,
        blocks,
        buf,
    };
    let mut s = |op| qp.submit_zone(op, 1);
    assert_eq!(s(append(1, 0, 1, b(512))), Err(SubmitError::Unsupported));
    assert_eq!(
        s(append(3, 0, 1, b(512))),
        Err(SubmitError::InvalidNamespace)
    );
    assert_eq!(s(append(2, 3, 1, b(512))), Err(SubmitError::OutOfRange));
    assert_eq!(
        s(append(2, 8 * ZONE, 1, b(512))),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(s(append(2, 0, 2, b(512))), Err(SubmitError::BufferLength));
    assert_eq!(s(append(2, 0, 0, b(0))), Err(SubmitError::BufferLength));
    let report = |from, buf| ZoneOp::Report { ns: 2, from, buf };
    assert_eq!(s(report(0, b(64))), Err(SubmitError::BufferLength));
    assert_eq!(s(report(0, b(130))), Err(SubmitError::BufferLength));
    assert_eq!(s(report(8 * ZONE, b(4096))), Err(SubmitError::OutOfRange));
    let manage = |zone| ZoneOp::Manage {
        ns: 2,
        zone,
        action: ZoneAction::Reset,
        all: false,
    };
    assert_eq!(s(manage(5)), Err(SubmitError::OutOfRange));
    assert_eq!(qp.in_flight(), 0);
}

/// A device that says it appended somewhere else than the zone: the tag fails with
/// `BadResult`, and no LBA is handed out for it.
#[test]
fn append_lba_outside_the_zone_is_a_typed_error() {
    let mut r = rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let buf = r.dma.alloc(4 * 512, 4096).unwrap();
    let op = ZoneOp::Append {
        ns: 2,
        zone: 2 * ZONE,
        blocks: 4,
        buf: BufRef::whole(&buf),
    };
    // 61 + 4 > 64: the blocks would run past the zone's end.
    r.model.set_fault(Fault::AppendLba(61));
    assert_eq!(run(&mut qp, op), Err(IoError::BadResult));
    // (each of these appends did land, at 2 * ZONE + 4, + 8: before the zone's start.)
    r.model.set_fault(Fault::AppendLba(-10));
    assert_eq!(run(&mut qp, op), Err(IoError::BadResult));
    r.model.set_fault(Fault::AppendLba(i64::MAX));
    assert_eq!(run(&mut qp, op), Err(IoError::BadResult));
    // The last 4 blocks of the zone are believed (the device's word; the host checks data).
    r.model.set_fault(Fault::AppendLba(48));
    assert_eq!(run(&mut qp, op), Ok(Some(2 * ZONE + 12 + 48)));
    r.model.set_fault(Fault::None);
    assert_eq!(run(&mut qp, op), Ok(Some(2 * ZONE + 16)));
    assert_eq!(qp.pop_appended(), None);
}

/// A report whose header claims more descriptors than were asked for is refused by the
/// parser, not read past the buffer.
#[test]
fn forged_report_count_refused() {
    let mut r = rig();
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let buf = r.dma.alloc(4096, 4096).unwrap();
    let small = BufRef::new(&buf, 0, 64 + 2 * 64).unwrap();
    r.model.set_fault(Fault::ZoneReportCount(1000));
    run(
        &mut qp,
        ZoneOp::Report {
            ns: 2,
            from: 0,
            buf: small,
        },
    )
    .unwrap();
    let mut bytes = vec![0u8; small.len()];
    buf.read_bytes(0, &mut bytes).unwrap();
    let z = r.ctrl.namespace(2).unwrap().zoned.unwrap();
    let mut out = [ZoneDescriptor::default(); 64];
    assert_eq!(
        parse_zone_report(&bytes, &z, 0, &mut out),
        Err(ZoneReportError::Count(1000))
    );
    r.model.set_fault(Fault::ZoneReportCount(3));
    run(
        &mut qp,
        ZoneOp::Report {
            ns: 2,
            from: 0,
            buf: small,
        },
    )
    .unwrap();
    buf.read_bytes(0, &mut bytes).unwrap();
    assert_eq!(
        parse_zone_report(&bytes, &z, 0, &mut out),
        Err(ZoneReportError::Count(3))
    );
}

/// A zoned namespace whose zoned Identify data is absurd (zone size 0) stays listed but
/// refused typed, with the reason logged; the NVM namespace beside it works.
#[test]
fn absurd_zone_size_refused_typed() {
    let dma = HostDma::new();
    let mcfg = ModelConfig {
        namespaces: vec![
            NsConfig {
                nsid: 1,
                blocks: 1024,
                lba_shift: 9,
            },
            NsConfig {
                nsid: 2,
                blocks: 8 * ZONE,
                lba_shift: 9,
            },
        ],
        ..ModelConfig::default()
    };
    let model = NvmeModel::new(mcfg, dma.clone());
    model.set_zoned(
        2,
        ZoneConfig {
            zone_blocks: ZONE,
            capacity: ZONE,
            max_open: 0,
        },
    );
    model.patch_identify(5, 2816, &[0; 8]);
    let mut ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    let ns = ctrl.namespace(2).unwrap();
    assert_eq!((ns.format, ns.zoned), (NsFormat::CommandSet(2), None));
    let mut qp = ctrl.create_io_qpair(&dma, 1, 8).unwrap();
    let buf = dma.alloc(512, 4096).unwrap();
    let op = |ns| BlockOp::Read {
        ns,
        lba: 0,
        blocks: 1,
        buf: BufRef::whole(&buf),
    };
    assert_eq!(qp.submit(op(2), 1), Err(SubmitError::UnsupportedFormat));
    assert_eq!(
        qp.submit_zone(
            ZoneOp::Manage {
                ns: 2,
                zone: 0,
                action: ZoneAction::Reset,
                all: true
            },
            1
        ),
        Err(SubmitError::UnsupportedFormat)
    );
    assert_eq!(io(&mut qp, op(1)), Ok(()));
}

/// A power cut with the model's volatile cache: a zone's write pointer comes back covering what
/// is durable (past the last block kept, never below the last Flush), the zone closed; resets
/// are durable at once.
#[test]
fn power_cut_rewinds_write_pointers() {
    let mut r = rig();
    r.model.set_volatile_cache(true);
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    let buf = r.dma.alloc(4 * 512, 4096).unwrap();
    fill(&buf, 1);
    let append = |qp: &mut Qp, zone: u64| {
        run(
            qp,
            ZoneOp::Append {
                ns: 2,
                zone,
                blocks: 4,
                buf: BufRef::whole(&buf),
            },
        )
        .expect("append")
        .expect("lba")
    };
    // Zone 1: 8 blocks flushed, then 12 more unflushed; zone 3: written and flushed, then
    // reset (no Flush after).
    append(&mut qp, ZONE);
    append(&mut qp, ZONE);
    append(&mut qp, 3 * ZONE);
    io(&mut qp, BlockOp::Flush { ns: 2 }).unwrap();
    manage(&mut qp, 3 * ZONE, ZoneAction::Reset).unwrap();
    for _ in 0..3 {
        append(&mut qp, ZONE);
    }
    manage(&mut qp, ZONE, ZoneAction::Close).unwrap(); // at most 2 open
                                                       // Zone 2: 8 blocks, never flushed.
    append(&mut qp, 2 * ZONE);
    append(&mut qp, 2 * ZONE);
    // Keep one block of zone 1 past a hole (LBA 8..=13 lost, 14 kept), nothing of zone 2.
    r.model.power_cut(|_, lba| lba == ZONE + 14);
    let zs = r.model.zones(2);
    assert_eq!(zs[1], (0x4, ZONE + 15), "closed, past the last kept block");
    assert_eq!(zs[2], (0x1, 2 * ZONE), "nothing durable: empty again");
    assert_eq!(zs[3], (0x1, 3 * ZONE), "the reset held");
    let img = r.model.durable_image(2);
    let at = |lba: u64| img[lba as usize * 512];
    assert_eq!(
        at(ZONE + 8),
        0,
        "a lost block below the write pointer reads as zeroes"
    );
    assert_eq!(at(ZONE + 14), 1 ^ (2 * 512) as u8, "the kept block");
    assert!(
        img[3 * ZONE as usize * 512..(3 * ZONE as usize + 4) * 512]
            .iter()
            .all(|&b| b == 0),
        "the reset's zeroes held"
    );
    // A cut keeping nothing leaves the Flush's write pointer; the zone takes appends there.
    drop(qp);
    r.ctrl = Controller::init(r.model.mmio(), &r.dma, ModelClock::new(), Config::default())
        .expect("init");
    let mut qp = r.ctrl.create_io_qpair(&r.dma, 1, 32).unwrap();
    assert_eq!(append(&mut qp, ZONE), ZONE + 15);
    r.model.power_cut(|_, _| false);
    assert_eq!(r.model.zones(2)[1], (0x4, ZONE + 15));
    // Filled to capacity by appends, flushed: full after a cut.
    for _ in 0..12 {
        append(&mut qp, 4 * ZONE);
    }
    io(&mut qp, BlockOp::Flush { ns: 2 }).unwrap();
    r.model.power_cut(|_, _| false);
    assert_eq!(r.model.zones(2)[4].0, 0xE);
}
