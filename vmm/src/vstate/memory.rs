//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO hole.

use rvmm_firmware::layout;
use vm_memory::GuestMemoryMmap;

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
}

/// Maps guest RAM, refusing up front a guest that could never have all of it: the mappings
/// are lazy, so the failure would otherwise come later, as the host's OOM killer.
pub fn create_guest_memory(bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
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
    GuestMemoryMmap::from_ranges(&layout::ram_regions(bytes)).map_err(|source| MemoryError::Map {
        mib: bytes >> 20,
        source,
    })
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
}
