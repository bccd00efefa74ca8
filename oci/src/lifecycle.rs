//! `create`, `kill`, `delete`, `pause` and `resume`: the commands that start, end, stop and
//! resume a container's keeper and VM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use rvmm_container::signals::parse_signal;
use rvmm_container::vm::api_request;

use crate::control::{self, Request};
use crate::state::{keeper_alive, Record, StateDir, Status};
use crate::{spec, Global, OciError, CREATE_TIMEOUT, KILL_WAIT, POLL};

/// Checks the bundle, starts the keeper and waits until its VM is ready for `start`; the
/// pid file then names the keeper.
pub fn create(
    global: &Global,
    root: &Path,
    id: &str,
    bundle: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<PathBuf>,
) -> Result<u8, OciError> {
    let state = StateDir::new(root, id)?;
    let bundle = std::fs::canonicalize(bundle)
        .map_err(|e| spec::SpecError::Read(bundle.to_path_buf(), e))?;
    let config = spec::load(&bundle)?;
    // Refuses what the keeper would, before anything is started.
    let wiring = spec::Wiring {
        console: console_socket.is_some(),
        network: false,
    };
    spec::plan(&bundle, id, config, wiring)?;
    state.create()?;
    let result = start_keeper(global, root, &state, &bundle, console_socket.as_deref());
    let record = match result {
        Ok(record) => record,
        Err(e) => {
            let _ = state.remove();
            return Err(e);
        }
    };
    if let Some(path) = pid_file {
        std::fs::write(path, record.pid.to_string())
            .map_err(|e| OciError::PidFile(path.to_path_buf(), e))?;
    }
    Ok(0)
}

/// This program again as the keeper, with the same options and stdio; its record once it is
/// ready, or its error.
fn start_keeper(
    global: &Global,
    root: &Path,
    state: &StateDir,
    bundle: &Path,
    console_socket: Option<&Path>,
) -> Result<Record, OciError> {
    let mut cmd = crate::self_command(global, root)?;
    cmd.arg("keeper").arg("--bundle").arg(bundle);
    if let Some(socket) = console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    cmd.arg(&state.id)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut keeper = cmd.spawn().map_err(OciError::Spawn)?;
    let deadline = Instant::now() + CREATE_TIMEOUT;
    loop {
        if let Ok(Some(record)) = state.load() {
            return Ok(record);
        }
        if let Ok(Some(status)) = keeper.try_wait() {
            let why = state
                .error()
                .unwrap_or_else(|| format!("the keeper ended: {status}"));
            return Err(OciError::Keeper(why));
        }
        if Instant::now() > deadline {
            let _ = keeper.kill();
            let _ = keeper.wait();
            return Err(OciError::Timeout(CREATE_TIMEOUT));
        }
        std::thread::sleep(POLL);
    }
}

/// SIGKILL ends the keeper itself, and with it the VM, whatever the guest is doing; other
/// signals go to the container through the keeper.
pub fn kill(root: &Path, id: &str, signal: &str) -> Result<u8, OciError> {
    let signo = parse_signal(signal).ok_or_else(|| OciError::Signal(signal.into()))?;
    let state = StateDir::new(root, id)?;
    let record = state.current()?;
    if record.status == Status::Stopped {
        return Err(OciError::WrongState {
            id: id.into(),
            status: record.status,
            wanted: "created or running",
        });
    }
    if signo == libc::SIGKILL {
        kill_keeper(&record);
        return Ok(0);
    }
    control::send(&state.control_socket(), Request::Kill(signo))?;
    Ok(0)
}

/// `pause` (true) stops a running container's vCPUs; `resume` (false) lets a paused one go
/// on. Both through rvmm's API socket in the VM's run directory.
pub fn pause(root: &Path, id: &str, pause: bool) -> Result<u8, OciError> {
    let state = StateDir::new(root, id)?;
    let mut record = state.current()?;
    let (from, to, request, wanted) = if pause {
        (Status::Running, Status::Paused, "pause", "running")
    } else {
        (Status::Paused, Status::Running, "resume", "paused")
    };
    let run_dir = match &record.run_dir {
        Some(dir) if record.status == from => dir.clone(),
        _ => {
            return Err(OciError::WrongState {
                id: id.into(),
                status: record.status,
                wanted,
            })
        }
    };
    api_request(&run_dir, request)?;
    record.status = to;
    state.save(&record)?;
    Ok(0)
}

/// SIGKILLs the keeper and waits until it is gone.
fn kill_keeper(record: &Record) {
    // SAFETY: kill with a pid and a signal number; the start time was checked just before,
    // so the pid is the keeper's.
    unsafe { libc::kill(record.pid, libc::SIGKILL) };
    let deadline = Instant::now() + KILL_WAIT;
    while keeper_alive(record.pid, record.start_time) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

/// Removes a stopped or created container; a running or paused one only with `force`, after
/// killing it. `--force` on an unknown container succeeds, as cleanup is then done.
pub fn delete(root: &Path, id: &str, force: bool) -> Result<u8, OciError> {
    let state = StateDir::new(root, id)?;
    if force && !state.exists() {
        return Ok(0);
    }
    // A state directory without a record is a create that never finished.
    if let Some(record) = state.load()? {
        let record = state.current().unwrap_or(record);
        match record.status {
            Status::Running | Status::Paused if !force => return Err(OciError::Running(id.into())),
            Status::Stopped => {}
            _ => kill_keeper(&record),
        }
        if let Some(dir) = &record.run_dir {
            crate::keeper::remove_run_dir(dir);
        }
    }
    state.remove()?;
    Ok(0)
}
