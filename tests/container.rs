//! `rvmm run`: the host-side path from a test image to the disk and bundle the guest gets,
//! the agent-timeout failure, and one container-host VM serving several requests.

mod common;

use std::io::Cursor;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::container::{container_guest, run_dirs, write_images, RunEnv};
use common::{assemble_program, linux_kvm_or_skip, processes_with};
use rvmm_agent::bundle::{config_json, runtime_spec, BundleParams};
use rvmm_agent::protocol::{ExitStatus, RunRequest};
use rvmm_agent::user::resolve;
use rvmm_container::image::disk::DiskCache;
use rvmm_container::image::testimage;
use rvmm_container::image::Image;
use rvmm_container::request::{run_request, Overrides};
use rvmm_container::session::{RunIo, Session};
use rvmm_container::vm::{GuestFiles, VmLaunch, VmProcess};
use vmm_sys_util::tempdir::TempDir;

const RVMM: &str = env!("CARGO_BIN_EXE_rvmm");

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// The request `rvmm run` sends for `argv` with `-e` entries `env` (and `-i` when `stdin`), on
/// top of the image's own settings.
fn request(image: &Image, argv: &[&str], env: &[&str], stdin: bool) -> RunRequest {
    let command = strings(argv);
    let env = strings(env);
    run_request(
        &image.settings,
        &Overrides {
            command: &command,
            env: &env,
            stdin,
            ..Overrides::default()
        },
    )
    .unwrap()
}

fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(disk)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything up to the hand-over to the guest: the ext4 disk and the config.json the agent
/// would write for `-e FOO=bar -- sh -c 'echo $FOO'`.
#[test]
fn host_side_builds_the_disk_and_bundle_the_guest_gets() {
    let dir = TempDir::new().unwrap();
    let Some((docker, oci)) = write_images(dir.as_path()) else {
        return;
    };
    let cache = DiskCache {
        dir: dir.as_path().join("cache"),
        ..DiskCache::user_default()
    };
    for path in [&docker, &oci] {
        let image = Image::open(path, &cache.scratch()).unwrap();
        let disk = cache.disk_for(&image).unwrap();
        let etc = debugfs(&disk, "ls /etc");
        assert!(etc.contains("passwd"), "{etc}");
        assert!(
            !etc.contains("removed-by-upper"),
            "whited-out file present: {etc}"
        );
        let opaque = debugfs(&disk, "ls /etc/opaque");
        assert!(
            opaque.contains("upper") && !opaque.contains("lower"),
            "{opaque}"
        );
        assert!(debugfs(&disk, "stat /bin/busybox").contains("Type: regular"));

        let req = request(&image, &["sh", "-c", "echo $FOO"], &["FOO=bar"], false);
        // What the agent does with it, from the image's own passwd and group.
        let passwd = debugfs(&disk, "cat /etc/passwd");
        let group = debugfs(&disk, "cat /etc/group");
        let user = resolve(&req.user, &passwd, &group).unwrap();
        let spec = runtime_spec(&BundleParams {
            request: &req,
            user: &user,
            hostname: "rvmm",
            cgroup: "/rvmm/c1",
            pids_limit: Some(rvmm_agent::bundle::PIDS_LIMIT),
        })
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(&config_json(&spec).unwrap()).unwrap();
        let process = &config["process"];
        assert_eq!(
            process["args"],
            serde_json::json!(["sh", "-c", "echo $FOO"])
        );
        let env = process["env"].as_array().unwrap();
        assert!(env.contains(&"FOO=bar".into()), "{env:?}");
        assert!(env.contains(&testimage::IMAGE_ENV.into()), "{env:?}");
        assert_eq!(process["cwd"], "/root");
        assert_eq!(process["user"]["uid"], 0);
        assert_eq!(config["root"]["path"], "rootfs");
        let ns = config["linux"]["namespaces"].as_array().unwrap();
        for kind in ["pid", "mount", "uts", "ipc", "network"] {
            assert!(ns.iter().any(|n| n["type"] == kind), "{kind}: {ns:?}");
        }
    }
}

