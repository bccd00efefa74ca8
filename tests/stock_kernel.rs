//! A distribution kernel booted unchanged: Debian's linux-image-cloud-amd64 bzImage with the
//! initramfs resources/build-stock-guest.sh makes (its virtio modules, mounting /dev/vda).
//! It finds rvmm's devices through the ACPI tables alone.
//!
//! On an emulating KVM this kernel cannot get far: it lacks the two compat patches the
//! project's kernel carries (its INT3 self-test and an FWAIT are instructions the emulator
//! cannot do), and its bzImage decompressor alone runs emulated for over ten minutes. There
//! the test boots the ELF kernel inside that bzImage (decompressed on the host by the build
//! script: the same code), asserts what the kernel reaches (its log of rvmm's ACPI tables and
//! the MADT) and stops the VM.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guest_artifacts, kvm_is_emulated, kvm_or_skip, TestResult, TestVm};

/// Guest kernel code runs emulated on some hosts: minutes to the first milestones.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// Where resources/build-stock-guest.sh put the stock kernel and its initramfs.
fn stock_artifacts(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RVMM_STOCK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            cache.join("rvmm/stock")
        });
    if dir.join("vmlinuz").is_file() && dir.join("vmlinux").is_file() {
        return Some(dir);
    }
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{test}: no stock kernel in {} (run resources/build-stock-guest.sh)",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED {test}: no stock kernel in {} (run resources/build-stock-guest.sh)",
        dir.display()
    );
    None
}

#[test]
fn debian_cloud_kernel_finds_rvmm_through_acpi() -> TestResult {
    let name = "debian_cloud_kernel_finds_rvmm_through_acpi";
    if !kvm_or_skip(name) {
        return Ok(());
    }
    let (Some(stock), Some(guest)) = (stock_artifacts(name), guest_artifacts(name)) else {
        return Ok(());
    };
    let rootfs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("stock-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let kernel = if kvm_is_emulated() {
        "vmlinux"
    } else {
        "vmlinuz"
    };
    let mut vm = TestVm::boot([
        "--kernel".to_string(),
        stock.join(kernel).display().to_string(),
        "--initrd".into(),
        stock.join("initramfs.cpio").display().to_string(),
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "512".into(),
        "--cmdline".into(),
        // The early console shows the log before the kernel's own serial driver starts.
        "console=ttyS0 earlyprintk=serial reboot=k panic=1".into(),
    ])?;
    vm.expect_line_within("Linux version 6.1", BOOT_LIMIT)?;
    eprintln!("NOTE {name}: {kernel} started after {:.0?}", vm.elapsed());
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
        let line = vm.expect_line_within(&format!("ACPI: {table} 0x"), BOOT_LIMIT)?;
        assert!(line.contains("RVMM"), "{line}");
    }
    vm.expect_line_within(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        BOOT_LIMIT,
    )?;
    if kvm_is_emulated() {
        eprintln!(
            "NOTE {name}: emulated KVM: the unpatched kernel stops at instructions this KVM \
             cannot emulate; stopping after its ACPI table log ({:.0?})",
            vm.elapsed()
        );
        vm.signal(libc::SIGTERM);
        vm.wait_exit(Duration::from_secs(20))?;
        return Ok(());
    }
    vm.expect_line_within("ACPI: PM: (supports S0 S5)", BOOT_LIMIT)?;
    for module in [
        "virtio_mmio.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
        "virtio_console.ko",
    ] {
        vm.expect_line_within(&format!("RVMM-STOCK loaded {module}"), BOOT_LIMIT)?;
    }
    vm.expect_line_within("[vda]", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-STOCK mounted /dev/vda", BOOT_LIMIT)?;
    Ok(())
}
