//! The Intel MultiProcessor Specification (1.4) tables: how a guest without ACPI learns
//! about its CPUs, its IO-APIC and how ISA interrupts reach it.
//!
//! The floating pointer sits at [`EBDA_START`], the start of the last KiB of base memory,
//! which is one of the places Linux scans for it; the configuration table follows directly.
//! The whole table stays inside the range the e820 map reports as reserved, so the guest
//! never allocates over it.
//!
//! Interrupt routing mirrors KVM's default GSI routing, which connects GSI n to IO-APIC pin n
//! (and GSIs 0-15 to the PICs as well): every IRQ 0..=23 is declared as an ISA interrupt on
//! the pin of the same number. The PIC reaches the BSP through LINT0 (ExtINT, virtual wire
//! mode) and NMIs arrive on LINT1, as in the spec's default configurations.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{ioapic_id, APIC_ADDR, EBDA_START, HIMEM_START, IOAPIC_ADDR, IRQ_MAX};

/// Most vCPUs the table can describe: APIC ids are 8 bits, 0xff is the broadcast id, and
/// the IO-APIC takes the id after the last CPU.
pub const MAX_CPUS: u8 = 0xfe;

const SPEC_REV_1_4: u8 = 4;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Version register values of KVM's in-kernel local APIC and IO-APIC.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Family 6; Linux only looks at the CPUID it gets from the vCPU itself.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits the spec asks for: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_ENABLED: u8 = 1;

const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus": edge, active high for ISA.
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

const OEM_ID: &[u8; 8] = b"RVMM    ";
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

/// Errors from writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// A guest needs at least the bootstrap processor.
    #[error("the MP table needs at least one CPU")]
    NoCpus,
    /// More CPUs than APIC ids.
    #[error("{0} CPUs do not fit in the MP table (maximum {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The table would not fit in the reserved area below `HIMEM_START`.
    #[error("an MP table of {0} bytes does not fit below the kernel")]
    TooLarge(usize),
    /// Usually: guest memory does not cover the EBDA.
    #[error("failed to write the MP table to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Writes the MP floating pointer and configuration table at [`EBDA_START`], describing
/// `num_cpus` vCPUs with APIC ids `0..num_cpus` (CPU 0 the bootstrap processor) and an
/// IO-APIC with id `num_cpus`.
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = EBDA_START + FLOATING_POINTER_SIZE as u64;
    let table = config_table(num_cpus)?;
    let total = FLOATING_POINTER_SIZE + table.len();
    // The guest must see the whole table as reserved; 254 CPUs need about 5 KiB of 385 KiB.
    if EBDA_START + total as u64 > HIMEM_START {
        return Err(MptableError::TooLarge(total));
    }
    mem.write_slice(
        &floating_pointer(table_addr as u32),
        GuestAddress(EBDA_START),
    )
    .map_err(MptableError::Write)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(MptableError::Write)
}

/// The 16-byte MP floating pointer structure pointing at the table at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_SIZE] {
    let mut fp = [0u8; FLOATING_POINTER_SIZE];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte paragraphs.
    fp[8] = 1;
    fp[9] = SPEC_REV_1_4;
    // Feature bytes stay zero: a configuration table is present, and no IMCR (the PIC is
    // wired through LINT0 in virtual wire mode).
    fp[10] = checksum(&fp);
    fp
}

/// The configuration table: header followed by the base entries, checksum filled in.
fn config_table(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&processor_entry(cpu));
    }
    let mut bus = [ENTRY_BUS, ISA_BUS_ID, 0, 0, 0, 0, 0, 0];
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    let mut ioapic = [
        ENTRY_IOAPIC,
        ioapic_id,
        IOAPIC_VERSION,
        IOAPIC_ENABLED,
        0,
        0,
        0,
        0,
    ];
    ioapic[4..8].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries.extend_from_slice(&ioapic);
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            irq,
            ioapic_id,
            irq,
        ));
    }
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_LOCAL_INTERRUPT,
            kind,
            0,
            ALL_LOCAL_APICS,
            lint,
        ));
    }
    let entry_count = u16::from(num_cpus) + 2 + 2 + IRQ_MAX as u16 + 1;

    // The length field is 16 bits; MAX_CPUS keeps the table near 5 KiB.
    let length = HEADER_SIZE + entries.len();
    let length16 = u16::try_from(length).map_err(|_| MptableError::TooLarge(length))?;
    let mut table = header(length16, entry_count);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    Ok(table)
}

/// The configuration table header with a zero checksum; `length` covers the base table.
fn header(length: u16, entry_count: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(usize::from(length));
    h.extend_from_slice(b"PCMP");
    h.extend_from_slice(&length.to_le_bytes());
    h.push(SPEC_REV_1_4);
    h.push(0); // checksum
    h.extend_from_slice(OEM_ID);
    h.extend_from_slice(PRODUCT_ID);
    h.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    h.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    h.extend_from_slice(&entry_count.to_le_bytes());
    h.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    h.push(0); // extended table checksum
    h.push(0); // reserved
    h
}

fn processor_entry(apic_id: u8) -> [u8; PROCESSOR_ENTRY_SIZE] {
    let mut e = [0u8; PROCESSOR_ENTRY_SIZE];
    let flags = if apic_id == 0 {
        CPU_ENABLED | CPU_BOOTSTRAP
    } else {
        CPU_ENABLED
    };
    e[..4].copy_from_slice(&[ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags]);
    e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
    e
}

