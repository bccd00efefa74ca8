//! Unit tests of the virtio-net device.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
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
struct Rig<'a, P = Peer> {
    net: Arc<Mutex<Net>>,
    peer: P,
    manager: Manager,
    irq: Arc<CountingInterrupt>,
    rx: Driver<'a>,
    tx: Driver<'a>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, features: u64) -> Self {
        let (net, peer, _) = net();
        Rig::on(mem, features, net, peer)
    }
}

impl<'a, P> Rig<'a, P> {
    /// `net`, whose host side's other end is `peer`, activated with `features`.
    fn on(mem: &'a GuestMemoryMmap, features: u64, net: Net, peer: P) -> Self {
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
        rx_copied: 3,
        tx_copied: 0,
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

/// A device on a stream whose other end (the test's) stands for passt.
fn stream_net() -> (Net, UnixStream, Arc<DeviceFailure>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let failure = Arc::new(DeviceFailure::new().unwrap());
    let stream = Stream::new(ours, "passt").unwrap();
    let net = Net::with_stream(stream, Some(MAC), failure.clone()).unwrap();
    (net, theirs, failure)
}

/// A frame of `len` bytes as it travels on the stream: its length first.
fn wire(len: usize, seed: usize) -> Vec<u8> {
    let mut w = (len as u32).to_be_bytes().to_vec();
    w.extend_from_slice(&packet(0, len, seed)[HDR_LEN..]);
    w
}

#[test]
fn a_stream_gets_no_offloads() {
    let (net, _peer, _failure) = stream_net();
    let want = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ];
    assert_eq!(net.avail_features(), want.into_iter().map(bit).sum::<u64>());
}

#[test]
fn a_peer_that_hangs_up_stops_the_vm_even_while_idle() {
    let (net, peer, failure) = stream_net();
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(net)));
    assert_eq!(run_until_idle(&mut manager), 0);
    assert_eq!(failure.reason(), None);
    drop(peer);
    assert_eq!(run_until_idle(&mut manager), 1);
    assert_eq!(
        failure.reason().as_deref(),
        Some("virtio-net: passt hung up")
    );
    assert_eq!(failure.event().read().unwrap(), 1);
    // Reported once; the fd is no longer watched.
    assert_eq!(run_until_idle(&mut manager), 0);
}

#[test]
fn a_broken_stream_stops_the_vm() {
    let mem = mem();
    let (net, mut peer, failure) = stream_net();
    let mut rig = Rig::on(&mem, 0, net, ());
    rig.rx.post(&[(BUF, 2048, W)]);
    rig.notify(RX_QUEUE);
    rig.run();
    peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
    rig.run();
    let why = failure.reason().unwrap();
    assert!(
        why.starts_with("virtio-net: passt sent a frame of 4294967295 bytes"),
        "{why}"
    );
    assert!(rig.rx.used().is_empty());
}

#[test]
fn frames_flow_through_a_stream_and_wait_for_room() {
    let mem = mem();
    let (net, mut peer, failure) = stream_net();
    // The smallest send buffer: the first big frame fills it.
    let size: libc::c_int = 1;
    let fd = net.tap.as_raw_fd();
    // SAFETY: SO_SNDBUF reads one int from the pointer, valid for the call.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0);
    let mut rig = Rig::on(&mem, bit(VIRTIO_NET_F_MRG_RXBUF), net, ());

    // Receive: a frame in two pieces lands behind a zeroed header.
    rig.rx.post(&[(BUF, 2048, W)]);
    rig.notify(RX_QUEUE);
    rig.run();
    let w = wire(100, 1);
    peer.write_all(&w[..30]).unwrap();
    rig.run();
    assert!(rig.rx.used().is_empty());
    peer.write_all(&w[30..]).unwrap();
    rig.run();
    assert_eq!(rig.rx.used(), vec![(0, HDR_LEN as u32 + 100)]);
    assert_eq!(guest(&mem, BUF, 112), delivered(&packet(0, 100, 1)));

    // Transmit three 16 KiB frames while the peer reads nothing: the socket takes the
    // first (part of it), the others stay on the ring, and the loop does not spin.
    let frames: Vec<Vec<u8>> = (0..3).map(|i| packet(0, 16384, i)).collect();
    for (i, p) in frames.iter().enumerate() {
        let at = BUF + 0x10000 + 0x5000 * i as u64;
        mem.write_slice(p, GuestAddress(at)).unwrap();
        rig.tx.post(&[(at, p.len() as u32, R)]);
    }
    rig.notify(TX_QUEUE);
    for _ in 0..5 {
        assert!(rig.manager.run_with_timeout(20).unwrap() <= 1);
    }
    assert_eq!(rig.tx.used(), vec![(0, 0)]);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0; 3 * (4 + 16384)];
        // The peer stays open: its hang-up would stop the VM.
        peer.read_exact(&mut got).map(|()| (got, peer))
    });
    let start = std::time::Instant::now();
    while rig.tx.used().len() < 3 && start.elapsed().as_secs() < 10 {
        rig.manager.run_with_timeout(20).unwrap();
    }
    assert_eq!(rig.tx.used(), vec![(0, 0), (1, 0), (2, 0)]);
    // The rest of the last frame goes out once the socket has room.
    let (got, _peer) = loop {
        rig.manager.run_with_timeout(20).unwrap();
        if reader.is_finished() {
            break reader.join().unwrap().unwrap();
        }
    };
    for (i, p) in frames.iter().enumerate() {
        let at = i * (4 + 16384);
        assert_eq!(got[at..at + 4], 16384u32.to_be_bytes());
        assert_eq!(got[at + 4..at + 4 + 16384], p[HDR_LEN..], "frame {i}");
    }
    assert_eq!(rig.counters().tx_frames, 3);
    assert_eq!(rig.counters().dropped_tx, 0);
    // Nothing waits any more: the loop goes idle.
    assert_eq!(rig.run(), 0);
    assert_eq!(failure.reason(), None);
}
