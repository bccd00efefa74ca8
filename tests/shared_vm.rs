//! The shared VM: `rvmm vm start`, containers run in it without a boot (`rvmm run --vm`),
//! detached and named (`-d --name`), `rvmm exec`, `rvmm ps`, `rvmm stop`, a port the VM
//! publishes, memory a container frees going back to the host, `rvmm vm stop`, and a keeper
//! that is killed (its state is cleaned on the next start). Nothing is left behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::container::{output_within, wait_within, Reaped, RunEnv};
use common::{http_get, processes_with};
use vmm_sys_util::tempdir::TempDir;

const RVMM: &str = env!("CARGO_BIN_EXE_rvmm");
/// How long one command may take here, a boot included (a nested KVM is slow).
const LIMIT: Duration = Duration::from_secs(300);
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// The host port the VM publishes (the container's httpd listens on 80 in the VM).
const PORT: u16 = 18084;
const VM: &str = "t";
/// How soon after the container freed its memory the host must have it back.
const GIVE_BACK_LIMIT: Duration = Duration::from_secs(10);

/// One VM at a time: each test checks that nothing is left running, which another's VM would
/// look like.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Env {
    _one: MutexGuard<'static, ()>,
    guest: PathBuf,
    image: PathBuf,
    dir: TempDir,
}

impl Env {
    /// rvmm with this test's own state and cache directories.
    fn rvmm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(RVMM);
        cmd.env("XDG_RUNTIME_DIR", self.state())
            .env("XDG_CACHE_HOME", self.dir.as_path().join("cache"))
            .args(args);
        cmd
    }

    fn state(&self) -> PathBuf {
        self.dir.as_path().join("run")
    }

    /// `rvmm ARGS…` to its end: status, stdout, stderr (logged).
    fn ok(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let started = Instant::now();
        let (code, out, err) = output_within(LIMIT, self.rvmm(args));
        eprintln!(
            "$ rvmm {} → {code:?} in {:.2?}\n{out}{err}",
            args.join(" "),
            started.elapsed()
        );
        (code, out, err)
    }

    /// `rvmm run --vm t IMAGE -- COMMAND…` with OPTIONS.
    fn run_args<'a>(&'a self, options: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["run", "--vm", VM];
        args.extend_from_slice(options);
        args.push(self.image.to_str().unwrap());
        args.push("--");
        args.extend_from_slice(command);
        args
    }

    fn start_vm(&self) {
        let guest = self.guest.to_str().unwrap().to_string();
        let publish = format!("127.0.0.1:{PORT}:80");
        let args = [
            "vm", "start", "--name", VM, "--guest", &guest, "--memory", "1024", "-p", &publish,
        ];
        let (code, out, err) = self.ok(&args);
        assert_eq!((code, out.trim()), (Some(0), VM), "{err}");
    }

    /// The `rss: N MiB` of `rvmm vm status`.
    fn vm_rss(&self) -> u64 {
        let (_, out, _) = output_within(LIMIT, self.rvmm(&["vm", "status", VM]));
        out.lines()
            .find_map(|l| l.strip_prefix("rss: "))
            .and_then(|v| v.trim_end_matches(" MiB").parse().ok())
            .unwrap_or_else(|| panic!("no rss in {out}"))
    }
}

fn setup(test: &str) -> Option<Env> {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let RunEnv { guest, docker, dir } = RunEnv::new(test, true)?;
    Some(Env {
        _one: one,
        guest,
        image: docker,
        dir,
    })
}

