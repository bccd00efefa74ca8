//! Guest RAM laid out around the 32-bit MMIO hole: anonymous mappings, or one memfd mapped
//! shared when a vhost-user backend must map the same memory.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use rvmm_firmware::layout;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Where the host says how much RAM and swap it has.
const MEMINFO: &str = "/proc/meminfo";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory {mib} MiB is more than the host's RAM and swap ({host_mib} MiB)")]
    MoreThanHost { mib: u64, host_mib: u64 },
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create the shared guest memory file")]
    Memfd(#[source] std::io::Error),
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Private anonymous mappings.
    Anonymous,
    /// One memfd, mapped MAP_SHARED, whose fd another process (a vhost-user backend) can map.
    Shared,
}

/// Maps guest RAM, refusing up front a guest that could never have all of it: the mappings
/// are lazy, so the failure would otherwise come later, as the host's OOM killer.
pub fn create_guest_memory(
    bytes: u64,
    backing: MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(host) = std::fs::read_to_string(MEMINFO)
        .ok()
        .and_then(|m| host_memory(&m))
    {
        if bytes > host {
            return Err(MemoryError::MoreThanHost {
                mib: bytes >> 20,
                host_mib: host >> 20,
            });
        }
    }
    let ranges = layout::ram_regions(bytes);
    let mapped = match backing {
        MemoryBacking::Anonymous => GuestMemoryMmap::from_ranges(&ranges),
        MemoryBacking::Shared => GuestMemoryMmap::from_ranges_with_files(memfd_ranges(&ranges)?),
    };
    mapped.map_err(|source| MemoryError::Map {
        mib: bytes >> 20,
        source,
    })
}

/// The ranges backed by consecutive offsets of one memfd as large as all of them.
fn memfd_ranges(
    ranges: &[(GuestAddress, usize)],
) -> Result<Vec<(GuestAddress, usize, Option<FileOffset>)>, MemoryError> {
    const NAME: &CStr = c"rvmm-guest-ram";
    // SAFETY: NAME is a NUL-terminated string; the call only returns a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = std::sync::Arc::new(unsafe { File::from_raw_fd(fd) });
    let total: usize = ranges.iter().map(|&(_, len)| len).sum();
    file.set_len(total as u64).map_err(MemoryError::Memfd)?;
    // The backend maps the same fd: a size that could change under either process would
    // turn guest accesses into SIGBUS.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd this function owns, with integer arguments only.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    let mut offset = 0u64;
    Ok(ranges
        .iter()
        .map(|&(addr, len)| {
            let region = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            region
        })
        .collect())
}

/// MemTotal + SwapTotal in bytes, from the text of /proc/meminfo.
fn host_memory(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((field("MemTotal")? + field("SwapTotal").unwrap_or(0)) << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ram_and_swap() {
        let meminfo = "MemTotal:       24683656 kB\nMemFree:  1 kB\nSwapTotal:   1024 kB\n";
        assert_eq!(host_memory(meminfo), Some((24_683_656 + 1024) << 10));
        assert_eq!(host_memory("MemTotal: 2048 kB\n"), Some(2 << 20));
        assert_eq!(host_memory("nothing"), None);
    }

    #[test]
    fn shared_memory_is_one_memfd_at_consecutive_offsets() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges_with_files(memfd_ranges(&ranges).unwrap()).unwrap();
        let offsets: Vec<_> = mem
            .iter()
            .map(|r| {
                let f = r.file_offset().expect("file-backed");
                (f.start(), f.file().metadata().unwrap().len())
            })
            .collect();
        assert_eq!(offsets, [(0, 3 << 20), (1 << 20, 3 << 20)]);
        // Sealed: its size can no longer change, from this process or the backend's.
        let file = mem.iter().next().unwrap().file_offset().unwrap().file();
        assert!(file.set_len(1 << 20).is_err());
        assert!(file.set_len(4 << 20).is_err());
        let anon = create_guest_memory(1 << 20, MemoryBacking::Anonymous).unwrap();
        assert!(anon.iter().all(|r| r.file_offset().is_none()));
    }
}
