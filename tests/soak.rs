//! Soak (issue #20): the plain Linux guest booted to user space again and again, one after
//! another and then several at once, with 1 and 2 vCPUs, with and without ACPI, each with a
//! disk (its read-only root), a TAP and vsock. Every boot must reach user space, see its
//! devices and end by itself with status 0 within [`BOOT_LIMIT`]. Between boots of the same
//! shape rvmm's open descriptors must stay the same and its own RSS (outside guest RAM) must
//! not grow by more than 10 %; afterwards nothing may be left: no rvmm process, no vsock
//! socket, no TAP still held.
//!
//! The default is CI's short form (8 boots in turn, 3 at once); `RVMM_SOAK_BOOTS` and
//! `RVMM_SOAK_CONCURRENT` make it longer (README, "Soak").

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    can_make_namespaces, guest_artifacts, linux_kvm_or_skip, processes_with, rootfs_with_programs,
    NetNs, TestResult, TestVm,
};

const BOOT_LIMIT: Duration = Duration::from_secs(120);
const TAP_RELEASE: Duration = Duration::from_secs(10);
const GUEST_MIB: u64 = 256;
const HOST_IP: &str = "172.30.95.1";
/// The guest shapes, in turn: (vCPUs, ACPI).
const SHAPES: [(u32, bool); 4] = [(1, true), (2, true), (1, false), (2, false)];

/// What one boot showed.
struct Boot {
    shape: (u32, bool),
    /// rvmm's open descriptors and RSS while the guest ran (boots in turn only): all of it,
    /// and rvmm's own, outside guest RAM.
    fds: usize,
    rss_kib: u64,
    own_kib: u64,
    took: Duration,
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where this run's sockets go; its path marks this run's rvmm processes.
fn run_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tap(slot: usize) -> String {
    format!("soak{slot}")
}

fn uds(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("vsock{slot}.sock"))
}

/// Starts one guest in `slot` (its TAP, vsock CID and socket).
fn start(
    ns: &NetNs,
    guest: &Path,
    root: &Path,
    dir: &Path,
    slot: usize,
    shape: (u32, bool),
) -> TestResult<TestVm> {
    let (cpus, acpi) = shape;
    let vsock = format!("cid={},uds={}", 100 + slot, uds(dir, slot).display());
    let mut cmd = ns.command(&[env!("CARGO_BIN_EXE_rvmm")]);
    cmd.arg("--kernel")
        .arg(guest.join("vmlinux"))
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro init=/soak_init.sh",
        ])
        .arg("--disk")
        .arg(format!("{},ro", root.display()))
        .args(["--net", &format!("tap={}", tap(slot))])
        .args(["--vsock", &vsock])
        .args([
            "--cpus",
            &cpus.to_string(),
            "--memory",
            &GUEST_MIB.to_string(),
        ]);
    if !acpi {
        cmd.arg("--no-acpi");
    }
    TestVm::spawn(cmd)
}

/// Waits for the guest's report, samples rvmm (when `sample`: the guest waits a second for
/// it), then waits for the guest to end the VM.
fn finish(
    mut vm: TestVm,
    dir: &Path,
    slot: usize,
    shape: (u32, bool),
    sample: bool,
) -> TestResult<Boot> {
    let line = vm.expect_line_within("RVMM-SOAK ready", BOOT_LIMIT)?;
    let want = format!("nproc={} disks=1 nets=1 vsock=1", shape.0);
    assert!(line.contains(&want), "{shape:?}: {line}");
    let (fds, rss_kib, own_kib) = if sample { usage(vm.pid())? } else { (0, 0, 0) };
    let exit = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(exit.code(), Some(0), "{shape:?}: {}", vm.stderr());
    assert!(
        !uds(dir, slot).exists(),
        "{shape:?}: the vsock socket was left behind"
    );
    Ok(Boot {
        shape,
        fds,
        rss_kib,
        own_kib,
        took: vm.elapsed(),
    })
}

/// A running rvmm's open descriptors, RSS and RSS outside guest RAM (KiB; the guest RAM
/// mapping is the one of [`GUEST_MIB`]).
fn usage(pid: u32) -> TestResult<(usize, u64, u64)> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let fds = std::fs::read_dir(proc.join("fd"))
        .map_err(|e| format!("rvmm's fds: {e}"))?
        .count();
    let smaps = std::fs::read_to_string(proc.join("smaps")).map_err(|e| e.to_string())?;
    let (mut rss_kib, mut own_kib) = (0, 0);
    let mut guest_ram = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, end)) = range.split_once('-') {
                let size = |hex| u64::from_str_radix(hex, 16).ok();
                if let (Some(start), Some(end)) = (size(start), size(end)) {
                    guest_ram = end - start == GUEST_MIB << 20;
                    continue;
                }
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            rss_kib += kib;
            if !guest_ram {
                own_kib += kib;
            }
        }
    }
    Ok((fds, rss_kib, own_kib))
}

