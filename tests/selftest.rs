//! The in-guest kernel self-test (resources/selftest): the test kernel exercises rvmm's devices
//! through Linux's own drivers and prints one line per check; this side runs the host half of
//! each check and asserts every line, in a single boot per test.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use common::{
    can_make_namespaces, debugfs_cat, guest_artifacts, kvm_or_skip, selftest_hvc_args,
    selftest_pattern as expected_pattern, serve_vsock_pong, vsock_echo, NetNs, TestResult, TestVm,
    SELFTEST_PATTERN_LEN as PATTERN_LEN,
};

const BOOT_LIMIT: Duration = Duration::from_secs(300);
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

const HOST_IP: &str = "172.30.94.1";
const GUEST_IP: &str = "172.30.94.2";
const GUEST_MAC: &str = "52:54:00:94:00:02";
const GUEST_CID: u32 = 42;
const TCP_PORT: u16 = 5201;
/// The host's vsock listener the guest connects to (vsock-connect).
const HOST_VSOCK_PORT: u32 = 5000;
/// The guest's vsock listener the host connects to (vsock-listen).
const GUEST_VSOCK_PORT: u32 = 5001;
const HOST_LINE: &str = "rvmm host says hello over vsock\n";

/// net-tcp's answer: `<len> <sum32>\n`, sum32 = wrapping sum of the bytes (0..=255 each).
fn len_and_sum32(data: &[u8]) -> String {
    let sum = data.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    format!("{} {sum}\n", data.len())
}

/// The host half of net-tcp: take one connection, read to EOF, answer `<len> <sum32>\n`.
/// Sends back everything received.
fn serve_tcp(listener: TcpListener) -> Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let served = (|| {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(BOOT_LIMIT))?;
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            stream.write_all(len_and_sum32(&data).as_bytes())?;
            Ok(data)
        })();
        let _ = tx.send(served);
    });
    rx
}

#[test]
fn rng_net_and_vsock_selftest_in_the_guest_kernel() -> TestResult {
    let name = "rng_net_and_vsock_selftest_in_the_guest_kernel";
    if !kvm_or_skip(name) || !can_make_namespaces(name) {
        return Ok(());
    }
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    let ns = NetNs::create("tap0", HOST_IP)?;
    let tcp = serve_tcp(ns.tcp_listener(HOST_IP, TCP_PORT)?);
    let uds = scratch(&format!("selftest-vsock-{}.sock", ns.name));
    let pong = serve_vsock_pong(&uds, HOST_VSOCK_PORT)?;

    let kernel = guest.join("vmlinux-selftest").display().to_string();
    let rootfs = scratch("selftest-net-rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 ip={GUEST_IP}::{HOST_IP}:255.255.255.252::eth0:off \
         rvmm_selftest=rng,net,vsock rvmm_selftest.net={HOST_IP}:{TCP_PORT} \
         rvmm_selftest.vsock_port={HOST_VSOCK_PORT} \
         rvmm_selftest.vsock_listen={GUEST_VSOCK_PORT}"
    );
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let vsock = format!("cid={GUEST_CID},uds={}", uds.display());
    let mut cmd = ns.command(&[env!("CARGO_BIN_EXE_rvmm")]);
    cmd.args(["--kernel", &kernel, "--cmdline", &cmdline])
        .args(["--rootfs", &rootfs.display().to_string()])
        .args(["--net", &net, "--rng", "--vsock", &vsock]);
    let mut vm = TestVm::spawn(cmd)?;

    let mut results = Vec::new();
    loop {
        let line = vm.expect_line_within("RVMM-SELFTEST", BOOT_LIMIT)?;
        if line.contains(&format!("RVMM-SELFTEST-VSOCK listening {GUEST_VSOCK_PORT}")) {
            break;
        }
        results.push(line);
    }
    let (ok, echo) = vsock_echo(&uds, GUEST_VSOCK_PORT, HOST_LINE)?;
    results.extend(selftest_lines(&mut vm)?);
    eprintln!("NOTE {name}: self-test done after {:.0?}", vm.elapsed());
    let status = vm.wait_exit(BOOT_LIMIT)?;
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    for line in &results {
        eprintln!("{line}");
    }

    let result = |check: &str| check_result(&results, check);
    for check in ["rng", "net-tcp", "vsock-connect", "vsock-listen"] {
        assert!(
            result(check).starts_with("ok"),
            "{check}: {}",
            result(check)
        );
    }
    assert!(result("done").contains("failed=0"), "{}", result("done"));

    // The host halves saw exactly what the guest meant to send.
    let limit = Duration::from_secs(10);
    let received = tcp
        .recv_timeout(limit)
        .map_err(|e| format!("TCP server: {e}"))?
        .map_err(|e| format!("TCP server: {e}"))?;
    assert_eq!(received, expected_pattern(), "TCP stream content");
    let answer = len_and_sum32(&received);
    assert!(
        result("net-tcp").contains(&format!("host counted \"{}\"", answer.trim_end())),
        "{}",
        result("net-tcp")
    );
    let ping = pong
        .recv_timeout(limit)
        .map_err(|e| format!("vsock server: {e}"))?
        .map_err(|e| format!("vsock server: {e}"))?;
    assert_eq!(ping, "rvmm-selftest vsock ping\n");
    assert!(ok.starts_with("OK "), "CONNECT answer: {ok:?}");
    assert_eq!(echo, HOST_LINE);
    Ok(())
}

#[test]
fn pattern_is_64_kib_of_numbered_lines() {
    let p = expected_pattern();
    assert_eq!(p.len(), PATTERN_LEN);
    assert!(p.starts_with(b"rvmm-selftest 000000\nrvmm-selftest 000001\n"));
    assert_eq!(len_and_sum32(b"\x01\xff"), "2 256\n");
}
