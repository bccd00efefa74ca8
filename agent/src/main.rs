//! rvmm-agent: PID 1 of the container-host guest. It prepares the guest (proc, sys, dev,
//! cgroup2, the read-only image disk), connects to the host over vsock, and runs each
//! requested command as an OCI container with crun, relaying stdio, signals and the exit
//! status. A shutdown request or a closed connection powers the guest off.

mod guest;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use rvmm_agent::bundle::{config_json, runtime_spec, BundleParams, PIDS_LIMIT, ROOTFS_DIR};
use rvmm_agent::protocol::{self, ExitStatus, Message, RunRequest, CHUNK};
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
    serve(conn);
    guest::power_off();
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
    stdin: Option<Sender<Option<Vec<u8>>>>,
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
            Message::Run(_) if running.is_some() => send(
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
            Message::Signal(signo) => {
                if let Some(r) = running.as_ref() {
                    let _ = Command::new(CRUN)
                        .args(["kill", &r.id, &signo.to_string()])
                        .status();
                }
            }
            Message::Shutdown => return,
            other => say!("unexpected message {other:?}"),
        }
    }
}

/// The overlay root (upper layer on the /run tmpfs) and config.json of one container.
fn make_bundle(req: &RunRequest, id: &str) -> Result<PathBuf, String> {
    let dir = Path::new(BUNDLES).join(id);
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

fn start(
    req: &RunRequest,
    seq: u32,
    writer: &Writer,
    current: &Arc<Mutex<Option<Running>>>,
) -> Result<Running, String> {
    let id = format!("c{seq}");
    let dir = make_bundle(req, &id)?;
    let mut child = Command::new(CRUN)
        .arg("run")
        .arg("--bundle")
        .arg(&dir)
        .arg(&id)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start crun: {e}"))?;
    let stdin = child.stdin.take().map(feed_stdin);
    let (writer, current, id2) = (writer.clone(), current.clone(), id.clone());
    thread::spawn(move || {
        let status = finish(child, &writer, &id2, &dir);
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        send(&writer, &Message::Exit(status));
    });
    Ok(Running { id, stdin })
}

/// A thread writing host stdin data to the container; `None` closes it.
fn feed_stdin(mut stdin: ChildStdin) -> Sender<Option<Vec<u8>>> {
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

/// Waits for the container and its output, then removes it and its bundle.
fn finish(mut child: Child, writer: &Writer, id: &str, dir: &Path) -> ExitStatus {
    let outputs: Vec<_> = [
        child.stdout.take().map(|o| {
            (
                Box::new(o) as Box<dyn Read + Send>,
                Message::Stdout as fn(_) -> _,
            )
        }),
        child.stderr.take().map(|e| {
            (
                Box::new(e) as Box<dyn Read + Send>,
                Message::Stderr as fn(_) -> _,
            )
        }),
    ]
    .into_iter()
    .flatten()
    .map(|(from, wrap)| {
        let writer = writer.clone();
        thread::spawn(move || relay(from, writer, wrap))
    })
    .collect();
    let status = child.wait();
    for t in outputs {
        let _ = t.join();
    }
    let _ = Command::new(CRUN).args(["delete", "-f", id]).status();
    guest::unmount(&dir.join(ROOTFS_DIR));
    let _ = std::fs::remove_dir_all(dir);
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