/// A guest that boots but never answers: the container guest's kernel with a root disk whose
/// /sbin/init spins (tests/guests/spin_init.S). Made in `scratch`.
fn silent_guest(container_dir: &Path, scratch: &Path) -> PathBuf {
    let dir = scratch.join("silent-guest");
    let root = scratch.join("silent-root");
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    for d in ["dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(assemble_program("spin_init"), root.join("sbin/init")).unwrap();
    std::fs::create_dir(&dir).unwrap();
    symlink(container_dir.join("vmlinux"), dir.join("vmlinux")).unwrap();
    let disk = dir.join("rootfs.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&disk)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) builds the silent guest's disk");
    assert!(status.success(), "mkfs.ext4 for the silent guest");
    dir
}

/// Our VM processes still alive: any process whose command line names `marker`.
fn processes_naming(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) && cmdline.contains("--vsock") {
                found.push(cmdline);
            }
        }
    }
    found
}

/// The VM tests run one at a time: each checks that no run directory or VM process is left
/// behind, which the other's would look like.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A guest whose agent never answers: one error line, exit 1, no VM and no sockets left.
#[test]
fn agent_timeout_fails_cleanly() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "agent_timeout_fails_cleanly";
    if !linux_kvm_or_skip(test) {
        return;
    }
    let Some(container_dir) = container_guest(test) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let guest = silent_guest(&container_dir, dir.as_path());
    let Some((docker, _)) = write_images(dir.as_path()) else {
        return;
    };
    let before = run_dirs();
    let cache = dir.as_path().join("xdg");
    let out = Command::new(RVMM)
        .env("XDG_CACHE_HOME", &cache)
        .args(["run", "--no-snapshot", "--agent-timeout", "15", "--guest"])
        .arg(&guest)
        .arg(&docker)
        .args(["--", "echo", "hello"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(": warning: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("rvmm: error: the guest agent did not answer within 15s"),
        "{stderr}"
    );
    let marker = cache.to_string_lossy().into_owned();
    assert_eq!(processes_naming(&marker), Vec::<String>::new());
    let leftover: Vec<_> = run_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    // The image disk stayed in the cache for the next run.
    let disks = std::fs::read_dir(cache.join("rvmm/images"))
        .unwrap()
        .count();
    assert!(disks >= 1);
}

/// `rvmm run` starts from a snapshot of a booted guest: the first run makes it, later runs
/// restore it and fill its empty image slot (their consoles show no boot, only the slot's new
/// size), each with the host's time and random numbers of its own. A snapshot that fails its
/// checksum is removed, with a warning, and the run boots.
#[test]
fn run_starts_from_a_snapshot_of_a_booted_guest() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(RunEnv { guest, docker, dir }) =
        RunEnv::new("run_starts_from_a_snapshot_of_a_booted_guest", false)
    else {
        return;
    };
    let xdg = dir.as_path().join("xdg");
    let log = dir.as_path().join("console.log");
    let run = || {
        let out = Command::new(RVMM)
            .env("XDG_CACHE_HOME", &xdg)
            .args(["run", "--network", "none", "--console-log"])
            .arg(&log)
            .arg("--guest")
            .arg(&guest)
            .arg(&docker)
            .args([
                "--",
                "sh",
                "-c",
                "echo hello; date +%s; cat /proc/sys/kernel/random/uuid",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        let lines: Vec<String> = stdout.lines().map(String::from).collect();
        assert_eq!(lines.len(), 3, "{stdout}");
        assert_eq!(lines[0], "hello");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let guest_time: u64 = lines[1].parse().unwrap();
        assert!(
            now.abs_diff(guest_time) < 60,
            "guest {guest_time}, host {now}"
        );
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        (lines[2].clone(), stderr, console)
    };
    let snapshots = || -> Vec<PathBuf> {
        std::fs::read_dir(xdg.join("rvmm/snapshots"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    let booted = |console: &str| console.contains("Linux version");
    let slot_filled = |console: &str| console.contains("detected capacity change from 0");

    let (first, stderr, console) = run();
    assert!(stderr.is_empty(), "the warm-up container ran: {stderr}");
    assert_eq!(snapshots().len(), 1, "made on first use");
    assert!(!booted(&console) && slot_filled(&console), "{console}");
    let (second, stderr, console) = run();
    assert!(!booted(&console) && slot_filled(&console), "{console}");
    assert!(stderr.is_empty(), "{stderr}");
    assert_ne!(
        first, second,
        "each restored VM draws its own random numbers"
    );

    let snapshot = snapshots().remove(0);
    std::fs::write(snapshot.join("state.sha256"), "0".repeat(64)).unwrap();
    let (_, stderr, console) = run();
    assert!(
        stderr.contains("cannot restore the start-up snapshot") && stderr.contains("booting"),
        "{stderr}"
    );
    assert!(booted(&console), "{console}");
    assert!(!snapshot.exists(), "the broken snapshot is removed");
    let marker = dir.as_path().display().to_string();
    assert_eq!(processes_with(&marker), Vec::<String>::new());
}

/// `rvmm run -v`: the container reads a host file and writes one the host then finds; a `:ro`
/// volume refuses writes; no virtiofsd outlives the run.
#[test]
fn run_mounts_host_directories_as_volumes() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(RunEnv { guest, docker, dir }) =
        RunEnv::new("run_mounts_host_directories_as_volumes", false)
    else {
        return;
    };
    let (rw, ro) = (dir.as_path().join("rw"), dir.as_path().join("ro"));
    for (d, text) in [(&rw, "from-host\n"), (&ro, "read-only\n")] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("in"), text).unwrap();
    }
    let script = "cat /data/in /conf/in; echo out >/data/out; \
                  if echo no >/conf/x; then echo ro-was-writable; fi";
    let out = Command::new(RVMM)
        .env("XDG_CACHE_HOME", dir.as_path().join("xdg"))
        .arg("run")
        .arg("--guest")
        .arg(&guest)
        .arg("-v")
        .arg(format!("{}:/data", rw.display()))
        .arg("--volume")
        .arg(format!("{}:/conf:ro", ro.display()))
        .arg(&docker)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "from-host\nread-only\n");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "out\n");
    assert!(!ro.join("x").exists());
    let marker = dir.as_path().display().to_string();
    let left = processes_with(&marker);
    assert!(left.is_empty(), "still running: {left:?}");
}

