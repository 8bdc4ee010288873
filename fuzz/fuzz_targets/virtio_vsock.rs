//! virtio-vsock (hybrid Unix-socket backend) over a real guest memory.
//!
//! The input is a sequence of steps: packets on the TX queue (a header
//! built from fuzzed fields, with the right or wrong CIDs, any op, type,
//! flags and credit, and a payload, in one or two descriptors), raw TX and
//! RX chains, kicks of the three queues, and host-side actions: connecting
//! to the device's socket (with a `CONNECT <port>` line or garbage),
//! writing to or closing any host stream, including the ones the device
//! opened to the listener at `<uds>_1234` for guest-initiated connections.
//! A fresh `Vsock` (socket in a temp dir created once per process) is
//! activated and driven through its `MutEventSubscriber` in an
//! `EventManager`; device resets may come in between.
//!
//! Invariants: no panic; the used index of each queue never runs ahead of
//! what the driver made available; the device's connection count stays
//! within `MAX_CONNECTIONS`.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use event_manager::{EventManager, SubscriberOps};
use keystone_devices::virtio::vsock::packet::{Header, HDR_LEN, VSOCK_HOST_CID};
use keystone_devices::virtio::vsock::{Vsock, EVQ, MAX_CONNECTIONS, RXQ, TXQ};
use keystone_devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use keystone_fuzz::{guest_memory, run_until_idle, temp_dir, DescSpec, DriverQueue, Scratch};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
/// The host port with a listener (`<uds>_1234`).
const LISTEN_PORT: u32 = 1234;

#[derive(Arbitrary, Debug)]
enum Cid {
    Guest,
    Host,
    Any(u64),
}

