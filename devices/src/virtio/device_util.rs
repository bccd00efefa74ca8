//! Small pieces every virtio device repeats: checking the queues handed over at activation,
//! serving reads of a configuration byte array, and the warn-once logging around config writes,
//! queue eventfds and the used-buffer interrupt.

use event_manager::{EventOps, EventSet, Events};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

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

/// Reports, once per device, a driver write to configuration space the device ignores.
pub(crate) fn ignore_config_write(warned: &mut LogOnce, device: &str, offset: u64, data: &[u8]) {
    warn_once!(
        warned,
        Problem::ConfigWrite,
        "{device}: ignoring {}-byte config write at {offset:#x}",
        data.len()
    );
}

/// Registers every queue eventfd with the event loop.
pub(crate) fn watch_queue_events(ops: &mut EventOps, evts: &[EventFd], device: &str) {
    let which = if evts.len() == 1 { "the" } else { "a" };
    for evt in evts {
        if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
            warn!("{device}: cannot watch {which} queue eventfd: {e:?}");
        }
    }
}

/// Tells the driver buffers were used, reporting a failure once per device.
pub(crate) fn signal_used_queue(interrupt: &VirtioInterrupt, warned: &mut LogOnce, device: &str) {
    if let Err(e) = interrupt.signal_used_queue() {
        warn_once!(
            warned,
            Problem::Irq,
            "{device}: cannot raise the interrupt: {e}"
        );
    }
}

/// What the transport does on a QueueNotify write, for device tests.
#[cfg(test)]
pub(crate) fn notify_queue(device: &std::sync::Mutex<impl super::VirtioDevice>, queue: usize) {
    device.lock().unwrap().queue_events()[queue]
        .write(1)
        .unwrap();
}

/// Runs a device test's event loop until it has nothing to do; returns the events it handled.
#[cfg(test)]
pub(crate) fn run_until_idle<T: event_manager::MutEventSubscriber>(
    manager: &mut event_manager::EventManager<T>,
) -> usize {
    let mut total = 0;
    loop {
        match manager.run_with_timeout(50).unwrap() {
            0 => return total,
            n => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::virtio::test_utils::CountingInterrupt;

    fn queue(ready: bool) -> Queue {
        let mut q = Queue::new(16).unwrap();
        q.set_ready(ready);
        q
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

    #[test]
    fn warnings_are_once_and_interrupts_are_raised() {
        let mut warned = LogOnce::default();
        ignore_config_write(&mut warned, "test", 0, &[1]);
        assert!(!warned.first(Problem::ConfigWrite));
        let line = Arc::new(CountingInterrupt::default());
        let irq = VirtioInterrupt::new(line.clone());
        let mut warned = LogOnce::default();
        signal_used_queue(&irq, &mut warned, "test");
        assert_eq!(line.count(), 1);
        assert!(warned.first(Problem::Irq), "no failure, no warning");
    }
}