struct Ran {
    status: ExitStatus,
    stdout: String,
}

fn run(session: &mut Session, req: RunRequest, stdin: Option<&[u8]>) -> Ran {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = session
        .run(
            &req,
            RunIo {
                stdin: stdin.map(|s| Box::new(Cursor::new(s.to_vec())) as _),
                stdout: &mut out,
                stderr: &mut err,
            },
        )
        .unwrap();
    eprintln!(
        "{:?}: {status:?} stderr={}",
        req.argv,
        String::from_utf8_lossy(&err)
    );
    Ran {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
    }
}

/// One boot serving several requests, as `rvmm run` would send them.
#[test]
fn container_vm_serves_several_requests() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "container_vm_serves_several_requests";
    if !linux_kvm_or_skip(test) {
        return;
    }
    let Some(guest_dir) = container_guest(test) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let Some((_, oci)) = write_images(dir.as_path()) else {
        return;
    };
    let cache = DiskCache {
        dir: dir.as_path().join("cache"),
        ..DiskCache::user_default()
    };
    let image = Image::open(&oci, &cache.scratch()).unwrap();
    let disk = cache.disk_for(&image).unwrap();
    let guest = GuestFiles::find(Some(&guest_dir)).unwrap();
    let log = dir.as_path().join("console.log");
    let mut vm = VmProcess::start(&VmLaunch {
        vmm: Path::new(RVMM),
        guest: &guest,
        image_disk: Some(&disk),
        cpus: 2,
        memory_mib: 512,
        nets: &[],
        publish: &[],
        shares: &[],
        netns: None,
        console_log: Some(&log),
        run_dir_in: None,
        balloon: false,
        balloon_stats: None,
    })
    .unwrap();
    let mut session = vm.connect(Duration::from_secs(600)).unwrap();
    let req = |argv: &[&str], env: &[&str], stdin: bool| request(&image, argv, env, stdin);
    let ran = run(&mut session, req(&["echo", "hello"], &[], false), None);
    assert_eq!(
        (ran.status, ran.stdout.as_str()),
        (ExitStatus::Code(0), "hello\n")
    );
    let ran = run(&mut session, req(&["sh", "-c", "exit 3"], &[], false), None);
    assert_eq!(ran.status, ExitStatus::Code(3));
    let ran = run(
        &mut session,
        req(&["sh", "-c", "echo $FOO"], &["FOO=bar"], false),
        None,
    );
    assert_eq!(ran.stdout, "bar\n");
    let input = vec![b'x'; 100_000];
    let ran = run(&mut session, req(&["wc", "-c"], &[], true), Some(&input));
    assert_eq!(ran.stdout.trim(), "100000");
    let ran = run(
        &mut session,
        req(&["ps", "-o", "pid,comm"], &[], false),
        None,
    );
    let procs: Vec<&str> = ran.stdout.lines().skip(1).collect();
    assert_eq!(procs.len(), 1, "only ps itself: {}", ran.stdout);
    assert!(procs[0].trim_start().starts_with("1 "), "{}", ran.stdout);
    let ran = run(
        &mut session,
        req(&["ls", "/etc", "/etc/opaque"], &[], false),
        None,
    );
    assert!(!ran.stdout.contains("removed-by-upper"), "{}", ran.stdout);
    assert!(
        ran.stdout.contains("upper") && !ran.stdout.contains("lower"),
        "{}",
        ran.stdout
    );
    session.shutdown().unwrap();
    vm.finish(Duration::from_secs(60));
}

