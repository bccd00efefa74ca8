//! The smoke layer for every KVM, including one that emulates guest kernel code (kvm_pvm,
//! where guest user space cannot run): the project's kernel boots to the point where it
//! starts init. The full boots are in boot_linux.rs.

mod common;

use std::time::Duration;

use common::{guest_artifacts, kvm_or_skip, TestResult, TestVm};

/// An emulating KVM takes about 45 s to get there.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_kernel_boots_to_init_on_any_kvm() -> TestResult {
    let name = "the_kernel_boots_to_init_on_any_kvm";
    let Some(guest) = kvm_or_skip(name).then(|| guest_artifacts(name)).flatten() else {
        return Ok(());
    };
    let kernel = guest.join("vmlinux");
    let initrd = guest.join("initramfs.cpio");
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
    ])?;
    for line in [
        "Linux version 6.1",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smp: Brought up 1 node, 1 CPU",
        "Run /init as init process",
    ] {
        vm.expect_line_within(line, BOOT_LIMIT)?;
    }
    Ok(())
}
