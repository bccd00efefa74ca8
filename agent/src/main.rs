//! rvmm-agent: PID 1 of the container-host guest. It prepares the guest (proc, sys, dev,
//! cgroup2, the read-only image disk), connects to the host over vsock, and runs each
//! requested command as an OCI container with crun, relaying stdio, signals and the exit
//! status. A shutdown request or a closed connection powers the guest off.

mod console;
mod guest;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use rvmm_agent::bundle::{
    config_json, runtime_spec, volume_source, BundleParams, PIDS_LIMIT, ROOTFS_DIR,
};
use rvmm_agent::protocol::{self, ExecRequest, ExitStatus, Message, RunRequest, Volume, CHUNK};
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
    thread::spawn(serve_more_sessions);
    serve(conn);
    guest::power_off();
}

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
    let current: Arc<Mutex<Option<Running>>> = Arc::default();
    let mut seq = 0u32;
    loop {
        let msg = match protocol::recv(&mut reader) {
            Ok(msg) => msg,
            Err(protocol::ProtocolError::Closed) => return,
            Err(e) => return say!("{e}"),
        };
        let mut running = current.lock().unwrap_or_else(|p| p.into_inner());
        match msg {
            Message::Run(_) | Message::Exec(_) if running.is_some() => send(
                &writer,
                &Message::Failed("a command is already running".into()),
            ),
            Message::Run(req) => {
                seq += 1;
                match start(&req, seq, &writer, &current) {
                    Ok(r) => *running = Some(r),
                    Err(e) => send(&writer, &Message::Failed(e)),
                }
            }
            Message::Exec(req) => {
                seq += 1;
                match start_exec(&req, seq, &writer, &current) {
                    Ok(r) => *running = Some(r),
                    Err(e) => send(&writer, &Message::Failed(e)),
                }
            }
            Message::Stdin(data) => {
                if let Some(tx) = running.as_ref().and_then(|r| r.stdin.as_ref()) {
                    let _ = tx.send(Some(data));
                }
            }
            Message::StdinClose => {
                if let Some(r) = running.as_mut() {
                    r.stdin.take().map(|tx| tx.send(None));
                }
            }
            Message::Resize(size) => {
                if let Some(master) = running.as_ref().and_then(|r| r.console.as_ref()) {
                    console::set_size(master, size);
                }
            }
            Message::Signal(signo) => match running.as_ref() {
                Some(Running {
                    signal_pid: Some(pid),
                    ..
                }) => {
                    // SAFETY: kill with a pid and a signal number; the pid is our child's.
                    unsafe { libc::kill(*pid as i32, signo) };
                }
                Some(r) => {
                    let _ = Command::new(CRUN)
                        .args(["kill", &r.id, &signo.to_string()])
                        .status();
                }
                None => {}
            },
            Message::Shutdown => return,
            other => say!("unexpected message {other:?}"),
        }
    }
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
    if !guest::is_mount_point(Path::new(IMAGE_DIR)) {
        return Err("this VM has no image disk".into());
    }
    for sub in ["upper", "work", ROOTFS_DIR] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("bundle: {e}"))?;
    }
    let opts = format!(
        "lowerdir={IMAGE_DIR},upperdir={0}/upper,workdir={0}/work",
        dir.display()
    );
    guest::mount("overlay", &dir.join(ROOTFS_DIR), "overlay", 0, &opts)
        .map_err(|e| format!("cannot mount the container root: {e}"))?;
    let read = |f: &str| std::fs::read_to_string(Path::new(IMAGE_DIR).join(f)).unwrap_or_default();
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

/// A container's output: where it is read and how it is sent.
type Output = (Box<dyn Read + Send>, fn(Vec<u8>) -> Message);

/// The container of the main session, which exec sessions join.
static CONTAINER: Mutex<Option<String>> = Mutex::new(None);

fn start(
    req: &RunRequest,
    seq: u32,
    writer: &Writer,
    current: &Arc<Mutex<Option<Running>>>,
) -> Result<Running, String> {
    let id = format!("c{seq}");
    let dir = make_bundle(req, &id)?;
    let mut crun = Command::new(CRUN);
    crun.arg("run").arg("--bundle").arg(&dir);
    let started = match req.terminal {
        Some(size) => start_on_terminal(crun, &id, &dir, size)?,
        None => start_on_pipes(crun, &id, req.stdin)?,
    };
    *CONTAINER.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
    let cleanup_id = id.clone();
    let cleanup = move || {
        *CONTAINER.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = Command::new(CRUN)
            .args(["delete", "-f", &cleanup_id])
            .status();
        guest::unmount(&dir.join(ROOTFS_DIR));
        let _ = std::fs::remove_dir_all(&dir);
    };
    Ok(watch(started, id, None, writer, current, Box::new(cleanup)))
}

