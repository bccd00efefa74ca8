//! What an rvmm guest finds at boot on x86_64.
//!
//! Pure functions that lay out and write the structures a Linux kernel expects when it is
//! entered directly in 64-bit mode: the zero page with its e820 map, the MP table, the boot
//! GDT/IDT, identity-mapped page tables, the ACPI tables and the kernel command line. They
//! only touch guest memory ([`vm_memory::GuestMemoryMmap`]); loading the values returned here
//! into vCPU registers is the VMM's job, so this crate never talks to KVM and is testable on
//! plain memory.

pub mod acpi;
pub mod boot_params;
pub mod cmdline;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;

pub use acpi::{write_acpi_tables, AcpiConfig, AcpiError};
pub use boot_params::{write_boot_params, BootParamsConfig, BootParamsError};
pub use cmdline::{KernelCmdline, KernelConsole, RootAccess};
pub use e820::{e820_entries, E820Entry, E820Kind};
pub use gdt::{write_boot_gdt, BootSegments, GdtError, Segment};
pub use layout::{initrd_addr, initrd_addr_below, ram_regions, LayoutError};
pub use mptable::{write_mptable, MptableError};
pub use paging::{write_identity_page_tables, PagingError};
