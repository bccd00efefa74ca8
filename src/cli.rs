//! The command line: clap's types, each converted into the options of the library that acts
//! on it ([`VmParams`], [`RunOptions`], [`BenchOptions`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rvmm_bench::{BenchOptions, Step};
use rvmm_container::network::Network;
use rvmm_container::RunOptions;
use rvmm_vmm::config::{ConsoleKind, CpuTemplate, Seccomp, VmParams};
use rvmm_vmm::snapshot::RestoreOptions;

use crate::shared_cli::{ExecArgs, KillArgs, PsArgs, StopArgs, VmCommand};

/// rvmm — boot a Linux guest on KVM.
#[derive(Debug, Parser)]
#[command(
    name = "rvmm",
    version,
    about,
    long_about = None,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// What rvmm does besides booting the VM described by the top-level options.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a container inside a fresh microVM (or a shared one with --vm).
    Run(RunArgs),
    /// Compare a microVM's costs with a container's and a plain process's.
    Bench(BenchArgs),
    /// Manage shared VMs, which host many containers and stay up between runs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run another process in a shared VM's running container.
    Exec(ExecArgs),
    /// List the containers of the shared VMs.
    Ps(PsArgs),
    /// Stop containers of the shared VMs (SIGTERM, then SIGKILL).
    Stop(StopArgs),
    /// Send a signal to containers of the shared VMs.
    Kill(KillArgs),
    /// Resume a VM from a snapshot (the API socket's `snapshot` request).
    Restore(RestoreArgs),
}

/// A snapshot directory and where the restored VM finds its host resources.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The directory the snapshot was written to.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Another image for disk INDEX (0 is the first: the root filesystem, if there is one):
    /// INDEX=PATH. Repeatable.
    #[arg(long, value_name = "INDEX=PATH", value_parser = parse_disk_override)]
    pub disk: Vec<(usize, PathBuf)>,
    /// TAP devices for the snapshot's `--net tap=` interfaces, in order. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub tap: Vec<String>,
    /// The restored VM's control socket, instead of the snapshot's.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The vsock device's host socket, instead of the snapshot's.
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
}

fn parse_disk_override(text: &str) -> Result<(usize, PathBuf), String> {
    let (index, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not INDEX=PATH"))?;
    let index = index
        .parse()
        .map_err(|_| format!("{index:?} is not a disk index"))?;
    Ok((index, PathBuf::from(path)))
}

impl From<RestoreArgs> for RestoreOptions {
    fn from(a: RestoreArgs) -> Self {
        RestoreOptions {
            disks: a.disk,
            taps: a.tap,
            api_socket: a.api_socket,
            vsock_uds: a.vsock_uds,
        }
    }
}

/// The VM to boot when no subcommand is given.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default, which names the console device).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub memory: u64,
    /// CPU features shown to the guest; defaults to `baseline` on an emulating (nested) KVM,
    /// `host` otherwise.
    #[arg(long, value_enum)]
    pub cpu_template: Option<CpuTemplateArg>,
    /// Guest console device.
    #[arg(long, value_enum, default_value = "serial")]
    pub console: ConsoleArg,
    /// Root filesystem image: becomes /dev/vda, and `root=/dev/vda rw` is added to the
    /// command line.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// An extra virtio disk (vdb, vdc, … in order): PATH[,ro][,serial=ID][,direct=on]
    /// (direct: O_DIRECT, no host page cache). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A virtio-net interface: tap=NAME[,mac=MAC] on an existing TAP device, or
    /// user[,mac=MAC] for user-mode networking through a passt that rvmm starts (guest
    /// 10.0.2.15/24, gateway 10.0.2.2, which reaches the host's 127.0.0.1). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// Forwards a host port to a guest port on the --net user network:
    /// [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom().
    #[arg(long)]
    pub rng: bool,
    /// A virtio-balloon device with free page reporting: memory the guest frees goes back to
    /// the host a few seconds later.
    #[arg(long)]
    pub balloon: bool,
    /// Writes the guest's memory statistics from the balloon (free, available, total, …) to
    /// PATH every 2 s, as one JSON line; implies --balloon.
    #[arg(long, value_name = "PATH")]
    pub balloon_stats: Option<PathBuf>,
    /// A virtio-vsock device, cid=N,uds=PATH: host programs reach guest port P by connecting to
    /// the Unix socket PATH and writing "CONNECT P\n"; the guest reaches host port P at PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// A virtio-fs device served by an external vhost-user backend such as virtiofsd:
    /// tag=TAG,socket=PATH; the guest mounts it with `mount -t virtiofs TAG DIR`. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub fs: Vec<String>,
    /// Shares host directory DIR with the guest as virtio-fs tag TAG, served by a virtiofsd
    /// that rvmm starts and stops with the VM: DIR,tag=TAG[,ro]; `ro` is enforced on the host.
    /// Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub share: Vec<String>,
    /// Per-thread seccomp filters; `off` is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: SeccompArg,
    /// No ACPI tables: the guest finds its CPUs through the MP table and the virtio devices
    /// through `virtio_mmio.device=` entries on the command line, and cannot power itself off.
    #[arg(long)]
    pub no_acpi: bool,
    /// A control socket for the running VM: one JSON request per line ({"request":"status"},
    /// "pause", "resume" or "shutdown"), one JSON reply per line (README, "API socket").
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Once the VM is built, run in a jail: an empty read-only root holding only the
    /// directories of the vsock and API sockets, new mount and IPC namespaces, no
    /// capabilities, no_new_privs, and, when started as root, the --jail-user identity.
    #[arg(long)]
    pub jail: bool,
    /// UID:GID the jailed VMM becomes when started as root (default 65534:65534); implies
    /// --jail.
    #[arg(long, value_name = "UID:GID")]
    pub jail_user: Option<String>,
}