#[test]
fn a_shared_vm_hosts_containers_without_a_boot() {
    let test = "a_shared_vm_hosts_containers_without_a_boot";
    let Some(env) = setup(test) else {
        return;
    };
    env.start_vm();
    let (code, _, err) = env.ok(&["vm", "start", "--name", VM]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        format!("rvmm: error: VM {VM} is already running")
    );
    let (_, list, _) = env.ok(&["vm", "list"]);
    assert!(list.lines().any(|l| l.starts_with(VM)), "{list}");

    runs_in_a_row(&env);
    detached_named_container(&env);
    pause_and_resume(&env);
    memory_goes_back(&env);

    let (code, _, err) = env.ok(&["vm", "stop", VM]);
    assert_eq!(code, Some(0), "{err}");
    let (_, status, _) = env.ok(&["vm", "status", VM]);
    assert!(status.contains("status: stopped"), "{status}");
    let (code, _, err) = env.ok(&env.run_args(&[], &["true"]));
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("VM {VM} is not running")), "{err}");
    nothing_left(&env);
}

/// Three runs in a row, each without a boot, and a fresh VM's run for comparison.
fn runs_in_a_row(env: &Env) {
    for i in 1..=3 {
        let started = Instant::now();
        let word = format!("hello {i}");
        let (code, out, err) = env.ok(&env.run_args(&[], &["echo", &word]));
        eprintln!("NOTE run --vm #{i}: {:.2?}", started.elapsed());
        assert_eq!((code, out.trim()), (Some(0), word.as_str()), "{err}");
    }
    let (code, _, _) = env.ok(&env.run_args(&[], &["sh", "-c", "exit 7"]));
    assert_eq!(code, Some(7));
    let started = Instant::now();
    let guest = env.guest.to_str().unwrap();
    let image = env.image.to_str().unwrap();
    let fresh = [
        "run",
        "--network",
        "none",
        "--guest",
        guest,
        image,
        "--",
        "echo",
        "fresh",
    ];
    let (code, out, err) = env.ok(&fresh);
    eprintln!("NOTE run in a fresh VM: {:.2?}", started.elapsed());
    assert_eq!((code, out.trim()), (Some(0), "fresh"), "{err}");
}

/// `vm pause`: status says so, a run is refused with a hint, a second pause is refused;
/// `vm resume`: runs work again.
fn pause_and_resume(env: &Env) {
    let (code, _, err) = env.ok(&["vm", "pause", VM]);
    assert_eq!(code, Some(0), "{err}");
    let (_, status, _) = env.ok(&["vm", "status", VM]);
    assert!(status.contains("status: paused"), "{status}");
    let (code, _, err) = env.ok(&env.run_args(&[], &["true"]));
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        format!("rvmm: error: VM {VM} is paused (rvmm vm resume {VM})")
    );
    let (code, _, err) = env.ok(&["vm", "pause", VM]);
    assert_eq!(code, Some(1));
    assert!(err.contains("the VM is paused already"), "{err}");
    let (code, _, err) = env.ok(&["vm", "resume", VM]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = env.ok(&env.run_args(&[], &["echo", "resumed"]));
    assert_eq!((code, out.trim()), (Some(0), "resumed"), "{err}");
}

