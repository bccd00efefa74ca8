//! One contract test, run over every device: what the transport may rely on whatever the
//! device. Activation takes the driver's queues, once, only if there are as many as the device
//! has and all are ready; a reset allows activating again; notifications while the device is
//! not running are drained and ignored; configuration space past its end reads as zero and
//! ignores writes. `snapshot` checks, over the same devices, that a saved device restored
//! onto a fresh one goes on serving the guest.

use std::any::Any;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::balloon::{Balloon, DEFLATE};
use super::block::test_utils::{image, mem, Descs, R, W};
use super::block::{Block, BlockConfig};
use super::console::test_utils::{SharedBuf, BUF};
use super::console::Console;
use super::net::test_utils::{packet, Driver, FakeTap};
use super::net::Net;
use super::rng::Rng;
use super::test_utils::{notify_queue, run_until_idle, CountingInterrupt};
use super::vsock::packet::{Header, Op, HOST_CID};
use super::vsock::{Vsock, VsockConfig};
use super::{ActivateError, VirtioDevice, VirtioInterrupt};

mod snapshot;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A device the contract is checked on.
trait Subject: VirtioDevice + MutEventSubscriber + Sized + 'static {
    /// Length of its configuration space.
    const CONFIG_LEN: usize;
    /// A fresh device, and what must live as long as it (its image, socket directory or TAP
    /// peer).
    fn make() -> (Self, Box<dyn Any>);
    /// A request the device answers at once, written at `buf`: its queue, its chain, and the
    /// used length of its answer.
    fn request(mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32);
}

fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

impl Subject for Balloon {
    const CONFIG_LEN: usize = 8;
    fn make() -> (Self, Box<dyn Any>) {
        (Balloon::new(None).unwrap(), Box::new(()))
    }
    fn request(_mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        (DEFLATE, vec![(buf, 4, R)], 0)
    }
}

impl Subject for Block {
    const CONFIG_LEN: usize = 60;
    fn make() -> (Self, Box<dyn Any>) {
        let image = image(1);
        let cfg = BlockConfig {
            path: image.as_path().to_path_buf(),
            read_only: false,
            serial: None,
            direct: false,
        };
        (Block::new(cfg).unwrap(), Box::new(image))
    }
    fn request(mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        // struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
        let mut header = VIRTIO_BLK_T_GET_ID.to_le_bytes().to_vec();
        header.resize(16, 0);
        put(mem, buf, &header);
        let descs = vec![(buf, 16, R), (buf + 0x100, 20, W), (buf + 0x200, 1, W)];
        (0, descs, 21)
    }
}

impl Subject for Console {
    const CONFIG_LEN: usize = 0;
    fn make() -> (Self, Box<dyn Any>) {
        let out = SharedBuf::default();
        (
            Console::new(Box::new(out.clone()), None).unwrap(),
            Box::new(out),
        )
    }
    fn request(mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        put(mem, buf, b"hello");
        (super::console::TX_QUEUE, vec![(buf, 5, R)], 0)
    }
}

impl Subject for Net {
    const CONFIG_LEN: usize = 8;
    fn make() -> (Self, Box<dyn Any>) {
        let (tap, peer) = FakeTap::new();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        (
            Net::with_tap(Box::new(tap), Some(mac)).unwrap(),
            Box::new(peer),
        )
    }
    fn request(mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        let frame = packet(0, 60, 0);
        put(mem, buf, &frame);
        (super::net::TX_QUEUE, vec![(buf, frame.len() as u32, R)], 0)
    }
}

impl Subject for Rng {
    const CONFIG_LEN: usize = 0;
    fn make() -> (Self, Box<dyn Any>) {
        (Rng::new().unwrap(), Box::new(()))
    }
    fn request(_mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        (0, vec![(buf, 64, W)], 64)
    }
}

impl Subject for Vsock {
    const CONFIG_LEN: usize = 8;
    fn make() -> (Self, Box<dyn Any>) {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/rvmm-conf-").unwrap();
        let cfg = VsockConfig {
            cid: 3,
            uds_path: dir.as_path().join("v.sock"),
        };
        (Vsock::new(cfg).unwrap(), Box::new(dir))
    }
    fn request(mem: &GuestMemoryMmap, buf: u64) -> (usize, Descs, u32) {
        // A reset of a connection the device does not know: dropped without an answer.
        let rst = Header::new(Op::Rst, (3, 1000), (HOST_CID, 80));
        put(mem, buf, &rst.to_bytes());
        let descs = vec![(buf, rst.to_bytes().len() as u32, R)];
        (super::vsock::TX_QUEUE, descs, 0)
    }
}

/// The driver's side of each of the device's queues, 0x1000 apart.
fn drivers<'a>(mem: &'a GuestMemoryMmap, device: &impl VirtioDevice) -> Vec<Driver<'a>> {
    (0..device.queue_max_sizes().len())
        .map(|i| Driver::new(mem, 0x1000 * i as u64))
        .collect()
}

fn interrupt() -> (Arc<VirtioInterrupt>, Arc<CountingInterrupt>) {
    let line = Arc::new(CountingInterrupt::default());
    (Arc::new(VirtioInterrupt::new(line.clone())), line)
}

