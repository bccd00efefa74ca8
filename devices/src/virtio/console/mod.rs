//! virtio-console with a single port (no MULTIPORT): the guest's `hvc0`.
//!
//! `chain` validates the buffers of a descriptor chain, `port` drains the transmit queue into
//! a writer and fills the receive queue from a host file descriptor, `device` is the
//! [`crate::virtio::VirtioDevice`] and event-loop glue.

mod chain;
mod device;
mod port;

pub use device::{Console, ConsoleError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Most bytes read from the host input into one receive chain: a page, the size of the buffers
/// Linux posts.
const RX_CHUNK: usize = 4096;
/// Most bytes in one transmit chain (Linux sends at most a page or so at a time): bounds the
/// event loop's time, and the host memory, spent on one chain.
const MAX_TX_CHAIN: u64 = 1 << 20;

#[cfg(test)]
pub(crate) mod test_utils {
    use std::fs::File;
    use std::io::{self, PipeWriter, Write};
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    pub(crate) use crate::virtio::block::test_utils::{mem, raw_chain, MEM_SIZE, R, W};

    /// Where tests put data buffers; the mock rings live below.
    pub(crate) const BUF: u64 = 0x1_0000;
    /// Size of the mock queues.
    const MOCK_SIZE: u16 = 16;

    /// A writer the test can inspect after handing it to the device.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl SharedBuf {
        pub(crate) fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A blocking pipe, like an unredirected stdin.
    pub(crate) fn pipe() -> (File, PipeWriter) {
        let (r, w) = io::pipe().unwrap();
        (File::from(OwnedFd::from(r)), w)
    }

    pub(crate) fn guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The driver's side of one queue: posts chains into consecutive descriptor slots.
    pub(crate) struct Driver<'a> {
        pub(crate) mock: MockSplitQueue<'a, GuestMemoryMmap>,
        next_desc: u16,
    }

    impl<'a> Driver<'a> {
        /// A queue whose rings start at `base`.
        pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
            Self {
                mock: MockSplitQueue::create(mem, GuestAddress(base), MOCK_SIZE),
                next_desc: 0,
            }
        }

        /// The device's view, as the transport would build it.
        pub(crate) fn queue(&self) -> Queue {
            self.mock.create_queue().unwrap()
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
            let used = self.mock.used();
            (0..used.idx().load())
                .map(|i| {
                    let e = used.ring().ref_at(usize::from(i)).unwrap().load();
                    (e.id(), e.len())
                })
                .collect()
        }
    }
}
