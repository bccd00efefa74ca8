//! Full Linux boots of the kernels resources/ builds, checked through kernel-log milestones and
//! the init marker with the right CPU and memory counts, and a guest kernel panic seen as one.
//! They need a KVM that runs guest user space (resources/test.sh finds one).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{initramfs_with_init, kvm_and_guest_or_skip, TestResult, TestVm};

/// Generous: the nested KVM of CI runs under TCG.
const BOOT_LIMIT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u64 = 256;

/// Kernel messages that must appear, in this order, on every host (the memory line between
/// the first two groups is checked separately).
const EARLY_MILESTONES: &[&str] = &[
    "Linux version 6.1",
    "Command line: console=ttyS0",
    // Linux prefers the MADT to the MP table, which rvmm writes as well.
    "ACPI: Using ACPI (MADT) for SMP configuration information",
];
const LATE_MILESTONES: &[&str] = &[
    "smp: Brought up 1 node, 2 CPUs",
    "Serial: 8250/16550 driver",
    "Run /init as init process",
];

fn boot_args(kernel: &Path, initrd: &Path) -> Vec<String> {
    vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        MEMORY_MIB.to_string(),
    ]
}

/// `Memory: 215876K/261752K available (…)`: the second figure is what e820 gave the kernel.
fn memory_total_kib(line: &str) -> Option<u64> {
    let rest = line.split("Memory: ").nth(1)?;
    let total = rest.split('/').nth(1)?.split('K').next()?;
    total.parse().ok()
}

/// Boots `kernel` with the initramfs and checks every milestone, then the end of init.
fn boot_to_init(name: &str, kernel: &str, extra_cmdline: &str) -> TestResult {
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    let mut args = boot_args(&guest.join(kernel), &guest.join("initramfs.cpio"));
    args.extend([
        "--cmdline".to_string(),
        format!("console=ttyS0 reboot=k panic=1 {extra_cmdline}"),
    ]);
    let mut vm = TestVm::boot(args)?;
    for milestone in EARLY_MILESTONES {
        vm.expect_line_within(milestone, BOOT_LIMIT)?;
    }
    let memory = vm.expect_line_within("Memory: ", BOOT_LIMIT)?;
    let total = memory_total_kib(&memory).ok_or(format!("unparsable: {memory}"))?;
    // The e820 map holds all of RAM but the EBDA/BIOS hole below 1 MiB.
    assert!(
        (MEMORY_MIB * 1024 - 1024..=MEMORY_MIB * 1024).contains(&total),
        "kernel saw {total} KiB of {MEMORY_MIB} MiB"
    );
    for milestone in LATE_MILESTONES {
        vm.expect_line_within(milestone, BOOT_LIMIT)?;
    }
    vm.expect_line_within("RVMM-INIT uptime=", BOOT_LIMIT)?;
    let counts = vm.expect_line_within("RVMM-INIT nproc=", BOOT_LIMIT)?;
    assert!(counts.contains("nproc=2 "), "{counts}");
    let status = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    Ok(())
}

#[test]
fn elf_vmlinux_boots_to_init_with_2_cpus_and_256_mib() -> TestResult {
    boot_to_init(
        "elf_vmlinux_boots_to_init_with_2_cpus_and_256_mib",
        "vmlinux",
        "",
    )
}

/// The bzImage is entered at its 64-bit entry point and decompresses itself first; its
/// decompressor talks on the UART when earlyprintk names it.
#[test]
fn bzimage_boots_to_init_with_2_cpus_and_256_mib() -> TestResult {
    boot_to_init(
        "bzimage_boots_to_init_with_2_cpus_and_256_mib",
        "bzImage",
        "earlyprintk=serial",
    )
}

/// An init that exits makes the kernel panic; with `panic=1` it would reboot a second later,
/// which must not pass for a clean stop: pvpanic tells rvmm, which says so and exits with 3.
#[test]
fn a_guest_kernel_panic_is_an_error_with_its_own_status() -> TestResult {
    let name = "a_guest_kernel_panic_is_an_error_with_its_own_status";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    let initrd = initramfs_with_init("exit_init");
    let mut vm = TestVm::boot(boot_args(&guest.join("vmlinux"), &initrd))?;
    vm.expect_line_within(
        "Kernel panic - not syncing: Attempted to kill init!",
        BOOT_LIMIT,
    )?;
    let status = vm.wait_exit(BOOT_LIMIT)?;
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(3), "stderr: {stderr}");
    assert!(
        stderr.contains(
            "rvmm: error: the guest kernel panicked: Kernel panic - not syncing: \
             Attempted to kill init! exitcode=0x00000100"
        ),
        "stderr: {stderr}"
    );
    Ok(())
}

#[test]
fn memory_line_parses() {
    let line = "[    0.000000] Memory: 215876K/261752K available (4096K kernel code)";
    assert_eq!(memory_total_kib(line), Some(261752));
    assert_eq!(memory_total_kib("Memory: nonsense"), None);
}
