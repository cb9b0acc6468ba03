//! Log pages, asynchronous events and namespace rescans, against the software controller.

use keel_blockdev::{BlockOp, BlockQueue, BufRef, IoError};
use keel_hal::DmaAllocator;
use keel_model::{Fault, HostDma, ModelClock, ModelConfig, ModelMmio, NsConfig, NvmeModel};
use keel_nvme::{AsyncEvent, Config, Controller, CriticalWarning, IoQueuePair, NsState, MAX_AERS};

type Ctrl = Controller<ModelMmio, ModelClock>;
type Qp = IoQueuePair<ModelMmio, ModelClock>;

fn ns(nsid: u32, blocks: u64) -> NsConfig {
    NsConfig {
        nsid,
        blocks,
        lba_shift: 9,
    }
}

fn rig(namespaces: Vec<NsConfig>) -> (NvmeModel, HostDma, Ctrl) {
    let dma = HostDma::new();
    let model = NvmeModel::new(
        ModelConfig {
            namespaces,
            ..ModelConfig::default()
        },
        dma.clone(),
    );
    let ctrl =
        Controller::init(model.mmio(), &dma, ModelClock::new(), Config::default()).expect("init");
    (model, dma, ctrl)
}

fn run(qp: &mut Qp, op: BlockOp) -> Result<(), IoError> {
    qp.submit(op, 7).expect("submit");
    qp.flush_submissions();
    let mut out = Vec::new();
    while qp.in_flight() > 0 {
        qp.poll(64, &mut |t, r| out.push((t, r)));
    }
    assert_eq!(out.len(), 1);
    out[0].1
}

fn events(ctrl: &mut Ctrl) -> Vec<AsyncEvent> {
    let mut v = Vec::new();
    ctrl.poll_events(|e| v.push(e)).expect("poll_events");
    v
}

/// The SMART page counts exactly the I/O done (QEMU's rule: data units are thousands of
/// 512-byte units, rounded up), reports the temperature, and a failed write shows up in the
/// error log with its command ID, status and LBA, and as a media error.
#[test]
fn smart_and_error_log_count_what_happened() {
    let (model, dma, mut ctrl) = rig(vec![ns(1, 8192)]);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 64).unwrap();
    let buf = dma.alloc(8 * 512, 4096).unwrap();
    let before = ctrl.smart_log().unwrap();
    assert_eq!(before.host_write_commands, 0);
    for i in 0..300u64 {
        let op = BlockOp::Write {
            ns: 1,
            lba: i * 8,
            blocks: 8,
            buf: BufRef::whole(&buf),
        };
        run(&mut qp, op).unwrap();
    }
    let op = BlockOp::Read {
        ns: 1,
        lba: 0,
        blocks: 8,
        buf: BufRef::whole(&buf),
    };
    run(&mut qp, op).unwrap();
    let s = ctrl.smart_log().unwrap();
    assert_eq!(s.host_write_commands, 300);
    assert_eq!(s.host_read_commands, 1);
    // 300 x 8 blocks = 2400 units of 512 B -> 3 (thousands, rounded up); 8 -> 1.
    assert_eq!(s.data_units_written, 3);
    assert_eq!(s.data_units_read, 1);
    assert_eq!(s.temperature_k, Some(323));
    assert_eq!(s.temperature_c(), Some(50));
    assert!(s.critical_warning.none());
    assert_eq!(s.media_errors, 0);

    let mut log: heapless::Vec<keel_nvme::ErrorLogEntry, 8> = heapless::Vec::new();
    ctrl.error_log(&mut log).unwrap();
    assert!(log.is_empty(), "no errors yet: {log:?}");
    model.set_fault(Fault::WriteFault);
    let op = BlockOp::Write {
        ns: 1,
        lba: 4000,
        blocks: 8,
        buf: BufRef::whole(&buf),
    };
    let err = run(&mut qp, op).unwrap_err();
    model.set_fault(Fault::None);
    ctrl.error_log(&mut log).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].lba, 4000);
    assert_eq!(log[0].nsid, 1);
    assert_eq!(log[0].sqid, 1);
    assert_eq!(Some(log[0].dev_status()), err.status());
    let s = ctrl.smart_log().unwrap();
    assert_eq!((s.media_errors, s.error_log_entries), (1, 1));
    assert_eq!(s.host_write_commands, 300, "a failed write is not counted");
}

