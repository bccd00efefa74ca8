//! rvmm-oci as podman drives it (conmon, Debian's podman 4.3): each container in its own
//! microVM on a real KVM, its bundle's root and bind mounts over virtio-fs. And rvmm-oci's
//! own command line, with bad bundles, ids and states, which need no VM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, linux_kvm_or_skip, output_logged, processes_with, text};
use vmm_sys_util::tempdir::TempDir;

const RVMM_OCI: &str = env!("CARGO_BIN_EXE_rvmm-oci");
const IMAGE: &str = "localhost/rvmm-oci-test";
const BUSYBOX: &str = "/bin/busybox";
/// What the image's httpd serves.
const PAGE: &str = "hello over http\n";

/// A private podman (its own storage, run and state directories) whose runtime is rvmm-oci.
struct Podman {
    dir: TempDir,
}

impl Podman {
    /// podman with the test image imported, or a skip (a failure under RVMM_REQUIRE_KVM=1).
    fn new(test: &str) -> Option<Podman> {
        if !linux_kvm_or_skip(test) {
            return None;
        }
        if Command::new("podman").arg("--version").output().is_err() {
            let why = "podman is not installed (resources/install-deps.sh installs it)";
            if std::env::var("RVMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let podman = Podman {
            dir: TempDir::new_with_prefix(std::env::temp_dir().join("rvmm-oci-podman-")).unwrap(),
        };
        let tar = podman.rootfs_tar();
        let out = podman.output(&["import", tar.to_str().unwrap(), IMAGE], None);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        Some(podman)
    }

    /// A busybox root as a tar, for `podman import`.
    fn rootfs_tar(&self) -> PathBuf {
        let root = self.dir.as_path().join("rootfs");
        for d in [
            "bin", "etc", "proc", "sys", "dev", "tmp", "data", "ro", "www",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), PAGE).unwrap();
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in text(&list.stdout).lines().filter(|a| *a != "busybox") {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let tar = self.dir.as_path().join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        tar
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.as_path();
        let mut cmd = Command::new("podman");
        // vfs: the overlay driver cannot stack on the nested machine's overlay root.
        cmd.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--runtime", RVMM_OCI])
            .args(args);
        cmd
    }

    fn output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        output_logged(self.command(args), stdin)
    }

