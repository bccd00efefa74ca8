//! The runtime step: podman with crun against podman with rvmm-oci as its OCI runtime. Start
//! latency of `podman run --rm IMAGE true`, and the host memory of one running container. The
//! podman is the bench's own (storage, run and tmp directories under the work directory, vfs
//! storage, cgroupfs), its image a busybox root imported once; every container and the
//! storage are removed at the end, also after an error or a Ctrl-C.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rvmm_vmm::error_chain;

use super::ctx::{progress, Ctx};
use super::procmem::{kib_field, parents};
use super::report::{Better, Figure, Variant};
use super::runner::{check_cancel, run, Measured, RunError, Watch};
use super::tools::which;

pub const IMAGE: &str = "localhost/rvmm-bench";
const BUSYBOX: &str = "/bin/busybox";
/// One podman command; a container start under rvmm-oci takes ~10 s on the nested KVM.
const TIMEOUT: Duration = Duration::from_secs(300);
/// How long a detached container may take to show as running.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for a running container to settle before its memory is read.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum PodmanError {
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the container {0} is {1}, not running")]
    NotRunning(String, String),
}

/// Start latency and memory per running container, under crun and under rvmm-oci, and a note
/// on what the memory figure counts.
pub fn runtime(ctx: &Ctx) -> Result<(Vec<Figure>, Option<String>), RunError> {
    let mut start = Figure::new(
        "runtime.start",
        "podman run --rm true (--network none)",
        "s",
        Better::Lower,
    );
    let mut memory = Figure::new(
        "runtime.memory",
        "podman: PSS of a running container",
        "MiB",
        Better::Lower,
    );
    let other = "podman runs crun and rvmm-oci only: no plain process or QEMU here";
    start.skipped(Variant::Process, other);
    memory.skipped(Variant::Process, other);
    let runtimes = [
        (Variant::Container, "crun", crun(ctx)),
        (Variant::Rvmm, "rvmm-oci", rvmm_oci(ctx)),
    ];
    let usable: Vec<PathBuf> = runtimes
        .iter()
        .filter_map(|(_, _, r)| r.clone().ok())
        .collect();
    // Without a usable runtime, each row says why and podman is not needed.
    let podman = if usable.is_empty() {
        Err(String::new())
    } else {
        Podman::create(&ctx.work, usable)
    };
    let mut counted = Vec::new();
    for (variant, name, runtime) in runtimes {
        let runtime = runtime.and_then(|r| Ok((podman.as_ref().map_err(Clone::clone)?, r)));
        progress(&format!("runtime: podman run with {name}, start latency"));
        let samples = runtime
            .clone()
            .and_then(|(p, r)| start_latency(ctx.runs, p, &r).map_err(reason));
        put(&mut start, variant, samples)?;
        progress(&format!("runtime: podman run with {name}, memory"));
        let samples = runtime.and_then(|(p, r)| {
            let (samples, names) = memory_samples(ctx.runs, p, &r).map_err(reason)?;
            counted.push(format!("{name}: {}", names.join(", ")));
            Ok(samples)
        });
        put(&mut memory, variant, samples)?;
    }
    start.skipped(Variant::Qemu, other);
    memory.skipped(Variant::Qemu, other);
    Ok((vec![start, memory], note(&counted)))
}

fn reason(e: PodmanError) -> String {
    error_chain(&e)
}

/// Stores the samples or the skip reason; a Ctrl-C is passed on.
pub fn put(
    fig: &mut Figure,
    variant: Variant,
    samples: Result<Vec<f64>, String>,
) -> Result<(), RunError> {
    check_cancel()?;
    match samples {
        Ok(s) => fig.samples(variant, s),
        Err(reason) => fig.skipped(variant, &reason),
    }
    Ok(())
}

fn note(counted: &[String]) -> Option<String> {
    if counted.is_empty() {
        return None;
    }
    Some(format!(
        "runtime: podman with its own vfs storage, cgroupfs and `--network none`, a busybox \
         image. Start: wall time of `podman run --rm IMAGE true` from its start to its exit, \
         after one unrecorded run. Memory: `podman run -d IMAGE sleep 1000`, then, once \
         podman shows it running, the PSS summed over every process that appeared since (and \
         was started from the bench's side, not by an unrelated parent): {}.",
        counted.join("; ")
    ))
}

fn crun(ctx: &Ctx) -> Result<PathBuf, String> {
    ctx.tools
        .crun
        .clone()
        .ok_or_else(|| "crun is not installed".into())
}

