//! A distribution kernel booted unchanged: Debian's linux-image-cloud-amd64 bzImage with the
//! initramfs resources/build-stock-guest.sh makes (its virtio modules, mounting /dev/vda).
//! It finds rvmm's devices through the ACPI tables alone, mounts the root disk and runs its
//! init. It needs a KVM that runs unpatched kernels (resources/test.sh finds one).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guest_artifacts, linux_kvm_or_skip, TestResult, TestVm};

/// Generous: the nested KVM of CI runs under TCG.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

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
    if !linux_kvm_or_skip(name) {
        return Ok(());
    }
    let (Some(stock), Some(guest)) = (stock_artifacts(name), guest_artifacts(name)) else {
        return Ok(());
    };
    let rootfs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("stock-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let mut vm = TestVm::boot([
        "--kernel".to_string(),
        stock.join("vmlinuz").display().to_string(),
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
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
        let line = vm.expect_line_within(&format!("ACPI: {table} 0x"), BOOT_LIMIT)?;
        assert!(line.contains("RVMM"), "{line}");
    }
    vm.expect_line_within(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        BOOT_LIMIT,
    )?;
    vm.expect_line_within("ACPI: PM: (supports S0 S5)", BOOT_LIMIT)?;
    // The driver's probe may log `[vda]` before the init's `loaded` line or after it.
    vm.expect_lines_within(
        &[
            "RVMM-STOCK loaded virtio_mmio.ko",
            "RVMM-STOCK loaded virtio_blk.ko",
            "RVMM-STOCK loaded virtio_net.ko",
            "RVMM-STOCK loaded virtio_console.ko",
            "[vda]",
        ],
        BOOT_LIMIT,
    )?;
    vm.expect_line_within("RVMM-STOCK mounted /dev/vda", BOOT_LIMIT)?;
    // The root disk's own init, on the distribution kernel.
    let root = vm.expect_line_within("RVMM-INIT root=", BOOT_LIMIT)?;
    assert!(root.contains("root=/dev/vda"), "{root}");
    vm.expect_line_within("RVMM-INIT written=", BOOT_LIMIT)?;
    assert_eq!(vm.wait_exit(BOOT_LIMIT)?.code(), Some(0), "{}", vm.stderr());
    Ok(())
}
