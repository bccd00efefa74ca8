//! rvmm-oci under the other engines that speak runc's command line: containerd 1.6 (`ctr`,
//! through its runc shim) and Docker 20.10 (dockerd, its own containerd and that shim). Each
//! test starts a private daemon in a temporary directory, loads a busybox image from a local
//! archive (never a registry), runs one container in its microVM and stops the daemon, after
//! which no process of it may be left.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{linux_kvm_or_skip, output_logged, processes_with, text};
use rvmm_container::image::testimage::TestImage;
use vmm_sys_util::tempdir::TempDir;

const RVMM_OCI: &str = env!("CARGO_BIN_EXE_rvmm-oci");
/// The test image's tag in its docker-save archive, as each engine names it.
const CTR_IMAGE: &str = "docker.io/library/rvmm-test:latest";
const DOCKER_IMAGE: &str = "rvmm-test:latest";
/// The nested machine's root is an overlay, on which neither overlay snapshotters nor
/// overlay graph drivers can stack: both engines copy layers instead (Docker: vfs).
const CTR_SNAPSHOTTER: &str = "native";
/// No client command may hang the test: `timeout` ends it (status 124).
const CLIENT_TIMEOUT: &str = "180";
const DAEMON_READY: Duration = Duration::from_secs(60);
const DAEMON_STOP: Duration = Duration::from_secs(30);
/// How long the daemon's shims and keepers may take to go after it.
const LEFTOVER_WAIT: Duration = Duration::from_secs(15);

