//! Seed 000 (PostgreSQL AIO v2.5): `pgaio_io_wait_for_free()` read the oldest in-flight
//! handle's *state*, then logged (which processed interrupts: the barrier handler waited for,
//! reclaimed and the handle was reused), then read its *generation*, and so waited on the new
//! owner's unsubmitted I/O: "waiting for own IO in wrong state" (PANIC).
//!
//! The interleaving is made deterministic with [`Driver::on_wait`], which runs exactly where
//! PostgreSQL logged. The naive variant below reproduces the bug against the same `Aio`;
//! ours reports "recycled" and carries on.
#![cfg(not(loom))]

use keel_aio::{Aio, AioError, Driver, HandleState, IoDesc, IoOp, IoRef, WaitOutcome};

type Pair = Aio<2, 1>;

const READ: IoDesc = IoDesc {
    op: IoOp::Read,
    lba: 0,
    blocks: 8,
};

fn submit_one(aio: &Pair) -> IoRef {
    let io = aio.acquire().unwrap();
    aio.define(io, READ).unwrap();
    aio.stage(io).unwrap();
    aio.submit(io).unwrap();
    io
}

/// Both handles in flight, `first` the oldest.
fn setup() -> (Pair, IoRef, IoRef) {
    let aio = Pair::new();
    let first = submit_one(&aio);
    let second = submit_one(&aio);
    (aio, first, second)
}

/// "Interrupt processing" run from the logging hook: the device completes `first`, the
/// barrier handler drives it to Idle, and another part of the backend immediately reuses
/// the handle (HandedOut, new generation). Later polls complete `second`.
struct Interrupts<'a> {
    aio: &'a Pair,
    first: IoRef,
    second: IoRef,
    fired: bool,
    reused: Option<IoRef>,
}

impl Interrupts<'_> {
    fn process(&mut self) {
        if self.fired {
            return;
        }
        self.fired = true;
        self.aio.complete(self.first, Ok(4096)).unwrap();
        assert_eq!(self.aio.finish(self.first), Ok(Ok(4096)));
        self.reused = Some(self.aio.acquire().unwrap());
    }
}

impl Driver for Interrupts<'_> {
    fn poll(&mut self) -> bool {
        let _ = self.aio.complete(self.second, Ok(4096));
        true
    }
    fn on_wait(&mut self, _io: IoRef, _in_flight: usize) {
        self.process();
    }
}

/// The pre-fix `pgaio_io_wait_for_free()` waiting step, over the public API: state and
/// generation read in two separate critical sections, the logging hook in between.
fn naive_wait_for_free(
    aio: &Pair,
    in_flight: &[usize],
    driver: &mut Interrupts,
) -> Result<(), AioError> {
    let index = in_flight[0]; // dclist_head_element(in_flight_ios)
    let state = aio.snapshot(index)?.state;
    match state {
        HandleState::Submitted | HandleState::CompletedIo => {
            driver.on_wait(IoRef::new(index as u16, 0), in_flight.len()); // pgaio_debug_io()
            let generation = aio.snapshot(index)?.generation; // read too late
            aio.wait(IoRef::new(index as u16, generation), driver)?;
            Ok(())
        }
        _ => Ok(()),
    }
}

#[test]
fn naive_variant_waits_on_the_reused_handle_in_the_wrong_state() {
    let (aio, first, second) = setup();
    let mut irq = Interrupts {
        aio: &aio,
        first,
        second,
        fired: false,
        reused: None,
    };
    let got = naive_wait_for_free(&aio, &[first.index(), second.index()], &mut irq);
    // PostgreSQL's "waiting for own IO in wrong state: HandedOut".
    assert_eq!(
        got,
        Err(AioError::NotSubmitted {
            state: HandleState::HandedOut
        })
    );
    assert_eq!(irq.reused.map(|r| r.index()), Some(first.index()));
}

#[test]
fn ours_reports_recycled_and_gets_a_handle() {
    let (aio, first, second) = setup();
    let mut irq = Interrupts {
        aio: &aio,
        first,
        second,
        fired: false,
        reused: None,
    };
    // The oldest-in-flight pair is taken in one critical section, before the hook runs.
    let got = aio.wait_for_free(&mut irq).unwrap();
    let reused = irq.reused.unwrap();
    assert_eq!(reused.index(), first.index());
    assert_eq!(reused.generation(), first.generation() + 1);
    // It went on to wait for `second`, which the next poll completed; it reclaimed that one.
    assert_eq!(got.index(), second.index());
    assert_eq!(got.generation(), second.generation() + 1);
    // The stale reference to `first` is "already done", not an error.
    assert_eq!(
        aio.wait(first, &mut || panic!("must not poll")),
        Ok(WaitOutcome::Recycled)
    );
    // The reused handle is untouched: still its new owner's.
    assert_eq!(
        aio.snapshot(reused.index()).unwrap().state,
        HandleState::HandedOut
    );
}
