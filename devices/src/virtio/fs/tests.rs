//! The device against a hand-rolled vhost-user backend on a socketpair: what it negotiates, the
//! memory table and vrings it sends, the interrupt relay, reset and the backend's hang-up.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, SubscriberOps};
use vhost::vhost_user::Frontend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::failure::DeviceFailure;
use crate::virtio::test_utils::{run_until_idle, CountingInterrupt};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_BIT: u64 = 1 << 30;
/// MQ | REPLY_ACK; rvmm takes only MQ.
const OFFERED_PROTOCOL: u64 = 1 | 1 << 3;
/// VERSION_1, EVENT_IDX and a packed-ring bit rvmm must not pass on.
const OFFERED: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << 29 | 1 << 34 | PROTOCOL_BIT;
const MEM_SIZE: usize = 1 << 20;

/// One request as the backend saw it.
struct Message {
    code: u32,
    body: Vec<u8>,
    fd: Option<File>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The reply a real backend sends, if the request has one.
fn reply(code: u32, body: &[u8], features: u64) -> Option<Vec<u8>> {
    match code {
        GET_FEATURES => Some(features.to_le_bytes().to_vec()),
        GET_PROTOCOL_FEATURES => Some(OFFERED_PROTOCOL.to_le_bytes().to_vec()),
        GET_QUEUE_NUM => Some(2u64.to_le_bytes().to_vec()),
        GET_VRING_BASE => Some([&body[..4], &[0; 4]].concat()),
        _ => None,
    }
}

/// Serves requests until `hang_up_after` GET_VRING_BASEs or the frontend closes; on queue 1 it
/// signals the call fd (buffers used) and the kick fd (to show which fd it was given).
fn fake_backend(sock: UnixStream, features: u64, hang_up_after: usize) -> JoinHandle<Vec<Message>> {
    std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut stops = 0;
        while stops < hang_up_after {
            let mut hdr = [0u8; 12];
            let Ok((12, fd)) = sock.recv_with_fd(&mut hdr) else {
                break;
            };
            let code = u32_at(&hdr, 0);
            let mut body = vec![0; u32_at(&hdr, 8) as usize];
            (&sock).read_exact(&mut body).unwrap();
            if let Some(r) = reply(code, &body, features) {
                let mut out = [code, 0x1 | 0x4, r.len() as u32]
                    .map(u32::to_le_bytes)
                    .concat();
                out.extend(r);
                (&sock).write_all(&out).unwrap();
            }
            if matches!(code, SET_VRING_CALL | SET_VRING_KICK) && body[0] == 1 {
                fd.as_ref().unwrap().write_all(&1u64.to_le_bytes()).unwrap();
            }
            stops += usize::from(code == GET_VRING_BASE);
            log.push(Message { code, body, fd });
        }
        log
    })
}

/// Guest RAM on a memfd, as the VMM maps it for vhost-user devices.
fn shared_mem() -> GuestMemoryMmap {
    // SAFETY: a NUL-terminated name; the call returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nothing else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let region = (GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)));
    GuestMemoryMmap::from_ranges_with_files([region]).unwrap()
}

fn queues(mem: &GuestMemoryMmap) -> (Vec<Queue>, u64) {
    let hiprio = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
    let request = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
    let desc = request.desc_table_addr().0;
    let qs = vec![
        hiprio.create_queue().unwrap(),
        request.create_queue().unwrap(),
    ];
    (qs, desc)
}

fn device(
    features: u64,
    hang_up_after: usize,
) -> (Fs, Arc<DeviceFailure>, JoinHandle<Vec<Message>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let backend = fake_backend(theirs, features, hang_up_after);
    let failure = Arc::new(DeviceFailure::new().unwrap());
    let frontend = Frontend::from_stream(ours, NUM_QUEUES as u64);
    let fs = Fs::with_frontend("share", frontend, failure.clone()).unwrap();
    (fs, failure, backend)
}

