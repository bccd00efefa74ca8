//! virtio-blk request handling: the guest's request queue (rings, descriptors, headers, data
//! buffers, DISCARD/WRITE_ZEROES ranges) comes from the input and is served against an
//! in-memory disk image. Control bit 3 makes the disk read-only; bit 4 serves reads, writes and
//! flushes on io_uring, asynchronously, as rvmm does by default.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::os::fd::AsRawFd;

use libfuzzer_sys::fuzz_target;
use rvmm_devices::virtio::block::handler::BlockHandler;
use rvmm_devices::virtio::block::{ID_BYTES, SECTOR_SIZE};
use rvmm_fuzz::{memfd, FuzzGuest};

/// A small disk, so that fuzzed sectors hit both sides of its end.
const DISK_SECTORS: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let Some(guest) = FuzzGuest::new(data) else {
        return;
    };
    let disk = memfd(DISK_SECTORS * SECTOR_SIZE).expect("creating the disk image");
    let mut handler = BlockHandler::new(disk, DISK_SECTORS, guest.flag(3), [b'F'; ID_BYTES]);
    if guest.flag(4) {
        handler.enable_io_uring().expect("setting up io_uring");
    }
    let mut queue = guest.queue(0);
    // Errors are the guest's problem (a broken ring); only a panic is a finding.
    let _ = handler.process_queue(&guest.mem, &mut queue);
    while handler.in_flight() > 0 {
        let done = handler.completion_event().expect("io_uring is on");
        let mut pfd = libc::pollfd {
            fd: done.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "a request never completed");
        let _ = done.read();
        let _ = handler.process_completions(&guest.mem, &mut queue);
    }
});
