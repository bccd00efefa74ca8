//! The x86_64 guest physical address layout.
//!
//! Everything the VMM places in guest memory before the first instruction runs has a fixed
//! home here, so the pieces written by the other modules (GDT, zero page, page tables, MP
//! table) can never overlap. The layout follows the usual microVM convention: boot structures
//! in the first 640 KiB, the kernel at 1 MiB, and a 1 GiB hole below 4 GiB for MMIO devices,
//! the IO-APIC and the local APIC.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

// Guest sizes are `u64` but `GuestMemoryMmap` regions are sized in `usize`; on a 64-bit host
// the conversion is lossless, which lets `ram_regions` stay infallible.
const _: () = assert!(
    usize::BITS >= u64::BITS,
    "rvmm-firmware needs a 64-bit host"
);

/// Page size used for alignment of everything placed in guest memory.
pub const PAGE_SIZE: u64 = 0x1000;

/// Boot GDT (see [`crate::gdt`]): six 8-byte slots, the last two holding the 16-byte
/// long-mode TSS descriptor.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT, right after the 48-byte GDT.
pub const BOOT_IDT_ADDR: u64 = 0x530;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP/RBP; the stack grows down towards the zero page, away from the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables; the PDPT follows at `PML4_ADDR + 0x1000`, the PD after it.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line length, including the terminating NUL.
pub const CMDLINE_MAX_LEN: usize = 4096;
/// Extended BIOS data area: the last KiB of the 640 KiB of base memory, one of the places
/// Linux scans for the MP floating pointer. Everything from here up to `HIMEM_START` is
/// reported as reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP at the start of the BIOS area (Linux scans 0xE0000-0xFFFFF for
/// it on 16-byte boundaries), the other tables after it. Like the MP table they sit in the
/// range e820 reports as reserved.
pub const ACPI_START: u64 = 0xe_0000;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: [3 GiB, 4 GiB) holds no RAM.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IO-APIC register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;

/// The IO-APIC's APIC id: the first one after the vCPUs' (0..num_cpus).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}
/// Local APIC register window.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// First IO-APIC pin handed out to devices (0-4 are the timer, keyboard, cascade and serial).
pub const IRQ_BASE: u32 = 5;
/// Last IO-APIC pin (the IO-APIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// How many virtio-mmio devices fit: one free IO-APIC pin each (the MMIO window is larger).
pub const VIRTIO_SLOT_COUNT: u32 = IRQ_MAX - IRQ_BASE + 1;
/// ISA interrupt of the PIT (KVM's in-kernel PIT raises GSI 0).
pub const PIT_IRQ: u32 = 0;
/// COM1's I/O ports and ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 registers.
pub const COM1_PORT_COUNT: u16 = 8;
/// COM1's ISA interrupt, IO-APIC pin 4.
pub const COM1_IRQ: u32 = 4;
/// I/O port of the ACPI sleep control and status registers of the hardware-reduced FADT
/// (one byte; the port QEMU's ICH9 uses for its PM block, unused by anything else here).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// I/O port of the pvpanic device (ACPI `QEMU0001`), where QEMU puts it too.
pub const PVPANIC_PORT: u16 = 0x505;

/// Where one virtio-mmio device lives: its register window and IO-APIC pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Start of the device's [`VIRTIO_MMIO_SIZE`] register window.
    pub addr: u64,
    /// IO-APIC pin (GSI) of its interrupt.
    pub irq: u32,
}

impl VirtioSlot {
    /// The `index`-th slot (from 0), if there is one.
    pub fn nth(index: u32) -> Option<Self> {
        (index < VIRTIO_SLOT_COUNT).then(|| VirtioSlot {
            addr: VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
            irq: IRQ_BASE + index,
        })
    }
}

/// Highest address an initrd may end at when the kernel's own limit is unknown. Old kernels
/// set `initrd_addr_max` to 0x37ff_ffff (896 MiB, the old lowmem limit); modern x86_64
/// kernels allow more, so this is safe for every kernel.
pub const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors from placing things in the guest layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A zero-length initrd would be indistinguishable from "no initrd" to the kernel.
    #[error("initrd is empty")]
    EmptyInitrd,
    /// The kernel's load address is not backed by guest memory.
    #[error("guest memory does not cover the kernel load address {HIMEM_START:#x}")]
    NoHighMemory,
    /// There is not enough room between the kernel and the top of usable low memory.
    #[error("initrd of {size} bytes does not fit between {floor:#x} and {limit:#x}")]
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: usize,
        /// Lowest usable address (page-aligned end of the kernel).
        floor: u64,
        /// Highest usable address plus one.
        limit: u64,
    },
}

