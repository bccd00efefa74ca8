//! virtio-net transmit: the guest's transmit queue comes from the input and every frame it
//! gathers goes to a TAP stand-in that accepts it (or, with control bit 3, refuses it).
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use libfuzzer_sys::fuzz_target;
use rvmm_devices::virtio::net::tx::Transmitter;
use rvmm_devices::virtio::net::TapIo;
use rvmm_fuzz::FuzzGuest;

/// Swallows frames like a TAP whose reader keeps up, or refuses them like one that is down.
struct SinkTap {
    refuse: bool,
}

impl AsRawFd for SinkTap {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl TapIo for SinkTap {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.refuse {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(buf.len())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(guest) = FuzzGuest::new(data) else {
        return;
    };
    let mut tap = SinkTap {
        refuse: guest.flag(3),
    };
    let mut tx = Transmitter::new();
    let mut queue = guest.queue(0);
    let _ = tx.process_queue(&guest.mem, &mut queue, &mut tap);
});
