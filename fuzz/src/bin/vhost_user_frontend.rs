//! A vhost-user backend, hostile or broken, behind virtio-fs: the input is every byte the
//! backend sends on its socket, read by the frontend as the replies to its requests (headers,
//! bodies, or anything else); then the backend shuts down its sending side and swallows
//! requests until the frontend lets go. The device is created (SET_OWNER, the feature and
//! protocol-feature negotiation, GET_QUEUE_NUM), started on memfd guest memory with two queues
//! (SET_FEATURES, SET_MEM_TABLE, the vrings), reset (GET_VRING_BASE), and run on an event loop,
//! which must report the hang-up so that the device refuses to start again.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use rvmm_devices::failure::DeviceFailure;
use rvmm_devices::interrupt::EventFdInterrupt;
use rvmm_devices::virtio::fs::{Fs, FsConfig, FsError};
use rvmm_devices::virtio::{VirtioDevice, VirtioInterrupt};
use rvmm_fuzz::{scratch_dir, FuzzGuest, MEM_SIZE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

/// More than any answer sequence needs, and less than a socket holds, so that the backend
/// never waits for the frontend to read.
const MAX_INPUT: usize = 32 * 1024;
/// FuzzGuest's control byte for two ready queues of 16 entries.
const QUEUES_OF_16: u8 = 4;
/// Event-loop passes: the hang-up needs one.
const PASSES: usize = 4;

/// The backend: accepts the frontend, sends `replies`, shuts down its sending side, says so on
/// `sent`, then reads (and drops, with any fds) requests until the frontend closes.
fn backend(listener: UnixListener, replies: Vec<u8>, sent: mpsc::Sender<()>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((sock, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let _ = (&sock).write_all(&replies);
        let _ = sock.shutdown(Shutdown::Write);
        let _ = sent.send(());
        let mut sink = [0u8; 4096];
        while matches!((&sock).read(&mut sink), Ok(n) if n > 0) {}
    })
}

/// Guest RAM on a memfd, as the VMM maps it for vhost-user devices.
fn shared_guest() -> FuzzGuest {
    let file = rvmm_fuzz::memfd(MEM_SIZE as u64).expect("guest memfd");
    let region = (GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)));
    let mem = GuestMemoryMmap::from_ranges_with_files([region]).expect("mapping guest memory");
    FuzzGuest {
        mem,
        control: QUEUES_OF_16,
    }
}

/// Starts, resets and watches a device that was negotiated; `sent` says the backend is done.
fn drive(fs: Fs, failure: &DeviceFailure, sent: &mpsc::Receiver<()>) {
    let features = fs.avail_features();
    let fs = Arc::new(Mutex::new(fs));
    let mut manager = EventManager::<Arc<Mutex<Fs>>>::new().expect("event manager");
    manager.add_subscriber(fs.clone());
    let line = Arc::new(EventFdInterrupt::new().expect("interrupt eventfd"));
    let irq = Arc::new(VirtioInterrupt::new(line));
    let guest = shared_guest();
    let queues = || vec![guest.queue(0), guest.queue(1)];
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(features);
        if dev
            .activate(guest.mem.clone(), queues(), irq.clone())
            .is_ok()
        {
            let _ = dev.reset();
        }
    }
    // Everything is sent and the backend's side is shut down: the loop must see the hang-up.
    sent.recv().expect("the backend thread ended early");
    for _ in 0..PASSES {
        if manager.run_with_timeout(0).expect("event loop") == 0 {
            break;
        }
    }
    assert!(
        failure.reason().is_some(),
        "the backend's hang-up went unreported"
    );
    let again = fs
        .lock()
        .unwrap()
        .activate(guest.mem.clone(), queues(), irq);
    assert!(again.is_err(), "started again on a backend that hung up");
}

fuzz_target!(|data: &[u8]| {
    rvmm_fuzz::ignore_sigpipe();
    let dir = TempDir::new_in(&scratch_dir()).expect("scratch dir");
    let socket = dir.as_path().join("vhost-user.sock");
    let listener = UnixListener::bind(&socket).expect("binding the backend socket");
    let replies = data[..data.len().min(MAX_INPUT)].to_vec();
    let (sent_tx, sent) = mpsc::channel();
    let thread = backend(listener, replies, sent_tx);
    let failure = Arc::new(DeviceFailure::new().expect("failure eventfd"));
    let cfg = FsConfig {
        tag: "fuzz".into(),
        socket,
    };
    match Fs::new(cfg, failure.clone()) {
        Ok(fs) => drive(fs, &failure, &sent),
        Err(FsError::Connect { source, .. }) => panic!("cannot reach the fake backend: {source}"),
        Err(_) => {}
    }
    // The frontend is closed: the backend's reads end.
    thread.join().expect("backend thread");
});
