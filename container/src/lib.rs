//! `rvmm run`: a container image run inside a fresh microVM. The image becomes a read-only
//! ext4 disk (cached by digest); the VM boots the container guest, whose init (rvmm-agent)
//! runs the command with crun and relays it over vsock.

pub mod cache;
pub mod image;
pub mod request;
pub mod session;
pub mod vm;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use image::disk::{DiskCache, DiskError};
use image::{Image, ImageError};
use request::{run_request, Overrides, RequestError};
use rvmm_agent::protocol::Message;
use session::{exit_code, RunIo, SessionError};
use vm::{GuestFiles, VmError, VmLaunch, VmProcess};

/// How long the guest may take to power off after the command ended.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot forward signals")]
    Signals(#[source] io::Error),
}

/// What `rvmm run` runs, and in what VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    pub cpus: u8,
    pub memory_mib: u64,
    /// `KEY=VAL` each, set in the container.
    pub env: Vec<String>,
    /// The working directory inside the container.
    pub workdir: Option<String>,
    /// Send stdin to the command.
    pub interactive: bool,
    /// virtio-net interfaces (`tap=NAME[,mac=MAC]` each); with any, the container shares the
    /// VM's network instead of getting an empty namespace.
    pub nets: Vec<String>,
    /// How long to wait for the guest's agent.
    pub agent_timeout: Duration,
    /// The container guest's directory; None: the cache's container-guest.
    pub guest: Option<PathBuf>,
    /// Where the guest console output is kept.
    pub console_log: Option<PathBuf>,
    /// An OCI layout directory or tar, a docker save tar, or a rootfs tar.
    pub image: PathBuf,
    /// The command and its arguments; empty: the image's Entrypoint and Cmd.
    pub command: Vec<String>,
}

/// Runs the command to its end; its exit status.
pub fn run(args: &RunOptions) -> Result<u8, RunError> {
    let cache = DiskCache::user_default();
    let image = Image::open(&args.image, &cache.scratch())?;
    let request = run_request(
        &image.settings,
        &Overrides {
            command: &args.command,
            env: &args.env,
            workdir: args.workdir.as_deref(),
            stdin: args.interactive,
            host_network: !args.nets.is_empty(),
        },
    )?;
    let guest = GuestFiles::find(args.guest.as_deref())?;
    let disk = cache.disk_for(&image)?;
    drop(image);

    let vmm = std::env::current_exe().map_err(|e| RunError::Vm(VmError::Spawn(e)))?;
    let mut vm = VmProcess::start(&VmLaunch {
        vmm: &vmm,
        guest: &guest,
        image_disk: &disk,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        nets: &args.nets,
        console_log: args.console_log.as_deref(),
    })?;
    let mut session = vm.connect(args.agent_timeout)?;
    forward_signals(session.sender())?;
    let status = session.run(
        &request,
        RunIo {
            stdin: args
                .interactive
                .then(|| Box::new(io::stdin()) as Box<dyn io::Read + Send>),
            stdout: &mut io::stdout(),
            stderr: &mut io::stderr(),
        },
    )?;
    if session.shutdown().is_ok() {
        vm.finish(POWER_OFF_GRACE);
    }
    Ok(exit_code(status))
}

/// Ctrl-C and friends go to the container, as they would to a local process; the VM itself
/// is in its own process group and does not see them.
fn forward_signals(sender: session::AgentSender) -> Result<(), RunError> {
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]).map_err(RunError::Signals)?;
    std::thread::spawn(move || {
        for signo in signals.forever() {
            if sender.send(&Message::Signal(signo)).is_err() {
                return;
            }
        }
    });
    Ok(())
}
