//! Booting from flash: the reset stub that a flash image built by `cargo xtask flash` carries in
//! its last 4 KiB, and the boot-time check of the image's CRC32C.
//!
//! The stub is position-dependent on [`keel_flashimg::STUB_PADDR`] (0xFFFF_F000, the last page
//! below 4 GiB where the machine maps its boot flash). It is assembled here, inside the firmware
//! ELF, so that it can name firmware symbols; xtask copies its bytes out of `.rodata` into the
//! image and patches `keel_reset_image_base`. At reset the CPU runs in real mode with CS base
//! 0xFFFF_0000 and IP 0xFFF0: the reset vector jumps to the 16-bit part, which loads a flat GDT,
//! sets CR0.PE and far-jumps to the 32-bit part. That copies the PT_LOAD segments listed in the
//! image's segment table to their physical addresses (zeroing up to each segment's memory size),
//! records the image base in `keel_flash_base`, builds a minimal `hvm_start_info` (version 0, so
//! the memory map comes from fw_cfg `etc/e820`; cmdline → the image's config area) at
//! [`START_INFO`] and enters `pvh_start32` with EBX pointing at it, exactly as a PVH loader would.

use keel_flashimg::{self as img, ImageError};

/// Where the stub builds the `hvm_start_info` (below the AP trampoline at 0x8000).
pub const START_INFO: u32 = 0x6000;

core::arch::global_asm!(
    r#"
    .section .rodata.keel_reset, "a"
    .balign 4096
    .global keel_reset_start
    .global keel_reset_end
    .global keel_reset_image_base
    .code16
keel_reset_start:
reset16:
    cli
    cld
    /* A20 on (port 0x92, fast A20; bit 0 would reset the machine) */
    inb $0x92, %al
    orb $2, %al
    andb $0xFE, %al
    outb %al, $0x92
    /* CS base is 0xFFFF0000 here, so the GDT pointer is at CS offset 0xF000 + (off in stub) */
    lgdtl %cs:(0xF000 + reset_gdt_ptr - keel_reset_start)
    movl %cr0, %eax
    andl $0x9FFFFFFF, %eax  /* caches on: clear CD, NW (set at reset) */
    orl $1, %eax            /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $(0xFFFFF000 + reset32 - keel_reset_start)

    .code32
reset32:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl (0xFFFFF000 + keel_reset_image_base - keel_reset_start), %ebp
    movl {segtab}(%ebp), %ebx
    addl %ebp, %ebx
    movl {segcount}(%ebp), %edx
1:
    testl %edx, %edx
    jz 2f
    movl (%ebx), %edi       /* paddr */
    movl 4(%ebx), %esi      /* offset in the image */
    addl %ebp, %esi
    movl 8(%ebx), %ecx      /* filesz: dwords, then the odd bytes (TCG runs rep per unit) */
    movl %ecx, %eax
    shrl $2, %ecx
    rep movsl
    movl %eax, %ecx
    andl $3, %ecx
    rep movsb
    /* memsz - filesz is not zeroed here: it is .bss, which the firmware's entry zeroes itself
       on every boot path (PVH too), and .uninit (the stacks), which needs no zeroing. Zeroing
       it here as well cost ~8 ms of `rep stosl` under TCG. */
    addl $16, %ebx
    decl %edx
    jmp 1b
2:
    /* .data is in RAM now: tell the firmware where its image is */
    movl %ebp, keel_flash_base

    /* minimal hvm_start_info: magic, version 0, cmdline_paddr -> config area */
    movl ${start_info}, %edi
    movl $16, %ecx
    xorl %eax, %eax
    rep stosl
    movl $0x336ec578, {start_info}
    movl {config}(%ebp), %eax
    addl %ebp, %eax
    movl %eax, {start_info} + 24
    movl ${start_info}, %ebx
    movl $pvh_start32, %eax
    jmp *%eax

    .balign 8
reset_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code, flat */
    .quad 0x00CF92000000FFFF    /* 0x10: data, flat */
reset_gdt_ptr:
    .word 23
    .long 0xFFFFF000 + reset_gdt - keel_reset_start
    .balign 4
keel_reset_image_base:
    .long 0                     /* patched by xtask: physical address of the image */

    .org 0xFF0                  /* 0xFFFFFFF0: the reset vector */
    .code16
    jmp reset16
    .org 0x1000, 0xF4
keel_reset_end:

    .section .data.keel_flash, "aw"
    .balign 4
    .global keel_flash_base
keel_flash_base:
    .long 0                     /* 0: booted through PVH; else the flash image's base */
    .code64
    "#,
    segtab = const img::H_SEGTAB_OFFSET,
    segcount = const img::H_SEG_COUNT,
    config = const img::H_CONFIG_OFFSET,
    start_info = const START_INFO,
    options(att_syntax)
);

unsafe extern "C" {
    static keel_flash_base: u32;
}

/// The physical address of the flash image when the machine booted from it.
pub fn image_base() -> Option<u32> {
    // SAFETY: a 4-byte .data variable written only by the reset stub before any Rust code runs.
    let base = unsafe { (&raw const keel_flash_base).read_volatile() };
    (base != 0).then_some(base)
}

/// The flash image as mapped below 4 GiB.
fn image(base: u32) -> Result<&'static [u8], ImageError> {
    // SAFETY: the header is inside the flash mapping the stub just read from, identity-mapped by
    // the boot page tables; flash in read-array mode does not change under us.
    let head = unsafe { core::slice::from_raw_parts(base as usize as *const u8, img::HEADER_LEN) };
    let h = img::Header::parse(head)?;
    let len = h.image_len as usize;
    if len as u64 != img::base_paddr(0) - base as u64 {
        return Err(ImageError::LengthMismatch {
            header: h.image_len,
            actual: (img::base_paddr(0) - base as u64) as usize,
        });
    }
    // SAFETY: as above: base..4 GiB is the flash mapping, `len` bytes long.
    Ok(unsafe { core::slice::from_raw_parts(base as usize as *const u8, len) })
}

/// When booted from flash: verifies the whole image (header, layout, CRC32C). `Ok(None)` on the
/// PVH path.
pub fn check() -> Result<Option<(u32, img::Header)>, ImageError> {
    let Some(base) = image_base() else {
        return Ok(None);
    };
    let bytes = image(base)?;
    img::verify(bytes).map(|h| Some((base, h)))
}
