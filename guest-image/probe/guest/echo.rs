//! The `echo` step: receive one line on the UART through its interrupt
//! (IOAPIC pin 4 -> vector 0x24 on the BSP), echoing bytes as they come.
//!
//! The interrupt handler only drains the UART into a ring buffer; the main
//! loop consumes it. Both run on the BSP and the handler can only interrupt
//! the main loop inside `cpu::wait_for_interrupt`, so the ring needs no lock;
//! atomics just make the sharing explicit (they compile to plain `mov`s).

use crate::{cpu, ioapic, irq, lapic, serial};
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// Ring buffer size; a power of two so indices wrap with a mask.
const RING_SIZE: usize = 256;
/// Longest line kept; further bytes are still echoed but not stored.
const LINE_MAX: usize = 128;

static RING: [AtomicU8; RING_SIZE] = [const { AtomicU8::new(0) }; RING_SIZE];
/// Next slot the producer (interrupt handler or poll) writes.
static HEAD: AtomicU32 = AtomicU32::new(0);
/// Next slot the consumer (main loop) reads.
static TAIL: AtomicU32 = AtomicU32::new(0);
/// The line being collected (a static, not a stack array: see `main.rs`).
static LINE: [AtomicU8; LINE_MAX] = [const { AtomicU8::new(0) }; LINE_MAX];
/// Number of UART interrupts taken.
static IRQS: AtomicU32 = AtomicU32::new(0);

/// Moves every byte waiting in the UART into the ring (drops them if full).
fn drain_uart() {
    while serial::data_ready() {
        let byte = serial::read_byte();
        let head = HEAD.load(Ordering::Relaxed);
        if head.wrapping_sub(TAIL.load(Ordering::Acquire)) < RING_SIZE as u32 {
            RING[head as usize % RING_SIZE].store(byte, Ordering::Relaxed);
            HEAD.store(head.wrapping_add(1), Ordering::Release);
        }
    }
}

fn pop() -> Option<u8> {
    let tail = TAIL.load(Ordering::Relaxed);
    if tail == HEAD.load(Ordering::Acquire) {
        return None;
    }
    let byte = RING[tail as usize % RING_SIZE].load(Ordering::Relaxed);
    TAIL.store(tail.wrapping_add(1), Ordering::Release);
    Some(byte)
}

/// UART interrupt handler (called from `irq::irq_dispatch`, which sends the
/// EOI afterwards).
pub fn on_uart_interrupt() {
    IRQS.fetch_add(1, Ordering::Relaxed);
    // Reading IIR acknowledges the interrupt identification, as Linux does.
    let _ = cpu::inb(serial::IIR);
    drain_uart();
}

/// Runs the `echo` step; returns once a line has been received.
pub fn run() {
    HEAD.store(0, Ordering::Relaxed);
    TAIL.store(0, Ordering::Relaxed);
    IRQS.store(0, Ordering::Relaxed);

    irq::mask_pic();
    lapic::enable();
    let bsp = lapic::id() as u8;
    ioapic::route(serial::IRQ, irq::UART_VECTOR, bsp, ioapic::FIXED_EDGE_HIGH);
    cpu::outb(serial::MCR, serial::MCR_OUT2);
    cpu::outb(serial::IER, serial::IER_RX_AVAILABLE);
    serial::lock().str("probe: echo ready\n");

    let mut len = 0;
    let mut echoed = false;
    loop {
        while let Some(byte) = pop() {
            if byte == b'\n' || byte == b'\r' {
                finish(len, echoed);
                return;
            }
            serial::lock().byte(byte);
            echoed = true;
            if len < LINE_MAX {
                LINE[len].store(byte, Ordering::Relaxed);
                len += 1;
            }
        }
        // Interrupts are off here. Read the line status with interrupts
        // open for that one instruction, so that an interrupt that is
        // already pending (e.g. raised when IER was set, for bytes that came
        // early) is taken now and input goes through the interrupt path.
        let lsr = cpu::inb_interruptible(serial::LSR);
        if HEAD.load(Ordering::Acquire) != TAIL.load(Ordering::Relaxed) {
            continue;
        }
        // Bytes for which no interrupt came are picked up by polling (a
        // fallback that keeps the probe from sleeping forever). Anything that
        // arrives after the read above raises the (edge) interrupt, which
        // stays pending while interrupts are off and wakes the `hlt`.
        if lsr & serial::LSR_DATA_READY != 0 {
            drain_uart();
            continue;
        }
        cpu::wait_for_interrupt();
    }
}

/// Prints the result lines and turns the UART interrupt off again.
fn finish(len: usize, echoed: bool) {
    cpu::outb(serial::IER, 0);
    ioapic::route(serial::IRQ, irq::UART_VECTOR, 0, ioapic::MASKED);
    let mut w = serial::lock();
    if echoed {
        w.str("\n");
    }
    w.str("probe: echo-line: ");
    for byte in &LINE[..len] {
        w.byte(byte.load(Ordering::Relaxed));
    }
    w.str("\nprobe: echo irqs=")
        .dec(u64::from(IRQS.load(Ordering::Relaxed)))
        .str("\n");
}
