//! The local APIC in xAPIC mode (MMIO registers at 0xFEE0_0000), emulated
//! in the kernel by KVM.

use crate::cpu;

/// Physical base address of the local APIC registers (the reset value of
/// IA32_APIC_BASE; the VMM leaves it there).
pub const BASE: u64 = 0xfee0_0000;
/// Local APIC ID register; the id is in bits 31:24.
const ID: u64 = 0x20;
/// End-of-interrupt register: write 0 to acknowledge the in-service vector.
const EOI: u64 = 0xb0;
/// Spurious interrupt vector register.
const SVR: u64 = 0xf0;
/// LVT timer register: vector in bits 7:0, masked (bit 16), mode in bits
/// 18:17 (00 = one-shot).
const LVT_TIMER: u64 = 0x320;
/// Timer initial count (writing it starts the count-down; 0 stops it).
const TIMER_INITIAL_COUNT: u64 = 0x380;
/// Timer divide configuration.
const TIMER_DIVIDE: u64 = 0x3e0;
/// Divide configuration 1011b: divide by 1.
const TIMER_DIVIDE_BY_1: u32 = 0xb;
/// LVT bit 16: masked.
const LVT_MASKED: u32 = 1 << 16;
/// Interrupt command register, low half (writing it sends the IPI).
const ICR_LOW: u64 = 0x300;
/// Interrupt command register, high half: destination APIC id in bits 31:24.
const ICR_HIGH: u64 = 0x310;

/// SVR value: bit 8 = APIC software enable, bits 7:0 = spurious vector 0xff.
const SVR_ENABLE_SPURIOUS_FF: u32 = 0x1ff;
/// ICR bit 12: delivery status (1 = send pending).
const ICR_SEND_PENDING: u32 = 1 << 12;

/// ICR: INIT IPI, level-triggered (bit 15), asserted (bit 14), mode 101b.
pub const ICR_INIT_ASSERT: u32 = 0x0000_c500;
/// ICR: INIT IPI, level-triggered (bit 15), de-asserted, mode 101b.
pub const ICR_INIT_DEASSERT: u32 = 0x0000_8500;
/// ICR: start-up IPI (mode 110b); OR in the vector (start page number).
pub const ICR_STARTUP: u32 = 0x0000_0600;

fn read(reg: u64) -> u32 {
    // SAFETY: `BASE + reg` is a local APIC register, identity-mapped by the
    // VMM's page tables; reading it has no side effects.
    unsafe { cpu::mmio_read32(BASE + reg) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: `BASE + reg` is a local APIC register; the callers below write
    // documented values.
    unsafe { cpu::mmio_write32(BASE + reg, value) }
}

/// Software-enables this CPU's local APIC (spurious vector 0xff).
pub fn enable() {
    write(SVR, SVR_ENABLE_SPURIOUS_FF);
}

/// Programs the timer as one-shot, divide-by-1, delivering `vector`.
pub fn timer_setup(vector: u8) {
    write(TIMER_INITIAL_COUNT, 0);
    write(TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    write(LVT_TIMER, u32::from(vector));
}

/// Starts a one-shot count-down of `count` timer ticks (set up by
/// [`timer_setup`]); its interrupt comes once, when it reaches zero.
pub fn timer_start(count: u32) {
    write(TIMER_INITIAL_COUNT, count);
}

/// Stops the count-down (an interrupt already pending is still delivered).
pub fn timer_stop() {
    write(TIMER_INITIAL_COUNT, 0);
}

/// Stops the timer and masks its LVT entry.
#[allow(dead_code)]
pub fn timer_off() {
    write(TIMER_INITIAL_COUNT, 0);
    write(LVT_TIMER, LVT_MASKED);
}

/// This CPU's local APIC id.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Acknowledges the interrupt being serviced.
pub fn eoi() {
    write(EOI, 0);
}

/// Sends an IPI described by `icr_low` to the CPU with APIC id `dest`, and
/// waits (bounded) until the local APIC has sent it.
pub fn send_ipi(dest: u8, icr_low: u32) {
    write(ICR_HIGH, u32::from(dest) << 24);
    write(ICR_LOW, icr_low);
    for _ in 0..1000 {
        if read(ICR_LOW) & ICR_SEND_PENDING == 0 {
            break;
        }
        cpu::pause();
    }
}
