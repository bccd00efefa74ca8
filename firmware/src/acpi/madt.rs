//! The MADT: local APICs, the IO-APIC and how ISA interrupts reach it.
//!
//! It describes exactly what the MP table ([`crate::mptable`]) does, so a guest sees the same
//! machine with or without ACPI: APIC ids `0..num_cpus`, the IO-APIC with id `num_cpus` and
//! GSI base 0, ISA IRQ n on pin n with bus-conforming polarity and trigger (KVM's default GSI
//! routing), and NMIs on LINT1 of every CPU.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml_as_bytes, Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::common::{aml_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{ioapic_id, APIC_ADDR, COM1_IRQ, IOAPIC_ADDR, PIT_IRQ};

const ENTRY_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const ENTRY_LOCAL_APIC_NMI: u8 = 4;
const ISA_BUS: u8 = 0;
/// MPS INTI flags: polarity and trigger mode conform to the bus (edge, active high for ISA).
const INTI_CONFORMING: u16 = 0;
const ALL_PROCESSORS: u8 = 0xff;
const LINT1: u8 = 1;
/// The ISA interrupts a guest's legacy devices raise, stated explicitly as in the MP table.
const ISA_IRQS: [u32; 2] = [PIT_IRQ, COM1_IRQ];

/// Interrupt Source Override (MADT entry type 2); acpi_tables has no type for it.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    entry_type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

aml_as_bytes!(InterruptSourceOverride);

impl InterruptSourceOverride {
    /// ISA `irq` arrives on the IO-APIC pin of the same number.
    fn identity(irq: u8) -> Self {
        Self {
            entry_type: ENTRY_INTERRUPT_SOURCE_OVERRIDE,
            length: std::mem::size_of::<Self>() as u8,
            bus: ISA_BUS,
            source: irq,
            gsi: u32::from(irq).into(),
            flags: INTI_CONFORMING.into(),
        }
    }
}

/// Local APIC NMI (MADT entry type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    entry_type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

aml_as_bytes!(LocalApicNmi);

/// The MADT for `num_cpus` vCPUs (1..=[`crate::mptable::MAX_CPUS`], checked by the caller).
pub fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id(num_cpus), IOAPIC_ADDR as u32, 0));
    for irq in ISA_IRQS {
        madt.add_structure(InterruptSourceOverride::identity(irq as u8));
    }
    madt.add_structure(LocalApicNmi {
        entry_type: ENTRY_LOCAL_APIC_NMI,
        length: std::mem::size_of::<LocalApicNmi>() as u8,
        processor_uid: ALL_PROCESSORS,
        flags: INTI_CONFORMING.into(),
        lint: LINT1,
    });
    aml_bytes(&madt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::check_header;

    /// Splits the entries after the 44-byte header into (type, bytes) pairs.
    fn entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &madt[44..];
        while !rest.is_empty() {
            let len = usize::from(rest[1]);
            assert!(len >= 2 && len <= rest.len(), "entry length {len}");
            out.push((rest[0], &rest[..len]));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn one_enabled_local_apic_per_vcpu() {
        for num_cpus in [1u8, 2, 4, 64, 254] {
            let madt = madt(num_cpus);
            check_header(&madt, b"APIC");
            assert_eq!(&madt[36..40], &(APIC_ADDR as u32).to_le_bytes());
            let entries = entries(&madt);
            let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
            assert_eq!(lapics.len(), usize::from(num_cpus));
            for (cpu, (_, e)) in lapics.iter().enumerate() {
                // UID, APIC id, flags = enabled.
                assert_eq!(e, &&[0, 8, cpu as u8, cpu as u8, 1, 0, 0, 0][..]);
            }
            assert_eq!(entries.len(), usize::from(num_cpus) + 4);
        }
    }

    #[test]
    fn ioapic_overrides_and_nmi_match_the_mp_table() {
        let madt = madt(3);
        let entries = entries(&madt);
        let ioapic = entries.iter().find(|(t, _)| *t == 1).unwrap().1;
        let mut want = vec![1, 12, 3, 0];
        want.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(ioapic, &want[..]);

        let overrides: Vec<_> = entries.iter().filter(|(t, _)| *t == 2).collect();
        assert_eq!(overrides.len(), 2);
        for ((_, e), irq) in overrides.iter().zip([0u8, 4]) {
            assert_eq!(e, &&[2, 10, 0, irq, irq, 0, 0, 0, 0, 0][..]);
        }
        let nmi = entries.iter().find(|(t, _)| *t == 4).unwrap().1;
        assert_eq!(nmi, &[4, 6, 0xff, 0, 0, 1]);
    }
}