/// A temperature threshold below the current temperature raises a SMART / health event whose
/// AER completion lands on the admin queue *before* the Set Features completion: the waiting
/// command must not take it for its own, nor drop it. `poll_events` then reads the page
/// (temperature warning set), re-posts the AER, and a second event comes only after that read.
#[test]
fn health_event_during_a_command_is_kept_and_cleared_by_its_page() {
    let (model, _dma, mut ctrl) = rig(vec![ns(1, 1024)]);
    assert_eq!(model.aers_outstanding(), MAX_AERS);
    assert_eq!(ctrl.aers_outstanding(), MAX_AERS);
    ctrl.set_temperature_threshold(300, false).unwrap();
    assert_eq!(ctrl.temperature_threshold(false).unwrap(), 300);
    assert_eq!(ctrl.stats().stale_completions, 0);
    assert_eq!(model.aer_completions(), 1);
    assert_eq!(ctrl.event_stats().aers_during_commands, 1);
    let ev = events(&mut ctrl);
    assert_eq!(ev.len(), 1, "{ev:?}");
    match &ev[0] {
        AsyncEvent::Health { info, smart } => {
            assert_eq!(*info, keel_nvme::AerResult::HEALTH_TEMPERATURE);
            assert!(smart.critical_warning.has(CriticalWarning::TEMPERATURE));
        }
        e => panic!("not a health event: {e:?}"),
    }
    assert_eq!(model.aers_outstanding(), MAX_AERS, "re-posted");
    assert!(events(&mut ctrl).is_empty(), "one event, reported once");
    // Two events of one type: the second waits until the first's page is read (RAE = 0).
    model.raise_event(1, 0x02, 0x02);
    model.raise_event(1, 0x00, 0x02);
    assert_eq!(model.aer_completions(), 2);
    assert_eq!(
        model.aer_completions(),
        2,
        "the second waits for the page read"
    );
    // The page read lets the second one out; the same call handles it.
    let ev = events(&mut ctrl);
    assert_eq!(model.aer_completions(), 3);
    assert!(
        matches!(
            ev[..],
            [
                AsyncEvent::Health { info: 2, .. },
                AsyncEvent::Health { info: 0, .. }
            ]
        ),
        "{ev:?}"
    );
    ctrl.set_temperature_threshold(343, false).unwrap();
    assert!(ctrl.smart_log().unwrap().critical_warning.none());
    assert_eq!(ctrl.stats().stale_completions, 0);
}

/// Namespace attribute changes: detaching namespace 2 removes it (typed, and I/O to it fails
/// with the device's Invalid Namespace), attaching it again adds it back, resizing namespace
/// 3 reports its old and new size; absurd list entries are dropped and counted.
#[test]
fn namespace_changes_rescan_what_changed() {
    let (model, dma, mut ctrl) = rig(vec![ns(1, 1024), ns(2, 2048), ns(3, 4096)]);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    let buf = dma.alloc(512, 4096).unwrap();
    model.set_namespace_attached(2, false);
    let ev = events(&mut ctrl);
    let AsyncEvent::NamespacesChanged { changes, truncated } = &ev[0] else {
        panic!("{ev:?}");
    };
    assert!(!truncated);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].nsid, 2);
    assert!(matches!(changes[0].state, NsState::Removed(n) if n.blocks == 2048));
    let ids: Vec<u32> = ctrl.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, [1, 3]);
    let op = BlockOp::Read {
        ns: 2,
        lba: 0,
        blocks: 1,
        buf: BufRef::whole(&buf),
    };
    assert_eq!(run(&mut qp, op), Err(IoError::Invalid));

    model.set_namespace_attached(2, true);
    model.resize_namespace(3, 8192);
    let ev = events(&mut ctrl);
    // The first event's list holds both; the second notice (raised while the first was
    // unread) finds the list already read: nothing more changed.
    let AsyncEvent::NamespacesChanged { changes, .. } = &ev[0] else {
        panic!("{ev:?}");
    };
    assert!(ev[1..]
        .iter()
        .all(|e| matches!(e, AsyncEvent::NamespacesChanged { changes, .. } if changes.is_empty())));
    assert_eq!(changes.len(), 2);
    assert!(matches!(changes[0].state, NsState::Added(n) if n.nsid == 2 && n.blocks == 2048));
    assert!(
        matches!(changes[1].state, NsState::Changed(o, n) if o.blocks == 4096 && n.blocks == 8192)
    );
    let ids: Vec<(u32, u64)> = ctrl
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks))
        .collect();
    assert_eq!(ids, [(1, 1024), (2, 2048), (3, 8192)]);

    // A hostile list: an NSID above NN is dropped and counted.
    model.force_changed_list(&[1, 9]);
    model.raise_event(2, 0x00, 0x04);
    let ev = events(&mut ctrl);
    let AsyncEvent::NamespacesChanged { changes, .. } = &ev[0] else {
        panic!("{ev:?}");
    };
    assert!(matches!(
        changes[..],
        [keel_nvme::NsChange {
            nsid: 1,
            state: NsState::Unchanged(_)
        }]
    ));
    assert_eq!(ctrl.event_stats().dropped_ns_entries, 1);
}

