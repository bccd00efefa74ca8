//! `--balloon`: memory the guest frees goes back to the host. The guest fills 200 MiB of tmpfs
//! and frees it; free page reporting hands the pages to rvmm, which discards them, and the VM
//! process's resident memory falls back within 10 s. Needs a KVM that runs guest user space.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{kvm_and_guest_or_skip, rootfs_with_programs, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How soon after the guest freed its memory the host must have it back (the guest reports
/// free pages 2 s after they were freed).
const GIVE_BACK_LIMIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

/// VmRSS of `pid`, in bytes.
fn rss(pid: u32) -> TestResult<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .ok_or(format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

fn boot(guest: &Path, rootfs: &Path, balloon: bool) -> TestResult<TestVm> {
    let kernel = guest.join("vmlinux").display().to_string();
    let rootfs = rootfs.display().to_string();
    let mut args = vec![
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 init=/balloon_init.sh",
        "--rootfs",
        &rootfs,
        "--memory",
        "512",
    ];
    if balloon {
        args.push("--balloon");
    }
    TestVm::boot(args)
}

/// Runs the guest's fill-and-free; the VM's RSS when filled and the lowest seen within
/// [`GIVE_BACK_LIMIT`] after it freed.
fn fill_and_free(vm: &mut TestVm) -> TestResult<(u64, u64)> {
    vm.expect_line_within("RVMM-BALLOON filled", BOOT_LIMIT)?;
    let filled = rss(vm.pid())?;
    vm.expect_line_within("RVMM-BALLOON freed", BOOT_LIMIT)?;
    let freed_at = Instant::now();
    let mut lowest = rss(vm.pid())?;
    while freed_at.elapsed() < GIVE_BACK_LIMIT && filled - lowest.min(filled) < 150 * MIB {
        std::thread::sleep(Duration::from_millis(250));
        lowest = lowest.min(rss(vm.pid())?);
    }
    vm.expect_line_within("RVMM-BALLOON done", BOOT_LIMIT)?;
    let status = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    Ok((filled, lowest))
}

#[test]
fn freed_guest_memory_goes_back_to_the_host() -> TestResult {
    let name = "freed_guest_memory_goes_back_to_the_host";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/balloon_init.sh");
    let rootfs = rootfs_with_programs(
        &guest,
        "balloon-rootfs.ext4",
        &[(&script, "balloon_init.sh")],
    )?;

    let mut vm = boot(&guest, &rootfs, true)?;
    vm.expect_line_within("RVMM-BALLOON driver bound", BOOT_LIMIT)?;
    let (filled, lowest) = fill_and_free(&mut vm)?;
    eprintln!(
        "NOTE with --balloon: RSS {} MiB filled, {} MiB within {GIVE_BACK_LIMIT:?} of the free",
        filled / MIB,
        lowest / MIB
    );
    assert!(
        filled - lowest.min(filled) >= 150 * MIB,
        "RSS {filled} → {lowest}: the 200 MiB did not come back"
    );

    // Without the balloon the same memory stays with the VM: the figure above is the device's.
    let mut vm = boot(&guest, &rootfs, false)?;
    let (filled, lowest) = fill_and_free(&mut vm)?;
    eprintln!(
        "NOTE without: RSS {} MiB filled, {} MiB after",
        filled / MIB,
        lowest / MIB
    );
    assert!(
        filled - lowest.min(filled) < 50 * MIB,
        "RSS {filled} → {lowest}"
    );
    Ok(())
}
