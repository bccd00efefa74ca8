//! The run step: how soon a container's first output comes under `rvmm run` in a fresh VM
//! (booted, and restored from the start-up snapshot), under `rvmm run --vm` in a shared VM that is already up, and under `podman run` with crun;
//! and the shared VM's resident memory before, while and after a container holds 200 MiB
//! (free page reporting gives it back). The image is the runtime step's busybox root, as a
//! rootfs tar for rvmm and imported into the bench's own podman.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::ctx::{progress, Ctx};
use super::procmem;
use super::report::{Better, Figure, Variant};
use super::runner::{run, RunError, Watch};
use super::runtime::{put, Podman};

/// One command, a fresh VM's boot included (seconds on the nested KVM).
const TIMEOUT: Duration = Duration::from_secs(300);
const VM: &str = "rvmm-bench";
const MARKER: &str = "rvmm-bench-ready";
/// How long the shared VM may take to give back what the container freed.
const GIVE_BACK: Duration = Duration::from_secs(10);
const HOLD_MIB: u64 = 200;

pub fn run_step(ctx: &Ctx) -> Result<(Vec<Figure>, Option<String>), RunError> {
    let title = |how| format!("{how}: start to first output of `sh -c 'echo'`");
    let mut fresh = Figure::new(
        "run.fresh",
        &title("rvmm run --no-snapshot, fresh VM booted"),
        "s",
        Better::Lower,
    );
    let mut restored = Figure::new(
        "run.snapshot",
        &title("rvmm run, fresh VM restored from the start-up snapshot"),
        "s",
        Better::Lower,
    );
    let mut shared = Figure::new("run.shared", &title("rvmm run --vm"), "s", Better::Lower);
    let mut pair = mib_figures(&[
        (
            "run.two_restored_pss",
            "PSS of one of two rvmm run VMs up at once, restored",
        ),
        (
            "run.two_restored_rss",
            "RSS of one of two rvmm run VMs up at once, restored",
        ),
        (
            "run.two_booted_pss",
            "PSS of one of two rvmm run VMs up at once, booted",
        ),
        (
            "run.two_booted_rss",
            "RSS of one of two rvmm run VMs up at once, booted",
        ),
    ]);
    let mut rss = mib_figures(&[
        ("run.vm_rss_idle", "shared VM RSS, idle"),
        (
            "run.vm_rss_holding",
            "shared VM RSS, a container holding 200 MiB",
        ),
        (
            "run.vm_rss_freed",
            "shared VM RSS, 10 s after the container freed it",
        ),
    ]);
    let none = "no plain process or QEMU run containers here";
    let starts = [&mut fresh, &mut restored, &mut shared];
    for fig in starts.into_iter().chain(rss.iter_mut()) {
        fig.skipped(Variant::Process, none);
        fig.skipped(Variant::Qemu, none);
    }
    for fig in rss.iter_mut().chain(pair.iter_mut()) {
        fig.skipped(Variant::Container, "a crun container has no VM of its own");
    }
    for fig in pair.iter_mut() {
        fig.skipped(Variant::Process, none);
        fig.skipped(Variant::Qemu, none);
    }
    let podman = podman(ctx);
    let image = podman
        .as_ref()
        .map(|(p, _)| p.image())
        .map_err(Clone::clone);
    progress("run: podman run with crun");
    let crun = podman.as_ref().map_err(Clone::clone).and_then(|(p, crun)| {
        let args = ["run", "--rm", "--network", "none", super::runtime::IMAGE];
        first_output(ctx.runs, || p.command(crun, &args))
    });
    put(&mut fresh, Variant::Container, crun.clone())?;
    put(&mut restored, Variant::Container, crun.clone())?;
    put(&mut shared, Variant::Container, crun)?;
    let rvmm = rvmm_ok(ctx).and(image);
    for (fig, options) in [
        (&mut fresh, &["--no-snapshot"][..]),
        // The unrecorded first run makes the snapshot where there is none yet.
        (&mut restored, &[][..]),
    ] {
        progress(&format!("run: rvmm run {}", options.join(" ")));
        let samples = rvmm.clone().and_then(|image| {
            first_output(ctx.runs, || {
                let mut cmd = Command::new(&ctx.tools.rvmm);
                cmd.args(["run", "--network", "none"])
                    .args(options)
                    .arg(&image)
                    .arg("--");
                cmd
            })
        });
        put(fig, Variant::Rvmm, samples)?;
    }
    for (figs, options) in [(0, &[][..]), (2, &["--no-snapshot"][..])] {
        progress(&format!(
            "run: two rvmm run VMs at once {}",
            options.join(" ")
        ));
        let mem = rvmm
            .clone()
            .and_then(|image| two_at_once(&ctx.tools.rvmm, &image, options));
        for (i, fig) in pair[figs..figs + 2].iter_mut().enumerate() {
            put(
                fig,
                Variant::Rvmm,
                mem.as_ref().map(|m| vec![m[i]]).map_err(Clone::clone),
            )?;
        }
    }
    progress("run: rvmm run --vm in a shared VM");
    let vm = rvmm.and_then(|image| SharedVm::start(ctx, image));
    let samples = vm
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|vm| first_output(ctx.runs, || vm.command(&["run", "--vm", VM])));
    put(&mut shared, Variant::Rvmm, samples)?;
    progress("run: the shared VM's memory around a container holding 200 MiB");
    let held = vm.as_ref().map_err(Clone::clone).and_then(SharedVm::hold);
    for (i, fig) in rss.iter_mut().enumerate() {
        let samples = held.as_ref().map(|r| vec![r[i]]).map_err(Clone::clone);
        put(fig, Variant::Rvmm, samples)?;
    }
    let mut figures = vec![fresh, restored, shared];
    figures.extend(pair);
    figures.extend(rss);
    Ok((figures, Some(NOTE.into())))
}

