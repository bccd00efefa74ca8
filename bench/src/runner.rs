//! Runs one measured command: wall time to its first output line and to its exit, and (through
//! the launcher) its CPU time and peak RSS, with Ctrl-C and timeouts killing its whole process
//! group.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::register_signal_handler;

static CANCELLED: AtomicBool = AtomicBool::new(false);
static NEXT_REPORT: AtomicU32 = AtomicU32::new(0);
const POLL_MS: i32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("interrupted")]
    Cancelled,
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{what} did not finish within {secs} s (its last output line: {last:?})")]
    Timeout {
        what: String,
        secs: u64,
        last: String,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("waiting for {0}")]
    Wait(String, #[source] std::io::Error),
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] vmm_sys_util::errno::Error),
    #[error("the launcher of {0} reported nothing readable")]
    Launcher(String),
}

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag (without SA_RESTART, so blocking calls return EINTR); the
/// running step then kills its children and every guard undoes what it set up.
pub fn install_cancel_handlers() -> Result<(), RunError> {
    for signo in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(signo, on_stop_signal).map_err(RunError::Signals)?;
    }
    Ok(())
}

pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

pub fn check_cancel() -> Result<(), RunError> {
    if cancelled() {
        return Err(RunError::Cancelled);
    }
    Ok(())
}

/// What to watch for while a command runs.
pub struct Watch<'a> {
    pub what: &'a str,
    pub timeout: Duration,
    /// The first stdout line containing this marks "first output".
    pub marker: &'a str,
    /// Called once with the pid when the marker appears; returning true stops the command.
    pub on_marker: Option<&'a mut dyn FnMut(u32) -> bool>,
    /// A non-zero exit is an error unless this is set.
    pub any_status: bool,
    /// A stdout line containing one of these before the marker means the marker will never
    /// come: the command is stopped at once and the line kept in [`Measured::gave_up`].
    pub give_up: &'a [&'a str],
    /// Start the command through this launcher (resources/bench/launch.c) to learn its CPU
    /// time and its own peak RSS ([`Measured::usage`]); times then count from its fork.
    pub launcher: Option<&'a Path>,
}

impl<'a> Watch<'a> {
    pub fn new(what: &'a str, timeout: Duration, marker: &'a str) -> Self {
        Watch {
            what,
            timeout,
            marker,
            on_marker: None,
            any_status: false,
            give_up: &[],
            launcher: None,
        }
    }
}

/// What the launcher saw of the command it ran.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User + system seconds of the command and the children it waited for.
    pub cpu: f64,
    /// Peak RSS of the command (or of a child it waited for), not inherited from the bench.
    pub max_rss_kib: u64,
}

