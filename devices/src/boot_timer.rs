//! The boot timer, as Firecracker defines it: the guest writes the byte 123
//! at MMIO offset 0 when it has booted (right before init, or when the probe
//! guest reaches its timer step) and the VMM logs how long that took since
//! the VMM process started, in wall-clock and CPU time.
//!
//! Log line (Firecracker's format, parsed by benchmarks):
//! `Guest-boot-time = N us M ms, C CPU us D CPU ms`.

use std::sync::mpsc::Sender;

use crate::bus::BusDevice;

/// Guest physical address of the boot timer (Firecracker's).
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
/// Length of the boot timer's MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The value that signals "guest booted".
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// A point in time on both clocks the boot timer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    /// CLOCK_MONOTONIC, microseconds.
    pub wall_us: u64,
    /// CLOCK_PROCESS_CPUTIME_ID, microseconds.
    pub cpu_us: u64,
}

impl Timestamp {
    /// The current time on both clocks.
    pub fn now() -> Self {
        Timestamp {
            wall_us: clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

/// Microseconds on `clock`; 0 if the clock cannot be read (never on Linux
/// for the two clocks used here).
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and `clock` is one of the
    // clock ids Linux always provides; the call only writes into `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000)
}

/// Boot time as measured when the guest signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootTime {
    /// Wall-clock microseconds since VMM start.
    pub wall_us: u64,
    /// CPU microseconds the VMM process used since start.
    pub cpu_us: u64,
}

impl std::fmt::Display for BootTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            self.wall_us,
            self.wall_us / 1000,
            self.cpu_us,
            self.cpu_us / 1000
        )
    }
}

/// The boot timer device. Only the first signal counts: a guest that keeps
/// writing 123 cannot flood the log or the notification channel.
pub struct BootTimer {
    start: Timestamp,
    notify: Option<Sender<BootTime>>,
    fired: bool,
}

impl BootTimer {
    /// A boot timer measuring from `start` (taken first thing in the VMM's
    /// `main`). `notify`, if given, receives every measurement.
    pub fn new(start: Timestamp, notify: Option<Sender<BootTime>>) -> Self {
        BootTimer {
            start,
            notify,
            fired: false,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] || self.fired {
            return;
        }
        self.fired = true;
        let now = Timestamp::now();
        let t = BootTime {
            wall_us: now.wall_us.saturating_sub(self.start.wall_us),
            cpu_us: now.cpu_us.saturating_sub(self.start.cpu_us),
        };
        tracing::info!("{t}");
        if let Some(tx) = &self.notify {
            // The receiver may be gone; the log line is what matters.
            let _ = tx.send(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_counts() {
        let (tx, rx) = std::sync::mpsc::channel();
        let start = Timestamp::now();
        let mut t = BootTimer::new(start, Some(tx));
        t.write(0, &[122]);
        t.write(1, &[BOOT_COMPLETE_MAGIC]);
        t.write(0, &[BOOT_COMPLETE_MAGIC, 0]);
        t.write(0, &[]);
        assert!(rx.try_recv().is_err());
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        let bt = rx.try_recv().unwrap();
        assert!(bt.wall_us >= 2000, "{bt:?}");
        // Only the first signal counts.
        t.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert!(rx.try_recv().is_err());
        let mut buf = [0xffu8; 4];
        t.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn log_line_matches_firecracker_format() {
        let line = BootTime {
            wall_us: 4321,
            cpu_us: 1234,
        }
        .to_string();
        assert_eq!(
            line,
            "Guest-boot-time =   4321 us 4 ms,   1234 CPU us 1 CPU ms"
        );
    }
}
