//! virtio-blk through the real binary: image locking with a tiny guest, and a Linux boot whose
//! root filesystem and extra disks come from rvmm's virtio-mmio block devices, found through
//! the ACPI tables alone.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{debugfs_cat, kvm_and_guest_or_skip, kvm_or_skip, tiny_guest, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// A fresh file under the test's scratch directory.
fn scratch_file(name: &str, len: u64) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(len).unwrap();
    path
}

#[test]
fn a_disk_in_use_by_one_vm_is_refused_to_another() -> TestResult {
    if !kvm_or_skip("a_disk_in_use_by_one_vm_is_refused_to_another") {
        return Ok(());
    }
    let disk = scratch_file("locked.img", 1 << 20);
    let spin = tiny_guest("spin");
    let args = |disk_spec: &str| {
        vec![
            "--kernel".to_string(),
            spin.display().to_string(),
            "--disk".into(),
            disk_spec.to_string(),
        ]
    };
    let mut first = TestVm::boot(args(disk.to_str().unwrap()))?;
    first.expect_line("RVMM-TINY spinning")?;
    for spec in [disk.display().to_string(), format!("{},ro", disk.display())] {
        let mut second = TestVm::boot(args(&spec))?;
        let status = second.wait_exit(Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(1));
        let err = second.stderr();
        assert!(err.contains("rvmm: error: disk image"), "{err}");
        assert!(err.contains("in use"), "{err}");
    }
    first.signal(libc::SIGTERM);
    first.wait_exit(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn linux_mounts_its_root_from_virtio_blk_and_sees_every_disk() -> TestResult {
    let name = "linux_mounts_its_root_from_virtio_blk_and_sees_every_disk";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let root_sectors = std::fs::metadata(&rootfs).unwrap().len() / 512;
    // Not a multiple of 512: the guest must see the whole sectors only.
    let data = scratch_file("data.img", 10_000_000);
    let scratch = scratch_file("scratch.img", 8 << 20);
    let mut vm = TestVm::boot([
        "--kernel".to_string(),
        guest.join("vmlinux").display().to_string(),
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--disk".into(),
        format!("{},ro,serial=rvmm-data-1", data.display()),
        "--disk".into(),
        scratch.display().to_string(),
    ])?;
    // ACPI is on by default: the tables carry rvmm's OEM id, the DSDT names the three
    // virtio-mmio devices (the command line has no virtio_mmio.device= hints) and S5.
    let cmdline = vm.expect_line_within("Command line: ", BOOT_LIMIT)?;
    assert!(!cmdline.contains("virtio_mmio"), "{cmdline}");
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
        let line = vm.expect_line_within(&format!("ACPI: {table} 0x"), BOOT_LIMIT)?;
        assert!(line.contains("RVMM"), "{line}");
    }
    vm.expect_line_within("ACPI: PM: (supports S0 S5)", BOOT_LIMIT)?;
    for (disk, sectors) in [("vda", root_sectors), ("vdb", 19531), ("vdc", 16384)] {
        let line = vm.expect_line_within(&format!("[{disk}]"), BOOT_LIMIT)?;
        assert!(
            line.contains(&format!("[{disk}] {sectors} 512-byte logical blocks")),
            "{line}"
        );
    }
    vm.expect_line_within("EXT4-fs (vda): mounted filesystem", BOOT_LIMIT)?;
    vm.expect_line_within("VFS: Mounted root (ext4 filesystem)", BOOT_LIMIT)?;
    let root = vm.expect_line_within("RVMM-INIT root=", BOOT_LIMIT)?;
    assert!(root.contains("root=/dev/vda"), "{root}");
    vm.expect_line_within("RVMM-INIT written=", BOOT_LIMIT)?;
    assert_eq!(vm.wait_exit(BOOT_LIMIT)?.code(), Some(0), "{}", vm.stderr());
    // What the guest's init wrote and synced is in the image on the host.
    let written = debugfs_cat(&rootfs, "/rvmm-written")?;
    assert_eq!(written, b"rvmm guest wrote this line\n");
    Ok(())
}
