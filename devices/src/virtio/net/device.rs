//! The virtio-net device: TAP set-up, configuration space, feature negotiation (with the TAP
//! offloads that follow from it) and the event-loop glue that serves the queues when the driver
//! notifies them and the TAP when it is readable.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mac::random_mac;
use super::rx::{Receiver, RxNext};
use super::tx::Transmitter;
use super::{Tap, TapError, TapIo, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::common::{read_config_bytes, VirtioCommon};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

/// Length of `struct virtio_net_config` up to `status`.
const CONFIG_LEN: usize = 8;

/// How to back a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing TAP interface.
    pub tap: String,
    /// The guest's MAC address; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
}

/// Errors setting up a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP could not be opened (the message names it and says why).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// No MAC address was given and none could be generated.
    #[error("cannot generate a MAC address")]
    Mac(#[source] io::Error),
    /// The TAP refused to have its offloads reset.
    #[error("cannot set the TAP's offloads")]
    Offload(#[source] io::Error),
    /// A queue EventFd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
}

/// Frame counts since the device was created, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Frames read from the TAP and lost (too big for the guest's buffers, device reset).
    pub dropped_rx: u64,
    /// Frames the guest sent that were dropped (malformed chains, TAP refusals).
    pub dropped_tx: u64,
}

/// A virtio-net device on a TAP.
pub struct Net {
    tap: Box<dyn TapIo>,
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    rx: Receiver,
    tx: Transmitter,
    /// Queues indexed by [`RX_QUEUE`] and [`TX_QUEUE`].
    common: VirtioCommon<2>,
    /// The TAP is registered with epoll.
    watching: bool,
    warned: LogOnce,
}

impl Net {
    /// Opens the TAP and picks the MAC address.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&cfg.tap)?;
        Self::with_tap(Box::new(tap), cfg.mac)
    }

    /// A device on an already open TAP, or anything else that moves frames like one.
    pub fn with_tap(mut tap: Box<dyn TapIo>, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let mac = match mac {
            Some(mac) => mac,
            None => random_mac().map_err(NetError::Mac)?,
        };
        // Receive offloads are offered only if the TAP can hand such frames out; transmit
        // offloads need nothing beyond the virtio-net header.
        let guest_offloads = tap
            .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok();
        tap.set_offload(0).map_err(NetError::Offload)?;
        Ok(Self {
            tap,
            config_space: config_space(mac),
            avail_features: features(guest_offloads),
            rx: Receiver::new(),
            tx: Transmitter::new(),
            common: VirtioCommon::new("virtio-net", QUEUE_SIZE).map_err(NetError::EventFd)?,
            watching: false,
            warned: LogOnce::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config_space[..6]);
        mac
    }

    /// Frame counts so far.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            rx_frames: self.rx.frames(),
            tx_frames: self.tx.frames(),
            dropped_rx: self.rx.dropped(),
            dropped_tx: self.tx.dropped(),
        }
    }

    /// Sends what the guest transmitted.
    fn transmit(&mut self) {
        self.common
            .serve(Problem::TxQueue, "transmit queue: ", |mem, queues| {
                self.tx
                    .process_queue(mem, &mut queues[TX_QUEUE], self.tap.as_mut())
            });
    }

    /// Delivers frames while there are frames and buffers, then makes the TAP's epoll
    /// registration match what the receiver waits for.
    fn receive(&mut self, ops: &mut EventOps) {
        // Before activation there is nowhere to put frames; the driver's first receive
        // notification brings the watch back.
        let mut next = RxNext::WaitForBuffers;
        let mut notify = false;
        if let Some(active) = self.common.active() {
            let queue = &mut active.queues[RX_QUEUE];
            match self.rx.pump(&active.mem, queue, self.tap.as_mut()) {
                Ok(pumped) => (next, notify) = (pumped.next, pumped.notify),
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::RxQueue,
                        "virtio-net: receive queue: {}",
                        crate::error_chain(&e)
                    );
                    notify = true;
                }
            }
        }
        if notify {
            self.common.signal_used_queue();
        }
        self.watch(next == RxNext::Watch, ops);
    }

    /// Watches the TAP exactly when the receiver can take a frame, so the loop neither spins on
    /// frames it cannot deliver nor misses ones it can.
    fn watch(&mut self, watch: bool, ops: &mut EventOps) {
        if watch == self.watching {
            return;
        }
        let events = Events::new_raw(self.tap.as_raw_fd(), EventSet::IN);
        let res = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match res {
            Ok(()) => self.watching = watch,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Epoll,
                    "virtio-net: cannot update epoll interest in the TAP: {e:?}"
                );
            }
        }
    }

    fn set_offload(&mut self, flags: u32) {
        if let Err(e) = self.tap.set_offload(flags) {
            warn_once!(
                self.warned,
                Problem::Offload,
                "virtio-net: cannot set TAP offloads {flags:#x}: {e}"
            );
        }
    }
}

