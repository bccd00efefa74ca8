//! Puts a kernel, initrd, command line and the boot tables into guest memory and says where
//! the vCPUs start.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use rvmm_firmware::acpi::{write_acpi_tables, AcpiConfig, AcpiError};
use rvmm_firmware::boot_params::{write_boot_params, BootParamsConfig};
use rvmm_firmware::{gdt, layout, mptable, paging};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::kernel_image::{self, KernelFormat};
use crate::vstate::vcpu::BootState;

/// The 64-bit entry point of a bzImage's protected-mode kernel sits this far into it.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {}", .path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: crate::kernel_image::KernelImageError,
    },
    #[error("kernel {}: cannot load it", .path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("initrd {} ({size} bytes) does not fit in guest memory", .path.display())]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest memory")]
    WriteCmdline(#[source] loader::Error),
    #[error("boot parameters")]
    BootParams(#[source] rvmm_firmware::boot_params::BootParamsError),
    #[error("MP table")]
    Mptable(#[source] rvmm_firmware::mptable::MptableError),
    #[error("ACPI tables")]
    Acpi(#[source] AcpiError),
    #[error("boot GDT")]
    Gdt(#[source] rvmm_firmware::gdt::GdtError),
    #[error("boot page tables")]
    Paging(#[source] rvmm_firmware::paging::PagingError),
}

/// What to boot and how to describe the machine.
pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u8,
    pub mem_size: u64,
    /// ACPI tables to write, if any. The MP table is written either way: Linux prefers the
    /// MADT when it finds one, and kernels without ACPI (or booted with `acpi=off`) still
    /// find their CPUs.
    pub acpi: Option<AcpiConfig<'a>>,
}

/// Loads everything into `mem` and returns the vCPUs' boot state.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<BootState, BootError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootError::Read { path, source }
    };
    let mut kernel = File::open(cfg.kernel).map_err(read_err(cfg.kernel))?;
    let format = kernel_image::inspect(&mut kernel).map_err(|source| BootError::Image {
        path: cfg.kernel.to_path_buf(),
        source,
    })?;
    let loaded = load_kernel(mem, &mut kernel, &format).map_err(|source| BootError::Load {
        path: cfg.kernel.to_path_buf(),
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load.0,
        KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };

    let initrd = match cfg.initrd {
        Some(path) => Some(load_initrd(mem, path, GuestAddress(loaded.kernel_end))?),
        None => None,
    };

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_LEN).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(cfg.cmdline)
        .map_err(BootError::Cmdline)?;
    let cmdline_addr = GuestAddress(layout::CMDLINE_ADDR);
    loader::load_cmdline(mem, cmdline_addr, &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    mptable::write_mptable(mem, cfg.vcpus).map_err(BootError::Mptable)?;
    let acpi_rsdp = match &cfg.acpi {
        Some(acpi) => Some(write_acpi_tables(mem, acpi).map_err(BootError::Acpi)?),
        None => None,
    };
    let params = BootParamsConfig {
        cmdline_addr,
        cmdline_size,
        initrd,
        setup_header: loaded.setup_header,
        mem_size: cfg.mem_size,
        acpi_rsdp,
    };
    write_boot_params(mem, &params).map_err(BootError::BootParams)?;
    let segments = gdt::write_boot_gdt(mem).map_err(BootError::Gdt)?;
    let cr3 = paging::write_identity_page_tables(mem).map_err(BootError::Paging)?;
    Ok(BootState {
        entry,
        stack: layout::BOOT_STACK_POINTER,
        zero_page: layout::ZERO_PAGE_ADDR,
        cr3,
        segments,
        legacy_pic: cfg.acpi.is_none(),
    })
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    format: &KernelFormat,
) -> Result<KernelLoaderResult, loader::Error> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match format {
        KernelFormat::Elf => Elf::load(mem, None, kernel, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, kernel, himem),
    }
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<(GuestAddress, usize), BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let addr = layout::initrd_addr(mem, kernel_end, len).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(addr, &mut file, len)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn file_with(bytes: &[u8]) -> (TempFile, File) {
        let t = TempFile::new().unwrap();
        std::fs::write(t.as_path(), bytes).unwrap();
        let f = File::open(t.as_path()).unwrap();
        (t, f)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn refuses_garbage_kernels() {
        let (t, _) = file_with(&[0x42; 4096]);
        let cfg = BootConfig {
            kernel: t.as_path(),
            initrd: None,
            cmdline: "console=ttyS0",
            vcpus: 1,
            mem_size: 64 << 20,
            acpi: None,
        };
        let err = load(&mem(), &cfg).unwrap_err();
        assert!(matches!(err, BootError::Image { .. }), "{err}");
        // An ELF header that is not an x86-64 kernel is refused before loading.
        let (t, _) = file_with(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
        let cfg = BootConfig {
            kernel: t.as_path(),
            ..cfg
        };
        assert!(matches!(
            load(&mem(), &cfg).unwrap_err(),
            BootError::Image { .. }
        ));
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let (t, _) = file_with(&vec![0u8; 65 << 20]);
        let err = load_initrd(&mem(), t.as_path(), GuestAddress(0x200_0000)).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }
}
