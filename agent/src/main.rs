//! rvmm-agent: PID 1 of the container-host guest. It prepares the guest (proc, sys, dev,
//! cgroup2, the read-only image disk), connects to the host over vsock, and runs each
//! requested command as an OCI container with crun, relaying stdio, signals and the exit
//! status. A shutdown request or the first connection's end powers the guest off, unless the
//! host parked the agent to snapshot the VM (`Message::Park`): in each restored copy the
//! connection ends (vsock transport reset), the agent connects again, and the first request
//! gives it its clock, entropy and image disk (`Message::Resume`). In a shared
//! VM many containers run at once, each named (`registry`), from image disks on the VM's image
//! share.

mod console;
mod crun;
mod guest;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;

use crun::Started;
use rvmm_agent::bundle::{
    config_json, exec_process, runtime_spec, volume_source, BundleParams, PIDS_LIMIT, ROOTFS_DIR,
};
use rvmm_agent::protocol::{self, ExecRequest, ExitStatus, Message, RunRequest, Volume};
use rvmm_agent::registry::{NewContainer, Registry};
use rvmm_agent::user;

/// One line on the console. As PID 1 the agent must not die if the console cannot be written
/// (eprintln! panics on a write error, and PID 1 exiting panics the guest kernel).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), "rvmm-agent: {}", format_args!($($arg)*));
    }};
}

const CRUN: &str = "/usr/bin/crun";
const IMAGE_DIR: &str = "/mnt/image";
const BUNDLES: &str = "/run/rvmm";

type Writer = Arc<Mutex<File>>;

fn send(writer: &Writer, msg: &Message) {
    let mut out = writer.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = protocol::send(&mut *out, msg) {
        say!("cannot send to the host: {e}");
    }
}

fn main() {
    if std::process::id() != 1 {
        say!("must run as the guest's init (PID 1)");
        std::process::exit(1);
    }
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(e) => {
            say!("{e}");
            guest::power_off();
        }
    };
    // The host first: set-up mounts tmpfs on /tmp and /run, which would hide a `--unix`
    // socket there from a host test.
    let conn = match guest::connect_host(protocol::AGENT_PORT, opts.unix.as_deref()) {
        Ok(conn) => conn,
        Err(e) => {
            say!("cannot reach the host: {e}");
            guest::power_off();
        }
    };
    if let Err(e) = guest::setup(&opts.image_disk, IMAGE_DIR) {
        say!("guest setup failed: {e}");
        guest::power_off();
    }
    let _ = IMAGE.set(opts.image_disk);
    thread::spawn(serve_more_sessions);
    serve(conn);
    // Parked and snapshotted: in each restored copy the transport reset ended the connection
    // above, and the copy's host listens as at a boot.
    while PARKED.load(Ordering::SeqCst) {
        match guest::connect_host(protocol::AGENT_PORT, opts.unix.as_deref()) {
            Ok(conn) => serve(conn),
            Err(e) => {
                say!("cannot reach the host again: {e}");
                break;
            }
        }
    }
    guest::power_off();
}

/// The image disk, for a restored guest to mount once it has its image.
static IMAGE: OnceLock<PathBuf> = OnceLock::new();
/// Told [`Message::Park`]: the first connection's end does not power the guest off.
static PARKED: AtomicBool = AtomicBool::new(false);

/// Sessions the host opens later (`rvmm-oci exec`), each on its own thread; the guest's
/// life stays tied to the first.
fn serve_more_sessions() {
    let listener = match guest::listen_vsock(protocol::EXEC_PORT) {
        Ok(l) => l,
        Err(e) => return say!("cannot listen for exec sessions: {e}"),
    };
    loop {
        match guest::accept(&listener) {
            Ok(conn) => {
                thread::spawn(move || serve(conn));
            }
            Err(e) => return say!("exec sessions: {e}"),
        }
    }
}

/// Where the image and the host are; the defaults are the container guest's. The options
/// let a test run the agent in a PID and mount namespace on a host.
struct Options {
    image_disk: PathBuf,
    unix: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut opts = Options {
            image_disk: guest::IMAGE_DISK.into(),
            unix: None,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--image-disk" => opts.image_disk = value()?.into(),
                "--unix" => opts.unix = Some(value()?.into()),
                // The kernel hands init the command-line words it does not know itself.
                _ => say!("ignoring argument {arg:?}"),
            }
        }
        Ok(opts)
    }
}

