//! The activation state every virtio device shares: its queue eventfds and
//! activate eventfd, and between the driver's DRIVER_OK and its reset the
//! guest memory, the interrupt and the queues it handed over.
//!
//! One type for block, net and vsock, so the life cycle (activate, reset,
//! the eventfds the event loop watches) is written once, and so is the
//! state a snapshot will save and restore: [`Activation::active`] holds
//! all of it (the queues' registers through `virtio-queue`'s `QueueState`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, ActivateError, Interrupt};

/// What the driver handed over at DRIVER_OK.
pub struct Active<const N: usize> {
    /// Guest memory, for descriptor chains.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in index order.
    pub queues: [Queue; N],
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// The activation state of a device with `N` queues.
pub struct Activation<const N: usize> {
    queue_evts: [EventFd; N],
    queue_sizes: [u16; N],
    activate_evt: EventFd,
    queue_evts_watched: bool,
    active: Option<Active<N>>,
}

impl<const N: usize> Activation<N> {
    /// Inactive, with `N` queues of at most `queue_size` entries.
    pub fn new(queue_size: u16) -> io::Result<Self> {
        let mut evts = Vec::with_capacity(N);
        for _ in 0..N {
            evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        let queue_evts: [EventFd; N] = evts
            .try_into()
            .map_err(|_| io::Error::other("queue eventfds"))?;
        Ok(Activation {
            queue_evts,
            queue_sizes: [queue_size; N],
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            queue_evts_watched: false,
            active: None,
        })
    }

    /// Takes the queues the driver made ready (exactly `N`, else
    /// [`ActivateError::BadQueues`]) and wakes the device's event handler.
    /// Inactive again if it cannot be woken.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let queues: [Queue; N] = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::BadQueues { expected: N, got })?;
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues,
            acked_features: ctx.acked_features,
        });
        if let Err(e) = self.activate_evt.write(1) {
            // The event loop would never hear of the queues: stay inactive.
            self.active = None;
            return Err(ActivateError::EventFd(e));
        }
        Ok(())
    }

    /// The driver reset the device: the queues are dropped (the eventfds
    /// stay, and stay watched).
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// The live queues' states while active (empty when inactive).
    pub fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    /// Between activate and reset.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The handed-over state, while active.
    pub fn active(&self) -> Option<&Active<N>> {
        self.active.as_ref()
    }

    /// The handed-over state, while active, for queue processing.
    pub fn active_mut(&mut self) -> Option<&mut Active<N>> {
        self.active.as_mut()
    }

    /// The handed-over state with the queue eventfds beside it (a device
    /// re-arms a queue's eventfd while it works on the queue).
    pub fn active_with_events(&mut self) -> Option<(&mut Active<N>, &[EventFd; N])> {
        let evts = &self.queue_evts;
        self.active.as_mut().map(|a| (a, evts))
    }

    /// Takes the handed-over state out while the device works on it with
    /// `&mut self`; [`Activation::restore`] puts it back.
    pub fn take(&mut self) -> Option<Active<N>> {
        self.active.take()
    }

    /// Puts back what [`Activation::take`] took.
    pub fn restore(&mut self, active: Active<N>) {
        self.active = Some(active);
    }

    /// One eventfd per queue (the transport registers them as ioeventfds).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Queue `i`'s eventfd; `i` is the device's own queue index constant,
    /// never a guest value.
    pub fn queue_evt(&self, i: usize) -> &EventFd {
        &self.queue_evts[i]
    }

    /// The largest size of each queue.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// The eventfd written on activation (and by devices that want their
    /// handler to run after a reset).
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Which queue `fd` is the eventfd of.
    pub fn queue_of(&self, fd: RawFd) -> Option<usize> {
        self.queue_evts.iter().position(|e| e.as_raw_fd() == fd)
    }

    /// For `MutEventSubscriber::init`: watch the activate eventfd, and the
    /// queue eventfds if already active.
    pub fn init(&mut self, ops: &mut EventOps, device: &str) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::error!("{device}: cannot watch the activate eventfd: {e}");
        }
        if self.active.is_some() {
            self.watch_queues(ops, device);
        }
    }

    /// Whether `fd` is the activate eventfd; if so it is drained and, once
    /// active, the queue eventfds are watched (from then on).
    pub fn on_activate_event(&mut self, fd: RawFd, ops: &mut EventOps, device: &str) -> bool {
        if fd != self.activate_evt.as_raw_fd() {
            return false;
        }
        // A spurious wakeup leaves the counter at 0 (EAGAIN): harmless.
        let _ = self.activate_evt.read();
        if self.active.is_some() {
            self.watch_queues(ops, device);
        }
        true
    }

    fn watch_queues(&mut self, ops: &mut EventOps, device: &str) {
        if self.queue_evts_watched {
            return;
        }
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("{device}: cannot watch a queue eventfd: {e}");
            }
        }
        self.queue_evts_watched = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    fn ctx(queues: usize) -> ActivateContext {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        ActivateContext {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: (0..queues).map(|_| Queue::new(16).unwrap()).collect(),
            acked_features: 1 << 32,
        }
    }

    #[test]
    fn activation_takes_exactly_its_queues_and_wakes_the_handler() {
        let mut a = Activation::<2>::new(16).unwrap();
        assert_eq!(a.queue_events().len(), 2);
        assert_eq!(a.queue_sizes(), &[16, 16]);
        match a.activate(ctx(1)) {
            Err(ActivateError::BadQueues {
                expected: 2,
                got: 1,
            }) => {}
            other => panic!("{:?}", other.err()),
        }
        assert!(!a.is_activated());
        assert!(a.activate_evt().read().is_err(), "not woken on failure");
        a.activate(ctx(2)).unwrap();
        assert!(a.is_activated());
        assert_eq!(a.active().map(|x| x.acked_features), Some(1 << 32));
        assert_eq!(a.activate_evt().read().unwrap(), 1);
        let fd = a.queue_evt(1).as_raw_fd();
        assert_eq!(a.queue_of(fd), Some(1));
        assert_eq!(a.queue_of(a.activate_evt().as_raw_fd()), None);
        let taken = a.take().unwrap();
        assert!(!a.is_activated());
        a.restore(taken);
        a.reset();
        assert!(!a.is_activated());
    }
}
