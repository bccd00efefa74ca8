//! `rvmm run`: a container image run inside a fresh microVM. The image becomes a read-only
//! ext4 disk (cached by digest); the VM boots the container guest, whose init (rvmm-agent)
//! runs the command with crun and relays it over vsock. The container shares the VM's network:
//! user-mode networking through passt by default (`network.rs`), with `-p` ports published
//! through it; `-t` puts the command on a terminal (`tty.rs`).

pub mod cache;
pub mod image;
pub mod network;
pub mod request;
pub mod session;
pub mod tty;
pub mod vm;
pub mod volume;

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;

use image::disk::{DiskCache, DiskError};
use image::{Image, ImageError};
use network::{Network, NetworkError};
use request::{run_request, Overrides, RequestError};
use rvmm_agent::protocol::Message;
use session::{exit_code, RunIo, SessionError};
use tty::{RawTerminal, TtyError};
use vm::{GuestFiles, VmError, VmLaunch, VmProcess};
use volume::{VolumeError, VolumeSpec};

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
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Tty(#[from] TtyError),
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
    /// Run the command on a terminal in the guest, with rvmm's own terminal raw meanwhile.
    pub tty: bool,
    /// `--network`; None: user-mode networking unless `nets` has TAPs.
    pub network: Option<Network>,
    /// virtio-net interfaces on TAP devices (`tap=NAME[,mac=MAC]` each). With any network, the
    /// container shares the VM's network instead of getting an empty namespace.
    pub nets: Vec<String>,
    /// `[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|udp]` each: host ports passt forwards.
    pub publish: Vec<String>,
    /// `HOSTDIR:GUESTDIR[:ro|:rw]` each: host directories in the container.
    pub volumes: Vec<String>,
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
    // What can be refused is refused before anything starts.
    let nets = network::vm_nets(args.network, &args.nets)?;
    network::preflight(&nets, &args.publish)?;
    if args.tty && !io::stdin().is_terminal() {
        return Err(TtyError::NotATty.into());
    }
    let volumes = args
        .volumes
        .iter()
        .map(|v| VolumeSpec::parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    let shares: Vec<String> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| v.share_spec(i))
        .collect();
    let volumes: Vec<_> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| v.volume(i))
        .collect();
    let cache = DiskCache::user_default();
    let image = Image::open(&args.image, &cache.scratch())?;
    let send_stdin = args.interactive || args.tty;
    let mut request = run_request(
        &image.settings,
        &Overrides {
            command: &args.command,
            env: &args.env,
            workdir: args.workdir.as_deref(),
            stdin: send_stdin,
            host_network: !nets.is_empty(),
            volumes: &volumes,
        },
    )?;
    let guest = GuestFiles::find(args.guest.as_deref())?;
    let disk = cache.disk_for(&image)?;
    drop(image);

    let vmm = std::env::current_exe().map_err(|e| RunError::Vm(VmError::Spawn(e)))?;
    let mut vm = VmProcess::start(&VmLaunch {
        vmm: &vmm,
        guest: &guest,
        image_disk: Some(&disk),
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        nets: &nets,
        publish: &args.publish,
        shares: &shares,
        netns: None,
        console_log: args.console_log.as_deref(),
    })?;
    let mut session = vm.connect(args.agent_timeout)?;
    forward_signals(session.sender(), args.tty)?;
    // Raw from here to the end of the command, whichever way that comes.
    let raw = args.tty.then(RawTerminal::enter).transpose()?;
    request.terminal = raw.as_ref().map(|_| tty::stdin_size());
    let status = session.run(
        &request,
        RunIo {
            stdin: send_stdin.then(|| Box::new(io::stdin()) as Box<dyn io::Read + Send>),
            stdout: &mut io::stdout(),
            stderr: &mut io::stderr(),
        },
    )?;
    drop(raw);
    if session.shutdown().is_ok() {
        vm.finish(POWER_OFF_GRACE);
    }
    Ok(exit_code(status))
}

/// Ctrl-C and friends go to the container, as they would to a local process; the VM itself
/// is in its own process group and does not see them. With `tty`, a resized terminal's new
/// size goes to the container's terminal.
fn forward_signals(sender: session::AgentSender, tty: bool) -> Result<(), RunError> {
    let mut forwarded = vec![SIGINT, SIGTERM, SIGHUP, SIGQUIT];
    if tty {
        forwarded.push(SIGWINCH);
    }
    let mut signals = Signals::new(forwarded).map_err(RunError::Signals)?;
    std::thread::spawn(move || {
        for signo in signals.forever() {
            let msg = match signo {
                SIGWINCH => Message::Resize(tty::stdin_size()),
                _ => Message::Signal(signo),
            };
            if sender.send(&msg).is_err() {
                return;
            }
        }
    });
    Ok(())
}
