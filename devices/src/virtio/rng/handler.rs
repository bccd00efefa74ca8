//! Fills the request queue's device-writable buffers with bytes from the host's `getrandom(2)`.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{MAX_CHAIN_BYTES, QUEUE_SIZE};
use crate::virtio::drain::{drain, DrainError};
use crate::virtio::sg::SgList;
use crate::{warn_once, LogOnce, Problem};

/// Serves entropy requests.
pub struct RngHandler {
    /// One chain's worth of entropy on its way to guest memory.
    buf: Box<[u8]>,
    warned: LogOnce,
}

impl Default for RngHandler {
    fn default() -> Self {
        Self::new()
    }
}

impl RngHandler {
    /// A handler with its bounce buffer.
    pub fn new() -> Self {
        Self {
            buf: vec![0; MAX_CHAIN_BYTES].into_boxed_slice(),
            warned: LogOnce::default(),
        }
    }

    /// Fills every available chain; returns whether the driver needs an interrupt.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DrainError> {
        drain(mem, queue, |chain| self.serve(mem, chain))
    }

    /// Fills one chain; returns the number of bytes written (0 for a refused chain).
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        descriptors: impl Iterator<Item = Descriptor>,
    ) -> u32 {
        let sg = match SgList::new(descriptors, mem, true, QUEUE_SIZE.into(), u64::MAX) {
            Ok(sg) => sg,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Chain,
                    "virtio-rng: dropping request: {e}"
                );
                return 0;
            }
        };
        let want = usize::try_from(sg.len).map_or(MAX_CHAIN_BYTES, |n| n.min(MAX_CHAIN_BYTES));
        let got = match getrandom(&mut self.buf[..want]) {
            Ok(got) => got,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Entropy,
                    "virtio-rng: getrandom failed: {e}"
                );
                return 0;
            }
        };
        match sg.write_from(mem, &self.buf[..got]) {
            // At most MAX_CHAIN_BYTES.
            Ok(written) => written as u32,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Memory,
                    "virtio-rng: cannot write to guest memory: {e}"
                );
                0
            }
        }
    }
}

/// Fills `buf` from the host's entropy pool without blocking; returns the bytes filled, fewer
/// than asked only while the pool is still uninitialized (early host boot), when waiting would
/// stall every device on the event loop.
pub fn getrandom(buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let (ptr, len) = (rest.as_mut_ptr().cast(), rest.len());
        // SAFETY: the kernel writes at most `len` bytes into `rest`, borrowed mutably here.
        let ret = unsafe { libc::getrandom(ptr, len, libc::GRND_NONBLOCK) };
        match usize::try_from(ret) {
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::net::test_utils::Driver;

    const FILL: u8 = 0xa5;

    fn prefill(mem: &GuestMemoryMmap, len: usize) {
        mem.write_slice(&vec![FILL; len], GuestAddress(BUF))
            .unwrap();
    }

    /// True if `bytes` do not look like the untouched fill pattern (32 random bytes all equal
    /// to FILL has probability 2^-256).
    fn random(bytes: &[u8]) -> bool {
        bytes.len() >= 32 && bytes.iter().any(|&b| b != FILL)
    }

    #[test]
    fn getrandom_fills_large_buffers() {
        let mut buf = vec![0u8; 3 * MAX_CHAIN_BYTES];
        assert_eq!(getrandom(&mut buf).unwrap(), buf.len());
        assert!(buf[buf.len() - 64..].iter().any(|&b| b != 0));
        assert_eq!(getrandom(&mut []).unwrap(), 0);
    }

    #[test]
    fn scattered_buffers_are_filled() {
        let mem = mem();
        prefill(&mem, 0x1000);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 40, W), (BUF + 0x100, 0, W), (BUF + 0x200, 64, W)]);
        driver.post(&[(BUF + 0x400, 32, W)]);
        let mut queue = driver.queue();
        let mut rng = RngHandler::new();
        assert!(rng.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(driver.used(), vec![(0, 104), (3, 32)]);
        assert!(random(&guest(&mem, BUF, 40)));
        assert!(random(&guest(&mem, BUF + 0x200, 64)));
        assert!(random(&guest(&mem, BUF + 0x400, 32)));
        assert_eq!(guest(&mem, BUF + 40, 8), [FILL; 8]);
        // Nothing new: nothing to do, no interrupt.
        assert!(!rng.process_queue(&mem, &mut queue).unwrap());
    }

    #[test]
    fn large_chains_get_at_most_the_cap() {
        let mem = mem();
        let len = 2 * MAX_CHAIN_BYTES;
        prefill(&mem, len);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, len as u32, W)]);
        let mut queue = driver.queue();
        RngHandler::new().process_queue(&mem, &mut queue).unwrap();
        assert_eq!(driver.used(), vec![(0, MAX_CHAIN_BYTES as u32)]);
        assert!(random(&guest(&mem, BUF + MAX_CHAIN_BYTES as u64 - 64, 64)));
        assert_eq!(
            guest(&mem, BUF + MAX_CHAIN_BYTES as u64, 64),
            vec![FILL; 64]
        );
    }

    #[test]
    fn hostile_chains_are_returned_empty() {
        let mem = mem();
        prefill(&mem, 0x100);
        let top = MEM_SIZE as u64;
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 16, R)]);
        driver.post(&[(BUF, 16, W), (BUF + 16, 16, R)]);
        driver.post(&[(top - 8, 16, W)]);
        driver.post(&[(BUF, 0, W)]);
        // 5 → 6 → 6 → …
        driver.post(&[(BUF, 16, W), (BUF + 16, 16, W)]);
        let looped = Descriptor::new(BUF + 16, 16, (VRING_DESC_F_NEXT | W as u32) as u16, 6);
        driver
            .mock
            .desc_table()
            .store(6, RawDescriptor::from(looped))
            .unwrap();
        let mut queue = driver.queue();
        assert!(RngHandler::new().process_queue(&mem, &mut queue).unwrap());
        assert_eq!(driver.used(), vec![(0, 0), (1, 0), (3, 0), (4, 0), (5, 0)]);
        assert_eq!(guest(&mem, BUF, 0x100), vec![FILL; 0x100]);
    }

    #[test]
    fn bogus_avail_index_does_not_spin() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, W)]);
        driver.mock.avail().idx().store(1000);
        let mut queue = driver.queue();
        assert!(matches!(
            RngHandler::new().process_queue(&mem, &mut queue),
            Err(DrainError::BrokenRing)
        ));
    }
}
