//! What every virtio device shares: its queues' sizes and eventfds, the guest memory, queues and
//! interrupt that activation hands over, and the event-loop glue around the queue eventfds.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, VirtioInterrupt};
use crate::snapshot::SnapshotError;
use crate::{warn_once, LogOnce, Problem};

/// What a device runs on between activation and reset.
pub(crate) struct Active<const N: usize> {
    pub(crate) mem: GuestMemoryMmap,
    /// Indexed like the device's queues.
    pub(crate) queues: [Queue; N],
    pub(crate) interrupt: Arc<VirtioInterrupt>,
}

/// The queue state of a device with `N` queues.
pub(crate) struct VirtioCommon<const N: usize> {
    /// Prefixes log messages ("virtio-blk").
    name: &'static str,
    queue_sizes: [u16; N],
    queue_evts: Vec<EventFd>,
    active: Option<Active<N>>,
    warned: LogOnce,
}

impl<const N: usize> VirtioCommon<N> {
    /// `N` queues of at most `queue_size` entries, each with its notification eventfd.
    pub(crate) fn new(name: &'static str, queue_size: u16) -> io::Result<Self> {
        let queue_evts = (0..N)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            name,
            queue_sizes: [queue_size; N],
            queue_evts,
            active: None,
            warned: LogOnce::default(),
        })
    }

    /// [`super::VirtioDevice::queue_max_sizes`].
    pub(crate) fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// [`super::VirtioDevice::queue_events`].
    pub(crate) fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Takes the driver's queues, each of which must be ready; fails if already active.
    pub(crate) fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let queues = ready_queues(queues)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    /// Gives back what activation took, if anything; the device may be activated again.
    pub(crate) fn reset(&mut self) -> Option<Active<N>> {
        self.active.take()
    }

    /// (next_avail, next_used) of each queue, as they stand.
    pub(crate) fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        let active = self
            .active
            .as_ref()
            .ok_or(SnapshotError::NotRunning(self.name))?;
        let positions = active.queues.iter();
        Ok(positions.map(|q| (q.next_avail(), q.next_used())).collect())
    }

    /// Activated and not reset since.
    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The running state; reports, once, a notification that came before activation.
    pub(crate) fn active_or_idle(&mut self) -> Option<&mut Active<N>> {
        if self.active.is_none() {
            self.idle();
        }
        self.active.as_mut()
    }

    /// The running state, when the device is active.
    pub(crate) fn active(&mut self) -> Option<&mut Active<N>> {
        self.active.as_mut()
    }

    /// Serves the queues with `serve` after a notification, then tells the driver if `serve`
    /// asks to. A failure is reported once, as `<name>: <context><error>`, and announced all the
    /// same: the chains returned before it need announcing.
    pub(crate) fn serve<E: std::error::Error>(
        &mut self,
        problem: Problem,
        context: &str,
        serve: impl FnOnce(&GuestMemoryMmap, &mut [Queue; N]) -> Result<bool, E>,
    ) {
        let Some(active) = self.active_or_idle() else {
            return;
        };
        let notify = serve(&active.mem, &mut active.queues).unwrap_or_else(|e| {
            warn_once!(
                self.warned,
                problem,
                "{}: {context}{}",
                self.name,
                crate::error_chain(&e)
            );
            true
        });
        if notify {
            self.signal_used_queue();
        }
    }

    /// Reports, once, a notification that came before activation.
    pub(crate) fn idle(&mut self) {
        warn_once!(
            self.warned,
            Problem::Idle,
            "{}: queue notified before activation",
            self.name
        );
    }

    /// Tells the driver buffers were used, reporting a failure once.
    pub(crate) fn signal_used_queue(&mut self) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if let Err(e) = active.interrupt.signal_used_queue() {
            warn_once!(
                self.warned,
                Problem::Irq,
                "{}: cannot raise the interrupt: {e}",
                self.name
            );
        }
    }

    /// Reports, once, a driver write to configuration space the device ignores.
    pub(crate) fn ignore_config_write(&mut self, offset: u64, data: &[u8]) {
        warn_once!(
            self.warned,
            Problem::ConfigWrite,
            "{}: ignoring {}-byte config write at {offset:#x}",
            self.name,
            data.len()
        );
    }

    /// Registers every queue eventfd with the event loop.
    pub(crate) fn watch_queue_events(&self, ops: &mut EventOps) {
        let which = if N == 1 { "the" } else { "a" };
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("{}: cannot watch {which} queue eventfd: {e:?}", self.name);
            }
        }
    }

    /// The queue whose eventfd `fd` is, with its notifications drained; none for other fds.
    pub(crate) fn queue_event(&self, fd: RawFd) -> Option<usize> {
        let queue = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd)?;
        // The count does not matter: one pass serves every notification so far.
        let _ = self.queue_evts[queue].read();
        Some(queue)
    }

    /// Makes the event loop serve the `role` queue as if the driver had notified it.
    pub(crate) fn kick(&self, queue: usize, role: &str) {
        if let Err(e) = self.queue_evts[queue].write(1) {
            warn!("{}: cannot kick the {role} queue: {e}", self.name);
        }
    }
}

