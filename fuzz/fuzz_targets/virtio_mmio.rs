//! The virtio-mmio transport's register file, on an MMIO `Bus`.
//!
//! The input picks the device behind the transport (a dummy with two
//! queues and an 8-byte config space, or a real `Block`, `Net` or `Vsock`)
//! and a sequence of guest accesses: (offset, width 1/2/4/8, read or
//! write, value) anywhere in and just past the 4 KiB window, plus two
//! helpers a fuzzer would take long to find: a complete, correct bring-up
//! (features, queues at valid addresses, DRIVER_OK) and descriptor chains
//! put on a driver ring. Real devices run in an `EventManager` after every
//! access, so queue notifications reach their queue processing.
//!
//! Invariants: no panic; MagicValue always reads "virt"; a register access
//! of a width other than 4 reads as zeros; DRIVER_OK shows in Status
//! exactly when the device is activated.
#![no_main]

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use keystone_devices::virtio::block::Block;
use keystone_devices::virtio::mmio::{status, MmioTransport, MMIO_WINDOW_SIZE};
use keystone_devices::virtio::net::{Net, NetBackend};
use keystone_devices::virtio::vsock::Vsock;
use keystone_devices::virtio::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use keystone_devices::Bus;
use keystone_fuzz::{guest_memory, run_until_idle, temp_dir, DescSpec, DriverQueue};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = 0xc000_1000;

#[derive(Arbitrary, Debug)]
enum DeviceKind {
    Dummy { fail_activate: bool },
    Block { read_only: bool },
    Net,
    Vsock,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Access {
        offset: u16,
        width: u8,
        write: bool,
        value: u64,
    },
    /// The register writes of a well-behaved driver, ending in DRIVER_OK.
    BringUp { size_log2: u8 },
    /// A chain on queue `queue`'s ring (as laid out by `BringUp`).
    Chain { queue: u8, descs: Vec<DescSpec> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: DeviceKind,
    ops: Vec<Op>,
    data: Vec<u8>,
}

/// A device with no behaviour of its own.
struct Dummy {
    evts: Vec<EventFd>,
    active: bool,
    fail_activate: bool,
    config: [u8; 8],
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn avail_features(&self) -> u64 {
        1 << 32 | 1 << 9
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|o| self.config.get(o)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(c) = at.and_then(|o| self.config.get_mut(o)) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend("refused".into()));
        }
        if ctx.queues.is_empty() {
            return Err(ActivateError::BadQueues {
                expected: 2,
                got: 0,
            });
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
    fn is_activated(&self) -> bool {
        self.active
    }
}

fn image() -> &'static std::path::PathBuf {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = temp_dir("mmio").join("disk.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        p
    })
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The device, and (for real devices) its event-loop side.
fn make_device(kind: &DeviceKind) -> (Arc<Mutex<dyn VirtioDevice>>, Option<Subscriber>) {
    match *kind {
        DeviceKind::Dummy { fail_activate } => {
            let evts = (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let d = Dummy {
                evts,
                active: false,
                fail_activate,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
            };
            (Arc::new(Mutex::new(d)), None)
        }
        DeviceKind::Block { read_only } => {
            let d = Arc::new(Mutex::new(Block::new(image(), read_only).unwrap()));
            (d.clone(), Some(d))
        }
        DeviceKind::Net => {
            // The peer end is dropped: the backend reads EOF, writes EPIPE.
            let (ours, _peer) = UnixStream::pair().unwrap();
            let d = Arc::new(Mutex::new(
                Net::new([2, 0, 0, 0, 0, 1], NetBackend::Stream(ours)).unwrap(),
            ));
            (d.clone(), Some(d))
        }
        DeviceKind::Vsock => {
            let uds = temp_dir("mmio").join("v.sock");
            let _ = std::fs::remove_file(&uds);
            let d = Arc::new(Mutex::new(Vsock::new(3, &uds).unwrap()));
            (d.clone(), Some(d))
        }
    }
}

fn read32(bus: &Bus, off: u64) -> u32 {
    let mut b = [0u8; 4];
    bus.read(BASE + off, &mut b);
    u32::from_le_bytes(b)
}

fn write32(bus: &Bus, off: u64, v: u32) {
    bus.write(BASE + off, &v.to_le_bytes());
}

/// What a Linux driver does, with each queue at the `DriverQueue` layout.
fn bring_up(bus: &Bus, queues: &[DriverQueue]) {
    write32(bus, 0x70, 0);
    write32(bus, 0x70, status::ACKNOWLEDGE);
    write32(bus, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2 {
        write32(bus, 0x14, sel);
        let f = read32(bus, 0x10);
        write32(bus, 0x24, sel);
        write32(bus, 0x20, f);
    }
    let feat_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(bus, 0x70, feat_ok);
    for (i, q) in queues.iter().enumerate() {
        let dq = q.device_queue();
        use virtio_queue::QueueT;
        write32(bus, 0x30, i as u32);
        if read32(bus, 0x34) == 0 {
            break;
        }
        write32(bus, 0x38, u32::from(dq.size()));
        write32(bus, 0x80, dq.desc_table() as u32);
        write32(bus, 0x90, dq.avail_ring() as u32);
        write32(bus, 0xa0, dq.used_ring() as u32);
        write32(bus, 0x44, 1);
    }
    write32(bus, 0x70, feat_ok | status::DRIVER_OK);
}

fuzz_target!(|input: Input| {
    let mem = guest_memory(&input.data);
    let (dev, sub) = make_device(&input.device);
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let transport = MmioTransport::new(mem.clone(), dev.clone(), irq).unwrap();
    let mut bus = Bus::new();
    bus.insert(Arc::new(Mutex::new(transport)), BASE, MMIO_WINDOW_SIZE)
        .unwrap();
    let mut em = EventManager::<Subscriber>::new().unwrap();
    if let Some(s) = sub {
        em.add_subscriber(s);
    }
    let mut queues: Vec<DriverQueue> = (0..3).map(|i| DriverQueue::new(i, 4)).collect();

    for op in input.ops.iter().take(256) {
        match op {
            Op::Access {
                offset,
                width,
                write,
                value,
            } => {
                let offset = u64::from(*offset) % (MMIO_WINDOW_SIZE + 0x10);
                let len = [1, 2, 4, 8][usize::from(width % 4)];
                let addr = BASE + offset;
                if *write {
                    bus.write(addr, &value.to_le_bytes()[..len]);
                } else {
                    let mut buf = [0xaau8; 8];
                    let hit = bus.read(addr, &mut buf[..len]);
                    if hit && offset < 0x100 && len != 4 {
                        assert_eq!(&buf[..len], &[0u8; 8][..len], "{len}-byte register read");
                    }
                }
            }
            Op::BringUp { size_log2 } => {
                for (i, q) in queues.iter_mut().enumerate() {
                    *q = DriverQueue::new(i as u64, *size_log2 % 5);
                    q.reset(&mem);
                }
                bring_up(&bus, &queues);
            }
            Op::Chain { queue, descs } => {
                let q = usize::from(*queue % 3);
                queues[q].add_chain(&mem, &descs[..descs.len().min(8)]);
                write32(&bus, 0x50, q as u32);
            }
        }
        run_until_idle(&mut em, 8);
        assert_eq!(read32(&bus, 0), 0x7472_6976, "MagicValue");
        let st = read32(&bus, 0x70);
        let active = dev.lock().unwrap().is_activated();
        assert_eq!(
            st & status::DRIVER_OK != 0,
            active,
            "Status {st:#x} vs device activated {active}"
        );
    }
});
