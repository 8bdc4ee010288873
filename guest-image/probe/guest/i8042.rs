//! The i8042 keyboard controller, used only for its reset line (what Linux
//! does for `reboot=k`); the VMM treats the reset as "guest asked to stop"
//! and exits 0.

use crate::cpu;

/// Controller status (read) / command (write) port.
const COMMAND: u16 = 0x64;
/// Status bit 1: input buffer full (the controller has not taken the last
/// command yet).
const STATUS_INPUT_FULL: u8 = 0x02;
/// Command 0xFE: pulse output port bit 0, the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Asks the controller to reset the machine. Returns if the VMM ignores it.
pub fn reset() {
    // Wait (bounded) for the controller to accept a command, as Linux does.
    for _ in 0..1000 {
        if cpu::inb(COMMAND) & STATUS_INPUT_FULL == 0 {
            break;
        }
        cpu::pause();
    }
    cpu::outb(COMMAND, CMD_RESET_CPU);
}
