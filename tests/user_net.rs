//! `--net user` against a real Linux guest (issue #19): rvmm starts passt, and the kernel gives
//! eth0 10.0.2.15/24 with its route through 10.0.2.2 from the `ip=` parameter rvmm adds. The
//! guest (init = tests/guests/user_net_init.sh on a copy of rootfs.ext4, with
//! tests/guests/net_probe.c) exchanges a line with a TCP listener this test opens on the host's
//! 127.0.0.1, through the gateway; moves 4 MiB each way through listeners of the test's, checked
//! by SHA-256 (frames by the thousand through the stream to passt, past a full socket); then
//! serves HTTP on port 80, which the test fetches through `--publish 127.0.0.1:18082:80` with
//! a bounded client. Then the test kills passt: rvmm stops with one line and leaves no passt
//! behind. A busy published port and a missing passt are refused with one line before anything
//! boots. All traffic stays between this host and its guest.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::{
    guest_artifacts, http_get, kvm_and_guest_or_skip, passt_or_skip, rootfs_with_programs,
    static_c_program, TestResult, TestVm,
};

const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// The host port the guest's port 80 is published on (issue #19's test).
const PUBLISHED_PORT: u16 = 18082;
/// Limits of the test's own clients: nothing here may wait forever.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
const HOST_LINE: &str = "hello from the host";
const GUEST_LINE: &str = "hello from the guest";
/// How much goes each way in bulk.
const BULK_BYTES: usize = 4 << 20;

/// A copy of the guest's rootfs.ext4 with /user_net_init.sh and /net_probe in its root.
fn user_net_rootfs(guest: &Path) -> TestResult<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/user_net_init.sh");
    let probe = static_c_program("net_probe");
    rootfs_with_programs(
        guest,
        "user-net-rootfs.ext4",
        &[(&script, "user_net_init.sh"), (&probe, "net_probe")],
    )
}

/// The first `len` bytes of the xorshift64* stream seeded with `seed`, as `net_probe send`
/// sends it: the outputs as little-endian words.
fn xorshift_stream(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend(state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Answers one HTTP request with `body`, its length announced (so the client stops there).
fn serve_bulk_down(listener: TcpListener, body: Vec<u8>) {
    std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(BOOT_LIMIT))?;
        stream.set_write_timeout(Some(BOOT_LIMIT))?;
        let mut request = String::new();
        let mut reader = BufReader::new(stream.try_clone()?);
        while reader.read_line(&mut request)? > 2 {
            request.clear();
        }
        let start = Instant::now();
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        eprintln!(
            "NOTE bulk down: {} bytes written in {:.1} s",
            body.len(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    });
}

/// Takes one connection and reads it to its end: the byte count and SHA-256 (hex).
fn serve_bulk_up(listener: TcpListener) -> Receiver<std::io::Result<(usize, String)>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let got = (|| {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(BOOT_LIMIT))?;
            let start = Instant::now();
            let mut all = Vec::new();
            stream.read_to_end(&mut all)?;
            let secs = start.elapsed().as_secs_f64();
            eprintln!("NOTE bulk up: {} bytes in {secs:.1} s", all.len());
            Ok((all.len(), sha256_hex(&all)))
        })();
        let _ = tx.send(got);
    });
    rx
}

/// A listener on the host's 127.0.0.1, on a port the kernel picks.
fn local_listener() -> TestResult<(TcpListener, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    Ok((listener, port))
}

/// Takes one connection, writes [`HOST_LINE`], reads one line back and closes.
fn serve_one_line(listener: TcpListener) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let served = (|| {
            let (mut stream, peer) = listener.accept()?;
            eprintln!("NOTE host listener: connection from {peer}");
            stream.set_read_timeout(Some(CLIENT_LIMIT))?;
            stream.set_write_timeout(Some(CLIENT_LIMIT))?;
            stream.write_all(format!("{HOST_LINE}\n").as_bytes())?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        })();
        let _ = tx.send(served);
    });
    rx
}

/// The text after `RVMM-USERNET <what> ` on the next such line.
fn guest_result(vm: &mut TestVm, what: &str) -> TestResult<String> {
    // Console lines come without trailing blanks: an empty result ends the line.
    let tag = format!("RVMM-USERNET {what}");
    let line = vm.expect_line_within(&tag, BOOT_LIMIT)?;
    Ok(line.split_once(&tag).unwrap().1.trim().to_string())
}

/// The children of `parent` whose command is passt's, as (pid, command line).
fn passt_children(parent: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": the command may hold spaces, not a ')'.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (ppid == parent && cmdline.contains("passt")).then_some((pid, cmdline))
        })
        .collect()
}

/// The bulk transfers: a stream the test sends down, one the guest sends up.
struct Bulk {
    seed: u64,
    down_port: u16,
    down_sha: String,
    up_port: u16,
    up: Receiver<std::io::Result<(usize, String)>>,
}

impl Bulk {
    /// Both listeners, with different streams every run, and each way.
    fn start() -> TestResult<Self> {
        let seed = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let down = xorshift_stream(seed ^ 1, BULK_BYTES);
        let down_sha = sha256_hex(&down);
        let (listener, down_port) = local_listener()?;
        serve_bulk_down(listener, down);
        let (listener, up_port) = local_listener()?;
        Ok(Bulk {
            seed,
            down_port,
            down_sha,
            up_port,
            up: serve_bulk_up(listener),
        })
    }

    /// What the guest needs to know, on its kernel command line.
    fn params(&self) -> String {
        let (down, up, seed) = (self.down_port, self.up_port, self.seed);
        format!("down_port={down} up_port={up} bulk_bytes={BULK_BYTES} up_seed={seed}")
    }

