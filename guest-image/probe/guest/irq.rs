//! Interrupt and exception plumbing: the IDT, the assembly entry stubs, the
//! Rust dispatcher, and masking the legacy 8259 PICs.
//!
//! Interrupts are only ever enabled inside [`cpu::wait_for_interrupt`], so
//! device handlers run on the interrupted CPU's stack at a known-quiet point.
//! The stubs still save every caller-saved register (and xmm0-15, with
//! `movdqu`, which this host's emulator supports) before calling Rust.

use crate::{cpu, echo, serial, virtio};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// Vector of the UART interrupt (IOAPIC pin 4): 0x20 + ISA IRQ 4, as Linux
/// numbers legacy IRQs.
pub const UART_VECTOR: u8 = 0x24;
/// Vector of virtio device n (its IOAPIC pin is the GSI the VMM gave it):
/// `VIRTIO_VECTOR_BASE + n`, for n < `virtio::MAX_DEVICES`.
pub const VIRTIO_VECTOR_BASE: u8 = 0x30;
/// Vector of the local APIC timer (the bounded sleeps of the virtio drivers).
pub const TIMER_VECTOR: u8 = 0x40;
/// Byte distance between consecutive virtio stubs (`.balign 16` below).
const VIRTIO_STUB_STRIDE: u64 = 16;
/// Spurious-interrupt vector programmed into the local APIC's SVR.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Code segment selector the gates name: 64-bit ring-0 code is 0x08 in the
/// VMM's GDT (BSP) and in the AP trampoline's GDT alike.
const CODE_SELECTOR: u64 = 0x08;
/// IDT gate type/attributes: present (bit 7), DPL 0, type 0xE = 64-bit
/// interrupt gate (clears IF on entry).
const INTERRUPT_GATE: u64 = 0x8e;
/// 8259 PIC interrupt mask registers (master, slave).
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_DATA: u16 = 0xa1;

/// Number of architectural exception vectors (0-31).
const EXCEPTIONS: usize = 32;
/// Byte distance between consecutive exception stubs (`.balign 16` below).
const EXCEPTION_STUB_STRIDE: u64 = 16;

/// The IDT: 256 gates of two u64 each. Atomics give safe interior
/// mutability; relaxed stores compile to plain `mov`s.
#[repr(C, align(16))]
struct Idt([AtomicU64; 512]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; 512]);

extern "C" {
    /// First of the 32 exception stubs, `EXCEPTION_STUB_STRIDE` bytes apart.
    fn probe_exception_stubs();
    /// Entry stub for [`UART_VECTOR`].
    fn probe_irq_uart();
    /// First of the `virtio::MAX_DEVICES` virtio stubs, `VIRTIO_STUB_STRIDE`
    /// bytes apart.
    fn probe_irq_virtio_stubs();
    /// Entry stub for [`TIMER_VECTOR`].
    fn probe_irq_timer();
    /// Entry stub for [`SPURIOUS_VECTOR`]: returns at once, no EOI.
    fn probe_irq_spurious();
}

