//! The host side of the agent protocol: one connection from the guest's agent, serving run
//! requests one after another.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rvmm_agent::protocol::{
    self, ExecRequest, ExitStatus, Message, ProtocolError, RunRequest, CHUNK, EXEC_PORT,
};

/// How often a wait for the agent looks whether the VM is still there.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VM ended before its agent answered: {0}")]
    VmEnded(String),
    #[error("the guest agent sent {0} instead of a greeting")]
    NoHello(String),
    #[error("cannot start the command: {0}")]
    Failed(String),
    #[error("{0}")]
    Refused(String),
    #[error("lost the guest agent")]
    Protocol(#[source] ProtocolError),
    #[error("agent socket")]
    Socket(#[source] io::Error),
}

/// Where a run's output goes and where its input comes from.
pub struct RunIo<'a> {
    /// Sent to the command when given (the request must ask for stdin).
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// Sends messages to the agent from any thread, one whole frame at a time.
#[derive(Clone)]
pub struct AgentSender(Arc<Mutex<UnixStream>>);

impl AgentSender {
    pub fn send(&self, msg: &Message) -> Result<(), ProtocolError> {
        let mut stream = self.0.lock().unwrap_or_else(|p| p.into_inner());
        protocol::send(&mut *stream, msg)
    }
}

/// Returns when `listener` has a connection to accept or after `most`, whichever is first,
/// so a connection is taken at once rather than at the next poll.
fn wait_readable(listener: &UnixListener, most: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, with its count; the result only shortens the wait.
    unsafe { libc::poll(&mut fd, 1, most.as_millis() as libc::c_int) };
}

pub struct Session {
    reader: UnixStream,
    sender: AgentSender,
    pub agent: String,
}

impl Session {
    /// Waits until the agent connects to `listener` and greets, for at most `timeout`.
    /// `vm_ended` reports a VM that stopped meanwhile, so that is not waited out.
    pub fn accept(
        listener: &UnixListener,
        timeout: Duration,
        mut vm_ended: impl FnMut() -> Option<String>,
    ) -> Result<Session, SessionError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || SessionError::Timeout(timeout);
        listener
            .set_nonblocking(true)
            .map_err(SessionError::Socket)?;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SessionError::Socket(e)),
            }
            if let Some(why) = vm_ended() {
                return Err(SessionError::VmEnded(why));
            }
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            wait_readable(listener, ACCEPT_POLL);
        };
        stream
            .set_nonblocking(false)
            .map_err(SessionError::Socket)?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(SessionError::Socket)?;
        let mut reader = stream;
        let agent = match protocol::recv(&mut reader) {
            Ok(Message::Hello { agent }) => agent,
            Ok(other) => return Err(SessionError::NoHello(format!("{other:?}"))),
            Err(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(SessionError::Protocol(e)),
        };
        reader
            .set_read_timeout(None)
            .map_err(SessionError::Socket)?;
        let writer = reader.try_clone().map_err(SessionError::Socket)?;
        Ok(Session {
            reader,
            sender: AgentSender(Arc::new(Mutex::new(writer))),
            agent,
        })
    }

    /// How long a read from the agent may wait; None: for ever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), SessionError> {
        self.reader
            .set_read_timeout(timeout)
            .map_err(SessionError::Socket)
    }

    pub fn sender(&self) -> AgentSender {
        self.sender.clone()
    }

    /// Opens another session with the agent of a running VM: through the VM's vsock socket
    /// `uds` (Firecracker's `CONNECT` handshake) to the agent's exec port.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Session, SessionError> {
        let mut stream = UnixStream::connect(uds).map_err(SessionError::Socket)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(SessionError::Socket)?;
        stream
            .write_all(format!("CONNECT {EXEC_PORT}\n").as_bytes())
            .map_err(SessionError::Socket)?;
        // Byte by byte: what follows the line is the agent's.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') {
            match stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                Ok(_) => return Err(SessionError::VmEnded("the VM closed its socket".into())),
                Err(e) => return Err(SessionError::Socket(e)),
            }
        }
        if !line.starts_with(b"OK ") {
            let said = String::from_utf8_lossy(&line).trim().to_string();
            return Err(SessionError::NoHello(said));
        }
        let agent = match protocol::recv(&mut stream) {
            Ok(Message::Hello { agent }) => agent,
            Ok(other) => return Err(SessionError::NoHello(format!("{other:?}"))),
            Err(e) => return Err(SessionError::Protocol(e)),
        };
        stream
            .set_read_timeout(None)
            .map_err(SessionError::Socket)?;
        let writer = stream.try_clone().map_err(SessionError::Socket)?;
        Ok(Session {
            reader: stream,
            sender: AgentSender(Arc::new(Mutex::new(writer))),
            agent,
        })
    }

    /// Runs one command to its end, streaming its output as it comes.
    pub fn run(&mut self, req: &RunRequest, io: RunIo) -> Result<ExitStatus, SessionError> {
        self.drive(Message::Run(Box::new(req.clone())), io)
    }

    /// Runs another process in the VM's container to its end (`crun exec`).
    pub fn exec(&mut self, req: &ExecRequest, io: RunIo) -> Result<ExitStatus, SessionError> {
        self.drive(Message::Exec(Box::new(req.clone())), io)
    }

    fn drive(&mut self, start: Message, io: RunIo) -> Result<ExitStatus, SessionError> {
        self.sender.send(&start).map_err(SessionError::Protocol)?;
        if let Some(stdin) = io.stdin {
            let sender = self.sender.clone();
            thread::spawn(move || pump_stdin(stdin, &sender));
        }
        loop {
            let msg = protocol::recv(&mut self.reader).map_err(SessionError::Protocol)?;
            let written = match msg {
                Message::Stdout(data) => io.stdout.write_all(&data).and(io.stdout.flush()),
                Message::Stderr(data) => io.stderr.write_all(&data).and(io.stderr.flush()),
                Message::Exit(status) => return Ok(status),
                Message::Failed(why) => return Err(SessionError::Failed(why)),
                other => {
                    log::warn!("unexpected message from the agent: {other:?}");
                    Ok(())
                }
            };
            // A closed stdout (`rvmm run … | head`) must not stop the command's other stream.
            if let Err(e) = written {
                log::debug!("cannot write the command's output: {e}");
            }
        }
    }

    /// A request with one answer (a list, a kill, a detached run); `Failed` is an error.
    pub fn ask(&mut self, request: &Message) -> Result<Message, SessionError> {
        self.sender.send(request).map_err(SessionError::Protocol)?;
        match protocol::recv(&mut self.reader).map_err(SessionError::Protocol)? {
            Message::Failed(why) => Err(SessionError::Refused(why)),
            answer => Ok(answer),
        }
    }

    /// Asks the agent to power the guest off.
    pub fn shutdown(self) -> Result<(), SessionError> {
        self.sender
            .send(&Message::Shutdown)
            .map_err(SessionError::Protocol)
    }
}

