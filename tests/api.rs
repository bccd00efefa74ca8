//! The API socket (`--api-socket PATH`) of a running VM, on a hand-written guest that prints a
//! line about five times a second: status, pause (the output stops), resume (it goes on), bad
//! requests (an error reply, the VM runs on), shutdown (rvmm ends with status 0 and removes
//! the socket), and a path that cannot be a socket (one line, status 1).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{api_request, kvm_or_skip, tiny_guest, TestResult, TestVm};

const LIMIT: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_running_vm_pauses_resumes_and_shuts_down_on_request() -> TestResult {
    if !kvm_or_skip("a_running_vm_pauses_resumes_and_shuts_down_on_request") {
        return Ok(());
    }
    let socket = scratch("api").join("api.sock");
    let kernel = tiny_guest("ticker");
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ])?;
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;
    let status = api_request(&socket, r#"{"request":"status"}"#)?;
    assert_eq!(
        status,
        r#"{"memory_mib":128,"ok":true,"state":"running","vcpus":2}"#
    );

    assert_eq!(
        api_request(&socket, r#"{"request":"pause"}"#)?,
        r#"{"ok":true,"state":"paused"}"#
    );
    // What the guest wrote before it stopped may still be on its way.
    vm.lines_during(Duration::from_millis(500));
    let while_paused = vm.lines_during(Duration::from_secs(2));
    assert_eq!(while_paused, 0, "the guest ran on while paused");
    assert!(api_request(&socket, r#"{"request":"status"}"#)?.contains(r#""state":"paused""#));
    let bad = api_request(&socket, "{\"request\":\"pause\"} trailing")?;
    assert!(bad.starts_with(r#"{"error":"bad request: "#), "{bad}");

    assert_eq!(
        api_request(&socket, r#"{"request":"resume"}"#)?,
        r#"{"ok":true,"state":"running"}"#
    );
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;

    assert_eq!(
        api_request(&socket, r#"{"request":"shutdown"}"#)?,
        r#"{"ok":true,"state":"shutdown"}"#
    );
    let exit = vm.wait_exit(LIMIT)?;
    assert_eq!(exit.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(!socket.exists(), "the socket was left behind");
    Ok(())
}

#[test]
fn an_api_socket_path_that_is_a_file_is_refused() -> TestResult {
    if !kvm_or_skip("an_api_socket_path_that_is_a_file_is_refused") {
        return Ok(());
    }
    let path = scratch("api-file").join("not-a-socket");
    std::fs::write(&path, "x").unwrap();
    let kernel = tiny_guest("ticker");
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--api-socket".as_ref(),
        path.as_os_str(),
    ])?;
    let exit = vm.wait_exit(LIMIT)?;
    let stderr = vm.stderr();
    assert_eq!(exit.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "rvmm: error: API socket: {} exists and is not a socket",
            path.display()
        )
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
    Ok(())
}

#[test]
fn a_paused_vm_is_snapshotted_and_restored() -> TestResult {
    if !kvm_or_skip("a_paused_vm_is_snapshotted_and_restored") {
        return Ok(());
    }
    let dir = scratch("api-snapshot");
    let socket = dir.join("api.sock");
    let kernel = tiny_guest("ticker");
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ])?;
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;
    let snap = dir.join("snap");
    let line = format!(r#"{{"request":"snapshot","dir":"{}"}}"#, snap.display());
    assert!(api_request(&socket, &line)?.contains("pause the VM before a snapshot"));
    api_request(&socket, r#"{"request":"pause"}"#)?;
    assert_eq!(
        api_request(&socket, &line)?,
        r#"{"ok":true,"state":"paused"}"#
    );
    api_request(&socket, r#"{"request":"shutdown"}"#)?;
    assert_eq!(vm.wait_exit(LIMIT)?.code(), Some(0));
    // Guest RAM is 128 MiB, of which the file stores only the pages in use.
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 128 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&memory) * 512 < 16 << 20);

    let restored = dir.join("restored.sock");
    let mut vm = restore_ticking(&snap, &restored)?;
    let status = api_request(&restored, r#"{"request":"status"}"#)?;
    assert!(status.contains(r#""state":"running""#), "{status}");
    // Again into the same directory, whose memory file the restored VM maps.
    api_request(&restored, r#"{"request":"pause"}"#)?;
    assert_eq!(
        api_request(&restored, &line)?,
        r#"{"ok":true,"state":"paused"}"#
    );
    api_request(&restored, r#"{"request":"resume"}"#)?;
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;
    api_request(&restored, r#"{"request":"shutdown"}"#)?;
    let exit = vm.wait_exit(LIMIT)?;
    assert_eq!(exit.code(), Some(0), "stderr: {}", vm.stderr());

    let mut vm = restore_ticking(&snap, &restored)?;
    api_request(&restored, r#"{"request":"shutdown"}"#)?;
    assert_eq!(vm.wait_exit(LIMIT)?.code(), Some(0));
    Ok(())
}

/// `rvmm restore SNAP` with its API socket at `socket`, once the guest ticks again.
fn restore_ticking(snap: &Path, socket: &Path) -> TestResult<TestVm> {
    let mut vm = TestVm::boot([
        "restore".as_ref(),
        snap.as_os_str(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ])?;
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;
    Ok(vm)
}
