//! Legacy PC devices on the port-I/O bus, and the ACPI sleep registers that sit beside them.

pub mod acpi_sleep;
pub mod i8042;
pub mod serial;
