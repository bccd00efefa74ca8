//! The end-to-end fixture: start the real `rvmm` binary, read its console line by line, and
//! assert on what the guest prints.

#![allow(dead_code)] // each test binary uses a different part of the fixture

pub mod container;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type TestResult<T = ()> = Result<T, String>;

/// True when tests that need /dev/kvm can run. Without KVM they skip with a message, unless
/// RVMM_REQUIRE_KVM=1 (CI), where a missing KVM is a failure.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is unavailable but RVMM_REQUIRE_KVM=1");
        }
        eprintln!("SKIPPED {test}: /dev/kvm is unavailable");
    }
    ok
}

/// True when tests that boot Linux to its user space can run: a KVM that runs guest code
/// itself. An emulating KVM (kvm_pvm: guest kernel code emulated, guest system calls fail)
/// counts as missing, with the same RVMM_REQUIRE_KVM rule as [`kvm_or_skip`];
/// resources/test.sh runs these tests on a nested KVM there.
pub fn linux_kvm_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    let why = "this host's KVM emulates guest kernel code (kvm_pvm) and cannot run guest user \
               space; resources/test.sh runs this test on a nested KVM";
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// Where resources/build-guest.sh put the guest kernel and images.
pub fn guest_artifacts(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            cache.join("rvmm/guest")
        });
    if dir.join("vmlinux").is_file() {
        return Some(dir);
    }
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{test}: no guest artifacts in {} (run resources/build-guest.sh)",
            dir.display()
        );
    }
    eprintln!("SKIPPED {test}: no guest artifacts in {}", dir.display());
    None
}

/// The guest artifacts when a KVM that runs Linux and they are both there; otherwise the test
/// skips (see [`linux_kvm_or_skip`] and [`guest_artifacts`]).
pub fn kvm_and_guest_or_skip(test: &str) -> Option<PathBuf> {
    if !linux_kvm_or_skip(test) {
        return None;
    }
    guest_artifacts(test)
}

