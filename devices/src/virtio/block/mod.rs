//! virtio-blk backed by a host file or block device.
//!
//! `request` turns a descriptor chain into a validated [`request::Request`], `handler` executes
//! requests against the image and drains the queue, `device` is the [`crate::virtio::VirtioDevice`]
//! and event-loop glue.

mod device;
pub mod handler;
pub mod request;
mod uring;

pub use device::{Block, BlockConfig, BlockError};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per virtio-blk sector, whatever the image's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments per request: the queue size minus the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single data segment the driver should build (1 MiB).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most ranges in one DISCARD or WRITE_ZEROES request.
pub const MAX_RANGES: u32 = 32;
/// Most sectors in one DISCARD or WRITE_ZEROES range (32 MiB): bounds the event loop's time in
/// one request when zeroes have to be written out.
pub const MAX_RANGE_SECTORS: u32 = 1 << 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

#[cfg(test)]
pub(crate) mod test_utils {
    use std::io::Write;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    pub(crate) const MEM_SIZE: usize = 0x20_0000;
    /// Where tests put request headers, data and status bytes (queues live below 0x1000).
    pub(crate) const HDR: u64 = 0x1000;
    pub(crate) const DATA: u64 = 0x2000;
    pub(crate) const STATUS: u64 = 0x1f_0000;
    pub(crate) const R: u16 = 0;
    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;

    /// (address, length, flags) of each descriptor in a chain.
    pub(crate) type Descs = Vec<(u64, u32, u16)>;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A chained descriptor as virtio-queue yields it (NEXT set on all but the last).
    pub(crate) fn chain(descs: &[(u64, u32, u16)]) -> Vec<Descriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() {
                    VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                Descriptor::new(addr, len, flags | next, 0)
            })
            .collect()
    }

    /// The same chain in the descriptor table's raw form, for MockSplitQueue, occupying table
    /// entries from `first` on.
    pub(crate) fn raw_chain(descs: &[(u64, u32, u16)], first: u16) -> Vec<RawDescriptor> {
        chain(descs)
            .into_iter()
            .zip(first + 1..)
            .map(|(d, next)| {
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), d.flags(), next))
            })
            .collect()
    }

    pub(crate) fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        mem.write_obj(request_type, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// A `struct virtio_blk_discard_write_zeroes` at `addr`.
    pub(crate) fn range(mem: &GuestMemoryMmap, addr: u64, sector: u64, count: u32, flags: u32) {
        mem.write_obj(sector, GuestAddress(addr)).unwrap();
        mem.write_obj(count, GuestAddress(addr + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(addr + 12)).unwrap();
    }

    /// A disk image whose byte `i` is `i * 7 % 251` (no 512-byte period).
    pub(crate) fn image(sectors: usize) -> TempFile {
        let file = TempFile::new().unwrap();
        file.as_file()
            .write_all(&pattern(0, sectors * 512))
            .unwrap();
        file
    }

    pub(crate) fn pattern(start: usize, len: usize) -> Vec<u8> {
        (start..start + len).map(|i| (i * 7 % 251) as u8).collect()
    }
}