/// Which CPU features the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuTemplateArg {
    /// Everything KVM supports on this host.
    Host,
    /// A conservative x86-64 feature set (no XSAVE/AVX, POPCNT, RDRAND, SMEP/SMAP, PCID, …).
    Baseline,
}

/// Where the guest console lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleArg {
    /// The COM1 8250 UART (ttyS0).
    Serial,
    /// A virtio-console port (hvc0); there is no UART.
    Virtio,
    /// No console device: guest output is discarded.
    None,
}

/// Whether rvmm's threads run under their seccomp filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompArg {
    /// Each thread may make only the system calls its kind of thread needs.
    On,
    /// No filters (for debugging; rvmm warns).
    Off,
}

impl From<VmArgs> for VmParams {
    fn from(a: VmArgs) -> Self {
        VmParams {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            cpus: a.cpus,
            memory_mib: a.memory,
            cpu_template: a.cpu_template.map(|t| match t {
                CpuTemplateArg::Host => CpuTemplate::Host,
                CpuTemplateArg::Baseline => CpuTemplate::Baseline,
            }),
            console: match a.console {
                ConsoleArg::Serial => ConsoleKind::Serial,
                ConsoleArg::Virtio => ConsoleKind::Virtio,
                ConsoleArg::None => ConsoleKind::None,
            },
            rootfs: a.rootfs,
            disks: a.disk,
            nets: a.net,
            publish: a.publish,
            rng: a.rng,
            balloon: a.balloon,
            balloon_stats: a.balloon_stats,
            vsock: a.vsock,
            fs: a.fs,
            shares: a.share,
            seccomp: match a.seccomp {
                SeccompArg::On => Seccomp::On,
                SeccompArg::Off => Seccomp::Off,
            },
            acpi: !a.no_acpi,
            api_socket: a.api_socket,
            jail: a.jail,
            jail_user: a.jail_user,
        }
    }
}

