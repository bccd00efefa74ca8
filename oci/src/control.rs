//! The keeper's control socket: one request line per connection, one reply line. `start`
//! lets the container's process run; `kill N` delivers signal N to it.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// How long a command waits for the keeper to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the container's VM keeper")]
    Connect(#[source] std::io::Error),
    #[error("the container's VM keeper did not answer")]
    Reply(#[source] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// What a command asks the keeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Start,
    Kill(i32),
}

impl Request {
    pub fn parse(line: &str) -> Option<Request> {
        let mut words = line.split_whitespace();
        let request = match (words.next()?, words.next()) {
            ("start", None) => Request::Start,
            ("kill", Some(n)) => Request::Kill(n.parse().ok()?),
            _ => return None,
        };
        words.next().is_none().then_some(request)
    }

    fn line(self) -> String {
        match self {
            Request::Start => "start\n".into(),
            Request::Kill(n) => format!("kill {n}\n"),
        }
    }
}

/// Calls `f` with a path to `socket` short enough for a socket address: the state directory
/// of a 64-digit id under Docker's root passes the 107 bytes a Unix socket path may have, so
/// the directory is reached through a descriptor of it instead.
fn via_short_path<T>(socket: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    let name = socket.file_name().unwrap_or_default();
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    f(&Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

/// The keeper's listener on `socket`.
pub fn bind(socket: &Path) -> io::Result<UnixListener> {
    via_short_path(socket, |p| UnixListener::bind(p))
}

/// Sends `request` to the keeper listening on `socket` and waits for its answer.
pub fn send(socket: &Path, request: Request) -> Result<(), ControlError> {
    let mut stream =
        via_short_path(socket, |p| UnixStream::connect(p)).map_err(ControlError::Connect)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(ControlError::Reply)?;
    stream
        .write_all(request.line().as_bytes())
        .map_err(ControlError::Reply)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(ControlError::Reply)?;
    match reply.trim_end().strip_prefix("error ") {
        None if reply.trim_end() == "ok" => Ok(()),
        None => Err(ControlError::Reply(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("answer {reply:?}"),
        ))),
        Some(why) => Err(ControlError::Refused(why.into())),
    }
}

/// Reads one request from a connection; the caller answers with [`reply`].
pub fn read_request(stream: &UnixStream) -> Option<Request> {
    let mut line = String::new();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
    BufReader::new(stream).read_line(&mut line).ok()?;
    Request::parse(&line)
}

pub fn reply(mut stream: &UnixStream, result: Result<(), String>) {
    let line = match result {
        Ok(()) => "ok\n".to_string(),
        Err(why) => format!("error {}\n", why.replace('\n', " ")),
    };
    let _ = stream.write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn parses_requests() {
        assert_eq!(Request::parse("start\n"), Some(Request::Start));
        assert_eq!(Request::parse("kill 15\n"), Some(Request::Kill(15)));
        for bad in ["", "stop", "kill", "kill x", "start now", "kill 9 9"] {
            assert_eq!(Request::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_over_a_socket() {
        let tmp = TempDir::new().unwrap();
        // Deeper than a socket address could name directly.
        let dir = tmp.as_path().join("d".repeat(100));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [Ok(()), Err("already started".to_string())] {
                let (stream, _) = listener.accept().unwrap();
                seen.push(read_request(&stream));
                reply(&stream, answer);
            }
            seen
        });
        send(&path, Request::Kill(9)).unwrap();
        let err = send(&path, Request::Start).unwrap_err();
        assert_eq!(err.to_string(), "already started");
        assert_eq!(
            server.join().unwrap(),
            [Some(Request::Kill(9)), Some(Request::Start)]
        );
        assert!(matches!(
            send(&dir.join("none"), Request::Start),
            Err(ControlError::Connect(_))
        ));
    }
}
