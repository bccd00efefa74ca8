//! The bad-input battery: every input rvmm cannot use is refused with exactly one stderr line
//! `rvmm: error: …` naming the problem, exit status 1, no panic, and nothing left behind (no
//! socket files, no TAP held, no processes). No guest boots here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_make_namespaces, kvm_or_skip, tiny_guest, NetNs};

/// Every case fails before a guest runs; anything slower is a bug.
const LIMIT: Duration = Duration::from_secs(20);

/// A scratch directory of its own per test, emptied first.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-input-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A sparse file of `len` bytes.
fn sparse(dir: &Path, name: &str, len: u64) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path.display().to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// Runs rvmm (optionally through a wrapper such as `ip netns exec NS`) and checks it refused
/// the input with one line containing `needle`.
fn refused_with(wrapper: Option<Command>, args: &[&str], needle: &str) {
    let mut cmd = wrapper.unwrap_or_else(|| Command::new(env!("CARGO_BIN_EXE_rvmm")));
    if cmd.get_program() != env!("CARGO_BIN_EXE_rvmm") {
        cmd.arg(env!("CARGO_BIN_EXE_rvmm"));
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rvmm starts");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?}: rvmm still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
    assert!(
        lines[0].starts_with("rvmm: error: ") && lines[0].contains(needle),
        "{args:?}: expected {needle:?} in {:?}",
        lines[0]
    );
    eprintln!("{:?} -> {}", args, lines[0]);
}

fn refused(args: &[&str], needle: &str) {
    refused_with(None, args, needle);
}

/// No process is left that mentions `dir` on its command line.
fn no_process_mentions(dir: &Path) {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&needle),
            "process {:?} left behind: {cmdline}",
            entry.file_name()
        );
    }
}

/// A copy of the tiny guest with `patch` applied to its bytes.
fn patched_guest(dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = std::fs::read(tiny_guest("hello")).unwrap();
    patch(&mut bytes);
    write(dir, name, &bytes)
}

#[test]
fn bad_kernels() {
    let dir = scratch("kernels");
    let missing = dir.join("missing").display().to_string();
    refused(&["--kernel", &missing], "No such file or directory");
    refused(&["--kernel", &write(&dir, "empty", b"")], "file is empty");
    refused(
        &["--kernel", &dir.display().to_string()],
        "not a regular file",
    );
    // The guest's code segment starts at 0x1000 in the file; cut it in the middle.
    let truncated = patched_guest(&dir, "truncated", |b| b.truncate(0x1020));
    refused(
        &["--kernel", &truncated],
        "truncated: segment 1 ends at byte",
    );
    let header_only = patched_guest(&dir, "header-only", |b| b.truncate(64));
    refused(
        &["--kernel", &header_only],
        "truncated: program headers end",
    );
    // e_machine 183: the same file, built for aarch64.
    let arm = patched_guest(&dir, "aarch64", |b| {
        b[18..20].copy_from_slice(&183u16.to_le_bytes())
    });
    refused(&["--kernel", &arm], "an ELF for aarch64, not x86-64");
    // EI_CLASS 1: a 32-bit ELF.
    let elf32 = patched_guest(&dir, "elf32", |b| b[4] = 1);
    refused(&["--kernel", &elf32], "a 32-bit ELF");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..100_000)
        .map(|_| {
            // xorshift: reproducible bytes that are neither ELF nor bzImage.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    refused(
        &["--kernel", &write(&dir, "random", &random)],
        "neither an ELF vmlinux nor a bzImage",
    );
    // A bzImage header announcing more protected-mode code than the file holds.
    let mut bz = vec![0u8; 4096];
    bz[0x1f1] = 4;
    bz[0x1f4..0x1f8].copy_from_slice(&0x10000u32.to_le_bytes());
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    refused(
        &["--kernel", &write(&dir, "bz-truncated", &bz)],
        "truncated: the header announces",
    );
}

#[test]
fn bad_sizes_and_counts() {
    let k = tiny_guest("hello").display().to_string();
    for (args, needle) in [
        (&["--memory", "0"][..], "--memory must be between 16 and"),
        (&["--memory", "99999999999"], "--memory must be between"),
        (&["--memory", "-5"], "unexpected argument '-5'"),
        (&["--memory", "lots"], "invalid value 'lots' for '--memory"),
        (&["--memory", "18446744073709551616"], "number too large"),
        (&["--cpus", "0"], "--cpus must be between 1 and 32, got 0"),
        (&["--cpus", "33"], "--cpus must be between 1 and 32, got 33"),
        (
            &["--cpus", "4294967296"],
            "invalid value '4294967296' for '--cpus",
        ),
        (&["--frobnicate"], "unexpected argument '--frobnicate'"),
        (
            &["--seccomp", "maybe"],
            "invalid value 'maybe' for '--seccomp",
        ),
    ] {
        let mut all = vec!["--kernel", k.as_str()];
        all.extend_from_slice(args);
        refused(&all, needle);
    }
    refused(&["--kernel"], "a value is required for '--kernel");
    refused(&[], "required arguments were not provided: --kernel");
}

