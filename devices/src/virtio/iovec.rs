//! Guest buffers as host `iovec`s, so the kernel moves data straight into and out of guest
//! memory (preadv/pwritev and io_uring for disks, writev for TAPs) with no bounce buffer.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

/// A list of host buffers kept from one use to the next, by a device that may move between
/// threads.
#[derive(Debug, Default)]
pub(crate) struct IovecList(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers only go to the kernel and are never dereferenced here; guest memory may
// be accessed from any thread.
unsafe impl Send for IovecList {}

/// Appends the host addresses of the guest buffers `spans` (start, length) to `out`; a buffer
/// that spans two memory regions gives two entries.
pub(crate) fn guest_iovecs(
    mem: &GuestMemoryMmap,
    spans: impl Iterator<Item = (GuestAddress, usize)>,
    out: &mut Vec<libc::iovec>,
) -> Result<(), GuestMemoryError> {
    for (addr, len) in spans {
        for slice in mem.get_slices(addr, len) {
            let slice = slice?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Drops the first `n` bytes from a list of buffers.
pub(crate) fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let full = iovecs
        .iter()
        .take_while(|iov| {
            let whole = iov.iov_len <= n;
            if whole {
                n -= iov.iov_len;
            }
            whole
        })
        .count();
    iovecs.drain(..full);
    if let Some(first) = iovecs.first_mut() {
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
        first.iov_len -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    fn spans(iovecs: &[libc::iovec]) -> Vec<(usize, usize)> {
        iovecs
            .iter()
            .map(|i| (i.iov_base as usize, i.iov_len))
            .collect()
    }

    #[test]
    fn advance_drops_whole_and_partial_buffers() {
        let mut v = vec![iov(0x1000, 512), iov(0x3000, 1024)];
        advance(&mut v, 512);
        assert_eq!(spans(&v), [(0x3000, 1024)]);
        advance(&mut v, 24);
        assert_eq!(spans(&v), [(0x3018, 1000)]);
        advance(&mut v, 1000);
        assert!(v.is_empty());
    }

    #[test]
    fn a_segment_across_two_regions_gives_two_buffers() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let spans = [(GuestAddress(0xe00), 0x400), (GuestAddress(0x10), 0x10)];
        let mut v = Vec::new();
        guest_iovecs(&mem, spans.into_iter(), &mut v).unwrap();
        let lens: Vec<usize> = v.iter().map(|i| i.iov_len).collect();
        assert_eq!(lens, [0x200, 0x200, 0x10]);
        let outside = [(GuestAddress(0x1f00), 0x200)];
        assert!(guest_iovecs(&mem, outside.into_iter(), &mut v).is_err());
    }
}
