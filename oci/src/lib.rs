//! rvmm-oci: an OCI runtime with runc's command line, so that podman (conmon), containerd's
//! runc shim and Docker can run each container in its own rvmm microVM. `create` starts a
//! keeper process (`keeper.rs`) that boots the container guest with the bundle's root and bind
//! mounts shared over virtio-fs (`spec.rs`) and waits for `start`; the other commands read the
//! container's state (`state.rs`) and talk to the keeper over its control socket
//! (`control.rs`).

pub mod control;
pub mod exec;
pub mod keeper;
mod lifecycle;
pub mod network;
pub mod spec;
pub mod state;
pub mod terminal;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use control::{ControlError, Request};
use keeper::KeeperOptions;
use lifecycle::{create, delete, kill, pause};
use spec::SpecError;
use state::{spec_state, StateDir, StateError, Status};

/// Where container state lives without `--root` (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/rvmm-oci";
/// How long `create` waits for the VM to boot to its agent.
const CREATE_TIMEOUT: Duration = Duration::from_secs(330);
/// How long `delete --force` waits for a killed keeper to go.
const KILL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Vm(#[from] rvmm_container::vm::VmError),
    #[error("cannot open the control socket")]
    ControlSocket(#[source] std::io::Error),
    #[error("cannot find this program")]
    Exe(#[source] std::io::Error),
    #[error("rvmm is not at {0} (or set RVMM)")]
    NoRvmm(PathBuf),
    #[error(transparent)]
    Terminal(#[from] terminal::TerminalError),
    #[error("cannot join the container's network")]
    Network(#[from] network::NetworkError),
    #[error("cannot start the keeper")]
    Spawn(#[source] std::io::Error),
    #[error("{0}")]
    Keeper(String),
    #[error("the VM did not reach its agent within {0:?}")]
    Timeout(Duration),
    #[error("cannot write the pid file {0}")]
    PidFile(PathBuf, #[source] std::io::Error),
    #[error("container {id} is {status:?}, not {wanted}")]
    WrongState {
        id: String,
        status: Status,
        wanted: &'static str,
    },
    #[error("container {0} is running: stop it first or use delete --force")]
    Running(String),
    #[error("unknown signal {0:?}")]
    Signal(String),
}

/// How errors are logged besides stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object a line with `level`, `msg` and `time`, which podman and containerd
    /// read back from the log file to show the runtime's error.
    Json,
}

/// The options before the command.
#[derive(Clone, Debug, Default)]
pub struct Global {
    pub root: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub log_format: LogFormat,
    /// The container guest (vmlinux, rootfs.ext4); None: the cache's container-guest.
    pub guest: Option<PathBuf>,
}

/// runc's commands, as conmon and containerd call them.
#[derive(Clone, Debug)]
pub enum OciCommand {
    Create {
        id: String,
        bundle: PathBuf,
        pid_file: Option<PathBuf>,
        console_socket: Option<PathBuf>,
    },
    Start {
        id: String,
    },
    State {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Kill {
        id: String,
        signal: String,
    },
    Delete {
        id: String,
        force: bool,
    },
    Ps {
        id: String,
        json: bool,
    },
    Exec(exec::ExecOptions),
    /// Internal: a detached exec's process, attached to its stdio.
    ExecAttached(exec::ExecOptions),
    Features,
    /// Internal: the process that holds one container's VM.
    Keeper {
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
}

static LOG: std::sync::OnceLock<(PathBuf, LogFormat)> = std::sync::OnceLock::new();

/// Writes `msg` to stderr and, with `--log`, to the log file.
pub fn log_error(msg: &str) {
    let _ = writeln!(std::io::stderr(), "rvmm-oci: error: {msg}");
    let Some((path, format)) = LOG.get() else {
        return;
    };
    let line = match format {
        LogFormat::Text => format!("{} error: {msg}\n", state::now_rfc3339()),
        LogFormat::Json => format!(
            "{}\n",
            serde_json::json!({"level": "error", "msg": msg, "time": state::now_rfc3339()})
        ),
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// An error and its causes as one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in std::iter::successors(Some(err), |e| e.source()) {
        let text = e.to_string();
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// This program again, with the same global options, for a keeper or a detached exec.
fn self_command(global: &Global, root: &Path) -> Result<std::process::Command, OciError> {
    let me = std::env::current_exe().map_err(OciError::Exe)?;
    let mut cmd = std::process::Command::new(me);
    cmd.arg("--root").arg(root);
    if let Some(log) = &global.log {
        cmd.arg("--log").arg(log);
        if global.log_format == LogFormat::Json {
            cmd.args(["--log-format", "json"]);
        }
    }
    if let Some(guest) = &global.guest {
        cmd.arg("--guest").arg(guest);
    }
    Ok(cmd)
}

/// Runs one command; the process exit status.
pub fn main(global: Global, command: OciCommand) -> u8 {
    if let Some(log) = &global.log {
        let _ = LOG.set((log.clone(), global.log_format));
    }
    let root = global.root.clone().unwrap_or_else(|| DEFAULT_ROOT.into());
    match run(&global, &root, command) {
        Ok(code) => code,
        Err(e) => {
            log_error(&error_chain(&e));
            1
        }
    }
}

fn run(global: &Global, root: &Path, command: OciCommand) -> Result<u8, OciError> {
    match command {
        OciCommand::Create {
            id,
            bundle,
            pid_file,
            console_socket,
        } => create(
            global,
            root,
            &id,
            &bundle,
            pid_file.as_deref(),
            console_socket,
        ),
        OciCommand::Start { id } => {
            let state = StateDir::new(root, &id)?;
            expect_status(&state, Status::Created, "created")?;
            control::send(&state.control_socket(), Request::Start)?;
            Ok(0)
        }
        OciCommand::State { id } => {
            let record = StateDir::new(root, &id)?.current()?;
            println!("{:#}", spec_state(&record));
            Ok(0)
        }
        OciCommand::Kill { id, signal } => kill(root, &id, &signal),
        OciCommand::Pause { id } => pause(root, &id, true),
        OciCommand::Resume { id } => pause(root, &id, false),
        OciCommand::Delete { id, force } => delete(root, &id, force),
        OciCommand::Ps { id, json } => {
            let record = StateDir::new(root, &id)?.current()?;
            let pids: Vec<i32> = (record.status != Status::Stopped)
                .then_some(record.pid)
                .into_iter()
                .collect();
            if json {
                println!("{}", serde_json::json!(pids));
            } else {
                println!("PID");
                pids.iter().for_each(|p| println!("{p}"));
            }
            Ok(0)
        }
        OciCommand::Exec(opts) => exec::exec(global, root, &opts),
        OciCommand::ExecAttached(opts) => {
            let ready = exec::ready_marker(root, &opts.id);
            exec::attach(root, &opts, ready.as_deref())
        }
        OciCommand::Features => {
            println!("{:#}", features());
            Ok(0)
        }
        OciCommand::Keeper {
            id,
            bundle,
            console_socket,
        } => Ok(keeper::keep(&KeeperOptions {
            state: StateDir::new(root, &id)?,
            bundle,
            guest: global.guest.clone(),
            console_socket,
        })),
    }
}

fn expect_status(state: &StateDir, want: Status, wanted: &'static str) -> Result<(), OciError> {
    let record = state.current()?;
    if record.status == want {
        return Ok(());
    }
    Err(OciError::WrongState {
        id: state.id.clone(),
        status: record.status,
        wanted,
    })
}

/// What this runtime supports (`runc features`).
fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false},
        },
        "annotations": {
            "io.github.rvmm.vm": "one microVM per container",
        },
    })
}
