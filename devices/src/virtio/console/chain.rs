//! Validation of the buffers a console descriptor chain carries.
//!
//! A console chain is one direction only: the transmit queue carries device-readable buffers,
//! the receive queue device-writable ones. Everything the guest controls is checked here before
//! a byte moves.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use super::QUEUE_SIZE;

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain ended on a descriptor that claims a successor: a loop, a bad index, a bad
    /// indirect table or a chain over 4 GiB.
    #[error("descriptor chain is broken")]
    BrokenChain,
    /// More descriptors than any legal chain has.
    #[error("descriptor chain is longer than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-writable buffer on the transmit queue or a device-readable one on the receive
    /// queue.
    #[error("buffer has the wrong direction for this queue")]
    WrongDirection,
    /// More bytes than the device accepts in one chain.
    #[error("chain carries {0} bytes, more than the {1} allowed")]
    TooLong(u64, u64),
    /// No bytes at all: nothing to transmit, or nowhere to receive into.
    #[error("chain has no data bytes")]
    Empty,
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes, never zero.
    pub len: u32,
}

/// The data buffers of one chain, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Buffers {
    /// The non-empty buffers.
    pub list: Vec<Buffer>,
    /// Their total length, at least 1 and at most the limit passed to [`Buffers::new`].
    pub len: u64,
}

impl Buffers {
    /// Walks a chain whose buffers must all be device-writable (`writable`) or all
    /// device-readable, inside guest memory, and at most `max_len` bytes in total.
    pub fn new(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
        writable: bool,
        max_len: u64,
    ) -> Result<Self, ChainError> {
        let mut list = Vec::new();
        let mut len = 0u64;
        let mut last_has_next = false;
        // Without indirect descriptors a chain never exceeds the queue size.
        let limit = usize::from(QUEUE_SIZE);
        for (count, desc) in descriptors.enumerate() {
            if count == limit {
                return Err(ChainError::TooManyDescriptors(limit));
            }
            last_has_next = desc.has_next();
            if desc.is_write_only() != writable {
                return Err(ChainError::WrongDirection);
            }
            let buf = Buffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !mem.check_range(buf.addr, buf.len as usize) {
                return Err(ChainError::OutsideMemory {
                    addr: buf.addr.raw_value(),
                    len: buf.len,
                });
            }
            // At most QUEUE_SIZE lengths below 4 GiB: cannot overflow.
            len += u64::from(buf.len);
            if len > max_len {
                return Err(ChainError::TooLong(len, max_len));
            }
            if buf.len > 0 {
                list.push(buf);
            }
        }
        // virtio-queue's iterator stops silently on a bad chain; the last descriptor it yields
        // then still has NEXT set.
        if last_has_next {
            return Err(ChainError::BrokenChain);
        }
        if len == 0 {
            return Err(ChainError::Empty);
        }
        Ok(Self { list, len })
    }

    /// Copies the buffers' contents into `out` (cleared first).
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        out: &mut Vec<u8>,
    ) -> Result<(), GuestMemoryError> {
        out.clear();
        // Bounded by the `max_len` the buffers were validated against.
        out.resize(self.len as usize, 0);
        let mut pos = 0;
        for buf in &self.list {
            let end = pos + buf.len as usize;
            mem.read_slice(&mut out[pos..end], buf.addr)?;
            pos = end;
        }
        Ok(())
    }

    /// Copies `bytes` into the buffers from the start, as far as they reach; returns the count
    /// copied.
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        mut bytes: &[u8],
    ) -> Result<usize, GuestMemoryError> {
        let mut written = 0;
        for buf in &self.list {
            if bytes.is_empty() {
                break;
            }
            let n = bytes.len().min(buf.len as usize);
            mem.write_slice(&bytes[..n], buf.addr)?;
            bytes = &bytes[n..];
            written += n;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

    use super::*;
    use crate::virtio::block::test_utils::{chain, mem, MEM_SIZE, R, W};

    const A: u64 = 0x1_0000;

    fn buffers(descs: &[(u64, u32, u16)], writable: bool) -> Result<Buffers, ChainError> {
        Buffers::new(chain(descs).into_iter(), &mem(), writable, 4096)
    }

    fn buf(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn valid_chains_keep_order_and_drop_empty_buffers() {
        let got = buffers(&[(A, 3, R), (A + 0x100, 0, R), (A + 0x10, 5, R)], false).unwrap();
        assert_eq!(got.list, vec![buf(A, 3), buf(A + 0x10, 5)]);
        assert_eq!(got.len, 8);
        let got = buffers(&[(A, 4096, W)], true).unwrap();
        assert_eq!(got.list, vec![buf(A, 4096)]);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let top = MEM_SIZE as u64;
        type Case = (Vec<(u64, u32, u16)>, bool, ChainError);
        let cases: Vec<Case> = vec![
            (
                vec![(A, 1, R), (A, 1, W)],
                false,
                ChainError::WrongDirection,
            ),
            (vec![(A, 1, R)], true, ChainError::WrongDirection),
            (
                vec![(top, 1, R)],
                false,
                ChainError::OutsideMemory { addr: top, len: 1 },
            ),
            (
                vec![(u64::MAX, 2, W)],
                true,
                ChainError::OutsideMemory {
                    addr: u64::MAX,
                    len: 2,
                },
            ),
            (
                vec![(A, 4000, R), (A, 97, R)],
                false,
                ChainError::TooLong(4097, 4096),
            ),
            (vec![], false, ChainError::Empty),
            (vec![(A, 0, W), (A, 0, W)], true, ChainError::Empty),
        ];
        for (descs, writable, want) in cases {
            assert_eq!(buffers(&descs, writable).unwrap_err(), want, "{descs:x?}");
        }
        let mut broken = chain(&[(A, 1, R)]);
        broken[0] = Descriptor::new(A, 1, VRING_DESC_F_NEXT as u16, 7);
        let err = Buffers::new(broken.into_iter(), &mem(), false, 4096).unwrap_err();
        assert_eq!(err, ChainError::BrokenChain);
        let long = vec![(A, 1, W); usize::from(QUEUE_SIZE) + 1];
        assert_eq!(
            buffers(&long, true).unwrap_err(),
            ChainError::TooManyDescriptors(QUEUE_SIZE.into())
        );
    }

    #[test]
    fn bytes_are_scattered_and_gathered() {
        let mem = mem();
        let bufs = buffers(&[(A, 3, W), (A + 0x100, 4, W)], true).unwrap();
        assert_eq!(bufs.write_from(&mem, b"abcdefghij").unwrap(), 7);
        assert_eq!(bufs.write_from(&mem, b"XY").unwrap(), 2);
        let mut out = Vec::new();
        bufs.read_into(&mem, &mut out).unwrap();
        assert_eq!(out, b"XYcdefg");
    }
}
