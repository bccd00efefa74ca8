//! An I/O APIC (82093AA-style, version 0x11) for KVM's split irqchip: the local APICs stay in
//! the kernel, and this model turns each pin's redirection entry into an MSI route.
//!
//! Interrupts never pass through this model. Devices signal irqfds on GSI = pin, and KVM
//! delivers them straight to the local APICs along the route the guest last programmed;
//! the model only has to keep those routes in step with the redirection table. A masked pin
//! has no route, so an edge on it is dropped, as a masked edge is on the real chip. Every
//! line rvmm offers is edge-triggered (the DSDT says so), so there is no remote IRR to track.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::{warn_once, LogOnce, Problem};

/// Pins, and so GSIs 0..PINS, the chip routes.
pub const IOAPIC_PINS: usize = 24;
/// Bytes of MMIO space the chip decodes.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;

/// Version 0x11 has no EOI register: Linux then ends a level interrupt by toggling the
/// trigger mode, which this model never needs, as every line is edge-triggered.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DELIVERY_MODE: u64 = 0b111 << RTE_DELIVERY_MODE_SHIFT;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Delivery status and remote IRR: the chip's own state, read-only to the guest.
const RTE_READ_ONLY: u64 = (1 << 12) | (1 << 14);
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;

const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
const MSI_ADDRESS_LOGICAL: u64 = 1 << 2;
const MSI_DATA_LEVEL: u32 = 1 << 15;
const MSI_DATA_ASSERT: u32 = 1 << 14;

/// An MSI: what the local APICs receive when an unmasked pin fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Destination (APIC id and mode) in the 0xfee0_0000 window.
    pub address: u64,
    /// Vector, delivery mode and trigger mode.
    pub data: u32,
}

impl MsiMessage {
    /// The message a redirection entry describes, or `None` while the pin is masked.
    fn from_entry(entry: u64) -> Option<MsiMessage> {
        if entry & RTE_MASKED != 0 {
            return None;
        }
        let dest = entry >> RTE_DEST_SHIFT;
        let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
        if entry & RTE_DEST_LOGICAL != 0 {
            address |= MSI_ADDRESS_LOGICAL;
        }
        // Vector and delivery mode sit at the same bits in both formats.
        let mut data = (entry & (RTE_VECTOR | RTE_DELIVERY_MODE)) as u32;
        if entry & RTE_LEVEL != 0 {
            data |= MSI_DATA_LEVEL | MSI_DATA_ASSERT;
        }
        Some(MsiMessage { address, data })
    }
}

/// Where the chip's routes go: the VMM installs them as the GSI routes of its irqfds.
pub trait MsiRoutes: Send {
    /// Pin `pin` now delivers `route`, or nothing when it is `None`.
    fn set_route(&mut self, pin: usize, route: Option<MsiMessage>) -> std::io::Result<()>;
}

/// The chip's state, for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicSnapshot {
    /// APIC id.
    pub id: u8,
    /// IOREGSEL.
    pub selected: u32,
    /// The redirection table.
    pub table: [u64; IOAPIC_PINS],
}

/// The I/O APIC's registers: map them at the address the MADT gives.
pub struct IoApic {
    id: u8,
    selected: u32,
    table: [u64; IOAPIC_PINS],
    routes: Box<dyn MsiRoutes>,
    warned: LogOnce,
}

impl IoApic {
    /// A chip with APIC id `id` and every pin masked, as after reset.
    pub fn new(id: u8, routes: Box<dyn MsiRoutes>) -> Self {
        Self {
            id,
            selected: 0,
            table: [RTE_MASKED; IOAPIC_PINS],
            routes,
            warned: LogOnce::default(),
        }
    }

    /// The chip's state.
    pub fn save(&self) -> IoApicSnapshot {
        IoApicSnapshot {
            id: self.id,
            selected: self.selected,
            table: self.table,
        }
    }