/// Namespace Attachment through the driver: detaching namespace 2 from this controller
/// raises the notice, the rescan removes it, the controller list no longer names us, the
/// device refuses I/O to it on a pair created before (`IoError::Invalid`) and the driver
/// refuses it once the pair is refreshed (`SubmitError::InvalidNamespace`); attaching it
/// again brings it back, readable on a refreshed pair. Refusals are typed.
#[test]
fn attach_and_detach_through_the_driver() {
    use keel_blockdev::SubmitError;
    use keel_nvme::{AttachError, NvmeError};
    let (_model, dma, mut ctrl) = rig(vec![ns(1, 1024), ns(2, 2048)]);
    assert!(ctrl.identify().namespace_attachment);
    let me = ctrl.identify().cntlid;
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    let buf = dma.alloc(512, 4096).unwrap();
    let read2 = BlockOp::Read {
        ns: 2,
        lba: 7,
        blocks: 1,
        buf: BufRef::whole(&buf),
    };
    let mut list: heapless::Vec<u16, 8> = heapless::Vec::new();
    ctrl.attached_controllers(2, &mut list).unwrap();
    assert_eq!(list.as_slice(), &[me]);
    ctrl.subsystem_controllers(&mut list).unwrap();
    assert_eq!(list.as_slice(), &[me]);

    assert_eq!(
        ctrl.attach_namespace(2, &[me]),
        Err(NvmeError::Attach(AttachError::AlreadyAttached))
    );
    assert_eq!(
        ctrl.detach_namespace(2, &[me + 1]),
        Err(NvmeError::Attach(AttachError::ControllerList))
    );
    assert_eq!(
        ctrl.detach_namespace(9, &[me]),
        Err(NvmeError::Attach(AttachError::NoSuchNamespace))
    );
    assert!(matches!(
        ctrl.detach_namespace(2, &[]),
        Err(NvmeError::InvalidArgument(_))
    ));
    // Nothing was refused into a change: no event yet.
    assert!(events(&mut ctrl).is_empty());

    ctrl.detach_namespace(2, &[me]).unwrap();
    // The controller list says so at once; the namespace list waits for the event.
    ctrl.attached_controllers(2, &mut list).unwrap();
    assert!(list.is_empty());
    assert!(ctrl.namespace(2).is_some());
    let ev = events(&mut ctrl);
    let [AsyncEvent::NamespacesChanged { changes, .. }] = &ev[..] else {
        panic!("{ev:?}");
    };
    assert!(matches!(
        changes[..],
        [keel_nvme::NsChange {
            nsid: 2,
            state: NsState::Removed(_)
        }]
    ));
    assert!(ctrl.namespace(2).is_none());
    assert_eq!(
        ctrl.detach_namespace(2, &[me]),
        Err(NvmeError::Attach(AttachError::NotAttached))
    );
    // The old pair still lists it: the device refuses; refreshed, the driver refuses.
    assert_eq!(run(&mut qp, read2), Err(IoError::Invalid));
    ctrl.refresh_namespaces(&mut qp);
    assert_eq!(qp.submit(read2, 1), Err(SubmitError::InvalidNamespace));

    ctrl.attach_namespace(2, &[me]).unwrap();
    // Not yet on the pair: refused by the driver until the rescan and a refresh.
    assert_eq!(qp.submit(read2, 1), Err(SubmitError::InvalidNamespace));
    let ev = events(&mut ctrl);
    assert!(
        matches!(
            &ev[..],
            [AsyncEvent::NamespacesChanged { changes, .. }]
                if matches!(changes[..], [keel_nvme::NsChange { nsid: 2, state: NsState::Added(n) }] if n.blocks == 2048)
        ),
        "{ev:?}"
    );
    ctrl.refresh_namespaces(&mut qp);
    assert_eq!(run(&mut qp, read2), Ok(()));
    ctrl.attached_controllers(2, &mut list).unwrap();
    assert_eq!(list.as_slice(), &[me]);
}

/// A controller reset drops the outstanding AERs on the device; the next `poll_events`
/// posts them again, and events flow as before.
#[test]
fn reset_rearms_the_aers() {
    let (model, dma, mut ctrl) = rig(vec![ns(1, 1024)]);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    ctrl.reset(&mut [&mut qp]).unwrap();
    assert_eq!(model.aers_outstanding(), 0, "a reset drops them");
    assert!(events(&mut ctrl).is_empty());
    assert_eq!(model.aers_outstanding(), MAX_AERS, "re-armed");
    model.raise_event(1, 0x01, 0x02);
    assert!(matches!(
        events(&mut ctrl)[..],
        [AsyncEvent::Health { info: 1, .. }]
    ));
}

