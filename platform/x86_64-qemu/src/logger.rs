//! defmt's global logger: frames go to COM2 inside a critical section; timestamps are
//! microseconds since boot from the TSC.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

#[defmt::global_logger]
struct Logger;

struct EncoderCell(UnsafeCell<defmt::Encoder>);
// SAFETY: the encoder is only touched between `acquire` and `release`, i.e. inside the
// critical section, which excludes every other core and this core's interrupt handlers.
unsafe impl Sync for EncoderCell {}

static ENCODER: EncoderCell = EncoderCell(UnsafeCell::new(defmt::Encoder::new()));
static TOKEN: AtomicU8 = AtomicU8::new(0);

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
        TOKEN.store(token, Ordering::Relaxed);
        // SAFETY: inside the critical section just taken.
        unsafe { (*ENCODER.0.get()).start_frame(sink) };
    }

    unsafe fn flush() {}

    unsafe fn release() {
        // SAFETY: defmt calls release only after acquire, so we hold the critical section.
        unsafe { (*ENCODER.0.get()).end_frame(sink) };
        let token = TOKEN.load(Ordering::Relaxed);
        // SAFETY: releases the section taken in `acquire` with its token.
        unsafe { critical_section::release(token) };
    }

    unsafe fn write(bytes: &[u8]) {
        // SAFETY: between acquire and release, so inside the critical section.
        unsafe { (*ENCODER.0.get()).write(bytes, sink) };
    }
}

defmt::timestamp!("{=u64:us}", crate::time::micros());
