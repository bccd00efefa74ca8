//! virtio-net receive: the guest's receive queue comes from the input, and a TAP stand-in
//! delivers frames of several sizes (minimum, segmentation-offload maximum, MTU, jumbo) into
//! whatever buffers it posted. Control bit 3 negotiates merged receive buffers, bit 4 guest
//! checksum offload; bit 5 lets the TAP read straight into guest buffers, as a real one does.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use libfuzzer_sys::fuzz_target;
use rvmm_devices::virtio::net::rx::Receiver;
use rvmm_devices::virtio::net::{TapIo, HDR_LEN, MAX_FRAME_LEN};
use rvmm_fuzz::FuzzGuest;

/// Frame lengths the TAP delivers, in order: the frames after the largest may be read straight
/// into guest buffers.
const FRAMES: [usize; 4] = [60, MAX_FRAME_LEN, 1514, 9014];

/// Hands out each of [`FRAMES`] once (header first, as a TAP with a vnet header does).
struct SourceTap {
    next: usize,
    scatter: bool,
}

impl SourceTap {
    /// The next frame, header first; WouldBlock after the last.
    fn frame(&mut self) -> io::Result<Vec<u8>> {
        let Some(&len) = FRAMES.get(self.next) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        self.next += 1;
        let mut frame = vec![0u8; HDR_LEN + len];
        for (i, b) in frame[HDR_LEN..].iter_mut().enumerate() {
            *b = i as u8;
        }
        Ok(frame)
    }
}

impl AsRawFd for SourceTap {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl TapIo for SourceTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.frame()?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn scatter_reads(&self) -> bool {
        self.scatter
    }

    unsafe fn read_frame_iovecs(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let frame = self.frame()?;
        let mut rest = &frame[..];
        for v in iov {
            let n = rest.len().min(v.iov_len);
            // SAFETY: the caller vouches that each entry is writable memory of its length.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast(), n) };
            rest = &rest[n..];
        }
        // A TAP refuses buffers too small for the frame (and drops it).
        match rest.is_empty() {
            true => Ok(frame.len()),
            false => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
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
    let mut rx = Receiver::new();
    rx.set_features(guest.flag(3), guest.flag(4));
    let mut tap = SourceTap {
        next: 0,
        scatter: guest.flag(5),
    };
    let mut queue = guest.queue(0);
    // A second pump, as after the driver's next notification, uses what the first left.
    for _ in 0..2 {
        let _ = rx.pump(&guest.mem, &mut queue, &mut tap);
    }
});
