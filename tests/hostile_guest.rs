//! A hostile guest (`tests/guests/hostile_virtio.S`) programs the virtio-mmio registers itself
//! and posts malformed descriptor chains to a disk and a net device: buffers outside RAM,
//! absurd lengths, loops, wrong directions, too many descriptors, a head index beyond the
//! queue. rvmm must fail each request, keep both devices running, and serve the valid requests
//! that follow. Before that, rings outside RAM must fail activation with DEVICE_NEEDS_RESET,
//! and a reset must bring the device back.

mod common;

use std::time::Duration;

use common::{can_make_namespaces, kvm_or_skip, tiny_guest, NetNs, TestResult, TestVm};

const LIMIT: Duration = Duration::from_secs(120);
const SECTOR1: &str = "RVMM-DISK-SECTOR1";
/// What the guest prints, in order, when every hostile request was refused properly.
const CASES: [&str; 16] = [
    "blk-rings-outside-ram-needs-reset",
    "blk-outside-ram",
    "blk-absurd-length",
    "blk-loop",
    "blk-wrong-direction",
    "blk-sector-past-end",
    "blk-too-many-descriptors",
    "blk-bad-head-then-valid-read",
    "net-outside-ram",
    "net-wrong-direction",
    "net-too-short",
    "net-absurd-length",
    "net-loop",
    "net-valid-frame",
    "device-status",
    "read:",
];

#[test]
fn hostile_descriptor_chains_fail_and_valid_requests_still_work() -> TestResult {
    let name = "hostile_descriptor_chains_fail_and_valid_requests_still_work";
    if !kvm_or_skip(name) || !can_make_namespaces(name) {
        return Ok(());
    }
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let disk = tmp.join(format!("hostile-{}.img", std::process::id()));
    let mut image = vec![0u8; 1 << 20];
    image[512..512 + SECTOR1.len() + 1].copy_from_slice(format!("{SECTOR1}\n").as_bytes());
    std::fs::write(&disk, &image).map_err(|e| format!("{}: {e}", disk.display()))?;

    let ns = NetNs::create("tap0", "172.30.95.1")?;
    let kernel = tiny_guest("hostile_virtio").display().to_string();
    let mut cmd = ns.command(&[env!("CARGO_BIN_EXE_rvmm")]);
    cmd.args(["--kernel", &kernel, "--disk", &disk.display().to_string()])
        .args(["--net", "tap=tap0"]);
    let mut vm = TestVm::spawn(cmd)?;

    for case in CASES {
        let line = vm.expect_line_within("RVMM-HOSTILE", LIMIT)?;
        let want = if case == "read:" {
            format!("RVMM-HOSTILE read: {SECTOR1}")
        } else {
            format!("RVMM-HOSTILE {case} ok")
        };
        assert_eq!(line, want, "stderr: {}", vm.stderr());
    }
    let status = vm.wait_exit(LIMIT)?;
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(!vm.stderr().contains("panicked"), "{}", vm.stderr());

    // Only the valid frame reached the TAP: the host's side counts it as received.
    let rx = ns.run(&["cat", "/sys/class/net/tap0/statistics/rx_packets"], true)?;
    assert_eq!(rx.trim(), "1", "frames the TAP received from the guest");
    let _ = std::fs::remove_file(&disk);
    Ok(())
}
