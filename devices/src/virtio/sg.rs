//! Validated scatter-gather lists: the buffers of one descriptor chain whose data flows one
//! way (all device-readable or all device-writable), as the rng, net and console queues carry
//! them.
//!
//! Everything the guest controls about the chain's shape is checked here before a byte moves:
//! direction, bounds against guest memory, chain length and termination.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SgError {
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
    /// A buffer flows the other way than this queue's data.
    #[error("buffer has the wrong direction for this queue")]
    WrongDirection,
    /// More bytes than the device accepts in one chain (counted up to the first buffer that
    /// goes over).
    #[error("chain carries {0} bytes, more than the {1} allowed")]
    TooLong(u64, u64),
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
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SgList {
    /// The non-empty buffers.
    pub list: Vec<Buffer>,
    /// Their total length (below `max_descriptors` × 4 GiB, and at most `max_len`).
    pub len: u64,
}

impl SgList {
    /// Walks a chain whose buffers must all be device-writable (`writable`) or all
    /// device-readable, inside guest memory, with at most `max_descriptors` descriptors and
    /// `max_len` bytes (`u64::MAX`: no byte limit).
    pub fn new(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
        writable: bool,
        max_descriptors: usize,
        max_len: u64,
    ) -> Result<Self, SgError> {
        let mut sg = Self::default();
        sg.refill(descriptors, mem, writable, max_descriptors, max_len)?;
        Ok(sg)
    }

    /// [`SgList::new`] into this list, reusing its allocation (one chain after another).
    pub fn refill(
        &mut self,
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
        writable: bool,
        max_descriptors: usize,
        max_len: u64,
    ) -> Result<(), SgError> {
        self.list.clear();
        self.len = 0;
        let mut last_has_next = false;
        for (count, desc) in descriptors.enumerate() {
            if count == max_descriptors {
                return Err(SgError::TooManyDescriptors(max_descriptors));
            }
            last_has_next = desc.has_next();
            if desc.is_write_only() != writable {
                return Err(SgError::WrongDirection);
            }
            let buf = Buffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !mem.check_range(buf.addr, buf.len as usize) {
                return Err(SgError::OutsideMemory {
                    addr: buf.addr.raw_value(),
                    len: buf.len,
                });
            }
            // At most `max_descriptors` lengths below 4 GiB: cannot overflow.
            self.len += u64::from(buf.len);
            if self.len > max_len {
                return Err(SgError::TooLong(self.len, max_len));
            }
            if buf.len > 0 {
                self.list.push(buf);
            }
        }
        // virtio-queue's iterator stops silently on a bad chain; the last descriptor it yields
        // then still has NEXT set.
        if last_has_next {
            return Err(SgError::BrokenChain);
        }
        Ok(())
    }

    /// Fills `out` from the start of the buffers; `out` must not be longer than `self.len`.
    pub fn read_into(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut pos = 0;
        for buf in &self.list {
            if pos == out.len() {
                break;
            }
            let end = out.len().min(pos + buf.len as usize);
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
    const MAX: usize = 8;
    const MAX_LEN: u64 = 4096;

    fn sg(descs: &[(u64, u32, u16)], writable: bool) -> Result<SgList, SgError> {
        SgList::new(chain(descs).into_iter(), &mem(), writable, MAX, MAX_LEN)
    }

    fn buf(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn valid_chains_keep_order_and_drop_empty_buffers() {
        let got = sg(&[(A, 3, R), (A + 0x100, 0, R), (A + 0x10, 5, R)], false).unwrap();
        assert_eq!(got.list, vec![buf(A, 3), buf(A + 0x10, 5)]);
        assert_eq!(got.len, 8);
        let got = sg(&[(A, 4096, W)], true).unwrap();
        assert_eq!(got.list, vec![buf(A, 4096)]);
        assert_eq!(sg(&[], true).unwrap(), SgList::default());
    }

    #[test]
    fn hostile_chains_are_refused() {
        let top = MEM_SIZE as u64;
        type Case = (Vec<(u64, u32, u16)>, bool, SgError);
        let cases: Vec<Case> = vec![
            (vec![(A, 1, R), (A, 1, W)], false, SgError::WrongDirection),
            (vec![(A, 1, R)], true, SgError::WrongDirection),
            (
                vec![(top, 1, R)],
                false,
                SgError::OutsideMemory { addr: top, len: 1 },
            ),
            (
                vec![(u64::MAX, 2, W)],
                true,
                SgError::OutsideMemory {
                    addr: u64::MAX,
                    len: 2,
                },
            ),
            (
                vec![(A, 1, W); MAX + 1],
                true,
                SgError::TooManyDescriptors(MAX),
            ),
            (
                vec![(A, 4000, R), (A, 97, R)],
                false,
                SgError::TooLong(4097, 4096),
            ),
        ];
        for (descs, writable, want) in cases {
            assert_eq!(sg(&descs, writable).unwrap_err(), want, "{descs:x?}");
        }
        let mut broken = chain(&[(A, 1, R)]);
        broken[0] = Descriptor::new(A, 1, VRING_DESC_F_NEXT as u16, 7);
        let err = SgList::new(broken.into_iter(), &mem(), false, MAX, MAX_LEN).unwrap_err();
        assert_eq!(err, SgError::BrokenChain);
    }

    #[test]
    fn bytes_are_scattered_and_gathered() {
        let mem = mem();
        let bufs = sg(&[(A, 3, W), (A + 0x100, 4, W)], true).unwrap();
        assert_eq!(bufs.write_from(&mem, b"abcdefghij").unwrap(), 7);
        assert_eq!(bufs.write_from(&mem, b"XY").unwrap(), 2);
        let mut out = [0u8; 7];
        bufs.read_into(&mem, &mut out).unwrap();
        assert_eq!(&out, b"XYcdefg");
        let mut short = [0u8; 5];
        bufs.read_into(&mem, &mut short).unwrap();
        assert_eq!(&short, b"XYcde");
    }
}
