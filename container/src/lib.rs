//! `rvmm run`: a container image run inside a fresh microVM. The image becomes a read-only
//! ext4 disk (cached by digest); the VM boots the container guest, whose init (rvmm-agent)
//! runs the command with crun and relays it over vsock. The container shares the VM's network:
//! user-mode networking through passt by default (`network.rs`), with `-p` ports published
//! through it; `-t` puts the command on a terminal (`tty.rs`). With `--vm` it runs in a
//! shared VM that is already up (`shared/`) instead.

pub mod cache;
pub mod image;
pub mod network;
pub mod request;
pub mod session;
pub mod shared;
pub mod signals;
pub mod tty;
pub mod vm;
pub mod volume;
pub mod warm;

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use image::disk::{DiskCache, DiskError};
use image::ImageError;
use network::{Network, NetworkError};
use request::{run_request, Overrides, RequestError};
use rvmm_agent::protocol::{ExecRequest, ExitStatus, Message, RunRequest};
use session::{exit_code, RunIo, Session, SessionError};
use shared::SharedError;
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
    #[error(transparent)]
    Shared(#[from] SharedError),
    #[error("{0} cannot be used with --vm: the shared VM's devices are set when it starts (rvmm vm start)")]
    NotWithVm(&'static str),
    #[error("-d/--detach needs --vm: a fresh VM lives only as long as rvmm run")]
    DetachWithoutVm,
    #[error("-d/--detach cannot be combined with -i or -t")]
    DetachAttached,
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
    /// Run in this shared VM (`rvmm vm start`) instead of a fresh one.
    pub vm: Option<String>,
    /// The container's name in its VM.
    pub name: Option<String>,
    /// Leave the container running in the shared VM and print its name.
    pub detach: bool,
    /// Start from the cached snapshot of a booted guest (made on first use) where the VM
    /// allows it (`warm`); false: always boot.
    pub snapshot: bool,
}

/// `rvmm exec`: another process in a shared VM's running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOptions {
    /// The VM; None: the running VM that has the container.
    pub vm: Option<String>,
    pub container: String,
    pub command: Vec<String>,
    pub interactive: bool,
    pub tty: bool,
}

/// Runs the command to its end (or, detached, to its start); its exit status.
pub fn run(args: &RunOptions) -> Result<u8, RunError> {
    if args.tty && !io::stdin().is_terminal() {
        return Err(TtyError::NotATty.into());
    }
    if args.vm.is_some() {
        return run_in_shared_vm(args);
    }
    if args.detach {
        return Err(RunError::DetachWithoutVm);
    }
    // What can be refused is refused before anything starts.
    let nets = network::vm_nets(args.network, &args.nets)?;
    network::preflight(&nets, &args.publish)?;
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
    let prepared = prepare(args, &DiskCache::user_default(), &volumes, !nets.is_empty())?;
    let guest = GuestFiles::find(args.guest.as_deref())?;
    let vmm = std::env::current_exe().map_err(|e| RunError::Vm(VmError::Spawn(e)))?;
    let launch = VmLaunch {
        vmm: &vmm,
        guest: &guest,
        image_disk: Some(&prepared.disk),
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        nets: &nets,
        publish: &args.publish,
        shares: &shares,
        netns: None,
        console_log: args.console_log.as_deref(),
        run_dir_in: None,
        balloon: false,
        balloon_stats: None,
    };
    let restored = (args.snapshot && warm::eligible(&launch))
        .then(|| warm::start(&launch, &cache::snapshots(), args.agent_timeout))
        .flatten();
    let (vm, mut session) = match restored {
        Some(started) => started,
        None => {
            let mut vm = VmProcess::start(&launch)?;
            let session = vm.connect(args.agent_timeout)?;
            (vm, session)
        }
    };
    let status = attach(
        &mut session,
        Start::Run(Box::new(prepared.request)),
        args.tty,
        args.interactive,
    )?;
    if session.shutdown().is_ok() {
        vm.finish(POWER_OFF_GRACE);
    }
    Ok(exit_code(status))
}

/// The image as a disk in the cache, and the request that runs it.
struct Prepared {
    disk: PathBuf,
    request: RunRequest,
}