/// Surprise removal mid-I/O: the device holds 8 commands (a read and writes in flight) when
/// its BAR starts reading all ones. Once the polls have found nothing for
/// `removal_check_ms`, every tag completes exactly once with `IoError::Removed`, none is lost,
/// new submits are refused with `SubmitError::Removed`, and a second controller (its own
/// model) keeps doing verified I/O.
#[test]
fn surprise_removal_fails_every_tag_once_others_go_on() {
    use keel_blockdev::SubmitError;
    use std::collections::HashMap;
    let dma = HostDma::new();
    let model = NvmeModel::new(ModelConfig::default(), dma.clone());
    let clock = ModelClock::new();
    let mut ctrl =
        Controller::init(model.mmio(), &dma, clock.clone(), Config::default()).expect("init");
    let (model2, dma2, mut ctrl2) = rig(vec![ns(1, 8192)]);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 32).unwrap();
    let mut qp2 = ctrl2.create_io_qpair(&dma2, 1, 32).unwrap();
    let bufs: Vec<_> = (0..8).map(|_| dma.alloc(4096, 4096).unwrap()).collect();
    model.hold_next_io(8);
    for (i, b) in bufs.iter().enumerate() {
        let op = if i == 0 {
            BlockOp::Read {
                ns: 1,
                lba: 0,
                blocks: 8,
                buf: BufRef::whole(b),
            }
        } else {
            BlockOp::Write {
                ns: 1,
                lba: i as u64 * 8,
                blocks: 8,
                buf: BufRef::whole(b),
            }
        };
        qp.submit(op, 100 + i as u32).unwrap();
    }
    qp.flush_submissions();
    assert_eq!(model.held(), 8);
    model.set_fault(Fault::Removed);
    let mut reports: HashMap<u32, Vec<Result<(), IoError>>> = HashMap::new();
    let mut polls = 0;
    while qp.in_flight() > 0 {
        polls += 1;
        assert!(polls < 100_000, "tags never came back");
        qp.poll(64, &mut |t, r| reports.entry(t).or_default().push(r));
        if polls % 32 == 0 {
            clock.advance_ms(10);
        }
    }
    // Not before the check interval (100 ms) of polls finding nothing had passed.
    assert!(polls >= 32 * 10, "removed after {polls} polls");
    for _ in 0..1000 {
        qp.poll(64, &mut |t, r| reports.entry(t).or_default().push(r));
    }
    assert_eq!(reports.len(), 8, "{reports:?}");
    for (t, r) in &reports {
        assert_eq!(r.as_slice(), &[Err(IoError::Removed)], "tag {t}");
    }
    assert!(qp.is_removed() && ctrl.is_removed());
    let op = BlockOp::Read {
        ns: 1,
        lba: 0,
        blocks: 8,
        buf: BufRef::whole(&bufs[0]),
    };
    assert_eq!(qp.submit(op, 1), Err(SubmitError::Removed));
    // The other controller goes on.
    let b = dma2.alloc(4096, 4096).unwrap();
    b.write_bytes(0, &[0x5A; 4096]).unwrap();
    let w = BlockOp::Write {
        ns: 1,
        lba: 64,
        blocks: 8,
        buf: BufRef::whole(&b),
    };
    run(&mut qp2, w).unwrap();
    assert_eq!(model2.disk_read(1, 64 * 512, 4096), vec![0x5A; 4096]);
    assert!(!qp2.is_removed() && !ctrl2.is_removed());
}

/// The one-pass submission path keeps its own copy of the first namespace's size: a refreshed
/// pair uses the new size there too (a shrunk namespace refuses a read past its new end
/// before the device sees it; a grown one takes a read past its old end on that path).
#[test]
fn a_resized_first_namespace_is_seen_by_the_fast_path_after_a_refresh() {
    let (model, dma, mut ctrl) = rig(vec![ns(1, 4096)]);
    let mut qp = ctrl.create_io_qpair(&dma, 1, 16).unwrap();
    let buf = dma.alloc(4096, 4096).unwrap();
    let read = |lba| BlockOp::Read {
        ns: 1,
        lba,
        blocks: 8,
        buf: BufRef::whole(&buf),
    };
    assert_eq!(run(&mut qp, read(4000)), Ok(()));
    model.resize_namespace(1, 2048);
    let ev = events(&mut ctrl);
    assert!(!ev.is_empty(), "the change is announced");
    ctrl.refresh_namespaces(&mut qp);
    let before = model.io_commands();
    assert_eq!(
        qp.submit(read(4000), 1),
        Err(keel_blockdev::SubmitError::OutOfRange)
    );
    assert_eq!(model.io_commands(), before, "refused before the device");
    assert_eq!(run(&mut qp, read(2040)), Ok(()));
    model.resize_namespace(1, 8192);
    let _ = events(&mut ctrl);
    ctrl.refresh_namespaces(&mut qp);
    assert_eq!(run(&mut qp, read(8000)), Ok(()));
    assert_eq!(qp.stats().submitted_cmds, 3);
}