// Exception stubs: each pushes a dummy error code if the CPU did not push
// one, then the vector, so `probe_exception_common` always sees
// [vector, error code, rip, cs, rflags, rsp, ss].
//
// Device interrupt stubs: push rdi, load the vector into edi, and share
// `probe_irq_common`, which saves the other caller-saved registers and
// xmm0-15, calls `irq_dispatch(vector)` and returns with `iretq`.
global_asm!(
    ".section .text.probe_irq, \"ax\"",
    ".macro EXC_NOERR vec",
    ".balign 16",
    "push 0",
    "push \\vec",
    "jmp probe_exception_common",
    ".endm",
    ".macro EXC_ERR vec",
    ".balign 16",
    "push \\vec",
    "jmp probe_exception_common",
    ".endm",
    "",
    ".global probe_exception_stubs",
    ".balign 16",
    "probe_exception_stubs:",
    "EXC_NOERR 0",  // #DE
    "EXC_NOERR 1",  // #DB
    "EXC_NOERR 2",  // NMI
    "EXC_NOERR 3",  // #BP
    "EXC_NOERR 4",  // #OF
    "EXC_NOERR 5",  // #BR
    "EXC_NOERR 6",  // #UD
    "EXC_NOERR 7",  // #NM
    "EXC_ERR 8",    // #DF
    "EXC_NOERR 9",  // coprocessor segment overrun
    "EXC_ERR 10",   // #TS
    "EXC_ERR 11",   // #NP
    "EXC_ERR 12",   // #SS
    "EXC_ERR 13",   // #GP
    "EXC_ERR 14",   // #PF
    "EXC_NOERR 15", // reserved
    "EXC_NOERR 16", // #MF
    "EXC_ERR 17",   // #AC
    "EXC_NOERR 18", // #MC
    "EXC_NOERR 19", // #XM
    "EXC_NOERR 20", // #VE
    "EXC_ERR 21",   // #CP
    "EXC_NOERR 22",
    "EXC_NOERR 23",
    "EXC_NOERR 24",
    "EXC_NOERR 25",
    "EXC_NOERR 26",
    "EXC_NOERR 27",
    "EXC_NOERR 28", // #HV
    "EXC_ERR 29",   // #VC
    "EXC_ERR 30",   // #SX
    "EXC_NOERR 31",
    "",
    "probe_exception_common:",
    "mov rdi, rsp",
    "and rsp, -16",
    "cld",
    "call {exception_handler}",
    "ud2",
    "",
    ".global probe_irq_uart",
    "probe_irq_uart:",
    "push rdi",
    "mov edi, {uart_vector}",
    "jmp probe_irq_common",
    "",
    ".global probe_irq_virtio_stubs",
    ".balign 16",
    "probe_irq_virtio_stubs:",
    ".irp n, 0, 1, 2, 3, 4, 5, 6, 7",
    ".balign 16",
    "push rdi",
    "mov edi, {virtio_vector_base} + \\n",
    "jmp probe_irq_common",
    ".endr",
    "",
    ".global probe_irq_timer",
    "probe_irq_timer:",
    "push rdi",
    "mov edi, {timer_vector}",
    "jmp probe_irq_common",
    "",
    ".global probe_irq_spurious",
    "probe_irq_spurious:",
    "iretq",
    "",
    // On entry the CPU aligned rsp to 16 and pushed 5 qwords; with rdi and
    // the 8 pushes below that is 14 qwords, so rsp is 16-byte aligned again.
    "probe_irq_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "sub rsp, 256",
    "movdqu [rsp + 0x00], xmm0",
    "movdqu [rsp + 0x10], xmm1",
    "movdqu [rsp + 0x20], xmm2",
    "movdqu [rsp + 0x30], xmm3",
    "movdqu [rsp + 0x40], xmm4",
    "movdqu [rsp + 0x50], xmm5",
    "movdqu [rsp + 0x60], xmm6",
    "movdqu [rsp + 0x70], xmm7",
    "movdqu [rsp + 0x80], xmm8",
    "movdqu [rsp + 0x90], xmm9",
    "movdqu [rsp + 0xa0], xmm10",
    "movdqu [rsp + 0xb0], xmm11",
    "movdqu [rsp + 0xc0], xmm12",
    "movdqu [rsp + 0xd0], xmm13",
    "movdqu [rsp + 0xe0], xmm14",
    "movdqu [rsp + 0xf0], xmm15",
    "cld",
    "call {dispatch}",
    "movdqu xmm0, [rsp + 0x00]",
    "movdqu xmm1, [rsp + 0x10]",
    "movdqu xmm2, [rsp + 0x20]",
    "movdqu xmm3, [rsp + 0x30]",
    "movdqu xmm4, [rsp + 0x40]",
    "movdqu xmm5, [rsp + 0x50]",
    "movdqu xmm6, [rsp + 0x60]",
    "movdqu xmm7, [rsp + 0x70]",
    "movdqu xmm8, [rsp + 0x80]",
    "movdqu xmm9, [rsp + 0x90]",
    "movdqu xmm10, [rsp + 0xa0]",
    "movdqu xmm11, [rsp + 0xb0]",
    "movdqu xmm12, [rsp + 0xc0]",
    "movdqu xmm13, [rsp + 0xd0]",
    "movdqu xmm14, [rsp + 0xe0]",
    "movdqu xmm15, [rsp + 0xf0]",
    "add rsp, 256",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "pop rdi",
    "iretq",
    ".text",
    exception_handler = sym exception_handler,
    dispatch = sym irq_dispatch,
    uart_vector = const UART_VECTOR,
    virtio_vector_base = const VIRTIO_VECTOR_BASE,
    timer_vector = const TIMER_VECTOR,
);

