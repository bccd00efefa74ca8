//! The BIOS e820 memory map: which guest physical ranges the kernel may use as RAM.

use crate::layout::{ram_regions, EBDA_START, HIMEM_START};

/// Type of an e820 range, with the values the BIOS interface (and Linux) use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Present but not for the OS to allocate (firmware tables, legacy holes).
    Reserved = 2,
}

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    fn new(addr: u64, end: u64, kind: E820Kind) -> Self {
        Self {
            addr,
            size: end - addr,
            kind,
        }
    }

    /// End of the range (exclusive).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The e820 map for a guest with `mem_size` bytes of RAM laid out by [`ram_regions`].
///
/// Base memory below the EBDA is RAM; `[EBDA_START, HIMEM_START)` is reserved because the MP
/// table lives there and the legacy VGA/BIOS area follows it (Linux would reserve that part
/// anyway). The MMIO hole is simply absent, which is how Linux learns it is free for devices.
/// Entries are sorted and never overlap.
pub fn e820_entries(mem_size: u64) -> Vec<E820Entry> {
    let mut entries = Vec::new();
    for (start, len) in ram_regions(mem_size) {
        let start = start.0;
        let end = start + len as u64;
        if start != 0 {
            entries.push(E820Entry::new(start, end, E820Kind::Ram));
            continue;
        }
        // `ram_regions` only ever starts one region at 0: the one holding the legacy areas.
        entries.push(E820Entry::new(0, end.min(EBDA_START), E820Kind::Ram));
        if end > EBDA_START {
            entries.push(E820Entry::new(EBDA_START, HIMEM_START, E820Kind::Reserved));
        }
        if end > HIMEM_START {
            entries.push(E820Entry::new(HIMEM_START, end, E820Kind::Ram));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, end: u64) -> E820Entry {
        E820Entry::new(addr, end, E820Kind::Ram)
    }

    fn reserved_legacy() -> E820Entry {
        E820Entry::new(EBDA_START, HIMEM_START, E820Kind::Reserved)
    }

    #[test]
    fn small_guest() {
        assert_eq!(
            e820_entries(256 * MIB),
            vec![
                ram(0, EBDA_START),
                reserved_legacy(),
                ram(HIMEM_START, 256 * MIB)
            ]
        );
    }

    #[test]
    fn guest_filling_low_memory() {
        let entries = e820_entries(MMIO_GAP_START);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2], ram(HIMEM_START, MMIO_GAP_START));
    }

    #[test]
    fn large_guest_has_ram_above_4g_and_no_gap() {
        let entries = e820_entries(8 * GIB);
        assert_eq!(
            entries,
            vec![
                ram(0, EBDA_START),
                reserved_legacy(),
                ram(HIMEM_START, MMIO_GAP_START),
                ram(MMIO_GAP_END, MMIO_GAP_END + 5 * GIB),
            ]
        );
        let ram_total: u64 = entries
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // All memory but the reserved legacy area is usable.
        assert_eq!(ram_total, 8 * GIB - (HIMEM_START - EBDA_START));
        for e in &entries {
            assert!(e.end() <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [MIB, 2 * MIB, GIB, 3 * GIB, 3 * GIB + 4096, 5 * GIB] {
            let entries = e820_entries(size);
            for pair in entries.windows(2) {
                assert!(pair[0].end() <= pair[1].addr, "{size:#x}: {pair:?}");
            }
            assert!(entries.iter().all(|e| e.size > 0));
        }
    }

    #[test]
    fn tiny_guests() {
        assert!(e820_entries(0).is_empty());
        assert_eq!(e820_entries(0x8000), vec![ram(0, 0x8000)]);
        assert_eq!(
            e820_entries(0xa0000),
            vec![ram(0, EBDA_START), reserved_legacy()]
        );
        assert_eq!(e820_entries(HIMEM_START).len(), 2);
    }

    #[test]
    fn kind_values_match_the_bios_interface() {
        assert_eq!(E820Kind::Ram as u32, 1);
        assert_eq!(E820Kind::Reserved as u32, 2);
    }
}