    /// Puts a saved state back and installs every pin's route, as the guest's writes did;
    /// fails at the first route the VMM cannot install.
    pub fn restore(&mut self, s: &IoApicSnapshot) -> std::io::Result<()> {
        self.id = s.id;
        self.selected = s.selected & 0xff;
        // The chip's own status bits are never set in a table this model saved.
        self.table = s.table.map(|entry| entry & !RTE_READ_ONLY);
        for (pin, &entry) in self.table.iter().enumerate() {
            self.routes.set_route(pin, MsiMessage::from_entry(entry))?;
        }
        Ok(())
    }

    fn read_register(&self, reg: u32) -> u32 {
        match reg {
            REG_ID | REG_ARBITRATION => u32::from(self.id & 0xf) << 24,
            REG_VERSION => VERSION,
            _ => match table_slot(reg) {
                Some((pin, true)) => (self.table[pin] >> 32) as u32,
                Some((pin, false)) => self.table[pin] as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, reg: u32, value: u32) {
        let Some((pin, high)) = table_slot(reg) else {
            // The id and arbitration registers only matter on a physical APIC bus.
            return;
        };
        let old = self.table[pin];
        let written = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        self.table[pin] = (written & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
        let route = MsiMessage::from_entry(self.table[pin]);
        // Linux writes each half separately; only a change of what the pin delivers costs
        // a routing update.
        if route != MsiMessage::from_entry(old) {
            if let Err(e) = self.routes.set_route(pin, route) {
                warn_once!(
                    self.warned,
                    Problem::Route,
                    "ioapic: cannot route pin {pin}: {e}"
                );
            }
        }
    }
}

/// The pin and half (high = true) a table register index names.
fn table_slot(reg: u32) -> Option<(usize, bool)> {
    let index = reg.checked_sub(REG_TABLE)? as usize;
    (index < 2 * IOAPIC_PINS).then_some((index / 2, index % 2 == 1))
}

impl BusDevice for IoApic {
    /// Only aligned 32-bit accesses to the two registers exist; anything else reads as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.selected,
            (IOWIN, 4) => self.read_register(self.selected),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.selected = value & 0xff,
            IOWIN => self.write_register(self.selected, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<(usize, Option<MsiMessage>)>>>;

    struct Recorder(Log);

    impl MsiRoutes for Recorder {
        fn set_route(&mut self, pin: usize, route: Option<MsiMessage>) -> std::io::Result<()> {
            self.0.lock().unwrap().push((pin, route));
            Ok(())
        }
    }

    fn chip() -> (IoApic, Log) {
        let log = Log::default();
        (IoApic::new(2, Box::new(Recorder(log.clone()))), log)
    }

    fn write_reg(chip: &mut IoApic, reg: u32, value: u32) {
        chip.write(IOREGSEL, &reg.to_le_bytes());
        chip.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(chip: &mut IoApic, reg: u32) -> u32 {
        chip.write(IOREGSEL, &reg.to_le_bytes());
        let mut data = [0u8; 4];
        chip.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identifies_itself_with_24_pins_all_masked() {
        let (mut chip, log) = chip();
        assert_eq!(read_reg(&mut chip, REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut chip, REG_VERSION), 0x0017_0011);
        for pin in 0..IOAPIC_PINS as u32 {
            assert_eq!(read_reg(&mut chip, REG_TABLE + 2 * pin), 1 << 16);
        }
        assert_eq!(read_reg(&mut chip, REG_TABLE + 48), 0, "no 25th pin");
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn unmasking_a_pin_routes_it_as_linux_programs_it() {
        let (mut chip, log) = chip();
        // Linux writes the destination half first, then vector 0x21, fixed, physical, edge.
        write_reg(&mut chip, REG_TABLE + 2 * 5 + 1, 3 << 24);
        assert!(
            log.lock().unwrap().is_empty(),
            "still masked: nothing to route"
        );
        write_reg(&mut chip, REG_TABLE + 2 * 5, 0x21);
        let want = MsiMessage {
            address: 0xfee0_3000,
            data: 0x21,
        };
        assert_eq!(*log.lock().unwrap(), [(5, Some(want))]);
        assert_eq!(read_reg(&mut chip, REG_TABLE + 2 * 5), 0x21);
        assert_eq!(read_reg(&mut chip, REG_TABLE + 2 * 5 + 1), 3 << 24);
    }

    #[test]
    fn masking_removes_the_route_and_rewrites_cost_nothing() {
        let (mut chip, log) = chip();
        write_reg(&mut chip, REG_TABLE + 8, 0x30);
        write_reg(&mut chip, REG_TABLE + 8, 0x30);
        write_reg(&mut chip, REG_TABLE + 8, 0x30 | (1 << 16));
        write_reg(&mut chip, REG_TABLE + 8, 0x31 | (1 << 16));
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[1], (4, None));
    }

    #[test]
    fn logical_lowest_priority_level_entries_keep_their_meaning() {
        let entry = 0x41 | (1 << 8) | RTE_DEST_LOGICAL | RTE_LEVEL | (0x0f << RTE_DEST_SHIFT);
        assert_eq!(
            MsiMessage::from_entry(entry),
            Some(MsiMessage {
                address: 0xfee0_f004,
                data: 0x41 | (1 << 8) | MSI_DATA_LEVEL | MSI_DATA_ASSERT,
            })
        );
    }

    #[test]
    fn status_bits_are_read_only() {
        let (mut chip, _log) = chip();
        write_reg(&mut chip, REG_TABLE, 0x30 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&mut chip, REG_TABLE), 0x30);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut chip, log) = chip();
        chip.write(IOREGSEL, &[REG_TABLE as u8]);
        chip.write(IOWIN, &[0, 0]);
        chip.write(0x40, &0x21u32.to_le_bytes());
        write_reg(&mut chip, REG_ID, 0xffff_ffff);
        write_reg(&mut chip, 0xff, 0x21);
        let mut wide = [0xffu8; 8];
        chip.read(IOWIN, &mut wide);
        assert_eq!(wide, [0; 8]);
        assert_eq!(read_reg(&mut chip, REG_ID), 2 << 24);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn a_restored_chip_routes_every_pin_as_saved() {
        let (mut chip, _log) = chip();
        write_reg(&mut chip, REG_TABLE + 2 * 5 + 1, 3 << 24);
        write_reg(&mut chip, REG_TABLE + 2 * 5, 0x21);
        chip.write(IOREGSEL, &(REG_TABLE + 2 * 5 + 1).to_le_bytes());
        let snap = chip.save();
        let json = serde_json::to_string(&snap).unwrap();
        let snap: IoApicSnapshot = serde_json::from_str(&json).unwrap();

        let log = Log::default();
        let mut fresh = IoApic::new(0, Box::new(Recorder(log.clone())));
        fresh.restore(&snap).unwrap();
        assert_eq!(fresh.save(), snap);
        let want = MsiMessage {
            address: 0xfee0_3000,
            data: 0x21,
        };
        let routes: Vec<_> = (0..IOAPIC_PINS)
            .map(|pin| (pin, (pin == 5).then_some(want)))
            .collect();
        assert_eq!(*log.lock().unwrap(), routes);
        // IOREGSEL came back with the table.
        let mut data = [0u8; 4];
        fresh.read(IOWIN, &mut data);
        assert_eq!(u32::from_le_bytes(data), 3 << 24);
        assert_eq!(read_reg(&mut fresh, REG_ID), 2 << 24);
        // The chip's own status bits cannot be smuggled in.
        let mut hostile = snap.clone();
        hostile.table[0] = 0x30 | RTE_READ_ONLY;
        fresh.restore(&hostile).unwrap();
        assert_eq!(read_reg(&mut fresh, REG_TABLE), 0x30);
        let mut failing = IoApic::new(0, Box::new(Failing));
        assert!(failing.restore(&snap).is_err());
    }

    struct Failing;

    impl MsiRoutes for Failing {
        fn set_route(&mut self, _: usize, _: Option<MsiMessage>) -> std::io::Result<()> {
            Err(std::io::Error::other("no routes left"))
        }
    }

    #[test]
    fn a_refused_route_fails_only_that_pin() {
        let mut chip = IoApic::new(0, Box::new(Failing));
        write_reg(&mut chip, REG_TABLE, 0x30);
        assert_eq!(read_reg(&mut chip, REG_TABLE), 0x30);
    }
}