/// Run a command in a container inside a fresh microVM.
///
/// IMAGE is a local file or directory: an OCI image layout (or its tar, as `skopeo copy …
/// oci:` or `podman save --format oci-archive` write), a `docker save` tarball, or a rootfs
/// tarball (`docker export`). There are no registry pulls: rvmm never downloads images.
#[derive(Debug, Args)]
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
    /// Run the command on a terminal (rvmm's own terminal is raw meanwhile; stdin must be a
    /// terminal, and goes to the command).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// The container's network: `user` (default; user-mode networking through passt, the
    /// container is 10.0.2.15/24 and its gateway 10.0.2.2 reaches the host's 127.0.0.1) or
    /// `none` (no network).
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<NetworkArg>,
    /// Publishes a container port on the host through the user network:
    /// [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|udp]. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// A virtio-net interface on an existing TAP device (tap=NAME[,mac=MAC]), for root users;
    /// replaces the default user network unless --network user is given too. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// A host directory in the container, shared with the VM over virtio-fs:
    /// HOSTDIR:GUESTDIR[:ro|:rw]; `ro` is enforced on the host. Repeatable.
    #[arg(short = 'v', long = "volume", value_name = "SPEC")]
    pub volume: Vec<String>,
    /// How long to wait for the guest's agent, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub agent_timeout: u64,
    /// The container guest (vmlinux, rootfs.ext4); default: the cache's container-guest.
    #[arg(long, value_name = "DIR")]
    pub guest: Option<PathBuf>,
    /// Keep the guest console output in this file.
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Run in this shared VM (rvmm vm start) instead of booting a fresh one.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// The container's name in its VM (for rvmm exec, stop, kill).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Leave the container running in the shared VM (--vm) and print its name.
    #[arg(short = 'd', long = "detach")]
    pub detach: bool,
    /// Boot the VM instead of restoring the cached snapshot of a booted guest (made on first
    /// use; runs with -v/--volume always boot).
    #[arg(long)]
    pub no_snapshot: bool,
    /// The image: an OCI layout directory or tar, a docker save tar, or a rootfs tar.
    pub image: PathBuf,
    /// The command and its arguments (default: the image's Entrypoint and Cmd).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `rvmm run --network`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    /// User-mode networking through passt.
    User,
    /// No network.
    None,
}

impl NetworkArg {
    pub fn into_network(self) -> Network {
        match self {
            NetworkArg::User => Network::User,
            NetworkArg::None => Network::None,
        }
    }
}

impl From<RunArgs> for RunOptions {
    fn from(a: RunArgs) -> Self {
        RunOptions {
            cpus: a.cpus,
            memory_mib: a.memory,
            env: a.env,
            workdir: a.workdir,
            interactive: a.interactive,
            tty: a.tty,
            network: a.network.map(NetworkArg::into_network),
            nets: a.net,
            publish: a.publish,
            volumes: a.volume,
            agent_timeout: Duration::from_secs(a.agent_timeout),
            guest: a.guest,
            console_log: a.console_log,
            image: a.image,
            command: a.command,
            vm: a.vm,
            name: a.name,
            detach: a.detach,
            snapshot: !a.no_snapshot,
        }
    }
}

/// Options of `rvmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measured runs per variant and figure (plus one warm-up run for start latency).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Where report.md, report.json and the SVG charts go.
    #[arg(long, default_value = "bench-report")]
    pub out: PathBuf,
    /// Steps to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<StepArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StepArg {
    Start,
    Memory,
    Cpu,
    Disk,
    Net,
    Fs,
    Runtime,
    Run,
}

impl From<BenchArgs> for BenchOptions {
    fn from(a: BenchArgs) -> Self {
        let step = |s| match s {
            StepArg::Start => Step::Start,
            StepArg::Memory => Step::Memory,
            StepArg::Cpu => Step::Cpu,
            StepArg::Disk => Step::Disk,
            StepArg::Net => Step::Net,
            StepArg::Fs => Step::Fs,
            StepArg::Runtime => Step::Runtime,
            StepArg::Run => Step::Run,
        };
        BenchOptions {
            runs: a.runs,
            out: a.out,
            only: a.only.into_iter().map(step).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("rvmm").chain(args.iter().copied()))
            .expect("clap accepts the arguments")
    }