#[test]
fn bad_initrds() {
    let dir = scratch("initrds");
    let k = tiny_guest("hello").display().to_string();
    let big = sparse(&dir, "big.cpio", 64 << 20);
    refused(
        &["--kernel", &k, "--memory", "32", "--initrd", &big],
        "(64 MiB) does not fit in --memory 32 MiB",
    );
    refused(
        &["--kernel", &k, "--initrd", &write(&dir, "empty", b"")],
        "file is empty",
    );
}

#[test]
fn bad_device_specs() {
    let dir = scratch("specs");
    let k = tiny_guest("hello").display().to_string();
    let k = k.as_str();
    let img = write(&dir, "disk.img", &[0; 4096]);
    for (spec, needle) in [
        ("", "--disk : no path"),
        (",ro", "no path"),
        ("X,rw", "unknown option \"rw\""),
        ("X,serial=", "serial must be 1 to 20 bytes"),
        (
            "X,serial=123456789012345678901",
            "serial must be 1 to 20 bytes",
        ),
    ] {
        refused(&["--kernel", k, "--disk", &spec.replace('X', &img)], needle);
    }
    for (spec, needle) in [
        ("", "unknown option"),
        ("tap=", "unknown option \"tap=\""),
        ("mac=52:54:00:12:34:56", "tap=NAME or user is required"),
        ("tap=t0,mac=zz", "--net tap=t0,mac=zz"),
        ("tap=t0,mtu=9000", "unknown option \"mtu=9000\""),
    ] {
        refused(&["--kernel", k, "--net", spec], needle);
    }
    for (spec, needle) in [
        ("", "unknown option"),
        ("cid=2,uds=/tmp/x", "cid must be from 3"),
        ("cid=3", "uds=PATH is required"),
        ("uds=/tmp/x", "cid=N is required"),
        ("cid=x,uds=/tmp/x", "bad cid \"x\""),
        ("cid=3,uds=/tmp/x,port=1", "unknown option \"port=1\""),
    ] {
        refused(&["--kernel", k, "--vsock", spec], needle);
    }
    let tag37 = format!("tag={},socket=/tmp/x", "t".repeat(37));
    for (spec, needle) in [
        ("tag=,socket=/tmp/x", "tag must be 1 to 36 bytes"),
        (tag37.as_str(), "tag must be 1 to 36 bytes"),
        ("socket=/tmp/x", "tag=TAG is required"),
        ("tag=a", "socket=PATH is required"),
        ("tag=a,socket=/tmp/x,ro", "unknown option \"ro\""),
    ] {
        refused(&["--kernel", k, "--fs", spec], needle);
    }
    refused(
        &[
            "--kernel",
            k,
            "--fs",
            "tag=a,socket=/x",
            "--fs",
            "tag=a,socket=/y",
        ],
        "--fs/--share tag \"a\" is given twice",
    );
    let d = dir.display().to_string();
    for (spec, needle) in [
        (format!("{d},tag="), "tag must be 1 to 36 bytes"),
        (d.clone(), "tag=TAG is required"),
        (format!("{img},tag=a"), "not a directory"),
        (format!("{d}/missing,tag=a"), "No such file or directory"),
        (format!("{d},tag=a,rw"), "unknown option \"rw\""),
    ] {
        refused(&["--kernel", k, "--share", &spec], needle);
    }
    let share = format!("{d},tag=a");
    refused(
        &["--kernel", k, "--fs", "tag=a,socket=/x", "--share", &share],
        "--fs/--share tag \"a\" is given twice",
    );
    // Twice under the same name, through a symbolic link and through a hard link.
    let symlink = dir.join("symlink.img");
    std::os::unix::fs::symlink(&img, &symlink).unwrap();
    let hardlink = dir.join("hardlink.img");
    std::fs::hard_link(&img, &hardlink).unwrap();
    for other in [
        img.clone(),
        symlink.display().to_string(),
        hardlink.display().to_string(),
    ] {
        refused(
            &["--kernel", k, "--rootfs", &img, "--disk", &other],
            "is given twice",
        );
    }
    // One more virtio device than there are slots.
    let mut args = vec!["--kernel".to_string(), k.to_string()];
    for i in 0..20 {
        args.push("--disk".into());
        args.push(write(&dir, &format!("d{i}.img"), &[0; 512]));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, "20 virtio devices asked for");
}

