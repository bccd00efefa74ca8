//! ACPI tables: how a guest learns about its CPUs, interrupt controllers, virtio-mmio devices,
//! COM1 and how to power itself off, without any command-line hints.
//!
//! The platform is "hardware-reduced" ACPI: no PM timer, GPE or SCI, only a sleep control and
//! status register pair (at [`ACPI_SLEEP_PORT`]) through which the guest enters S5. The tables
//! are RSDP → XSDT → {FADT → DSDT, MADT}, written from [`ACPI_START`] upwards; the RSDP is
//! where Linux scans for it and its address also goes into the zero page.

mod common;
mod dsdt;
mod madt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{ACPI_SLEEP_PORT, ACPI_START, HIMEM_START};
use crate::mptable::MAX_CPUS;

use common::aml_bytes;
pub use common::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID, S5_SLEEP_TYPE};
pub use dsdt::dsdt;
pub use madt::madt;

/// FADT IA-PC boot architecture flags: an i8042 is present (for `reboot=k`), no VGA, no
/// MSI (there is no PCI), no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Tables are placed on 16-byte boundaries (the RSDP must be; the rest follow suit).
const TABLE_ALIGN: u64 = 16;

/// Errors from writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// A guest needs at least the bootstrap processor.
    #[error("the ACPI tables need at least one CPU")]
    NoCpus,
    /// More CPUs than APIC ids (the IO-APIC takes the id after the last CPU).
    #[error("{0} CPUs do not fit in the MADT (maximum {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The tables would run past the reserved area below the kernel.
    #[error("ACPI tables of {0} bytes do not fit below the kernel")]
    TooLarge(u64),
    /// Usually: guest memory does not cover the BIOS area.
    #[error("failed to write the ACPI tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Writes every table from [`ACPI_START`] and returns the RSDP's address (for the zero page).
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(cfg.num_cpus));
    }
    let mut writer = TableWriter {
        mem,
        next: align(ACPI_START + Rsdp::len() as u64),
    };
    let dsdt_addr = writer.write(&dsdt(cfg))?;
    let fadt_addr = writer.write(&fadt(dsdt_addr))?;
    let madt_addr = writer.write(&madt(cfg.num_cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = writer.write(&aml_bytes(&xsdt))?;
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(GuestAddress(ACPI_START))
}

/// The FADT of a hardware-reduced platform whose only fixed hardware is the sleep register
/// pair, both at [`ACPI_SLEEP_PORT`] (reads never report a wake: the VM does not come back).
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch =
        (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT)
            .into();
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    aml_bytes(&fadt.finalize())
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

/// Places tables one after the other, never past the reserved area.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn write(&mut self, table: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next;
        let end = addr + table.len() as u64;
        if end > HIMEM_START {
            return Err(AcpiError::TooLarge(end - ACPI_START));
        }
        self.mem
            .write_slice(table, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
        self.next = align(end);
        Ok(addr)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::e820::{e820_entries, E820Kind};
    use crate::layout::VirtioSlot;

    const MEM_SIZE: u64 = 64 << 20;

    pub(crate) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Checks the standard header of the table at `addr` and returns the whole table.
    pub(crate) fn table_at(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        assert_eq!(&header[0..4], signature);
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        check_header(&table, signature);
        table
    }

    pub(crate) fn check_header(table: &[u8], signature: &[u8; 4]) {
        assert_eq!(&table[0..4], signature);
        assert_eq!(
            u32_at(table, 4) as usize,
            table.len(),
            "{signature:?} length"
        );
        assert_eq!(sum(table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], &OEM_ID);
        assert_eq!(&table[16..24], &OEM_TABLE_ID);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::layout::ram_regions(MEM_SIZE)).unwrap()
    }

    fn cfg(num_cpus: u8, virtio: &[VirtioSlot]) -> AcpiConfig<'_> {
        AcpiConfig {
            num_cpus,
            virtio,
            serial: true,
        }
    }

    /// Follows RSDP → XSDT → FADT → DSDT and XSDT → MADT as a guest would.
    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = mem();
        let slots: Vec<_> = (0..3).filter_map(VirtioSlot::nth).collect();
        let rsdp_addr = write_acpi_tables(&mem, &cfg(2, &slots)).unwrap();
        assert_eq!(rsdp_addr.0, ACPI_START);
        assert_eq!(rsdp_addr.0 % 16, 0);

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36);

        let xsdt = table_at(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = table_at(&mem, u64_at(&xsdt, 36), b"FACP");
        assert_eq!(fadt.len(), 276, "ACPI 6.5 FADT");
        let madt = table_at(&mem, u64_at(&xsdt, 44), b"APIC");
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 2 * 10 + 6);
        let dsdt = table_at(&mem, u64_at(&fadt, 140), b"DSDT");
        assert!(dsdt.len() > 36 + 3 * 40);

        // Everything lies in the range the e820 map reserves, below the kernel.
        let end = [u64_at(&xsdt, 36), u64_at(&xsdt, 44), u64_at(&fadt, 140)]
            .into_iter()
            .zip([fadt.len(), madt.len(), dsdt.len()])
            .map(|(addr, len)| addr + len as u64)
            .max()
            .unwrap();
        assert!(end <= HIMEM_START);
        let reserved = e820_entries(MEM_SIZE)
            .into_iter()
            .find(|e| e.kind == E820Kind::Reserved && e.addr <= ACPI_START)
            .unwrap();
        assert!(reserved.end() >= end, "{reserved:?} vs {end:#x}");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_the_sleep_registers() {
        let fadt = fadt(0x1234_5678);
        check_header(&fadt, b"FACP");
        assert_eq!(u32_at(&fadt, 40), 0, "no 32-bit DSDT pointer");
        assert_eq!(u64_at(&fadt, 140), 0x1234_5678, "X_DSDT");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch, 0b10_1110);
        // SLEEP_CONTROL_REG at 244 and SLEEP_STATUS_REG at 256: one byte in I/O space.
        for offset in [244, 256] {
            assert_eq!(&fadt[offset..offset + 4], &[1, 8, 0, 1]);
            assert_eq!(u64_at(&fadt, offset + 4), u64::from(ACPI_SLEEP_PORT));
        }
    }

    #[test]
    fn every_vcpu_count_and_device_count_fits() {
        let mem = mem();
        let all: Vec<_> = (0..crate::layout::VIRTIO_SLOT_COUNT)
            .filter_map(VirtioSlot::nth)
            .collect();
        for num_cpus in [1, 2, 64, MAX_CPUS] {
            for virtio in [&all[..0], &all[..]] {
                write_acpi_tables(&mem, &cfg(num_cpus, virtio)).unwrap();
            }
        }
    }

    #[test]
    fn refuses_bad_cpu_counts_and_missing_memory() {
        let mem = mem();
        assert!(matches!(
            write_acpi_tables(&mem, &cfg(0, &[])),
            Err(AcpiError::NoCpus)
        ));
        assert!(matches!(
            write_acpi_tables(&mem, &cfg(MAX_CPUS + 1, &[])),
            Err(AcpiError::TooManyCpus(255))
        ));
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            write_acpi_tables(&small, &cfg(1, &[])),
            Err(AcpiError::Write(_))
        ));
    }
}