fn features(guest_offloads: bool) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ];
    if guest_offloads {
        bits.extend([
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ]);
    }
    bits.into_iter().fold(0, |acc, bit| acc | 1 << bit)
}

/// The TAP offloads for what the driver accepted: the TAP must hand out only frames the driver
/// can take (partial checksums need GUEST_CSUM, which segmentation offload builds on).
fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    flags
}

/// `struct virtio_net_config` (virtio 1.1, 5.1.4) up to `status`: the link is always up.
fn config_space(mac: [u8; 6]) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        let has = |bit: u32| features & (1 << bit) != 0;
        self.rx
            .set_features(has(VIRTIO_NET_F_MRG_RXBUF), has(VIRTIO_NET_F_GUEST_CSUM));
        self.set_offload(tap_offloads(features));
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.1, 5.1.4: the driver writes no field of a VERSION_1 device's config.
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
        self.common.activate(mem, queues, interrupt)?;
        // Receive buffers posted before DRIVER_OK came without a usable notification: look at
        // the ring once as if notified.
        self.common.kick(RX_QUEUE, "receive");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The TAP stays open; it is unwatched at its next event and watched again once the
        // driver posts receive buffers.
        self.common.reset();
        self.rx.reset();
        self.rx.set_features(false, false);
        self.set_offload(0);
        true
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.common.queue_event(fd) {
            Some(TX_QUEUE) => self.transmit(),
            Some(_) if !self.common.is_active() => self.common.idle(),
            Some(_) => self.receive(ops),
            None if fd == self.tap.as_raw_fd() => self.receive(ops),
            None => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // The TAP is watched only once the driver has posted receive buffers.
        self.common.watch_queue_events(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::*;
    use super::super::HDR_LEN;
    use super::*;
    use crate::virtio::block::test_utils::{mem, R, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::test_utils::{notify_queue, run_until_idle, CountingInterrupt};

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// Where the transmit queue's rings live; the receive queue's start at 0.
    const TX_RINGS: u64 = 0x1000;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn net() -> (Net, Peer, Arc<AtomicU32>) {
        let (tap, peer) = FakeTap::new();
        let offload = tap.offload.clone();
        (
            Net::with_tap(Box::new(tap), Some(MAC)).unwrap(),
            peer,
            offload,
        )
    }

    fn bit(b: u32) -> u64 {
        1 << b
    }

    #[test]
    fn identity_features_and_config() {
        let (mut net, _peer, offload) = net();
        assert_eq!(net.device_type(), VIRTIO_ID_NET);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(net.queue_events().len(), 2);
        let want = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ];
        assert_eq!(net.avail_features(), want.into_iter().map(bit).sum::<u64>());
        // The offload probe leaves the TAP with none.
        assert_eq!(offload.load(Ordering::SeqCst), 0);
        assert_eq!(net.mac(), MAC);
        let mut config = [0xffu8; 12];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0, 0, 0]);
        net.write_config(0, &[0; 6]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(status, [VIRTIO_NET_S_LINK_UP as u8, 0]);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn missing_mac_is_generated() {
        let (tap, _peer) = FakeTap::new();
        let mac = Net::with_tap(Box::new(tap), None).unwrap().mac();
        assert_eq!(mac[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn missing_tap_is_refused() {
        let cfg = NetConfig {
            tap: "rvmm-missing0".into(),
            mac: None,
        };
        let err = Net::new(cfg).err().unwrap();
        assert!(matches!(err, NetError::Tap(TapError::Missing(_))), "{err}");
    }

    #[test]
    fn negotiated_features_set_tap_offloads() {
        let (mut net, _peer, offload) = net();
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
        let cases = [
            (0, 0),
            (csum, TUN_F_CSUM),
            (csum | bit(VIRTIO_NET_F_GUEST_TSO4), TUN_F_CSUM | TUN_F_TSO4),
            (
                csum | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6),
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
            ),
            // Segmentation offload without checksum offload is not a thing.
            (bit(VIRTIO_NET_F_GUEST_TSO4), 0),
            // Transmit offloads need nothing from the TAP.
            (bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4), 0),
        ];
        for (features, want) in cases {
            net.set_acked_features(features | bit(VIRTIO_F_VERSION_1));
            assert_eq!(offload.load(Ordering::SeqCst), want, "{features:#x}");
        }
        net.set_acked_features(net.avail_features());
        assert!(net.reset());
        assert_eq!(offload.load(Ordering::SeqCst), 0);
    }

    /// A device on an event loop, activated with driver-side queues.
    struct Rig<'a> {
        net: Arc<Mutex<Net>>,
        peer: Peer,
        manager: Manager,
        irq: Arc<CountingInterrupt>,
        rx: Driver<'a>,
        tx: Driver<'a>,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, features: u64) -> Self {
            let (net, peer, _) = net();
            let net = Arc::new(Mutex::new(net));
            let mut manager = Manager::new().unwrap();
            manager.add_subscriber(net.clone());
            let irq = Arc::new(CountingInterrupt::default());
            let (rx, tx) = (Driver::new(mem, 0), Driver::new(mem, TX_RINGS));
            let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
            let mut dev = net.lock().unwrap();
            dev.set_acked_features(features | bit(VIRTIO_F_VERSION_1));
            dev.activate(mem.clone(), vec![rx.queue(), tx.queue()], interrupt)
                .unwrap();
            drop(dev);
            Self {
                net,
                peer,
                manager,
                irq,
                rx,
                tx,
            }
        }

        /// What the transport does on a QueueNotify write.
        fn notify(&self, queue: usize) {
            notify_queue(&self.net, queue)
        }

        /// Runs the loop until it has nothing to do; returns the events it handled.
        fn run(&mut self) -> usize {
            run_until_idle(&mut self.manager)
        }

        fn counters(&self) -> NetCounters {
            self.net.lock().unwrap().counters()
        }
    }

    fn delivered(p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        p[10] = 1;
        p
    }

    #[test]
    fn frames_flow_both_ways_through_the_event_loop() {
        let mem = mem();
        let mut rig = Rig::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
        // The activation kick finds no receive buffers: the TAP is not watched.
        assert_eq!(rig.run(), 1);
        let (p, q, r) = (packet(0, 60, 1), packet(0, 1000, 2), packet(0, 80, 3));
        rig.peer.send(&p);
        assert_eq!(
            rig.run(),
            0,
            "frames without buffers must not wake the loop"
        );

        rig.rx.post(&[(BUF, 2048, W)]);
        rig.rx.post(&[(BUF + 0x1000, 2048, W)]);
        rig.notify(RX_QUEUE);
        // p goes into the first buffer; the second is kept and the TAP watched.
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.rx.used(), vec![(0, 72)]);
        assert_eq!(guest(&mem, BUF, 72), delivered(&p));
        rig.peer.send(&q);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.rx.used(), vec![(0, 72), (1, HDR_LEN as u32 + 1000)]);
        assert_eq!(guest(&mem, BUF + 0x1000, 1012), delivered(&q));
        assert_eq!(rig.irq.count(), 2);
        // Out of buffers again: r waits in the TAP until the driver posts one.
        rig.peer.send(&r);
        assert_eq!(rig.run(), 0);
        rig.rx.post(&[(BUF + 0x2000, 2048, W)]);
        rig.notify(RX_QUEUE);
        assert_eq!(rig.run(), 1);
        assert_eq!(guest(&mem, BUF + 0x2000, 92), delivered(&r));

        let t = packet(0, 100, 4);
        mem.write_slice(&t, GuestAddress(BUF + 0x3000)).unwrap();
        rig.tx
            .post(&[(BUF + 0x3000, 12, R), (BUF + 0x300c, 100, R)]);
        rig.notify(TX_QUEUE);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.peer.recv().unwrap(), t);
        assert_eq!(rig.tx.used(), vec![(0, 0)]);
        assert_eq!(rig.irq.count(), 4);
        let want = NetCounters {
            rx_frames: 3,
            tx_frames: 1,
            dropped_rx: 0,
            dropped_tx: 0,
        };
        assert_eq!(rig.counters(), want);
    }

    #[test]
    fn reset_device_ignores_queues_and_tap() {
        let mem = mem();
        let mut rig = Rig::new(&mem, 0);
        rig.rx.post(&[(BUF, 2048, W)]);
        rig.rx.post(&[(BUF + 0x1000, 2048, W)]);
        rig.run();
        // The TAP is watched (a buffer is reserved); now the driver resets the device.
        assert!(rig.net.lock().unwrap().reset());
        rig.peer.send(&packet(0, 60, 0));
        rig.tx.post(&[(BUF, 76, R)]);
        rig.notify(TX_QUEUE);
        rig.notify(RX_QUEUE);
        // The TAP event unwatches it; the notifications are drained and ignored.
        assert_eq!(rig.run(), 3);
        assert_eq!(rig.run(), 0);
        assert!(rig.rx.used().is_empty() && rig.tx.used().is_empty());
        assert_eq!(rig.peer.recv(), None);
        assert_eq!(rig.irq.count(), 0);
    }
}
