//! The in-guest kernel self-test (resources/selftest): the test kernel exercises rvmm's devices
//! through Linux's own drivers and prints one line per check; this side runs the host half of
//! each check and asserts every line, in one boot. It covers what only the guest kernel sees
//! (a read past the page cache, the block layer's view of a read-only disk, GET_ID, discard,
//! flush, hvc0, the ACPI tables as parsed); net, vsock and rng are tested from guest user
//! space in net.rs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    debugfs_cat, kvm_and_guest_or_skip, selftest_hvc_args, selftest_pattern as expected_pattern,
    TestResult, TestVm, SELFTEST_PATTERN_LEN as PATTERN_LEN,
};

const BOOT_LIMIT: Duration = Duration::from_secs(120);
const DATA_SERIAL: &str = "rvmm-data-1";

/// Reads `RVMM-SELFTEST ...` lines up to and including the `done` line.
fn selftest_lines(vm: &mut TestVm) -> TestResult<Vec<String>> {
    let mut results = Vec::new();
    loop {
        let line = vm.expect_line_within("RVMM-SELFTEST ", BOOT_LIMIT)?;
        let done = line.contains("RVMM-SELFTEST done");
        results.push(line);
        if done {
            return Ok(results);
        }
    }
}

/// The rest of the line after `RVMM-SELFTEST <check> ` (starts with "ok" or "fail").
fn check_result(results: &[String], check: &str) -> String {
    let tag = format!("RVMM-SELFTEST {check} ");
    results
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no {check} line in {results:#?}"))
}

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn sized_file(name: &str, len: u64) -> PathBuf {
    let path = scratch(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

#[test]
fn block_and_console_selftest_in_the_guest_kernel() -> TestResult {
    let name = "block_and_console_selftest_in_the_guest_kernel";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    let rootfs = scratch("selftest-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let data = sized_file("selftest-data.img", 10_000_000);
    let discard = sized_file("selftest-scratch.img", 8 << 20);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
    cmd.env("RUST_LOG", "rvmm_devices::legacy::acpi_sleep=info");
    cmd.args(selftest_hvc_args(
        &guest,
        "blk,console,acpi rvmm_selftest.poweroff=1",
    ));
    cmd.args([
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--disk".into(),
        format!("{},ro,serial={DATA_SERIAL}", data.display()),
        "--disk".into(),
        discard.display().to_string(),
    ]);
    let mut vm = TestVm::spawn(cmd)?;
    // hvc0 carries the whole console here; Linux's virtio-console drops the boot log replayed
    // before its port is ready, so the first lines to expect are the self-test's own.
    let results = selftest_lines(&mut vm)?;
    eprintln!("NOTE {name}: self-test done after {:.0?}", vm.elapsed());
    // The self-test powers the guest off: ACPI S5 through rvmm's sleep control register ends
    // rvmm with 0 (not the i8042 reset). The kernel's own "reboot: Power down" need not reach
    // hvc0 (the kernel shuts its devices down first); rvmm's log line is the proof.
    let status = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    assert!(
        vm.stderr().contains("guest powered off (ACPI S5)"),
        "{}",
        vm.stderr()
    );

    let result = |check: &str| check_result(&results, check);
    for check in [
        "blk-write",
        "blk-flush",
        "blk-ro",
        "blk-serial",
        "blk-discard",
        "console",
        "acpi",
    ] {
        assert!(
            result(check).starts_with("ok"),
            "{check}: {}",
            result(check)
        );
    }
    assert!(result("blk-serial").contains(&format!("vdb={DATA_SERIAL}")));
    assert!(result("done").contains("failed=0"), "{}", result("done"));
    // Every table /sys/firmware/acpi/tables would list, and one LNRO0005 device per virtio
    // device (vda, vdb, vdc, hvc0) found without command-line hints.
    assert!(
        result("acpi").contains("tables=FACP,APIC,DSDT, oem=RVMM LNRO0005=4"),
        "{}",
        result("acpi")
    );
    // hvc0 output reached rvmm's stdout.
    assert!(
        vm.console()
            .iter()
            .any(|l| l.contains("RVMM-SELFTEST-HVC hello from hvc0")),
        "no hvc0 line on stdout"
    );

    // The host half: the flushed file is really in the image, and the discard freed blocks.
    assert_eq!(
        debugfs_cat(&rootfs, "/rvmm-selftest.dat")?,
        expected_pattern()
    );
    let blocks = std::fs::metadata(&discard).unwrap().blocks();
    assert_eq!(
        blocks, 0,
        "discarded range still allocated in the scratch image"
    );
    Ok(())
}

#[test]
fn pattern_is_64_kib_of_numbered_lines() {
    let p = expected_pattern();
    assert_eq!(p.len(), PATTERN_LEN);
    assert!(p.starts_with(b"rvmm-selftest 000000\nrvmm-selftest 000001\n"));
}
