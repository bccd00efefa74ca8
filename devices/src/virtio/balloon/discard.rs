//! Giving guest pages back to the host.

use std::io;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::PAGE_SIZE;

/// Why a range was not discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not inside one region of guest memory.
    #[error("range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Range start.
        addr: u64,
        /// Range length.
        len: u64,
    },
    /// The host refused (huge pages, or a seccomp filter without madvise).
    #[error("madvise failed")]
    Madvise(#[source] io::Error),
}

/// Discards the whole pages inside `addr..addr + len` (a partial page at either end is kept);
/// returns the bytes given back.
pub fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<u64, DiscardError> {
    let outside = || DiscardError::OutsideMemory {
        addr: addr.raw_value(),
        len,
    };
    let end = addr.raw_value().checked_add(len).ok_or_else(outside)?;
    let start = addr.raw_value().next_multiple_of(PAGE_SIZE);
    let end = end - end % PAGE_SIZE;
    if end <= start {
        return Ok(0);
    }
    let region = mem.find_region(GuestAddress(start)).ok_or_else(outside)?;
    let offset = start - region.start_addr().raw_value();
    if offset + (end - start) > region.len() {
        return Err(outside());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())?;
    // Pages of a shared (memfd) mapping stay in the file unless removed from it.
    let advice = if region.file_offset().is_some() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // Nothing in the VMM holds references into free guest pages, and both advices leave the
    // mapping in place (reads then see zeros).
    // SAFETY: `host..host + (end - start)` lies inside the region's mapping (checked above).
    let ret = unsafe { libc::madvise(host.cast(), (end - start) as usize, advice) };
    if ret != 0 {
        return Err(DiscardError::Madvise(io::Error::last_os_error()));
    }
    Ok(end - start)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap()
    }

    fn fill(mem: &GuestMemoryMmap) {
        mem.write_slice(&vec![0xa5; MIB as usize], GuestAddress(0))
            .unwrap();
    }

    fn byte(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn whole_pages_read_back_as_zero_and_partial_ones_are_kept() {
        let mem = mem();
        fill(&mem);
        // From the middle of page 1 to the middle of page 4: pages 2 and 3 go.
        let given = discard(&mem, GuestAddress(PAGE_SIZE + 100), 3 * PAGE_SIZE).unwrap();
        assert_eq!(given, 2 * PAGE_SIZE);
        assert_eq!(byte(&mem, 2 * PAGE_SIZE - 1), 0xa5);
        assert_eq!(byte(&mem, 2 * PAGE_SIZE), 0);
        assert_eq!(byte(&mem, 4 * PAGE_SIZE - 1), 0);
        assert_eq!(byte(&mem, 4 * PAGE_SIZE), 0xa5);
        // Less than a page: nothing.
        assert_eq!(discard(&mem, GuestAddress(10), 100).unwrap(), 0);
        assert_eq!(byte(&mem, 10), 0xa5);
    }

    /// Shared RAM: the pages leave the memfd itself (its blocks go), not just this mapping.
    #[test]
    fn shared_pages_leave_the_memfd() {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::MetadataExt;
        use vm_memory::FileOffset;
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(MIB).unwrap();
        let backing = Some(FileOffset::new(file.try_clone().unwrap(), 0));
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MIB as usize, backing)])
                .unwrap();
        fill(&mem);
        let blocks = |f: &std::fs::File| f.metadata().unwrap().blocks();
        let full = blocks(&file);
        assert_eq!(discard(&mem, GuestAddress(0), MIB / 2).unwrap(), MIB / 2);
        assert_eq!(blocks(&file), full / 2);
        assert_eq!(byte(&mem, 0), 0);
        assert_eq!(byte(&mem, MIB / 2), 0xa5);
    }

    #[test]
    fn ranges_outside_memory_are_refused_and_touch_nothing() {
        let mem = mem();
        fill(&mem);
        for (addr, len) in [
            (MIB - PAGE_SIZE, 2 * PAGE_SIZE),
            (2 * MIB, PAGE_SIZE),
            (0, u64::MAX),
        ] {
            assert!(
                matches!(
                    discard(&mem, GuestAddress(addr), len),
                    Err(DiscardError::OutsideMemory { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
        assert_eq!(byte(&mem, MIB - 1), 0xa5);
    }
}
