//! The command line of the shared VM and its containers: `rvmm vm start|stop|status|list`,
//! `rvmm exec`, `rvmm ps`, `rvmm stop`, `rvmm kill`, and what each does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use rvmm_container::shared::{client, VmOptions, DEFAULT_VM};
use rvmm_container::signals::parse_signal;
use rvmm_container::ExecOptions;
use rvmm_vmm::error_chain;

use crate::cli::NetworkArg;

/// `rvmm vm`: the long-lived VM that hosts containers.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start a shared VM in the background; `rvmm run --vm NAME` then runs in it without a boot.
    Start(VmStartArgs),
    /// Stop a shared VM and every container in it.
    Stop {
        #[arg(default_value = DEFAULT_VM)]
        name: String,
    },
    /// Stop a shared VM's vCPUs, and with them its containers; its memory stays.
    Pause {
        #[arg(default_value = DEFAULT_VM)]
        name: String,
    },
    /// Let a paused shared VM go on.
    Resume {
        #[arg(default_value = DEFAULT_VM)]
        name: String,
    },
    /// Show a shared VM's state, memory and containers.
    Status {
        #[arg(default_value = DEFAULT_VM)]
        name: String,
    },
    /// List the running shared VMs.
    List,
}

#[derive(Debug, Args)]
pub struct VmStartArgs {
    /// The VM's name.
    #[arg(long, default_value = DEFAULT_VM)]
    pub name: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u8,
    /// Guest memory in MiB; what containers free goes back to the host (free page reporting).
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    pub memory: u64,
    /// Forwards a host port to the VM, where a container listens:
    /// [HOSTIP:]HOSTPORT:PORT[/tcp|udp]. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// `user` (default; user-mode networking through passt) or `none`.
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<NetworkArg>,
    /// The container guest (vmlinux, rootfs.ext4); default: the cache's container-guest.
    #[arg(long, value_name = "DIR")]
    pub guest: Option<PathBuf>,
    /// How long to wait for the guest's agent, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub agent_timeout: u64,
    /// Stay in the foreground as the VM's keeper until it is stopped (for a service manager).
    #[arg(long)]
    pub foreground: bool,
}

impl From<VmStartArgs> for VmOptions {
    fn from(a: VmStartArgs) -> Self {
        VmOptions {
            name: a.name,
            cpus: a.cpus,
            memory_mib: a.memory,
            publish: a.publish,
            network: a.network.map(NetworkArg::into_network),
            guest: a.guest,
            agent_timeout: Duration::from_secs(a.agent_timeout),
            foreground: a.foreground,
        }
    }
}

/// Run another process in a shared VM's running container.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM (default: the running VM that has the container).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Send stdin to the process.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Run the process on a terminal.
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// The container's name.
    pub container: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl From<ExecArgs> for ExecOptions {
    fn from(a: ExecArgs) -> Self {
        ExecOptions {
            vm: a.vm,
            container: a.container,
            command: a.command,
            interactive: a.interactive,
            tty: a.tty,
        }
    }
}

/// List the containers of the shared VMs.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only this VM's.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
}

/// Stop containers: SIGTERM, then SIGKILL after the grace time.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM (default: the running VM that has the container).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Seconds to wait before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Send a signal to containers.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// The VM (default: the running VM that has the container).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// The signal, by name or number.
    #[arg(short = 's', long = "signal", default_value = "KILL")]
    pub signal: String,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

fn done<T>(result: Result<T, rvmm_container::shared::SharedError>) -> Result<T, String> {
    result.map_err(|e| error_chain(&e))
}

pub fn vm(command: VmCommand) -> Result<ExitCode, String> {
    match command {
        VmCommand::Start(args) => {
            let opts = VmOptions::from(args);
            done(client::start(&opts))?;
            if !opts.foreground {
                println!("{}", opts.name);
            }
        }
        VmCommand::Stop { name } => done(client::stop(&name))?,
        VmCommand::Pause { name } => done(client::pause(&name, true))?,
        VmCommand::Resume { name } => done(client::pause(&name, false))?,
        VmCommand::Status { name } => print!("{}", done(client::status(&name))?),
        VmCommand::List => print!("{}", client::list()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn exec(args: ExecArgs) -> Result<ExitCode, String> {
    rvmm_container::exec(&args.into())
        .map(ExitCode::from)
        .map_err(|e| error_chain(&e))
}

pub fn ps(args: PsArgs) -> Result<ExitCode, String> {
    print!("{}", done(client::ps(args.vm.as_deref()))?);
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: StopArgs) -> Result<ExitCode, String> {
    let grace = Duration::from_secs(args.time);
    for name in &args.containers {
        done(client::stop_container(args.vm.as_deref(), name, grace))?;
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn kill(args: KillArgs) -> Result<ExitCode, String> {
    let signal = parse_signal(&args.signal).ok_or(format!("unknown signal {:?}", args.signal))?;
    for name in &args.containers {
        done(client::kill(args.vm.as_deref(), name, signal))?;
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}