/// RAM regions for a guest with `mem_size` bytes of memory.
///
/// Memory that would overlap the MMIO hole is moved above 4 GiB instead, so the guest still
/// gets all of it. Zero-sized regions are left out. `mem_size` should be page-aligned (KVM
/// memory slots must be); validating that is the caller's job.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let high = mem_size - low;
    [(0, low), (MMIO_GAP_END, high)]
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect()
}

/// Where to load an initrd of `size` bytes, using the conservative [`INITRD_ADDR_MAX`].
///
/// See [`initrd_addr_below`] to honour the kernel's own `setup_header.initrd_addr_max`.
pub fn initrd_addr(
    mem: &GuestMemoryMmap,
    kernel_end: GuestAddress,
    size: usize,
) -> Result<GuestAddress, LayoutError> {
    initrd_addr_below(mem, kernel_end, size, INITRD_ADDR_MAX)
}

/// Where to load an initrd of `size` bytes so that it ends at or below `addr_max`.
///
/// The initrd goes as high as possible (the kernel decompresses itself upwards from its load
/// address, so the top of low memory is the spot least likely to be in its way), page
/// aligned, inside the memory region that holds the kernel, below the MMIO hole, and above
/// `kernel_end`.
pub fn initrd_addr_below(
    mem: &GuestMemoryMmap,
    kernel_end: GuestAddress,
    size: usize,
    addr_max: u64,
) -> Result<GuestAddress, LayoutError> {
    if size == 0 {
        return Err(LayoutError::EmptyInitrd);
    }
    let region = mem
        .find_region(GuestAddress(HIMEM_START))
        .ok_or(LayoutError::NoHighMemory)?;
    let region_end = region.start_addr().0.saturating_add(region.len());
    let limit = region_end
        .min(MMIO_GAP_START)
        .min(addr_max.saturating_add(1));
    // An end that cannot be page-aligned is past any possible limit, so saturate it.
    let floor = align_up(kernel_end.0.max(HIMEM_START)).unwrap_or(u64::MAX);
    match limit.checked_sub(size as u64).map(align_down) {
        Some(start) if start >= floor => Ok(GuestAddress(start)),
        _ => Err(LayoutError::InitrdDoesNotFit { size, floor, limit }),
    }
}