/// True when the KVM runs guests and every program in `tools` is installed; otherwise the
/// test skips (a failure under RVMM_REQUIRE_KVM=1).
fn engine_or_skip(test: &str, tools: &[&str]) -> bool {
    if !linux_kvm_or_skip(test) {
        return false;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed (resources/install-deps.sh installs containerd and docker.io)",
        missing.join(", ")
    );
    if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A private daemon whose files, sockets and state all live in `dir`, so that every process
/// it starts names `dir` in its command line.
struct Daemon {
    dir: TempDir,
    child: Option<Child>,
}

impl Daemon {
    fn new(prefix: &str) -> Daemon {
        let dir = TempDir::new_with_prefix(std::env::temp_dir().join(prefix)).unwrap();
        Daemon { dir, child: None }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.as_path().join(name)
    }

    /// The test image as a `docker save` archive, which both engines import.
    fn image_archive(&self) -> PathBuf {
        let path = self.path("image.tar");
        TestImage::busybox()
            .unwrap()
            .write_docker_save(&path)
            .unwrap();
        path
    }

    /// Starts `cmd` (output to `daemon.log`) and waits until `socket` takes connections.
    fn start(&mut self, mut cmd: Command, socket: &Path) {
        let log = std::fs::File::create(self.path("daemon.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = self.child.insert(cmd.spawn().expect("the daemon starts"));
        let deadline = Instant::now() + DAEMON_READY;
        while UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the daemon ended ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no daemon:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM, as an init system stops it; SIGKILL if it does not go in time.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill with our own child's pid, not yet waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + DAEMON_STOP;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the daemon; then nothing of it may be left: no process (the engine, its
    /// shims, rvmm-oci's keepers, rvmm, virtiofsd all name `dir`) and no mount under `dir`.
    fn stop_and_assert_nothing_left(&mut self) {
        self.stop();
        let marker = self.dir.as_path().display().to_string();
        let deadline = Instant::now() + LEFTOVER_WAIT;
        loop {
            let left = processes_with(&marker);
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "still running: {left:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounted: Vec<&str> = mounts.lines().filter(|l| l.contains(&marker)).collect();
        assert!(mounted.is_empty(), "still mounted: {mounted:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `timeout LIMIT PROGRAM`, for a client command.
fn client(program: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", CLIENT_TIMEOUT, program]);
    cmd
}

/// containerd with its own root, state, socket and config, and the image imported.
fn containerd(test: &str) -> Option<Daemon> {
    if !engine_or_skip(test, &["containerd", "ctr"]) {
        return None;
    }
    let mut daemon = Daemon::new("rvmm-oci-ctr-");
    let config = daemon.path("config.toml");
    // No CRI plugin: ctr needs only the core services. `opt` would otherwise be /opt/containerd.
    let toml = format!(
        "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{}\"\n",
        daemon.path("opt").display()
    );
    std::fs::write(&config, toml).unwrap();
    let socket = daemon.path("containerd.sock");
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(daemon.path("root"))
        .arg("--state")
        .arg(daemon.path("state"))
        .arg("--address")
        .arg(&socket);
    daemon.start(cmd, &socket);
    let archive = daemon.image_archive();
    let out = ctr(
        &daemon,
        &["images", "import", "--snapshotter", CTR_SNAPSHOTTER],
    )
    .arg(&archive)
    .output()
    .unwrap();
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    Some(daemon)
}

fn ctr(daemon: &Daemon, args: &[&str]) -> Command {
    let mut cmd = client("ctr");
    cmd.arg("--address")
        .arg(daemon.path("containerd.sock"))
        .args(args);
    cmd
}

/// `ctr run --rm` with rvmm-oci as the runc binary: the container's output streams, bind
/// mount and environment work, its status is ctr's, and nothing is left of the container,
/// its task or the daemon. No stdin: ctr 1.6 closes the task's stdin only if its own ends
/// after the task exists, and input that ends during the VM's boot never closes it (as
/// with runc when `create` is slow), so a container reading it would wait forever.
#[test]
fn containerd_ctr_run() {
    let test = "containerd_ctr_run";
    let Some(mut daemon) = containerd(test) else {
        return;
    };
    let data = daemon.path("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in"), "from-host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let mut run = ctr(
        &daemon,
        &[
            "run",
            "--rm",
            "--snapshotter",
            CTR_SNAPSHOTTER,
            "--env",
            "FOO=bar",
            "--mount",
            &mount,
        ],
    );
    run.arg("--runc-binary")
        .arg(RVMM_OCI)
        .arg("--runc-root")
        .arg(daemon.path("runc"))
        .arg("--fifo-dir")
        .arg(daemon.path("fifo"))
        .args([CTR_IMAGE, "rvmm-ctr", "sh", "-c"])
        .arg("echo hello; echo err >&2; echo FOO=$FOO; cat /data/in; echo w >/data/out; exit 3");
    let out = output_logged(run, None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\nFOO=bar\nfrom-host\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(data.join("out")).unwrap(), "w\n");
    for what in ["containers", "tasks"] {
        let out = ctr(&daemon, &[what, "ls", "-q"]).output().unwrap();
        assert_eq!(text(&out.stdout).trim(), "", "{what} left");
    }
    daemon.stop_and_assert_nothing_left();
}

/// dockerd with its own data, exec root and socket, no network of its own, rvmm-oci as the
/// runtime `rvmm`, and the image loaded.
fn dockerd(test: &str) -> Option<Daemon> {
    if !engine_or_skip(test, &["dockerd", "docker"]) {
        return None;
    }
    let mut daemon = Daemon::new("rvmm-oci-docker-");
    let config = daemon.path("daemon.json");
    let json = serde_json::json!({"runtimes": {"rvmm": {"path": RVMM_OCI}}});
    std::fs::write(&config, json.to_string()).unwrap();
    let socket = daemon.path("docker.sock");
    let mut cmd = Command::new("dockerd");
    cmd.arg("--config-file")
        .arg(&config)
        .arg("--data-root")
        .arg(daemon.path("data"))
        .arg("--exec-root")
        .arg(daemon.path("exec"))
        .arg("--pidfile")
        .arg(daemon.path("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
        .args(["--storage-driver", "vfs"])
        .args(["--exec-opt", "native.cgroupdriver=cgroupfs"]);
    daemon.start(cmd, &socket);
    let archive = daemon.image_archive();
    let out = docker(&daemon, &["load", "-i"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    Some(daemon)
}

/// The docker client, on this daemon only, with its own config directory.
fn docker(daemon: &Daemon, args: &[&str]) -> Command {
    let mut cmd = client("docker");
    cmd.env(
        "DOCKER_HOST",
        format!("unix://{}", daemon.path("docker.sock").display()),
    )
    .env("DOCKER_CONFIG", daemon.path("client"))
    .args(args);
    cmd
}

/// `docker run --rm --runtime rvmm` with `-e`, `-v`, `-i`: each reaches the container, its
/// output streams come back apart, its status is docker's, and nothing is left.
#[test]
fn docker_run_with_options() {
    let test = "docker_run_with_options";
    let Some(mut daemon) = dockerd(test) else {
        return;
    };
    let data = daemon.path("volume");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in"), "from-host\n").unwrap();
    let volume = format!("{}:/data", data.display());
    let script = "echo out; echo err >&2; echo FOO=$FOO; cat /data/in; cat; echo w >/data/out; \
                  exit 5";
    let run = docker(
        &daemon,
        &[
            "run",
            "--rm",
            "-i",
            "--pull",
            "never",
            "--runtime",
            "rvmm",
            "--network",
            "none",
            "-e",
            "FOO=bar",
            "-v",
            &volume,
            DOCKER_IMAGE,
            "sh",
            "-c",
            script,
        ],
    );
    let out = output_logged(run, Some("piped line\n"));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\nFOO=bar\nfrom-host\npiped line\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(data.join("out")).unwrap(), "w\n");
    let left = docker(&daemon, &["ps", "-aq"]).output().unwrap();
    assert_eq!(text(&left.stdout).trim(), "", "containers left");
    daemon.stop_and_assert_nothing_left();
}
