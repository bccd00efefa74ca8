use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;

const QUEUE_MAX: u16 = 16;
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 0b101;
const MEM_SIZE: u64 = 0x10_0000;

/// A device that records what the transport does to it.
struct Dummy {
    evts: Vec<EventFd>,
    sizes: Vec<u16>,
    acked: u64,
    /// (size, ready, event_idx, desc) of each queue at each activation.
    activations: Vec<Vec<(u16, bool, bool, u64)>>,
    resets: usize,
    can_reset: bool,
    config: [u8; 8],
    /// (next_avail, next_used) of each queue: as activated, or as a test moves them.
    positions: Vec<(u16, u16)>,
    /// Refuses a snapshot as if it held requests.
    busy: bool,
    restored: usize,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config[offset as usize..][..data.len()].copy_from_slice(data);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let seen = queues
            .iter()
            .map(|q| (q.size(), q.ready(), q.event_idx_enabled(), q.desc_table()))
            .collect();
        self.activations.push(seen);
        self.positions = queues
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect();
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.can_reset
    }
    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        if self.busy {
            return Err(SnapshotError::Busy("dummy"));
        }
        Ok(self.positions.clone())
    }
    fn restored(&mut self) {
        self.restored += 1;
    }
}

fn dummy(queues: usize) -> Arc<Mutex<Dummy>> {
    Arc::new(Mutex::new(Dummy {
        evts: (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
        sizes: vec![QUEUE_MAX; queues],
        acked: 0,
        activations: Vec::new(),
        resets: 0,
        can_reset: true,
        config: *b"abcdefgh",
        positions: Vec::new(),
        busy: false,
        restored: 0,
    }))
}

fn transport(dev: &Arc<Mutex<Dummy>>) -> (MmioTransport, Arc<EventFdInterrupt>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let t = MmioTransport::new(mem, dev.clone(), irq.clone()).unwrap();
    (t, irq)
}

fn r(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(reg.into(), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(reg.into(), &v.to_le_bytes());
}

/// Drives the transport to CONFIGURING with `features` acked.
fn negotiate(t: &mut MmioTransport, features: u64) {
    w(t, VIRTIO_MMIO_STATUS, S_ACK);
    w(t, VIRTIO_MMIO_STATUS, NEGOTIATING);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w(t, VIRTIO_MMIO_STATUS, CONFIGURING);
}

fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
    w(t, VIRTIO_MMIO_QUEUE_SEL, sel);
    w(t, VIRTIO_MMIO_QUEUE_NUM, size);
    for (low, addr) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
        (VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000),
    ] {
        w(t, low, addr as u32);
        w(t, low + 4, (addr >> 32) as u32);
    }
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let dev = dummy(2);
    let (mut t, _irq) = transport(&dev);
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    for (sel, want) in [(0, FEATURES as u32), (1, (FEATURES >> 32) as u32), (2, 0)] {
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), want, "sel {sel}");
    }
    for (sel, max) in [(0, 16), (1, 16), (2, 0), (u32::MAX, 0)] {
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, sel);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), max, "queue {sel}");
    }
    assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    // Unknown and write-only registers read as zero.
    assert_eq!(r(&mut t, 0x0c0), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
}

#[test]
fn full_initialisation_activates_the_device() {
    let dev = dummy(2);
    let (mut t, _irq) = transport(&dev);
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
    negotiate(&mut t, features);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), CONFIGURING);
    assert_eq!(dev.lock().unwrap().acked, features);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), CONFIGURING | S_DRIVER_OK);
    assert_eq!(
        dev.lock().unwrap().activations,
        vec![vec![(8, true, true, 0x1_0000), (16, false, false, 0)]]
    );
    // Queue configuration is frozen once the device runs.
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
}

