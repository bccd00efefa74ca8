//! virtio-fs against Debian's virtiofsd and a real Linux guest: the guest (init =
//! tests/guests/fs_init.sh on a copy of rootfs.ext4) mounts the host directory by its tag, reads
//! a file the host wrote, writes one and makes a directory that the host then finds, and
//! unmounts. The device is found through the ACPI tables like every virtio-mmio device. With
//! `--share`, rvmm runs virtiofsd itself: a read-only share refuses the guest's writes on the
//! host side, and no virtiofsd outlives the VM. Host and guest see each other's renames,
//! removals, symlinks, mtimes and modes, a large directory, and a file the host makes while the
//! guest runs; a virtiofsd that dies under a running guest stops the VM with status 1.

mod common;

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{kvm_and_guest_or_skip, rootfs_with_programs, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(180);
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
const TAG: &str = "hostshare";
/// The mtime the host gives host-mtime.txt, and the one the guest gives guest-mtime.txt
/// (fs_init.sh's `touch -d @1600000000`).
const HOST_MTIME: u64 = 1_700_000_000;
const GUEST_MTIME: u64 = 1_600_000_000;
/// Files in the share's many/, which the guest counts.
const MANY: usize = 10_000;

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A copy of the guest's rootfs.ext4 with /fs_init.sh in its root.
fn fs_rootfs(guest: &Path, copy: &str) -> TestResult<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/fs_init.sh");
    rootfs_with_programs(
        guest,
        &format!("{copy}-rootfs.ext4"),
        &[(&script, "fs_init.sh")],
    )
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

/// The guest artifacts, a KVM that runs them and virtiofsd; otherwise the test skips.
fn guest_and_virtiofsd_or_skip(name: &str) -> Option<PathBuf> {
    let guest = kvm_and_guest_or_skip(name)?;
    if Path::new(VIRTIOFSD).exists() {
        return Some(guest);
    }
    let why = format!("no {VIRTIOFSD} (Debian's qemu-system-common)");
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{name}: {why}");
    }
    eprintln!("SKIPPED {name}: {why}");
    None
}

/// A fresh directory holding from-host.txt with `token`.
fn share_dir(name: &str, token: &str) -> PathBuf {
    let share = scratch(name);
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), format!("{token}\n")).unwrap();
    share
}

/// Boots the guest with fs_init.sh, its parameters `init_env` and the devices in `args`.
fn boot(guest: &Path, rootfs: &Path, init_env: &str, args: &[String]) -> TestResult<TestVm> {
    let cmdline = format!("console=ttyS0 reboot=k panic=1 init=/fs_init.sh {init_env}");
    let mut all = vec![
        "--kernel".to_string(),
        guest.join("vmlinux").display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--rootfs".into(),
        rootfs.display().to_string(),
    ];
    all.extend_from_slice(args);
    TestVm::boot(all)
}

/// The guest's side of one writable share, as fs_init.sh reports it.
fn guest_reads_and_writes(vm: &mut TestVm, host_token: &str, guest_token: &str) -> TestResult {
    vm.expect_line_within("Run /fs_init.sh as init process", BOOT_LIMIT)?;
    let mounted = guest_result(vm, "mounted")?;
    assert!(mounted.contains(" /mnt virtiofs rw"), "{mounted}");
    assert_eq!(guest_result(vm, "read")?, host_token);
    assert_eq!(guest_result(vm, "wrote")?, guest_token);
    let listed = guest_result(vm, "listed")?;
    assert!(
        listed.contains("dir-from-guest") && listed.contains("from-host.txt"),
        "{listed}"
    );
    Ok(())
}

/// What the guest wrote is on the host.
fn host_sees_the_guests_writes(share: &Path, guest_token: &str) {
    let written = std::fs::read_to_string(share.join("from-guest.txt")).unwrap();
    assert_eq!(written, format!("{guest_token}\n"));
    assert!(share.join("dir-from-guest").is_dir());
}

/// The virtiofsd processes whose command line names `dir`, as (pid, command line): with its
/// default namespace sandbox virtiofsd runs as a parent and a child.
fn virtiofsd_serving(dir: &Path) -> Vec<(i32, String)> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains("virtiofsd") && c.contains(&dir))
        .collect()
}