    #[test]
    fn vm_defaults() {
        let params = VmParams::from(parse(&["--kernel", "/k"]).vm);
        assert_eq!(params.kernel, Some(PathBuf::from("/k")));
        assert_eq!((params.cpus, params.memory_mib), (1, 128));
        assert_eq!(params.console, ConsoleKind::Serial);
        assert_eq!(params.seccomp, Seccomp::On);
        assert_eq!(params.cpu_template, None);
        assert!(params.acpi && !params.rng);
        let params = VmParams::from(parse(&["--kernel", "/k", "--no-acpi"]).vm);
        assert!(!params.acpi);
    }

    #[test]
    fn vm_options_convert() {
        let cli = parse(&[
            "--kernel",
            "/k",
            "--console",
            "virtio",
            "--cpu-template",
            "baseline",
            "--seccomp",
            "off",
            "--disk",
            "/a,ro",
            "--disk",
            "/b",
            "--net",
            "tap=t0",
            "--publish",
            "127.0.0.1:8080:80",
            "--vsock",
            "cid=3,uds=/v",
            "--fs",
            "tag=a,socket=/a",
            "--fs",
            "tag=b,socket=/b",
            "--share",
            "/d,tag=c,ro",
        ]);
        let params = VmParams::from(cli.vm);
        assert_eq!(params.console, ConsoleKind::Virtio);
        assert_eq!(params.cpu_template, Some(CpuTemplate::Baseline));
        assert_eq!(params.seccomp, Seccomp::Off);
        assert_eq!(params.disks, ["/a,ro", "/b"]);
        assert_eq!(params.nets, ["tap=t0"]);
        assert_eq!(params.publish, ["127.0.0.1:8080:80"]);
        assert_eq!(params.vsock.as_deref(), Some("cid=3,uds=/v"));
        assert_eq!(params.fs, ["tag=a,socket=/a", "tag=b,socket=/b"]);
        assert_eq!(params.shares, ["/d,tag=c,ro"]);
    }

    #[test]
    fn subcommands_convert() {
        let Some(Command::Run(run)) = parse(&["run", "--agent-timeout", "7", "img"]).command else {
            panic!("not run");
        };
        let run = RunOptions::from(run);
        assert_eq!(run.agent_timeout, Duration::from_secs(7));
        assert_eq!((run.cpus, run.memory_mib), (1, 512));
        assert_eq!((run.network, run.tty), (None, false));
        let Some(Command::Run(run)) = parse(&[
            "run",
            "-t",
            "--network",
            "none",
            "-p",
            "8080:80",
            "--publish",
            "53:53/udp",
            "img",
        ])
        .command
        else {
            panic!("not run");
        };
        let run = RunOptions::from(run);
        assert_eq!((run.network, run.tty), (Some(Network::None), true));
        assert_eq!(run.publish, ["8080:80", "53:53/udp"]);
        let Some(Command::Run(run)) =
            parse(&["run", "--vm", "dev", "-d", "--name", "web", "img"]).command
        else {
            panic!("not run");
        };
        let run = RunOptions::from(run);
        assert_eq!(
            (run.vm.as_deref(), run.name.as_deref(), run.detach),
            (Some("dev"), Some("web"), true)
        );
        let Some(Command::Vm(VmCommand::Start(start))) = parse(&["vm", "start"]).command else {
            panic!("not vm start");
        };
        let start = rvmm_container::shared::VmOptions::from(start);
        assert_eq!(
            (start.name.as_str(), start.cpus, start.memory_mib),
            ("default", 2, 2048)
        );
        assert!(!start.foreground && start.publish.is_empty());
        let Some(Command::Exec(exec)) = parse(&["exec", "-t", "web", "--", "sh"]).command else {
            panic!("not exec");
        };
        assert_eq!((exec.container.as_str(), exec.tty), ("web", true));
        assert_eq!(exec.command, ["sh"]);
        let Some(Command::Bench(bench)) = parse(&["bench", "--only", "cpu,net"]).command else {
            panic!("not bench");
        };
        let bench = BenchOptions::from(bench);
        assert_eq!(bench.only, [Step::Cpu, Step::Net]);
        assert_eq!(bench.runs, 5);
    }
}