/// rvmm-oci next to this rvmm, on a KVM that runs guest user space.
fn rvmm_oci(ctx: &Ctx) -> Result<PathBuf, String> {
    ctx.kvm.clone()?;
    if ctx.emulated {
        return Err(
            "guest user space cannot run on this emulating KVM (kvm_pvm); run the bench on a \
             real KVM, e.g. inside resources/nested-kvm.sh"
                .into(),
        );
    }
    let oci = ctx.tools.rvmm.with_file_name("rvmm-oci");
    if !oci.is_file() {
        return Err(format!(
            "no {} next to rvmm (cargo build --workspace builds it)",
            oci.display()
        ));
    }
    Ok(oci)
}

/// Seconds of `podman run --rm IMAGE true`: one warm-up run, then `runs` measured ones.
fn start_latency(runs: u32, podman: &Podman, runtime: &Path) -> Result<Vec<f64>, PodmanError> {
    let mut samples = Vec::new();
    for i in 0..=runs {
        let args = ["run", "--rm", "--network", "none", IMAGE, "true"];
        let m = podman.run(runtime, &args)?;
        if i > 0 {
            samples.push(m.wall);
        }
    }
    Ok(samples)
}

/// `runs` samples of [`container_memory`], and the processes the last one counted.
fn memory_samples(
    runs: u32,
    podman: &Podman,
    runtime: &Path,
) -> Result<(Vec<f64>, Vec<String>), PodmanError> {
    let mut samples = Vec::new();
    let mut names = Vec::new();
    for i in 0..runs {
        let (mib, counted) = container_memory(podman, runtime, i)?;
        samples.push(mib);
        names = counted;
    }
    Ok((samples, names))
}

/// MiB of PSS of the processes one running container added, and their names.
fn container_memory(
    podman: &Podman,
    runtime: &Path,
    i: u32,
) -> Result<(f64, Vec<String>), PodmanError> {
    let before: HashSet<u32> = parents().into_keys().collect();
    let name = format!("rvmm-bench-{}-{i}", std::process::id());
    let args = [
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        IMAGE,
        "sleep",
        "1000",
    ];
    podman.run(runtime, &args)?;
    let sample = podman.wait_running(runtime, &name).map(|()| {
        std::thread::sleep(SETTLE);
        let table = parents();
        let pids = new_processes(&before, &table, &ancestors(&table, std::process::id()));
        let pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
        (
            pss as f64 / 1024.0,
            counted_names(pids.iter().filter_map(|p| comm(*p))),
        )
    });
    let removed = podman.run(runtime, &["rm", "-f", "-t", "0", &name]);
    let sample = sample?;
    removed?;
    Ok(sample)
}

/// "name" or "name ×N" per distinct name, sorted.
fn counted_names(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut counts = std::collections::BTreeMap::new();
    names.for_each(|n| *counts.entry(n).or_insert(0) += 1);
    counts
        .into_iter()
        .map(|(n, c)| if c > 1 { format!("{n} ×{c}") } else { n })
        .collect()
}

fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    kib_field(&rollup, "Pss:")
}

fn comm(pid: u32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim().to_string())
}

/// `pid` and its parent chain up to the root (which orphans are reparented to).
fn ancestors(table: &HashMap<u32, u32>, pid: u32) -> HashSet<u32> {
    let mut out = HashSet::new();
    let mut p = pid;
    while p != 0 && out.insert(p) {
        p = table.get(&p).copied().unwrap_or(0);
    }
    out
}

/// The processes of `table` not in `before` that the bench's commands started: their parent
/// is one of the bench's `ancestors` (the bench itself, or a subreaper that adopted a
/// daemonised process such as conmon) or such a process itself. A process an unrelated
/// program started meanwhile is not counted.
fn new_processes(
    before: &HashSet<u32>,
    table: &HashMap<u32, u32>,
    ancestors: &HashSet<u32>,
) -> Vec<u32> {
    let fresh: HashMap<u32, u32> = table
        .iter()
        .filter(|(pid, _)| !before.contains(pid))
        .map(|(pid, ppid)| (*pid, *ppid))
        .collect();
    let ours = |mut pid: u32| {
        while let Some(ppid) = fresh.get(&pid) {
            if ancestors.contains(ppid) {
                return true;
            }
            pid = *ppid;
        }
        false
    };
    let mut pids: Vec<u32> = fresh.keys().copied().filter(|p| ours(*p)).collect();
    pids.sort_unstable();
    pids
}

/// The bench's own podman: every path under `dir`; on drop, every container (of every
/// runtime in `runtimes`) and the storage are removed.
pub struct Podman {
    podman: PathBuf,
    dir: PathBuf,
    runtimes: Vec<PathBuf>,
}

