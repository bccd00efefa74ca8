//! The virtio-rng device: feature negotiation and the event-loop glue that fills the queue when
//! the driver notifies it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handler::{getrandom, RngHandler};
use super::QUEUE_SIZE;
use crate::virtio::device_util::{
    ignore_config_write, ready_queues, signal_used_queue, watch_queue_events,
};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

/// Errors setting up a virtio-rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The host refuses `getrandom(2)` (too old a kernel, or a seccomp filter).
    #[error("the host's getrandom(2) does not work")]
    Entropy(#[source] io::Error),
    /// The queue EventFd could not be created.
    #[error("cannot create the queue eventfd")]
    EventFd(#[source] io::Error),
}

/// The running state between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-rng device.
pub struct Rng {
    handler: RngHandler,
    queue_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    active: Option<Active>,
    warned: LogOnce,
}

impl Rng {
    /// Checks that the host can supply entropy and creates the device.
    pub fn new() -> Result<Self, RngError> {
        getrandom(&mut [0u8; 1]).map_err(RngError::Entropy)?;
        Ok(Self {
            handler: RngHandler::new(),
            queue_sizes: [QUEUE_SIZE],
            queue_evts: [EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd)?],
            active: None,
            warned: LogOnce::default(),
        })
    }

    /// Serves the queue after a notification.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            warn_once!(
                self.warned,
                Problem::Idle,
                "virtio-rng: queue notified before activation"
            );
            return;
        };
        let notify = match self.handler.process_queue(&active.mem, &mut active.queue) {
            Ok(notify) => notify,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Queue,
                    "virtio-rng: {}",
                    crate::error_chain(&e)
                );
                // Requests served before the failure still need announcing.
                true
            }
        };
        if notify {
            signal_used_queue(&active.interrupt, &mut self.warned, "virtio-rng");
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, _features: u64) {
        // Nothing to adapt: EVENT_IDX is applied by the transport.
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(&mut self.warned, "virtio-rng", offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let [queue] = ready_queues(queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        true
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue_evts[0].as_raw_fd() {
            return;
        }
        // The count does not matter: one drain serves every notification so far.
        let _ = self.queue_evts[0].read();
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        watch_queue_events(ops, &self.queue_evts, "virtio-rng");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::QueueT;

    use super::*;
    use crate::virtio::block::test_utils::{mem, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::net::test_utils::Driver;
    use crate::virtio::test_utils::CountingInterrupt;

    fn ready_queue(ready: bool) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_ready(ready);
        q
    }

    #[test]
    fn identity_features_and_config() {
        let mut rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), VIRTIO_ID_RNG);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(rng.queue_events().len(), 1);
        assert_eq!(
            rng.avail_features(),
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        rng.write_config(0, &[1, 2]);
        let mut data = [0xff; 4];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn activation_checks_queues() {
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        let err = rng.activate(mem(), vec![], irq.clone()).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        let err = rng
            .activate(mem(), vec![ready_queue(false)], irq.clone())
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady(0)));
        rng.activate(mem(), vec![ready_queue(true)], irq.clone())
            .unwrap();
        let err = rng
            .activate(mem(), vec![ready_queue(true)], irq.clone())
            .unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive));
        assert!(rng.reset());
        rng.activate(mem(), vec![ready_queue(true)], irq).unwrap();
    }

    #[test]
    fn notification_fills_buffers_through_the_event_loop() {
        let mem = mem();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(rng.clone());
        let line = Arc::new(CountingInterrupt::default());
        let mut driver = Driver::new(&mem, 0);
        let queue = driver.queue();
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        rng.lock()
            .unwrap()
            .activate(mem.clone(), vec![queue], interrupt)
            .unwrap();
        driver.post(&[(BUF, 64, W)]);
        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(driver.used(), vec![(0, 64)]);
        assert!(guest(&mem, BUF, 64).iter().any(|&b| b != 0));
        assert_eq!(line.count(), 1);

        // After a reset, notifications are drained and ignored.
        assert!(rng.lock().unwrap().reset());
        driver.post(&[(BUF, 64, W)]);
        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(driver.used().len(), 1);
        assert_eq!(line.count(), 1);
    }
}