/// Per shape, the same descriptor count in every boot and rvmm's own RSS within 10 % of the
/// first. (Its whole RSS counts the guest RAM the guest touched, which varies by several MiB
/// from boot to boot: a 256 MiB guest's came to 42-48 MiB.)
fn check_growth(boots: &[Boot]) {
    for shape in SHAPES {
        let same: Vec<&Boot> = boots.iter().filter(|b| b.shape == shape).collect();
        let (Some(first), Some(last)) = (same.first(), same.last()) else {
            continue;
        };
        let fds: Vec<usize> = same.iter().map(|b| b.fds).collect();
        assert!(
            fds.iter().all(|&n| n == first.fds),
            "{shape:?}: fds {fds:?}"
        );
        assert!(
            last.own_kib * 10 <= first.own_kib * 11,
            "{shape:?}: rvmm's own RSS grew from {} to {} KiB",
            first.own_kib,
            last.own_kib
        );
    }
}

/// No rvmm of this run is alive and every TAP is free again: its carrier (`LOWER_UP`) goes off
/// as its last descriptor closes. (`NO-CARRIER` comes from the operational state, which the
/// kernel's link watch updates up to a second or more later: seen still `UP` right after.)
/// Each TAP gets [`TAP_RELEASE`] all the same.
fn check_nothing_left(ns: &NetNs, dir: &Path, taps: usize) -> TestResult {
    let marker = dir.display().to_string();
    let left = processes_with(&marker);
    assert!(left.is_empty(), "left running: {left:?}");
    let deadline = Instant::now() + TAP_RELEASE;
    for slot in 0..taps {
        loop {
            let link = ns.run(&["ip", "-o", "link", "show", &tap(slot)], true)?;
            if !link.contains("LOWER_UP") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still held after {TAP_RELEASE:?}: {link}",
                tap(slot)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn summary(boots: &[Boot], wall: Duration) -> String {
    let slowest = boots.iter().max_by_key(|b| b.took).unwrap();
    let per_min = boots.len() as f64 / wall.as_secs_f64() * 60.0;
    let (first, last) = (&boots[0], &boots[boots.len() - 1]);
    let mut text = format!(
        "{} boots, 0 failed, {per_min:.1} boots/min, slowest {:.1} s ({} vCPU, ACPI {})",
        boots.len(),
        slowest.took.as_secs_f64(),
        slowest.shape.0,
        if slowest.shape.1 { "on" } else { "off" },
    );
    if first.fds > 0 {
        text.push_str(&format!(
            ", first/last boot: fds {}/{}, RSS {}/{} MiB, rvmm's own {}/{} KiB",
            first.fds,
            last.fds,
            first.rss_kib / 1024,
            last.rss_kib / 1024,
            first.own_kib,
            last.own_kib
        ));
    }
    text
}

#[test]
fn linux_boots_again_and_again_and_leaves_nothing() -> TestResult {
    let name = "linux_boots_again_and_again_and_leaves_nothing";
    if !linux_kvm_or_skip(name) || !can_make_namespaces(name) {
        return Ok(());
    }
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    let sequential = env_count("RVMM_SOAK_BOOTS", 8).max(1);
    let concurrent = env_count("RVMM_SOAK_CONCURRENT", 3).max(1);
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/soak_init.sh");
    let root = rootfs_with_programs(&guest, "soak-rootfs.ext4", &[(&init, "soak_init.sh")])?;
    let dir = run_dir();
    let ns = NetNs::create(&tap(0), HOST_IP)?;
    for slot in 1..concurrent {
        ns.run(
            &["ip", "tuntap", "add", "dev", &tap(slot), "mode", "tap"],
            true,
        )?;
        ns.run(&["ip", "link", "set", &tap(slot), "up"], true)?;
    }

    let start_all = Instant::now();
    let mut boots = Vec::new();
    for i in 0..sequential {
        let shape = SHAPES[i % SHAPES.len()];
        let vm = start(&ns, &guest, &root, &dir, 0, shape)?;
        let boot = finish(vm, &dir, 0, shape, true)?;
        eprintln!(
            "soak: boot {} ({} vCPU, ACPI {}): {:.1} s, {} fds, RSS {} MiB ({} KiB rvmm's own)",
            i + 1,
            shape.0,
            shape.1,
            boot.took.as_secs_f64(),
            boot.fds,
            boot.rss_kib / 1024,
            boot.own_kib
        );
        boots.push(boot);
    }
    check_growth(&boots);
    let seq_wall = start_all.elapsed();
    eprintln!(
        "NOTE soak, one after another: {}",
        summary(&boots, seq_wall)
    );

    let started = Instant::now();
    let vms = (0..concurrent)
        .map(|slot| {
            let shape = SHAPES[slot % 2];
            start(&ns, &guest, &root, &dir, slot, shape).map(|vm| (slot, shape, vm))
        })
        .collect::<TestResult<Vec<_>>>()?;
    let together = vms
        .into_iter()
        .map(|(slot, shape, vm)| finish(vm, &dir, slot, shape, false))
        .collect::<TestResult<Vec<_>>>()?;
    eprintln!(
        "NOTE soak, {concurrent} at once: {}",
        summary(&together, started.elapsed())
    );
    check_nothing_left(&ns, &dir, concurrent)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