impl Podman {
    /// Podman with the busybox image imported, or why not; `runtimes` is not empty.
    pub fn create(work: &Path, runtimes: Vec<PathBuf>) -> Result<Podman, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("podman with private storage needs root".into());
        }
        let podman = which("podman")
            .ok_or("podman is not installed (resources/install-deps.sh installs it)")?;
        if !Path::new(BUSYBOX).is_file() {
            return Err(format!(
                "no {BUSYBOX} for the image (install busybox-static)"
            ));
        }
        progress("runtime: importing a busybox image into a private podman");
        let podman = Podman {
            podman,
            dir: work.join("podman"),
            runtimes,
        };
        let tar = podman.image_tar().map_err(reason)?;
        let tar = tar.to_string_lossy();
        // Any runtime will do: importing runs no container.
        podman
            .run(&podman.runtimes[0], &["import", &tar, IMAGE])
            .map_err(|e| reason(e.into()))?;
        Ok(podman)
    }

    /// A busybox root as a tar, for `podman import`.
    fn image_tar(&self) -> Result<PathBuf, PodmanError> {
        let root = self.dir.join("rootfs");
        let write = |p: &Path, e| PodmanError::Write(p.display().to_string(), e);
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
            let d = root.join(d);
            std::fs::create_dir_all(&d).map_err(|e| write(&d, e))?;
        }
        let bin = root.join("bin");
        std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(|e| write(&bin, e))?;
        for applet in ["sh", "true", "sleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| write(&bin, e))?;
        }
        let passwd = root.join("etc/passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n")
            .map_err(|e| write(&passwd, e))?;
        let group = root.join("etc/group");
        std::fs::write(&group, "root:x:0:\n").map_err(|e| write(&group, e))?;
        let tar = self.image();
        let mut cmd = Command::new("tar");
        cmd.arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".");
        run(&mut cmd, Watch::new("tar", TIMEOUT, ""))?;
        Ok(tar)
    }

    /// The busybox root the image was imported from, as a tar (`rvmm run` takes it too).
    pub fn image(&self) -> PathBuf {
        self.dir.join("rootfs.tar")
    }

    pub fn command(&self, runtime: &Path, args: &[&str]) -> Command {
        let d = &self.dir;
        let mut cmd = Command::new(&self.podman);
        // vfs: the overlay driver cannot stack on the nested machine's overlay root.
        cmd.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--runtime"])
            .arg(runtime)
            .args(args);
        cmd
    }

    /// `podman ARGS`, which must succeed within TIMEOUT.
    fn run(&self, runtime: &Path, args: &[&str]) -> Result<Measured, RunError> {
        let what = format!("podman {}", args.first().copied().unwrap_or_default());
        run(
            &mut self.command(runtime, args),
            Watch::new(&what, TIMEOUT, ""),
        )
    }

    fn wait_running(&self, runtime: &Path, name: &str) -> Result<(), PodmanError> {
        let deadline = Instant::now() + RUNNING_TIMEOUT;
        let args = [
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.Status}}",
            name,
        ];
        loop {
            let out = self.run(runtime, &args)?.stdout;
            let (running, status) = out.trim().split_once(' ').unwrap_or(("", ""));
            if running == "true" {
                return Ok(());
            }
            if matches!(status, "exited" | "stopped") {
                return Err(PodmanError::NotRunning(name.into(), status.into()));
            }
            if Instant::now() > deadline {
                let status = format!("{status} after {} s", RUNNING_TIMEOUT.as_secs());
                return Err(PodmanError::NotRunning(name.into(), status));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for runtime in &self.runtimes {
            wait_quietly(self.command(runtime, &["rm", "-af", "-t", "0"]));
        }
        self.stop_leftovers();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mount in mounts_under(&mountinfo, &self.dir) {
            let Ok(path) = std::ffi::CString::new(mount.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a valid C string; detaching a mount podman left under our own directory.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Podman {
    /// A `podman run -d` stopped by a Ctrl-C before the container was created leaves its
    /// conmon and the runtime's processes running, and podman forgets the container: the
    /// runtime deletes it (`delete --force`, as conmon names it), and whatever still names
    /// this podman's directory in its command line is killed.
    fn stop_leftovers(&self) {
        let marker = self.dir.as_os_str().as_bytes();
        let named = || {
            let me = std::process::id();
            let mut found: Vec<(u32, Vec<String>)> = Vec::new();
            for (pid, _) in parents().into_iter().filter(|(pid, _)| *pid != me) {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if raw.windows(marker.len()).any(|w| w == marker) {
                    let args = raw.split(|b| *b == 0).map(String::from_utf8_lossy);
                    found.push((pid, args.map(|a| a.into_owned()).collect()));
                }
            }
            found
        };
        for (_, args) in named() {
            if let Some(delete) = conmon_delete(&args) {
                let mut cmd = Command::new(&delete[0]);
                cmd.args(&delete[1..]);
                wait_quietly(cmd);
            }
        }
        for (pid, _) in named() {
            // SAFETY: kill(2) of a process that names our own podman directory, so one that
            // this bench's podman started; a pid that has ended meanwhile gets ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// From a conmon command line (`-c ID`, `-r RUNTIME`, `--runtime-arg ARG`...): the runtime's
/// `RUNTIME ARG... delete --force ID`.
fn conmon_delete(args: &[String]) -> Option<Vec<String>> {
    if !args.first()?.ends_with("conmon") {
        return None;
    }
    let mut runtime = None;
    let mut id = None;
    let mut global = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-c" | "--cid" => id = it.next(),
            "-r" | "--runtime" => runtime = it.next(),
            "--runtime-arg" => global.extend(it.next().cloned()),
            _ => {}
        }
    }
    let mut cmd = vec![runtime?.clone()];
    cmd.extend(global);
    cmd.extend(["delete".to_string(), "--force".to_string(), id?.clone()]);
    Some(cmd)
}

/// Runs `cmd` without output for up to TIMEOUT. Not through `runner::run`, which refuses to
/// start anything after a Ctrl-C: this is the clean-up after one.
fn wait_quietly(mut cmd: Command) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if let Ok(mut child) = cmd.spawn() {
        let deadline = Instant::now() + TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The mount points at or under `dir` in /proc/self/mountinfo text, the latest first.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.reverse();
    out
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pss_from_smaps_rollup() {
        let rollup = "55d0-7ffc ---p 00000000 00:00 0 [rollup]\nRss: 2048 kB\nPss: 1234 kB\n\
                      Pss_Anon: 1000 kB\nPss_File: 234 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), 1234);
        assert!(pss_kib(std::process::id()) > 0);
        assert_eq!(pss_kib(u32::MAX), 0);
    }

    /// 1 ← bench(10) ← podman(20, gone); conmon(30) adopted by 1, its children; an unrelated
    /// cargo(40, old) starts rustc(41); kthreadd(2) starts a kworker(50).
    #[test]
    fn counts_only_new_processes_started_from_the_benchs_side() {
        let table: HashMap<u32, u32> = [
            (1, 0),
            (10, 1),
            (30, 1),
            (31, 30),
            (32, 31),
            (40, 1),
            (41, 40),
            (2, 0),
            (50, 2),
        ]
        .into();
        let before: HashSet<u32> = [1, 2, 10, 40].into();
        let anc = ancestors(&table, 10);
        assert_eq!(anc, [10, 1].into());
        assert_eq!(new_processes(&before, &table, &anc), [30, 31, 32]);
        let names = ["virtiofsd", "conmon", "virtiofsd"].map(String::from);
        assert_eq!(counted_names(names.into_iter()), ["conmon", "virtiofsd ×2"]);
        let nothing_new: HashSet<u32> = table.keys().copied().collect();
        assert!(new_processes(&nothing_new, &table, &anc).is_empty());
    }

    #[test]
    fn deletes_the_container_that_a_conmon_names() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let conmon = args(
            "/usr/bin/conmon --api-version 1 -c abc -u abc -r /x/rvmm-oci -b /b \
             --runtime-arg --root --runtime-arg /run/r --exit-dir /e",
        );
        assert_eq!(
            conmon_delete(&conmon),
            Some(args("/x/rvmm-oci --root /run/r delete --force abc"))
        );
        assert_eq!(conmon_delete(&args("/usr/bin/conmon -r /x/crun")), None);
        assert_eq!(conmon_delete(&args("/x/rvmm-oci keeper -c abc -r x")), None);
    }

    #[test]
    fn finds_the_mounts_left_under_a_directory() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 0:50 / /tmp/b/podman/run/shm rw - tmpfs shm rw\n\
                    41 22 0:51 / /tmp/b/podman\\040x rw - tmpfs x rw\n\
                    42 40 0:52 / /tmp/b/podmanx rw - tmpfs y rw\n\
                    43 22 0:53 / /tmp/b/podman rw - tmpfs z rw\n";
        let got = mounts_under(info, Path::new("/tmp/b/podman"));
        assert_eq!(
            got,
            [
                PathBuf::from("/tmp/b/podman"),
                "/tmp/b/podman/run/shm".into()
            ]
        );
        assert_eq!(unescape("a\\040b\\134"), "a b\\");
    }
}