/// Each row: the status writes from reset, then the status expected to read back.
#[test]
fn status_state_machine() {
    let v1 = 1 << VIRTIO_F_VERSION_1;
    let table: &[(&str, u64, &[u32], u32)] = &[
        ("ack", v1, &[S_ACK], S_ACK),
        ("skip ack", v1, &[S_DRIVER], 0),
        ("skip driver", v1, &[S_ACK, S_ACK | S_FEATURES_OK], S_ACK),
        ("two bits at once", v1, &[S_ACK | S_DRIVER], 0),
        (
            "repeat is a no-op",
            v1,
            &[S_ACK, S_ACK, NEGOTIATING],
            NEGOTIATING,
        ),
        (
            "features ok",
            v1,
            &[S_ACK, NEGOTIATING, CONFIGURING],
            CONFIGURING,
        ),
        (
            "no VERSION_1",
            0b1,
            &[S_ACK, NEGOTIATING, CONFIGURING],
            NEGOTIATING,
        ),
        (
            "unoffered",
            v1 | 1 << 40,
            &[S_ACK, NEGOTIATING, CONFIGURING],
            NEGOTIATING,
        ),
        (
            "ok before features",
            v1,
            &[S_ACK, NEGOTIATING, NEGOTIATING | S_DRIVER_OK],
            NEGOTIATING,
        ),
        ("clear a bit", v1, &[S_ACK, NEGOTIATING, S_ACK], NEGOTIATING),
        (
            "driver gives up",
            v1,
            &[S_ACK, S_ACK | S_FAILED, NEGOTIATING],
            S_ACK | S_FAILED,
        ),
        (
            "device-owned bit",
            v1,
            &[S_ACK, S_ACK | S_NEEDS_RESET],
            S_ACK,
        ),
        ("reset", v1, &[S_ACK, NEGOTIATING, 0], 0),
        ("reset then again", v1, &[S_ACK, S_FAILED, 0, S_ACK], S_ACK),
    ];
    for &(name, features, writes, want) in table {
        let dev = dummy(1);
        let (mut t, _irq) = transport(&dev);
        for &status in writes {
            if status & S_FEATURES_OK != 0 && status & S_DRIVER_OK == 0 {
                // Features are written right before FEATURES_OK, as a driver does.
                w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
                w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
                w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
                w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
            }
            w(&mut t, VIRTIO_MMIO_STATUS, status);
        }
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), want, "{name}");
    }
}

#[test]
fn feature_words_above_one_are_refused() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    w(&mut t, VIRTIO_MMIO_STATUS, S_ACK);
    w(&mut t, VIRTIO_MMIO_STATUS, NEGOTIATING);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), NEGOTIATING);
}

#[test]
fn queue_registers_need_the_right_state_and_values() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    // Before FEATURES_OK nothing sticks.
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    for bad in [0, 3, 12, 32, 0x1_0004] {
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, bad);
    }
    // A queue that doesn't exist is ignored.
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    // The refused sizes left the default (max) in place.
    assert_eq!(dev.lock().unwrap().activations[0][0].0, QUEUE_MAX);
}

#[test]
fn unusable_queue_fails_activation_with_needs_reset() {
    for (desc, size) in [(MEM_SIZE - 0x10, 16), (0x1_0008, 16), (u64::MAX - 0xf, 16)] {
        let dev = dummy(1);
        let (mut t, irq) = transport(&dev);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, size, 0x1_0000);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
        let want = CONFIGURING | S_DRIVER_OK | S_NEEDS_RESET;
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), want, "desc {desc:#x}");
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        // Only a reset gets it out of there.
        w(&mut t, VIRTIO_MMIO_STATUS, want | S_ACK);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), want);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    }
}

#[test]
fn reset_clears_everything() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 4, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    t.interrupt.signal_used_queue().unwrap();
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    // Re-initialising without re-programming the queue hands over pristine state.
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    assert_eq!(
        dev.lock().unwrap().activations[1],
        vec![(QUEUE_MAX, false, false, 0)]
    );

    dev.lock().unwrap().can_reset = false;
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), S_FAILED);
}