/// A running rvmm with its console captured.
pub struct TestVm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl TestVm {
    /// Starts `rvmm ARGS…` with stdin closed.
    pub fn boot<I, S>(args: I) -> TestResult<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Starts rvmm through a prepared command (e.g. `ip netns exec NS rvmm …`).
    pub fn spawn(mut cmd: Command) -> TestResult<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start rvmm: {e}"))?;
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = err_pipe.read_to_string(&mut buf);
            sink.lock().unwrap().push_str(&buf);
        });
        Ok(TestVm {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            started: Instant::now(),
        })
    }

    /// Waits for a console line containing `needle`; returns it with the time since launch.
    pub fn expect_line_within(&mut self, needle: &str, limit: Duration) -> TestResult<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        eprintln!("[{:6.1}s] {line}", self.started.elapsed().as_secs_f64());
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("no line with {needle:?} in {limit:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let how = self.end_status();
                    return Err(self.failure(&format!("rvmm ended ({how}) before {needle:?}")));
                }
            }
        }
    }

    /// Waits until a line containing each of `needles` has been seen, in any order; lines
    /// read before count too. For messages whose order differs between hosts.
    pub fn expect_lines_within(&mut self, needles: &[&str], limit: Duration) -> TestResult {
        let deadline = Instant::now() + limit;
        let mut missing: Vec<&str> = needles
            .iter()
            .copied()
            .filter(|n| !self.seen.iter().any(|l| l.contains(n)))
            .collect();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if missing.iter().any(|n| line.contains(n)) {
                        eprintln!("[{:6.1}s] {line}", self.started.elapsed().as_secs_f64());
                        missing.retain(|n| !line.contains(n));
                    }
                    self.seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("no lines with {missing:?} in {limit:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let how = self.end_status();
                    return Err(self.failure(&format!("rvmm ended ({how}) before {missing:?}")));
                }
            }
        }
        Ok(())
    }

    /// Reads console lines for `period`; returns how many came.
    pub fn lines_during(&mut self, period: Duration) -> usize {
        let deadline = Instant::now() + period;
        let mut count = 0;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
            count += 1;
        }
        count
    }

    pub fn expect_line(&mut self, needle: &str) -> TestResult<String> {
        self.expect_line_within(needle, Duration::from_secs(30))
    }

    /// Waits for rvmm to exit; kills it when it takes longer than `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> TestResult<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                // Collect the rest of the console for later assertions and messages.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(self.failure(&format!("rvmm still running after {limit:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every console line read so far.
    pub fn console(&self) -> &[String] {
        &self.seen
    }

    pub fn stderr(&self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        self.stderr.lock().unwrap().clone()
    }

    /// rvmm's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signo: i32) {
        // SAFETY: plain kill(2) of our own child process.
        unsafe { libc::kill(self.child.id() as i32, signo) };
    }

    /// How rvmm ended once its console closed: its exit status or the signal that killed it.
    fn end_status(&mut self) -> String {
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "its console closed, the process still runs".into()
    }

    fn failure(&self, what: &str) -> String {
        let tail: Vec<&String> = self.seen.iter().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        format!(
            "{what}\n--- last console lines ---\n{}\n--- stderr ---\n{}",
            tail.join("\n"),
            self.stderr()
        )
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assembles a tiny 64-bit guest from `tests/guests/NAME.S` into an ELF the loader accepts
/// (linked at 2 MiB, above the kernel load floor).
pub fn tiny_guest(name: &str) -> PathBuf {
    assemble(name, &["-Wl,-Ttext=0x200000"])
}

/// Assembles `tests/guests/NAME.S` into a static user-space program (for a guest's /init).
pub fn assemble_program(name: &str) -> PathBuf {
    assemble(name, &[])
}

fn assemble(name: &str, link_args: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(format!("{name}.S"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.elf"));
    let mut args = vec!["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"];
    args.extend(link_args);
    cc(&args, &src, &out);
    out
}

/// Runs `cc ARGS -o OUT SRC` through a private file renamed into place: tests that build the
/// same program at the same time must never run a half-written one.
fn cc(args: &[&str], src: &Path, out: &Path) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = out.with_extension(format!("tmp-{}-{unique}", std::process::id()));
    let status = Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .status()
        .expect("cc (from build-essential) builds the test programs");
    assert!(status.success(), "building {}", src.display());
    std::fs::rename(&tmp, out).unwrap();
}

/// Compiles `tests/guests/NAME.c` into a static program for the guest's userspace.
pub fn static_c_program(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/guests")
        .join(format!("{name}.c"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    cc(&["-static", "-O2", "-Wall", "-Werror"], &src, &out);
    out
}

/// An initramfs whose /init is the user program `tests/guests/NAME.S` (built with cpio).
pub fn initramfs_with_init(name: &str) -> PathBuf {
    let elf = assemble_program(name);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&elf, root.join("init")).unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && echo init | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .expect("sh and cpio build the test initramfs");
    assert!(status.success(), "cpio for {name}");
    out
}

/// A network namespace holding one TAP with the host end (`host_ip`) of a private /30; removed
/// on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(tap: &str, host_ip: &str) -> TestResult<Self> {
        let ns = NetNs {
            name: format!("rvmm-test-{}", std::process::id()),
        };
        ns.run(&["ip", "netns", "add", &ns.name], false)?;
        for args in [
            vec!["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
            vec!["ip", "addr", "add", &format!("{host_ip}/30"), "dev", tap],
            vec!["ip", "link", "set", tap, "up"],
        ] {
            ns.run(&args, true)?;
        }
        Ok(ns)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// A TCP listener on `ip:port` inside the namespace: a thread enters it with setns(2)
    /// (which only moves that thread) and binds there; the socket stays in it.
    pub fn tcp_listener(&self, ip: &str, port: u16) -> TestResult<TcpListener> {
        let path = format!("/run/netns/{}", self.name);
        let ip = ip.to_string();
        std::thread::spawn(move || -> TestResult<TcpListener> {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            TcpListener::bind((ip.as_str(), port)).map_err(|e| format!("bind {ip}:{port}: {e}"))
        })
        .join()
        .unwrap()
    }

    pub fn run(&self, args: &[&str], inside: bool) -> TestResult<String> {
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

/// True when a test may create network namespaces and TAPs (root, iproute2, /dev/net/tun).
pub fn can_make_namespaces(test: &str) -> bool {
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

/// A copy of the guest artifacts' rootfs.ext4 named `copy` under the test's scratch directory,
/// with each `(host file, name)` written into its root as an executable by debugfs (no mount).
pub fn rootfs_with_programs(
    guest: &Path,
    copy: &str,
    files: &[(&Path, &str)],
) -> TestResult<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let rootfs = dir.join(copy);
    std::fs::copy(guest.join("rootfs.ext4"), &rootfs).map_err(|e| e.to_string())?;
    let commands: String = files
        .iter()
        .map(|(host, name)| format!("write {} {name}\nsif {name} mode 0100755\n", host.display()))
        .collect();
    let cmds = dir.join(format!("{copy}.debugfs"));
    std::fs::write(&cmds, commands).map_err(|e| e.to_string())?;
    let out = Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(&cmds)
        .arg(&rootfs)
        .output()
        .map_err(|e| format!("debugfs: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || log.contains("rror") {
        return Err(format!("debugfs -w failed: {log}"));
    }
    Ok(rootfs)
}

/// Reads a file out of an ext4 image with debugfs (e2fsprogs), as the host sees it.
pub fn debugfs_cat(image: &Path, file: &str) -> TestResult<Vec<u8>> {
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

/// The start of an rvmm command line that runs the self-test kernel's `checks` with hvc0 as
/// the console (the self-test's lines come through it; boot messages before it are lost).
pub fn selftest_hvc_args(guest: &Path, checks: &str) -> Vec<String> {
    vec![
        "--kernel".to_string(),
        guest.join("vmlinux-selftest").display().to_string(),
        "--console".into(),
        "virtio".into(),
        "--cmdline".into(),
        format!("console=hvc0 reboot=k panic=1 rvmm_selftest={checks}"),
    ]
}

/// How long the in-guest self-test's data file /rvmm-selftest.dat is.
pub const SELFTEST_PATTERN_LEN: usize = 65536;

/// What the self-test's blk-write check writes to /rvmm-selftest.dat on the root filesystem.
pub fn selftest_pattern() -> Vec<u8> {
    let mut out = Vec::with_capacity(SELFTEST_PATTERN_LEN + 32);
    let mut n = 0u32;
    while out.len() < SELFTEST_PATTERN_LEN {
        out.extend_from_slice(format!("rvmm-selftest {n:06}\n").as_bytes());
        n += 1;
    }
    out.truncate(SELFTEST_PATTERN_LEN);
    out
}

/// A host listener for guest vsock connections to host port `port` (rvmm's `<uds>_<port>`):
/// takes one connection, reads a line and answers `pong\n`. Sends back the line received.
pub fn serve_vsock_pong(uds: &Path, port: u32) -> TestResult<Receiver<std::io::Result<String>>> {
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let served = (|| {
            let (stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(300)))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            (&stream).write_all(b"pong\n")?;
            Ok(line)
        })();
        let _ = std::fs::remove_file(&path);
        let _ = tx.send(served);
    });
    Ok(rx)
}

/// Reaches guest vsock port `port` through rvmm's socket `uds`, sends `line` and returns
/// rvmm's answer to `CONNECT` and the line that comes back.
pub fn vsock_echo(uds: &Path, port: u32, line: &str) -> TestResult<(String, String)> {
    let stream = UnixStream::connect(uds).map_err(|e| format!("vsock uds: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (&stream)
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(&stream);
    let mut ok = String::new();
    reader
        .read_line(&mut ok)
        .map_err(|e| format!("CONNECT: {e}"))?;
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut echo = String::new();
    reader
        .read_line(&mut echo)
        .map_err(|e| format!("echo: {e}"))?;
    Ok((ok, echo))
}

/// True when passt is on PATH; otherwise the test skips, or fails under RVMM_REQUIRE_KVM=1.
pub fn passt_or_skip(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("passt").is_file()));
    if !found {
        if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: passt is not installed (resources/install-deps.sh installs it)");
        }
        eprintln!("SKIPPED {test}: passt is not installed");
    }
    found
}

/// One `GET /index.html` from 127.0.0.1:`port`, every step bounded by `limit`: what came back
/// once `want` showed up or the connection ended (never waiting for a close, which Debian 12's
/// passt may not pass on).
pub fn http_get(port: u16, want: &str, limit: Duration) -> std::io::Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(want) {
        match stream.read(&mut buf)? {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// The command lines of the processes whose command line names `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` to its end with `stdin` piped in (or none); logs what it ran and what came out.
pub fn output_logged(mut cmd: Command, stdin: Option<&str>) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "{shown}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Sends one line to rvmm's API socket on a connection of its own; returns the reply line.
pub fn api_request(socket: &Path, line: &str) -> TestResult<String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{line}").map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reply to {line}: {e}"))?;
    eprintln!("{line} -> {}", reply.trim());
    Ok(reply.trim().to_string())
}
