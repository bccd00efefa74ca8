//! What every table shares: the header's OEM fields, the description the tables are built
//! from, and AML serialisation.

use acpi_tables::Aml;

use crate::layout::VirtioSlot;

/// OEM id in every table header; Linux prints it when it lists the tables.
pub const OEM_ID: [u8; 6] = *b"RVMM  ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// SLP_TYP of S5 in the DSDT's `_S5_` package; the sleep control register turns a write of it
/// (with SLP_EN) into a power-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig<'a> {
    /// vCPUs, with APIC ids `0..num_cpus` (as in the MP table).
    pub num_cpus: u8,
    /// The virtio-mmio devices, in slot order.
    pub virtio: &'a [VirtioSlot],
    /// Whether COM1 is present.
    pub serial: bool,
}

pub fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}
