//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO hole.

use rvmm_firmware::layout;
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

pub fn create_guest_memory(bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&layout::ram_regions(bytes)).map_err(|source| MemoryError::Map {
        mib: bytes >> 20,
        source,
    })
}