#[test]
fn notify_signals_the_queue_event_once_running() {
    let dev = dummy(2);
    let (mut t, _irq) = transport(&dev);
    let pairs: Vec<(i32, u32)> = t
        .queue_notify_events()
        .iter()
        .map(|(evt, data)| (std::os::fd::AsRawFd::as_raw_fd(*evt), *data))
        .collect();
    assert_eq!(pairs.len(), 2);
    assert_eq!((pairs[0].1, pairs[1].1), (0, 1));

    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert!(dev.lock().unwrap().evts[1].read().is_err());
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 1, 4, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    let d = dev.lock().unwrap();
    assert_eq!(d.evts[1].read().unwrap(), 1);
    assert!(d.evts[0].read().is_err());
    // The transport's duplicate and the device's EventFd are one eventfd.
    t.queue_notify_events()[0].0.write(1).unwrap();
    assert_eq!(d.evts[0].read().unwrap(), 1);
}

#[test]
fn interrupt_status_and_ack() {
    let dev = dummy(1);
    let (mut t, irq) = transport(&dev);
    t.interrupt.signal_used_queue().unwrap();
    t.interrupt.signal_config_change().unwrap();
    assert_eq!(irq.eventfd().read().unwrap(), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
}

#[test]
fn config_space_is_forwarded() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    let mut b = [0u8; 2];
    t.read(CONFIG_OFFSET + 2, &mut b);
    assert_eq!(&b, b"cd");
    t.write(CONFIG_OFFSET + 6, b"XY");
    assert_eq!(&dev.lock().unwrap().config, b"abcdefXY");
    let mut b = [0u8; 8];
    t.read(CONFIG_OFFSET + 4, &mut b);
    assert_eq!(&b, b"efXY\0\0\0\0");
}

#[test]
fn odd_sized_or_unaligned_register_accesses_are_ignored() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(2, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(VIRTIO_MMIO_STATUS.into(), &[1]);
    t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
    t.write(VIRTIO_MMIO_STATUS.into(), &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn construction_validates_the_device() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let irq = Arc::new(EventFdInterrupt::new().unwrap());
    let dev = dummy(1);
    dev.lock().unwrap().sizes = vec![16, 16];
    let res = MmioTransport::new(mem.clone(), dev.clone(), irq.clone());
    assert!(matches!(res, Err(MmioError::QueueEventCount { .. })));
    dev.lock().unwrap().sizes = vec![24];
    let res = MmioTransport::new(mem, dev, irq);
    assert!(matches!(res, Err(MmioError::QueueMaxSize { .. })));
}

const EVENT_IDX_V1: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

/// A transport running queue 0 (8 entries at 0x1_0000, EVENT_IDX) of a two-queue device that
/// has moved along it, with a used-buffer interrupt pending and queue 1 selected.
fn moved_along(dev: &Arc<Mutex<Dummy>>) -> MmioTransport {
    let (mut t, irq) = transport(dev);
    negotiate(&mut t, EVENT_IDX_V1);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    dev.lock().unwrap().positions = vec![(5, 3), (0, 0)];
    t.interrupt.signal_used_queue().unwrap();
    irq.eventfd().read().unwrap();
    t
}

#[test]
fn a_running_transport_is_saved_and_restored_with_its_queues() {
    let dev = dummy(2);
    let state = moved_along(&dev).save().unwrap();
    assert_eq!(
        (state.device_type, state.status, state.driver_features),
        (42, CONFIGURING | S_DRIVER_OK, EVENT_IDX_V1)
    );
    assert_eq!((state.queue_sel, state.interrupt_status), (1, 1));
    let queue = QueueState {
        max_size: QUEUE_MAX,
        size: 8,
        ready: true,
        desc: 0x1_0000,
        avail: 0x1_1000,
        used: 0x1_2000,
        next_avail: 5,
        next_used: 3,
    };
    assert_eq!(state.queues[0], queue);
    assert!(!state.queues[1].ready);
    let json = serde_json::to_string(&state).unwrap();
    let state: MmioState = serde_json::from_str(&json).unwrap();

    let fresh = dummy(2);
    let (mut t, irq) = transport(&fresh);
    t.restore(&state).unwrap();
    {
        let d = fresh.lock().unwrap();
        assert_eq!(d.acked, EVENT_IDX_V1);
        let started = vec![(8, true, true, 0x1_0000), (QUEUE_MAX, false, false, 0)];
        assert_eq!(d.activations, [started]);
        assert_eq!(d.positions, [(5, 3), (0, 0)]);
        assert_eq!(d.restored, 1);
        // Each queue is kicked once, for notifications the old device had not served.
        assert!(d.evts.iter().all(|e| e.read().unwrap() == 1));
    }
    // The pending interrupt is the guest's saved state, not a new edge.
    assert!(irq.eventfd().read().is_err());
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), CONFIGURING | S_DRIVER_OK);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0, "queue 1 selected");
    assert_eq!(t.save().unwrap(), state);
    // The driver goes on as it would have with the old transport.
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(fresh.lock().unwrap().evts[0].read().unwrap(), 1);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(fresh.lock().unwrap().resets, 1);
}

