//! The keeper: the process whose pid `create` writes to the pid file. It boots the container's
//! microVM (rvmm as its child, which dies with it), waits for `start` on its control socket,
//! runs the container through the guest's agent with the stdio `create` was given, and exits
//! with the container's status (128+N for signal N), which is what conmon and containerd's
//! shim wait for. Killing it kills the VM.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rvmm_agent::protocol::{Message, RunRequest};
use rvmm_container::session::{exit_code, AgentSender, RunIo, Session};
use rvmm_container::vm::{GuestFiles, VmLaunch, VmProcess};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;

use crate::control::{self, Request};
use crate::network;
use crate::spec::{self, Plan};
use crate::state::{start_time, Record, StateDir, Status};
use crate::terminal::{size_of, HostTerminal};
use crate::OciError;

/// How long the guest may take to boot to its agent.
const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest may take to power off after the container ended.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// What the keeper is started with.
pub struct KeeperOptions {
    pub state: StateDir,
    pub bundle: PathBuf,
    /// The container guest; None: the cache's.
    pub guest: Option<PathBuf>,
    /// Where to send the terminal's master, for a container on a terminal.
    pub console_socket: Option<PathBuf>,
}

/// Runs the container to its end; the exit status. Failures before the container was
/// created are left in the state directory for `create` to report.
pub fn keep(opts: &KeeperOptions) -> u8 {
    match boot(opts) {
        Ok(Booted {
            vm,
            session,
            listener,
            plan,
            terminal,
        }) => serve(opts, vm, session, &listener, plan, terminal),
        Err(e) => {
            opts.state.set_error(&crate::error_chain(&e));
            1
        }
    }
}

struct Booted {
    vm: VmProcess,
    session: Session,
    listener: UnixListener,
    plan: Plan,
    terminal: Option<HostTerminal>,
}

