//! Validation of the buffers a console descriptor chain carries.
//!
//! A console chain is one direction only: the transmit queue carries device-readable buffers,
//! the receive queue device-writable ones. The shared scatter-gather checks ([`SgList`]) apply
//! with the console's limits, and a chain must carry at least one byte.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestMemoryError, GuestMemoryMmap};

use super::QUEUE_SIZE;
use crate::virtio::sg::{SgError, SgList};

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The buffers failed the shared scatter-gather checks.
    #[error(transparent)]
    Sg(#[from] SgError),
    /// No bytes at all: nothing to transmit, or nowhere to receive into.
    #[error("chain has no data bytes")]
    Empty,
}

/// Walks a chain whose buffers must all be device-writable (`writable`) or all
/// device-readable, inside guest memory, at least 1 and at most `max_len` bytes in total.
pub fn buffers(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    writable: bool,
    max_len: u64,
) -> Result<SgList, ChainError> {
    // Without indirect descriptors a chain never exceeds the queue size.
    let sg = SgList::new(descriptors, mem, writable, QUEUE_SIZE.into(), max_len)?;
    if sg.len == 0 {
        return Err(ChainError::Empty);
    }
    Ok(sg)
}

/// Copies all of the buffers' contents into `out` (cleared first).
pub fn read_all(
    sg: &SgList,
    mem: &GuestMemoryMmap,
    out: &mut Vec<u8>,
) -> Result<(), GuestMemoryError> {
    out.clear();
    // Bounded by the `max_len` the buffers were validated against.
    out.resize(sg.len as usize, 0);
    sg.read_into(mem, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_utils::{chain, mem, R, W};

    const A: u64 = 0x1_0000;

    fn buffers_of(descs: &[(u64, u32, u16)], writable: bool) -> Result<SgList, ChainError> {
        buffers(chain(descs).into_iter(), &mem(), writable, 4096)
    }

    #[test]
    fn console_limits_apply() {
        let got = buffers_of(&[(A, 3, R), (A + 0x100, 0, R), (A + 0x10, 5, R)], false).unwrap();
        assert_eq!(got.len, 8);
        type Case = (Vec<(u64, u32, u16)>, bool, ChainError);
        let cases: Vec<Case> = vec![
            (
                vec![(A, 4000, R), (A, 97, R)],
                false,
                SgError::TooLong(4097, 4096).into(),
            ),
            (vec![], false, ChainError::Empty),
            (vec![(A, 0, W), (A, 0, W)], true, ChainError::Empty),
        ];
        for (descs, writable, want) in cases {
            assert_eq!(
                buffers_of(&descs, writable).unwrap_err(),
                want,
                "{descs:x?}"
            );
        }
        let long = vec![(A, 1, W); usize::from(QUEUE_SIZE) + 1];
        assert_eq!(
            buffers_of(&long, true).unwrap_err(),
            SgError::TooManyDescriptors(QUEUE_SIZE.into()).into()
        );
    }

    #[test]
    fn read_all_replaces_the_output() {
        let mem = mem();
        let bufs = buffers_of(&[(A, 3, W), (A + 0x100, 4, W)], true).unwrap();
        assert_eq!(bufs.write_from(&mem, b"abcdefghij").unwrap(), 7);
        assert_eq!(bufs.write_from(&mem, b"XY").unwrap(), 2);
        let mut out = b"stale contents".to_vec();
        read_all(&bufs, &mem, &mut out).unwrap();
        assert_eq!(out, b"XYcdefg");
    }
}
