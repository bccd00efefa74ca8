//! Data safety: a write the guest has flushed is in the disk image even when rvmm is killed
//! with SIGKILL right after, and the file system in the image is consistent. The guest side is
//! the self-test kernel's blk-write check: it writes /rvmm-selftest.dat, fsyncs it (a virtio-blk
//! FLUSH), re-reads it from the disk, checkpoints the journal, and only then prints its line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    debugfs_cat, kvm_and_guest_or_skip, selftest_hvc_args, selftest_pattern, TestResult, TestVm,
};

/// Generous: the nested KVM of CI runs under TCG.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn flushed_data_survives_sigkill() -> TestResult {
    let Some(guest) = kvm_and_guest_or_skip("flushed_data_survives_sigkill") else {
        return Ok(());
    };
    let rootfs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("durability.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let mut args = selftest_hvc_args(&guest, "blk-write");
    args.extend(["--rootfs".into(), rootfs.display().to_string()]);
    let mut vm = TestVm::boot(args)?;
    let line = vm.expect_line_within("RVMM-SELFTEST blk-write ", BOOT_LIMIT)?;
    vm.signal(libc::SIGKILL);
    let status = vm.wait_exit(Duration::from_secs(10))?;
    assert!(line.contains("blk-write ok"), "{line}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    assert_eq!(
        debugfs_cat(&rootfs, "/rvmm-selftest.dat")?,
        selftest_pattern(),
        "the flushed file is not in the image"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&rootfs)
        .output()
        .map_err(|e| format!("e2fsck: {e}"))?;
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems (status {:?}):\n{}{}",
        fsck.status.code(),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    Ok(())
}