/// What the host may still send to the running command.
struct Running {
    id: String,
    /// An exec's crun, which gets the signals instead of the container.
    signal_pid: Option<u32>,
    stdin: Option<Sender<Option<Vec<u8>>>>,
    /// The terminal's master, when the container has one.
    console: Option<File>,
}

/// The connection's running command, shared with the thread that waits for it.
type Current = Arc<Mutex<Option<Running>>>;

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(conn: File) {
    let mut reader = match conn.try_clone() {
        Ok(r) => r,
        Err(e) => return say!("{e}"),
    };
    let writer: Writer = Arc::new(Mutex::new(conn));
    send(
        &writer,
        &Message::Hello {
            agent: format!("rvmm-agent {}", env!("CARGO_PKG_VERSION")),
        },
    );
    let current: Current = Arc::default();
    loop {
        let msg = match protocol::recv(&mut reader) {
            Ok(msg) => msg,
            Err(protocol::ProtocolError::Closed) => return,
            // A restored copy: the transport reset ended the parked session, as expected.
            Err(protocol::ProtocolError::Io(_)) if PARKED.load(Ordering::SeqCst) => return,
            Err(e) => return say!("{e}"),
        };
        let mut running = current.lock().unwrap_or_else(|p| p.into_inner());
        let started = match msg {
            Message::Run(_) | Message::Exec(_) if running.is_some() => {
                Err("a command is already running".into())
            }
            Message::Run(req) => start(&req, &writer, &current),
            Message::Exec(req) => start_exec(&req, &writer, &current).map(Some),
            Message::List => {
                send(&writer, &Message::Containers(registry().list()));
                Ok(None)
            }
            Message::Kill { name, signal } => {
                let reply = kill(&name, signal).map_or_else(Message::Failed, |()| Message::Done);
                send(&writer, &reply);
                Ok(None)
            }
            Message::Shutdown if PARKED.load(Ordering::SeqCst) => guest::power_off(),
            Message::Shutdown => return,
            Message::Park => {
                PARKED.store(true, Ordering::SeqCst);
                // Parked either way: without the warm-up only the restored starts are slower.
                let reply = warm_up().map_or_else(Message::Failed, |()| Message::Done);
                send(&writer, &reply);
                Ok(None)
            }
            Message::Resume(req) => {
                let image = IMAGE.get().map_or(Path::new(guest::IMAGE_DISK), |p| p);
                let reply = guest::resume(&req, image, IMAGE_DIR)
                    .map_or_else(Message::Failed, |()| Message::Done);
                send(&writer, &reply);
                Ok(None)
            }
            other => {
                to_running(other, running.as_mut());
                Ok(None)
            }
        };
        match started {
            Ok(Some(r)) => *running = Some(r),
            Ok(None) => {}
            Err(e) => send(&writer, &Message::Failed(e)),
        }
    }
}

/// Stdin, a resize or a signal for the connection's running command.
fn to_running(msg: Message, running: Option<&mut Running>) {
    let Some(r) = running else {
        return;
    };
    match msg {
        Message::Stdin(data) => {
            if let Some(tx) = r.stdin.as_ref() {
                let _ = tx.send(Some(data));
            }
        }
        Message::StdinClose => {
            r.stdin.take().map(|tx| tx.send(None));
        }
        Message::Resize(size) => {
            if let Some(master) = r.console.as_ref() {
                console::set_size(master, size);
            }
        }
        Message::Signal(signo) => match r.signal_pid {
            Some(pid) => {
                // SAFETY: kill with a pid and a signal number; the pid is our child's.
                unsafe { libc::kill(pid as i32, signo) };
            }
            None => {
                let _ = crun_kill(&r.id, signo);
            }
        },
        other => say!("unexpected message {other:?}"),
    }
}

