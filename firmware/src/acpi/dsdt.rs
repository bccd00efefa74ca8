//! The DSDT: the devices a guest cannot probe for (each virtio-mmio window with its interrupt,
//! COM1, the pvpanic port) and the `_S5_` sleep type that makes `poweroff` work.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::common::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID, S5_SLEEP_TYPE};
use crate::layout::{
    VirtioSlot, COM1_IRQ, COM1_PORT, COM1_PORT_COUNT, PVPANIC_PORT, VIRTIO_MMIO_SIZE,
};

/// Revision 2: integers in the AML are 64-bit.
const DSDT_REVISION: u8 = 2;
/// The ACPI id Linux's virtio_mmio driver matches.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// A 16550-compatible UART.
const COM_HID: &str = "PNP0501";
/// QEMU's pvpanic device, which Linux's pvpanic driver matches.
const PVPANIC_HID: &str = "QEMU0001";

/// An interrupt as the MP table and MADT route ISA and virtio interrupts: exclusive, edge
/// triggered, active high (irqfds inject edges).
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// One virtio-mmio device: `Device (Vnnn)` with `_HID`, `_UID` and its window and interrupt.
struct VirtioMmioDevice {
    index: u8,
    slot: VirtioSlot,
}

impl Aml for VirtioMmioDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Slots live below 4 GiB (layout::VirtioSlot), so the window fits a 32-bit descriptor.
        let window = Memory32Fixed::new(true, self.slot.addr as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = edge_interrupt(self.slot.irq);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let hid = Name::new("_HID".into(), &VIRTIO_MMIO_HID);
        let uid = Name::new("_UID".into(), &self.index);
        let crs = Name::new("_CRS".into(), &crs);
        let path = Path::new(&format!("V{:03}", self.index));
        Device::new(path, vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// COM1 at its standard ports and ISA interrupt.
struct Com1;

impl Aml for Com1 {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let ports = IO::new(COM1_PORT, COM1_PORT, 0, COM1_PORT_COUNT as u8);
        let irq = edge_interrupt(COM1_IRQ);
        let crs = ResourceTemplate::new(vec![&ports, &irq]);
        let hid = Name::new("_HID".into(), &EISAName::new(COM_HID));
        let uid = Name::new("_UID".into(), &0u8);
        let crs = Name::new("_CRS".into(), &crs);
        Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// The pvpanic port: one byte, no interrupt.
struct Pvpanic;

impl Aml for Pvpanic {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let port = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
        let crs = ResourceTemplate::new(vec![&port]);
        let hid = Name::new("_HID".into(), &PVPANIC_HID);
        let crs = Name::new("_CRS".into(), &crs);
        Device::new("PEVT".into(), vec![&hid, &crs]).to_aml_bytes(sink);
    }
}

/// The DSDT for `cfg` (its CPU count plays no part here).
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let virtio: Vec<VirtioMmioDevice> = cfg
        .virtio
        .iter()
        .zip(0u8..)
        .map(|(&slot, index)| VirtioMmioDevice { index, slot })
        .collect();
    let mut devices: Vec<&dyn Aml> = Vec::with_capacity(virtio.len() + 2);
    if cfg.serial {
        devices.push(&Com1);
    }
    devices.push(&Pvpanic);
    devices.extend(virtio.iter().map(|d| d as &dyn Aml));

    let mut body = Vec::new();
    Scope::new("\\_SB_".into(), devices).to_aml_bytes(&mut body);
    // SLP_TYPa, SLP_TYPb (unused on hardware-reduced platforms), two reserved.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;
    use std::process::Command;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::acpi::tests::check_header;

    fn slots(n: u32) -> Vec<VirtioSlot> {
        (0..n).filter_map(VirtioSlot::nth).collect()
    }

    fn cfg(virtio: &[VirtioSlot], serial: bool) -> AcpiConfig<'_> {
        AcpiConfig {
            num_cpus: 1,
            virtio,
            serial,
        }
    }

    /// `Device (V000)` for the first slot, encoded by hand from the ACPI spec's AML grammar.
    const V000: &[u8] = &[
        0x5b, 0x82, 0x3a, b'V', b'0', b'0', b'0', // DeviceOp, PkgLength 58, "V000"
        0x08, b'_', b'H', b'I', b'D', 0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0,
        0x08, b'_', b'U', b'I', b'D', 0x00, // _UID Zero
        0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17, // Buffer of 23 bytes
        0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00,
        0x00, // Memory32Fixed
        0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, // Interrupt, edge, GSI 5
        0x79, 0x00, // EndTag
    ];

    #[test]
    fn virtio_device_aml_bytes() {
        let mut bytes = Vec::new();
        VirtioMmioDevice {
            index: 0,
            slot: VirtioSlot::nth(0).unwrap(),
        }
        .to_aml_bytes(&mut bytes);
        assert_eq!(bytes, V000);
    }

    #[test]
    fn header_and_body() {
        for (n, serial) in [(0, false), (1, true), (3, false), (19, true)] {
            let virtio = slots(n);
            let dsdt = dsdt(&cfg(&virtio, serial));
            check_header(&dsdt, b"DSDT");
            assert_eq!(dsdt[8], DSDT_REVISION);
            let body = &dsdt[36..];
            let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
            assert_eq!(count(b"LNRO0005"), n as usize);
            assert_eq!(count(b"COM1"), usize::from(serial));
            assert_eq!(count(b"QEMU0001"), 1);
            // Name (_S5_, Package (4) { 5, Zero, Zero, Zero })
            assert!(
                body.ends_with(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 4, 0x0a, 5, 0, 0, 0])
            );
        }
        let dsdt = dsdt(&cfg(&slots(1), false));
        assert!(dsdt.windows(V000.len()).any(|w| w == V000));
    }

    /// Disassembles `table` with iasl and returns the ASL with comments and spacing removed.
    fn iasl_disassemble(table: &[u8]) -> Option<String> {
        if Command::new("iasl").arg("-v").output().is_err() {
            if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("iasl (Debian package acpica-tools) is required when RVMM_REQUIRE_KVM=1");
            }
            eprintln!(
                "SKIPPED dsdt_decodes_with_iasl: iasl not found (apt-get install acpica-tools)"
            );
            return None;
        }
        let dir = TempDir::new().unwrap();
        let aml = dir.as_path().join("dsdt.dat");
        std::fs::write(&aml, table).unwrap();
        let out = Command::new("iasl").arg("-d").arg(&aml).output().unwrap();
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d failed:\n{log}");
        let dsl = std::fs::read_to_string(FsPath::new(dir.as_path()).join("dsdt.dsl")).unwrap();
        assert!(!dsl.contains("Incorrect checksum"), "{dsl}");
        let code: Vec<&str> = dsl.lines().map(|l| l.split("//").next().unwrap()).collect();
        Some(normalize(&code.join(" ")))
    }

    /// Drops inline `/* … */` comments and collapses whitespace.
    fn normalize(asl: &str) -> String {
        let mut out = String::new();
        let mut rest = asl;
        while let Some(start) = rest.find("/*") {
            out.push_str(rest[..start].trim_end());
            rest = rest[start..]
                .find("*/")
                .map_or("", |end| &rest[start + end + 2..]);
        }
        out.push_str(rest);
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The AML decodes, with iasl from ACPICA (what Linux's interpreter is built from), to
    /// exactly the ASL we mean.
    #[test]
    fn dsdt_decodes_with_iasl() {
        let virtio = slots(2);
        let Some(asl) = iasl_disassemble(&dsdt(&cfg(&virtio, true))) else {
            return;
        };
        // The OEM ids keep their padding; everything else is ASL as one would write it.
        let expected = normalize(
            r#"DefinitionBlock ("", "DSDT", 2, "RVMM  ", "MICROVM ", 0x00000001) {
            Scope (\_SB) {
                Device (COM1) {
                    Name (_HID, EisaId ("PNP0501"))
                    Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate () {
                        IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08, )
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }
                    })
                }
                Device (PEVT) {
                    Name (_HID, "QEMU0001")
                    Name (_CRS, ResourceTemplate () {
                        IO (Decode16, 0x0505, 0x0505, 0x01, 0x01, )
                    })
                }
                Device (V000) {
                    Name (_HID, "LNRO0005")
                    Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate () {
                        Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }
                    })
                }
                Device (V001) {
                    Name (_HID, "LNRO0005")
                    Name (_UID, One)
                    Name (_CRS, ResourceTemplate () {
                        Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000, )
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000006, }
                    })
                }
            }
            Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })
            }"#,
        );
        assert_eq!(asl, expected);
    }
}
