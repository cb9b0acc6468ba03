//! defmt's global logger: frames go to COM2 inside a critical section; timestamps are
//! microseconds since boot from the TSC.

use core::cell::UnsafeCell;
use critical_section::RestoreState;

#[defmt::global_logger]
struct Logger;

struct EncoderCell(UnsafeCell<(defmt::Encoder, RestoreState)>);
// SAFETY: the encoder is only touched between `acquire` and `release`, i.e. inside the
// critical section, which excludes every other core and this core's interrupt handlers.
unsafe impl Sync for EncoderCell {}

/// The encoder and the restore token of the critical section the current frame holds.
static ENCODER: EncoderCell = EncoderCell(UnsafeCell::new((
    defmt::Encoder::new(),
    RestoreState::invalid(),
)));

fn sink(bytes: &[u8]) {
    // SAFETY: called only from inside the logger's critical section (see `acquire`).
    let cs = unsafe { critical_section::CriticalSection::new() };
    crate::console::com2_write(cs, bytes);
}

// SAFETY: frames are written only while the critical section taken in `acquire` is held.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        // SAFETY: paired with the `release` in `Logger::release`.
        let token = unsafe { critical_section::acquire() };
        // SAFETY: inside the critical section just taken.
        unsafe {
            let e = &mut *ENCODER.0.get();
            e.1 = token;
            e.0.start_frame(sink);
        }
    }

    unsafe fn flush() {}

    unsafe fn release() {
        // SAFETY: defmt calls release only after acquire, so we hold the critical section.
        let token = unsafe {
            let e = &mut *ENCODER.0.get();
            e.0.end_frame(sink);
            e.1
        };
        // SAFETY: releases the section taken in `acquire` with its token.
        unsafe { critical_section::release(token) };
    }

    unsafe fn write(bytes: &[u8]) {
        // SAFETY: between acquire and release, so inside the critical section.
        unsafe { (*ENCODER.0.get()).0.write(bytes, sink) };
    }
}

defmt::timestamp!("{=u64:us}", crate::time::micros());
