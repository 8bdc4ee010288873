//! Keystone's virtual machine monitor: a KVM VM with guest memory, vCPU
//! threads, a Linux 64-bit boot path and an event loop, on the rust-vmm
//! crates.
//!
//! [`builder::build`] is the boot recipe, read top to bottom;
//! [`device_manager`] is the one place that lists what the guest can touch.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod host;
pub mod jail;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmm;

pub use config::{Cli, ConfigError, SerialConfig, VmConfig};
pub use vmm::{run, VmExit, VmmError};
