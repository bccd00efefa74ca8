//! A container on a terminal: crun makes the pty inside the container and sends its master
//! over a Unix socket (`--console-socket`); the agent relays the master to the host and sets
//! its size when the host's terminal changes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use rvmm_agent::protocol::WindowSize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long crun may take to send the terminal.
const MASTER_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// The socket crun sends the master to, in the bundle directory.
pub fn listen(bundle: &Path) -> io::Result<(UnixListener, std::path::PathBuf)> {
    let path = bundle.join("console.sock");
    let listener = UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    Ok((listener, path))
}

/// The master crun sends; an error if crun ends or takes too long first.
pub fn receive_master(listener: &UnixListener, crun: &mut Child) -> Result<File, String> {
    let deadline = Instant::now() + MASTER_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("console socket: {e}")),
        }
        if let Ok(Some(status)) = crun.try_wait() {
            return Err(format!("crun ended before it made the terminal: {status}"));
        }
        if Instant::now() > deadline {
            return Err("crun did not send the terminal".into());
        }
        std::thread::sleep(POLL);
    };
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("console socket: {e}"))?;
    // crun sends the pty's name as data, with the master as SCM_RIGHTS.
    let mut name = [0u8; 256];
    match stream.recv_with_fd(&mut name) {
        Ok((_, Some(master))) => Ok(master),
        Ok((_, None)) => Err("crun sent no terminal".into()),
        Err(e) => Err(format!("cannot receive the terminal: {e}")),
    }
}

/// Sets the terminal's size; its foreground process gets SIGWINCH.
pub fn set_size(master: &File, size: WindowSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives through the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}
