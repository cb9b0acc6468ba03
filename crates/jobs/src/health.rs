//! `health`: the SMART / health page and the error log of every drive, as tables; optionally
//! I/O in between (so the counters can be checked against what was done) and a temperature
//! threshold crossed on purpose (a real SMART / health asynchronous event).

use keel_cmdline::{Cmdline, OptSpec};
use keel_hal::{Board, Clock};
use keel_nvme::{AsyncEvent, CriticalWarning, ErrorLogEntry, SmartLog};

use crate::drives::Drive;
use crate::storage::{self, Shape};
use crate::{Ctrl, JobError, JobResult};

/// `health`'s options.
pub const OPTS: &[OptSpec] = &[
    OptSpec::int(
        "writes",
        0,
        "write (then read back and verify) this many commands between two readings",
    ),
    OptSpec::int("blocks", 16, "blocks per write"),
    OptSpec::int("lba", 8192, "first block written (namespace 1)"),
    OptSpec::int("seed", 0x6865_616c, "seed of the data pattern"),
    OptSpec::flag(
        "temp",
        false,
        "set the over-temperature threshold below the temperature: a health event must come",
    ),
];

/// How long the job waits for the device's temperature event.
const EVENT_WAIT_NS: u64 = 2_000_000_000;

fn nvme_fail<'a>(what: &'static str) -> impl FnOnce(keel_nvme::NvmeError) -> JobError<'a> {
    move |e| {
        keel_log::error!("{=str}: {}", what, e);
        JobError::Failed(what)
    }
}

/// `health`: tables for every selected drive.
pub fn health<'a, B: Board>(cl: &Cmdline<'a>, p: &B) -> JobResult<'a> {
    let writes = cl.int("writes")?;
    let blocks = cl.int("blocks")?.clamp(1, 256) as u32;
    let lba = cl.int("lba")?;
    let seed = cl.int("seed")?;
    let temp = cl.flag("temp")?;
    let drives = crate::drives::open_all(p, cl)?;
    let which = drives.selected(cl)?;
    keel_log::info!("job health: start");
    for &i in &which {
        let d = &drives.list[i];
        let mut ctrl = d.ctrl.lock();
        let before = ctrl.smart_log().map_err(nvme_fail("read the SMART page"))?;
        print_smart(d.index, &before);
        print_errors::<B>(d.index, &mut ctrl)?;
        if writes > 0 {
            io_between(p, d, &mut ctrl, writes, blocks, lba, seed, &before)?;
        }
        if temp {
            temperature_event(p, d.index, &mut ctrl, &before)?;
        }
        let st = ctrl.event_stats();
        keel_log::info!(
            "health drive={=usize} events: {=u64} (AERs posted {=u64}, met during commands {=u64}, failed {=u64}), stale admin completions {=u64}",
            d.index,
            st.events,
            st.aers_posted,
            st.aers_during_commands,
            st.aer_errors,
            ctrl.stats().stale_completions
        );
    }
    Ok(())
}

fn print_smart(drive: usize, s: &SmartLog) {
    keel_log::info!(
        "health drive={=usize} | SMART / health        | value",
        drive
    );
    let w = s.critical_warning;
    if w.none() {
        keel_log::info!(
            "health drive={=usize} | critical warning      | none",
            drive
        );
    }
    for name in w.names() {
        keel_log::info!(
            "health drive={=usize} | critical warning      | {=str} (bits {=u8:#04x})",
            drive,
            name,
            w.0
        );
    }
    match (s.temperature_k, s.temperature_c()) {
        (Some(k), Some(c)) => keel_log::info!(
            "health drive={=usize} | temperature           | {=u16} K ({=i32} C)",
            drive,
            k,
            c
        ),
        _ => keel_log::info!(
            "health drive={=usize} | temperature           | not reported",
            drive
        ),
    }
    keel_log::info!(
        "health drive={=usize} | available spare       | {=u8} % (threshold {=u8} %)",
        drive,
        s.available_spare,
        s.spare_threshold
    );
    keel_log::info!(
        "health drive={=usize} | percentage used       | {=u8} %",
        drive,
        s.percentage_used
    );
    let rows: [(&str, u128); 10] = [
        ("data units read      ", s.data_units_read),
        ("data units written   ", s.data_units_written),
        ("host read commands   ", s.host_read_commands),
        ("host write commands  ", s.host_write_commands),
        ("busy minutes         ", s.busy_minutes),
        ("power cycles         ", s.power_cycles),
        ("power-on hours       ", s.power_on_hours),
        ("unsafe shutdowns     ", s.unsafe_shutdowns),
        ("media errors         ", s.media_errors),
        ("error log entries    ", s.error_log_entries),
    ];
    for (name, v) in rows {
        keel_log::info!("health drive={=usize} | {=str} | {=u128}", drive, name, v);
    }
}

