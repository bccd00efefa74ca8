//! virtio-net and virtio-vsock against a real Linux guest, with no guest userspace: the guest
//! kernel configures eth0 itself from `ip=` and answers ICMP echo, and it answers a vsock
//! connection to a port nobody listens on with a reset. All traffic stays between this host
//! and its guest, inside a network namespace the test creates.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{
    can_make_namespaces, guest_artifacts, initramfs_with_init, kvm_or_skip, NetNs, TestResult,
    TestVm,
};

const BOOT_LIMIT: Duration = Duration::from_secs(300);
const HOST_IP: &str = "172.30.94.1";
const GUEST_IP: &str = "172.30.94.2";
const GUEST_MAC: &str = "52:54:00:94:00:02";
const GUEST_CID: u32 = 42;

#[test]
fn guest_kernel_answers_ping_over_virtio_net_and_resets_an_unheard_vsock_port() -> TestResult {
    let name = "guest_kernel_answers_ping_over_virtio_net_and_resets_an_unheard_vsock_port";
    if !kvm_or_skip(name) || !can_make_namespaces(name) {
        return Ok(());
    }
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    let ns = NetNs::create("tap0", HOST_IP)?;
    let uds = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vsock-{}.sock", ns.name));
    let kernel = guest.join("vmlinux").display().to_string();
    // An init that spins in user mode without system calls keeps the kernel serving the
    // network on hosts where guest system calls fault (and anywhere else).
    let initrd = initramfs_with_init("spin_init").display().to_string();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 ip={GUEST_IP}::{HOST_IP}:255.255.255.252::eth0:off"
    );
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let vsock = format!("cid={GUEST_CID},uds={}", uds.display());
    let mut cmd = ns.command(&["env", "RUST_LOG=rvmm_devices::virtio::vsock=debug"]);
    cmd.arg(env!("CARGO_BIN_EXE_rvmm"));
    cmd.args([
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
    ])
    .args(["--net", &net, "--rng", "--vsock", &vsock])
    // This boot covers the no-ACPI path: MP table, and the devices named on the command line.
    .arg("--no-acpi");
    let mut vm = TestVm::spawn(cmd)?;

    let cmdline = vm.expect_line_within("Command line: ", BOOT_LIMIT)?;
    for (addr, irq) in [("0xd0000000", 5), ("0xd0001000", 6), ("0xd0002000", 7)] {
        let entry = format!("virtio_mmio.device=4K@{addr}:{irq}");
        assert!(cmdline.contains(&entry), "{cmdline}");
    }
    vm.expect_line_within("found SMP MP-table", BOOT_LIMIT)?;

    vm.expect_line_within("IP-Config: Complete:", BOOT_LIMIT)?;
    // The kernel prints the configured interface on the next line.
    let config = vm.expect_line_within("device=eth0", BOOT_LIMIT)?;
    assert!(config.contains(&format!("hwaddr={GUEST_MAC}")), "{config}");
    assert!(config.contains(&format!("ipaddr={GUEST_IP}")), "{config}");
    vm.expect_line_within("Run /init as init process", BOOT_LIMIT)?;

    // The guest kernel replies to ICMP echo without any userspace.
    let ping = ns.run(&["ping", "-c", "3", "-W", "20", GUEST_IP], true)?;
    assert!(ping.contains("3 received"), "{ping}");

    // Nothing listens on guest port 1234: the guest's reset closes our stream without "OK".
    let mut stream = UnixStream::connect(&uds).map_err(|e| format!("vsock uds: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(b"CONNECT 1234\n").unwrap();
    let mut reply = String::new();
    let n = stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("no answer from the guest's vsock: {e}"))?;
    assert_eq!((n, reply.as_str()), (0, ""), "guest accepted port 1234?");

    vm.signal(libc::SIGTERM);
    vm.wait_exit(Duration::from_secs(20))?;
    // The stream was closed because the guest kernel answered with a reset, not locally.
    let log = vm.stderr();
    assert!(
        log.contains("guest port 1234 reset its connection"),
        "no reset from the guest in: {log}"
    );
    assert!(!uds.exists(), "rvmm left its vsock socket behind");
    Ok(())
}
