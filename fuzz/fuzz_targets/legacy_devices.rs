//! The legacy port-I/O devices on a `Bus`: the 8250 UART (`SerialDevice`,
//! output to a counting sink) at 0x3f8, the `I8042` at 0x60 and the ACPI
//! sleep registers (`AcpiSleep`) at 0x600.
//!
//! The input is a sequence of bus reads and writes at any port near the
//! devices (in range, straddling their ends, or unowned) with widths 1, 2,
//! 4 or 8, and of host console input (`enqueue_input`).
//!
//! Invariants: no panic; unowned ports read as 0xff; `enqueue_input`
//! accepts at most what it is given and the host-side buffer stays within
//! `PENDING_INPUT_CAP`; the console gets at most one byte per 1-byte write
//! to the UART; the ACPI poweroff is signalled at most once, and only after
//! a 1-byte write of an S5 request (`SLP_TYP` 5 with `SLP_EN`) to 0x600.
#![no_main]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use keystone_devices::acpi_sleep::{AcpiSleep, ACPI_SLEEP_BASE, ACPI_SLEEP_LEN};
use keystone_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use keystone_devices::serial::{SerialDevice, COM1_BASE, COM1_LEN, PENDING_INPUT_CAP};
use keystone_devices::Bus;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Arbitrary, Debug)]
enum Op {
    /// `port` is relative to 0x58 for the i8042 side, 0x3f0 for the UART
    /// side, 0x5f8 for the ACPI side (each covers the device and a few
    /// ports around it); `dev` picks the side.
    Io {
        dev: u8,
        port: u8,
        width: u8,
        write: bool,
        value: u64,
    },
    Input(Vec<u8>),
    /// Many bytes of input at once (fills the host-side buffer).
    Flood {
        len: u32,
        byte: u8,
    },
}

/// Counts what the UART prints.
struct Sink(Arc<AtomicU64>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let printed = Arc::new(AtomicU64::new(0));
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Box::new(Sink(printed.clone())),
    )));
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    let i8042 = Arc::new(Mutex::new(I8042::new(reset.try_clone().unwrap())));
    let poweroff = EventFd::new(EFD_NONBLOCK).unwrap();
    let acpi = Arc::new(Mutex::new(AcpiSleep::new(poweroff.try_clone().unwrap())));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), COM1_BASE, COM1_LEN).unwrap();
    bus.insert(i8042.clone(), I8042_BASE, I8042_LEN).unwrap();
    bus.insert(acpi.clone(), ACPI_SLEEP_BASE, ACPI_SLEEP_LEN).unwrap();
    let owned = |addr: u64, len: u64| {
        let inside = |base: u64, size: u64| addr >= base && addr + len <= base + size;
        inside(COM1_BASE, COM1_LEN)
            || inside(I8042_BASE, I8042_LEN)
            || inside(ACPI_SLEEP_BASE, ACPI_SLEEP_LEN)
    };
    let mut s5_requested = false;

    let mut thr_writes = 0u64;
    for op in ops.iter().take(1024) {
        match op {
            Op::Io {
                dev,
                port,
                width,
                write,
                value,
            } => {
                let base = [0x3f0, 0x58, 0x5f8][usize::from(dev % 3)];
                let addr = base + u64::from(*port % 24);
                let len = [1, 2, 4, 8][usize::from(width % 4)];
                if *write {
                    bus.write(addr, &value.to_le_bytes()[..len]);
                    let byte = value.to_le_bytes()[0];
                    if len == 1 && addr == ACPI_SLEEP_BASE && byte & 0x20 != 0 && (byte >> 2) & 7 == 5 {
                        s5_requested = true;
                    }
                    if len == 1 && addr >= COM1_BASE && addr < COM1_BASE + COM1_LEN {
                        thr_writes += 1;
                    }
                } else {
                    let mut buf = [0u8; 8];
                    let hit = bus.read(addr, &mut buf[..len]);
                    assert_eq!(hit, owned(addr, len as u64));
                    if !hit {
                        assert!(buf[..len].iter().all(|&b| b == 0xff));
                    }
                }
            }
            Op::Input(bytes) => {
                let n = serial.lock().unwrap().enqueue_input(bytes);
                assert!(n <= bytes.len());
            }
            Op::Flood { len, byte } => {
                let bytes = vec![*byte; (*len as usize) % (PENDING_INPUT_CAP + 4096)];
                let n = serial.lock().unwrap().enqueue_input(&bytes);
                assert!(n <= bytes.len());
            }
        }
        assert!(serial.lock().unwrap().pending_input() <= PENDING_INPUT_CAP);
        assert!(printed.load(Ordering::Relaxed) <= thr_writes);
        assert_eq!(acpi.lock().unwrap().powered_off(), s5_requested);
    }
    let signalled = poweroff.read().unwrap_or(0);
    assert_eq!(signalled, u64::from(s5_requested), "one poweroff signal, only for S5");
    let _ = reset.read();
});
