//! Virtio device model: the device-side trait, the interrupt shared by a device and its
//! transport, and the devices themselves.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::Interrupt;
use crate::snapshot::SnapshotError;

pub mod balloon;
pub mod block;
mod common;
#[cfg(test)]
mod conformance;
pub mod console;
pub mod drain;
pub mod fs;
mod iovec;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod sg;
pub mod vsock;

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// The driver did not enable a queue the device needs.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device was activated twice without a reset.
    #[error("device is already active")]
    AlreadyActive,
    /// The device's backend (a vhost-user process) refused to start the queues.
    #[error("the device's backend cannot start")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The device side of a virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`virtio_ids.h`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (always a subset of `avail_features`, with VERSION_1).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One EventFd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state; false if it cannot.
    fn reset(&mut self) -> bool;
    /// (next_avail, next_used) of each queue of the running device, for a snapshot: positions
    /// from which a device restored with them serves every request the guest has made. `Busy`
    /// while the device holds requests it cannot give back that way.
    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        Err(SnapshotError::Unsupported("this device"))
    }
    /// Called once a restore has activated the device with its saved queues.
    fn restored(&mut self) {}
}

/// Interrupt status register shared between a device and its transport, plus the interrupt
/// line that announces changes to it.
pub struct VirtioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    /// A backend raises the line itself: every interrupt may be a used-buffer one.
    direct: AtomicBool,
    line: Arc<dyn Interrupt>,
}

impl VirtioInterrupt {
    /// Wraps the interrupt line of one transport.
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            direct: AtomicBool::new(false),
            line,
        }
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // Every event gets an edge even if the bit was already set: the guest may have read
        // the status before this update and would otherwise not come back for it.
        self.line.trigger()
    }

    /// Tells the driver that buffers were returned on a queue.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver that configuration space changed (and bumps its generation).
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The line's irqfd for a backend in another process (virtiofsd) to raise for its used
    /// buffers, as Firecracker's vhost-user devices do: no hop through rvmm's device thread.
    /// Since rvmm then never sees those interrupts, `InterruptStatus` reports a used buffer
    /// from now on (until reset); a driver that finds none on a queue just returns.
    pub fn irqfd_for_backend(&self) -> Option<&EventFd> {
        let irqfd = self.line.irqfd()?;
        self.direct.store(true, Ordering::SeqCst);
        Some(irqfd)
    }

    /// Pending interrupt causes (`InterruptStatus`).
    pub fn status(&self) -> u32 {
        let direct = if self.direct.load(Ordering::SeqCst) {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | direct
    }

    /// Clears the causes the driver acknowledged (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Configuration generation counter (`ConfigGeneration`).
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Puts back a saved status and generation without raising the line: an interrupt the
    /// guest had not handled yet is part of its own saved (local APIC) state.
    fn restore(&self, status: u32, config_generation: u32) {
        let causes = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        self.status.store(status & causes, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.direct.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// An interrupt line that counts its edges.
    #[derive(Default)]
    pub(crate) struct CountingInterrupt(pub(crate) AtomicUsize);

    impl Interrupt for CountingInterrupt {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl CountingInterrupt {
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// What the transport does on a QueueNotify write.
    pub(crate) fn notify_queue(device: &std::sync::Mutex<impl VirtioDevice>, queue: usize) {
        device.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
    }

    /// Runs a device test's event loop until it has nothing to do; returns the events it
    /// handled.
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
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::test_utils::CountingInterrupt;
    use super::*;

    #[test]
    fn interrupt_status_set_ack_and_generation() {
        let line = Arc::new(CountingInterrupt::default());
        let irq = VirtioInterrupt::new(line.clone());
        irq.signal_used_queue().unwrap();
        irq.signal_used_queue().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(line.count(), 2);
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn a_backend_gets_the_irqfd_and_the_status_always_says_vring() {
        let counting = VirtioInterrupt::new(Arc::new(CountingInterrupt::default()));
        assert!(counting.irqfd_for_backend().is_none());
        assert_eq!(counting.status(), 0);
        let line = Arc::new(crate::interrupt::EventFdInterrupt::new().unwrap());
        let irq = VirtioInterrupt::new(line.clone());
        let irqfd = irq.irqfd_for_backend().unwrap();
        assert_eq!(irqfd.as_raw_fd(), line.eventfd().as_raw_fd());
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