fn crun_kill(id: &str, signal: i32) -> Result<(), String> {
    let out = Command::new(CRUN)
        .args(["kill", id, &signal.to_string()])
        .output()
        .map_err(|e| format!("cannot run crun: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "crun kill {id}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// `Message::Kill`: a signal for a running container of the VM, by name.
fn kill(name: &str, signal: i32) -> Result<(), String> {
    let id = registry().running(Some(name)).map_err(|e| e.to_string())?;
    crun_kill(&id, signal)
}

/// Mounts each volume's virtio-fs tag where the bundle binds it from, once per VM: a later
/// request may name the same volume.
fn mount_volumes(volumes: &[Volume]) -> Result<(), String> {
    for volume in volumes {
        let target = PathBuf::from(volume_source(&volume.tag));
        if guest::is_mount_point(&target) {
            continue;
        }
        std::fs::create_dir_all(&target).map_err(|e| format!("volume {}: {e}", volume.tag))?;
        let flags = if volume.read_only { libc::MS_RDONLY } else { 0 };
        guest::mount(&volume.tag, &target, "virtiofs", flags, "").map_err(|e| {
            format!(
                "cannot mount the volume for {} (virtio-fs {}): {e}",
                volume.destination, volume.tag
            )
        })?;
    }
    Ok(())
}

/// The bundle of one container: the host's own config.json, whose root is a volume, or an
/// overlay root over the image disk (upper layer on the /run tmpfs) with a config.json made
/// from the request.
fn make_bundle(req: &RunRequest, id: &str) -> Result<PathBuf, String> {
    mount_volumes(&req.volumes)?;
    if let Some(net) = &req.network {
        // Once per VM: the addresses and route stay for later requests.
        static CONFIGURED: std::sync::Once = std::sync::Once::new();
        let mut result = Ok(());
        CONFIGURED.call_once(|| result = guest::configure_network(net));
        result?;
    }
    let dir = Path::new(BUNDLES).join(id);
    if let Some(spec) = &req.spec {
        std::fs::create_dir_all(&dir).map_err(|e| format!("bundle: {e}"))?;
        std::fs::write(dir.join("config.json"), spec).map_err(|e| format!("config.json: {e}"))?;
        return Ok(dir);
    }
    let lower = match &req.image {
        Some(file) => guest::image_root(file)?,
        None if guest::is_mount_point(Path::new(IMAGE_DIR)) => PathBuf::from(IMAGE_DIR),
        None => return Err("this VM has no image disk".into()),
    };
    overlay_bundle(req, id, &lower)
}

/// The bundle of container `id` whose root is an overlay over `lower`, with a config.json
/// made from the request.
fn overlay_bundle(req: &RunRequest, id: &str, lower: &Path) -> Result<PathBuf, String> {
    let dir = Path::new(BUNDLES).join(id);
    for sub in ["upper", "work", ROOTFS_DIR] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("bundle: {e}"))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={1}/upper,workdir={1}/work",
        lower.display(),
        dir.display()
    );
    guest::mount("overlay", &dir.join(ROOTFS_DIR), "overlay", 0, &opts)
        .map_err(|e| format!("cannot mount the container root: {e}"))?;
    let read = |f: &str| std::fs::read_to_string(lower.join(f)).unwrap_or_default();
    let who = user::resolve(&req.user, &read("etc/passwd"), &read("etc/group"))
        .map_err(|e| e.to_string())?;
    let cgroup = format!("/rvmm/{id}");
    let spec = runtime_spec(&BundleParams {
        request: req,
        user: &who,
        hostname: "rvmm",
        cgroup: &cgroup,
        pids_limit: guest::has_controller("pids").then_some(PIDS_LIMIT),
    })
    .map_err(|e| e.to_string())?;
    let json = config_json(&spec).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), json).map_err(|e| format!("config.json: {e}"))?;
    Ok(dir)
}

/// Runs one throwaway container on the guest's own root before the VM is snapshotted: crun,
/// its libraries and what a container start touches are then in the snapshot's memory, where
/// every restored copy finds them, instead of being read from the root disk by each.
fn warm_up() -> Result<(), String> {
    const ID: &str = "rvmm-warm-up";
    let req = RunRequest {
        argv: vec!["/bin/true".into()],
        cwd: "/".into(),
        ..RunRequest::default()
    };
    let dir = overlay_bundle(&req, ID, Path::new("/"))?;
    let status = Command::new(CRUN)
        .args(["run", "--bundle"])
        .arg(&dir)
        .arg(ID)
        .stdin(std::process::Stdio::null())
        .status();
    let _ = Command::new(CRUN).args(["delete", "-f", ID]).status();
    guest::unmount(&dir.join(ROOTFS_DIR));
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("crun ended with {s}")),
        Err(e) => Err(format!("cannot start crun: {e}")),
    }
}

