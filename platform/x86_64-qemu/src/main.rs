//! Keel firmware for bare-metal x86_64 under QEMU: the application. The board library
//! (`keel_x86_64_qemu`) boots the machine and calls [`main`]; the job table and every job are
//! in `keel-jobs`. No `unsafe` here.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use keel_x86_64_qemu::QemuBoard;

keel_x86_64_qemu::entry!(main);

/// Runs the job the boot command line names (default `boot`) and ends the run with its result.
fn main(board: &'static QemuBoard) -> ! {
    if keel_jobs::run(board, board.cmdline(), "boot") {
        board.exit_success()
    } else {
        board.exit_failure()
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    keel_x86_64_qemu::report_panic(info)
}
