//! `rvmm run` on a network and a terminal: the user network's gateway to the host, a published
//! container port, `-t` on a pty, and what is refused before a VM boots.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::container::{output_within, run_dirs, wait_within, Reaped, RunEnv};
use common::{http_get, passt_or_skip, processes_with};
use vmm_sys_util::tempdir::TempDir;

const RVMM: &str = env!("CARGO_BIN_EXE_rvmm");

/// The tests run one at a time: each checks that no run directory, VM or passt is left behind,
/// which another's would look like.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The host port `run_publishes_a_container_port` publishes the container's port 80 on.
const PUBLISHED_PORT: u16 = 18083;
/// How long one `rvmm run` may take here, boot included (a nested KVM is slow).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Limits of the tests' own clients and listeners: nothing here may wait forever.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

/// What a networked `rvmm run` test needs: one VM at a time, KVM, the container guest, passt
/// and the test image (a docker save tar in `dir`).
struct NetRun {
    _one: std::sync::MutexGuard<'static, ()>,
    guest: PathBuf,
    docker: PathBuf,
    dir: TempDir,
}

impl NetRun {
    fn new(test: &str) -> Option<NetRun> {
        let one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let RunEnv { guest, docker, dir } = RunEnv::new(test, true)?;
        Some(NetRun {
            _one: one,
            guest,
            docker,
            dir,
        })
    }

    /// `rvmm run --guest GUEST OPTIONS… IMAGE -- COMMAND…`.
    fn command(&self, options: &[&str], command: &[&str]) -> Command {
        let mut cmd = Command::new(RVMM);
        cmd.env("XDG_CACHE_HOME", self.dir.as_path().join("xdg"))
            .arg("run")
            .arg("--guest")
            .arg(&self.guest)
            .args(options)
            .arg(&self.docker)
            .arg("--")
            .args(command);
        cmd
    }
}

/// `rvmm run`'s default network: the container, on the VM's network, reaches a listener on
/// the host's 127.0.0.1 through the gateway 10.0.2.2 (passt), and has its loopback up.
#[test]
fn run_reaches_the_host_through_the_gateway() {
    use std::io::{BufRead, BufReader, Write};
    let test = "run_reaches_the_host_through_the_gateway";
    let Some(env) = NetRun::new(test) else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let served = (|| -> std::io::Result<String> {
            let (mut stream, peer) = listener.accept()?;
            eprintln!("NOTE host listener: connection from {peer}");
            stream.set_read_timeout(Some(CLIENT_LIMIT))?;
            stream.set_write_timeout(Some(CLIENT_LIMIT))?;
            stream.write_all(b"hello from the host\n")?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        })();
        let _ = tx.send(served);
    });
    // The container's side stays open until the host has answered and closed: Debian 12's
    // passt does not always pass the host's close on to a guest that closed first.
    let script = format!(
        "cat /sys/class/net/lo/flags; \
         {{ echo hello from the container; sleep 5; }} | timeout 30 nc 10.0.2.2 {port}"
    );
    let (code, stdout, stderr) = output_within(RUN_LIMIT, env.command(&[], &["sh", "-c", &script]));
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    let from_container = rx.recv_timeout(CLIENT_LIMIT).unwrap().unwrap();
    assert_eq!(from_container, "hello from the container");
    let lines: Vec<&str> = stdout.lines().collect();
    // IFF_UP | IFF_LOOPBACK, and more flags where the kernel adds them (IFF_RUNNING…).
    let lo = u32::from_str_radix(lines[0].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(lo & 0x9, 0x9, "lo is not up: {}", lines[0]);
    assert_eq!(
        lines.get(1).copied(),
        Some("hello from the host"),
        "{stdout}"
    );
}

/// `rvmm run -p 127.0.0.1:18083:80 IMAGE -- httpd …`: the host fetches the container's page
/// through passt; SIGTERM to rvmm goes to the container, which ends; nothing is left running
/// (no VM, no passt), no run directory is left and the port is free again.
#[test]
fn run_publishes_a_container_port() {
    let test = "run_publishes_a_container_port";
    let Some(env) = NetRun::new(test) else {
        return;
    };
    let token = format!("served by the container {}", std::process::id());
    let script = format!(
        "trap 'exit 0' TERM; echo '{token}' >/tmp/index.html; httpd -f -p 80 -h /tmp & wait"
    );
    let before = run_dirs();
    let publish = format!("127.0.0.1:{PUBLISHED_PORT}:80");
    let mut cmd = env.command(&["-p", &publish], &["sh", "-c", &script]);
    let mut child = Reaped(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    let page = loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
            panic!("rvmm run ended first ({status}): {stderr}");
        }
        match http_get(PUBLISHED_PORT, &token, CLIENT_LIMIT) {
            Ok(page) if page.contains(&token) => break page,
            got => eprintln!("NOTE not yet: {got:?}"),
        }
        if std::time::Instant::now() > deadline {
            panic!("no page within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let status_line = page.lines().next().unwrap_or_default();
    assert!(
        status_line.starts_with("HTTP/1.") && status_line.ends_with(" 200 OK"),
        "{page}"
    );
    // SAFETY: kill with our child's pid and a signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_within(child, Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let marker = format!("{PUBLISHED_PORT}:80");
    let mut left = processes_with(&marker);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_with(&marker);
    }
    assert!(left.is_empty(), "still running: {left:?}");
    let leftover: Vec<_> = run_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    std::net::TcpListener::bind(("127.0.0.1", PUBLISHED_PORT)).expect("the port is free again");
}

/// A pty of `rows`×`cols`: (master, slave).
fn open_pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors; the name and termios may be null, `ws` lives
    // through the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// The pty's settings as the slave has them (on Linux the master answers for it).
fn termios_of(file: &std::fs::File) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr on an open descriptor with a termios on the stack.
    assert_eq!(unsafe { libc::tcgetattr(file.as_raw_fd(), &mut t) }, 0);
    t
}

