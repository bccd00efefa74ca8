//! The driver's side of a split virtqueue in plain guest memory, shared by the device-model
//! benchmarks: descriptors are written once per slot, and batches of heads are made
//! available and reaped the way a guest driver would.
// Each bench compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// One split ring: a descriptor table, an avail ring and a used ring of `size` entries, laid
/// out at `base`, `base + 0x1000` and `base + 0x2000` (room for up to 256 entries).
pub struct Ring {
    mem: GuestMemoryMmap,
    base: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub const SPAN: u64 = 0x3000;

    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(size <= 256, "the layout has room for 256 entries");
        Self {
            mem: mem.clone(),
            base,
            size,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device's view of the ring, as the transport hands it over.
    pub fn queue(&self) -> Result<Queue, virtio_queue::Error> {
        let mut queue = Queue::new(self.size)?;
        queue.try_set_desc_table_address(GuestAddress(self.base))?;
        queue.try_set_avail_ring_address(GuestAddress(self.avail()))?;
        queue.try_set_used_ring_address(GuestAddress(self.used()))?;
        queue.set_ready(true);
        Ok(queue)
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, desc: Descriptor) -> Result<(), GuestMemoryError> {
        self.mem
            .write_obj(desc, GuestAddress(self.base + 16 * u64::from(index)))
    }

    /// Queues the chain starting at `head`; the device sees it after [`Ring::publish`].
    pub fn push(&mut self, head: u16) -> Result<(), GuestMemoryError> {
        let entry = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(entry))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every pushed chain visible to the device.
    pub fn publish(&self) -> Result<(), GuestMemoryError> {
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
    }

    /// Chains pushed and not yet returned by the device.
    pub fn in_flight(&self) -> Result<u16, GuestMemoryError> {
        let used: u16 = self.mem.read_obj(GuestAddress(self.used() + 2))?;
        Ok(self.avail_idx.wrapping_sub(used))
    }

    /// (head, written length) of every used entry since the last call.
    pub fn reap(&mut self) -> Result<Vec<(u16, u32)>, GuestMemoryError> {
        let used: u16 = self.mem.read_obj(GuestAddress(self.used() + 2))?;
        let mut entries = Vec::new();
        while self.used_seen != used {
            let slot = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot))?;
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4))?;
            entries.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(entries)
    }
}
