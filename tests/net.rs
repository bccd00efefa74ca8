//! virtio-net and virtio-vsock against a real Linux guest, with no guest userspace: the guest
//! kernel configures eth0 itself from `ip=` and answers ICMP echo, and it answers a vsock
//! connection to a port nobody listens on with a reset. All traffic stays between this host
//! and its guest, inside a network namespace the test creates.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{guest_artifacts, initramfs_with_init, kvm_or_skip, TestResult, TestVm};

const BOOT_LIMIT: Duration = Duration::from_secs(300);
const HOST_IP: &str = "172.30.94.1";
const GUEST_IP: &str = "172.30.94.2";
const GUEST_MAC: &str = "52:54:00:94:00:02";
const GUEST_CID: u32 = 42;

/// A network namespace holding one TAP with the host end of a private /30; removed on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(tap: &str) -> TestResult<Self> {
        let ns = NetNs {
            name: format!("rvmm-test-{}", std::process::id()),
        };
        ns.run(&["ip", "netns", "add", &ns.name], false)?;
        for args in [
            vec!["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
            vec!["ip", "addr", "add", &format!("{HOST_IP}/30"), "dev", tap],
            vec!["ip", "link", "set", tap, "up"],
        ] {
            ns.run(&args, true)?;
        }
        Ok(ns)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    fn run(&self, args: &[&str], inside: bool) -> TestResult<String> {
        let out = if inside {
            self.command(args).output()
        } else {
            Command::new(args[0]).args(&args[1..]).output()
        }
        .map_err(|e| format!("{args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn can_make_namespaces(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip && Path::new("/dev/net/tun").exists() {
        return true;
    }
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: needs root, iproute2 and /dev/net/tun");
    }
    eprintln!("SKIPPED {test}: needs root, iproute2 and /dev/net/tun");
    false
}

#[test]
fn guest_kernel_answers_ping_over_virtio_net_and_resets_an_unheard_vsock_port() -> TestResult {
    let name = "guest_kernel_answers_ping_over_virtio_net_and_resets_an_unheard_vsock_port";
    if !kvm_or_skip(name) || !can_make_namespaces(name) {
        return Ok(());
    }
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    let ns = NetNs::create("tap0")?;
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
    .args(["--net", &net, "--rng", "--vsock", &vsock]);
    let mut vm = TestVm::spawn(cmd)?;

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
