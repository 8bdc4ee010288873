//! Guest-visible devices of the Keystone VMM.
//!
//! Every device the guest can touch lives here, one module per device, each
//! with its tests beside it. A device gets guest memory (virtio devices), its
//! eventfds and its backend; it knows nothing of the CLI or of KVM.
//!
//! The whole guest-visible surface is assembled in one place,
//! `keystone_vmm::device_manager`, and documented in the README's table.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod acpi_sleep;
pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
