//! The in-guest kernel self-test (resources/selftest): the test kernel exercises rvmm's devices
//! through Linux's own drivers and prints one line per check; this side runs the host half of
//! each check and asserts every line, in a single boot.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{guest_artifacts, kvm_or_skip, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(300);
const DATA_SERIAL: &str = "rvmm-data-1";
/// What the self-test writes to /rvmm-selftest.dat on the root filesystem.
const PATTERN_LEN: usize = 65536;

fn expected_pattern() -> Vec<u8> {
    let mut out = Vec::with_capacity(PATTERN_LEN + 32);
    let mut n = 0u32;
    while out.len() < PATTERN_LEN {
        out.extend_from_slice(format!("rvmm-selftest {n:06}\n").as_bytes());
        n += 1;
    }
    out.truncate(PATTERN_LEN);
    out
}

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn sized_file(name: &str, len: u64) -> PathBuf {
    let path = scratch(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

/// Reads a file out of an ext4 image with debugfs (e2fsprogs), as the host sees it.
fn debugfs_cat(image: &Path, file: &str) -> TestResult<Vec<u8>> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(image)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "debugfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

#[test]
fn block_and_console_selftest_in_the_guest_kernel() -> TestResult {
    let name = "block_and_console_selftest_in_the_guest_kernel";
    if !kvm_or_skip(name) {
        return Ok(());
    }
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    let rootfs = scratch("selftest-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let data = sized_file("selftest-data.img", 10_000_000);
    let discard = sized_file("selftest-scratch.img", 8 << 20);
    let mut vm = TestVm::boot([
        "--kernel".to_string(),
        guest.join("vmlinux-selftest").display().to_string(),
        "--console".into(),
        "virtio".into(),
        "--cmdline".into(),
        "console=hvc0 reboot=k panic=1 rvmm_selftest=blk,console".into(),
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--disk".into(),
        format!("{},ro,serial={DATA_SERIAL}", data.display()),
        "--disk".into(),
        discard.display().to_string(),
    ])?;
    // hvc0 carries the whole console here; Linux's virtio-console drops the boot log replayed
    // before its port is ready, so the first lines to expect are the self-test's own.
    let first = vm.expect_line_within("RVMM-SELFTEST ", BOOT_LIMIT)?;
    eprintln!(
        "NOTE {name}: first self-test line after {:.0?}",
        vm.elapsed()
    );
    let mut results = vec![first];
    loop {
        let line = vm.expect_line_within("RVMM-SELFTEST ", BOOT_LIMIT)?;
        let done = line.contains("RVMM-SELFTEST done");
        results.push(line);
        if done {
            break;
        }
    }
    let status = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());

    let result = |check: &str| -> String {
        let tag = format!("RVMM-SELFTEST {check} ");
        results
            .iter()
            .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest.to_string()))
            .unwrap_or_else(|| panic!("no {check} line in {results:#?}"))
    };
    for check in [
        "blk-write",
        "blk-flush",
        "blk-ro",
        "blk-serial",
        "blk-discard",
        "console",
    ] {
        assert!(
            result(check).starts_with("ok"),
            "{check}: {}",
            result(check)
        );
    }
    assert!(result("blk-serial").contains(&format!("vdb={DATA_SERIAL}")));
    assert!(result("done").contains("failed=0"), "{}", result("done"));
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
