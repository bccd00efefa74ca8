//! The guest kernel command line, assembled in one place for every guest rvmm boots: its
//! defaults, the root disk and what the VM adds (CPU-template and device parameters).

use crate::layout::VirtioSlot;

/// What every default command line has after the console: reboot by keyboard controller, a
/// panic reboots (so rvmm exits) after 1 s, and no probing of i8042 ports rvmm lacks.
pub const DEFAULT_PARAMS: &str =
    "reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The device the kernel's console writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelConsole {
    /// The COM1 UART, ttyS0.
    Serial,
    /// The first virtio-console port, hvc0.
    Virtio,
}

/// How the kernel mounts its root filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootAccess {
    ReadWrite,
    ReadOnly,
}

/// A kernel command line; parameters are separated by single spaces.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelCmdline(String);

impl KernelCmdline {
    /// rvmm's default: the console, when there is one, then [`DEFAULT_PARAMS`].
    pub fn with_defaults(console: Option<KernelConsole>) -> Self {
        KernelCmdline(match console {
            Some(KernelConsole::Serial) => format!("console=ttyS0 {DEFAULT_PARAMS}"),
            Some(KernelConsole::Virtio) => format!("console=hvc0 {DEFAULT_PARAMS}"),
            None => DEFAULT_PARAMS.to_string(),
        })
    }

    /// A command line given in full, which replaces the defaults.
    pub fn verbatim(cmdline: String) -> Self {
        KernelCmdline(cmdline)
    }

    /// Appends `params` after a space.
    pub fn push(&mut self, params: &str) -> &mut Self {
        self.0.push(' ');
        self.0.push_str(params);
        self
    }

    /// The first virtio disk, /dev/vda, is the root filesystem.
    pub fn root_vda(&mut self, access: RootAccess) -> &mut Self {
        self.push(match access {
            RootAccess::ReadWrite => "root=/dev/vda rw",
            RootAccess::ReadOnly => "root=/dev/vda ro",
        })
    }

    /// Announces a virtio-mmio device to a guest without ACPI.
    pub fn virtio_mmio_device(&mut self, slot: &VirtioSlot) -> &mut Self {
        self.push(&format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.addr, slot.irq
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_name_the_console() {
        let serial = KernelCmdline::with_defaults(Some(KernelConsole::Serial));
        assert_eq!(serial.as_str(), format!("console=ttyS0 {DEFAULT_PARAMS}"));
        let virtio = KernelCmdline::with_defaults(Some(KernelConsole::Virtio));
        assert!(virtio.as_str().starts_with("console=hvc0 reboot=k"));
        let none = KernelCmdline::with_defaults(None);
        assert_eq!(none.as_str(), DEFAULT_PARAMS);
    }

    #[test]
    fn additions_follow_a_space() {
        let mut c = KernelCmdline::verbatim("quiet".into());
        c.root_vda(RootAccess::ReadOnly).push("rootfstype=ext4");
        assert_eq!(c.as_str(), "quiet root=/dev/vda ro rootfstype=ext4");
        let mut c = KernelCmdline::verbatim(String::new());
        c.root_vda(RootAccess::ReadWrite);
        assert_eq!(c.as_str(), " root=/dev/vda rw");
    }

    #[test]
    fn virtio_mmio_entries() {
        let first = VirtioSlot::nth(0).unwrap();
        let mut c = KernelCmdline::verbatim("quiet".into());
        c.virtio_mmio_device(&first);
        assert_eq!(c.as_str(), "quiet virtio_mmio.device=4K@0xd0000000:5");
    }
}