    /// Down through wget, up through net_probe: each stream arrived whole.
    fn check(self, vm: &mut TestVm) -> TestResult {
        let down = guest_result(vm, "down")?;
        assert_eq!(down, self.down_sha, "not the stream sent down");
        let sent = vm.expect_line_within("RVMM-NET tcp sent", BOOT_LIMIT)?;
        assert!(sent.contains(&format!("sent {BULK_BYTES} bytes")), "{sent}");
        let (len, sha) = self
            .up
            .recv_timeout(BOOT_LIMIT)
            .map_err(|e| format!("the bulk listener: {e}"))?
            .map_err(|e| format!("the bulk listener: {e}"))?;
        assert_eq!(len, BULK_BYTES);
        let want = sha256_hex(&xorshift_stream(self.seed, BULK_BYTES));
        assert_eq!(sha, want, "not the stream sent up");
        eprintln!("NOTE guest's eth0: {}", guest_result(vm, "counters")?);
        Ok(())
    }
}

/// rvmm on `--net user`, the guest's port 80 published on the host's 127.0.0.1:18082.
fn boot(guest: &Path, rootfs: &Path, params: &str) -> TestResult<TestVm> {
    let cmdline = format!("console=ttyS0 reboot=k panic=1 init=/user_net_init.sh {params}");
    let kernel = guest.join("vmlinux").display().to_string();
    let publish = format!("127.0.0.1:{PUBLISHED_PORT}:80");
    TestVm::boot([
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
        "--rootfs",
        &rootfs.display().to_string(),
        "--net",
        "user",
        "--publish",
        &publish,
    ])
}

/// Kills passt: rvmm stops with one line and status 1, and leaves no passt behind.
fn passt_dies(vm: &mut TestVm, passt_pid: u32) -> TestResult {
    // SAFETY: plain kill(2) of a process of ours.
    unsafe { libc::kill(passt_pid as i32, libc::SIGKILL) };
    let status = vm.wait_exit(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(1), "{}", vm.stderr());
    let stderr = vm.stderr();
    assert_eq!(
        stderr.lines().last(),
        Some("rvmm: error: virtio-net: passt hung up (passt ended: signal: 9 (SIGKILL))"),
        "{stderr}"
    );
    assert!(passt_children(vm.pid()).is_empty());
    let gone = !Path::new(&format!("/proc/{passt_pid}")).exists();
    assert!(gone, "passt reaped");
    Ok(())
}

#[test]
fn guest_reaches_the_host_and_publishes_a_port_through_passt() -> TestResult {
    let name = "guest_reaches_the_host_and_publishes_a_port_through_passt";
    let Some(guest) = kvm_and_guest_or_skip(name) else {
        return Ok(());
    };
    if !passt_or_skip(name) {
        return Ok(());
    }
    let rootfs = user_net_rootfs(&guest)?;
    let (listener, host_port) = local_listener()?;
    let served = serve_one_line(listener);
    let bulk = Bulk::start()?;
    let token = format!("user-net-{}", std::process::id());
    let params = format!("host_port={host_port} {} token={token}", bulk.params());
    let mut vm = boot(&guest, &rootfs, &params)?;
    vm.expect_line_within("IP-Config: Complete", BOOT_LIMIT)?;
    let passt = passt_children(vm.pid());
    assert_eq!(passt.len(), 1, "one passt: {passt:?}");
    let eth0 = guest_result(&mut vm, "eth0")?;
    assert_eq!(eth0, "inet 10.0.2.15/24, default via 10.0.2.2");

    // (a) The gateway is the host's loopback.
    let reply = guest_result(&mut vm, "gateway")?;
    assert_eq!(reply, HOST_LINE);
    let got = served
        .recv_timeout(CLIENT_LIMIT)
        .map_err(|e| format!("the host listener: {e}"))?
        .map_err(|e| format!("the host listener: {e}"))?;
    assert_eq!(got, GUEST_LINE);
    bulk.check(&mut vm)?;

    // (b) The guest's port 80 on the host's 127.0.0.1:18082.
    assert_eq!(guest_result(&mut vm, "httpd")?, "up");
    let body = format!("served by the guest: {token}\n");
    let start = Instant::now();
    let page = http_get(PUBLISHED_PORT, &body, CLIENT_LIMIT)
        .map_err(|e| format!("GET from 127.0.0.1:{PUBLISHED_PORT}: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("NOTE fetched {} bytes in {secs:.2} s", page.len());
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.ends_with(&body), "{page}");

    passt_dies(&mut vm, passt[0].0)
}

#[test]
fn a_busy_published_port_or_a_missing_passt_is_refused_before_boot() -> TestResult {
    let name = "a_busy_published_port_or_a_missing_passt_is_refused_before_boot";
    // Refused before KVM is opened: only a kernel the loader accepts is needed.
    let Some(guest) = guest_artifacts(name) else {
        return Ok(());
    };
    if !passt_or_skip(name) {
        return Ok(());
    }
    let kernel = guest.join("vmlinux");
    let taken = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = taken.local_addr().unwrap().port();
    let rvmm = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
        cmd.arg("--kernel").arg(&kernel).args(["--net", "user"]);
        cmd
    };
    let out = rvmm()
        .args(["--publish", &format!("127.0.0.1:{port}:80")])
        .output()
        .map_err(|e| e.to_string())?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "rvmm: error: --publish: host port 127.0.0.1:{port}/tcp is not free: Address \
             already in use (os error 98)\n"
        )
    );
    let out = rvmm()
        .env("PATH", "/nonexistent")
        .output()
        .map_err(|e| e.to_string())?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "rvmm: error: --net user needs passt (apt-get install passt)\n"
    );
    Ok(())
}
