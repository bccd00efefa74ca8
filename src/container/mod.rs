//! `rvmm run`: a container image run inside a fresh microVM. The image becomes a read-only
//! ext4 disk (cached by digest); the VM boots the container guest, whose init (rvmm-agent)
//! runs the command with crun and relays it over vsock.

pub mod image;
pub mod request;
pub mod session;
pub mod vm;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error_chain;
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

/// Run a command in a container inside a fresh microVM.
///
/// IMAGE is a local file or directory: an OCI image layout (or its tar, as `skopeo copy …
/// oci:` or `podman save --format oci-archive` write), a `docker save` tarball, or a rootfs
/// tarball (`docker export`). There are no registry pulls: rvmm never downloads images.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "IMAGE is a local OCI image layout (directory or tar), a docker save \
tarball or a rootfs tarball (docker export). There are no registry pulls: rvmm never \
downloads images."
)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u64,
    /// Set an environment variable in the container (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Send stdin to the command.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// A virtio-net interface on an existing TAP device (tap=NAME[,mac=MAC]); the container
    /// then shares the VM's network instead of getting an empty namespace.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// How long to wait for the guest's agent, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub agent_timeout: u64,
    /// The container guest (vmlinux, rootfs.ext4); default: the cache's container-guest.
    #[arg(long, value_name = "DIR")]
    pub guest: Option<PathBuf>,
    /// Keep the guest console output in this file.
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// The image: an OCI layout directory or tar, a docker save tar, or a rootfs tar.
    pub image: PathBuf,
    /// The command and its arguments (default: the image's Entrypoint and Cmd).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/rvmm`.
pub fn cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache")
        })
        .join("rvmm")
}

pub fn main(args: RunArgs) -> Result<ExitCode, String> {
    run(&args).map(ExitCode::from).map_err(|e| error_chain(&e))
}

fn run(args: &RunArgs) -> Result<u8, RunError> {
    let cache = DiskCache::user_default();
    let image = Image::open(&args.image, &cache.scratch())?;
    let request = run_request(
        &image.settings,
        &Overrides {
            command: &args.command,
            env: &args.env,
            workdir: args.workdir.as_deref(),
            stdin: args.interactive,
            host_network: !args.net.is_empty(),
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
        memory_mib: args.memory,
        nets: &args.net,
        console_log: args.console_log.as_deref(),
    })?;
    let mut session = vm.connect(Duration::from_secs(args.agent_timeout))?;
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