/// What the metadata checks of fs_init.sh (fs_meta=1) find in the share: a file with a known
/// mtime, one with mode 0640, a symlink, MANY files in many/, and files to rename and remove.
fn prepare_metadata(share: &Path) {
    let mtime = UNIX_EPOCH + Duration::from_secs(HOST_MTIME);
    let file = std::fs::File::create(share.join("host-mtime.txt")).unwrap();
    file.set_modified(mtime).unwrap();
    std::fs::write(share.join("host-0640.txt"), "mode\n").unwrap();
    std::fs::set_permissions(share.join("host-0640.txt"), Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("from-host.txt", share.join("host-link")).unwrap();
    std::fs::create_dir(share.join("many")).unwrap();
    for i in 0..MANY {
        std::fs::write(share.join(format!("many/f{i:05}")), "").unwrap();
    }
    std::fs::write(share.join("to-rename.txt"), "rename-me\n").unwrap();
    std::fs::write(share.join("to-remove.txt"), "remove-me\n").unwrap();
}

/// The guest's side of the metadata checks: what it saw of the host's files and of its own
/// changes, then a file the host makes only once the guest waits for it.
fn guest_sees_metadata_and_a_late_file(
    vm: &mut TestVm,
    share: &Path,
    host_token: &str,
) -> TestResult {
    assert_eq!(guest_result(vm, "host-mtime")?, HOST_MTIME.to_string());
    assert_eq!(guest_result(vm, "host-mode")?, "640");
    assert_eq!(
        guest_result(vm, "host-link")?,
        format!("from-host.txt {host_token}")
    );
    assert_eq!(guest_result(vm, "many")?, MANY.to_string());
    assert_eq!(guest_result(vm, "renamed")?, "rename-me");
    assert_eq!(guest_result(vm, "removed")?, "yes");
    assert_eq!(guest_result(vm, "linked")?, "from-guest.txt");
    assert_eq!(guest_result(vm, "touched")?, GUEST_MTIME.to_string());
    assert_eq!(guest_result(vm, "chmod")?, "751");
    vm.expect_line_within("RVMM-FS waiting", BOOT_LIMIT)?;
    // Made whole under another name and renamed into place: the polling guest never sees it
    // half-written.
    let late = format!("late-{}", std::process::id());
    std::fs::write(share.join(".late.tmp"), format!("{late}\n")).unwrap();
    std::fs::rename(share.join(".late.tmp"), share.join("late.txt")).unwrap();
    assert_eq!(guest_result(vm, "late")?, late);
    Ok(())
}

/// The guest's rename, removal, symlink, mtime and mode, as the host sees them.
fn host_sees_the_guests_changes(share: &Path) {
    assert!(!share.join("to-rename.txt").exists());
    assert_eq!(
        std::fs::read_to_string(share.join("renamed.txt")).unwrap(),
        "rename-me\n"
    );
    assert!(!share.join("to-remove.txt").exists());
    let link = std::fs::read_link(share.join("guest-link")).unwrap();
    assert_eq!(link, Path::new("from-guest.txt"));
    let touched = std::fs::metadata(share.join("guest-mtime.txt")).unwrap();
    assert_eq!(
        touched.modified().unwrap(),
        UNIX_EPOCH + Duration::from_secs(GUEST_MTIME)
    );
    let mode = std::fs::metadata(share.join("guest-0751.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o751, "mode {mode:o}");
}

#[test]
fn guest_mounts_a_host_directory_through_virtiofsd() -> TestResult {
    let name = "guest_mounts_a_host_directory_through_virtiofsd";
    let Some(guest) = guest_and_virtiofsd_or_skip(name) else {
        return Ok(());
    };
    let host_token = format!("host-{}", std::process::id());
    let guest_token = format!("guest-{}", std::process::id());
    let share = share_dir("virtiofs-share", &host_token);
    let socket = scratch("virtiofs.sock");
    let daemon = Virtiofsd::start(&share, &socket)?;
    let rootfs = fs_rootfs(&guest, "virtiofs")?;
    let mut vm = boot(
        &guest,
        &rootfs,
        &format!("fs_tag={TAG} fs_token={guest_token}"),
        &[
            "--fs".into(),
            format!("tag={TAG},socket={}", socket.display()),
        ],
    )?;
    guest_reads_and_writes(&mut vm, &host_token, &guest_token)?;
    vm.expect_line_within("RVMM-FS unmounted", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-FS done", BOOT_LIMIT)?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    drop(daemon);
    host_sees_the_guests_writes(&share, &guest_token);
    let stderr = vm.stderr();
    assert!(!stderr.contains("virtio-fs"), "{stderr}");
    Ok(())
}

#[test]
fn shares_run_their_own_virtiofsd_read_only_on_the_host_and_end_with_the_vm() -> TestResult {
    let name = "shares_run_their_own_virtiofsd_read_only_on_the_host_and_end_with_the_vm";
    let Some(guest) = guest_and_virtiofsd_or_skip(name) else {
        return Ok(());
    };
    let host_token = format!("shared-{}", std::process::id());
    let guest_token = format!("back-{}", std::process::id());
    let rw = share_dir("share-rw", &host_token);
    let ro = share_dir("share-ro", &host_token);
    let rootfs = fs_rootfs(&guest, "share")?;
    let mut vm = boot(
        &guest,
        &rootfs,
        &format!("fs_tag=rw fs_token={guest_token} fs_ro_tag=ro"),
        &[
            "--share".into(),
            format!("{},tag=rw", rw.display()),
            "--share".into(),
            format!("{},tag=ro,ro", ro.display()),
        ],
    )?;
    guest_reads_and_writes(&mut vm, &host_token, &guest_token)?;
    vm.expect_line_within("RVMM-FS unmounted", BOOT_LIMIT)?;
    assert_eq!(guest_result(&mut vm, "ro-read")?, host_token);
    let refused = guest_result(&mut vm, "ro-write")?;
    assert!(refused.contains("Read-only file system"), "{refused}");
    vm.expect_line_within("RVMM-FS done", BOOT_LIMIT)?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    host_sees_the_guests_writes(&rw, &guest_token);
    assert!(!ro.join("from-guest.txt").exists());
    // rvmm reaped its virtiofsd processes before it exited.
    let left = virtiofsd_serving(&rw);
    assert!(left.is_empty(), "still running: {left:?}");
    let stderr = vm.stderr();
    assert!(!stderr.contains("virtio"), "{stderr}");
    Ok(())
}

#[test]
fn host_and_guest_see_each_others_changes_while_the_vm_runs() -> TestResult {
    let name = "host_and_guest_see_each_others_changes_while_the_vm_runs";
    let Some(guest) = guest_and_virtiofsd_or_skip(name) else {
        return Ok(());
    };
    let host_token = format!("meta-{}", std::process::id());
    let guest_token = format!("guest-{}", std::process::id());
    let share = share_dir("share-meta", &host_token);
    prepare_metadata(&share);
    let rootfs = fs_rootfs(&guest, "meta")?;
    let mut vm = boot(
        &guest,
        &rootfs,
        &format!("fs_tag={TAG} fs_token={guest_token} fs_meta=1"),
        &["--share".into(), format!("{},tag={TAG}", share.display())],
    )?;
    guest_reads_and_writes(&mut vm, &host_token, &guest_token)?;
    guest_sees_metadata_and_a_late_file(&mut vm, &share, &host_token)?;
    vm.expect_line_within("RVMM-FS unmounted", BOOT_LIMIT)?;
    vm.expect_line_within("RVMM-FS done", BOOT_LIMIT)?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    host_sees_the_guests_changes(&share);
    Ok(())
}

/// Issue #17's contract: a backend that hangs up while the guest uses it ends rvmm with status
/// 1 and one line naming the device, and leaves no virtiofsd behind.
#[test]
fn a_virtiofsd_that_dies_under_a_busy_guest_stops_the_vm_with_status_1() -> TestResult {
    let name = "a_virtiofsd_that_dies_under_a_busy_guest_stops_the_vm_with_status_1";
    let Some(guest) = guest_and_virtiofsd_or_skip(name) else {
        return Ok(());
    };
    let share = share_dir("share-dies", "busy");
    let rootfs = fs_rootfs(&guest, "dies")?;
    let mut vm = boot(
        &guest,
        &rootfs,
        "fs_tag=dying fs_token=x fs_busy=1",
        &["--share".into(), format!("{},tag=dying", share.display())],
    )?;
    vm.expect_line_within("RVMM-FS busy", BOOT_LIMIT)?;
    let daemons = virtiofsd_serving(&share);
    assert!(
        !daemons.is_empty(),
        "no virtiofsd serves {}",
        share.display()
    );
    for (pid, _) in daemons {
        // SAFETY: plain kill(2) of a process this test found serving its own directory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = vm.wait_exit(Duration::from_secs(60))?;
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let said = stderr
        .lines()
        .filter(|l| l.contains("virtio-fs \"dying\"") && l.contains("hung up"))
        .count();
    assert_eq!(said, 1, "{stderr}");
    let left = virtiofsd_serving(&share);
    assert!(left.is_empty(), "still running: {left:?}");
    Ok(())
}