const NOTE: &str = "run: a busybox root (a rootfs tar for rvmm, imported into the bench's \
    own podman with vfs storage), `--network none` everywhere; start to the first line of \
    `sh -c 'echo'` on stdout, after one unrecorded run (which, for `rvmm run` from a \
    snapshot, makes the snapshot if the cache has none). The shared VM: `rvmm vm start \
    --network none --memory 1024`, up before its runs. Its RSS is the VM process's VmRSS; the \
    container writes 200 MiB to its root (tmpfs in the guest), then deletes it. Two VMs at \
    once: two `rvmm run -i` whose containers wait on stdin, each run's process tree (rvmm run \
    and its VM) measured from /proc/PID/smaps_rollup once both said they were ready; the mean \
    of the two.";

/// One memory figure (MiB, lower is better) per (id, title).
fn mib_figures(titles: &[(&str, &str)]) -> Vec<Figure> {
    titles
        .iter()
        .map(|(id, t)| Figure::new(id, t, "MiB", Better::Lower))
        .collect()
}

fn rvmm_ok(ctx: &Ctx) -> Result<(), String> {
    ctx.kvm.clone()?;
    if ctx.emulated {
        return Err("guest user space cannot run on this emulating KVM (kvm_pvm)".into());
    }
    Ok(())
}

/// The bench's podman with crun, whose image tar rvmm runs too.
fn podman(ctx: &Ctx) -> Result<(Podman, PathBuf), String> {
    let crun = ctx.tools.crun.clone().ok_or("crun is not installed")?;
    let podman = Podman::create(&ctx.work.join("run-step"), vec![crun.clone()])?;
    Ok((podman, crun))
}

/// Seconds to the marker line of `runs` runs of the command `make` returns with
/// `-- sh -c 'echo MARKER'` added, after one unrecorded run.
fn first_output(runs: u32, make: impl Fn() -> Command) -> Result<Vec<f64>, String> {
    let mut samples = Vec::new();
    for i in 0..=runs {
        let mut cmd = make();
        cmd.args(["sh", "-c", &format!("echo {MARKER}")]);
        let m = run(&mut cmd, Watch::new("run", TIMEOUT, MARKER)).map_err(|e| e.to_string())?;
        let secs = m.first_line.ok_or("the command printed nothing")?;
        if i > 0 {
            samples.push(secs);
        }
    }
    Ok(samples)
}

/// The bench's shared VM, with its state under the work directory; stopped when dropped.
struct SharedVm {
    rvmm: PathBuf,
    state: PathBuf,
    image: PathBuf,
}

impl SharedVm {
    fn start(ctx: &Ctx, image: PathBuf) -> Result<SharedVm, String> {
        let vm = SharedVm {
            rvmm: ctx.tools.rvmm.clone(),
            state: ctx.work.join("run-state"),
            image,
        };
        let args = [
            "vm",
            "start",
            "--name",
            VM,
            "--network",
            "none",
            "--memory",
            "1024",
        ];
        let mut cmd = vm.rvmm_command(&args);
        run(&mut cmd, Watch::new("rvmm vm start", TIMEOUT, "")).map_err(|e| e.to_string())?;
        Ok(vm)
    }

