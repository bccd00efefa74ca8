//! Runs one measured command: wall time to its first output line and to its exit, CPU time and
//! peak RSS from wait4(2), with Ctrl-C and timeouts killing its whole process group.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::register_signal_handler;

static CANCELLED: AtomicBool = AtomicBool::new(false);
const POLL_MS: i32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("interrupted")]
    Cancelled,
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{what} did not finish within {secs} s")]
    Timeout { what: String, secs: u64 },
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
        }
    }
}

#[derive(Debug, Default)]
pub struct Measured {
    /// Seconds from spawn to the marker line, if it came.
    pub first_line: Option<f64>,
    /// Seconds from spawn to the end of wait4.
    pub wall: f64,
    /// User + system seconds of the command and the children it waited for.
    pub cpu: f64,
    pub max_rss_kib: u64,
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

    /// Blocks in wait4 until the child ends; a Ctrl-C meanwhile kills it.
    fn wait4(&mut self, what: &str) -> Result<(i32, libc::rusage), RunError> {
        let pid = self.pid() as i32;
        loop {
            let mut status = 0;
            // SAFETY: rusage is plain data that wait4 fills in.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child with valid out-pointers.
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if rc == pid {
                self.child = None;
                return Ok((status, usage));
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
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut group = Group::spawn(cmd, watch.what)?;
    let child = group.child.as_mut().expect("just spawned");
    let mut pipes = [
        child.stdout.take().map(Pipe::new),
        child.stderr.take().map(Pipe::new),
    ];
    let mut m = Measured::default();
    // Once we stop the command, its output no longer matters: a process it started outside
    // its group (a container's init) may hold the pipes open until its own cleanup.
    let mut stopped = false;
    while !stopped && pipes.iter().any(Option::is_some) {
        check_cancel()?;
        if start.elapsed() > watch.timeout {
            return Err(RunError::Timeout {
                what: watch.what.to_string(),
                secs: watch.timeout.as_secs(),
            });
        }
        poll_pipes(&mut pipes);
        if m.first_line.is_none() && m.gave_up.is_none() {
            if let Some(out) = &pipes[0] {
                let complete = &out.text[..out.text.rfind('\n').map_or(0, |i| i + 1)];
                m.gave_up = complete
                    .lines()
                    .find(|l| watch.give_up.iter().any(|g| l.contains(g)))
                    .map(|l| l.trim().to_string());
                if m.gave_up.is_some() {
                    stopped = true;
                } else if out.text.lines().any(|l| l.contains(watch.marker)) {
                    m.first_line = Some(start.elapsed().as_secs_f64());
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
    let (status, usage) = group.wait4(watch.what)?;
    m.wall = start.elapsed().as_secs_f64();
    check_cancel()?;
    m.cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
    m.max_rss_kib = u64::try_from(usage.ru_maxrss).unwrap_or(0);
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

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    }
}

pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn seconds(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
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
