//! Boot page tables: long mode cannot be entered without paging, so the vCPU starts on an
//! identity map of the first GiB, which covers everything the 64-bit boot protocol requires
//! to be mapped (the kernel at 1 MiB, the zero page, the command line). The kernel replaces
//! these tables with its own early in boot.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{PAGE_SIZE, PML4_ADDR};

/// Page-directory-pointer table, right after the PML4.
pub const PDPT_ADDR: u64 = PML4_ADDR + PAGE_SIZE;
/// Page directory, right after the PDPT.
pub const PD_ADDR: u64 = PDPT_ADDR + PAGE_SIZE;
/// Bytes identity-mapped by the boot page tables.
pub const IDENTITY_MAPPED_SIZE: u64 = ENTRIES_PER_TABLE as u64 * LARGE_PAGE_SIZE;

/// Entries in every level of a 4-level x86_64 page table.
const ENTRIES_PER_TABLE: usize = 512;
/// Size of a page mapped by a page-directory entry with PS set.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Entry flag: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Entry flag: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Entry flag (page-directory level): maps a 2 MiB page rather than a page table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;

/// Errors from writing the boot page tables.
#[derive(Debug, Error)]
pub enum PagingError {
    /// Usually: guest memory does not cover the tables.
    #[error("failed to write the boot page tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Identity-maps the first 1 GiB with 2 MiB pages (PML4 at [`PML4_ADDR`], PDPT at
/// [`PDPT_ADDR`], PD at [`PD_ADDR`]); returns the value for CR3.
///
/// Whole tables are written, so stale bytes in guest memory cannot become stray mappings.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, PagingError> {
    let pml4 = table_with_first(PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE);
    let pdpt = table_with_first(PD_ADDR | PTE_PRESENT | PTE_WRITABLE);
    let mut pd = [0u64; ENTRIES_PER_TABLE];
    for (i, entry) in pd.iter_mut().enumerate() {
        *entry = (i as u64 * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
    }
    for (table, addr) in [(pml4, PML4_ADDR), (pdpt, PDPT_ADDR), (pd, PD_ADDR)] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(PagingError::Write)?;
    }
    // PML4_ADDR is page-aligned and below 4 GiB, so it is a valid CR3 with PCD/PWT clear.
    Ok(PML4_ADDR)
}

fn table_with_first(entry: u64) -> [u64; ENTRIES_PER_TABLE] {
    let mut table = [0u64; ENTRIES_PER_TABLE];
    table[0] = entry;
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn entry(m: &GuestMemoryMmap, table: u64, index: u64) -> u64 {
        m.read_obj(GuestAddress(table + index * 8)).unwrap()
    }

    /// Walks the tables like the MMU would, for a 2 MiB-mapped address.
    fn translate(m: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e = entry(m, cr3 & ADDR_MASK, (va >> 39) & 0x1ff);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = entry(m, pml4e & ADDR_MASK, (va >> 30) & 0x1ff);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = entry(m, pdpte & ADDR_MASK, (va >> 21) & 0x1ff);
        if pde & PTE_PRESENT == 0 || pde & PTE_PAGE_SIZE == 0 {
            return None;
        }
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & (LARGE_PAGE_SIZE - 1)))
    }

    #[test]
    fn cr3_points_at_the_pml4() {
        assert_eq!(write_identity_page_tables(&mem()).unwrap(), PML4_ADDR);
    }

    #[test]
    fn upper_levels_point_down() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        assert_eq!(entry(&m, PML4_ADDR, 0), PDPT_ADDR | 0x3);
        assert_eq!(entry(&m, PDPT_ADDR, 0), PD_ADDR | 0x3);
        for i in 1..ENTRIES_PER_TABLE as u64 {
            assert_eq!(entry(&m, PML4_ADDR, i), 0);
            assert_eq!(entry(&m, PDPT_ADDR, i), 0);
        }
    }

    #[test]
    fn page_directory_maps_2mib_pages() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        assert_eq!(entry(&m, PD_ADDR, 0), 0x83);
        assert_eq!(entry(&m, PD_ADDR, 1), 0x20_0083);
        assert_eq!(entry(&m, PD_ADDR, 511), 0x3fe0_0083);
    }

    #[test]
    fn first_gib_is_identity_mapped_and_nothing_else() {
        let m = mem();
        let cr3 = write_identity_page_tables(&m).unwrap();
        for va in [0, 0x7000, 0x10_0000, 0x123_4567, IDENTITY_MAPPED_SIZE - 1] {
            assert_eq!(translate(&m, cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(IDENTITY_MAPPED_SIZE, 1 << 30);
        assert_eq!(translate(&m, cr3, IDENTITY_MAPPED_SIZE), None);
        assert_eq!(translate(&m, cr3, 1 << 39), None);
    }

    #[test]
    fn stale_entries_are_cleared() {
        let m = mem();
        m.write_slice(&[0xff; 0x3000], GuestAddress(PML4_ADDR))
            .unwrap();
        write_identity_page_tables(&m).unwrap();
        assert_eq!(entry(&m, PML4_ADDR, 511), 0);
        assert_eq!(entry(&m, PDPT_ADDR, 1), 0);
    }

    #[test]
    fn memory_too_small_is_an_error() {
        for size in [0x8000, 0xa800, 0xc000 - 8] {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
            assert!(matches!(
                write_identity_page_tables(&m),
                Err(PagingError::Write(_))
            ));
        }
    }
}
