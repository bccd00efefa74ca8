//! virtio-fs against Debian's virtiofsd and a real Linux guest: the guest (init =
//! tests/guests/fs_init.sh on a copy of rootfs.ext4) mounts the host directory by its tag, reads
//! a file the host wrote, writes one and makes a directory that the host then finds, and
//! unmounts. The device is found through the ACPI tables like every virtio-mmio device.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_and_guest_or_skip, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
const TAG: &str = "hostshare";

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A copy of the guest's rootfs.ext4 with /fs_init.sh written in by debugfs.
fn fs_rootfs(guest: &Path) -> TestResult<PathBuf> {
    let rootfs = scratch("virtiofs-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/fs_init.sh");
    let commands = format!(
        "write {} fs_init.sh\nsif fs_init.sh mode 0100755\n",
        script.display()
    );
    let cmds = scratch("virtiofs-rootfs.debugfs");
    std::fs::write(&cmds, commands).map_err(|e| e.to_string())?;
    let out = Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(&cmds)
        .arg(&rootfs)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || log.contains("rror") {
        return Err(format!("debugfs -w failed: {log}"));
    }
    Ok(rootfs)
}

/// virtiofsd serving `dir` on `socket`, killed when dropped.
struct Virtiofsd(Child);

impl Virtiofsd {
    fn start(dir: &Path, socket: &Path) -> TestResult<Self> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", socket.display()))
            .args(["-o", &format!("source={}", dir.display())])
            // chroot(2) instead of new namespaces: fewer host requirements, same isolation
            // for this test.
            .args(["-o", "sandbox=chroot", "-o", "cache=none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{VIRTIOFSD}: {e}"))?;
        let daemon = Virtiofsd(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!("virtiofsd made no socket at {}", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The text after `RVMM-FS <what> ` on the next such line.
fn guest_result(vm: &mut TestVm, what: &str) -> TestResult<String> {
    let tag = format!("RVMM-FS {what} ");
    let line = vm.expect_line_within(&tag, BOOT_LIMIT)?;
    Ok(line.split_once(&tag).unwrap().1.to_string())
}

#[test]
fn guest_mounts_a_host_directory_through_virtiofsd() -> TestResult {
    let name = "guest_mounts_a_host_directory_through_virtiofsd";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    if !Path::new(VIRTIOFSD).exists() {
        let why = format!("no {VIRTIOFSD} (Debian's qemu-system-common)");
        if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{name}: {why}");
        }
        eprintln!("SKIPPED {name}: {why}");
        return Ok(());
    }
    let share = scratch("virtiofs-share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).unwrap();
    let host_token = format!("host-{}", std::process::id());
    let guest_token = format!("guest-{}", std::process::id());
    std::fs::write(share.join("from-host.txt"), format!("{host_token}\n")).unwrap();
    let socket = scratch("virtiofs.sock");
    let daemon = Virtiofsd::start(&share, &socket)?;
    let rootfs = fs_rootfs(&guest)?;

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 init=/fs_init.sh fs_tag={TAG} fs_token={guest_token}"
    );
    let mut vm = TestVm::boot([
        "--kernel".to_string(),
        guest.join("vmlinux").display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--fs".into(),
        format!("tag={TAG},socket={}", socket.display()),
    ])?;
    vm.expect_line_within("Run /fs_init.sh as init process", BOOT_LIMIT)?;
    let mounted = guest_result(&mut vm, "mounted")?;
    assert!(
        mounted.starts_with(&format!("{TAG} /mnt virtiofs rw")),
        "{mounted}"
    );
    assert_eq!(guest_result(&mut vm, "read")?, host_token);
    assert_eq!(guest_result(&mut vm, "wrote")?, guest_token);
    let listed = guest_result(&mut vm, "listed")?;
    assert!(
        listed.contains("dir-from-guest") && listed.contains("from-host.txt"),
        "{listed}"
    );
    vm.expect_line_within("RVMM-FS unmounted", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-FS done", BOOT_LIMIT)?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    drop(daemon);

    // What the guest wrote is on the host.
    let written = std::fs::read_to_string(share.join("from-guest.txt")).unwrap();
    assert_eq!(written, format!("{guest_token}\n"));
    assert!(share.join("dir-from-guest").is_dir());
    let stderr = vm.stderr();
    assert!(!stderr.contains("virtio-fs"), "{stderr}");
    Ok(())
}
