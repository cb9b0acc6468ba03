//! QEMU's isa-debug-exit (port 0xf4): writing `v` exits QEMU with status `(v << 1) | 1`.
//! Only [`SUCCESS_STATUS`] means success; a triple fault under `-no-reboot` exits 0, so 0 can't.

const PORT: u16 = 0xf4;
const SUCCESS: u32 = 0x10;
const FAILURE: u32 = 0x11;
// QEMU then exits with status (0x10 << 1) | 1 = 33, which `cargo xtask` alone treats as success.

pub fn success() -> ! {
    crate::console::flush();
    crate::cpu::outl(PORT, SUCCESS);
    crate::cpu::halt()
}

pub fn failure() -> ! {
    crate::console::flush();
    crate::cpu::outl(PORT, FAILURE);
    crate::cpu::halt()
}
