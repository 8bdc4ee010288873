//! virtio-net with the passt stream backend over a real guest memory.
//!
//! The device's backend is one end of a `UnixStream::pair()` with a small
//! send buffer (so TX backpressure happens); the fuzzer plays the guest
//! driver (well-formed TX frames and RX buffers, raw TX and RX chains,
//! queue kicks, device resets) and passt on the peer end: length-prefixed
//! frames of any declared length, raw bytes (bad or split length
//! prefixes), closing the peer, and pausing or resuming the draining of
//! what the device sends. The device is driven through its
//! `MutEventSubscriber` in an `EventManager`.
//!
//! Invariants: no panic; the used index of each queue never runs ahead of
//! what the driver made available; every frame the device writes to the
//! backend has a length prefix in `14..=65550` and is followed by that
//! many bytes; the TX frame counter never exceeds what the peer received.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use event_manager::{EventManager, SubscriberOps};
use keystone_devices::virtio::net::{
    Net, NetBackend, MAX_FRAME_LEN, MIN_FRAME_LEN, RXQ, TXQ, VNET_HDR_LEN,
};
use keystone_devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use keystone_fuzz::{guest_memory, run_until_idle, DescSpec, DriverQueue, Scratch};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Arbitrary, Debug)]
enum Step {
    /// A TX chain: 12-byte header and a frame of `len` bytes filled with
    /// `fill`, split in two descriptors when `split`.
    TxFrame {
        len: u16,
        fill: u8,
        split: bool,
    },
    RawTx(Vec<DescSpec>),
    /// One writable RX buffer of `len` bytes.
    RxBuf(u16),
    RawRx(Vec<DescSpec>),
    Kick {
        rx: bool,
        tx: bool,
    },
    /// passt sends a frame: prefix `declared` (the real length if absent)
    /// then `len` bytes.
    PeerFrame {
        declared: Option<u32>,
        len: u16,
        fill: u8,
    },
    /// passt sends raw bytes.
    PeerRaw(Vec<u8>),
    PeerClose,
    /// Stop / resume reading what the device sends.
    Drain(bool),
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rx_size_log2: u8,
    tx_size_log2: u8,
    steps: Vec<Step>,
    data: Vec<u8>,
}

/// The peer's parse of the device's output stream.
#[derive(Default)]
struct Framing {
    buf: Vec<u8>,
    frames: u64,
}

impl Framing {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= 4 {
            let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
            assert!(
                (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len),
                "device sent a frame length of {len}"
            );
            if self.buf.len() < 4 + len {
                break;
            }
            self.buf.drain(..4 + len);
            self.frames += 1;
        }
    }
}

fn set_sndbuf(s: &UnixStream, bytes: libc::c_int) {
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

struct Driver {
    mem: GuestMemoryMmap,
    queues: [DriverQueue; 2],
    offered: [u16; 2],
}

impl Driver {
    fn activate(&self, net: &Mutex<Net>) {
        net.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: self.mem.clone(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                queues: self.queues.iter().map(DriverQueue::device_queue).collect(),
                acked_features: 1 << 32 | 1 << 5,
            })
            .unwrap();
    }

    fn add(&mut self, q: usize, chain: &[DescSpec]) {
        if !chain.is_empty() {
            self.queues[q].add_chain(&self.mem, chain);
            self.offered[q] = self.offered[q].wrapping_add(1);
        }
    }

    fn check(&self) {
        for (q, offered) in self.queues.iter().zip(self.offered) {
            let used = q.used_idx(&self.mem);
            assert!(used <= offered, "used {used} > offered {offered}");
        }
    }
}

fuzz_target!(|input: Input| {
    let (ours, peer) = UnixStream::pair().unwrap();
    set_sndbuf(&ours, 8192);
    set_sndbuf(&peer, 8192);
    peer.set_nonblocking(true).unwrap();
    let mut peer = Some(peer);
    let net = Arc::new(Mutex::new(
        Net::new([2, 0, 0, 0, 0, 1], NetBackend::Stream(ours)).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    let mut drv = Driver {
        mem: guest_memory(&input.data),
        queues: [
            DriverQueue::new(RXQ as u64, input.rx_size_log2),
            DriverQueue::new(TXQ as u64, input.tx_size_log2),
        ],
        offered: [0; 2],
    };
    drv.activate(&net);
    run_until_idle(&mut em, 8);

    let mut scratch = Scratch::default();
    let mut framing = Framing::default();
    let mut draining = true;
    for step in input.steps.iter().take(64) {
        match step {
            Step::TxFrame { len, fill, split } => {
                let mut buf = vec![0u8; VNET_HDR_LEN];
                buf.resize(VNET_HDR_LEN + usize::from(*len), *fill);
                let (at, n) = scratch.put(&drv.mem, &buf);
                let chain = if *split && n > VNET_HDR_LEN as u32 {
                    vec![
                        DescSpec::at(at.0, VNET_HDR_LEN as u32, false),
                        DescSpec::at(at.0 + VNET_HDR_LEN as u64, n - VNET_HDR_LEN as u32, false),
                    ]
                } else {
                    vec![DescSpec::at(at.0, n, false)]
                };
                drv.add(TXQ, &chain);
            }
            Step::RawTx(chain) => drv.add(TXQ, &chain[..chain.len().min(8)]),
            Step::RxBuf(len) => {
                let at = scratch.alloc(u64::from(*len));
                drv.add(RXQ, &[DescSpec::at(at.0, u32::from(*len), true)]);
            }
            Step::RawRx(chain) => drv.add(RXQ, &chain[..chain.len().min(8)]),
            Step::Kick { rx, tx } => {
                let n = net.lock().unwrap();
                for (q, kick) in [(RXQ, rx), (TXQ, tx)] {
                    if *kick {
                        n.queue_events()[q].write(1).unwrap();
                    }
                }
            }
            Step::PeerFrame {
                declared,
                len,
                fill,
            } => {
                if let Some(p) = peer.as_mut() {
                    let declared = declared.unwrap_or(u32::from(*len));
                    let mut bytes = declared.to_be_bytes().to_vec();
                    bytes.resize(4 + usize::from(*len), *fill);
                    let _ = p.write(&bytes);
                }
            }
            Step::PeerRaw(bytes) => {
                if let Some(p) = peer.as_mut() {
                    let _ = p.write(bytes);
                }
            }
            Step::PeerClose => peer = None,
            Step::Drain(on) => draining = *on,
            Step::Reset => {
                net.lock().unwrap().reset();
                run_until_idle(&mut em, 16);
                for q in &mut drv.queues {
                    q.reset(&drv.mem);
                }
                drv.offered = [0; 2];
                drv.activate(&net);
            }
        }
        run_until_idle(&mut em, 16);
        if let (true, Some(p)) = (draining, peer.as_mut()) {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = p.read(&mut buf) {
                framing.feed(&buf[..n]);
            }
        }
        drv.check();
        if peer.is_some() {
            // Frames counted as sent were written to the socket in full,
            // and the socket was just drained.
            let sent = net.lock().unwrap().counters().tx_frames;
            let got = framing.frames;
            assert!(
                !draining || sent <= got,
                "device counted {sent} frames sent, peer got {got}"
            );
        }
    }
});
