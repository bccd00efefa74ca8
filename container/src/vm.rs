//! The container-host VM: rvmm itself, started as a child process with the container guest
//! (built by resources/build-container-guest.sh), the image disk and a vsock device whose
//! host side lives in a private temporary directory. The console goes to a log file.
//!
//! A child process rather than a VMM thread: the VM can always be stopped (killed) however
//! it misbehaves, it dies with rvmm (PR_SET_PDEATHSIG), its own process group keeps the
//! terminal's Ctrl-C for the container, and its console output never reaches our stdout.
//!
//! The VM runs jailed (`rvmm --jail`): its run directory, where its sockets are, is all it
//! still reaches by path, so that directory and the agent's listener belong to the jail's
//! user. It is the first process of a PID namespace of its own where that can be made (as
//! root), so that virtiofsd and passt, started by it, end with it whatever happens.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvmm_agent::protocol::AGENT_PORT;
use rvmm_firmware::cmdline::{KernelCmdline, KernelConsole, RootAccess};
use vmm_sys_util::tempdir::TempDir;

use super::session::{Session, SessionError};

/// The guest's CID; any valid one works, the VM is alone on its vsock device.
const GUEST_CID: u64 = 3;
const EXIT_POLL: Duration = Duration::from_millis(20);
const VSOCK: &str = "vsock";
/// rvmm's API socket in the run directory.
const API: &str = "api.sock";
/// How long an API request may take: a snapshot writes all of guest memory.
const API_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "the container guest is not built: {0} is missing (run resources/build-container-guest.sh)"
    )]
    NoGuest(PathBuf),
    #[error("cannot set up the VM's sockets")]
    RunDir(#[source] io::Error),
    #[error("cannot start the VM")]
    Spawn(#[source] io::Error),
    #[error("cannot open the network namespace")]
    Netns(#[source] io::Error),
    #[error("{err}{tail}")]
    Agent { err: SessionError, tail: String },
    #[error("the VM's API socket")]
    Api(#[source] io::Error),
    #[error("the VM refused {request}: {why}")]
    Refused { request: String, why: String },
}

/// The container guest's kernel and root disk.
#[derive(Clone, Debug)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

impl GuestFiles {
    /// `dir`, or `<cache>/rvmm/container-guest`.
    pub fn find(dir: Option<&Path>) -> Result<GuestFiles, VmError> {
        let dir = dir.map_or_else(
            || crate::cache::cache_base().join("container-guest"),
            Path::to_path_buf,
        );
        let files = GuestFiles {
            kernel: dir.join("vmlinux"),
            rootfs: dir.join("rootfs.ext4"),
        };
        for f in [&files.kernel, &files.rootfs] {
            if !f.is_file() {
                return Err(VmError::NoGuest(f.clone()));
            }
        }
        Ok(files)
    }
}

/// What to start.
#[derive(Clone, Copy)]
pub struct VmLaunch<'a> {
    /// The rvmm binary that runs the VM.
    pub vmm: &'a Path,
    pub guest: &'a GuestFiles,
    /// The image as a read-only ext4 disk; rvmm-oci's VMs get their root as a share instead.
    pub image_disk: Option<&'a Path>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub nets: &'a [String],
    /// rvmm `--publish` options: host ports forwarded to the guest on a `user` net.
    pub publish: &'a [String],
    /// rvmm `--share` options: host directories the guest mounts over virtio-fs.
    pub shares: &'a [String],
    /// A network namespace to run the VM in, where its `nets` TAPs are.
    pub netns: Option<&'a Path>,
    /// Where the guest console goes; a file in the private run directory when None.
    pub console_log: Option<&'a Path>,
    /// Where the private run directory is made; None: /tmp.
    pub run_dir_in: Option<&'a Path>,
    /// A virtio-balloon with free page reporting: freed guest memory returns to the host.
    pub balloon: bool,
    /// Where the balloon writes the guest's memory statistics.
    pub balloon_stats: Option<&'a Path>,
}

/// A running container-host VM. Dropping it kills the VM and removes its sockets.
pub struct VmProcess {
    child: Child,
    listener: UnixListener,
    log: PathBuf,
    // Holds the vsock sockets (and the default console log) until the VM is gone.
    _run_dir: TempDir,
}

/// How a VM process starts: a boot, or a restore of a snapshot of the container guest.
#[derive(Clone, Copy, Debug)]
pub enum Origin<'a> {
    Boot,
    /// The snapshot's directory; the launch's image disk fills its image slot.
    Restore(&'a Path),
}

impl VmProcess {
    /// Boots the container guest.
    pub fn start(l: &VmLaunch) -> Result<VmProcess, VmError> {
        Self::launch(l, Origin::Boot)
    }

    /// Starts the VM from `origin`, in a private run directory that holds its sockets.
    pub fn launch(l: &VmLaunch, origin: Origin) -> Result<VmProcess, VmError> {
        let run_dir = match l.run_dir_in {
            Some(parent) => TempDir::new_in(parent),
            None => TempDir::new_with_prefix("/tmp/rvmm-run-"),
        }
        .map_err(|e| VmError::RunDir(io::Error::from_raw_os_error(e.errno())))?;
        let uds = run_dir.as_path().join(VSOCK);
        let agent_socket = format!("{}_{AGENT_PORT}", uds.display());
        let listener = UnixListener::bind(&agent_socket).map_err(VmError::RunDir)?;
        give_to_jail(&[run_dir.as_path(), Path::new(&agent_socket)])?;
        let log = l
            .console_log
            .map_or_else(|| run_dir.as_path().join("console.log"), Path::to_path_buf);
        let console = File::create(&log).map_err(VmError::RunDir)?;
        let console_err = console.try_clone().map_err(VmError::RunDir)?;
        let mut cmd = Command::new(l.vmm);
        match origin {
            Origin::Boot => boot_args(&mut cmd, l, run_dir.as_path()),
            Origin::Restore(snapshot) => restore_args(&mut cmd, l, snapshot, run_dir.as_path()),
        }
        cmd.stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .process_group(0);
        // Held open until the child has joined it.
        let netns = l
            .netns
            .map(File::open)
            .transpose()
            .map_err(VmError::Netns)?;
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure only calls prctl and setns, which are async-signal-safe, on a
        // descriptor that stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = spawn_in_pid_namespace(&mut cmd).map_err(VmError::Spawn)?;
        Ok(VmProcess {
            child,
            listener,
            log,
            _run_dir: run_dir,
        })
    }

    /// The private directory of the VM's sockets, removed when this is dropped.
    pub fn run_dir(&self) -> &Path {
        self._run_dir.as_path()
    }

    /// The VM's vsock socket, where host programs open sessions with its agent.
    pub fn vsock(&self) -> PathBuf {
        self.run_dir().join(VSOCK)
    }

    /// The VM's rvmm process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the VM process ended, if it has.
    pub fn ended(&mut self) -> Option<String> {
        child_ended(&mut self.child)
    }

    /// Waits for the guest's agent to connect and greet, for at most `timeout`.
    pub fn connect(&mut self, timeout: Duration) -> Result<Session, VmError> {
        let child = &mut self.child;
        let session = Session::accept(&self.listener, timeout, || child_ended(child));
        session.map_err(|err| VmError::Agent {
            err,
            tail: console_tail(&self.log),
        })
    }

    /// A request to the VM's API socket; its reply when it says `ok`. A VM that ended
    /// meanwhile says why.
    pub fn api(&mut self, body: &serde_json::Value) -> Result<serde_json::Value, VmError> {
        api_call(self.run_dir(), body).map_err(|e| match self.ended() {
            Some(why) => VmError::Agent {
                err: SessionError::VmEnded(why),
                tail: console_tail(&self.log),
            },
            None => e,
        })
    }

    /// Gives the guest `grace` to power off by itself, then stops it.
    pub fn finish(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(EXIT_POLL);
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `rvmm` options that boot the container guest.
fn boot_args(cmd: &mut Command, l: &VmLaunch, run_dir: &Path) {
    let mut cmdline = KernelCmdline::with_defaults(Some(KernelConsole::Serial));
    cmdline
        .root_vda(RootAccess::ReadOnly)
        .push("rootfstype=ext4");
    cmd.arg("--kernel")
        .arg(&l.guest.kernel)
        .arg("--cmdline")
        .arg(cmdline.as_str())
        .arg("--disk")
        .arg(format!("{},ro", l.guest.rootfs.display()))
        .arg("--vsock")
        .arg(format!(
            "cid={GUEST_CID},uds={}",
            run_dir.join(VSOCK).display()
        ))
        .args(["--cpus", &l.cpus.to_string()])
        .args(["--memory", &l.memory_mib.to_string()])
        .arg("--api-socket")
        .arg(run_dir.join(API))
        .arg("--jail")
        .arg("--rng");
    if let Some(disk) = l.image_disk {
        cmd.arg("--disk")
            .arg(format!("{},ro,serial=rvmm-image", disk.display()));
    }
    for net in l.nets {
        cmd.arg("--net").arg(net);
    }
    for publish in l.publish {
        cmd.arg("--publish").arg(publish);
    }
    for share in l.shares {
        cmd.arg("--share").arg(share);
    }
    if l.balloon {
        cmd.arg("--balloon");
    }
    if let Some(stats) = l.balloon_stats {
        cmd.arg("--balloon-stats").arg(stats);
    }
}

/// `rvmm restore` options: the snapshot of a booted container guest, with this run's sockets
/// and the image disk in the snapshot's image slot (its second disk).
fn restore_args(cmd: &mut Command, l: &VmLaunch, snapshot: &Path, run_dir: &Path) {
    cmd.arg("restore")
        .arg(snapshot)
        .arg("--api-socket")
        .arg(run_dir.join(API))
        .arg("--vsock-uds")
        .arg(run_dir.join(VSOCK));
    if let Some(disk) = l.image_disk {
        cmd.arg("--disk").arg(format!("1={}", disk.display()));
    }
}

/// Started as root, the VM becomes the jail's user: what it must still write (its sockets'
/// directory, the agent's socket it connects to) becomes that user's.
fn give_to_jail(paths: &[&Path]) -> Result<(), VmError> {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let user = rvmm_vmm::jail::DEFAULT_USER;
    for path in paths {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).map_err(VmError::RunDir)?;
    }
    Ok(())
}

/// Spawns `cmd` as the first process of a new PID namespace where this process may make one
/// (as root), else as a plain child. The namespace applies to this thread's later children,
/// so the thread goes back to its own at once. (Not from a thread of its own: the VM's
/// PR_SET_PDEATHSIG would fire when that thread ended.)
fn spawn_in_pid_namespace(cmd: &mut Command) -> io::Result<Child> {
    let Ok(own) = File::open("/proc/thread-self/ns/pid") else {
        return cmd.spawn();
    };
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        log::debug!(
            "no PID namespace for the VM: {}",
            io::Error::last_os_error()
        );
        return cmd.spawn();
    }
    let child = cmd.spawn();
    // SAFETY: setns on a namespace descriptor that is open for the call.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        log::warn!(
            "cannot return to this process's PID namespace: {}",
            io::Error::last_os_error()
        );
    }
    child
}

