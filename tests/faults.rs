//! Fault battery (issue #20), on the plain Linux guest with a second disk under test: the host
//! file system under a disk image fills up, a disk image is truncated under the running guest,
//! and the guest runs out of memory. In each the guest sees the fault as a guest would (an I/O
//! error, the OOM killer), rvmm keeps running and says what failed on stderr, the guest ends
//! the VM with status 0, and no rvmm process is left.
//!
//! Covered elsewhere: SIGKILL of rvmm after a flushed write (durability), virtiofsd dying
//! (virtiofs, oci), passt dying (user_net), a guest kernel panic (boot_linux). The container
//! guest's agent is its PID 1, which no guest process can kill: its death is a guest panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    can_make_namespaces, kvm_and_guest_or_skip, processes_with, rootfs_with_programs, TestResult,
    TestVm,
};

const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// This test's scratch directory; its path also marks its rvmm processes.
fn scratch(case: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("faults-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// rvmm's arguments: the read-only root with the fault script, `disk` as /dev/vdb.
fn rvmm_args(guest: &Path, root: &Path, disk: &Path, case: &str, memory_mib: u32) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest.join("vmlinux").display().to_string(),
        "--cmdline".into(),
        format!(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/faults_init.sh fault={case}"
        ),
        "--disk".into(),
        format!("{},ro", root.display()),
        "--disk".into(),
        disk.display().to_string(),
        "--memory".into(),
        memory_mib.to_string(),
    ]
}

fn fault_root(guest: &Path, dir: &Path) -> TestResult<PathBuf> {
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/faults_init.sh");
    let name = format!("{}/root.ext4", dir.file_name().unwrap().to_string_lossy());
    rootfs_with_programs(guest, &name, &[(&init, "faults_init.sh")])
}

/// Waits for the guest to end the VM itself; status 0, and no rvmm of this case left.
fn ends_cleanly(mut vm: TestVm, dir: &Path) -> TestResult<String> {
    let exit = vm.wait_exit(BOOT_LIMIT)?;
    let stderr = vm.stderr();
    assert_eq!(exit.code(), Some(0), "rvmm's status; stderr:\n{stderr}");
    let left = processes_with(&dir.display().to_string());
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(stderr)
}

#[test]
fn a_full_host_file_system_fails_the_guests_writes_and_rvmm_keeps_running() -> TestResult {
    let test = "a_full_host_file_system_fails_the_guests_writes_and_rvmm_keeps_running";
    let Some(guest) = kvm_and_guest_or_skip(test) else {
        return Ok(());
    };
    if !can_make_namespaces(test) {
        return Ok(());
    }
    let dir = scratch("enospc");
    let root = fault_root(&guest, &dir)?;
    // The image sits on an 8 MiB tmpfs of rvmm's own mount namespace, gone with it: a 32 MiB
    // sparse file whose guest fills it with 24 MiB.
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let disk = mnt.join("disk.img");
    let args = rvmm_args(&guest, &root, &disk, "enospc", 256);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=8m tmpfs "$1" && truncate -s 32M "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(&mnt)
        .arg(&disk)
        .arg(env!("CARGO_BIN_EXE_rvmm"))
        .args(args);
    let mut vm = TestVm::spawn(cmd)?;
    vm.expect_line_within("RVMM-FAULT enospc write-failed", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-FAULT enospc read-ok", BOOT_LIMIT)?;
    let stderr = ends_cleanly(vm, &dir)?;
    assert!(
        stderr.contains("virtio-blk") && stderr.contains("No space left on device"),
        "rvmm did not say why the guest's writes failed:\n{stderr}"
    );
    Ok(())
}

#[test]
fn an_image_truncated_under_the_guest_gives_it_read_errors() -> TestResult {
    let Some(guest) =
        kvm_and_guest_or_skip("an_image_truncated_under_the_guest_gives_it_read_errors")
    else {
        return Ok(());
    };
    let dir = scratch("truncate");
    let root = fault_root(&guest, &dir)?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0x5a; 16 << 20]).unwrap();
    let mut vm = TestVm::boot(rvmm_args(&guest, &root, &disk, "truncate", 256))?;
    vm.expect_line_within("RVMM-FAULT truncate ready", BOOT_LIMIT)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| format!("truncating the image: {e}"))?;
    vm.expect_line_within("RVMM-FAULT truncate read-failed", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-FAULT truncate head-ok", BOOT_LIMIT)?;
    let stderr = ends_cleanly(vm, &dir)?;
    assert!(
        stderr.contains("virtio-blk"),
        "rvmm did not say why the guest's reads failed:\n{stderr}"
    );
    Ok(())
}

#[test]
fn a_guest_out_of_memory_kills_its_process_and_the_vm_goes_on() -> TestResult {
    let Some(guest) =
        kvm_and_guest_or_skip("a_guest_out_of_memory_kills_its_process_and_the_vm_goes_on")
    else {
        return Ok(());
    };
    let dir = scratch("oom");
    let root = fault_root(&guest, &dir)?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0; 1 << 20]).unwrap();
    let mut vm = TestVm::boot(rvmm_args(&guest, &root, &disk, "oom", 128))?;
    let line = vm.expect_line_within("RVMM-FAULT oom survived", BOOT_LIMIT)?;
    assert!(
        !line.contains("status=0 "),
        "the hog ended by itself: {line}"
    );
    ends_cleanly(vm, &dir)?;
    Ok(())
}