#[test]
fn negotiates_starts_relays_resets_and_reports_the_hang_up() {
    let (fs, failure, backend) = device(OFFERED, 2);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.avail_features(), 1 << VIRTIO_F_VERSION_1 | 1 << 29);
    let mut config = [0xff; CONFIG_LEN];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..6], b"share\0");
    assert!(config[6..MAX_TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(config[MAX_TAG_LEN..], 1u32.to_le_bytes());

    let fs = Arc::new(Mutex::new(fs));
    let mut manager = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
    manager.add_subscriber(fs.clone());
    let line = Arc::new(CountingInterrupt::default());
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    let mem = shared_mem();
    let (qs, desc) = queues(&mem);
    fs.lock()
        .unwrap()
        .set_acked_features(1 << VIRTIO_F_VERSION_1);
    fs.lock()
        .unwrap()
        .activate(mem.clone(), qs, irq.clone())
        .unwrap();
    // The backend signals the call fd on its own time: no reply orders it.
    for _ in 0..200 {
        if line.count() > 0 {
            break;
        }
        manager.run_with_timeout(10).unwrap();
    }
    assert_eq!(line.count(), 1, "the call on queue 1 raised the interrupt");
    assert!(fs.lock().unwrap().reset());
    // GET_VRING_BASE waited for replies, so the backend has seen every message by now; the
    // kick fd it got is the queue eventfd KVM signals.
    assert_eq!(fs.lock().unwrap().queue_events()[1].read().unwrap(), 1);
    let log = backend.join().unwrap();

    let codes: Vec<u32> = log.iter().map(|m| m.code).collect();
    let vring = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let expected = [
        &[
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
        ][..],
        &[GET_QUEUE_NUM, SET_FEATURES, SET_MEM_TABLE],
        &vring,
        &vring,
        &[
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            SET_VRING_ENABLE,
            GET_VRING_BASE,
        ],
    ]
    .concat();
    assert_eq!(codes, expected);
    let body = |code| &log.iter().find(|m| m.code == code).unwrap().body;
    assert_eq!(u64_at(body(SET_PROTOCOL_FEATURES), 0), 1, "MQ only");
    assert_eq!(
        u64_at(body(SET_FEATURES), 0),
        1 << VIRTIO_F_VERSION_1 | PROTOCOL_BIT
    );
    let table = log.iter().find(|m| m.code == SET_MEM_TABLE).unwrap();
    assert_eq!(u32_at(&table.body, 0), 1, "one region");
    let region = &table.body[8..];
    assert_eq!((u64_at(region, 0), u64_at(region, 8)), (0, MEM_SIZE as u64));
    assert_eq!(u64_at(region, 24), 0, "mmap offset");
    let memfd = table.fd.as_ref().expect("the memfd travels with the table");
    assert_eq!(memfd.metadata().unwrap().len(), MEM_SIZE as u64);
    let addr = log
        .iter()
        .filter(|m| m.code == SET_VRING_ADDR)
        .nth(1)
        .unwrap();
    let host = mem.get_host_address(GuestAddress(desc)).unwrap() as u64;
    assert_eq!((u32_at(&addr.body, 0), u64_at(&addr.body, 8)), (1, host));

    // The backend is gone: the device reports it, which stops the VM, and refuses to start
    // again.
    assert_eq!(failure.reason(), None);
    run_until_idle(&mut manager);
    assert_eq!(
        failure.reason().as_deref(),
        Some("virtio-fs \"share\": the vhost-user backend hung up")
    );
    let (qs, _) = queues(&mem);
    let err = fs.lock().unwrap().activate(mem, qs, irq).unwrap_err();
    let ActivateError::Backend(e) = err else {
        panic!("{err:?}");
    };
    assert_eq!(e.to_string(), "the vhost-user backend has disconnected");
}

#[test]
fn refuses_a_legacy_backend_a_bad_tag_and_private_memory() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let backend = fake_backend(theirs, PROTOCOL_BIT, 1);
    let failure = Arc::new(DeviceFailure::new().unwrap());
    let err = Fs::with_frontend("t", Frontend::from_stream(ours, 2), failure)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "the vhost-user backend does not offer VIRTIO_F_VERSION_1"
    );
    drop(backend.join());
    assert!(matches!(config_space(""), Err(FsError::Tag)));
    assert!(matches!(config_space(&"t".repeat(37)), Err(FsError::Tag)));
    assert_eq!(config_space(&"t".repeat(36)).unwrap()[35], b't');

    let (mut fs, _failure, _backend) = device(1 << VIRTIO_F_VERSION_1, 1);
    let private = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (qs, _) = queues(&private);
    let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
    let err = fs.activate(private, qs, irq).unwrap_err();
    let ActivateError::Backend(e) = err else {
        panic!("{err:?}");
    };
    assert_eq!(e.to_string(), "guest memory is not shared (memfd-backed)");
}