#[test]
fn a_transport_not_running_yet_is_restored_without_starting_the_device() {
    let dev = dummy(1);
    let (mut t, _irq) = transport(&dev);
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 4, 0x1_0000);
    // Not running: the device is not asked where it stands.
    dev.lock().unwrap().busy = true;
    let state = t.save().unwrap();
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (0, 0)
    );

    let fresh = dummy(1);
    let (mut t, _irq) = transport(&fresh);
    t.restore(&state).unwrap();
    {
        let d = fresh.lock().unwrap();
        assert_eq!(d.acked, 1 << VIRTIO_F_VERSION_1);
        assert!(d.activations.is_empty());
        assert_eq!(d.restored, 0);
        assert!(d.evts[0].read().is_err());
    }
    w(&mut t, VIRTIO_MMIO_STATUS, CONFIGURING | S_DRIVER_OK);
    let started = vec![(4, true, false, 0x1_0000)];
    assert_eq!(fresh.lock().unwrap().activations, [started]);
}

#[test]
fn a_busy_device_is_not_saved() {
    let dev = dummy(2);
    let t = moved_along(&dev);
    dev.lock().unwrap().busy = true;
    let err = t.save().unwrap_err();
    assert_eq!(err.to_string(), "dummy has requests in flight");
}

#[test]
fn restore_refuses_states_this_device_cannot_be_in() {
    let dev = dummy(2);
    let good = moved_along(&dev).save().unwrap();
    type Spoil = fn(&mut MmioState);
    let cases: [(&str, Spoil); 8] = [
        ("device type 7 (this device is 42)", |s| s.device_type = 7),
        ("1 queues (this device has 2)", |s| s.queues.truncate(1)),
        ("queue 1 holds at most 32 entries (here 16)", |s| {
            s.queues[1].max_size = 32
        }),
        ("queue 1 has size 12", |s| s.queues[1].size = 12),
        ("status 0x5", |s| s.status = S_ACK | S_DRIVER_OK),
        ("features 0x10120000000", |s| s.driver_features |= 1 << 40),
        ("features 0x20000000", |s| s.driver_features = 1 << 29),
        ("features 0x120000000", |s| s.unknown_features = true),
    ];
    for (what, spoil) in cases {
        let mut state = good.clone();
        spoil(&mut state);
        let fresh = dummy(2);
        let (mut t, _irq) = transport(&fresh);
        let err = t.restore(&state).unwrap_err();
        let want = format!("the snapshot does not match this device: {what}");
        assert_eq!(err.to_string(), want);
        assert!(fresh.lock().unwrap().activations.is_empty(), "{what}");
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0, "{what}");
    }
    // Rings outside guest memory or misaligned: the device never starts.
    for desc in [MEM_SIZE - 0x10, 0x1_0008, u64::MAX - 0xf] {
        let mut state = good.clone();
        state.queues[0].desc = desc;
        let fresh = dummy(2);
        let (mut t, _irq) = transport(&fresh);
        let err = t.restore(&state).unwrap_err();
        assert!(matches!(err, SnapshotError::Queue(_)), "{desc:#x}: {err}");
        assert!(fresh.lock().unwrap().activations.is_empty());
    }
}
