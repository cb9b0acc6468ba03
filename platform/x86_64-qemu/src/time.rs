//! Time from the TSC, calibrated once against the PIT (channel 2, 10 ms gate).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{inb, outb, rdtsc};

static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per tick as a 32.32 fixed-point factor, so `now_ns` multiplies instead of
/// dividing (a 128-bit division is a library call; on the I/O path it showed up).
static NS_PER_TICK_Q32: AtomicU64 = AtomicU64::new(1 << 32);

const PIT_HZ: u64 = 1_193_182;
/// The PIT gate for calibration: 2 ms is 2386 PIT counts, so the TSC rate is known to about
/// 0.05%; a 10 ms gate was 10 ms of every boot.
const CAL_MS: u64 = 2;

/// Measures the TSC frequency. Call once, early, with interrupts off.
pub fn calibrate() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    let count = (PIT_HZ * CAL_MS / 1000) as u16;
    // Gate high, speaker off; channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count).
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    // Restart the count by toggling the gate.
    let g = inb(0x61) & !0x01;
    outb(0x61, g);
    outb(0x61, g | 0x01);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 100_000_000 {
            break; // no PIT: keep the 1 GHz guess rather than hang
        }
    }
    let t1 = rdtsc();
    let hz = (t1 - t0) * (1000 / CAL_MS);
    if hz > 1_000_000 {
        TSC_HZ.store(hz, Ordering::Relaxed);
        NS_PER_TICK_Q32.store(
            ((1_000_000_000u128 << 32) / hz as u128) as u64,
            Ordering::Relaxed,
        );
    }
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since the TSC was zero (QEMU resets it at machine start).
#[inline]
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}

/// TSC ticks to nanoseconds (one multiply).
#[inline]
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * NS_PER_TICK_Q32.load(Ordering::Relaxed) as u128) >> 32) as u64
}

/// Nanoseconds to TSC ticks (for deadlines; one division, not for hot paths).
#[inline]
pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * tsc_hz() as u128 / 1_000_000_000) as u64
}

/// Microseconds since the TSC was zero, which is roughly since QEMU started the machine.
pub fn micros() -> u64 {
    let t = rdtsc() as u128;
    (t * 1_000_000 / tsc_hz() as u128) as u64
}

pub fn delay_us(us: u64) {
    let end = rdtsc() + ns_to_ticks(us.saturating_mul(1000));
    while rdtsc() < end {
        crate::cpu::relax();
    }
}