/// The VM up to its agent's greeting, then the state `created`.
fn boot(opts: &KeeperOptions) -> Result<Booted, OciError> {
    let config = spec::load(&opts.bundle)?;
    let annotations = config["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    // First: a socket that cannot be made should not cost a boot.
    let listener = control::bind(&opts.state.control_socket()).map_err(OciError::ControlSocket)?;
    let netns = spec::network_namespace(&config);
    let network = match &netns {
        Some(path) => network::attach(path)?,
        None => None,
    };
    let wiring = spec::Wiring {
        console: opts.console_socket.is_some(),
        network: network.is_some(),
    };
    let mut plan = spec::plan(&opts.bundle, &opts.state.id, config, wiring)?;
    let guest = GuestFiles::find(opts.guest.as_deref())?;
    let vmm = rvmm_binary()?;
    let shares: Vec<String> = plan.shares.iter().map(spec::Share::option).collect();
    let nets: Vec<String> = network
        .iter()
        .map(|n| format!("tap={},mac={}", network::TAP, n.mac))
        .collect();
    let mut vm = VmProcess::start(&VmLaunch {
        vmm: &vmm,
        guest: &guest,
        image_disk: None,
        cpus: plan.cpus,
        memory_mib: plan.memory_mib,
        nets: &nets,
        publish: &[],
        shares: &shares,
        netns: netns.as_deref().filter(|_| network.is_some()),
        console_log: None,
        run_dir_in: None,
        balloon: false,
        balloon_stats: None,
    })?;
    plan.network = network.map(|mut n| {
        n.sysctls = std::mem::take(&mut plan.net_sysctls);
        n
    });
    let session = vm.connect(AGENT_TIMEOUT)?;
    let terminal = match &opts.console_socket {
        Some(socket) => Some(HostTerminal::send_to(socket)?),
        None => None,
    };
    let pid = std::process::id() as i32;
    opts.state.save(&Record {
        id: opts.state.id.clone(),
        bundle: opts.bundle.clone(),
        pid,
        start_time: start_time(pid),
        status: Status::Created,
        created: crate::state::now_rfc3339(),
        run_dir: Some(vm.run_dir().to_path_buf()),
        annotations,
    })?;
    Ok(Booted {
        vm,
        session,
        listener,
        plan,
        terminal,
    })
}

/// The rvmm binary that runs the VM: `$RVMM`, else the one beside this program.
fn rvmm_binary() -> Result<PathBuf, OciError> {
    if let Some(path) = std::env::var_os("RVMM") {
        return Ok(path.into());
    }
    let me = std::env::current_exe().map_err(OciError::Exe)?;
    let path = me.with_file_name("rvmm");
    if path.is_file() {
        Ok(path)
    } else {
        Err(OciError::NoRvmm(path))
    }
}

/// Waits for `start` (or a kill, or the VM's end), then runs the container to its end.
fn serve(
    opts: &KeeperOptions,
    mut vm: VmProcess,
    mut session: Session,
    listener: &UnixListener,
    plan: Plan,
    terminal: Option<HostTerminal>,
) -> u8 {
    if let Err(code) = wait_for_start(listener, &mut vm) {
        return code;
    }
    if let Ok(Some(mut record)) = opts.state.load() {
        record.status = Status::Running;
        let _ = opts.state.save(&record);
    }
    let sender = session.sender();
    let control = listener.try_clone().map(|l| {
        let sender = sender.clone();
        std::thread::spawn(move || serve_running(&l, &sender))
    });
    if control.is_err() {
        log::warn!("the control socket cannot serve kills");
    }
    if let Some(t) = &terminal {
        if let Err(e) = t.control() {
            log::warn!(
                "{}: window size changes will not reach the container",
                crate::error_chain(&e)
            );
        }
    }
    let pty = terminal.map(|t| t.pty);
    forward_signals(sender, pty.as_ref().and_then(|p| p.try_clone().ok()));
    let request = RunRequest {
        stdin: true,
        volumes: plan.volumes,
        spec: Some(plan.spec),
        terminal: pty.as_ref().map(size_of),
        network: plan.network,
        ..RunRequest::default()
    };
    let status = with_stdio(pty, |io| session.run(&request, io));
    let _ = std::fs::remove_file(opts.state.control_socket());
    match status {
        Ok(status) => {
            if session.shutdown().is_ok() {
                vm.finish(POWER_OFF_GRACE);
            }
            exit_code(status)
        }
        Err(e) => {
            crate::log_error(&format!(
                "container {}: {}",
                opts.state.id,
                crate::error_chain(&e)
            ));
            1
        }
    }
}

/// The container's stdio for `f`: this process's own, or the terminal.
pub(crate) fn with_stdio<T>(pty: Option<std::fs::File>, f: impl FnOnce(RunIo) -> T) -> T {
    let Some(pty) = pty else {
        return f(RunIo {
            stdin: Some(Box::new(io::stdin())),
            stdout: &mut io::stdout(),
            stderr: &mut io::stderr(),
        });
    };
    let (input, mut out, mut err) = (pty.try_clone(), &pty, &pty);
    f(RunIo {
        stdin: input.ok().map(|i| Box::new(i) as Box<dyn io::Read + Send>),
        stdout: &mut out,
        stderr: &mut err,
    })
}

/// Until `start`: Ok. A kill before it, or a VM that died: the status to exit with.
fn wait_for_start(listener: &UnixListener, vm: &mut VmProcess) -> Result<(), u8> {
    if listener.set_nonblocking(true).is_err() {
        return Err(1);
    }
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                match control::read_request(&stream) {
                    Some(Request::Start) => {
                        control::reply(&stream, Ok(()));
                        let _ = listener.set_nonblocking(false);
                        return Ok(());
                    }
                    // Never started: the VM goes with the keeper.
                    Some(Request::Kill(signo)) => {
                        control::reply(&stream, Ok(()));
                        return Err((128 + signo).clamp(0, 255) as u8);
                    }
                    None => control::reply(&stream, Err("unknown request".into())),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(1),
        }
        if let Some(how) = vm.ended() {
            crate::log_error(&format!("the VM ended before the container started: {how}"));
            return Err(1);
        }
        std::thread::sleep(POLL);
    }
}

/// After `start`: kills go to the container; a second start is refused.
fn serve_running(listener: &UnixListener, sender: &AgentSender) {
    for stream in listener.incoming().flatten() {
        let result = match control::read_request(&stream) {
            Some(Request::Kill(signo)) => sender
                .send(&Message::Signal(signo))
                .map_err(|e| format!("cannot reach the guest agent: {e}")),
            Some(Request::Start) => Err("the container has already been started".into()),
            None => Err("unknown request".into()),
        };
        control::reply(&stream, result);
    }
}

/// Signals sent to the keeper itself go to the container, as they would to runc's process;
/// with a terminal, SIGWINCH is its new size instead.
pub(crate) fn forward_signals(sender: AgentSender, pty: Option<std::fs::File>) {
    let wanted = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH];
    let Ok(mut signals) = Signals::new(wanted) else {
        log::warn!("cannot forward signals to the container");
        return;
    };
    std::thread::spawn(move || {
        for signo in signals.forever() {
            let msg = match &pty {
                Some(pty) if signo == SIGWINCH => Message::Resize(size_of(pty)),
                _ => Message::Signal(signo),
            };
            if sender.send(&msg).is_err() {
                return;
            }
        }
    });
}

/// A keeper whose container never started leaves its VM's run directory only when killed.
pub fn remove_run_dir(dir: &Path) {
    if dir.starts_with(std::env::temp_dir()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
