//! virtio-vsock packets: the device runs on a real event loop with its Unix-socket host side;
//! the input holds the receive (0), transmit (1) and event (2) queues and the packets the guest
//! transmits. A host program listens on port 1024, so guest connections there open (others
//! are refused); with control bit 3 a host program also connects to guest port 52 first.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use rvmm_devices::interrupt::EventFdInterrupt;
use rvmm_devices::virtio::vsock::muxer::port_path;
use rvmm_devices::virtio::vsock::{Vsock, VsockConfig, RX_QUEUE, TX_QUEUE};
use rvmm_devices::virtio::{VirtioDevice, VirtioInterrupt};
use rvmm_fuzz::{scratch_dir, FuzzGuest};
use vmm_sys_util::tempdir::TempDir;

const GUEST_CID: u64 = 3;
/// Host port with a listener.
const HOST_PORT: u32 = 1024;
/// Event-loop passes per input: enough for a transmit pass, the answers it queues and a
/// host connection's request.
const PASSES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Some(guest) = FuzzGuest::new(data) else {
        return;
    };
    let dir = TempDir::new_in(&scratch_dir()).expect("scratch dir");
    let uds_path = dir.as_path().join("v.sock");
    let _host_listener = UnixListener::bind(port_path(&uds_path, HOST_PORT)).expect("bind");
    let vsock = Vsock::new(VsockConfig {
        cid: GUEST_CID,
        uds_path: uds_path.clone(),
    })
    .expect("vsock device");
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
    manager.add_subscriber(vsock.clone());
    let line = Arc::new(EventFdInterrupt::new().expect("interrupt eventfd"));
    let queues = (0..3).map(|i| guest.queue(i)).collect();
    {
        let mut dev = vsock.lock().unwrap();
        dev.activate(
            guest.mem.clone(),
            queues,
            Arc::new(VirtioInterrupt::new(line)),
        )
        .expect("activation");
        for queue in [RX_QUEUE, TX_QUEUE] {
            dev.queue_events()[queue].write(1).expect("queue kick");
        }
    }
    let _host_client = guest.flag(3).then(|| {
        let mut stream = UnixStream::connect(&uds_path).expect("host connect");
        stream.write_all(b"CONNECT 52\n").expect("host handshake");
        stream
    });
    for _ in 0..PASSES {
        if manager.run_with_timeout(0).expect("event loop") == 0 {
            break;
        }
    }
});