    /// `podman ARGS` output, which must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args, None);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Waits up to a minute for `text` in the container's log.
    fn wait_for_log(&self, name: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ok(&["logs", name]).contains(text) {
            assert!(Instant::now() < deadline, "{text:?} never came from {name}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// "STATUS EXITCODE" as podman inspect shows them.
    fn state(&self, name: &str) -> String {
        let format = "{{.State.Status}} {{.State.ExitCode}}";
        self.ok(&["inspect", "-f", format, name]).trim().to_string()
    }

    /// No process of ours is left within 10 s (conmon may still be on its way out when podman
    /// returns): rvmm, its virtiofsd, the keeper and conmon all name this podman's directories
    /// in their command lines.
    fn assert_nothing_left(&self) {
        let marker = self.dir.as_path().display().to_string();
        let ours = || -> Vec<String> {
            processes_with(&marker)
                .into_iter()
                .filter(|c| !c.starts_with("podman"))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut left = ours();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            left = ours();
        }
        assert!(left.is_empty(), "still running: {left:?}");
    }
}

/// A directory the container's uid 1000 may write, holding `in` with `content`.
fn host_dir(parent: &Path, name: &str, content: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), content).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    std::fs::set_permissions(&dir, mode).unwrap();
    dir
}

/// One `podman run --rm` with most of its options: the container sees each, and its
/// output, streams and status come back as they would from crun.
#[test]
fn podman_run_with_options() {
    let Some(podman) = Podman::new("podman_run_with_options") else {
        return;
    };
    let d = podman.dir.as_path();
    let data = host_dir(d, "data", "from-host\n");
    let ro = host_dir(d, "ro", "read-only\n");
    let volume = format!("{}:/data", data.display());
    let ro_volume = format!("{}:/ro:ro", ro.display());
    let script = "echo out; echo err >&2; echo FOO=$FOO; pwd; id -u; id -g; cat /data/in /ro/in; \
                  echo w >/data/out; touch /ro/x 2>/dev/null || echo ro-refused; \
                  touch /rootfile 2>/dev/null || echo root-refused; \
                  touch /scratch/f && echo scratch-ok; cat /sys/fs/cgroup/memory.max; ls /sys/class/net; \
                  awk '/MemTotal/ {print \"mem\", $2}' /proc/meminfo; exit 42";
    let out = podman.output(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "-v",
            &volume,
            "-v",
            &ro_volume,
            "--read-only",
            "--tmpfs",
            "/scratch",
            "--memory",
            "256m",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    // --network none: loopback only.
    let expected = [
        "out",
        "FOO=bar",
        "/tmp",
        "1000",
        "1000",
        "from-host",
        "read-only",
        "ro-refused",
        "root-refused",
        "scratch-ok",
        "268435456",
        "lo",
    ];
    assert_eq!(lines[..12], expected);
    // 256 MiB for the container plus the guest's own headroom, less what the kernel keeps.
    let mem_kib: u64 = lines[12].strip_prefix("mem ").unwrap().parse().unwrap();
    assert!(
        (300 << 10..=(256 + 192) << 10).contains(&mem_kib),
        "{mem_kib}"
    );
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(data.join("out")).unwrap(), "w\n");
    assert!(!ro.join("x").exists());
    podman.assert_nothing_left();
}

/// `-i`: piped stdin reaches the container and its end closes the container's stdin.
#[test]
fn podman_run_interactive_stdin() {
    let Some(podman) = Podman::new("podman_run_interactive_stdin") else {
        return;
    };
    let out = podman.output(
        &[
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            "cat; echo eof",
        ],
        Some("piped line\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "piped line\neof\n");
}

/// `-t` under a terminal of 33×101 (`script` makes it): the container is on a pty of that
/// size, and its output comes back through it.
#[test]
fn podman_run_on_a_terminal() {
    let Some(podman) = Podman::new("podman_run_on_a_terminal") else {
        return;
    };
    let run = podman.command(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "-t",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "tty; stty size; exit 7",
    ]);
    let quoted: Vec<String> = std::iter::once(run.get_program())
        .chain(run.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let line = format!("stty rows 33 cols 101; {}", quoted.join(" "));
    let out = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout, "/dev/pts/0\r\n33 101\r\n");
    podman.assert_nothing_left();
}

/// GET / from 127.0.0.1:`port`, tried for up to a minute (the VM may still be booting); the
/// body once it holds [`PAGE`].
fn page_from(port: u16) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let got = http_get(port, PAGE, Duration::from_secs(5));
        if let Some((_, body)) = got.as_deref().ok().and_then(|r| r.split_once("\r\n\r\n")) {
            if body.contains(PAGE) {
                return Some(body.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

/// podman's default bridge network (CNI): the guest's eth0 is the container's interface
/// (its address and route), and `-p 127.0.0.1:18080:80` reaches the container's httpd.
#[test]
fn podman_bridge_network_and_published_port() {
    let Some(podman) = Podman::new("podman_bridge_network_and_published_port") else {
        return;
    };
    let name = "rvmm-oci-web";
    podman.ok(&[
        "run",
        "-d",
        "--pull",
        "never",
        "--name",
        name,
        "-p",
        "127.0.0.1:18080:80",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let body = page_from(18080);
    let ip = podman.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name]);
    podman.ok(&["rm", "-f", name]);
    assert_eq!(body.as_deref(), Some(PAGE));
    let out = podman.output(
        &[
            "run",
            "--rm",
            "--pull",
            "never",
            IMAGE,
            "sh",
            "-c",
            "ip -o -4 addr show eth0; ip route",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("eth0    inet ") || stdout.contains("eth0 inet "),
        "{stdout}"
    );
    assert!(stdout.contains("default via "), "{stdout}");
    assert!(!ip.trim().is_empty());
    podman.assert_nothing_left();
}

/// `podman run -d`, then ps, logs, inspect, exec, stop (SIGTERM reaches the container's trap)
/// and rm: the states podman shows follow the container's, and nothing is left.
#[test]
fn podman_detached_lifecycle() {
    let Some(podman) = Podman::new("podman_detached_lifecycle") else {
        return;
    };
    let name = "rvmm-oci-detached";
    let script = "trap 'echo got-term; exit 3' TERM; echo started; while :; do sleep 1; done";
    podman.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    assert!(podman.ok(&["ps", "--format", "{{.Names}}"]).contains(name));
    podman.wait_for_log(name, "started");
    assert_eq!(podman.state(name), "running 0");
    // exec: another process in the same container, with its own output and status.
    let out = podman.output(
        &[
            "exec",
            name,
            "sh",
            "-c",
            "echo in-exec; ls /proc | grep -c '^[0-9]'; exit 5",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("in-exec"));
    // The container's shell, its sleep, and the exec's own sh and ls at least.
    let procs: u32 = lines.next().unwrap().trim().parse().unwrap();
    assert!(procs >= 3, "{stdout}");
    podman.ok(&["stop", "-t", "30", name]);
    assert_eq!(podman.state(name), "exited 3");
    assert!(podman.ok(&["logs", name]).contains("got-term"));
    podman.ok(&["rm", name]);
    podman.assert_nothing_left();
}

/// `podman pause` stops the container's VM (its output stops, podman and the runtime say
/// `paused`), `unpause` lets it go on, and `rm -f` of a paused container leaves nothing.
#[test]
fn podman_pause_and_unpause() {
    let Some(podman) = Podman::new("podman_pause_and_unpause") else {
        return;
    };
    let name = "rvmm-oci-paused";
    let script = "i=0; while :; do i=$((i + 1)); echo tick $i; sleep 0.2; done";
    podman.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    podman.wait_for_log(name, "tick 3");
    podman.ok(&["pause", name]);
    assert_eq!(podman.state(name), "paused 0");
    let ticks = || podman.ok(&["logs", name]).lines().count();
    // Output already on its way from the guest may still land.
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = ticks();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ticks(), paused_at, "the container ran on while paused");
    podman.ok(&["unpause", name]);
    assert_eq!(podman.state(name), "running 0");
    podman.wait_for_log(name, &format!("tick {}", paused_at + 3));
    podman.ok(&["pause", name]);
    podman.ok(&["rm", "-f", name]);
    podman.assert_nothing_left();
}

/// The container's virtiofsd is killed under it: the VM stops, podman sees the container
/// exit with status 1, and `rm` leaves nothing behind.
#[test]
fn podman_container_whose_virtiofsd_dies() {
    let Some(podman) = Podman::new("podman_container_whose_virtiofsd_dies") else {
        return;
    };
    let name = "rvmm-oci-fault";
    podman.ok(&[
        "run",
        "-d",
        "--pull",
        "never",
        "--name",
        name,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo started; while :; do cat /etc/hostname >/dev/null; sleep 0.2; done",
    ]);
    podman.wait_for_log(name, "started");
    let marker = podman.dir.as_path().display().to_string();
    let killed =
        kill_processes(|cmdline| cmdline.contains("virtiofsd") && cmdline.contains(&marker));
    assert!(killed > 0, "no virtiofsd found");
    let deadline = Instant::now() + Duration::from_secs(60);
    while podman.state(name) != "exited 1" {
        assert!(Instant::now() < deadline, "still {}", podman.state(name));
        std::thread::sleep(Duration::from_millis(500));
    }
    podman.ok(&["rm", name]);
    podman.assert_nothing_left();
}

/// SIGKILLs every process whose command line `matches`; how many.
fn kill_processes(matches: impl Fn(&str) -> bool) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if matches(&String::from_utf8_lossy(&cmdline).replace('\0', " ")) {
            // SAFETY: kill with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

/// rvmm-oci itself: one error line and status 1 for each bad bundle, id and state, also as
/// JSON in the log file; `delete --force` of what does not exist succeeds.
#[test]
fn oci_command_line_refuses_bad_input() {
    let dir = TempDir::new().unwrap();
    let d = dir.as_path();
    let root = d.join("state");
    let log = d.join("log.json");
    let oci = |args: &[&str]| {
        let out = Command::new(RVMM_OCI)
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let refused = |args: &[&str], needle: &str| {
        let (code, _, stderr) = oci(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("rvmm-oci: error: ") && lines[0].contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    };
    let bundle = d.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let b = bundle.to_str().unwrap();
    refused(&["create", "--bundle", b, "c1"], "config.json");
    let config = |version: &str, root: &str| {
        let json = format!(
            r#"{{"ociVersion":"{version}","process":{{"args":["true"]}},"root":{{"path":"{root}"}}}}"#
        );
        std::fs::write(bundle.join("config.json"), json).unwrap();
    };
    config("0.9.0", "rootfs");
    refused(
        &["create", "--bundle", b, "c1"],
        "ociVersion \"0.9.0\" is not supported",
    );
    config("1.0.2", "missing");
    refused(&["create", "--bundle", b, "c1"], "is not a directory");
    refused(&["create", "--bundle", b, "../x"], "is not valid");
    refused(&["state", "nope"], "container nope does not exist");
    refused(&["start", "nope"], "container nope does not exist");
    refused(&["kill", "nope", "TERM"], "container nope does not exist");
    refused(&["kill", "nope", "SIGNOPE"], "unknown signal");
    refused(&["delete", "nope"], "container nope does not exist");
    refused(
        &["exec", "--process", "/p.json", "nope"],
        "container nope does not exist",
    );
    refused(&["checkpoint", "nope"], "checkpoint");
    assert_eq!(oci(&["delete", "--force", "nope"]).0, Some(0));
    let (code, features, _) = oci(&["features"]);
    assert_eq!(code, Some(0));
    let features: serde_json::Value = serde_json::from_str(&features).unwrap();
    assert_eq!(features["ociVersionMin"], "1.0.0");
    let logged = std::fs::read_to_string(&log).unwrap();
    let first: serde_json::Value = serde_json::from_str(logged.lines().next().unwrap()).unwrap();
    assert_eq!(first["level"], "error");
    assert!(
        first["msg"].as_str().unwrap().contains("config.json"),
        "{first}"
    );
    // Nothing was created for the refused containers.
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