/// Starts a run request's container: attached, the connection's running command; detached,
/// answered `Started` and left to run.
fn start(req: &RunRequest, writer: &Writer, current: &Current) -> Result<Option<Running>, String> {
    let name = registry()
        .claim(&NewContainer {
            name: req.name.as_deref(),
            image: req.image.as_deref().unwrap_or(""),
            command: &req.argv,
            detached: req.detach,
        })
        .map_err(|e| e.to_string())?;
    let started = launch(req, &name, writer, current);
    if started.is_err() {
        registry().forget(&name);
    }
    started
}

fn launch(
    req: &RunRequest,
    id: &str,
    writer: &Writer,
    current: &Current,
) -> Result<Option<Running>, String> {
    let dir = make_bundle(req, id)?;
    let mut crun = Command::new(CRUN);
    crun.arg("run").arg("--bundle").arg(&dir);
    let started = match req.terminal {
        _ if req.detach => crun::start_detached(crun, id)?,
        Some(size) => crun::start_on_terminal(crun, id, &dir, size)?,
        None => crun::start_on_pipes(crun, id, req.stdin)?,
    };
    let cleanup_id = id.to_string();
    let cleanup = move |status| {
        let _ = Command::new(CRUN)
            .args(["delete", "-f", &cleanup_id])
            .status();
        guest::unmount(&dir.join(ROOTFS_DIR));
        let _ = std::fs::remove_dir_all(&dir);
        registry().ended(&cleanup_id, status);
    };
    let attach = (!req.detach).then_some((writer, current));
    let running = watch(started, id.into(), None, attach, Box::new(cleanup));
    if req.detach {
        send(writer, &Message::Started(id.into()));
        return Ok(None);
    }
    Ok(Some(running))
}

/// `crun exec` of the request's process in the named container, or the only one.
fn start_exec(req: &ExecRequest, writer: &Writer, current: &Current) -> Result<Running, String> {
    let container = registry()
        .running(req.container.as_deref())
        .map_err(|e| e.to_string())?;
    static EXECS: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(BUNDLES).join(format!("exec-{}", EXECS.fetch_add(1, Ordering::Relaxed)));
    let process_json = if req.process.is_empty() {
        let config = Path::new(BUNDLES).join(&container).join("config.json");
        let config =
            std::fs::read_to_string(&config).map_err(|e| format!("{}: {e}", config.display()))?;
        exec_process(&config, &req.argv, req.terminal.is_some()).map_err(|e| e.to_string())?
    } else {
        req.process.clone()
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("exec: {e}"))?;
    let process = dir.join("process.json");
    std::fs::write(&process, process_json).map_err(|e| format!("process.json: {e}"))?;
    let mut crun = Command::new(CRUN);
    crun.arg("exec").arg("--process").arg(&process);
    let started = match req.terminal {
        Some(size) => crun::start_on_terminal(crun, &container, &dir, size)?,
        None => crun::start_on_pipes(crun, &container, true)?,
    };
    // Signals go to crun exec, whose child is the process.
    let pid = started.child.id();
    let cleanup = move |_| {
        let _ = std::fs::remove_dir_all(&dir);
    };
    Ok(watch(
        started,
        container,
        Some(pid),
        Some((writer, current)),
        Box::new(cleanup),
    ))
}

/// Relays a started crun's output until it ends, then cleans up and, when a connection is
/// attached, sends it the status.
fn watch(
    started: Started,
    id: String,
    signal_pid: Option<u32>,
    attach: Option<(&Writer, &Current)>,
    cleanup: Box<dyn FnOnce(ExitStatus) + Send>,
) -> Running {
    let Started {
        child,
        stdin,
        outputs,
        console,
    } = started;
    let attach = attach.map(|(w, c)| (w.clone(), c.clone()));
    let relays = match &attach {
        Some((writer, _)) => crun::relay_all(outputs, writer),
        None => Vec::new(),
    };
    thread::spawn(move || {
        let status = crun::finish(child, relays);
        cleanup(status);
        if let Some((writer, current)) = attach {
            *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            send(&writer, &Message::Exit(status));
        }
    });
    Running {
        id,
        signal_pid,
        stdin: stdin.map(crun::feed_stdin),
        console,
    }
}
