//! A thread under rvmm's seccomp filter that makes a forbidden system call ends the process
//! with one clear line on stderr and status 1. The test re-runs itself as a child process,
//! which installs the same filters rvmm installs and then tries to exec a program. And rvmm's
//! own stop path runs under the filters: it removes its vsock socket.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{kvm_or_skip, tiny_guest, TestResult, TestVm};

use rvmm_vmm::seccomp::{Filters, ThreadKind};
use rvmm_vmm::terminal::RawTerminal;

const TEST: &str = "forbidden_syscall_ends_the_process_with_a_clear_line";
const CHILD_ENV: &str = "RVMM_SECCOMP_TEST_KIND";
const KINDS: [ThreadKind; 3] = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices];

/// In the child: restrict a thread as `kind`, then make a call no thread kind may make.
fn forbidden_call_as(kind_name: &str) -> ! {
    let kind = KINDS
        .into_iter()
        .find(|k| k.name() == kind_name)
        .expect("a known thread kind");
    // As rvmm does; when stdin is a terminal, the SIGSYS handler must restore it.
    let _terminal = RawTerminal::enter();
    let filters = Filters::new().expect("filters compile");
    let thread = std::thread::spawn(move || {
        filters.apply(kind).expect("filter installs");
        let path = c"/bin/true".as_ptr();
        let argv = [path, std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // SAFETY: execve with valid NUL-terminated strings and NULL-terminated arrays.
        unsafe { libc::execve(path, argv.as_ptr(), envp.as_ptr()) };
    });
    let _ = thread.join();
    panic!("the {kind_name} thread survived a forbidden execve");
}

#[test]
fn forbidden_syscall_ends_the_process_with_a_clear_line() {
    if let Ok(kind) = std::env::var(CHILD_ENV) {
        forbidden_call_as(&kind);
    }
    for kind in KINDS {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, kind.name())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{kind:?}: {stderr}");
        let expected = format!(
            "rvmm: error: seccomp: the {} thread made a forbidden system call, number {} \
             (--seccomp off disables the filters)",
            kind.name(),
            libc::SYS_execve
        );
        assert_eq!(stderr.trim_end(), expected, "{kind:?}");
    }
}

#[test]
fn sigterm_under_seccomp_removes_the_vsock_socket() -> TestResult {
    if !kvm_or_skip("sigterm_under_seccomp_removes_the_vsock_socket") {
        return Ok(());
    }
    let sock = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("seccomp-stop.sock");
    let _ = std::fs::remove_file(&sock);
    let kernel = tiny_guest("spin").display().to_string();
    let vsock = format!("cid=3,uds={}", sock.display());
    let mut vm = TestVm::boot(["--kernel", &kernel, "--vsock", &vsock, "--rng"])?;
    vm.expect_line("RVMM-TINY spinning")?;
    assert!(sock.exists(), "no vsock socket while rvmm runs");
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.stderr());
    assert!(!vm.stderr().contains("seccomp"), "{}", vm.stderr());
    assert!(!sock.exists(), "the vsock socket was left behind");
    Ok(())
}
