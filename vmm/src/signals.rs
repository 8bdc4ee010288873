//! Signals: SIGTERM/SIGINT ask the VMM to stop (through an eventfd the event
//! loop watches), and a real-time signal kicks vCPU threads out of KVM_RUN.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The eventfd written when SIGTERM or SIGINT arrives (-1: none yet).
static EXIT_EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that asked us to stop (0: none).
static EXIT_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_exit_signal(num: c_int, _: *mut siginfo_t, _: *mut c_void) {
    EXIT_SIGNAL.store(num, Ordering::SeqCst);
    let fd = EXIT_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte
        // buffer and `fd` is EXIT_EVENT's eventfd, which is never closed.
        // A failed write (full counter) still leaves the fd readable.
        unsafe {
            libc::write(fd, (&one as *const u64).cast::<c_void>(), 8);
        }
    }
}

extern "C" fn on_vcpu_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn vcpu_kick_signal() -> c_int {
    SIGRTMIN()
}

/// The eventfd SIGTERM/SIGINT write; created once and never closed, so the
/// handler never writes to a reused fd number.
static EXIT_EVENT: OnceLock<EventFd> = OnceLock::new();

/// Install the SIGTERM/SIGINT handlers and the vCPU kick handler; returns a
/// handle on the eventfd the exit signals write (a duplicate: the original
/// stays open for the life of the process).
pub fn install() -> std::io::Result<EventFd> {
    let evt = match EXIT_EVENT.get() {
        Some(evt) => evt,
        None => {
            let evt = EventFd::new(EFD_NONBLOCK)?;
            EXIT_EVENT.get_or_init(|| evt)
        }
    };
    EXIT_EVENT_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        register_signal_handler(sig, on_exit_signal).map_err(std::io::Error::from)?;
    }
    register_signal_handler(vcpu_kick_signal(), on_vcpu_kick).map_err(std::io::Error::from)?;
    evt.try_clone()
}

/// The signal that asked the VMM to stop, if any.
pub fn exit_signal() -> Option<c_int> {
    match EXIT_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}
