//! crun as the agent runs it: a container's process on pipes, on a terminal or detached, and
//! the relay of its output to the host until it ends.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::thread::{self, JoinHandle};

use rvmm_agent::protocol::{self, ExitStatus, Message, CHUNK};

use crate::{console, send, Writer};

/// A container's output: where it is read and how it is sent.
pub type Output = (Box<dyn Read + Send>, fn(Vec<u8>) -> Message);

/// A started crun and the container's ends.
pub struct Started {
    pub child: Child,
    pub stdin: Option<Box<dyn Write + Send>>,
    pub outputs: Vec<Output>,
    pub console: Option<File>,
}

pub fn start_on_pipes(mut crun: Command, id: &str, stdin: bool) -> Result<Started, String> {
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
pub fn start_on_terminal(
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
pub fn feed_stdin(mut stdin: Box<dyn Write + Send>) -> Sender<Option<Vec<u8>>> {
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

/// A container nobody is attached to: no stdin, and its output is dropped.
pub fn start_detached(mut crun: Command, id: &str) -> Result<Started, String> {
    let child = crun
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start crun: {e}"))?;
    Ok(Started {
        child,
        stdin: None,
        outputs: Vec::new(),
        console: None,
    })
}

/// Relays each output to the host on a thread of its own.
pub fn relay_all(outputs: Vec<Output>, writer: &Writer) -> Vec<JoinHandle<()>> {
    outputs
        .into_iter()
        .map(|(from, wrap)| {
            let writer = writer.clone();
            thread::spawn(move || relay(from, writer, wrap))
        })
        .collect()
}

/// Waits for crun and the relays of the container's output.
pub fn finish(mut child: Child, relays: Vec<JoinHandle<()>>) -> ExitStatus {
    let status = child.wait();
    for t in relays {
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
