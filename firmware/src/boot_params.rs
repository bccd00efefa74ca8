//! The Linux x86 "zero page" (`struct boot_params`) for the 64-bit boot protocol.
//!
//! See Documentation/arch/x86/boot.rst in the kernel tree: the loader copies the setup
//! header out of a bzImage (if it has one), fills in the fields the protocol marks as
//! "write", adds the e820 memory map, and points RSI at the page when jumping to the
//! 64-bit entry point.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error as ConfiguratorError};
pub use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::e820::{e820_entries, E820Kind};
use crate::layout::{CMDLINE_MAX_LEN, ZERO_PAGE_ADDR};

/// `boot_flag` value every setup header carries.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS" in little endian.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment to advertise when the kernel did not say (an ELF vmlinux has no header).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// What goes into the zero page.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BootParamsConfig {
    /// Where the command line was written.
    pub cmdline_addr: GuestAddress,
    /// Command line length including its terminating NUL.
    pub cmdline_size: usize,
    /// Where the initrd was loaded and its size, if there is one.
    pub initrd: Option<(GuestAddress, usize)>,
    /// The setup header of a bzImage, as returned by its loader; `None` for an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// Guest RAM size; the e820 map is derived from it via [`crate::layout::ram_regions`].
    pub mem_size: u64,
    /// Where the ACPI RSDP is, when there are ACPI tables (Linux would also find it by
    /// scanning the BIOS area, but the zero page is the boot protocol's direct way).
    pub acpi_rsdp: Option<GuestAddress>,
}

/// Errors from writing the zero page.
#[derive(Debug, Error)]
pub enum BootParamsError {
    /// The size must at least cover the terminating NUL.
    #[error("command line size is zero (it must include the terminating NUL)")]
    CmdlineEmpty,
    /// The command line is longer than the VMM's area or the kernel's limit.
    #[error("command line of {size} bytes exceeds the maximum of {max}")]
    CmdlineTooLong {
        /// Size including the NUL.
        size: usize,
        /// Maximum size including the NUL.
        max: usize,
    },
    /// The command line does not lie in guest memory.
    #[error("command line at {addr:#x} ({size} bytes) is outside guest memory")]
    CmdlineOutsideMemory {
        /// Start address.
        addr: u64,
        /// Size in bytes.
        size: usize,
    },
    /// A zero-length initrd reads as "no initrd" to the kernel; leave it out instead.
    #[error("initrd is empty")]
    InitrdEmpty,
    /// The initrd does not lie in guest memory.
    #[error("initrd at {addr:#x} ({size} bytes) is outside guest memory")]
    InitrdOutsideMemory {
        /// Start address.
        addr: u64,
        /// Size in bytes.
        size: usize,
    },
    /// The initrd ends above the kernel's `initrd_addr_max`.
    #[error("initrd ends at {last:#x}, above the kernel's limit {max:#x}")]
    InitrdAboveMax {
        /// Last byte of the initrd.
        last: u64,
        /// `initrd_addr_max` from the setup header.
        max: u32,
    },
    /// `mem_size` describes RAM that the guest memory does not back.
    #[error("RAM at {addr:#x} ({size:#x} bytes) is not backed by guest memory")]
    RamNotBacked {
        /// Start address.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The zero page has a fixed-size e820 table.
    #[error("{0} e820 entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed (usually: guest memory is too small).
    #[error("failed to write the zero page")]
    Write(#[source] ConfiguratorError),
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cfg: &BootParamsConfig,
) -> Result<(), BootParamsError> {
    let mut params = boot_params {
        hdr: build_setup_header(mem, cfg)?,
        ..Default::default()
    };
    if let Some((addr, size)) = cfg.initrd {
        params.ext_ramdisk_image = high32(addr.0);
        params.ext_ramdisk_size = high32(size as u64);
    }
    params.ext_cmd_line_ptr = high32(cfg.cmdline_addr.0);
    params.acpi_rsdp_addr = cfg.acpi_rsdp.map_or(0, |addr| addr.0);
    fill_e820(&mut params, mem, cfg.mem_size)?;

    let page = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&page, mem)
        .map_err(BootParamsError::Write)
}

/// The setup header: the kernel's own (if any) with the loader's fields filled in.
fn build_setup_header(
    mem: &GuestMemoryMmap,
    cfg: &BootParamsConfig,
) -> Result<setup_header, BootParamsError> {
    let mut hdr = cfg.setup_header.unwrap_or_default();
    check_cmdline(mem, cfg, &hdr)?;
    if let Some((addr, size)) = cfg.initrd {
        check_initrd(mem, addr, size, &hdr)?;
        hdr.ramdisk_image = low32(addr.0);
        hdr.ramdisk_size = low32(size as u64);
    }
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = low32(cfg.cmdline_addr.0);
    // The protocol defines this field as the kernel's limit, but Linux never reads it back;
    // like other VMMs we record the actual length, which is handy when debugging a guest.
    hdr.cmdline_size = cfg.cmdline_size as u32;
    // The kernel sits at HIMEM_START, not in low memory.
    hdr.loadflags |= LOADED_HIGH;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    Ok(hdr)
}

fn check_cmdline(
    mem: &GuestMemoryMmap,
    cfg: &BootParamsConfig,
    hdr: &setup_header,
) -> Result<(), BootParamsError> {
    let size = cfg.cmdline_size;
    if size == 0 {
        return Err(BootParamsError::CmdlineEmpty);
    }
    // A kernel's `cmdline_size` excludes the NUL; 0 means the header predates the field.
    let kernel_max = match hdr.cmdline_size {
        0 => usize::MAX,
        n => (n as usize).saturating_add(1),
    };
    let max = CMDLINE_MAX_LEN.min(kernel_max);
    if size > max {
        return Err(BootParamsError::CmdlineTooLong { size, max });
    }
    if !mem.check_range(cfg.cmdline_addr, size) {
        return Err(BootParamsError::CmdlineOutsideMemory {
            addr: cfg.cmdline_addr.0,
            size,
        });
    }
    Ok(())
}

fn check_initrd(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    size: usize,
    hdr: &setup_header,
) -> Result<(), BootParamsError> {
    if size == 0 {
        return Err(BootParamsError::InitrdEmpty);
    }
    if !mem.check_range(addr, size) {
        return Err(BootParamsError::InitrdOutsideMemory { addr: addr.0, size });
    }
    // In guest memory, so this cannot overflow.
    let last = addr.0 + (size as u64 - 1);
    let max = hdr.initrd_addr_max;
    // 0 means the kernel gave no limit (ELF kernels, or a hand-built header).
    if max != 0 && last > u64::from(max) {
        return Err(BootParamsError::InitrdAboveMax { last, max });
    }
    Ok(())
}

fn fill_e820(
    params: &mut boot_params,
    mem: &GuestMemoryMmap,
    mem_size: u64,
) -> Result<(), BootParamsError> {
    let entries = e820_entries(mem_size);
    if entries.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries(entries.len()));
    }
    // Telling the guest about RAM that is not there would only fail much later, inside it.
    for e in entries.iter().filter(|e| e.kind == E820Kind::Ram) {
        let backed = usize::try_from(e.size)
            .map(|len| mem.check_range(GuestAddress(e.addr), len))
            .unwrap_or(false);
        if !backed {
            return Err(BootParamsError::RamNotBacked {
                addr: e.addr,
                size: e.size,
            });
        }
    }
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, e) in table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_table = table;
    // Bounded by E820_MAX_ENTRIES_ZEROPAGE (128) above.
    params.e820_entries = entries.len() as u8;
    Ok(())
}

fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn high32(v: u64) -> u32 {
    (v >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_regions, CMDLINE_ADDR, EBDA_START, HIMEM_START};
    use linux_loader::loader::bootparam::KEEP_SEGMENTS;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const MEM_SIZE: u64 = 64 * MIB;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    fn cfg() -> BootParamsConfig {
        BootParamsConfig {
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 32,
            initrd: None,
            setup_header: None,
            mem_size: MEM_SIZE,
            acpi_rsdp: None,
        }
    }

    fn read_back(m: &GuestMemoryMmap) -> boot_params {
        m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    #[test]
    fn protocol_fields_are_set() {
        let m = mem(MEM_SIZE);
        write_boot_params(&m, &cfg()).unwrap();
        let p = read_back(&m);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ p.hdr.cmdline_size }, 32);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn rsdp_address_is_passed() {
        let m = mem(MEM_SIZE);
        let cfg = BootParamsConfig {
            acpi_rsdp: Some(GuestAddress(crate::layout::ACPI_START)),
            ..cfg()
        };
        write_boot_params(&m, &cfg).unwrap();
        assert_eq!({ read_back(&m).acpi_rsdp_addr }, crate::layout::ACPI_START);
    }

    #[test]
    fn e820_table_matches_e820_entries() {
        let m = mem(MEM_SIZE);
        write_boot_params(&m, &cfg()).unwrap();
        let p = read_back(&m);
        let expected = e820_entries(MEM_SIZE);
        assert_eq!(p.e820_entries as usize, expected.len());
        for (raw, e) in p.e820_table.iter().zip(&expected) {
            assert_eq!({ raw.addr }, e.addr);
            assert_eq!({ raw.size }, e.size);
            assert_eq!({ raw.r#type }, e.kind as u32);
        }
        let first = p.e820_table[0];
        assert_eq!(({ first.addr }, { first.size }), (0, EBDA_START));
        let last = p.e820_table[2];
        assert_eq!({ last.addr }, HIMEM_START);
        assert_eq!({ last.addr } + { last.size }, MEM_SIZE);
        let unused = p.e820_table[expected.len()];
        assert_eq!({ unused.size }, 0);
    }

    #[test]
    fn initrd_is_recorded() {
        let m = mem(MEM_SIZE);
        let c = BootParamsConfig {
            initrd: Some((GuestAddress(0x300_0000), 0x12345)),
            ..cfg()
        };
        write_boot_params(&m, &c).unwrap();
        let p = read_back(&m);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.ext_ramdisk_image }, 0);
        assert_eq!({ p.ext_ramdisk_size }, 0);
    }

    #[test]
    fn kernel_header_is_kept_and_completed() {
        let m = mem(MEM_SIZE);
        let kernel_hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            loadflags: KEEP_SEGMENTS,
            ..Default::default()
        };
        let c = BootParamsConfig {
            setup_header: Some(kernel_hdr),
            ..cfg()
        };
        write_boot_params(&m, &c).unwrap();
        let p = read_back(&m);
        assert_eq!(p.hdr.setup_sects, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!(p.hdr.loadflags, KEEP_SEGMENTS | LOADED_HIGH);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.hdr.type_of_loader, KERNEL_LOADER_OTHER);
    }

    #[test]
    fn stale_zero_page_contents_are_overwritten() {
        let m = mem(MEM_SIZE);
        m.write_slice(&[0xaa; 4096], GuestAddress(ZERO_PAGE_ADDR))
            .unwrap();
        write_boot_params(&m, &cfg()).unwrap();
        let p = read_back(&m);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn cmdline_errors() {
        let m = mem(MEM_SIZE);
        let zero = BootParamsConfig {
            cmdline_size: 0,
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &zero),
            Err(BootParamsError::CmdlineEmpty)
        ));
        let long = BootParamsConfig {
            cmdline_size: CMDLINE_MAX_LEN + 1,
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &long),
            Err(BootParamsError::CmdlineTooLong {
                max: CMDLINE_MAX_LEN,
                ..
            })
        ));
        let outside = BootParamsConfig {
            cmdline_addr: GuestAddress(MEM_SIZE - 16),
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &outside),
            Err(BootParamsError::CmdlineOutsideMemory { .. })
        ));
    }

    #[test]
    fn cmdline_limited_by_the_kernel() {
        let m = mem(MEM_SIZE);
        let hdr = setup_header {
            cmdline_size: 255,
            ..Default::default()
        };
        let fits = BootParamsConfig {
            cmdline_size: 256,
            setup_header: Some(hdr),
            ..cfg()
        };
        assert!(write_boot_params(&m, &fits).is_ok());
        let too_long = BootParamsConfig {
            cmdline_size: 257,
            ..fits
        };
        assert!(matches!(
            write_boot_params(&m, &too_long),
            Err(BootParamsError::CmdlineTooLong {
                size: 257,
                max: 256
            })
        ));
    }

    #[test]
    fn initrd_errors() {
        let m = mem(MEM_SIZE);
        let outside = BootParamsConfig {
            initrd: Some((GuestAddress(MEM_SIZE - 0x1000), 0x2000)),
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &outside),
            Err(BootParamsError::InitrdOutsideMemory { .. })
        ));
        let empty = BootParamsConfig {
            initrd: Some((GuestAddress(0x200_0000), 0)),
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &empty),
            Err(BootParamsError::InitrdEmpty)
        ));
        let hdr = setup_header {
            initrd_addr_max: 0x1ff_ffff,
            ..Default::default()
        };
        let too_high = BootParamsConfig {
            initrd: Some((GuestAddress(0x1ff_f000), 0x2000)),
            setup_header: Some(hdr),
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &too_high),
            Err(BootParamsError::InitrdAboveMax {
                last: 0x200_0fff,
                max: 0x1ff_ffff
            })
        ));
    }

    #[test]
    fn mem_size_larger_than_guest_memory_is_an_error() {
        let m = mem(MEM_SIZE);
        let c = BootParamsConfig {
            mem_size: 2 * MEM_SIZE,
            ..cfg()
        };
        assert!(matches!(
            write_boot_params(&m, &c),
            Err(BootParamsError::RamNotBacked {
                addr: HIMEM_START,
                ..
            })
        ));
    }

    #[test]
    fn guest_memory_too_small_for_the_zero_page() {
        // Covers the e820 RAM and the command line but ends inside the zero page.
        let size = ZERO_PAGE_ADDR + 0x800;
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let c = BootParamsConfig {
            cmdline_addr: GuestAddress(0x1000),
            mem_size: size,
            ..cfg()
        };
        let err = write_boot_params(&m, &c).unwrap_err();
        assert!(matches!(err, BootParamsError::Write(_)));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn address_splitting() {
        assert_eq!(low32(0x1_2345_6789), 0x2345_6789);
        assert_eq!(high32(0x1_2345_6789), 1);
    }
}
