//! COM1 (0x3F8): the human-readable console. COM2 (0x2F8): the binary defmt stream. Keeping them
//! on two ports keeps text and frames apart (platform-notes.md).

use core::cell::RefCell;
use core::fmt::{self, Write};
use critical_section::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

// SAFETY: 0x3F8 and 0x2F8 are the standard COM1/COM2 ports; nothing else in the image touches them.
static COM1: Mutex<RefCell<Uart16550<PioBackend>>> =
    Mutex::new(RefCell::new(unsafe { const_port(0x3f8) }));
// SAFETY: as above.
static COM2: Mutex<RefCell<Uart16550<PioBackend>>> =
    Mutex::new(RefCell::new(unsafe { const_port(0x2f8) }));

/// # Safety
/// `port` must be a 16550 that nothing else drives.
const unsafe fn const_port(port: u16) -> Uart16550<PioBackend> {
    // SAFETY: forwarded to the caller.
    match unsafe { Uart16550::new_port(port) } {
        Ok(u) => u,
        Err(_) => panic!("bad port"),
    }
}

pub(crate) fn init() {
    critical_section::with(|cs| {
        let _ = COM1.borrow_ref_mut(cs).init(Config::default());
        let _ = COM2.borrow_ref_mut(cs).init(Config::default());
    });
}

/// Raw bytes to COM2 (defmt frames). The caller holds the critical section.
pub(crate) fn com2_write(cs: critical_section::CriticalSection<'_>, bytes: &[u8]) {
    COM2.borrow_ref_mut(cs).send_bytes_exact(bytes);
}

struct Com1<'cs>(critical_section::CriticalSection<'cs>);
impl Write for Com1<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut u = COM1.borrow_ref_mut(self.0);
        for b in s.bytes() {
            if b == b'\n' {
                u.send_bytes_exact(b"\r");
            }
            u.send_bytes_exact(&[b]);
        }
        Ok(())
    }
}

/// Writes `args` to COM1 (`\n` becomes `\r\n`).
pub fn print(args: fmt::Arguments<'_>) {
    critical_section::with(|cs| {
        let _ = Com1(cs).write_fmt(args);
    });
}

/// The UART has no buffer beyond its FIFO, which QEMU drains at once; nothing to wait for.
pub(crate) fn flush() {}

/// `println!` to COM1, the text console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