/// An I/O (type 3) or local (type 4) interrupt assignment entry for an ISA source IRQ.
fn interrupt_entry(
    entry_type: u8,
    kind: u8,
    source_irq: u8,
    dest_id: u8,
    dest_pin: u8,
) -> [u8; SMALL_ENTRY_SIZE] {
    let [flags_lo, flags_hi] = INT_FLAGS_CONFORM.to_le_bytes();
    [
        entry_type, kind, flags_lo, flags_hi, ISA_BUS_ID, source_irq, dest_id, dest_pin,
    ]
}

/// The byte that makes `bytes` (which must contain it as zero) sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as a guest would parse it.
    #[derive(Debug, Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>,
        buses: Vec<(u8, [u8; 6])>,
        ioapics: Vec<(u8, u8, u32)>,
        io_ints: Vec<[u8; 8]>,
        local_ints: Vec<[u8; 8]>,
        lapic_addr: u32,
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Finds and validates the tables the way Linux does, then splits the entries.
    fn parse(m: &GuestMemoryMmap) -> Parsed {
        // Linux scans 16-byte aligned slots of the last KiB of base memory.
        let area = read(m, EBDA_START, 0x400);
        let at = (0..area.len())
            .step_by(16)
            .find(|&i| &area[i..i + 4] == b"_MP_")
            .expect("floating pointer");
        let fp = &area[at..at + 16];
        assert_eq!(sum(fp), 0, "floating pointer checksum");
        assert_eq!((fp[8], fp[9]), (1, 4));
        assert_eq!(fp[11], 0, "no default configuration");

        let table_addr = u64::from(u32_at(fp, 4));
        let head = read(m, table_addr, HEADER_SIZE);
        assert_eq!(&head[0..4], b"PCMP");
        assert_eq!(head[6], 4);
        let len = usize::from(u16_at(&head, 4));
        let table = read(m, table_addr, len);
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(u16_at(&table, 40), 0, "no extended table");

        let mut p = Parsed {
            lapic_addr: u32_at(&table, 36),
            ..Default::default()
        };
        let mut off = HEADER_SIZE;
        for _ in 0..u16_at(&table, 34) {
            let e = &table[off..];
            let size = if e[0] == ENTRY_PROCESSOR { 20 } else { 8 };
            match e[0] {
                ENTRY_PROCESSOR => p.cpus.push((e[1], e[3])),
                ENTRY_BUS => p.buses.push((e[1], e[2..8].try_into().unwrap())),
                ENTRY_IOAPIC => p.ioapics.push((e[1], e[3], u32_at(e, 4))),
                ENTRY_IO_INTERRUPT => p.io_ints.push(e[..8].try_into().unwrap()),
                ENTRY_LOCAL_INTERRUPT => p.local_ints.push(e[..8].try_into().unwrap()),
                t => panic!("unknown entry type {t}"),
            }
            off += size;
        }
        assert_eq!(off, len, "entries fill the base table exactly");
        p
    }

    fn check(num_cpus: u8) {
        let m = mem();
        write_mptable(&m, num_cpus).unwrap();
        let p = parse(&m);
        assert_eq!(p.lapic_addr, APIC_ADDR as u32);

        assert_eq!(p.cpus.len(), usize::from(num_cpus));
        for (i, &(apic_id, flags)) in p.cpus.iter().enumerate() {
            assert_eq!(usize::from(apic_id), i);
            let expected = if i == 0 { 3 } else { 1 };
            assert_eq!(flags, expected, "cpu {i} flags");
        }
        assert_eq!(p.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(p.ioapics, vec![(num_cpus, 1, IOAPIC_ADDR as u32)]);

        assert_eq!(p.io_ints.len(), IRQ_MAX as usize + 1);
        for (irq, e) in p.io_ints.iter().enumerate() {
            // Vectored, conforming, ISA IRQ n -> IO-APIC pin n.
            assert_eq!(e, &[3, 0, 0, 0, 0, irq as u8, num_cpus, irq as u8]);
        }
        assert_eq!(
            p.local_ints,
            vec![[4, 3, 0, 0, 0, 0, 0xff, 0], [4, 1, 0, 0, 0, 0, 0xff, 1]]
        );
    }

    #[test]
    fn one_cpu() {
        check(1);
    }

    #[test]
    fn two_cpus() {
        check(2);
    }

    #[test]
    fn many_cpus() {
        check(64);
        check(MAX_CPUS);
    }

    #[test]
    fn table_stays_in_the_reserved_area() {
        let m = mem();
        write_mptable(&m, MAX_CPUS).unwrap();
        let fp = read(&m, EBDA_START, 16);
        let table_addr = u64::from(u32_at(&fp, 4));
        let len = u64::from(u16_at(&read(&m, table_addr, HEADER_SIZE), 4));
        assert!(table_addr >= EBDA_START && table_addr + len <= HIMEM_START);
    }

    #[test]
    fn rewriting_with_fewer_cpus_is_consistent() {
        let m = mem();
        write_mptable(&m, 8).unwrap();
        write_mptable(&m, 2).unwrap();
        assert_eq!(parse(&m).cpus.len(), 2);
    }

    #[test]
    fn cpu_count_errors() {
        let m = mem();
        assert!(matches!(write_mptable(&m, 0), Err(MptableError::NoCpus)));
        assert!(matches!(
            write_mptable(&m, 255),
            Err(MptableError::TooManyCpus(255))
        ));
    }

    #[test]
    fn memory_too_small_is_an_error() {
        for size in [0x8_0000, EBDA_START as usize + 0x100] {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
            assert!(matches!(write_mptable(&m, 1), Err(MptableError::Write(_))));
        }
    }

    #[test]
    fn checksum_zeroes_the_sum() {
        let mut bytes = vec![1, 2, 3, 0, 250];
        bytes[3] = checksum(&bytes);
        assert_eq!(sum(&bytes), 0);
        assert_eq!(checksum(&[]), 0);
    }
}
