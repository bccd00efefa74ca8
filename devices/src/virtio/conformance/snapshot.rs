//! Snapshots of every device that supports them, through its transport: a device that served
//! requests is saved, its state goes through JSON, a fresh device on the same guest memory is
//! restored from it, and the guest's next request is served where the old device left off.

use std::any::Any;
use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::interrupt::EventFdInterrupt;
use crate::snapshot::SnapshotError;
use crate::virtio::balloon::STATS;
use crate::virtio::mmio::{MmioState, MmioTransport};
use crate::virtio::net::test_utils::Peer;
use crate::virtio::net::RX_QUEUE;

const RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

/// A device behind its transport, on an event loop.
struct Machine {
    transport: MmioTransport,
    manager: Manager,
    irq: Arc<EventFdInterrupt>,
    /// What the device needs alive (image, socket directory, TAP peer).
    keep: Box<dyn Any>,
}

impl Machine {
    fn new<D: Subject>(mem: &GuestMemoryMmap, (device, keep): (D, Box<dyn Any>)) -> Self {
        let device = Arc::new(Mutex::new(device));
        let mut manager = Manager::new().unwrap();
        manager.add_subscriber(device.clone());
        let irq = Arc::new(EventFdInterrupt::new().unwrap());
        let transport = MmioTransport::new(mem.clone(), device, irq.clone()).unwrap();
        Self {
            transport,
            manager,
            irq,
            keep,
        }
    }

    fn w(&mut self, reg: u32, value: u32) {
        self.transport.write(reg.into(), &value.to_le_bytes());
    }

    fn r(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// Plays the driver up to DRIVER_OK, accepting every feature offered, with `drivers`'
    /// queues.
    fn start(&mut self, drivers: &[Driver]) {
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(
            VIRTIO_MMIO_STATUS,
            RUNNING & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK),
        );
        for sel in 0..2 {
            self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let features = self.r(VIRTIO_MMIO_DEVICE_FEATURES);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, features);
        }
        self.w(VIRTIO_MMIO_STATUS, RUNNING & !VIRTIO_CONFIG_S_DRIVER_OK);
        for (index, driver) in (0..).zip(drivers) {
            let q = driver.queue();
            self.w(VIRTIO_MMIO_QUEUE_SEL, index);
            self.w(VIRTIO_MMIO_QUEUE_NUM, q.size().into());
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table()),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_ring()),
                (VIRTIO_MMIO_QUEUE_USED_LOW, q.used_ring()),
            ] {
                self.w(low, addr as u32);
                self.w(low + 4, (addr >> 32) as u32);
            }
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.w(VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), RUNNING);
    }

    /// The driver notifies `queue`; the device thread runs until it has nothing to do.
    fn notify(&mut self, queue: usize) {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32);
        self.run();
    }

    fn run(&mut self) {
        run_until_idle(&mut self.manager);
    }

    /// Saves the transport, through JSON.
    fn save(&self) -> MmioState {
        let state = self.transport.save().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: MmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        back
    }
}

fn round_trip<D: Subject>() {
    let mem = mem();
    let made = D::make();
    let mut drivers = drivers(&mem, &made.0);
    let mut old = Machine::new(&mem, made);
    old.start(&drivers);
    let (queue, descs, len) = D::request(&mem, BUF);
    for _ in 0..2 {
        drivers[queue].post(&descs);
        old.notify(queue);
    }
    let served = drivers[queue].used();
    assert_eq!(served.len(), 2);
    let state = old.save();
    drop(old);

    let mut new = Machine::new(&mem, D::make());
    new.transport.restore(&state).unwrap();
    assert_eq!(new.r(VIRTIO_MMIO_STATUS), RUNNING);
    assert_eq!(new.transport.save().unwrap(), state);
    // Restoring raises no interrupt: one still pending is in the guest's own saved state.
    assert!(new.irq.eventfd().read().is_err());
    new.run();
    assert_eq!(drivers[queue].used(), served, "nothing served twice");
    drivers[queue].post(&descs);
    new.notify(queue);
    let used = drivers[queue].used();
    assert_eq!(used[..2], served);
    let head = 2 * descs.len() as u32;
    assert_eq!(used[2..], [(head, len)]);
}

/// The round trip, for each (module name, device type).
macro_rules! round_trip {
    ($($module:ident: $device:ty),+ $(,)?) => {$(
        mod $module {
            #[test]
            fn goes_on_after_a_restore() {
                super::round_trip::<$device>();
            }
        }
    )+};
}

round_trip! {
    balloon: super::Balloon,
    block: super::Block,
    console: super::Console,
    net: super::Net,
    rng: super::Rng,
    vsock: super::Vsock,
}

