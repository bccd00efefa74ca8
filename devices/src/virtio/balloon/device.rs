//! The virtio-balloon device: feature negotiation, a configuration space whose target stays 0,
//! and the event-loop glue that serves a queue when the driver notifies it and asks for
//! statistics on a timer.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::discard::discard;
use super::handler::BalloonHandler;
use super::stats::{Stats, VIRTIO_BALLOON_F_STATS_VQ};
use super::{
    DEFLATE, INFLATE, QUEUES, QUEUE_SIZE, REPORTING, STATS, STATS_INTERVAL,
    VIRTIO_BALLOON_F_REPORTING,
};
use crate::snapshot::SnapshotError;
use crate::virtio::common::VirtioCommon;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::Problem;

/// Errors setting up a virtio-balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A queue EventFd could not be created.
    #[error("cannot create the queue eventfds")]
    EventFd(#[source] io::Error),
    /// The statistics timer could not be set up.
    #[error("cannot set up the statistics timer")]
    Timer(#[source] io::Error),
}

/// Configuration space: `num_pages` (the target, always 0) and `actual` (the driver's count),
/// both little-endian u32.
const CONFIG_LEN: usize = 8;

/// A virtio-balloon device that gives reported free pages back to the host.
pub struct Balloon {
    handler: BalloonHandler,
    stats: Stats,
    /// Fires every [`STATS_INTERVAL`] when the statistics go to a file.
    timer: Option<TimerFd>,
    common: VirtioCommon<QUEUES>,
    /// Pages the driver says the balloon holds.
    actual: u32,
}

impl Balloon {
    /// A balloon with its queues' eventfds; the guest's statistics go to `stats_out` when
    /// given.
    pub fn new(stats_out: Option<File>) -> Result<Self, BalloonError> {
        let timer = match stats_out {
            Some(_) => {
                let mut timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?;
                timer
                    .reset(STATS_INTERVAL, Some(STATS_INTERVAL))
                    .map_err(|e| BalloonError::Timer(e.into()))?;
                Some(timer)
            }
            None => None,
        };
        Ok(Self {
            handler: BalloonHandler::default(),
            stats: Stats::new(stats_out),
            timer,
            common: VirtioCommon::new("virtio-balloon", QUEUE_SIZE)
                .map_err(BalloonError::EventFd)?,
            actual: 0,
        })
    }

    /// Asks the driver for fresh statistics.
    fn request_stats(&mut self) {
        let stats = &mut self.stats;
        self.common
            .serve(Problem::Queue, "", |mem: &GuestMemoryMmap, queues| {
                stats.request(mem, &mut queues[STATS])
            });
    }

    fn serve(&mut self, queue: usize) {
        let (handler, stats) = (&mut self.handler, &mut self.stats);
        self.common
            .serve(Problem::Queue, "", |mem: &GuestMemoryMmap, queues| {
                let mut give_back = |addr, len| discard(mem, addr, len);
                match queue {
                    INFLATE => handler.process_inflate(mem, &mut queues[INFLATE], &mut give_back),
                    DEFLATE => handler.process_deflate(mem, &mut queues[DEFLATE]),
                    STATS => stats.process(mem, &mut queues[STATS]),
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
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_REPORTING
    }

    fn set_acked_features(&mut self, _features: u64) {
        // A driver without statistics or page reporting numbers its queues otherwise and
        // leaves the last one unready: activation fails.
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
        self.common.activate(mem, queues, interrupt)?;
        // Linux posts its statistics buffer and kicks before DRIVER_OK, while the device was
        // not serving yet: the kick is replayed so the buffer is taken.
        if let Err(e) = self.common.queue_events()[STATS].write(1) {
            log::warn!("virtio-balloon: cannot replay the statistics kick: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        self.stats.reset();
        self.actual = 0;
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        let mut positions = self.common.queue_positions()?;
        // The statistics buffer the device keeps goes back to the ring: the restored device
        // takes it again when activation replays the statistics kick.
        if self.stats.holds() {
            let stats = &mut positions[STATS];
            stats.0 = stats.0.wrapping_sub(1);
        }
        Ok(positions)
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(queue) = self.common.queue_event(events.fd()) {
            // Linux's kick of its statistics buffer before DRIVER_OK is expected, and replayed
            // at activation: not worth a warning.
            if queue == STATS && !self.common.is_active() {
                return;
            }
            return self.serve(queue);
        }
        let timer = self.timer.as_mut().filter(|t| t.as_raw_fd() == events.fd());
        if let Some(timer) = timer {
            // The count of expirations does not matter: one request covers them.
            let _ = timer.wait();
            if self.common.is_active() {
                self.request_stats();
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queue_events(ops);
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                log::warn!("virtio-balloon: cannot watch the statistics timer: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::test_utils::{mem, R, W};
    use crate::virtio::net::test_utils::Driver;
    use crate::virtio::test_utils::CountingInterrupt;

    #[test]
    fn identity_features_and_config() {
        let mut balloon = Balloon::new(None).unwrap();
        assert_eq!(balloon.device_type(), VIRTIO_ID_BALLOON);
        assert_eq!(balloon.queue_max_sizes(), &[QUEUE_SIZE; QUEUES]);
        assert_eq!(
            balloon.avail_features(),
            1 << VIRTIO_F_VERSION_1
                | 1 << VIRTIO_BALLOON_F_STATS_VQ
                | 1 << VIRTIO_BALLOON_F_REPORTING
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
        let balloon = Arc::new(Mutex::new(Balloon::new(None).unwrap()));
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
        // The statistics kick that activation replays finds no buffer: nothing is returned.
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(line.count(), 0);
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

    /// The driver's statistics buffer: its figures land in the file, the device keeps it,
    /// and returns it when it wants fresh ones.
    #[test]
    fn statistics_go_to_the_file_and_the_buffer_comes_back_on_request() {
        use std::io::Read;
        let mem = mem();
        let at = 0x10_0000;
        let mut entries = Vec::new();
        for (tag, value) in [(5u16, 512u64 << 20), (6, 300 << 20)] {
            entries.extend_from_slice(&tag.to_le_bytes());
            entries.extend_from_slice(&value.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(at)).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("stats");
        let file = File::create(&path).unwrap();
        let mut balloon = Balloon::new(Some(file)).unwrap();
        let line = Arc::new(CountingInterrupt::default());
        let mut drivers: Vec<Driver> = (0..QUEUES as u64)
            .map(|q| Driver::new(&mem, q * 0x1_0000))
            .collect();
        let queues = drivers.iter().map(Driver::queue).collect();
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        balloon.activate(mem.clone(), queues, interrupt).unwrap();
        drivers[STATS].post(&[(at, entries.len() as u32, R)]);
        balloon.serve(STATS);
        assert!(drivers[STATS].used().is_empty());
        assert_eq!(line.count(), 0);
        let mut text = String::new();
        File::open(&path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(
            text.trim_end(),
            "{\"total_memory\":536870912,\"available_memory\":314572800}"
        );
        balloon.request_stats();
        assert_eq!(drivers[STATS].used(), vec![(0, 0)]);
        assert_eq!(line.count(), 1);
        // Nothing held: nothing to return.
        balloon.request_stats();
        assert_eq!(line.count(), 1);
    }
}