    fn rvmm_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.rvmm);
        cmd.env("XDG_RUNTIME_DIR", &self.state).args(args);
        cmd
    }

    /// `rvmm ARGS… IMAGE --` for the shared VM.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.rvmm_command(args);
        cmd.arg(&self.image).arg("--");
        cmd
    }

    fn rss_mib(&self) -> Result<f64, String> {
        let mut cmd = self.rvmm_command(&["vm", "status", VM]);
        let out =
            run(&mut cmd, Watch::new("rvmm vm status", TIMEOUT, "")).map_err(|e| e.to_string())?;
        rss_of(&out.stdout).ok_or_else(|| format!("no rss in {:?}", out.stdout))
    }

    /// RSS idle, while a container holds [`HOLD_MIB`], and the lowest within [`GIVE_BACK`]
    /// of its free.
    fn hold(&self) -> Result<[f64; 3], String> {
        let idle = self.rss_mib()?;
        let script = format!(
            "busybox head -c {} /dev/zero >/big; echo filled; read x; busybox rm /big; echo freed",
            HOLD_MIB << 20
        );
        let mut cmd = self.command(&["run", "--vm", VM, "-i"]);
        let (mut child, rx) = spawn_piped(cmd.args(["sh", "-c", &script]))?;
        let expect = |want: &str| match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(line)) if line == want => {
                progress(&format!("run: the container says {want}"));
                Ok(())
            }
            other => Err(format!("the container said {other:?}, not {want:?}")),
        };
        let held = expect("filled").and_then(|()| self.rss_mib());
        let freed = held.and_then(|held| {
            let mut stdin = child.0.stdin.take().ok_or("no stdin")?;
            stdin.write_all(b"go\n").map_err(|e| e.to_string())?;
            expect("freed")?;
            let freed_at = Instant::now();
            let mut lowest = self.rss_mib()?;
            while freed_at.elapsed() < GIVE_BACK {
                std::thread::sleep(Duration::from_millis(500));
                lowest = lowest.min(self.rss_mib()?);
            }
            Ok([idle, held, lowest])
        });
        drop(child);
        freed
    }
}

/// Spawns `cmd` with its stdin and stdout piped. Its stdout lines come through a channel, so
/// that a process that never says what is waited for is a skip reason after [`TIMEOUT`], not
/// a bench that waits forever.
fn spawn_piped(cmd: &mut Command) -> Result<(Killed, Receiver<std::io::Result<String>>), String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("rvmm run: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    Ok((Killed(child), lines(stdout)))
}

fn lines(stdout: ChildStdout) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A child process killed and reaped however the measurement ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Memory of two `rvmm run` VMs up at once (`options` added), each with a container that
/// waits: the mean over the two of (PSS, RSS) in MiB of one run's process tree, rvmm run and
/// its VM. VMs restored from one snapshot share its clean pages through the page cache.
fn two_at_once(rvmm: &Path, image: &Path, options: &[&str]) -> Result<[f64; 2], String> {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut cmd = Command::new(rvmm);
        cmd.args(["run", "--network", "none", "-i"])
            .args(options)
            .arg(image)
            .args(["--", "sh", "-c", "echo ready; read x"]);
        runs.push(spawn_piped(&mut cmd)?);
    }
    for (_, rx) in &runs {
        match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(line)) if line == "ready" => {}
            other => return Err(format!("the container said {other:?}, not \"ready\"")),
        }
    }
    let samples: Vec<_> = runs
        .iter()
        .map(|(c, _)| procmem::tree(c.0.id(), 0))
        .collect();
    let mean = |kib: u64| kib as f64 / 1024.0 / samples.len() as f64;
    Ok([
        mean(samples.iter().map(|s| s.pss_kib).sum()),
        mean(samples.iter().map(|s| s.rss_kib).sum()),
    ])
}

impl Drop for SharedVm {
    fn drop(&mut self) {
        let mut cmd = self.rvmm_command(&["vm", "stop", VM]);
        let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The `rss: N MiB` line of `rvmm vm status`.
fn rss_of(status: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("rss: "))
        .and_then(|v| v.trim_end_matches(" MiB").parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rss_line() {
        assert_eq!(
            rss_of("name: x\nstatus: running\nrss: 312 MiB\n"),
            Some(312.0)
        );
        assert_eq!(rss_of("name: x\nstatus: stopped\n"), None);
    }
}
