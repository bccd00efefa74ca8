//! The jailed VMM (`--jail`), on a hand-written guest that prints a line five times a second:
//! once the VM runs, rvmm cannot open a host file that anyone may read (the test build's probe
//! tries, from inside the jail); its root holds only the socket directory; it has new mount
//! and IPC namespaces, no capabilities, no_new_privs and seccomp, and, started as root, runs as
//! nobody. The API socket in the kept directory still serves, and is removed at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{api_request, kvm_or_skip, tiny_guest, TestResult, TestVm};

const LIMIT: Duration = Duration::from_secs(60);
/// A file every user may read, outside the jail.
const PROBED: &str = "/etc/passwd";
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// A directory of its own for the sockets, which the jailed VMM's user may write (to remove
/// them at the end).
fn socket_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    dir
}

/// The `Name:` line of /proc/PID/status, without the name.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_default();
    line[name.len() + 1..]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_jailed_vmm_reaches_nothing_but_its_sockets() -> TestResult {
    if !kvm_or_skip("a_jailed_vmm_reaches_nothing_but_its_sockets") {
        return Ok(());
    }
    std::fs::File::open(PROBED).map_err(|e| format!("{PROBED}: {e}"))?;
    let dir = socket_dir();
    let socket = dir.join("api.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
    cmd.arg("--kernel")
        .arg(tiny_guest("ticker"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--jail")
        .env("RVMM_TEST_JAIL_PROBE", PROBED);
    let mut vm = TestVm::spawn(cmd)?;
    vm.expect_line_within("RVMM-TINY tick", LIMIT)?;
    let pid = vm.pid();

    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    if is_root() {
        assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
        assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
        assert_eq!(status_field(pid, "Groups"), "");
    }
    for kind in ["mnt", "ipc"] {
        assert_ne!(namespace(&pid.to_string(), kind), namespace("self", kind));
    }
    // The jail's root: the first component of the socket directory's path, and nothing else.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let entries: Vec<_> = std::fs::read_dir(&root)
        .map_err(|e| e.to_string())?
        .map(|e| e.unwrap().file_name())
        .collect();
    let first = dir.canonicalize().unwrap();
    let first = first.components().nth(1).unwrap().as_os_str().to_owned();
    assert_eq!(entries, vec![first]);
    assert!(root
        .join(dir.strip_prefix("/").unwrap())
        .join("api.sock")
        .exists());

    let status = api_request(&socket, r#"{"request":"status"}"#)?;
    assert!(status.contains(r#""state":"running""#), "{status}");
    api_request(&socket, r#"{"request":"shutdown"}"#)?;
    let exit = vm.wait_exit(LIMIT)?;
    let said = vm.stderr();
    assert_eq!(exit.code(), Some(0), "stderr: {said}");
    // (stderr is read once rvmm has ended.)
    assert!(
        said.contains(&format!(
            "rvmm: jail probe: {PROBED}: No such file or directory"
        )),
        "the probe's line is missing: {said}"
    );
    assert!(!socket.exists(), "the API socket was left behind");
    assert!(
        !dir.join("v.sock").exists(),
        "the vsock socket was left behind"
    );
    Ok(())
}

#[test]
fn a_jail_that_would_keep_the_root_is_refused() -> TestResult {
    if !kvm_or_skip("a_jail_that_would_keep_the_root_is_refused") {
        return Ok(());
    }
    let mut vm = TestVm::boot([
        "--kernel".as_ref(),
        tiny_guest("ticker").as_os_str(),
        "--api-socket".as_ref(),
        "/rvmm-jail-test.sock".as_ref(),
        "--jail-user".as_ref(),
        "1000:1000".as_ref(),
    ])?;
    let exit = vm.wait_exit(LIMIT)?;
    let stderr = vm.stderr();
    assert_eq!(exit.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim(),
        "rvmm: error: --jail: /rvmm-jail-test.sock is in /, which the jail would have to keep: \
         put the sockets in a directory of their own"
    );
    assert!(!Path::new("/rvmm-jail-test.sock").exists());
    Ok(())
}
