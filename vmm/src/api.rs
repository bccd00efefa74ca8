//! The control socket of a running VM (`--api-socket PATH`): one JSON request per line, one
//! JSON reply per line. Requests: `{"request":"status"}`, `"pause"`, `"resume"`, `"shutdown"`,
//! and `{"request":"snapshot","dir":DIR}` of a paused VM.
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`; a bad request gets an error
//! reply and the VM runs on.
//!
//! The main thread serves one connection at a time between its waits for the VM's end, so a
//! connection that sends nothing for [`IDLE_LIMIT`] is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rvmm_devices::unix_socket::{listen_at, ListenError};
use serde::Deserialize;
use serde_json::json;

/// How long a connection may stay silent before it is closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(2);
/// How long the main thread waits after a failed accept before it looks again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest request line; a longer one gets an error reply and the connection is closed.
const MAX_LINE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket")]
    Listen(#[source] ListenError),
}

/// A request line: `{"request": NAME}` with the request's own fields and nothing else.
#[derive(Debug, Deserialize, PartialEq, Eq)]
// Empty struct variants, not unit ones: serde lets unit variants of a tagged enum take any
// other field.
#[serde(tag = "request", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status {},
    Pause {},
    Resume {},
    Shutdown {},
    Snapshot { dir: PathBuf },
}

/// Whether the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// What the requests act on: the running VM, or a fake in tests.
pub trait VmControl {
    fn state(&self) -> RunState;
    /// Stops every vCPU outside the guest; the devices keep serving what is in flight.
    fn pause(&mut self) -> Result<(), String>;
    fn resume(&mut self) -> Result<(), String>;
    /// vCPU count and memory size, for `status`.
    fn shape(&self) -> (u8, u64);
    /// Writes a snapshot of the paused VM into `dir`.
    fn snapshot(&mut self, dir: &Path) -> Result<(), String>;
}

/// What serving a request line asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Send the reply; the VM goes on.
    Reply(String),
    /// Send the reply, then end the VM.
    Shutdown(String),
}

/// Serves one request line.
pub fn handle_line(line: &str, vm: &mut dyn VmControl) -> Served {
    let request = match serde_json::from_str::<Request>(line.trim()) {
        Ok(r) => r,
        Err(e) => return Served::Reply(error_reply(&format!("bad request: {e}"))),
    };
    let done = |result: Result<(), String>, vm: &dyn VmControl| match result {
        Ok(()) => json!({"ok": true, "state": vm.state().name()}).to_string(),
        Err(e) => error_reply(&e),
    };
    match request {
        Request::Status {} => {
            let (vcpus, memory_mib) = vm.shape();
            let reply = json!({
                "ok": true,
                "state": vm.state().name(),
                "vcpus": vcpus,
                "memory_mib": memory_mib,
            });
            Served::Reply(reply.to_string())
        }
        Request::Pause {} if vm.state() == RunState::Paused => {
            Served::Reply(error_reply("the VM is paused already"))
        }
        Request::Pause {} => {
            let result = vm.pause();
            Served::Reply(done(result, vm))
        }
        Request::Resume {} if vm.state() == RunState::Running => {
            Served::Reply(error_reply("the VM is running"))
        }
        Request::Resume {} => {
            let result = vm.resume();
            Served::Reply(done(result, vm))
        }
        Request::Snapshot { .. } if vm.state() == RunState::Running => {
            Served::Reply(error_reply("pause the VM before a snapshot"))
        }
        Request::Snapshot { dir } => {
            let result = vm.snapshot(&dir);
            Served::Reply(done(result, vm))
        }
        Request::Shutdown {} => {
            Served::Shutdown(json!({"ok": true, "state": "shutdown"}).to_string())
        }
    }
}

fn error_reply(message: &str) -> String {
    json!({"ok": false, "error": message}).to_string()
}

/// The listening socket; its file is removed when this is dropped, if it is still ours.
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl ApiSocket {
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let listener = listen_at(path).map_err(ApiError::Listen)?;
        Ok(ApiSocket {
            listener,
            path: path.to_owned(),
            id: file_id(path),
        })
    }

    /// Serves the connections waiting to be accepted, one after another; true when one asked
    /// for a shutdown.
    pub fn serve(&self, vm: &mut dyn VmControl) -> bool {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => match serve_connection(stream, vm) {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(e) => log::debug!("API connection: {e}"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // Out of descriptors and the like: the connection stays pending and the
                    // listener readable, so a pause keeps the main thread from spinning.
                    log::warn!("API socket: cannot accept a connection: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return false;
                }
            }
        }
    }
}

impl AsRawFd for ApiSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Request lines until the client closes, goes silent, sends too long a line, or asks for a
/// shutdown (true).
fn serve_connection(stream: UnixStream, vm: &mut dyn VmControl) -> std::io::Result<bool> {
    // (An accepted socket does not inherit the listener's O_NONBLOCK.)
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    stream.set_write_timeout(Some(IDLE_LIMIT))?;
    let mut out = &stream;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(false);
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            writeln!(out, "{}", error_reply("request line too long"))?;
            return Ok(false);
        }
        match handle_line(&String::from_utf8_lossy(&line), vm) {
            Served::Reply(reply) => writeln!(out, "{reply}")?,
            Served::Shutdown(reply) => {
                // The VM ends whether or not the client reads its reply.
                let _ = writeln!(out, "{reply}");
                return Ok(true);
            }
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests;
