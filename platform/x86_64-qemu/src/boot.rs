//! The first instructions: the PVH entry note, the 32-bit entry stub that enters long mode, and
//! the application-processor trampoline (16 → 32 → 64 bit) that the boot core copies below 1 MiB.
//!
//! The 32-bit stub identity-maps the low 4 GiB with 2 MiB pages (3-4 GiB uncached, where the PCI
//! and APIC windows live) just to reach Rust; `paging` then builds the real tables from the boot
//! memory map and switches to them.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 8                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, keel_start_info

    /* zero .bss (the boot page tables live there; ~5 MiB: the stacks are in .uninit, which
       is not zeroed). 64 bytes per pass with 8-byte MMX stores, the tail with
       `rep stosb`: TCG runs `rep stos` one unit per step, and one byte at a time this took
       ~33 ms of the boot. `.bss` starts page-aligned (link.ld), so the stores are aligned. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    pxor %mm0, %mm0
    movl %ecx, %edx
    shrl $6, %ecx
    jz 4f
3:
    movq %mm0, (%edi)
    movq %mm0, 8(%edi)
    movq %mm0, 16(%edi)
    movq %mm0, 24(%edi)
    movq %mm0, 32(%edi)
    movq %mm0, 40(%edi)
    movq %mm0, 48(%edi)
    movq %mm0, 56(%edi)
    addl $64, %edi
    decl %ecx
    jnz 3b
4:
    movl %edx, %ecx
    andl $63, %ecx
    rep stosb
    emms

    /* PD entries: 2048 x 2 MiB pages = 4 GiB; PS|RW|P, plus PCD|PWT from 3 GiB up */
    movl $keel_boot_pd, %edi
    movl $0x83, %eax
    xorl %ecx, %ecx
1:
    movl %eax, %edx
    cmpl $1536, %ecx
    jb 2f
    orl $0x18, %edx
2:
    movl %edx, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    /* PDPT[0..4] -> the four PDs; PML4[0] -> PDPT */
    movl $keel_boot_pdpt, %edi
    movl $keel_boot_pd, %eax
    orl $3, %eax
    movl $4, %ecx
3:
    movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 3b
    movl $keel_boot_pdpt, %eax
    orl $3, %eax
    movl %eax, keel_boot_pml4

    movl $keel_boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax        /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xC0000080, %ecx  /* EFER */
    rdmsr
    orl $0x100, %eax        /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax  /* clear EM, TS */
    orl $0x80000023, %eax   /* PG | NE | MP | PE */
    movl %eax, %cr0

    lgdt keel_boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $keel_boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl keel_start_info, %edi
    movabsq $keel_boot_main, %rax
    call *%rax
4:  hlt
    jmp 4b

    /* ---- AP trampoline: copied to AP_TRAMPOLINE (0x8000); position-dependent on that ---- */
    .section .rodata.ap_tramp, "a"
    .balign 16
    .global keel_ap_tramp_start
    .global keel_ap_tramp_end
    .global keel_ap_tramp_cr3
    .global keel_ap_tramp_stack
    .global keel_ap_tramp_arg
    .code16
keel_ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (0x8000 + ap_gdt_ptr - keel_ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0x8000 + ap32 - keel_ap_tramp_start)
    .code32
ap32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl (0x8000 + keel_ap_tramp_cr3 - keel_ap_tramp_start), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(0x8000 + ap64 - keel_ap_tramp_start)
    .code64
ap64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq (0x8000 + keel_ap_tramp_stack - keel_ap_tramp_start), %rsp
    movq (0x8000 + keel_ap_tramp_arg - keel_ap_tramp_start), %rdi
    xorl %ebp, %ebp
    movabsq $keel_ap_main, %rax
    call *%rax
5:  hlt
    jmp 5b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
    .quad 0x00AF9A000000FFFF    /* 0x18: 64-bit code */
ap_gdt_ptr:
    .word 31
    .long 0x8000 + ap_gdt - keel_ap_tramp_start
    .balign 8
keel_ap_tramp_cr3:   .quad 0
keel_ap_tramp_stack: .quad 0
keel_ap_tramp_arg:   .quad 0
keel_ap_tramp_end:

    /* ---- boot-time data ---- */
    .section .data.boot, "aw"
    .balign 16
keel_boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
keel_boot_gdt_ptr:
    .word 23
    .quad keel_boot_gdt
    .global keel_start_info
keel_start_info:
    .long 0

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global keel_boot_pml4
keel_boot_pml4:  .skip 4096
keel_boot_pdpt:  .skip 4096
keel_boot_pd:    .skip 4 * 4096
    /* The boot stack needs no zeroing: in .uninit (link.ld), after what the boot zeroes. */
    .section .uninit.boot_stack, "aw", @nobits
    .balign 4096
keel_boot_stack: .skip 4 * 1024 * 1024
    .global keel_boot_stack_top
keel_boot_stack_top:
    "#,
    options(att_syntax)
);

/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const AP_TRAMPOLINE: u64 = 0x8000;

unsafe extern "C" {
    static keel_ap_tramp_start: u8;
    static keel_ap_tramp_end: u8;
    static keel_ap_tramp_cr3: u8;
    static keel_ap_tramp_stack: u8;
    static keel_ap_tramp_arg: u8;
}

/// Byte range of the trampoline image and the offsets of its three patchable slots.
pub struct Trampoline {
    pub image: &'static [u8],
    pub cr3_offset: usize,
    pub stack_offset: usize,
    pub arg_offset: usize,
}

pub fn trampoline() -> Trampoline {
    let start = &raw const keel_ap_tramp_start as usize;
    let end = &raw const keel_ap_tramp_end as usize;
    // SAFETY: the two symbols delimit the trampoline bytes in .rodata, which are never written.
    let image = unsafe { core::slice::from_raw_parts(start as *const u8, end - start) };
    Trampoline {
        image,
        cr3_offset: &raw const keel_ap_tramp_cr3 as usize - start,
        stack_offset: &raw const keel_ap_tramp_stack as usize - start,
        arg_offset: &raw const keel_ap_tramp_arg as usize - start,
    }
}
