//! rvmm-oci's command line: runc's, as podman's conmon, containerd's runc shim and Docker pass
//! it, converted into `rvmm_oci`'s plain options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use rvmm_oci::exec::ExecOptions;
use rvmm_oci::{Global, LogFormat, OciCommand};

/// rvmm-oci — a runc-compatible OCI runtime that runs each container in an rvmm microVM.
#[derive(Debug, Parser)]
#[command(name = "rvmm-oci", version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.0.2"))]
pub struct OciCli {
    /// Where container state is kept.
    #[arg(long, value_name = "DIR", global = true)]
    pub root: Option<PathBuf>,
    /// Also write errors to this file.
    #[arg(long, value_name = "FILE", global = true)]
    pub log: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormatArg,
    /// Accepted for compatibility: cgroups are the guest's own.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility.
    #[arg(long, global = true)]
    pub debug: bool,
    /// The container guest (vmlinux, rootfs.ext4); default: the cache's container-guest.
    #[arg(long, value_name = "DIR", global = true)]
    pub guest: Option<PathBuf>,
    #[command(subcommand)]
    pub command: OciSub,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

/// `exec`'s options, as conmon and containerd's shim pass them.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The process to run (an OCI process.json).
    #[arg(long, value_name = "FILE")]
    process: PathBuf,
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET")]
    console_socket: Option<PathBuf>,
    /// Return once the process runs.
    #[arg(short, long)]
    detach: bool,
    /// Accepted for compatibility: the process file says whether it has a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Accepted for compatibility: extra descriptors cannot enter the VM.
    #[arg(long, value_name = "N", default_value_t = 0)]
    preserve_fds: u32,
    id: String,
}

impl From<ExecArgs> for ExecOptions {
    fn from(a: ExecArgs) -> Self {
        ExecOptions {
            id: a.id,
            process: a.process,
            pid_file: a.pid_file,
            console_socket: a.console_socket,
            detach: a.detach,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OciSub {
    /// Boot the container's VM; its process starts at `start`.
    Create {
        #[arg(short, long, value_name = "DIR", default_value = ".")]
        bundle: PathBuf,
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
        #[arg(long, value_name = "SOCKET")]
        console_socket: Option<PathBuf>,
        /// Accepted for compatibility.
        #[arg(long)]
        no_pivot: bool,
        /// Accepted for compatibility.
        #[arg(long)]
        no_new_keyring: bool,
        /// Accepted for compatibility: extra descriptors cannot enter the VM.
        #[arg(long, value_name = "N", default_value_t = 0)]
        preserve_fds: u32,
        id: String,
    },
    /// Start the process of a created container.
    Start { id: String },
    /// Print a container's state as runtime-spec JSON.
    State { id: String },
    /// Send a signal (default SIGTERM) to a container.
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Stop a running container's vCPUs (its VM stays in memory).
    Pause { id: String },
    /// Let a paused container run on.
    Resume { id: String },
    /// Remove a container, killing it first with --force.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// List a container's processes as the host sees them: its keeper.
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// Run another process in a running container.
    Exec {
        #[command(flatten)]
        exec: ExecArgs,
    },
    #[command(hide = true)]
    ExecAttached {
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Print what this runtime supports, as JSON.
    Features,
    #[command(hide = true)]
    Keeper {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
    },
}

impl OciCli {
    pub fn into_parts(self) -> (Global, OciCommand) {
        let global = Global {
            root: self.root,
            log: self.log,
            log_format: match self.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
            guest: self.guest,
        };
        let command = match self.command {
            OciSub::Create {
                bundle,
                pid_file,
                console_socket,
                id,
                ..
            } => OciCommand::Create {
                id,
                bundle,
                pid_file,
                console_socket,
            },
            OciSub::Start { id } => OciCommand::Start { id },
            OciSub::State { id } => OciCommand::State { id },
            OciSub::Kill { id, signal, .. } => OciCommand::Kill { id, signal },
            OciSub::Pause { id } => OciCommand::Pause { id },
            OciSub::Resume { id } => OciCommand::Resume { id },
            OciSub::Delete { force, id } => OciCommand::Delete { id, force },
            OciSub::Ps { format, id, .. } => OciCommand::Ps {
                id,
                json: format == "json",
            },
            OciSub::Exec { exec } => OciCommand::Exec(exec.into()),
            OciSub::ExecAttached { exec } => OciCommand::ExecAttached(exec.into()),
            OciSub::Features => OciCommand::Features,
            OciSub::Keeper {
                bundle,
                console_socket,
                id,
            } => OciCommand::Keeper {
                id,
                bundle,
                console_socket,
            },
        };
        (global, command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (Global, OciCommand) {
        let argv = std::iter::once("rvmm-oci").chain(args.iter().copied());
        OciCli::try_parse_from(argv).unwrap().into_parts()
    }

    #[test]
    fn takes_conmons_create() {
        let (global, cmd) = parse(&[
            "--root",
            "/run/r",
            "--log",
            "/l.json",
            "--log-format",
            "json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--no-pivot",
            "c1",
        ]);
        assert_eq!(global.root.as_deref(), Some(std::path::Path::new("/run/r")));
        assert_eq!(global.log_format, LogFormat::Json);
        let OciCommand::Create {
            id,
            bundle,
            pid_file,
            console_socket,
        } = cmd
        else {
            panic!("{cmd:?}");
        };
        assert_eq!((id.as_str(), bundle.to_str()), ("c1", Some("/b")));
        assert_eq!(pid_file.as_deref(), Some(std::path::Path::new("/p")));
        assert!(console_socket.is_none());
    }

    #[test]
    fn takes_the_other_commands() {
        assert!(matches!(
            parse(&["kill", "--all", "c1", "KILL"]).1,
            OciCommand::Kill { id, signal } if id == "c1" && signal == "KILL"
        ));
        assert!(matches!(
            parse(&["kill", "c1"]).1,
            OciCommand::Kill { signal, .. } if signal == "SIGTERM"
        ));
        assert!(matches!(
            parse(&["delete", "-f", "c1"]).1,
            OciCommand::Delete { force: true, .. }
        ));
        assert!(matches!(
            parse(&["ps", "--format", "json", "c1"]).1,
            OciCommand::Ps { json: true, .. }
        ));
        assert!(matches!(
            parse(&["exec", "--pid-file", "/p", "--process", "/p.json", "--detach", "c1"]).1,
            OciCommand::Exec(ExecOptions { id, detach: true, .. }) if id == "c1"
        ));
        assert!(OciCli::try_parse_from(["rvmm-oci", "exec", "c1", "ls"]).is_err());
        assert!(matches!(parse(&["pause", "c1"]).1, OciCommand::Pause { id } if id == "c1"));
        assert!(matches!(parse(&["resume", "c1"]).1, OciCommand::Resume { id } if id == "c1"));
        assert!(OciCli::try_parse_from(["rvmm-oci", "checkpoint", "c1"]).is_err());
        assert!(OciCli::try_parse_from(["rvmm-oci", "create", "--bogus", "c1"]).is_err());
    }
}