fn print_errors<'a, B: Board>(drive: usize, ctrl: &mut Ctrl<B>) -> Result<(), JobError<'a>> {
    let mut log: heapless::Vec<ErrorLogEntry, 16> = heapless::Vec::new();
    ctrl.error_log(&mut log)
        .map_err(nvme_fail("read the error log"))?;
    keel_log::info!(
        "health drive={=usize} error log: {=usize} entries",
        drive,
        log.len()
    );
    if log.is_empty() {
        return Ok(());
    }
    keel_log::info!(
        "health drive={=usize} | error count | sqid | cid    | status | lba        | nsid",
        drive
    );
    for e in &log {
        keel_log::info!(
            "health drive={=usize} | {=u64} | {=u16} | {=u16:#06x} | {=u16:#06x} | {=u64} | {=u32}",
            drive,
            e.error_count,
            e.sqid,
            e.cid,
            e.dev_status().code(),
            e.lba,
            e.nsid
        );
    }
    Ok(())
}

/// Writes `writes` commands of `blocks` blocks (each read back and verified), then reads the
/// SMART page again and prints what went up.
#[allow(clippy::too_many_arguments)]
fn io_between<'a, B: Board>(
    p: &B,
    d: &Drive<B>,
    ctrl: &mut Ctrl<B>,
    writes: u64,
    blocks: u32,
    lba: u64,
    seed: u64,
    before: &SmartLog,
) -> Result<(), JobError<'a>> {
    let ns = *d.namespace(1).ok_or(JobError::Failed("no namespace 1"))?;
    if lba
        .checked_add(writes * blocks as u64)
        .is_none_or(|e| e > ns.blocks)
    {
        return Err(JobError::Failed("writes past the end of namespace 1"));
    }
    let mut qp = crate::nvme::qpair(ctrl, p, 1)?;
    let len = blocks as usize * ns.block_size as usize;
    let wbuf = storage::dma(p.dma(), len).map_err(|_| JobError::Failed("DMA pool exhausted"))?;
    let rbuf = storage::dma(p.dma(), len).map_err(|_| JobError::Failed("DMA pool exhausted"))?;
    let clock = p.clock();
    let mut r = Ok(());
    for k in 0..writes {
        let shape = Shape {
            name: "health",
            buf_offset: 0,
            blocks,
            lba: lba + k * blocks as u64,
        };
        if let Err(e) = storage::write_read_verify(&mut qp, &clock, 1, &shape, &wbuf, &rbuf, seed) {
            keel_log::error!("health: write {=u64}: {}", k, e);
            r = Err(JobError::Failed("write, read back, verify"));
            break;
        }
    }
    if let Err((e, _)) = ctrl.delete_io_qpair(p.dma(), qp) {
        keel_log::warn!("health: delete queue pair: {}", e);
    }
    keel_hal::DmaAllocator::free(p.dma(), wbuf);
    keel_hal::DmaAllocator::free(p.dma(), rbuf);
    r?;
    let after = ctrl.smart_log().map_err(nvme_fail("read the SMART page"))?;
    keel_log::info!(
        "health drive={=usize} io: {=u64} writes and reads of {=u32} blocks of {=u32} B at lba {=u64}",
        d.index,
        writes,
        blocks,
        ns.block_size,
        lba
    );
    keel_log::info!(
        "health drive={=usize} before: host_write_commands={=u128} host_read_commands={=u128} data_units_written={=u128} data_units_read={=u128}",
        d.index,
        before.host_write_commands,
        before.host_read_commands,
        before.data_units_written,
        before.data_units_read
    );
    keel_log::info!(
        "health drive={=usize} after: host_write_commands={=u128} host_read_commands={=u128} data_units_written={=u128} data_units_read={=u128}",
        d.index,
        after.host_write_commands,
        after.host_read_commands,
        after.data_units_written,
        after.data_units_read
    );
    print_smart(d.index, &after);
    Ok(())
}