/// Adds what comes from the pty's master to `all` until `want` shows up; fails past
/// [`RUN_LIMIT`].
fn pty_output_until(rx: &std::sync::mpsc::Receiver<Vec<u8>>, all: &mut Vec<u8>, want: &str) {
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while !String::from_utf8_lossy(all).contains(want) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => all.extend(chunk),
            Err(e) => panic!("{e}: no {want:?} in {:?}", String::from_utf8_lossy(all)),
        }
    }
}

/// `rvmm run -t` on a pty of 37×101: the container's `tty` is a pty of its own and `stty size`
/// gives the size of ours; after a resize to 41×120 (SIGWINCH to rvmm) it gives the new one;
/// Ctrl-C typed on our terminal reaches the container as the byte 0x03 (rvmm's terminal is
/// raw); the exit status comes back, and rvmm leaves our terminal as it found it.
#[test]
fn run_tty_gives_the_container_a_terminal() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let test = "run_tty_gives_the_container_a_terminal";
    let Some(env) = NetRun::new(test) else {
        return;
    };
    let (mut master, slave) = open_pty(37, 101);
    let before = termios_of(&master);
    let script = "tty; stty size; stty raw -echo; echo ready; \
                  c=$(busybox dd bs=1 count=1 2>/dev/null | busybox od -An -tx1); \
                  stty sane; echo \"byte:$c\"; stty size; exit 5";
    let mut cmd = env.command(&["-t", "--network", "none"], &["sh", "-c", script]);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY take no pointers; the child's stdin is the pty's slave.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    // Every slave descriptor of ours goes, so that the master reads EIO once rvmm is gone.
    drop(cmd);
    drop(slave);
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut all = Vec::new();
    pty_output_until(&rx, &mut all, "ready");
    let ws = libc::winsize {
        ws_row: 41,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives through the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    // The new size goes from rvmm's SIGWINCH handler; let it go before the key does.
    std::thread::sleep(Duration::from_secs(1));
    master.write_all(b"\x03").unwrap();
    let status = wait_within(&mut child.0, RUN_LIMIT);
    let after = termios_of(&master);
    pty_output_until(&rx, &mut all, "41 120");
    let output = String::from_utf8_lossy(&all).into_owned();
    eprintln!("on the pty: {output:?}");
    assert_eq!(status.code(), Some(5), "{output}");
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "{output:?}"
    );
    assert!(lines.contains(&"37 101"), "{output:?}");
    assert!(lines.contains(&"byte: 03"), "{output:?}");
    let cooked = libc::ICANON | libc::ECHO | libc::ISIG;
    assert_eq!(after.c_lflag & cooked, before.c_lflag & cooked);
    assert_eq!(after.c_oflag, before.c_oflag);
}

/// What `rvmm run` refuses before it starts anything, each with one line and status 1: a busy
/// published port, `-p` without the user network, `-t` without a terminal.
#[test]
fn run_refuses_before_booting() {
    let test = "run_refuses_before_booting";
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !passt_or_skip(test) {
        return;
    }
    let dir = TempDir::new().unwrap();
    // No guest, no image: the refusals come before either is looked at.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = format!("127.0.0.1:{port}:80");
    let cases: [(&[&str], String); 3] = [
        (
            &["-p", &busy],
            format!("--publish: host port 127.0.0.1:{port}/tcp is not free: "),
        ),
        (
            &["--network", "none", "-p", "8080:80"],
            "-p/--publish needs the user network".into(),
        ),
        (&["-t"], "-t: the input device is not a TTY".into()),
    ];
    let before = run_dirs();
    for (options, want) in cases {
        let mut cmd = Command::new(RVMM);
        cmd.env("XDG_CACHE_HOME", dir.as_path().join("xdg"))
            .arg("run")
            .arg("--guest")
            .arg(dir.as_path().join("no-guest"))
            .args(options)
            .arg(dir.as_path().join("no-image.tar"))
            .args(["--", "true"]);
        let started = std::time::Instant::now();
        let (code, stdout, stderr) = output_within(RUN_LIMIT, cmd);
        assert_eq!(code, Some(1), "{options:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{options:?}: {stderr}");
        assert!(
            lines[0].starts_with(&format!("rvmm: error: {want}")),
            "{options:?}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{options:?}");
    }
    assert_eq!(run_dirs(), before);
    assert!(!dir.as_path().join("xdg").exists(), "nothing was cached");
}
