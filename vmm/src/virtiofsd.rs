//! `--share`: virtiofsd processes that rvmm starts for its virtio-fs devices, each on a socket
//! in a private directory, killed with rvmm and reaped when the VM ends. A read-only share is
//! enforced on the host: virtiofsd runs in a private mount namespace where the directory is a
//! read-only bind mount, so not even a compromised virtiofsd can write there.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_sys_util::tempdir::TempDir;

use crate::config::{FsConfig, ShareConfig};

/// Where distributions install virtiofsd: the Rust one, then QEMU's C one (Debian 12).
const VIRTIOFSD_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// Names another virtiofsd binary, used instead of those.
const VIRTIOFSD_ENV: &str = "RVMM_VIRTIOFSD";
/// How long virtiofsd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to leave once rvmm has closed its socket.
const EXIT_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("--share needs virtiofsd, found at none of {}", VIRTIOFSD_PATHS.join(", "))]
    NotInstalled,
    #[error("{VIRTIOFSD_ENV}={0}: no such file")]
    NoOverride(String),
    #[error("cannot prepare virtiofsd's run directory (socket and log)")]
    RunDir(#[source] io::Error),
    #[error("cannot start {path}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("virtiofsd for {dir} exited before it listened ({status}): {said}")]
    Exited {
        dir: String,
        status: std::process::ExitStatus,
        /// Its last line on stderr.
        said: String,
    },
    #[error("virtiofsd for {0} did not listen within {START_TIMEOUT:?}")]
    Timeout(String),
}

/// A running virtiofsd; its socket directory lives until [`Virtiofsd::connected`].
pub struct Virtiofsd {
    child: Child,
    socket_dir: Option<TempDir>,
    /// The shared directory, to name it in messages.
    dir: String,
}

impl Virtiofsd {
    /// Starts virtiofsd on `share` and waits until it listens; returns it with the device
    /// configuration that connects to it.
    pub fn start(share: &ShareConfig) -> Result<(Self, FsConfig), VirtiofsdError> {
        let path = binary()?;
        let socket_dir = TempDir::new_with_prefix(std::env::temp_dir().join("rvmm-share-"))
            .map_err(|e| VirtiofsdError::RunDir(io::Error::from_raw_os_error(e.errno())))?;
        let socket = socket_dir.as_path().join("virtiofsd.sock");
        // Its stderr is chatty (every vring start and stop): kept out of rvmm's, read only if
        // it fails to start.
        let log_path = socket_dir.as_path().join("virtiofsd.log");
        let log = std::fs::File::create(&log_path).map_err(VirtiofsdError::RunDir)?;
        let mut cmd = Command::new(&path);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(source_option(&share.dir))
            .args(["-o", "log_level=warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let ro_dir = share.read_only.then(|| c_path(&share.dir)).transpose();
        let ro_dir = ro_dir.map_err(|source| VirtiofsdError::Spawn {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the closure runs in the forked child before exec and makes only raw system
        // calls (prctl, unshare, mount) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || in_child(ro_dir.as_deref()));
        }
        let child = cmd
            .spawn()
            .map_err(|source| VirtiofsdError::Spawn { path, source })?;
        let mut daemon = Virtiofsd {
            child,
            socket_dir: Some(socket_dir),
            dir: share.dir.display().to_string(),
        };
        daemon.wait_listening(&socket, &share.dir, &log_path)?;
        let fs = FsConfig {
            tag: share.tag.clone(),
            socket,
        };
        Ok((daemon, fs))
    }

    fn wait_listening(
        &mut self,
        socket: &Path,
        dir: &Path,
        log: &Path,
    ) -> Result<(), VirtiofsdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let said = text.lines().last().unwrap_or("no message").to_string();
                let dir = dir.display().to_string();
                return Err(VirtiofsdError::Exited { dir, status, said });
            }
            if Instant::now() > deadline {
                return Err(VirtiofsdError::Timeout(dir.display().to_string()));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// How it ended, if it has: "virtiofsd for DIR ended: signal: 9 (SIGKILL)".
    pub fn ended(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        Some(format!("virtiofsd for {} ended: {status}", self.dir))
    }

    /// The device has connected: virtiofsd takes no second connection, so its socket and
    /// directory go now rather than at the end (when seccomp would forbid removing them).
    pub fn connected(&mut self) {
        self.socket_dir = None;
    }
}

impl Drop for Virtiofsd {
    /// virtiofsd leaves by itself once rvmm's end of the socket is closed; one that does not
    /// is killed. Either way it is reaped.
    fn drop(&mut self) {
        // Never connected (the VM failed to build): nothing will make it leave.
        let deadline = if self.socket_dir.is_some() {
            Instant::now()
        } else {
            Instant::now() + EXIT_TIMEOUT
        };
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        if self.socket_dir.is_none() {
            log::warn!(
                "virtiofsd (pid {}) did not exit; killing it",
                self.child.id()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$RVMM_VIRTIOFSD`, or the first of the distributions' paths that exists.
fn binary() -> Result<String, VirtiofsdError> {
    if let Some(path) = std::env::var_os(VIRTIOFSD_ENV) {
        let path = path.to_string_lossy().into_owned();
        return match Path::new(&path).is_file() {
            true => Ok(path),
            false => Err(VirtiofsdError::NoOverride(path)),
        };
    }
    VIRTIOFSD_PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
        .ok_or(VirtiofsdError::NotInstalled)
}

fn source_option(dir: &Path) -> std::ffi::OsString {
    let mut opt = std::ffi::OsString::from("source=");
    opt.push(dir);
    opt
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the forked child: die with rvmm, and for a read-only share make `ro_dir` a read-only bind
/// mount of itself in a mount namespace of its own.
fn in_child(ro_dir: Option<&std::ffi::CStr>) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })?;
    let Some(dir) = ro_dir else {
        return Ok(());
    };
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: unshare takes flags only; each mount gets NUL-terminated paths that outlive the
    // call (or null where mount(2) ignores the argument) and no data.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing done here may leak back into rvmm's namespace.
        let private = libc::MS_REC | libc::MS_PRIVATE;
        check(libc::mount(
            none,
            c"/".as_ptr(),
            none,
            private,
            std::ptr::null(),
        ))?;
        let bind = libc::MS_BIND | libc::MS_REC;
        check(libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            none,
            bind,
            std::ptr::null(),
        ))?;
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        check(libc::mount(none, dir.as_ptr(), none, ro, std::ptr::null()))
    }
}

/// Starts one virtiofsd per share, in order.
pub fn start_all(
    shares: &[ShareConfig],
) -> Result<(Vec<Virtiofsd>, Vec<FsConfig>), VirtiofsdError> {
    let mut daemons = Vec::new();
    let mut devices = Vec::new();
    for share in shares {
        let (daemon, fs) = Virtiofsd::start(share)?;
        daemons.push(daemon);
        devices.push(fs);
    }
    Ok((daemons, devices))
}
