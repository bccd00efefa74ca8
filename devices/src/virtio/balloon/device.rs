//! The virtio-balloon device: feature negotiation, a configuration space whose target stays 0,
//! and the event-loop glue that serves a queue when the driver notifies it.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::discard::discard;
use super::handler::BalloonHandler;
use super::{DEFLATE, INFLATE, QUEUES, QUEUE_SIZE, REPORTING, VIRTIO_BALLOON_F_REPORTING};
use crate::virtio::common::VirtioCommon;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::Problem;

/// Errors setting up a virtio-balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A queue EventFd could not be created.
    #[error("cannot create the queue eventfds")]
    EventFd(#[source] io::Error),
}

/// Configuration space: `num_pages` (the target, always 0) and `actual` (the driver's count),
/// both little-endian u32.
const CONFIG_LEN: usize = 8;

/// A virtio-balloon device that gives reported free pages back to the host.
pub struct Balloon {
    handler: BalloonHandler,
    common: VirtioCommon<QUEUES>,
    /// Pages the driver says the balloon holds.
    actual: u32,
}

impl Balloon {
    /// A balloon with its queues' eventfds.
    pub fn new() -> Result<Self, BalloonError> {
        Ok(Self {
            handler: BalloonHandler::default(),
            common: VirtioCommon::new("virtio-balloon", QUEUE_SIZE)
                .map_err(BalloonError::EventFd)?,
            actual: 0,
        })
    }

    fn serve(&mut self, queue: usize) {
        let handler = &mut self.handler;
        self.common
            .serve(Problem::Queue, "", |mem: &GuestMemoryMmap, queues| {
                let mut give_back = |addr, len| discard(mem, addr, len);
                match queue {
                    INFLATE => handler.process_inflate(mem, &mut queues[INFLATE], &mut give_back),
                    DEFLATE => handler.process_deflate(mem, &mut queues[DEFLATE]),
                    _ => handler.process_reporting(mem, &mut queues[REPORTING], &mut give_back),
                }
            });
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_REPORTING
    }

    fn set_acked_features(&mut self, _features: u64) {
        // A driver without page reporting leaves the reporting queue unready: activation fails.
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        data.fill(0);
        if let Some(tail) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = tail.len().min(data.len());
            data[..n].copy_from_slice(&tail[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (4, &[a, b, c, d]) => self.actual = u32::from_le_bytes([a, b, c, d]),
            _ => self.common.ignore_config_write(offset, data),
        }
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
        self.actual = 0;
        true
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(queue) = self.common.queue_event(events.fd()) {
            self.serve(queue);
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
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::test_utils::{mem, W};
    use crate::virtio::net::test_utils::Driver;
    use crate::virtio::test_utils::CountingInterrupt;

    #[test]
    fn identity_features_and_config() {
        let mut balloon = Balloon::new().unwrap();
        assert_eq!(balloon.device_type(), VIRTIO_ID_BALLOON);
        assert_eq!(balloon.queue_max_sizes(), &[QUEUE_SIZE; QUEUES]);
        assert_eq!(
            balloon.avail_features(),
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_REPORTING
        );
        balloon.write_config(4, &7u32.to_le_bytes());
        let mut data = [0xff; 8];
        balloon.read_config(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 7, 0, 0, 0]);
        let mut actual = [0xff; 2];
        balloon.read_config(4, &mut actual);
        assert_eq!(actual, [7, 0]);
        // The target is the device's: a driver write there is ignored.
        balloon.write_config(0, &9u32.to_le_bytes());
        balloon.read_config(0, &mut data);
        assert_eq!(data[..4], [0; 4]);
    }

    /// A report through the event loop: its pages read back as zero afterwards and the count
    /// of discarded bytes grows.
    #[test]
    fn a_report_gives_pages_back_through_the_event_loop() {
        let mem = mem();
        let at = 0x10_0000;
        mem.write_slice(&[0xa5; 0x2000], GuestAddress(at)).unwrap();
        let balloon = Arc::new(Mutex::new(Balloon::new().unwrap()));
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(balloon.clone());
        let line = Arc::new(CountingInterrupt::default());
        let mut drivers: Vec<Driver> = (0..QUEUES as u64)
            .map(|q| Driver::new(&mem, q * 0x1_0000))
            .collect();
        let queues = drivers.iter().map(Driver::queue).collect();
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        balloon
            .lock()
            .unwrap()
            .activate(mem.clone(), queues, interrupt)
            .unwrap();
        drivers[REPORTING].post(&[(at, 0x2000, W)]);
        balloon.lock().unwrap().queue_events()[REPORTING]
            .write(1)
            .unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(drivers[REPORTING].used(), vec![(0, 0)]);
        assert_eq!(line.count(), 1);
        assert_eq!(balloon.lock().unwrap().handler.discarded, 0x2000);
        let mut back = [0xff; 0x2000];
        mem.read_slice(&mut back, GuestAddress(at)).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