#[derive(Debug, Default)]
pub struct Measured {
    /// Seconds from spawn (the launcher's fork) to the marker line, if it came.
    pub first_line: Option<f64>,
    /// Seconds from spawn (the launcher's fork) to the end of wait4.
    pub wall: f64,
    /// Present when the command ran through the launcher to its end.
    pub usage: Option<Usage>,
    /// The `give_up` line that made the runner stop the command.
    pub gave_up: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

/// A child in its own process group: dropping it kills the group and reaps the child.
pub struct Group {
    child: Option<Child>,
}

impl Group {
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Group, RunError> {
        check_cancel()?;
        let child = cmd
            .process_group(0)
            .spawn()
            .map_err(|e| RunError::Spawn(what.to_string(), e))?;
        Ok(Group { child: Some(child) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn kill(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) of the process group this struct created and has not reaped.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        }
    }

    /// Blocks until the child ends and returns its wait status; a Ctrl-C meanwhile kills it.
    fn wait(&mut self, what: &str) -> Result<i32, RunError> {
        let pid = self.pid() as i32;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid out-pointer.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid {
                self.child = None;
                return Ok(status);
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(RunError::Wait(what.to_string(), err));
            }
            if cancelled() {
                self.kill();
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `kill`: our own unreaped child's process group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to its end (or until `on_marker` stops it) and measures it.
pub fn run(cmd: &mut Command, mut watch: Watch) -> Result<Measured, RunError> {
    let mut launched = watch.launcher.map(|l| Launched::new(l, cmd));
    let cmd = launched.as_mut().map_or(cmd, |l| &mut l.cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let spawn_ns = monotonic_ns();
    let mut group = Group::spawn(cmd, watch.what)?;
    let child = group.child.as_mut().expect("just spawned");
    let mut pipes = [
        child.stdout.take().map(Pipe::new),
        child.stderr.take().map(Pipe::new),
    ];
    let mut m = Measured::default();
    let mut marker_ns = None;
    // Once we stop the command, its output no longer matters: a process it started outside
    // its group (a container's init) may hold the pipes open until its own cleanup.
    let mut stopped = false;
    while !stopped && pipes.iter().any(Option::is_some) {
        check_cancel()?;
        if start.elapsed() > watch.timeout {
            let out = pipes[0].as_ref().map_or("", |p| p.text.as_str());
            return Err(RunError::Timeout {
                what: watch.what.to_string(),
                secs: watch.timeout.as_secs(),
                last: last_line(out).to_string(),
            });
        }
        poll_pipes(&mut pipes);
        if marker_ns.is_none() && m.gave_up.is_none() {
            if let Some(out) = &pipes[0] {
                let complete = &out.text[..out.text.rfind('\n').map_or(0, |i| i + 1)];
                m.gave_up = complete
                    .lines()
                    .find(|l| watch.give_up.iter().any(|g| l.contains(g)))
                    .map(|l| l.trim().to_string());
                if m.gave_up.is_some() {
                    stopped = true;
                } else if out.text.lines().any(|l| l.contains(watch.marker)) {
                    marker_ns = Some(monotonic_ns());
                    if let Some(hook) = watch.on_marker.as_mut() {
                        stopped = hook(group.pid());
                    }
                }
                if stopped {
                    group.kill();
                }
            }
        }
        for (slot, text) in pipes.iter_mut().zip([&mut m.stdout, &mut m.stderr]) {
            if stopped || slot.as_ref().is_some_and(|p| p.eof) {
                *text = slot.take().map(|p| p.text).unwrap_or_default();
            }
        }
    }
    let status = group.wait(watch.what)?;
    let end_ns = monotonic_ns();
    check_cancel()?;
    let times = Times {
        spawn_ns,
        marker_ns,
        end_ns,
    };
    finish(m, status, times, launched.as_ref(), &watch)
}

/// CLOCK_MONOTONIC readings of one run, in nanoseconds: the launcher reports on this clock.
struct Times {
    spawn_ns: u64,
    marker_ns: Option<u64>,
    end_ns: u64,
}

/// Takes the times, usage and status from the launcher's report when it wrote one, and
/// turns an unexpected end into an error.
fn finish(
    mut m: Measured,
    mut status: i32,
    t: Times,
    launched: Option<&Launched>,
    watch: &Watch,
) -> Result<Measured, RunError> {
    let mut from = t.spawn_ns;
    let mut end = t.end_ns;
    let exited = libc::WIFEXITED(status);
    if let Some(l) = launched.filter(|_| exited) {
        let r = std::fs::read_to_string(&l.report)
            .ok()
            .and_then(|text| LaunchReport::parse(&text))
            .ok_or_else(|| RunError::Launcher(watch.what.to_string()))?;
        (from, end, status) = (r.fork_ns, r.reap_ns, r.status);
        m.usage = Some(r.usage);
    }
    let secs = |ns: u64| ns.saturating_sub(from) as f64 / 1e9;
    m.wall = secs(end);
    // The line is timed when the bench reads it, which can be after a quick command's end
    // (as the launcher timed it); it was written before that end.
    m.first_line = t.marker_ns.map(|ns| secs(ns).min(m.wall));
    let killed = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let stopped_by_us = killed && (m.first_line.is_some() || m.gave_up.is_some());
    if !(ok || watch.any_status || stopped_by_us) {
        return Err(RunError::Failed {
            what: watch.what.to_string(),
            status: describe_status(status),
            stderr: last_line(&m.stderr).to_string(),
        });
    }
    Ok(m)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills in the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A command rewritten to run under the launcher, and the file the launcher reports to
/// (removed on drop).
struct Launched {
    cmd: Command,
    report: PathBuf,
}

impl Launched {
    /// `launcher REPORT PROGRAM ARGS...` with the environment and directory of `cmd`;
    /// PROGRAM must be a path (the launcher does no PATH search).
    fn new(launcher: &Path, cmd: &Command) -> Launched {
        let n = NEXT_REPORT.fetch_add(1, Ordering::SeqCst);
        let report = launcher.with_file_name(format!("launch-{n}.report"));
        let mut wrapped = Command::new(launcher);
        wrapped
            .arg(&report)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        Launched {
            cmd: wrapped,
            report,
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.report);
    }
}

/// The launcher's line: `status=S maxrss_kib=K utime_us=U stime_us=T fork_ns=F reap_ns=R`.
#[derive(Debug, PartialEq)]
struct LaunchReport {
    status: i32,
    usage: Usage,
    fork_ns: u64,
    reap_ns: u64,
}

impl LaunchReport {
    fn parse(text: &str) -> Option<LaunchReport> {
        let get = |key: &str| -> Option<u64> {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        let cpu_us = get("utime_us")? + get("stime_us")?;
        Some(LaunchReport {
            status: i32::try_from(get("status")?).ok()?,
            usage: Usage {
                cpu: cpu_us as f64 / 1e6,
                max_rss_kib: get("maxrss_kib")?,
            },
            fork_ns: get("fork_ns")?,
            reap_ns: get("reap_ns")?,
        })
    }
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    }
}

/// `KEY<number>` anywhere in `text`, e.g. field(out, "mflops=").
pub fn field(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// One output pipe of the child and what has been read from it.
struct Pipe {
    file: File,
    text: String,
    eof: bool,
}

impl Pipe {
    fn new(fd: impl Into<OwnedFd>) -> Self {
        Pipe {
            file: File::from(fd.into()),
            text: String::new(),
            eof: false,
        }
    }

    fn read_some(&mut self) {
        let mut buf = [0u8; 16384];
        match self.file.read(&mut buf) {
            Ok(0) | Err(_) => self.eof = true,
            Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

/// Waits up to POLL_MS for output on the open pipes and reads what is there.
fn poll_pipes(pipes: &mut [Option<Pipe>; 2]) {
    let mut fds: Vec<libc::pollfd> = pipes
        .iter()
        .flatten()
        .map(|p| libc::pollfd {
            fd: p.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
    if n <= 0 {
        return;
    }
    let mut ready = fds.iter().map(|f| f.revents != 0);
    for pipe in pipes.iter_mut().flatten() {
        if ready.next() == Some(true) {
            pipe.read_some();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procmem::own_peak_kib;
    use crate::tools::build_launcher;

    #[test]
    fn parses_the_launcher_report() {
        let line = "status=256 maxrss_kib=652 utime_us=426 stime_us=74 fork_ns=1000 reap_ns=9000\n";
        let want = LaunchReport {
            status: 256,
            usage: Usage {
                cpu: 500e-6,
                max_rss_kib: 652,
            },
            fork_ns: 1000,
            reap_ns: 9000,
        };
        assert_eq!(LaunchReport::parse(line), Some(want));
        assert_eq!(LaunchReport::parse("status=0 maxrss_kib=1"), None);
    }

    /// Through the launcher a command's peak RSS is its own, far below this test process's
    /// (raised to 64 MiB here), which a child started directly would inherit.
    #[test]
    fn the_launcher_reports_the_commands_own_peak_rss() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/rvmm-launch-").unwrap();
        let launcher = build_launcher(dir.as_path()).unwrap();
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        let own = own_peak_kib();
        assert!(own >= 64 << 10, "VmHWM {own} KiB");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo ready; exit 3"]);
        let mut watch = Watch::new("sh", Duration::from_secs(30), "ready");
        watch.launcher = Some(&launcher);
        watch.any_status = true;
        let m = run(&mut cmd, watch).unwrap();
        let usage = m.usage.expect("the launcher reported");
        assert!(
            usage.max_rss_kib > 0 && usage.max_rss_kib < own / 8,
            "sh peak {} KiB, ours {own} KiB",
            usage.max_rss_kib
        );
        assert!(
            m.first_line.is_some_and(|f| f > 0.0 && f <= m.wall),
            "{m:?}"
        );
        drop(big);
        // The command's own exit status, not the launcher's, decides success.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 3"]);
        let mut watch = Watch::new("sh", Duration::from_secs(30), "ready");
        watch.launcher = Some(&launcher);
        let err = run(&mut cmd, watch).unwrap_err().to_string();
        assert!(err.contains("exit status 3"), "{err}");
    }

    #[test]
    fn a_give_up_line_stops_the_command_at_once() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo booting; echo 'Kernel panic - not syncing: x'; exec sleep 60",
        ]);
        let mut watch = Watch::new("sh", Duration::from_secs(30), "ready");
        watch.give_up = &["Kernel panic"];
        let m = run(&mut cmd, watch).unwrap();
        assert_eq!(m.gave_up.as_deref(), Some("Kernel panic - not syncing: x"));
        assert_eq!(m.first_line, None);
        assert!(m.wall < 20.0, "waited {} s", m.wall);
    }
}
