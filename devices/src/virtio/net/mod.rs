//! virtio-net backed by a host TAP interface or by a stream to passt.
//!
//! `tap` opens the TAP with a virtio-net header in front of every frame, `stream` exchanges
//! length-prefixed frames with passt (user-mode networking) and makes them look like a TAP's,
//! `tx` moves the guest's frames from the transmit queue to either, `rx` moves their frames into
//! the receive queue's buffers, `mac` parses and generates addresses, and `device` is the
//! [`crate::virtio::VirtioDevice`] and event-loop glue.

mod device;
pub mod mac;
#[cfg(test)]
mod netns_tests;
pub mod rx;
pub mod stream;
pub mod tap;
pub mod tx;

pub use device::{Net, NetConfig, NetCounters, NetError};
pub use mac::{format_mac, parse_mac, MacError};
pub use stream::{Stream, StreamError};
pub use tap::{Tap, TapError, TapIo};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1` in front of every frame both ways: with VERSION_1 the header
/// always has `num_buffers`, merged receive buffers or not.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Shortest frame a TAP accepts or delivers: an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Largest frame: a 64 KiB segmentation-offload packet plus its Ethernet header.
pub const MAX_FRAME_LEN: usize = 65536 + ETH_HLEN;
/// Largest header plus frame, either way.
pub const MAX_PACKET_LEN: usize = HDR_LEN + MAX_FRAME_LEN;

#[cfg(test)]
pub(crate) mod test_utils {
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{TapIo, ETH_HLEN, HDR_LEN};
    use crate::virtio::block::test_utils::raw_chain;

    /// Size of the test queues.
    pub(crate) const DRIVER_QUEUE_SIZE: u16 = 16;
    /// Where a [`Driver`]'s used ring starts, from its base: MockSplitQueue's own used ring
    /// overlaps its avail ring (it takes the ring's entry count for its byte length), which
    /// corrupts chains past the eighth and `used_event`.
    const USED_OFFSET: u64 = 0x400;

    /// The driver's side of one queue: posts chains into consecutive descriptor slots.
    pub(crate) struct Driver<'a> {
        pub(crate) mock: MockSplitQueue<'a, GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
        used: GuestAddress,
        next_desc: u16,
    }

    impl<'a> Driver<'a> {
        /// A queue whose rings occupy `base` to `base + 0x600`.
        pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
            Self {
                mock: MockSplitQueue::create(mem, GuestAddress(base), DRIVER_QUEUE_SIZE),
                mem,
                used: GuestAddress(base + USED_OFFSET),
                next_desc: 0,
            }
        }

        /// The device's view, as the transport would build it.
        pub(crate) fn queue(&self) -> Queue {
            let mut q: Queue = self.mock.create_queue().unwrap();
            q.try_set_used_ring_address(self.used).unwrap();
            q
        }

        /// Makes one chain of (address, length, flags) available.
        pub(crate) fn post(&mut self, descs: &[(u64, u32, u16)]) {
            let first = self.next_desc;
            self.mock
                .add_desc_chains(&raw_chain(descs, first), first)
                .unwrap();
            self.next_desc += descs.len() as u16;
        }

        /// (head, length) of every used entry so far.
        pub(crate) fn used(&self) -> Vec<(u32, u32)> {
            let at = |offset: u64| self.used.0 + offset;
            let idx: u16 = self.mem.read_obj(GuestAddress(at(2))).unwrap();
            (0..u64::from(idx))
                .map(|i| {
                    let slot = 4 + 8 * (i % u64::from(DRIVER_QUEUE_SIZE));
                    let id: u32 = self.mem.read_obj(GuestAddress(at(slot))).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(at(slot + 4))).unwrap();
                    (id, len)
                })
                .collect()
        }

        /// Where the driver asks for an interrupt (after the avail ring).
        pub(crate) fn used_event(&self) -> GuestAddress {
            GuestAddress(self.mock.avail_addr().0 + 4 + 2 * u64::from(DRIVER_QUEUE_SIZE))
        }

        /// Where the device asks for a notification (after the used ring).
        pub(crate) fn avail_event(&self) -> GuestAddress {
            GuestAddress(self.used.0 + 4 + 8 * u64::from(DRIVER_QUEUE_SIZE))
        }
    }

    /// A TAP stand-in: a Unix datagram socket pair keeps frame boundaries and epoll readiness
    /// like a TAP does, without root. The test holds the peer end.
    pub(crate) struct FakeTap {
        sock: UnixDatagram,
        /// The last offloads set.
        pub(crate) offload: Arc<AtomicU32>,
        /// Fails every write with this error.
        pub(crate) fail_writes: Option<i32>,
        /// Takes frames as guest buffers (as a TAP does), not only whole.
        pub(crate) vectored: bool,
    }

    impl FakeTap {
        /// The device's end and the test's end.
        pub(crate) fn new() -> (Self, Peer) {
            let (ours, theirs) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            theirs.set_nonblocking(true).unwrap();
            let tap = Self {
                sock: ours,
                offload: Arc::new(AtomicU32::new(u32::MAX)),
                fail_writes: None,
                vectored: true,
            };
            (tap, Peer(theirs))
        }
    }

    impl AsRawFd for FakeTap {
        fn as_raw_fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
    }

    impl TapIo for FakeTap {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.sock.recv(buf)
        }

        fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(errno) = self.fail_writes {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.sock.send(buf)
        }

        unsafe fn write_frame_iovecs(&mut self, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
            if !self.vectored {
                return None;
            }
            if let Some(errno) = self.fail_writes {
                return Some(Err(io::Error::from_raw_os_error(errno)));
            }
            // SAFETY: the caller vouches for the buffers.
            Some(unsafe { super::tap::writev(self.sock.as_raw_fd(), iov) })
        }

        fn scatter_reads(&self) -> bool {
            self.vectored
        }

        unsafe fn read_frame_iovecs(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            // SAFETY: the caller vouches for the buffers.
            unsafe { super::tap::readv(self.sock.as_raw_fd(), iov) }
        }

        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.offload.store(flags, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The host network's side of a [`FakeTap`].
    pub(crate) struct Peer(pub(crate) UnixDatagram);

    impl Peer {
        /// Queues a frame for the device to receive.
        pub(crate) fn send(&self, packet: &[u8]) {
            assert_eq!(self.0.send(packet).unwrap(), packet.len());
        }

        /// The next frame the device transmitted, if any.
        pub(crate) fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0; super::MAX_PACKET_LEN + 1];
            match self.0.recv(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A header (flags and gso_type as given, num_buffers 0) and a frame of `len` bytes whose
    /// byte `i` is `(i * 7 + seed) % 251`.
    pub(crate) fn packet(flags: u8, len: usize, seed: usize) -> Vec<u8> {
        assert!(len >= ETH_HLEN);
        let mut p = vec![0u8; HDR_LEN];
        p[0] = flags;
        p.extend((0..len).map(|i| ((i * 7 + seed) % 251) as u8));
        p
    }
}
