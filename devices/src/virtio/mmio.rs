//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! It owns the register state the driver programs (features, queue addresses, status) and hands
//! the device finished queues when the driver sets DRIVER_OK. Guest mistakes never panic: the
//! offending access is ignored and reported once.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::interrupt::EventFdInterrupt;
use crate::snapshot::SnapshotError;
use crate::{warn_once, LogOnce, Problem};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify in the window: the VMM registers ioeventfds at `base + this`.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// The largest queue the split-ring layout allows.
const MAX_QUEUE_SIZE: u16 = 32768;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
/// Status while the driver negotiates features.
const NEGOTIATING: u32 = S_ACK | S_DRIVER;
/// Status while the driver sets up queues.
const CONFIGURING: u32 = S_ACK | S_DRIVER | S_FEATURES_OK;

/// Errors of the MMIO transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device's queue sizes and queue events disagree.
    #[error("device has {sizes} queue sizes but {events} queue events")]
    QueueEventCount {
        /// Number of queue sizes.
        sizes: usize,
        /// Number of queue events.
        events: usize,
    },
    /// A device queue size is not a power of two in 1..=32768.
    #[error("queue {index} has invalid max size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The rejected size.
        size: u16,
    },
    /// Duplicating a queue EventFd failed.
    #[error("failed to duplicate a queue eventfd")]
    CloneEventFd(#[source] io::Error),
    /// The driver programmed a queue the device cannot use.
    #[error("queue {index} is invalid")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// What virtio-queue refused.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's rings are not entirely inside guest memory.
    #[error("queue {0} rings are outside guest memory")]
    QueueOutsideMemory(usize),
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
}

/// One queue as the driver programs it; turned into a `virtio_queue::Queue` at activation.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the runtime queue, checking alignment and that the rings lie in guest memory.
    fn build(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, MmioError> {
        let invalid = |source| MmioError::InvalidQueue { index, source };
        let mut queue = Queue::new(self.max_size).map_err(invalid)?;
        if !self.ready {
            return Ok(queue);
        }
        queue.try_set_size(self.size).map_err(invalid)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(invalid)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(invalid)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .map_err(invalid)?;
        // Split-ring sizes (virtio 1.1, 2.6): 16-byte descriptors; avail and used rings have a
        // 4-byte header, 2- or 8-byte entries and a 2-byte event field.
        let n = usize::from(self.size);
        let rings = [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ];
        if !rings
            .iter()
            .all(|&(addr, len)| mem.check_range(GuestAddress(addr), len))
        {
            return Err(MmioError::QueueOutsideMemory(index));
        }
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(queue)
    }
}

/// One queue of a saved transport: what the driver programmed, and where a running device
/// stands on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The device's maximum size (QueueNumMax).
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available entry the device takes (0 unless the device was running).
    pub next_avail: u16,
    /// The next used entry the device fills (0 unless the device was running).
    pub next_used: u16,
}

/// Everything a virtio-mmio transport holds, with its device's queue positions: restored onto
/// a freshly built transport for the same device, it lets the guest's driver go on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Virtio device ID.
    pub device_type: u32,
    /// The Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The driver wrote a feature bit beyond 63.
    pub unknown_features: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// Every queue of the device, in order.
    pub queues: Vec<QueueState>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device's configuration space as the driver last saw it (its first
    /// [`SAVED_CONFIG_LEN`] bytes): a device restored with other settings (a disk of another
    /// size) tells the driver its configuration changed.
    #[serde(default)]
    pub config: Vec<u8>,
}

/// How much of a device's configuration space a snapshot keeps: more than any device here has.
const SAVED_CONFIG_LEN: usize = 256;