impl Cid {
    fn get(&self) -> u64 {
        match *self {
            Cid::Guest => GUEST_CID,
            Cid::Host => VSOCK_HOST_CID,
            Cid::Any(c) => c,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Port {
    Listening,
    Small(u8),
    Any(u32),
}

impl Port {
    fn get(&self) -> u32 {
        match *self {
            Port::Listening => LISTEN_PORT,
            Port::Small(p) => u32::from(p),
            Port::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Packet {
    src_cid: Cid,
    dst_cid: Cid,
    src_port: Port,
    dst_port: Port,
    /// `OP_*` (0..=7 mostly).
    op: u8,
    /// Socket type: stream (1) unless set.
    type_: Option<u16>,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// The header's `len`; the payload length when absent.
    len: Option<u32>,
    payload: Vec<u8>,
    /// Header and payload in one descriptor.
    one_desc: bool,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Tx(Packet),
    RawTx(Vec<DescSpec>),
    /// An RX buffer of `len` bytes (well-formed: one writable descriptor).
    RxBuf(u16),
    RawRx(Vec<DescSpec>),
    Kick {
        rx: bool,
        tx: bool,
        ev: bool,
    },
    /// Host process connects to the device socket and writes `line`
    /// (`CONNECT <port>\n` when absent).
    HostConnect {
        port: Port,
        line: Option<Vec<u8>>,
    },
    HostWrite {
        conn: u8,
        data: Vec<u8>,
    },
    HostClose {
        conn: u8,
    },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rx_size_log2: u8,
    tx_size_log2: u8,
    steps: Vec<Step>,
    data: Vec<u8>,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| temp_dir("vsock"))
}

struct Driver {
    mem: GuestMemoryMmap,
    queues: [DriverQueue; 3],
    offered: [u16; 3],
}

impl Driver {
    fn activate(&self, dev: &Mutex<Vsock>) {
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: self.mem.clone(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                queues: self.queues.iter().map(DriverQueue::device_queue).collect(),
                acked_features: 1 << 32,
            })
            .unwrap();
    }

    fn add(&mut self, q: usize, chain: &[DescSpec]) {
        if chain.is_empty() {
            return;
        }
        self.queues[q].add_chain(&self.mem, chain);
        self.offered[q] = self.offered[q].wrapping_add(1);
    }

    fn check(&self) {
        for (q, offered) in self.queues.iter().zip(self.offered) {
            let used = q.used_idx(&self.mem);
            assert!(used <= offered, "used {used} > offered {offered}");
        }
    }
}

fn drain(streams: &mut [UnixStream]) {
    let mut buf = [0u8; 4096];
    for s in streams {
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fuzz_target!(|input: Input| {
    let uds = dir().join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let listen_path = dir().join(format!("v.sock_{LISTEN_PORT}"));
    let _ = std::fs::remove_file(&listen_path);
    let listener = UnixListener::bind(&listen_path).unwrap();
    listener.set_nonblocking(true).unwrap();

    let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut drv = Driver {
        mem: guest_memory(&input.data),
        queues: [
            DriverQueue::new(RXQ as u64, input.rx_size_log2),
            DriverQueue::new(TXQ as u64, input.tx_size_log2),
            DriverQueue::new(EVQ as u64, 0),
        ],
        offered: [0; 3],
    };
    drv.activate(&dev);
    run_until_idle(&mut em, 8);

    let mut scratch = Scratch::default();
    let mut streams: Vec<UnixStream> = Vec::new();
    for step in input.steps.iter().take(64) {
        match step {
            Step::Tx(p) => {
                let payload = &p.payload[..p.payload.len().min(2048)];
                let hdr = Header {
                    src_cid: p.src_cid.get(),
                    dst_cid: p.dst_cid.get(),
                    src_port: p.src_port.get(),
                    dst_port: p.dst_port.get(),
                    len: p.len.unwrap_or(payload.len() as u32),
                    type_: p.type_.unwrap_or(1),
                    op: u16::from(p.op),
                    flags: p.flags,
                    buf_alloc: p.buf_alloc,
                    fwd_cnt: p.fwd_cnt,
                }
                .to_bytes();
                let chain = if p.one_desc {
                    let (at, len) = scratch.put(&drv.mem, &[&hdr[..], payload].concat());
                    vec![DescSpec::at(at.0, len, false)]
                } else {
                    let (h, _) = scratch.put(&drv.mem, &hdr);
                    let mut c = vec![DescSpec::at(h.0, HDR_LEN as u32, false)];
                    if !payload.is_empty() {
                        let (d, len) = scratch.put(&drv.mem, payload);
                        c.push(DescSpec::at(d.0, len, false));
                    }
                    c
                };
                drv.add(TXQ, &chain);
            }
            Step::RawTx(chain) => drv.add(TXQ, &chain[..chain.len().min(8)]),
            Step::RxBuf(len) => {
                let at = scratch.alloc(u64::from(*len));
                drv.add(RXQ, &[DescSpec::at(at.0, u32::from(*len), true)]);
            }
            Step::RawRx(chain) => drv.add(RXQ, &chain[..chain.len().min(8)]),
            Step::Kick { rx, tx, ev } => {
                {
                    let d = dev.lock().unwrap();
                    for (q, kick) in [(RXQ, rx), (TXQ, tx), (EVQ, ev)] {
                        if *kick {
                            d.queue_events()[q].write(1).unwrap();
                        }
                    }
                }
                run_until_idle(&mut em, 16);
            }
            Step::HostConnect { port, line } => {
                if streams.len() < 8 {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        s.set_nonblocking(true).unwrap();
                        let line = match line {
                            Some(l) => l.clone(),
                            None => format!("CONNECT {}\n", port.get()).into_bytes(),
                        };
                        let _ = s.write(&line);
                        streams.push(s);
                    }
                }
                run_until_idle(&mut em, 16);
            }
            Step::HostWrite { conn, data } => {
                let n = streams.len().max(1);
                if let Some(s) = streams.get_mut(usize::from(*conn) % n) {
                    let _ = s.write(data);
                }
                run_until_idle(&mut em, 16);
            }
            Step::HostClose { conn } => {
                if !streams.is_empty() {
                    streams.swap_remove(usize::from(*conn) % streams.len());
                }
                run_until_idle(&mut em, 16);
            }
            Step::Reset => {
                dev.lock().unwrap().reset();
                run_until_idle(&mut em, 16);
                for q in &mut drv.queues {
                    q.reset(&drv.mem);
                }
                drv.offered = [0; 3];
                drv.activate(&dev);
                run_until_idle(&mut em, 16);
            }
        }
        // Guest-initiated connections land here; host streams are read so
        // that flow control moves.
        while streams.len() < 16 {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true).unwrap();
                    streams.push(s);
                }
                Err(_) => break,
            }
        }
        drain(&mut streams);
        drv.check();
        assert!(dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    }
    // A last round for whatever is still queued.
    {
        let d = dev.lock().unwrap();
        for evt in d.queue_events() {
            evt.write(1).unwrap();
        }
    }
    run_until_idle(&mut em, 16);
    drv.check();
});