fn prepare(
    args: &RunOptions,
    cache: &DiskCache,
    volumes: &[rvmm_agent::protocol::Volume],
    host_network: bool,
) -> Result<Prepared, RunError> {
    let (disk, settings) = cache.image_disk(&args.image)?;
    let mut request = run_request(
        &settings,
        &Overrides {
            command: &args.command,
            env: &args.env,
            workdir: args.workdir.as_deref(),
            stdin: args.interactive || args.tty,
            host_network,
            volumes,
        },
    )?;
    request.name = args.name.clone();
    request.detach = args.detach;
    Ok(Prepared { disk, request })
}

/// `rvmm run --vm`: the image disk goes to the VM's image share (the cache itself), and the
/// agent runs it there.
fn run_in_shared_vm(args: &RunOptions) -> Result<u8, RunError> {
    let vm = args.vm.as_deref().unwrap_or(shared::DEFAULT_VM);
    let refused = [
        (!args.publish.is_empty(), "-p/--publish"),
        (!args.volumes.is_empty(), "-v/--volume"),
        (!args.nets.is_empty(), "--net"),
        (args.network.is_some(), "--network"),
    ];
    if let Some((_, what)) = refused.iter().find(|(given, _)| *given) {
        return Err(RunError::NotWithVm(what));
    }
    if args.detach && (args.tty || args.interactive) {
        return Err(RunError::DetachAttached);
    }
    let record = shared::client::running(vm)?;
    // The VM's own image store, whatever this process's cache is.
    let cache = DiskCache {
        dir: record.images.clone(),
        ..DiskCache::user_default()
    };
    let mut prepared = prepare(args, &cache, &[], true)?;
    prepared.request.image = prepared
        .disk
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    let mut session = shared::client::connect(&record)?;
    if args.detach {
        return match session.ask(&Message::Run(Box::new(prepared.request)))? {
            Message::Started(name) => {
                println!("{name}");
                Ok(0)
            }
            other => Err(SharedError::Unexpected(format!("{other:?}")).into()),
        };
    }
    let status = attach(
        &mut session,
        Start::Run(Box::new(prepared.request)),
        args.tty,
        args.interactive,
    )?;
    Ok(exit_code(status))
}

/// `rvmm exec`: the process runs with the container's environment, user and directory.
pub fn exec(args: &ExecOptions) -> Result<u8, RunError> {
    if args.tty && !io::stdin().is_terminal() {
        return Err(TtyError::NotATty.into());
    }
    let record = shared::client::find_container(args.vm.as_deref(), &args.container)?;
    let mut session = shared::client::connect(&record)?;
    let request = ExecRequest {
        container: Some(args.container.clone()),
        argv: args.command.clone(),
        ..ExecRequest::default()
    };
    let status = attach(
        &mut session,
        Start::Exec(request),
        args.tty,
        args.interactive,
    )?;
    Ok(exit_code(status))
}

/// What an attached session starts.
enum Start {
    Run(Box<RunRequest>),
    Exec(ExecRequest),
}

/// Runs a command with this process's stdio: signals forwarded, the terminal raw with `tty`,
/// stdin sent with `interactive` or `tty` (and closed at once otherwise).
fn attach(
    session: &mut Session,
    start: Start,
    tty: bool,
    interactive: bool,
) -> Result<ExitStatus, RunError> {
    signals::forward_signals(session.sender(), tty).map_err(RunError::Signals)?;
    // Raw from here to the end of the command, whichever way that comes.
    let raw = tty.then(RawTerminal::enter).transpose()?;
    let size = raw.as_ref().map(|_| tty::stdin_size());
    let stdin: Box<dyn io::Read + Send> = if interactive || tty {
        Box::new(io::stdin())
    } else {
        Box::new(io::empty())
    };
    let io = RunIo {
        stdin: Some(stdin),
        stdout: &mut io::stdout(),
        stderr: &mut io::stderr(),
    };
    let status = match start {
        Start::Run(mut request) => {
            request.terminal = size;
            session.run(&request, io)?
        }
        Start::Exec(mut request) => {
            request.terminal = size;
            session.exec(&request, io)?
        }
    };
    drop(raw);
    Ok(status)
}