/// Sends `stdin` to the agent in chunks, then closes the command's stdin.
fn pump_stdin(mut stdin: Box<dyn Read + Send>, sender: &AgentSender) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sender.send(&Message::Stdin(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = sender.send(&Message::StdinClose);
}

/// The shell convention: the code itself, or 128+N for signal N.
pub fn exit_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(code) => code.clamp(0, 255) as u8,
        ExitStatus::Signal(signo) => (128 + signo).clamp(0, 255) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    /// A fake agent on the other end of the listener: greets, then answers each run with
    /// the request's stdin echoed on stdout, "err" on stderr and exit code 7.
    fn fake_agent(path: std::path::PathBuf) -> thread::JoinHandle<Vec<Message>> {
        thread::spawn(move || {
            let mut s = UnixStream::connect(path).unwrap();
            protocol::send(
                &mut s,
                &Message::Hello {
                    agent: "fake".into(),
                },
            )
            .unwrap();
            let mut seen = Vec::new();
            loop {
                let msg = protocol::recv(&mut s).unwrap();
                seen.push(msg.clone());
                match msg {
                    Message::Stdin(data) => protocol::send(&mut s, &Message::Stdout(data)).unwrap(),
                    Message::StdinClose => {
                        protocol::send(&mut s, &Message::Stderr(b"err".to_vec())).unwrap();
                        protocol::send(&mut s, &Message::Exit(ExitStatus::Code(7))).unwrap();
                    }
                    Message::Shutdown => return seen,
                    _ => {}
                }
            }
        })
    }

    #[test]
    fn runs_requests_over_one_connection() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("sock_1024");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = fake_agent(path);
        let mut session = Session::accept(&listener, Duration::from_secs(10), || None).unwrap();
        assert_eq!(session.agent, "fake");
        for input in [&b"hello"[..], b"again"] {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let req = RunRequest {
                argv: vec!["cat".into()],
                stdin: true,
                ..RunRequest::default()
            };
            let status = session
                .run(
                    &req,
                    RunIo {
                        stdin: Some(Box::new(io::Cursor::new(input.to_vec()))),
                        stdout: &mut out,
                        stderr: &mut err,
                    },
                )
                .unwrap();
            assert_eq!(
                (status, out.as_slice(), err.as_slice()),
                (ExitStatus::Code(7), input, &b"err"[..])
            );
        }
        session.shutdown().unwrap();
        let seen = agent.join().unwrap();
        assert_eq!(
            seen.iter().filter(|m| matches!(m, Message::Run(_))).count(),
            2
        );
    }

    #[test]
    fn times_out_or_notices_the_vm_ending() {
        let dir = TempDir::new().unwrap();
        let listener = UnixListener::bind(dir.as_path().join("sock_1024")).unwrap();
        let err = Session::accept(&listener, Duration::from_millis(200), || None).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("the guest agent did not answer within 200ms")
        );
        let err = Session::accept(&listener, Duration::from_secs(60), || Some("exit 1".into()));
        assert!(matches!(err, Err(SessionError::VmEnded(_))));
    }

    #[test]
    fn a_silent_agent_times_out_too() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("sock_1024");
        let listener = UnixListener::bind(&path).unwrap();
        let _conn = UnixStream::connect(&path).unwrap();
        let err = Session::accept(&listener, Duration::from_millis(300), || None).err();
        assert!(matches!(err, Some(SessionError::Timeout(_))), "{err:?}");
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::Code(3)), 3);
        assert_eq!(exit_code(ExitStatus::Signal(9)), 137);
    }
}