/// The transport's queues as the device's `N` queues, each of which the driver must have made
/// ready.
pub(crate) fn ready_queues<const N: usize>(
    queues: Vec<Queue>,
) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    let Ok(queues) = <[Queue; N]>::try_from(queues) else {
        return Err(ActivateError::QueueCount { expected: N, got });
    };
    if let Some(index) = queues.iter().position(|q| !q.ready()) {
        return Err(ActivateError::QueueNotReady(index));
    }
    Ok(queues)
}

/// Reads `data.len()` bytes of `config` from `offset`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).map_or(config.len(), |o| o.min(config.len()));
    let src = &config[start..];
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_utils::mem;
    use crate::virtio::test_utils::CountingInterrupt;

    fn queue(ready: bool) -> Queue {
        let mut q = Queue::new(16).unwrap();
        q.set_ready(ready);
        q
    }

    fn interrupt() -> (Arc<VirtioInterrupt>, Arc<CountingInterrupt>) {
        let line = Arc::new(CountingInterrupt::default());
        (Arc::new(VirtioInterrupt::new(line.clone())), line)
    }

    #[test]
    fn ready_queues_checks_count_and_readiness() {
        let err = ready_queues::<1>(vec![]).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        let err = ready_queues::<2>(vec![queue(true)]).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
        let err = ready_queues::<1>(vec![queue(false)]).unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady(0)));
        let err = ready_queues::<3>(vec![queue(true), queue(true), queue(false)]).unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady(2)));
        let [q] = ready_queues::<1>(vec![queue(true)]).unwrap();
        assert!(q.ready());
        let qs = ready_queues::<2>(vec![queue(true), queue(true)]).unwrap();
        assert!(qs.iter().all(|q| q.ready()));
    }

    #[test]
    fn activate_reset_and_activate_again() {
        let mut common = VirtioCommon::<2>::new("test", 16).unwrap();
        assert_eq!(common.queue_max_sizes(), &[16, 16]);
        assert_eq!(common.queue_events().len(), 2);
        assert!(common.reset().is_none());
        let (irq, line) = interrupt();
        let queues = || vec![queue(true), queue(true)];
        common.activate(mem(), queues(), irq.clone()).unwrap();
        assert!(common.is_active());
        let err = common.activate(mem(), queues(), irq.clone()).unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive));
        common.signal_used_queue();
        assert_eq!(line.count(), 1);
        let active = common.reset().unwrap();
        assert!(Arc::ptr_eq(&active.interrupt, &irq));
        assert!(active.queues.iter().all(|q| q.ready()));
        assert!(!common.is_active() && common.active_or_idle().is_none());
        // Not active: nobody to tell.
        common.signal_used_queue();
        assert_eq!(line.count(), 1);
        common.activate(mem(), queues(), irq).unwrap();
        assert!(common.active().is_some());
    }

    #[test]
    fn queue_events_are_drained_and_kicked() {
        let common = VirtioCommon::<3>::new("test", 16).unwrap();
        let fd = |i: usize| common.queue_events()[i].as_raw_fd();
        common.kick(1, "transmit");
        assert_eq!(common.queue_event(fd(1)), Some(1));
        assert!(common.queue_events()[1].read().is_err(), "drained");
        assert_eq!(common.queue_event(fd(2)), Some(2));
        assert_eq!(common.queue_event(-1), None);
    }

    #[test]
    fn config_bytes_read_with_zero_fill() {
        let config = [1u8, 2, 3, 4, 5, 6];
        let mut data = [0xff; 4];
        read_config_bytes(&config, 0, &mut data);
        assert_eq!(data, [1, 2, 3, 4]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [5, 6, 0, 0]);
        for offset in [6, 7, u64::MAX] {
            let mut data = [0xff; 4];
            read_config_bytes(&config, offset, &mut data);
            assert_eq!(data, [0; 4]);
        }
        let mut data = [0xff; 2];
        read_config_bytes(&[], 0, &mut data);
        assert_eq!(data, [0; 2]);
    }
}