/// Sets the over-temperature threshold to the temperature (so it is reached), waits for the
/// SMART / health event the controller must raise, checks the page it read says so, then puts
/// the threshold back and checks the warning is gone.
fn temperature_event<'a, B: Board>(
    p: &B,
    drive: usize,
    ctrl: &mut Ctrl<B>,
    before: &SmartLog,
) -> Result<(), JobError<'a>> {
    let Some(k) = before.temperature_k else {
        return Err(JobError::Failed("the drive reports no temperature"));
    };
    let old = ctrl
        .temperature_threshold(false)
        .map_err(nvme_fail("get the temperature threshold"))?;
    keel_log::info!(
        "health drive={=usize} temperature {=u16} K, over-temperature threshold {=u16} K: setting it to {=u16} K",
        drive,
        k,
        old,
        k
    );
    ctrl.set_temperature_threshold(k, false)
        .map_err(nvme_fail("set the temperature threshold"))?;
    let clock = p.clock();
    let t0 = clock.now_ns();
    let mut got: Option<SmartLog> = None;
    while got.is_none() && clock.now_ns().saturating_sub(t0) < EVENT_WAIT_NS {
        ctrl.poll_events(|e| {
            if let AsyncEvent::Health { info, smart } = e {
                keel_log::info!(
                    "health drive={=usize} event: SMART / health, info {=u8:#x}, critical warning {=u8:#04x}",
                    drive,
                    info,
                    smart.critical_warning.0
                );
                if info == keel_nvme::AerResult::HEALTH_TEMPERATURE {
                    got = Some(smart);
                }
            } else {
                keel_log::info!("health drive={=usize} event: {}", drive, e_name(&e));
            }
        })
        .map_err(nvme_fail("poll events"))?;
        clock.delay_us(1000);
    }
    let restore = ctrl.set_temperature_threshold(old, false);
    let Some(smart) = got else {
        return Err(JobError::Failed("no temperature event came"));
    };
    restore.map_err(nvme_fail("restore the temperature threshold"))?;
    if !smart.critical_warning.has(CriticalWarning::TEMPERATURE) {
        return Err(JobError::Failed(
            "the event's page has no temperature warning",
        ));
    }
    let now = ctrl.smart_log().map_err(nvme_fail("read the SMART page"))?;
    keel_log::info!(
        "health drive={=usize} temperature event: warning bits {=u8:#04x} in its page; threshold back at {=u16} K: bits {=u8:#04x}",
        drive,
        smart.critical_warning.0,
        old,
        now.critical_warning.0
    );
    if now.critical_warning.has(CriticalWarning::TEMPERATURE) {
        return Err(JobError::Failed(
            "temperature warning still set after the threshold was restored",
        ));
    }
    Ok(())
}

fn e_name(e: &AsyncEvent) -> &'static str {
    match e {
        AsyncEvent::Health { .. } => "health",
        AsyncEvent::Error { .. } => "error",
        AsyncEvent::NamespacesChanged { .. } => "namespaces changed",
        AsyncEvent::Other(_) => "other",
        AsyncEvent::LogUnreadable { .. } => "log page unreadable",
    }
}