fn align_down(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

fn align_up(addr: u64) -> Option<u64> {
    addr.checked_add(PAGE_SIZE - 1).map(align_down)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
    }

    #[test]
    fn memory_up_to_the_gap_is_one_region() {
        assert_eq!(
            ram_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START as usize)]
        );
    }

    #[test]
    fn large_memory_is_split_around_the_gap() {
        let regions = ram_regions(6 * GIB);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(MMIO_GAP_END), (3 * GIB) as usize),
            ]
        );
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, 6 * GIB);
    }

    #[test]
    fn just_over_the_gap_start_moves_the_rest_high() {
        let regions = ram_regions(MMIO_GAP_START + PAGE_SIZE);
        assert_eq!(regions[1], (GuestAddress(MMIO_GAP_END), PAGE_SIZE as usize));
    }

    #[test]
    fn no_memory_no_regions() {
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn regions_never_touch_the_gap() {
        for size in [GIB, 3 * GIB, 3 * GIB + 1, 4 * GIB, 64 * GIB] {
            for (start, len) in ram_regions(size) {
                let end = start.0 + len as u64;
                assert!(
                    end <= MMIO_GAP_START || start.0 >= MMIO_GAP_END,
                    "{size:#x}"
                );
            }
        }
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let gdt_end = BOOT_GDT_ADDR + crate::gdt::GDT_SIZE as u64;
        let idt_end = BOOT_IDT_ADDR + crate::gdt::IDT_SIZE as u64;
        let areas = [
            (BOOT_GDT_ADDR, gdt_end),
            (BOOT_IDT_ADDR, idt_end),
            (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + PAGE_SIZE),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER + 1),
            (PML4_ADDR, PML4_ADDR + 3 * PAGE_SIZE),
            (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX_LEN as u64),
            (EBDA_START, ACPI_START),
            (ACPI_START, HIMEM_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        // Device windows sit in the hole.
        for addr in [VIRTIO_MMIO_BASE, IOAPIC_ADDR, APIC_ADDR] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
        }
    }

    #[test]
    fn virtio_slots_are_consecutive_and_bounded() {
        assert_eq!(
            VirtioSlot::nth(0),
            Some(VirtioSlot {
                addr: 0xd000_0000,
                irq: 5
            })
        );
        let last = VirtioSlot::nth(VIRTIO_SLOT_COUNT - 1).unwrap();
        assert_eq!(last.irq, IRQ_MAX);
        assert!(last.addr + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
        assert_eq!(VirtioSlot::nth(VIRTIO_SLOT_COUNT), None);
        const { assert!(COM1_IRQ < IRQ_BASE && PIT_IRQ < IRQ_BASE) };
    }

    #[test]
    fn initrd_goes_to_the_top_of_small_memory() {
        let m = mem(64 * MIB);
        let addr = initrd_addr(&m, GuestAddress(HIMEM_START + 8 * MIB), 0x1234).unwrap();
        assert_eq!(addr.0 % PAGE_SIZE, 0);
        assert_eq!(addr.0, 64 * MIB - 2 * PAGE_SIZE);
        assert!(addr.0 + 0x1234 <= 64 * MIB);
    }

    #[test]
    fn initrd_respects_the_default_maximum() {
        let m = mem(2 * GIB);
        let addr = initrd_addr(&m, GuestAddress(HIMEM_START + 8 * MIB), 4 * MIB as usize).unwrap();
        assert_eq!(addr.0 + 4 * MIB, INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn initrd_below_a_kernel_supplied_maximum() {
        let m = mem(2 * GIB);
        let addr =
            initrd_addr_below(&m, GuestAddress(2 * MIB), 3 * MIB as usize, 0x7fff_ffff).unwrap();
        assert_eq!(addr.0, 2 * GIB - 3 * MIB);
        // A maximum that is not page-aligned minus one still yields an aligned address.
        let addr = initrd_addr_below(&m, GuestAddress(2 * MIB), 100, 0x1000_0800).unwrap();
        assert_eq!(addr.0, 0x1000_0000);
        // No limit at all is fine too.
        assert!(initrd_addr_below(&m, GuestAddress(2 * MIB), 100, u64::MAX).is_ok());
    }

    #[test]
    fn initrd_exactly_filling_the_space_fits() {
        let m = mem(16 * MIB);
        let kernel_end = GuestAddress(8 * MIB);
        let addr = initrd_addr(&m, kernel_end, (8 * MIB) as usize).unwrap();
        assert_eq!(addr, kernel_end);
    }

    #[test]
    fn initrd_too_large_is_an_error() {
        let m = mem(16 * MIB);
        let err = initrd_addr(&m, GuestAddress(8 * MIB), (8 * MIB) as usize + 1).unwrap_err();
        assert_eq!(
            err,
            LayoutError::InitrdDoesNotFit {
                size: (8 * MIB) as usize + 1,
                floor: 8 * MIB,
                limit: 16 * MIB,
            }
        );
        // Bigger than all of memory.
        assert!(initrd_addr(&m, GuestAddress(HIMEM_START), usize::MAX).is_err());
    }

    #[test]
    fn initrd_never_overlaps_an_unaligned_kernel_end() {
        let m = mem(16 * MIB);
        // Room for exactly 8 MiB above the aligned-up kernel end, not above the raw end.
        let kernel_end = GuestAddress(8 * MIB - 1);
        assert_eq!(
            initrd_addr(&m, kernel_end, (8 * MIB) as usize).unwrap().0,
            8 * MIB
        );
        let kernel_end = GuestAddress(8 * MIB + 1);
        assert!(initrd_addr(&m, kernel_end, (8 * MIB) as usize).is_err());
    }

    #[test]
    fn kernel_end_past_memory_is_an_error() {
        let m = mem(16 * MIB);
        assert!(initrd_addr(&m, GuestAddress(32 * MIB), 100).is_err());
        assert!(initrd_addr(&m, GuestAddress(u64::MAX), 100).is_err());
    }

    #[test]
    fn empty_initrd_is_an_error() {
        let m = mem(16 * MIB);
        assert_eq!(
            initrd_addr(&m, GuestAddress(2 * MIB), 0),
            Err(LayoutError::EmptyInitrd)
        );
    }

    #[test]
    fn memory_without_the_kernel_area_is_an_error() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert_eq!(
            initrd_addr(&m, GuestAddress(HIMEM_START), 100),
            Err(LayoutError::NoHighMemory)
        );
    }
}
