//! x86_64: the guest physical layout and everything KVM needs to start a
//! 64-bit Linux kernel (or the probe guest) at its long-mode entry point.

pub mod acpi;
pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