/// The generated bundle, run by the host's crun on the unpacked test image: the same
/// config.json the agent writes, checked by the runtime that will read it.
#[test]
fn host_crun_runs_the_generated_bundle() {
    let test = "host_crun_runs_the_generated_bundle";
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new("/usr/bin/crun").is_file() || !root {
        eprintln!("SKIPPED {test}: needs root and /usr/bin/crun");
        return;
    }
    let dir = TempDir::new().unwrap();
    let Some((docker, _)) = write_images(dir.as_path()) else {
        return;
    };
    let bundle = dir.as_path().join("bundle");
    let rootfs = bundle.join(rvmm_agent::bundle::ROOTFS_DIR);
    std::fs::create_dir_all(&rootfs).unwrap();
    let image = Image::open(&docker, dir.as_path()).unwrap();
    image.unpack(&rootfs, &mut Default::default()).unwrap();
    let req = request(
        &image,
        &["sh", "-c", "echo $FOO; ls /etc; ps -o pid,comm; exit 3"],
        &["FOO=bar"],
        false,
    );
    let user = resolve(&req.user, "", "").unwrap();
    let id = format!("rvmm-test-{}", std::process::id());
    let cgroup = format!("/rvmm-test/{id}");
    let spec = runtime_spec(&BundleParams {
        request: &req,
        user: &user,
        hostname: "rvmm",
        cgroup: &cgroup,
        pids_limit: None,
    })
    .unwrap();
    std::fs::write(bundle.join("config.json"), config_json(&spec).unwrap()).unwrap();
    // crun refuses a hybrid cgroup v1/v2 host (as this one is): give it a private mount
    // namespace with only cgroup2 mounted, like the guest, and leave cgroups alone.
    let script = "umount -l /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 none /sys/fs/cgroup && \
                  exec /usr/bin/crun --cgroup-manager=disabled run --bundle \"$0\" \"$1\"";
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    let _ = Command::new("/usr/bin/crun")
        .args(["delete", "-f", &id])
        .status();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "crun: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stdout.starts_with("bar\n"), "{stdout}");
    assert!(!stdout.contains("removed-by-upper"), "{stdout}");
    let procs: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("PID"))
        .skip(1)
        .collect();
    assert_eq!(procs.len(), 2, "sh and ps only: {stdout}");
}