/// `crun exec` of the request's process in the main session's container.
fn start_exec(
    req: &ExecRequest,
    seq: u32,
    writer: &Writer,
    current: &Arc<Mutex<Option<Running>>>,
) -> Result<Running, String> {
    let container = CONTAINER.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let container = container.ok_or("no container is running")?;
    static EXECS: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(BUNDLES).join(format!(
        "exec-{}-{seq}",
        EXECS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("exec: {e}"))?;
    let process = dir.join("process.json");
    std::fs::write(&process, &req.process).map_err(|e| format!("process.json: {e}"))?;
    let mut crun = Command::new(CRUN);
    crun.arg("exec").arg("--process").arg(&process);
    let started = match req.terminal {
        Some(size) => start_on_terminal(crun, &container, &dir, size)?,
        None => start_on_pipes(crun, &container, true)?,
    };
    // Signals go to crun exec, whose child is the process.
    let pid = started.child.id();
    let cleanup = move || {
        let _ = std::fs::remove_dir_all(&dir);
    };
    Ok(watch(
        started,
        container,
        Some(pid),
        writer,
        current,
        Box::new(cleanup),
    ))
}

/// Relays a started crun's output until it ends, then cleans up and sends its status.
fn watch(
    started: Started,
    id: String,
    signal_pid: Option<u32>,
    writer: &Writer,
    current: &Arc<Mutex<Option<Running>>>,
    cleanup: Box<dyn FnOnce() + Send>,
) -> Running {
    let Started {
        child,
        stdin,
        outputs,
        console,
    } = started;
    let (writer, current) = (writer.clone(), current.clone());
    thread::spawn(move || {
        let status = finish(child, outputs, &writer);
        cleanup();
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        send(&writer, &Message::Exit(status));
    });
    Running {
        id,
        signal_pid,
        stdin: stdin.map(feed_stdin),
        console,
    }
}

/// A started crun and the container's ends.
struct Started {
    child: Child,
    stdin: Option<Box<dyn Write + Send>>,
    outputs: Vec<Output>,
    console: Option<File>,
}

fn start_on_pipes(mut crun: Command, id: &str, stdin: bool) -> Result<Started, String> {
    let mut child = crun
        .arg(id)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start crun: {e}"))?;
    let stdin = child
        .stdin
        .take()
        .map(|s| Box::new(s) as Box<dyn Write + Send>);
    let outputs = [
        child
            .stdout
            .take()
            .map(|o| (Box::new(o) as _, Message::Stdout as fn(_) -> _)),
        child
            .stderr
            .take()
            .map(|e| (Box::new(e) as _, Message::Stderr as fn(_) -> _)),
    ];
    Ok(Started {
        child,
        stdin,
        outputs: outputs.into_iter().flatten().collect(),
        console: None,
    })
}

/// crun with `--console-socket`: the container's stdio is the terminal, whose master the
/// agent relays; crun's own errors still come on its stderr.
fn start_on_terminal(
    mut crun: Command,
    id: &str,
    dir: &Path,
    size: protocol::WindowSize,
) -> Result<Started, String> {
    let (listener, socket) = console::listen(dir).map_err(|e| format!("console socket: {e}"))?;
    let mut child = crun
        .arg("--console-socket")
        .arg(&socket)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start crun: {e}"))?;
    let master = match console::receive_master(&listener, &mut child) {
        Ok(master) => master,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    console::set_size(&master, size);
    let clone = || master.try_clone().map_err(|e| format!("terminal: {e}"));
    let (input, output) = (clone()?, clone()?);
    let mut outputs: Vec<Output> = vec![(Box::new(output), Message::Stdout)];
    if let Some(e) = child.stderr.take() {
        outputs.push((Box::new(e), Message::Stderr));
    }
    Ok(Started {
        child,
        stdin: Some(Box::new(input)),
        outputs,
        console: Some(master),
    })
}

/// A thread writing host stdin data to the container; `None` closes it (a terminal stays
/// open: this is only one of the master's descriptors).
fn feed_stdin(mut stdin: Box<dyn Write + Send>) -> Sender<Option<Vec<u8>>> {
    let (tx, rx) = channel::<Option<Vec<u8>>>();
    thread::spawn(move || {
        while let Ok(Some(data)) = rx.recv() {
            if stdin.write_all(&data).is_err() {
                break;
            }
        }
    });
    tx
}

fn relay(mut from: impl Read + Send + 'static, writer: Writer, wrap: fn(Vec<u8>) -> Message) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => send(&writer, &wrap(buf[..n].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Waits for crun and the container's output.
fn finish(mut child: Child, outputs: Vec<Output>, writer: &Writer) -> ExitStatus {
    let outputs: Vec<_> = outputs
        .into_iter()
        .map(|(from, wrap)| {
            let writer = writer.clone();
            thread::spawn(move || relay(from, writer, wrap))
        })
        .collect();
    let status = child.wait();
    for t in outputs {
        let _ = t.join();
    }
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(code), _) => ExitStatus::Code(code),
                (None, Some(sig)) => ExitStatus::Signal(sig),
                (None, None) => ExitStatus::Code(255),
            }
        }
        Err(_) => ExitStatus::Code(255),
    }
}