#[test]
fn net_receive_buffers_held_at_a_save_are_taken_again() {
    let mem = mem();
    let made = Net::make();
    let mut drivers = drivers(&mem, &made.0);
    let mut old = Machine::new(&mem, made);
    old.start(&drivers);
    // The device holds the buffer while no frame comes.
    drivers[RX_QUEUE].post(&[(BUF, 2048, W)]);
    old.notify(RX_QUEUE);
    let state = old.save();
    assert_eq!(state.queues[RX_QUEUE].next_avail, 0);
    drop(old);

    let mut new = Machine::new(&mem, Net::make());
    new.transport.restore(&state).unwrap();
    new.run();
    assert_eq!(new.save().queues[RX_QUEUE].next_avail, 0, "held again");
    let frame = packet(0, 60, 7);
    new.keep.downcast_ref::<Peer>().unwrap().send(&frame);
    new.run();
    assert_eq!(drivers[RX_QUEUE].used(), [(0, frame.len() as u32)]);
}

#[test]
fn the_balloon_statistics_buffer_held_at_a_save_is_taken_again() {
    let mem = mem();
    let balloon = |out: &TempFile| {
        let out = out.as_file().try_clone().unwrap();
        let keep: Box<dyn Any> = Box::new(());
        (Balloon::new(Some(out)).unwrap(), keep)
    };
    let old_stats = TempFile::new().unwrap();
    let made = balloon(&old_stats);
    let mut drivers = drivers(&mem, &made.0);
    let mut old = Machine::new(&mem, made);
    old.start(&drivers);
    // One entry: free_memory (tag 4), 1 MiB.
    let mut entry = 4u16.to_le_bytes().to_vec();
    entry.extend((1u64 << 20).to_le_bytes());
    put(&mem, BUF, &entry);
    drivers[STATS].post(&[(BUF, 10, R)]);
    old.notify(STATS);
    assert!(drivers[STATS].used().is_empty(), "kept by the device");
    let state = old.save();
    assert_eq!(state.queues[STATS].next_avail, 0);
    drop(old);

    let new_stats = TempFile::new().unwrap();
    let mut new = Machine::new(&mem, balloon(&new_stats));
    new.transport.restore(&state).unwrap();
    new.run();
    let record = std::fs::read_to_string(new_stats.as_path()).unwrap();
    assert!(record.starts_with("{\"free_memory\":1048576}"), "{record}");
    assert!(drivers[STATS].used().is_empty(), "kept by the new device");
    assert_eq!(new.save().queues[STATS].next_avail, 0);
}

#[test]
fn a_running_state_with_an_unready_queue_does_not_start_the_device() {
    let mem = mem();
    let made = Rng::make();
    let drivers = drivers(&mem, &made.0);
    let mut old = Machine::new(&mem, made);
    old.start(&drivers);
    let mut state = old.save();
    state.queues[0].ready = false;
    let mut new = Machine::new(&mem, Rng::make());
    let err = new.transport.restore(&state).unwrap_err();
    let refused = matches!(
        err,
        SnapshotError::Activate(ActivateError::QueueNotReady(0))
    );
    assert!(refused, "{err}");
}

#[test]
fn a_disk_restored_at_another_size_announces_a_configuration_change() {
    let mem = mem();
    let made = Block::make();
    let drivers = drivers(&mem, &made.0);
    let mut old = Machine::new(&mem, made);
    old.start(&drivers);
    let state = old.save();
    drop(old);

    let generation = state.config_generation;
    let mut same = Machine::new(&mem, Block::make());
    same.transport.restore(&state).unwrap();
    assert!(
        same.irq.eventfd().read().is_err(),
        "same size: no interrupt"
    );
    assert_eq!(same.r(VIRTIO_MMIO_CONFIG_GENERATION), generation);

    let (bigger, keep) = Block::make();
    let image = keep.downcast_ref::<TempFile>().unwrap();
    image.as_file().set_len(8 << 20).unwrap();
    drop(bigger);
    let bigger = Block::new(BlockConfig {
        path: image.as_path().to_path_buf(),
        read_only: false,
        serial: None,
        direct: false,
    })
    .unwrap();
    let mut new = Machine::new(&mem, (bigger, keep));
    new.transport.restore(&state).unwrap();
    assert_eq!(new.irq.eventfd().read().unwrap(), 1);
    assert_eq!(new.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(new.r(VIRTIO_MMIO_CONFIG_GENERATION), generation + 1);
    let mut capacity = [0u8; 8];
    new.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), (8 << 20) / 512);
}