impl QueueState {
    fn new(q: &QueueConfig, (next_avail, next_used): (u16, u16)) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            next_avail,
            next_used,
        }
    }

    fn config(&self) -> QueueConfig {
        QueueConfig {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    /// Duplicates of the device's queue EventFds, so the VMM can borrow them without locking
    /// the device.
    notify_evts: Vec<EventFd>,
    device_type: u32,
    avail_features: u64,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver set a feature bit beyond the 64 this transport models.
    unknown_features: bool,
    queue_sel: u32,
    status: u32,
    warned: LogOnce,
}

impl MmioTransport {
    /// Puts `device` behind a register window; `irq` is its interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: Arc<EventFdInterrupt>,
    ) -> Result<Self, MmioError> {
        let guard = lock(&device);
        let sizes = guard.queue_max_sizes();
        let events = guard.queue_events();
        if sizes.len() != events.len() {
            return Err(MmioError::QueueEventCount {
                sizes: sizes.len(),
                events: events.len(),
            });
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(MmioError::QueueMaxSize { index, size });
            }
            queues.push(QueueConfig::new(size));
        }
        let notify_evts = events
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::CloneEventFd)?;
        let device_type = guard.device_type();
        let avail_features = guard.avail_features();
        drop(guard);
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            notify_evts,
            device_type,
            avail_features,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            unknown_features: false,
            queue_sel: 0,
            status: 0,
            warned: LogOnce::default(),
        })
    }

    /// (eventfd, datamatch) pairs the VMM registers as KVM ioeventfds at
    /// `base + QUEUE_NOTIFY_OFFSET` (4-byte writes of the queue index).
    pub fn queue_notify_events(&self) -> Vec<(&EventFd, u32)> {
        self.notify_evts.iter().zip(0u32..).collect()
    }

    fn read_register(&self, offset: u32) -> Option<u32> {
        let queue = self.queues.get(self.queue_sel as usize);
        Some(match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            // Zero tells the driver the selected queue does not exist.
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| q.ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // All-ones length: no shared memory regions.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => return None,
        })
    }

    fn write_register(&mut self, offset: u32, value: u32) -> bool {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(value),
            // Linux disables its queues after resetting the device (vm_del_vq): harmless
            // whenever the device is not running, so allowed without the state check.
            VIRTIO_MMIO_QUEUE_READY if value == 0 && self.status & S_DRIVER_OK == 0 => {
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    q.ready = false;
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.with_queue(|q| q.ready = value == 1),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue(|q| set_low(&mut q.desc, value)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue(|q| set_high(&mut q.desc, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue(|q| set_low(&mut q.avail, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_queue(|q| set_high(&mut q.avail, value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue(|q| set_low(&mut q.used, value)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_queue(|q| set_high(&mut q.used, value)),
            // There are no shared memory regions to select.
            VIRTIO_MMIO_SHM_SEL => {}
            _ => return false,
        }
        true
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != NEGOTIATING {
            return self.bad_state("DriverFeatures");
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
            // No feature exists above bit 63: any bit there is one the device did not offer.
            _ => self.unknown_features |= value != 0,
        }
    }

    /// Queue registers may only change after FEATURES_OK and before DRIVER_OK; they take
    /// effect at DRIVER_OK.
    fn with_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if self.status != CONFIGURING {
            return self.bad_state("queue configuration");
        }
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(queue) => f(queue),
            None => {
                warn_once!(
                    self.warned,
                    Problem::Queue,
                    "virtio-mmio: queue {} does not exist",
                    self.queue_sel
                );
            }
        }
    }

    fn write_queue_num(&mut self, value: u32) {
        let max = self.queues.get(self.queue_sel as usize).map(|q| q.max_size);
        match (max, u16::try_from(value)) {
            (Some(max), Ok(size)) if size.is_power_of_two() && size <= max => {
                self.with_queue(|q| q.size = size)
            }
            // A nonexistent queue is reported by with_queue.
            (None, _) => self.with_queue(|_| {}),
            _ => {
                warn_once!(
                    self.warned,
                    Problem::Queue,
                    "virtio-mmio: refusing queue size {value}"
                );
            }
        }
    }

    fn notify(&mut self, queue: u32) {
        if self.status & S_DRIVER_OK == 0 {
            return self.bad_state("QueueNotify");
        }
        match self.notify_evts.get(queue as usize).map(|evt| evt.write(1)) {
            Some(Ok(())) => {}
            Some(Err(e)) => warn!("virtio-mmio: cannot signal queue {queue}: {e}"),
            None => {
                warn_once!(
                    self.warned,
                    Problem::Queue,
                    "virtio-mmio: notify for nonexistent queue {queue}"
                );
            }
        }
    }

    /// The driver walks ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, each write adding one
    /// bit; 0 resets; FAILED may be set at any time. Anything else is ignored.
    fn write_status(&mut self, value: u32) {
        let old = self.status;
        if value == 0 {
            return self.reset();
        }
        if value & S_FAILED != 0 {
            // The driver gave up on the device; it stays unusable until reset.
            self.status |= S_FAILED;
            return;
        }
        if value == old {
            return;
        }
        // (current status, the one bit being added)
        match (old, value ^ old) {
            (0, S_ACK) | (S_ACK, S_DRIVER) => self.status = value,
            (NEGOTIATING, S_FEATURES_OK) => self.features_ok(),
            (CONFIGURING, S_DRIVER_OK) => self.driver_ok(),
            _ => {
                warn_once!(
                    self.warned,
                    Problem::State,
                    "virtio-mmio: invalid status transition {old:#x} -> {value:#x}"
                );
            }
        }
    }

    /// Accepts the negotiated features unless they include unoffered ones or lack VERSION_1
    /// (this transport has no legacy mode); a refused FEATURES_OK reads back as unset.
    fn features_ok(&mut self) {
        let features = self.driver_features;
        if !self.acceptable(features, self.unknown_features) {
            warn_once!(
                self.warned,
                Problem::Features,
                "virtio-mmio: refusing features {features:#x} (offered {:#x}, VERSION_1 required)",
                self.avail_features
            );
            return;
        }
        lock(&self.device).set_acked_features(features);
        self.status |= S_FEATURES_OK;
    }

    /// Only offered features, VERSION_1 among them.
    fn acceptable(&self, features: u64, unknown: bool) -> bool {
        let unoffered = features & !self.avail_features != 0 || unknown;
        !unoffered && features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn driver_ok(&mut self) {
        match self.activate() {
            Ok(()) => self.status |= S_DRIVER_OK,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Activate,
                    "virtio-mmio: {}",
                    crate::error_chain(&e)
                );
                // virtio 1.1, 2.1.2: a device that cannot go on sets DEVICE_NEEDS_RESET and,
                // once DRIVER_OK is set, tells the driver with a configuration interrupt.
                self.status |= S_DRIVER_OK | S_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config_change() {
                    warn!("virtio-mmio: cannot raise the interrupt: {e}");
                }
            }
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        let queues = build_queues(&self.queues, &self.mem, self.driver_features)?;
        lock(&self.device)
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .map_err(MmioError::Activate)
    }

    fn reset(&mut self) {
        self.status = if lock(&self.device).reset() {
            0
        } else {
            warn!("virtio-mmio: device cannot reset; marking it failed");
            S_FAILED
        };
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.unknown_features = false;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn bad_state(&mut self, what: &str) {
        warn_once!(
            self.warned,
            Problem::State,
            "virtio-mmio: ignoring {what} write in status {:#x}",
            self.status
        );
    }

    /// Registers are 32-bit and aligned (virtio 1.1, 4.2.2.2); other accesses are refused.
    fn register_offset(&mut self, offset: u64, len: usize) -> Option<u32> {
        if len == 4 && offset.is_multiple_of(4) {
            return u32::try_from(offset).ok();
        }
        warn_once!(
            self.warned,
            Problem::Access,
            "virtio-mmio: ignoring {len}-byte register access at {offset:#x}"
        );
        None
    }

    fn unknown_register(&mut self, offset: u32) {
        warn_once!(
            self.warned,
            Problem::Access,
            "virtio-mmio: ignoring access to register {offset:#x}"
        );
    }
}

impl MmioTransport {
    /// The transport's state and, if the device runs, its queue positions (read under the
    /// device's lock). Changes nothing; `Busy` while the device holds unanswered requests.
    pub fn save(&self) -> Result<MmioState, SnapshotError> {
        let positions = if running(self.status) {
            lock(&self.device).queue_positions()?
        } else {
            vec![(0, 0); self.queues.len()]
        };
        if positions.len() != self.queues.len() {
            return Err(mismatch(format!(
                "the device gave {} queue positions for {} queues",
                positions.len(),
                self.queues.len()
            )));
        }
        let queues = self.queues.iter().zip(positions);
        Ok(MmioState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            unknown_features: self.unknown_features,
            queue_sel: self.queue_sel,
            queues: queues.map(|(q, pos)| QueueState::new(q, pos)).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            config: self.config_space(),
        })
    }

    fn config_space(&self) -> Vec<u8> {
        let mut config = vec![0u8; SAVED_CONFIG_LEN];
        lock(&self.device).read_config(0, &mut config);
        config
    }

    /// Puts `state` back on this freshly built transport, whose device must be of the same
    /// type and queue sizes. A device that was running gets its features, then its queues at
    /// the saved positions, then [`VirtioDevice::restored`]; every queue is kicked once, since
    /// notifications the old device had not served yet went with it. Raises an interrupt only
    /// where the device's configuration differs from the saved one (a configuration change).
    /// On error the transport and device are to be discarded.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), SnapshotError> {
        self.check(state)?;
        let configs: Vec<_> = state.queues.iter().map(QueueState::config).collect();
        let running = running(state.status);
        let queues = if running {
            let mut queues = build_queues(&configs, &self.mem, state.driver_features)
                .map_err(SnapshotError::Queue)?;
            for (queue, saved) in queues.iter_mut().zip(&state.queues) {
                queue.set_next_avail(saved.next_avail);
                queue.set_next_used(saved.next_used);
            }
            queues
        } else {
            Vec::new()
        };
        if state.status & S_FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(state.driver_features);
        }
        if running {
            lock(&self.device)
                .activate(self.mem.clone(), queues, self.interrupt.clone())
                .map_err(SnapshotError::Activate)?;
        }
        self.queues = configs;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.unknown_features = state.unknown_features;
        self.queue_sel = state.queue_sel;
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        if running {
            for (queue, evt) in self.notify_evts.iter().enumerate() {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot kick restored queue {queue}: {e}");
                }
            }
            lock(&self.device).restored();
            if !state.config.is_empty() && state.config != self.config_space() {
                if let Err(e) = self.interrupt.signal_config_change() {
                    warn!("virtio-mmio: cannot announce the changed configuration: {e}");
                }
            }
        }
        Ok(())
    }

    /// Refuses a state this device could not be in: another type, other queues, a status the
    /// transport never reaches, features it would not have accepted.
    fn check(&self, state: &MmioState) -> Result<(), SnapshotError> {
        if state.device_type != self.device_type {
            return Err(mismatch(format!(
                "device type {} (this device is {})",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "{} queues (this device has {})",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (index, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size {
                return Err(mismatch(format!(
                    "queue {index} holds at most {} entries (here {})",
                    saved.max_size, ours.max_size
                )));
            }
            if !saved.size.is_power_of_two() || saved.size > saved.max_size {
                return Err(mismatch(format!("queue {index} has size {}", saved.size)));
            }
        }
        let reachable = [
            0,
            S_ACK,
            NEGOTIATING,
            CONFIGURING,
            CONFIGURING | S_DRIVER_OK,
            CONFIGURING | S_DRIVER_OK | S_NEEDS_RESET,
        ];
        if !reachable.contains(&(state.status & !S_FAILED)) {
            return Err(mismatch(format!("status {:#x}", state.status)));
        }
        let features = state.driver_features;
        if state.status & S_FEATURES_OK != 0 && !self.acceptable(features, state.unknown_features) {
            return Err(mismatch(format!("features {features:#x}")));
        }
        Ok(())
    }
}

/// The device runs: the driver set DRIVER_OK, activation worked, and nobody gave up since.
fn running(status: u32) -> bool {
    status & S_DRIVER_OK != 0 && status & (S_NEEDS_RESET | S_FAILED) == 0
}

fn mismatch(what: String) -> SnapshotError {
    SnapshotError::Mismatch { what }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            return lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
        }
        data.fill(0);
        let Some(reg) = self.register_offset(offset, data.len()) else {
            return;
        };
        match self.read_register(reg) {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()),
            None => self.unknown_register(reg),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
        }
        let Some(reg) = self.register_offset(offset, data.len()) else {
            return;
        };
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        if !self.write_register(reg, u32::from_le_bytes(bytes)) {
            self.unknown_register(reg);
        }
    }
}

/// The device's queues as the driver programmed them.
fn build_queues(
    configs: &[QueueConfig],
    mem: &GuestMemoryMmap,
    features: u64,
) -> Result<Vec<Queue>, MmioError> {
    let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let queues = configs.iter().enumerate();
    queues
        .map(|(index, q)| q.build(index, mem, event_idx))
        .collect()
}

fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | u64::from(value) << 32;
}

fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
