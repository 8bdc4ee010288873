//! The `keystone` command as a library: each verb is a function from parsed
//! arguments to a report and an exit code; printing is separate from the work.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod agent;
pub mod bench;
pub mod binaries;
pub mod doctor;
pub mod flock;
pub mod image;
