//! The commands that use a shared VM: `rvmm vm start|stop|status|list`, `rvmm ps`,
//! `rvmm stop|kill`, and the lookups `rvmm run --vm` and `rvmm exec` start from. Each opens a
//! session of its own with the VM's agent.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rvmm_agent::protocol::{ContainerInfo, ExitStatus, Message};

use super::state::{state_base, VmDir, VmRecord};
use super::{keeper, SharedError, VmOptions};
use crate::network::Network;
use crate::session::Session;
use crate::vm::api_request;

/// How long a session with a running VM's agent may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the keeper may take to stop its VM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// `rvmm vm start`: the keeper in the background (or, with `foreground`, this process), back
/// when the VM's agent answered.
pub fn start(opts: &VmOptions) -> Result<(), SharedError> {
    if opts.foreground {
        return keeper::keep(opts);
    }
    let dir = VmDir::new(&state_base(), &opts.name)?;
    if dir.alive() {
        return Err(SharedError::VmRunning(opts.name.clone()));
    }
    std::fs::create_dir_all(&dir.path).map_err(|e| SharedError::State(dir.path.clone(), e))?;
    let log =
        File::create(dir.keeper_log()).map_err(|e| SharedError::State(dir.path.clone(), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| SharedError::State(dir.path.clone(), e))?;
    let mut cmd = keeper_command(opts)?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // SAFETY: setsid is async-signal-safe; the keeper leaves the caller's session, so the
    // terminal's hang-up or Ctrl-C does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut keeper = cmd.spawn().map_err(SharedError::Spawn)?;
    let deadline = Instant::now() + opts.agent_timeout + CONNECT_TIMEOUT;
    loop {
        if dir.record().is_some_and(|r| r.pid == keeper.id() as i32) {
            return Ok(());
        }
        if let Ok(Some(status)) = keeper.try_wait() {
            let why = last_error(&dir).unwrap_or_else(|| format!("its keeper ended ({status})"));
            return Err(SharedError::StartFailed {
                name: opts.name.clone(),
                why,
            });
        }
        if Instant::now() >= deadline {
            // SIGTERM: the keeper stops the VM and removes its state.
            // SAFETY: kill with our child's pid and a signal number.
            unsafe { libc::kill(keeper.id() as i32, libc::SIGTERM) };
            let _ = keeper.wait();
            let why = format!("the agent did not answer within {:?}", opts.agent_timeout);
            return Err(SharedError::StartFailed {
                name: opts.name.clone(),
                why,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// rvmm itself as the keeper of `opts`' VM.
fn keeper_command(opts: &VmOptions) -> Result<Command, SharedError> {
    let exe = std::env::current_exe().map_err(SharedError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.args(["vm", "start", "--foreground", "--name", &opts.name])
        .args(["--cpus", &opts.cpus.to_string()])
        .args(["--memory", &opts.memory_mib.to_string()])
        .args(["--agent-timeout", &opts.agent_timeout.as_secs().to_string()]);
    for publish in &opts.publish {
        cmd.arg("--publish").arg(publish);
    }
    if opts.network == Some(Network::None) {
        cmd.args(["--network", "none"]);
    }
    if let Some(guest) = &opts.guest {
        cmd.arg("--guest").arg(guest);
    }
    Ok(cmd)
}

/// The keeper log's last error line, without the program's prefix.
fn last_error(dir: &VmDir) -> Option<String> {
    let log = std::fs::read_to_string(dir.keeper_log()).ok()?;
    let line = log.lines().rfind(|l| !l.trim().is_empty())?;
    Some(line.trim_start_matches("rvmm: error: ").to_string())
}

/// `rvmm vm stop`: the keeper powers the guest off (SIGKILL after [`STOP_TIMEOUT`]).
pub fn stop(name: &str) -> Result<(), SharedError> {
    let dir = VmDir::new(&state_base(), name)?;
    let record = running(name)?;
    // SAFETY: kill with a pid and a signal number; the lock says the keeper still has it.
    unsafe { libc::kill(record.pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while dir.alive() {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(record.pid, libc::SIGKILL) };
            std::thread::sleep(POLL);
            dir.remove();
            break;
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The record of the running VM `name`.
pub fn running(name: &str) -> Result<VmRecord, SharedError> {
    let dir = VmDir::new(&state_base(), name)?;
    let record = dir.alive().then(|| dir.record()).flatten();
    record.ok_or_else(|| SharedError::NoVm(name.into()))
}

fn running_vms() -> Vec<VmRecord> {
    VmDir::all(&state_base())
        .iter()
        .filter(|d| d.alive())
        .filter_map(VmDir::record)
        .collect()
}

/// A new session with the agent of the VM `record` describes; a paused VM's agent cannot
/// answer.
pub fn connect(record: &VmRecord) -> Result<Session, SharedError> {
    if paused(record) {
        return Err(SharedError::Paused(record.name.clone()));
    }
    Ok(Session::connect(&record.vsock, CONNECT_TIMEOUT)?)
}

/// `rvmm vm pause` (true) or `resume` (false): the VM's vCPUs, and so its containers, stop or
/// go on; through rvmm's API socket beside the vsock socket.
pub fn pause(name: &str, pause: bool) -> Result<(), SharedError> {
    let record = running(name)?;
    api_request(run_dir(&record), if pause { "pause" } else { "resume" })?;
    Ok(())
}

fn run_dir(record: &VmRecord) -> &Path {
    record.vsock.parent().unwrap_or(Path::new("/"))
}

fn paused(record: &VmRecord) -> bool {
    api_request(run_dir(record), "status").is_ok_and(|reply| reply["state"] == "paused")
}

fn containers(record: &VmRecord) -> Result<Vec<ContainerInfo>, SharedError> {
    match connect(record)?.ask(&Message::List)? {
        Message::Containers(list) => Ok(list),
        other => Err(SharedError::Unexpected(format!("{other:?}"))),
    }
}

/// `rvmm vm status`: a few `key: value` lines.
pub fn status(name: &str) -> Result<String, SharedError> {
    let Ok(record) = running(name) else {
        return Ok(format!("name: {name}\nstatus: stopped\n"));
    };
    let paused = paused(&record);
    let list = if paused {
        Vec::new()
    } else {
        containers(&record)?
    };
    let live = list.iter().filter(|c| c.exit.is_none()).count();
    let mut out = String::new();
    let state = if paused { "paused" } else { "running" };
    let _ = writeln!(out, "name: {name}\nstatus: {state}");
    let _ = writeln!(out, "cpus: {}", record.cpus);
    let _ = writeln!(out, "memory: {} MiB", record.memory_mib);
    let _ = writeln!(out, "rss: {} MiB", rss_mib(record.vm_pid));
    let dir = VmDir::new(&state_base(), name)?;
    if let Some(guest) = guest_memory(&dir) {
        let _ = writeln!(out, "guest memory: {guest}");
    }
    let _ = writeln!(out, "uptime: {} s", now().saturating_sub(record.started));
    if !paused {
        let _ = writeln!(
            out,
            "containers: {live} running, {} exited",
            list.len() - live
        );
    }
    let _ = writeln!(out, "ports: {}", record.publish.join(" "));
    Ok(out)
}

/// `rvmm vm list`: one line per running VM.
pub fn list() -> String {
    let mut out = format!(
        "{:<16} {:<5} {:>10} {:>10}\n",
        "NAME", "CPUS", "MEMORY", "RSS"
    );
    for r in running_vms() {
        let memory = format!("{} MiB", r.memory_mib);
        let rss = format!("{} MiB", rss_mib(r.vm_pid));
        let _ = writeln!(out, "{:<16} {:<5} {memory:>10} {rss:>10}", r.name, r.cpus);
    }
    out
}

/// `rvmm ps`: the containers of one VM or of all.
pub fn ps(vm: Option<&str>) -> Result<String, SharedError> {
    let vms = match vm {
        Some(name) => vec![running(name)?],
        None => running_vms(),
    };
    let mut out = format!(
        "{:<16} {:<12} {:<20} {:<30} STATUS\n",
        "CONTAINER", "VM", "IMAGE", "COMMAND"
    );
    for record in vms {
        for c in containers(&record)? {
            let image = c.image.strip_suffix(".ext4").unwrap_or(&c.image);
            let image: String = image.replacen('-', ":", 1).chars().take(19).collect();
            let command: String = c.command.join(" ").chars().take(30).collect();
            let status = match c.exit {
                None => "running".to_string(),
                Some(ExitStatus::Code(code)) => format!("exited ({code})"),
                Some(ExitStatus::Signal(sig)) => format!("killed (signal {sig})"),
            };
            let _ = writeln!(
                out,
                "{:<16} {:<12} {image:<20} {command:<30} {status}",
                c.name, record.name
            );
        }
    }
    Ok(out)
}

/// The VM that runs the container `name`: `vm`, or the one running VM that has it.
pub fn find_container(vm: Option<&str>, name: &str) -> Result<VmRecord, SharedError> {
    let vms = match vm {
        Some(vm) => vec![running(vm)?],
        None => running_vms(),
    };
    let mut found = Vec::new();
    for record in vms {
        let list = containers(&record)?;
        if list.iter().any(|c| c.name == name && c.exit.is_none()) {
            found.push(record);
        }
    }
    match found.len() {
        0 => Err(SharedError::NoContainer(name.into())),
        1 => Ok(found.remove(0)),
        _ => Err(SharedError::Ambiguous {
            name: name.into(),
            vms: found
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `rvmm kill`: `signal` to the container `name`.
pub fn kill(vm: Option<&str>, name: &str, signal: i32) -> Result<(), SharedError> {
    let record = find_container(vm, name)?;
    send_kill(&record, name, signal)
}

fn send_kill(record: &VmRecord, name: &str, signal: i32) -> Result<(), SharedError> {
    let request = Message::Kill {
        name: name.into(),
        signal,
    };
    match connect(record)?.ask(&request)? {
        Message::Done => Ok(()),
        other => Err(SharedError::Unexpected(format!("{other:?}"))),
    }
}

/// `rvmm stop`: SIGTERM, then SIGKILL if the container is still running after `grace`.
pub fn stop_container(vm: Option<&str>, name: &str, grace: Duration) -> Result<(), SharedError> {
    let record = find_container(vm, name)?;
    send_kill(&record, name, libc::SIGTERM)?;
    let deadline = Instant::now() + grace;
    let running = |r: &VmRecord| -> Result<bool, SharedError> {
        Ok(containers(r)?
            .iter()
            .any(|c| c.name == name && c.exit.is_none()))
    };
    while running(&record)? {
        if Instant::now() >= deadline {
            // It may end by itself meanwhile; that is a stop too.
            let _ = send_kill(&record, name, libc::SIGKILL);
            break;
        }
        std::thread::sleep(POLL * 4);
    }
    Ok(())
}

/// The guest's own view of its memory, from the balloon's statistics.
fn guest_memory(dir: &VmDir) -> Option<String> {
    let text = std::fs::read_to_string(dir.balloon_stats()).ok()?;
    let stats: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let mib = |key: &str| stats[key].as_u64().map(|b| b >> 20);
    Some(format!(
        "{} MiB total, {} MiB available, {} MiB free, {} MiB caches",
        mib("total_memory")?,
        mib("available_memory")?,
        mib("free_memory")?,
        mib("disk_caches")?
    ))
}

/// The VmRSS of `pid` in MiB (0 when it cannot be read).
fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
