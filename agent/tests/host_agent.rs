//! rvmm-agent as PID 1 of a new PID and mount namespace on this host: the same init that
//! runs in the container guest, with the image disk on a loop device and the host connection
//! on a Unix socket instead of vsock. It mounts proc/sys/dev/cgroup2, mounts the disk
//! read-only, and serves several run requests with the host's crun.
//!
//! Needs root, crun, unshare, losetup, mkfs.ext4 and busybox-static; skips otherwise.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rvmm_agent::protocol::{self, ExitStatus, Message, RunRequest};

const AGENT: &str = env!("CARGO_BIN_EXE_rvmm-agent");
const TOOLS: [&str; 5] = [
    "/usr/bin/crun",
    "/usr/bin/unshare",
    "/usr/sbin/losetup",
    "/usr/sbin/mkfs.ext4",
    "/bin/busybox",
];

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A busybox root as a read-only loop device; detached on drop.
struct LoopDisk(String);

impl LoopDisk {
    fn busybox(dir: &Path) -> LoopDisk {
        let stage = dir.join("stage");
        std::fs::create_dir_all(stage.join("bin")).unwrap();
        std::fs::create_dir_all(stage.join("etc")).unwrap();
        std::fs::copy("/bin/busybox", stage.join("bin/busybox")).unwrap();
        for applet in ["sh", "echo", "wc", "ps", "ls", "cat", "id", "sleep"] {
            std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet)).unwrap();
        }
        let passwd = "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
        std::fs::write(stage.join("etc/passwd"), passwd).unwrap();
        let disk = dir.join("disk.ext4");
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&stage)
            .arg(&disk)
            .arg("16M"));
        LoopDisk(sh(Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(&disk)))
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A scratch directory removed on drop, also when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's namespace; killed on drop if it did not end by itself.
struct AgentNs(Child);

impl Drop for AgentNs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn accept(listener: &UnixListener, agent: &mut AgentNs) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_nonblocking(false).unwrap();
            return stream;
        }
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent ended before connecting: {status}");
        }
        assert!(Instant::now() < deadline, "the agent did not connect");
        thread::sleep(Duration::from_millis(50));
    }
}

fn request(argv: &[&str], env: &[&str]) -> RunRequest {
    RunRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: ["PATH=/bin"]
            .iter()
            .chain(env)
            .map(|s| s.to_string())
            .collect(),
        cwd: "/".into(),
        ..RunRequest::default()
    }
}

/// Sends a run request and its stdin.
fn start(conn: &mut UnixStream, mut req: RunRequest, stdin: Option<&[u8]>) {
    req.stdin = stdin.is_some();
    protocol::send(conn, &Message::Run(Box::new(req))).unwrap();
    if let Some(data) = stdin {
        for chunk in data.chunks(protocol::CHUNK) {
            protocol::send(conn, &Message::Stdin(chunk.to_vec())).unwrap();
        }
        protocol::send(conn, &Message::StdinClose).unwrap();
    }
}

/// Collects output until the exit status.
fn wait(conn: &mut UnixStream) -> (ExitStatus, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match protocol::recv(conn).unwrap() {
            Message::Stdout(d) => out.extend(d),
            Message::Stderr(d) => err.extend(d),
            Message::Exit(status) => {
                eprintln!("{status:?}, stderr: {}", String::from_utf8_lossy(&err));
                return (status, String::from_utf8_lossy(&out).into_owned());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn run(
    conn: &mut UnixStream,
    argv: &[&str],
    env: &[&str],
    stdin: Option<&[u8]>,
) -> (ExitStatus, String) {
    start(conn, request(argv, env), stdin);
    wait(conn)
}

#[test]
fn agent_serves_several_requests_as_pid_1() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || TOOLS.iter().any(|t| !Path::new(t).exists()) {
        eprintln!("SKIPPED: needs root and {TOOLS:?}");
        return;
    }
    // Not under /tmp or /run: the agent mounts tmpfs over both in its namespace.
    let scratch = Scratch(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-{}", std::process::id())),
    );
    let dir = &scratch.0;
    std::fs::create_dir_all(dir).unwrap();
    let disk = LoopDisk::busybox(dir);
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut agent = AgentNs(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--net",
                "--mount",
                "--propagation",
                "private",
                AGENT,
                "--image-disk",
                &disk.0,
                "--unix",
            ])
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut conn = accept(&listener, &mut agent);
    assert!(matches!(
        protocol::recv(&mut conn).unwrap(),
        Message::Hello { .. }
    ));

    assert_eq!(
        run(&mut conn, &["echo", "hello"], &[], None),
        (ExitStatus::Code(0), "hello\n".into())
    );
    assert_eq!(
        run(&mut conn, &["sh", "-c", "exit 3"], &[], None).0,
        ExitStatus::Code(3)
    );
    assert_eq!(
        run(&mut conn, &["sh", "-c", "echo $FOO"], &["FOO=bar"], None).1,
        "bar\n"
    );
    let input = vec![b'x'; 200_000];
    assert_eq!(
        run(&mut conn, &["wc", "-c"], &[], Some(&input)).1.trim(),
        "200000"
    );
    let (_, ps) = run(&mut conn, &["ps", "-o", "pid,comm"], &[], None);
    assert_eq!(ps.lines().count(), 2, "only ps itself: {ps}");
    // Writes go to the overlay's tmpfs upper layer, never to the read-only image disk.
    let (status, _) = run(
        &mut conn,
        &["sh", "-c", "echo x > /etc/new && cat /etc/new"],
        &[],
        None,
    );
    assert_eq!(status, ExitStatus::Code(0));
    let (_, ls) = run(&mut conn, &["ls", "/etc"], &[], None);
    assert!(
        !ls.contains("new"),
        "a container's write leaked into the next one: {ls}"
    );

    // The image's user, resolved from its /etc/passwd.
    let mut req = request(&["id", "-u"], &[]);
    req.user = "nobody".into();
    start(&mut conn, req, None);
    assert_eq!(wait(&mut conn), (ExitStatus::Code(0), "65534\n".into()));
    // A signal from the host reaches the container (sleep is its PID 1 and only
    // SIGKILL ends such a process).
    start(&mut conn, request(&["sleep", "60"], &[]), None);
    thread::sleep(Duration::from_secs(1));
    protocol::send(&mut conn, &Message::Signal(libc::SIGKILL)).unwrap();
    let (status, _) = wait(&mut conn);
    assert_eq!(status, ExitStatus::Code(128 + libc::SIGKILL));

    protocol::send(&mut conn, &Message::Shutdown).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent did not power off");
        thread::sleep(Duration::from_millis(50));
    }
}
