//! Hand-written guests of a few instructions, assembled by the test and booted by the real
//! rvmm binary: vCPU set-up, port I/O dispatch, serial output, reset and stop paths.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, tiny_guest, TestResult, TestVm};

const LIMIT: Duration = Duration::from_secs(30);

fn boot_tiny(name: &str, extra: &[&str]) -> TestResult<TestVm> {
    let kernel = tiny_guest(name);
    let mut args = vec!["--kernel".to_string(), kernel.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    TestVm::boot(args)
}

#[test]
fn serial_output_reaches_stdout_and_i8042_reset_exits_zero() -> TestResult {
    if !kvm_or_skip("serial_output_reaches_stdout_and_i8042_reset_exits_zero") {
        return Ok(());
    }
    let mut vm = boot_tiny("hello", &[])?;
    vm.expect_line_within("RVMM-TINY hello from a hand-written guest", LIMIT)?;
    let status = vm.wait_exit(LIMIT)?;
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    Ok(())
}

#[test]
fn entry_state_follows_the_64bit_boot_protocol() -> TestResult {
    if !kvm_or_skip("entry_state_follows_the_64bit_boot_protocol") {
        return Ok(());
    }
    for cpus in ["1", "4"] {
        let mut vm = boot_tiny("entry_state", &["--cpus", cpus, "--memory", "64"])?;
        let line = vm.expect_line_within("RVMM-ENTRY", LIMIT)?;
        assert_eq!(line, "RVMM-ENTRY ok", "with {cpus} vCPUs");
        assert_eq!(vm.wait_exit(LIMIT)?.code(), Some(0));
    }
    Ok(())
}

#[test]
fn entry_state_with_memory_above_the_mmio_hole() -> TestResult {
    if !kvm_or_skip("entry_state_with_memory_above_the_mmio_hole") {
        return Ok(());
    }
    // 4 GiB of guest RAM is split around the 32-bit MMIO hole; mappings are lazy, so this
    // costs the host nothing.
    let mut vm = boot_tiny("entry_state", &["--memory", "4096"])?;
    assert_eq!(vm.expect_line_within("RVMM-ENTRY", LIMIT)?, "RVMM-ENTRY ok");
    assert_eq!(vm.wait_exit(LIMIT)?.code(), Some(0));
    Ok(())
}

#[test]
fn triple_fault_ends_rvmm_with_zero() -> TestResult {
    if !kvm_or_skip("triple_fault_ends_rvmm_with_zero") {
        return Ok(());
    }
    let mut vm = boot_tiny("bad_insn", &[])?;
    let status = vm.wait_exit(LIMIT)?;
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    let said = vm.stderr();
    assert!(
        said.contains("rvmm: warn: the guest reset itself by a triple fault")
            && said.contains("rip="),
        "stderr: {said}"
    );
    Ok(())
}

#[test]
fn sigterm_stops_a_spinning_guest() -> TestResult {
    if !kvm_or_skip("sigterm_stops_a_spinning_guest") {
        return Ok(());
    }
    for cpus in ["1", "2"] {
        let mut vm = boot_tiny("spin", &["--cpus", cpus])?;
        vm.expect_line_within("RVMM-TINY spinning", LIMIT)?;
        vm.signal(libc::SIGTERM);
        let status = vm.wait_exit(Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.stderr());
    }
    Ok(())
}