fn child_ended(child: &mut Child) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// The console log's last line, to say where the guest got to.
fn console_tail(log: &Path) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    match text.lines().rfind(|l| !l.trim().is_empty()) {
        Some(line) => format!(" (last console line: {:?})", line.trim()),
        None => String::new(),
    }
}

/// Sends `{"request":REQUEST}` to the API socket of the VM whose run directory is `run_dir`
/// (`rvmm --api-socket`) and waits for its reply; the reply when it says `ok`.
pub fn api_request(run_dir: &Path, request: &str) -> Result<serde_json::Value, VmError> {
    api_call(run_dir, &serde_json::json!({ "request": request }))
}

fn api_call(run_dir: &Path, body: &serde_json::Value) -> Result<serde_json::Value, VmError> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(run_dir.join(API)).map_err(VmError::Api)?;
    stream
        .set_read_timeout(Some(API_TIMEOUT))
        .map_err(VmError::Api)?;
    writeln!(stream, "{body}").map_err(VmError::Api)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(VmError::Api)?;
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    if reply["ok"] == true {
        return Ok(reply);
    }
    let why = reply["error"].as_str().unwrap_or("no reply").to_string();
    Err(VmError::Refused {
        request: body["request"].as_str().unwrap_or("?").into(),
        why,
    })
}