/// Every queue has an eventfd and a size the transport accepts.
fn queues_match_their_events<D: Subject>() {
    let (device, _keep) = D::make();
    let sizes = device.queue_max_sizes();
    assert!(!sizes.is_empty());
    assert_eq!(sizes.len(), device.queue_events().len());
    assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 32768));
}

fn activation_checks_queue_count_and_readiness<D: Subject>() {
    let (mut device, _keep) = D::make();
    let mem = mem();
    let drivers = drivers(&mem, &device);
    let n = drivers.len();
    let queues = |count: usize| {
        (0..count)
            .map(|i| drivers[i % n].queue())
            .collect::<Vec<_>>()
    };
    let (irq, _) = interrupt();
    for count in [0, n - 1, n + 1] {
        let err = device
            .activate(mem.clone(), queues(count), irq.clone())
            .unwrap_err();
        assert!(
            matches!(err, ActivateError::QueueCount { expected, got } if expected == n && got == count),
            "{err}"
        );
    }
    let mut unready = queues(n);
    unready[n - 1].set_ready(false);
    let err = device
        .activate(mem.clone(), unready, irq.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(i) if i == n - 1));
    // Refused activations leave the device ready for a good one.
    device.activate(mem.clone(), queues(n), irq).unwrap();
}

fn activating_twice_fails<D: Subject>() {
    let (mut device, _keep) = D::make();
    let mem = mem();
    let drivers = drivers(&mem, &device);
    let queues = || drivers.iter().map(Driver::queue).collect::<Vec<_>>();
    let (irq, _) = interrupt();
    device.activate(mem.clone(), queues(), irq.clone()).unwrap();
    let err = device.activate(mem.clone(), queues(), irq).unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActive));
}

fn reset_allows_activating_again<D: Subject>() {
    let (mut device, _keep) = D::make();
    let mem = mem();
    let drivers = drivers(&mem, &device);
    let queues = || drivers.iter().map(Driver::queue).collect::<Vec<_>>();
    let (irq, _) = interrupt();
    // Resetting a device that never ran is fine too.
    assert!(device.reset());
    for _ in 0..2 {
        device.activate(mem.clone(), queues(), irq.clone()).unwrap();
        assert!(device.reset());
    }
    device.activate(mem.clone(), queues(), irq).unwrap();
}

/// The driver notifies queues of a device whose activation failed on a queue that is not
/// ready: the notifications are drained, nothing is used and no interrupt is raised.
fn notifications_on_unready_queues_are_ignored<D: Subject>() {
    let (device, _keep) = D::make();
    let mem = mem();
    let mut drivers = drivers(&mem, &device);
    let device = Arc::new(Mutex::new(device));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(device.clone());
    let (irq, line) = interrupt();
    let mut queues: Vec<_> = drivers.iter().map(Driver::queue).collect();
    queues[0].set_ready(false);
    let err = device
        .lock()
        .unwrap()
        .activate(mem.clone(), queues, irq)
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    for (i, driver) in drivers.iter_mut().enumerate() {
        let buf = BUF + 0x1000 * i as u64;
        driver.post(&[(buf, 16, R), (buf + 16, 64, W)]);
        notify_queue(&device, i);
    }
    assert!(run_until_idle(&mut manager) >= drivers.len());
    assert!(drivers.iter().all(|d| d.used().is_empty()));
    assert_eq!(line.count(), 0);
    let dev = device.lock().unwrap();
    assert!(dev.queue_events().iter().all(|e| e.read().is_err()));
}

fn config_past_the_end_reads_zero<D: Subject>() {
    let (mut device, _keep) = D::make();
    let end = D::CONFIG_LEN;
    let read = |device: &D, offset: u64, len: usize| {
        let mut data = vec![0xff; len];
        device.read_config(offset, &mut data);
        data
    };
    let before = read(&device, 0, end + 8);
    assert_eq!(before[end..], [0; 8]);
    for offset in [end as u64, end as u64 + 3, 0xeff, u64::MAX - 3, u64::MAX] {
        assert_eq!(read(&device, offset, 4), [0; 4], "at {offset:#x}");
        device.write_config(offset, &[0xa5; 4]);
    }
    assert_eq!(read(&device, 0, end + 8), before);
}

/// The contract's tests, for each (module name, device type).
macro_rules! conformance {
    ($($module:ident: $device:ty),+ $(,)?) => {$(
        mod $module {
            #[test]
            fn queues_match_their_events() {
                super::queues_match_their_events::<$device>();
            }

            #[test]
            fn activation_checks_queue_count_and_readiness() {
                super::activation_checks_queue_count_and_readiness::<$device>();
            }

            #[test]
            fn activating_twice_fails() {
                super::activating_twice_fails::<$device>();
            }

            #[test]
            fn reset_allows_activating_again() {
                super::reset_allows_activating_again::<$device>();
            }

            #[test]
            fn notifications_on_unready_queues_are_ignored() {
                super::notifications_on_unready_queues_are_ignored::<$device>();
            }

            #[test]
            fn config_past_the_end_reads_zero() {
                super::config_past_the_end_reads_zero::<$device>();
            }
        }
    )+};
}

conformance! {
    balloon: super::Balloon,
    block: super::Block,
    console: super::Console,
    net: super::Net,
    rng: super::Rng,
    vsock: super::Vsock,
}
