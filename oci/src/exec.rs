//! `exec`: another process in a running container. It opens its own session with the guest's
//! agent through the VM's vsock socket and runs `crun exec` there, relaying stdio (or a
//! terminal) and exiting with the process's status. With `--detach`, as conmon and
//! containerd's shim call it, rvmm-oci starts itself as that process and returns once it
//! runs; the pid file names it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rvmm_agent::protocol::ExecRequest;
use rvmm_container::session::{exit_code, Session};
use serde_json::Value;

use crate::keeper::{forward_signals, with_stdio};
use crate::spec::SpecError;
use crate::state::{Record, StateDir, Status};
use crate::terminal::{size_of, HostTerminal};
use crate::{Global, OciError, POLL};

/// How long the agent may take to answer a new session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run, and how.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub id: String,
    pub process: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub detach: bool,
}

/// The process file, checked: JSON with arguments; whether it wants a terminal.
fn read_process(path: &Path) -> Result<(String, bool), OciError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read(path.into(), e))?;
    let process: Value =
        serde_json::from_str(&text).map_err(|e| SpecError::Json(path.into(), e))?;
    process["args"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or(SpecError::Missing("process.args"))?;
    Ok((text, process["terminal"].as_bool().unwrap_or(false)))
}

fn running(root: &Path, id: &str) -> Result<(StateDir, Record), OciError> {
    let state = StateDir::new(root, id)?;
    let record = state.current()?;
    if record.status != Status::Running {
        return Err(OciError::WrongState {
            id: id.into(),
            status: record.status,
            wanted: "running",
        });
    }
    Ok((state, record))
}

pub fn exec(global: &Global, root: &Path, opts: &ExecOptions) -> Result<u8, OciError> {
    let (state, _) = running(root, &opts.id)?;
    let (_, terminal) = read_process(&opts.process)?;
    if terminal && opts.console_socket.is_none() {
        return Err(SpecError::NoConsoleSocket.into());
    }
    if !opts.detach {
        return attach(root, opts, None);
    }
    let pid = start_detached(global, root, &state, opts)?;
    if let Some(path) = &opts.pid_file {
        std::fs::write(path, pid.to_string()).map_err(|e| OciError::PidFile(path.clone(), e))?;
    }
    Ok(0)
}

/// Runs the process to its end with this program's stdio; its status. `ready` is made once
/// the agent has the request.
pub fn attach(root: &Path, opts: &ExecOptions, ready: Option<&Path>) -> Result<u8, OciError> {
    let (_, record) = running(root, &opts.id)?;
    let (process, _) = read_process(&opts.process)?;
    let uds = record
        .run_dir
        .as_ref()
        .map(|d| d.join("vsock"))
        .ok_or_else(|| OciError::Keeper("the container's VM has no socket".into()))?;
    let mut session = Session::connect(&uds, CONNECT_TIMEOUT)
        .map_err(|e| OciError::Keeper(format!("cannot reach the guest agent: {e}")))?;
    let terminal = match &opts.console_socket {
        Some(socket) => Some(HostTerminal::send_to(socket)?),
        None => None,
    };
    if let Some(t) = &terminal {
        t.control()?;
    }
    let pty = terminal.map(|t| t.pty);
    forward_signals(
        session.sender(),
        pty.as_ref().and_then(|p| p.try_clone().ok()),
    );
    let request = ExecRequest {
        process,
        terminal: pty.as_ref().map(size_of),
        ..ExecRequest::default()
    };
    if let Some(ready) = ready {
        let _ = std::fs::write(ready, b"");
    }
    let status = with_stdio(pty, |io| session.exec(&request, io))
        .map_err(|e| OciError::Keeper(crate::error_chain(&e)))?;
    Ok(exit_code(status))
}

/// rvmm-oci again, attached, in the background; its pid once it runs.
fn start_detached(
    global: &Global,
    root: &Path,
    state: &StateDir,
    opts: &ExecOptions,
) -> Result<u32, OciError> {
    let mut cmd = crate::self_command(global, root)?;
    cmd.arg("exec-attached").arg("--process").arg(&opts.process);
    if let Some(socket) = &opts.console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    let mut child = cmd
        .arg(&opts.id)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(OciError::Spawn)?;
    let ready = state.dir.join(format!("exec-{}.ready", child.id()));
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if ready.exists() {
            let _ = std::fs::remove_file(&ready);
            return Ok(child.id());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(OciError::Keeper(format!(
                "exec ended before it ran: {status}"
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(OciError::Timeout(CONNECT_TIMEOUT));
        }
        std::thread::sleep(POLL);
    }
}

/// The marker [`attach`] makes for a detached exec of this process.
pub fn ready_marker(root: &Path, id: &str) -> Option<PathBuf> {
    let state = StateDir::new(root, id).ok()?;
    Some(state.dir.join(format!("exec-{}.ready", std::process::id())))
}
