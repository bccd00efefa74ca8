//! The virtio-rng device: feature negotiation and the event-loop glue that fills the queue when
//! the driver notifies it.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{getrandom, RngHandler};
use super::QUEUE_SIZE;
use crate::snapshot::SnapshotError;
use crate::virtio::common::VirtioCommon;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::Problem;

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

/// A virtio-rng device.
pub struct Rng {
    handler: RngHandler,
    common: VirtioCommon<1>,
}

impl Rng {
    /// Checks that the host can supply entropy and creates the device.
    pub fn new() -> Result<Self, RngError> {
        getrandom(&mut [0u8; 1]).map_err(RngError::Entropy)?;
        Ok(Self {
            handler: RngHandler::new(),
            common: VirtioCommon::new("virtio-rng", QUEUE_SIZE).map_err(RngError::EventFd)?,
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
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
        self.common.ignore_config_write(offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        self.common.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.common.activate(mem, queues, interrupt)
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        // Every chain is answered as it is popped.
        self.common.queue_positions()
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common.queue_event(events.fd()).is_some() {
            self.common.serve(Problem::Queue, "", |mem, [queue]| {
                self.handler.process_queue(mem, queue)
            });
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queue_events(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::virtio::block::test_utils::{mem, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::net::test_utils::Driver;
    use crate::virtio::test_utils::CountingInterrupt;

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