#[test]
fn bad_rootfs() {
    let dir = scratch("rootfs");
    let k = tiny_guest("hello").display().to_string();
    let k = k.as_str();
    refused(
        &["--kernel", k, "--rootfs", &dir.display().to_string()],
        "not a regular file",
    );
    refused(
        &["--kernel", k, "--rootfs", &write(&dir, "empty.img", b"")],
        "file is empty",
    );
    let missing = dir.join("missing.img").display().to_string();
    refused(
        &["--kernel", k, "--rootfs", &missing],
        "No such file or directory",
    );
}

/// Errors found once KVM is open: they need /dev/kvm to be reached at all.
#[test]
fn bad_inputs_found_while_building_the_vm() {
    if !kvm_or_skip("bad_inputs_found_while_building_the_vm") {
        return;
    }
    let dir = scratch("build");
    let k = tiny_guest("hello").display().to_string();
    let k = k.as_str();
    refused(
        &["--kernel", k, "--memory", "1048576"],
        "more than the host's RAM and swap",
    );
    // Within the host's RAM, but more than this process may map (address-space limit).
    let mut limited = Command::new("sh");
    limited.args(["-c", "ulimit -v 3000000 && exec \"$0\" \"$@\""]);
    refused_with(
        Some(limited),
        &["--kernel", k, "--memory", "4096"],
        "cannot map 4096 MiB of guest memory: ",
    );
    // Fits the size check, but not above the kernel in 16 MiB.
    let initrd = sparse(&dir, "initrd", 15 << 20);
    let sock = dir.join("v.sock");
    let vsock = format!("cid=3,uds={}", sock.display());
    refused(
        &[
            "--kernel", k, "--memory", "16", "--initrd", &initrd, "--vsock", &vsock,
        ],
        "does not fit in guest memory",
    );
    assert!(!sock.exists(), "the vsock socket file was left behind");
    let far = format!("cid=3,uds={}", dir.join("missing/v.sock").display());
    refused(&["--kernel", k, "--vsock", &far], "cannot bind");
    refused(&["--kernel", k, "--net", "tap=rvmmnotap0"], "rvmmnotap0");
    let nobody = format!("tag=a,socket={}", dir.join("no-virtiofsd.sock").display());
    refused(
        &["--kernel", k, "--fs", &nobody],
        "cannot connect to the vhost-user backend",
    );

    // Read-only on disk (immutable: even root cannot open it for writing) without `ro`.
    let ro = write(&dir, "immutable.img", &[0; 4096]);
    if Command::new("chattr")
        .args(["+i", &ro])
        .status()
        .is_ok_and(|s| s.success())
    {
        refused(&["--kernel", k, "--rootfs", &ro], "Operation not permitted");
        let _ = Command::new("chattr").args(["-i", &ro]).status();
    } else {
        eprintln!("NOTE: chattr +i is not available here; the read-only rootfs case is skipped");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("sock"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    no_process_mentions(&dir);
}

/// virtio-fs backends that cannot serve: none installed, one that dies before it listens, a
/// socket whose peer does not speak vhost-user. Each is one line, and nothing is left running.
#[test]
fn virtio_fs_backends_that_fail() {
    if !kvm_or_skip("virtio_fs_backends_that_fail") {
        return;
    }
    let dir = scratch("fs-backends");
    let k = tiny_guest("hello").display().to_string();
    let share = format!("{},tag=a", dir.display());
    let args = ["--kernel", k.as_str(), "--share", &share];
    let with_virtiofsd = |path: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
        cmd.env("RVMM_VIRTIOFSD", path);
        Some(cmd)
    };
    let missing = dir.join("no-virtiofsd").display().to_string();
    refused_with(
        with_virtiofsd(&missing),
        &args,
        &format!("RVMM_VIRTIOFSD={missing}: no such file"),
    );
    refused_with(
        with_virtiofsd("/bin/false"),
        &args,
        "exited before it listened (exit status: 1)",
    );
    // A listener that hangs up on every connection, as a socket of some other service might.
    let socket = dir.join("not-vhost-user.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let fs = format!("tag=a,socket={}", socket.display());
    refused(&["--kernel", &k, "--fs", &fs], "--fs tag a: vhost-user");
    no_process_mentions(&dir);
}

/// A failed start releases its TAP: the next rvmm on the same TAP gets just as far.
#[test]
fn a_failed_start_releases_its_tap() {
    let test = "a_failed_start_releases_its_tap";
    if !kvm_or_skip(test) || !can_make_namespaces(test) {
        return;
    }
    let dir = scratch("tap");
    let tap = "rvmmbad0";
    let ns = NetNs::create(tap, "172.30.95.1").unwrap();
    let k = tiny_guest("hello").display().to_string();
    let initrd = sparse(&dir, "initrd", 15 << 20);
    let net = format!("tap={tap}");
    let args = [
        "--kernel", &k, "--memory", "16", "--initrd", &initrd, "--net", &net,
    ];
    for _ in 0..2 {
        refused_with(Some(ns.command(&[])), &args, "does not fit in guest memory");
    }
    no_process_mentions(&dir);
}
