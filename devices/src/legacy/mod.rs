//! Legacy PC devices on the port-I/O bus, the ACPI sleep registers and pvpanic port that sit
//! beside them, and the I/O APIC of the split irqchip.

pub mod acpi_sleep;
pub mod i8042;
pub mod ioapic;
pub mod pvpanic;
pub mod serial;
