//! Snapshot and restore (the API socket's `snapshot`, `rvmm restore`), on the plain Linux
//! guest counting on its console and into its own sector of a scratch disk: a snapshot of the
//! paused guest, restored twice from the same files, goes on from the same number both times,
//! and each copy of the disk holds every number written before and after; a snapshot whose
//! state was altered, or that another rvmm made, is refused with one line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{api_request, kvm_and_guest_or_skip, rootfs_with_programs, TestResult, TestVm};

const LIMIT: Duration = Duration::from_secs(180);
const SECTOR: u64 = 512;

fn scratch() -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number on a `RVMM-COUNT N` line.
fn count(line: &str) -> u32 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits for the next count line; returns its number.
fn next_count(vm: &mut TestVm) -> TestResult<u32> {
    Ok(count(&vm.expect_line_within("RVMM-COUNT ", LIMIT)?))
}

/// Every sector 1..=last of the disk image holds its own number.
fn check_disk(image: &Path, last: u32) -> TestResult {
    let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
    for n in 1..=last {
        let at = (u64::from(n) * SECTOR) as usize;
        let want = format!("{n:08}\n");
        let got = String::from_utf8_lossy(&bytes[at..at + want.len()]);
        if got != want {
            return Err(format!("{}: sector {n} holds {got:?}", image.display()));
        }
    }
    Ok(())
}

fn restore(dir: &Path, disk: &Path, socket: &Path) -> TestResult<TestVm> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
    cmd.arg("restore")
        .arg(dir)
        .arg("--disk")
        .arg(format!("1={}", disk.display()))
        .arg("--api-socket")
        .arg(socket);
    TestVm::spawn(cmd)
}

#[test]
fn a_snapshot_restores_twice_to_the_same_point() -> TestResult {
    let test = "a_snapshot_restores_twice_to_the_same_point";
    let Some(guest) = kvm_and_guest_or_skip(test) else {
        return Ok(());
    };
    let dir = scratch();
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/snapshot_init.sh");
    let name = format!("{}/root.ext4", dir.file_name().unwrap().to_string_lossy());
    let root = rootfs_with_programs(&guest, &name, &[(&init, "snapshot_init.sh")])?;
    let disk = dir.join("counts.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let socket = dir.join("api.sock");
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        guest.join("vmlinux").as_os_str(),
        "--cmdline".as_ref(),
        "console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/snapshot_init.sh".as_ref(),
        "--disk".as_ref(),
        format!("{},ro", root.display()).as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--memory".as_ref(),
        "256".as_ref(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ])?;
    vm.expect_line_within("RVMM-COUNT 5", LIMIT)?;

    let running = api_request(&socket, &snapshot_line(&dir.join("early")))?;
    assert!(
        running.contains("pause the VM before a snapshot"),
        "{running}"
    );
    assert!(api_request(&socket, r#"{"request":"pause"}"#)?.contains(r#""ok":true"#));
    // The lines written before the pause.
    vm.lines_during(Duration::from_millis(500));
    let before = vm
        .console()
        .iter()
        .rev()
        .find(|l| l.contains("RVMM-COUNT "));
    let before = count(before.unwrap());
    let snap = dir.join("snap");
    let taken = api_request(&socket, &snapshot_line(&snap))?;
    assert_eq!(taken, r#"{"ok":true,"state":"paused"}"#);
    let bad = api_request(&socket, &snapshot_line(Path::new("/proc/rvmm-no")))?;
    assert!(bad.contains(r#""ok":false"#), "{bad}");
    // The disk as the snapshot knows it, once for each restore.
    let (disk_a, disk_b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::copy(&disk, &disk_a).unwrap();
    std::fs::copy(&disk, &disk_b).unwrap();
    api_request(&socket, r#"{"request":"shutdown"}"#)?;
    assert_eq!(vm.wait_exit(LIMIT)?.code(), Some(0));

    let mut firsts = Vec::new();
    for image in [&disk_a, &disk_b] {
        let socket = dir.join("restored.sock");
        let mut vm = restore(&snap, image, &socket)?;
        let first = next_count(&mut vm)?;
        let mut last = first;
        while last < first + 5 {
            let n = next_count(&mut vm)?;
            assert_eq!(n, last + 1, "the count skipped");
            last = n;
        }
        api_request(&socket, r#"{"request":"shutdown"}"#)?;
        let exit = vm.wait_exit(LIMIT)?;
        assert_eq!(exit.code(), Some(0), "stderr: {}", vm.stderr());
        check_disk(image, last)?;
        firsts.push(first);
    }
    // (+2 when the pause fell inside a line, whose end the restored guest writes.)
    assert!(
        (before + 1..=before + 2).contains(&firsts[0]),
        "the restored guest did not go on where it was: {before}, then {}",
        firsts[0]
    );
    assert_eq!(firsts[0], firsts[1]);
    refuses_altered_snapshots(&snap, &disk_a)
}

fn snapshot_line(dir: &Path) -> String {
    format!(r#"{{"request":"snapshot","dir":"{}"}}"#, dir.display())
}

/// A changed byte fails the checksum; a snapshot from another rvmm version (with a
/// checksum to match) is refused by name.
fn refuses_altered_snapshots(snap: &Path, disk: &Path) -> TestResult {
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    let sum = std::fs::read_to_string(snap.join("state.sha256")).unwrap();
    let socket = snap.join("refused.sock");
    let altered = state.replacen("\"clock_ns\":", "\"clock_ns\":1", 1);
    std::fs::write(snap.join("state.json"), &altered).unwrap();
    let said = refused(snap, disk, &socket)?;
    assert_eq!(
        said,
        format!(
            "rvmm: error: snapshot {}: its state does not match its checksum",
            snap.display()
        )
    );
    let version = format!("\"rvmm\":\"{}\"", env!("CARGO_PKG_VERSION"));
    let foreign = state.replacen(&version, "\"rvmm\":\"0.0.0\"", 1);
    std::fs::write(snap.join("state.json"), &foreign).unwrap();
    let out = Command::new("sha256sum")
        .arg(snap.join("state.json"))
        .output()
        .unwrap();
    let digest = String::from_utf8_lossy(&out.stdout);
    std::fs::write(snap.join("state.sha256"), digest.split(' ').next().unwrap()).unwrap();
    let said = refused(snap, disk, &socket)?;
    assert_eq!(
        said,
        format!(
            "rvmm: error: snapshot {}: its rvmm version is 0.0.0, here it is {}",
            snap.display(),
            env!("CARGO_PKG_VERSION")
        )
    );
    std::fs::write(snap.join("state.json"), state).unwrap();
    std::fs::write(snap.join("state.sha256"), sum).unwrap();
    Ok(())
}

/// A restore that must fail at once: its one stderr line.
fn refused(snap: &Path, disk: &Path, socket: &Path) -> TestResult<String> {
    let mut vm = restore(snap, disk, socket)?;
    let exit = vm.wait_exit(LIMIT)?;
    let stderr = vm.stderr();
    assert_eq!(exit.code(), Some(1), "stderr: {stderr}");
    assert!(!socket.exists());
    Ok(stderr.trim().to_string())
}