/// `-d --name a`: a web server the VM's published port reaches; exec, ps, a name in use,
/// stop, and exec into the stopped container.
fn detached_named_container(env: &Env) {
    let token = format!("served from the shared VM {}", std::process::id());
    let script = format!(
        "trap 'exit 0' TERM; echo '{token}' >/tmp/index.html; httpd -f -p 80 -h /tmp & wait"
    );
    let detached = env.run_args(&["-d", "--name", "a"], &["sh", "-c", &script]);
    let (code, out, err) = env.ok(&detached);
    assert_eq!((code, out.trim()), (Some(0), "a"), "{err}");
    let (code, _, err) = env.ok(&detached);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("a container named \"a\" is already running"),
        "{err}"
    );
    let (code, out, err) = env.ok(&["exec", "a", "--", "cat", "/proc/1/cmdline"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("trap 'exit 0' TERM"), "{out:?}");
    let deadline = Instant::now() + LIMIT;
    let page = loop {
        match http_get(PORT, &token, CLIENT_LIMIT) {
            Ok(page) if page.contains(&token) => break page,
            got => eprintln!("NOTE not yet: {got:?}"),
        }
        assert!(Instant::now() < deadline, "no page within {LIMIT:?}");
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(page.starts_with("HTTP/1."), "{page}");
    let (_, ps, _) = env.ok(&["ps"]);
    let row = ps.lines().find(|l| l.starts_with("a ")).unwrap_or_default();
    assert!(row.contains(VM) && row.ends_with("running"), "{ps}");
    let (code, out, err) = env.ok(&["stop", "a"]);
    assert_eq!((code, out.trim()), (Some(0), "a"), "{err}");
    let (_, ps, _) = env.ok(&["ps", "--vm", VM]);
    let row = ps.lines().find(|l| l.starts_with("a ")).unwrap_or_default();
    assert!(row.ends_with("exited (0)"), "{ps}");
    let (code, _, err) = env.ok(&["exec", "a", "--", "true"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "rvmm: error: no running VM has a container named \"a\""
    );
}

/// A container fills 200 MiB of its root (tmpfs in the guest), frees it, and the VM's RSS
/// falls back within [`GIVE_BACK_LIMIT`] (free page reporting is on in a shared VM).
fn memory_goes_back(env: &Env) {
    let script = "head -c 209715200 /dev/zero >/big; echo filled; read x; rm /big; echo freed";
    let mut child = Reaped(
        env.rvmm(&env.run_args(&["-i"], &["sh", "-c", script]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let before = env.vm_rss();
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next(), "filled");
    let filled = env.vm_rss();
    child.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next(), "freed");
    let freed_at = Instant::now();
    let mut lowest = env.vm_rss();
    while freed_at.elapsed() < GIVE_BACK_LIMIT && filled.saturating_sub(lowest) < 150 {
        std::thread::sleep(Duration::from_millis(500));
        lowest = lowest.min(env.vm_rss());
    }
    let status = wait_within(&mut child.0, LIMIT);
    assert_eq!(status.code(), Some(0));
    // The balloon's statistics queue: the guest's own figures, every 2 s.
    let (_, status, _) = env.ok(&["vm", "status", VM]);
    assert!(status.contains("guest memory: "), "{status}");
    eprintln!(
        "NOTE shared VM RSS: {before} MiB before, {filled} MiB with 200 MiB in a container, \
         {lowest} MiB within {GIVE_BACK_LIMIT:?} of the free"
    );
    assert!(
        filled.saturating_sub(lowest) >= 150,
        "RSS {filled} → {lowest} MiB: the 200 MiB did not come back"
    );
}

/// A killed keeper takes its VM along; `vm status` says stopped, and the next start cleans
/// what it left.
#[test]
fn a_killed_keeper_leaves_nothing_running() {
    let test = "a_killed_keeper_leaves_nothing_running";
    let Some(env) = setup(test) else {
        return;
    };
    env.start_vm();
    let record = std::fs::read_to_string(env.state().join("rvmm/vms/t/vm.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    let keeper = record["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(keeper, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + CLIENT_LIMIT;
    while !processes_with(&env.state().display().to_string()).is_empty() {
        assert!(Instant::now() < deadline, "the VM outlived its keeper");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, status, _) = env.ok(&["vm", "status", VM]);
    assert!(status.contains("status: stopped"), "{status}");
    env.start_vm();
    let (code, _, err) = env.ok(&["vm", "stop", VM]);
    assert_eq!(code, Some(0), "{err}");
    nothing_left(&env);
}

/// No process names the test's directories, the state directory is gone, the port is free.
fn nothing_left(env: &Env) {
    let marker = env.dir.as_path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = processes_with(&marker);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = processes_with(&marker);
    }
    assert!(left.is_empty(), "still running: {left:?}");
    let vm_dir = env.state().join("rvmm/vms").join(VM);
    assert!(!Path::new(&vm_dir).exists(), "{} is left", vm_dir.display());
    std::net::TcpListener::bind(("127.0.0.1", PORT)).expect("the port is free again");
}