const _: () = assert!(
    virtio::MAX_DEVICES == 8,
    "one stub per device in .irp above"
);

/// A 64-bit interrupt gate to `handler`, as the two u64 halves of the entry.
fn gate(handler: u64) -> (u64, u64) {
    let low = (handler & 0xffff)
        | CODE_SELECTOR << 16
        | INTERRUPT_GATE << 40
        | ((handler >> 16) & 0xffff) << 48;
    (low, handler >> 32)
}

fn set_gate(vector: u8, handler: u64) {
    let (low, high) = gate(handler);
    let index = 2 * usize::from(vector);
    IDT.0[index].store(low, Ordering::Relaxed);
    IDT.0[index + 1].store(high, Ordering::Relaxed);
}

/// Fills the IDT (exceptions, the UART, virtio and timer vectors, the
/// spurious vector) and
/// loads it on this CPU. Called once, by the BSP, before any other CPU runs.
pub fn install() {
    let stubs = probe_exception_stubs as *const () as u64;
    for vector in 0..EXCEPTIONS as u8 {
        set_gate(vector, stubs + u64::from(vector) * EXCEPTION_STUB_STRIDE);
    }
    set_gate(UART_VECTOR, probe_irq_uart as *const () as u64);
    let virtio_stubs = probe_irq_virtio_stubs as *const () as u64;
    for n in 0..virtio::MAX_DEVICES as u8 {
        set_gate(
            VIRTIO_VECTOR_BASE + n,
            virtio_stubs + u64::from(n) * VIRTIO_STUB_STRIDE,
        );
    }
    set_gate(TIMER_VECTOR, probe_irq_timer as *const () as u64);
    set_gate(SPURIOUS_VECTOR, probe_irq_spurious as *const () as u64);
    load();
}

/// Loads the (already filled) IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.0.as_ptr() as u64,
    };
    // SAFETY: the pointer describes the static IDT, whose gates are either
    // empty (not present) or point at the stubs above.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

/// Masks every line of both 8259 PICs. Required before taking IOAPIC
/// interrupts here: KVM also routes GSIs 0-15 to the PIC, and the BSP's
/// LINT0 is in ExtINT mode, so an unmasked PIC injects a second interrupt
/// with a vector nobody programmed (a triple fault on this host).
pub fn mask_pic() {
    cpu::outb(PIC_MASTER_DATA, 0xff);
    cpu::outb(PIC_SLAVE_DATA, 0xff);
}

/// Called by `probe_irq_common` with interrupts disabled, on the interrupted
/// CPU's stack. Runs the device handler, then acknowledges the local APIC.
extern "C" fn irq_dispatch(vector: u64) {
    let virtio_vectors =
        u64::from(VIRTIO_VECTOR_BASE)..u64::from(VIRTIO_VECTOR_BASE) + virtio::MAX_DEVICES as u64;
    if vector == u64::from(UART_VECTOR) {
        echo::on_uart_interrupt();
    } else if virtio_vectors.contains(&vector) {
        virtio::on_interrupt((vector - u64::from(VIRTIO_VECTOR_BASE)) as usize);
    }
    // TIMER_VECTOR: waking the `hlt` was the point; nothing else to do.
    crate::lapic::eoi();
}

/// What the CPU pushed for an exception, plus what the stub pushed.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    _cs: u64,
    rflags: u64,
}

/// Called by `probe_exception_common`: reports the exception and crashes the
/// VM on purpose so the VMM exits non-zero instead of hanging.
extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    serial::lock_or_steal()
        .str("\nprobe: exception vector=")
        .dec(frame.vector)
        .str(" error=")
        .hex(frame.error_code)
        .str(" rip=")
        .hex(frame.rip)
        .str(" rflags=")
        .hex(frame.rflags)
        .str("\n");
    cpu::triple_fault()
}
