//! GDT + TSS per core, one IDT whose 256 gates all run on IST stacks, the interrupt entry stubs
//! (in `global_asm!`: the `x86-interrupt` ABI is unstable) and the Rust dispatcher.
//!
//! The IDT is hand-rolled rather than `x86_64::structures::idt`: that type is built around
//! `extern "x86-interrupt"` handlers and rejects generic indexing of error-code vectors, while
//! here every gate points at an entry of one asm stub table.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use crate::cpu::MAX_CORES;

pub const TIMER_VECTOR: u8 = 0x20;
/// Wakes a halted idle core (`smp::post`); the handler only acknowledges it.
pub const WAKE_VECTOR: u8 = 0x21;
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// IST slots: 1 = external interrupts, 2 = ordinary exceptions, 3 = NMI / #DF / #MC, so an
/// exception inside an interrupt handler never lands on the stack that handler is using.
const IST_IRQ: u8 = 1;
const IST_EXC: u8 = 2;
const IST_CRIT: u8 = 3;
const IST_SIZE: usize = 16 * 1024;

core::arch::global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
    .balign 16
    .global keel_isr_table
keel_isr_table:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp keel_isr_common
    .set vec, vec + 1
    .endr

keel_isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rbp
    subq $512, %rsp
    andq $-16, %rsp
    fxsave (%rsp)
    movq %rbp, %rdi
    cld
    call keel_interrupt
    fxrstor (%rsp)
    movq %rbp, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static keel_isr_table: u8;
}

/// What the entry stub saved, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate([u8; 16]);

#[repr(C, align(16))]
struct Idt([Gate; 256]);

#[repr(C, align(16))]
struct Stack([u8; IST_SIZE]);

struct PerCore {
    gdt: GlobalDescriptorTable,
    tss: TaskStateSegment,
}

/// Storage written once per core during that core's bring-up, then only read by the CPU.
struct BootCell<T>(UnsafeCell<T>);
// SAFETY: each element is written only by the core that owns it (PER_CORE[i] by core i) or, for
// the IDT, only by the boot core before any other core starts; afterwards only the CPU reads them.
unsafe impl<T> Sync for BootCell<T> {}

static IDT: BootCell<Idt> = BootCell(UnsafeCell::new(Idt([Gate([0; 16]); 256])));
static PER_CORE: [BootCell<PerCore>; MAX_CORES] = [const {
    BootCell(UnsafeCell::new(PerCore {
        gdt: GlobalDescriptorTable::new(),
        tss: TaskStateSegment::new(),
    }))
}; MAX_CORES];
/// IST stacks, in `.uninit` (link.ld: not zeroed at boot; a stack is written before it is read).
#[link_section = ".uninit.ist_stacks"]
static IST_STACKS: [BootCell<MaybeUninit<[Stack; 3]>>; MAX_CORES] =
    [const { BootCell(UnsafeCell::new(MaybeUninit::uninit())) }; MAX_CORES];

fn gate(handler: u64, selector: u16, ist: u8) -> Gate {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[4] = ist & 7;
    g[5] = 0x8E; // present, DPL 0, 64-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    Gate(g)
}

/// Fills the shared IDT. Boot core only, before any other core starts.
pub fn init_idt() {
    let base = &raw const keel_isr_table as u64;
    // SAFETY: only the boot core calls this, once, before APs exist and before `sti`.
    let idt = unsafe { &mut *IDT.0.get() };
    for (v, g) in idt.0.iter_mut().enumerate() {
        let ist = match v {
            2 | 8 | 18 => IST_CRIT,
            0..=31 => IST_EXC,
            _ => IST_IRQ,
        };
        *g = gate(base + 16 * v as u64, 0x08, ist);
    }
}

/// Loads this core's GDT (code, data, TSS with three IST stacks) and the shared IDT.
pub fn init_core(index: usize) {
    // SAFETY: core `index` is the only writer of PER_CORE[index], and does it once at bring-up.
    let pc: &'static mut PerCore = unsafe { &mut *PER_CORE[index].0.get() };
    // SAFETY: only core `index` takes the addresses of its own IST stacks.
    let ist = IST_STACKS[index].0.get() as *const Stack;
    for i in 0..3 {
        // SAFETY: only the address of stack `i` of this core's three is computed.
        let top = VirtAddr::from_ptr(unsafe { ist.add(i) }) + IST_SIZE as u64;
        pc.tss.interrupt_stack_table[i] = top;
    }
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    // SAFETY: the TSS lives in a static and outlives the GDT that points at it.
    let tss = gdt.append(unsafe { Descriptor::tss_segment_unchecked(&pc.tss) });
    pc.gdt = gdt;
    // SAFETY: the GDT is in a static (lives forever) and its selectors are loaded right away.
    unsafe {
        pc.gdt.load_unsafe();
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss);
    }
    debug_assert_eq!(code, SegmentSelector(0x08));
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(IDT.0.get()),
    };
    // SAFETY: the IDT is a static filled by `init_idt`; every gate points into the stub table.
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}

/// Runs `f` as a polled I/O core, SPDK style: no interrupt reaches this core while `f` runs.
/// The local timer is masked at its source first (while interrupts are still enabled, so a
/// tick already pending is taken now, not left pending), then interrupts are masked; both are
/// restored afterwards. A critical section inside `f` is then only its cross-core lock.
///
/// Nothing is left pending on purpose: under emulation a pending interrupt the core cannot take
/// sends every exit from translated code through the emulator's global lock, which the
/// emulated devices need too.
pub fn polled<R>(f: impl FnOnce() -> R) -> R {
    let timer_was_masked = crate::apic::mask_timer(true);
    let were_enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::disable();
    let r = f();
    if !timer_was_masked {
        crate::apic::mask_timer(false);
    }
    if were_enabled {
        x86_64::instructions::interrupts::enable();
    }
    r
}

/// Moves the legacy 8259 PICs to vectors 0xE0..0xEF and masks every line: all interrupts come
/// through the local APIC, and a stray PIC interrupt can't land on an exception vector.
pub fn disable_pic() {
    use crate::cpu::outb;
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0xE0);
    outb(0xA1, 0xE8);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

pub static TICKS: AtomicU64 = AtomicU64::new(0);

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP",
    "alignment check",
    "machine check",
    "SIMD FP",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

#[unsafe(no_mangle)]
extern "C" fn keel_interrupt(frame: &mut InterruptFrame) {
    match frame.vector {
        v @ 0..=31 => exception(v as usize, frame),
        v if v == TIMER_VECTOR as u64 => {
            TICKS.fetch_add(1, Ordering::Relaxed);
            crate::apic::eoi();
        }
        v if v == WAKE_VECTOR as u64 => crate::apic::eoi(),
        v if v == SPURIOUS_VECTOR as u64 => {}
        v => {
            keel_log::warn!(
                "unexpected interrupt vector {=u64} on core {=usize}",
                v,
                crate::cpu::core_index()
            );
            crate::apic::eoi();
        }
    }
}

fn exception(v: usize, f: &InterruptFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let core = crate::cpu::core_index();
    crate::println!(
        "EXCEPTION {} ({}) on core {}: error {:#x} rip {:#x} cr2 {:#x} rsp {:#x}",
        v,
        EXCEPTION_NAMES[v],
        core,
        f.error,
        f.rip,
        cr2,
        f.rsp
    );
    keel_log::error!(
        "exception vector={=usize} ({=str}) core={=usize} error={=u64:#x} rip={=u64:#x} cr2={=u64:#x}",
        v, EXCEPTION_NAMES[v], core, f.error, f.rip, cr2
    );
    crate::exit::failure()
}
