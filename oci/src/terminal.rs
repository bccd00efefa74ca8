//! `--console-socket`: the container's terminal as the caller sees it. The keeper opens a pty,
//! sends its master to the socket (conmon and containerd's shim receive it, as they do from
//! runc) and makes the other end its own controlling terminal: raw, since the guest's pty does
//! the line discipline, and the source of SIGWINCH when the caller resizes the master.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rvmm_agent::protocol::WindowSize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("cannot open a pty")]
    Open(#[source] io::Error),
    #[error("cannot send the terminal to the console socket {0}")]
    Send(String, #[source] io::Error),
    #[error("cannot set up the terminal")]
    Setup(#[source] io::Error),
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The keeper's end of the container's terminal.
pub struct HostTerminal {
    pub pty: File,
}

impl HostTerminal {
    /// Opens a pty and sends its master to `socket`.
    pub fn send_to(socket: &Path) -> Result<HostTerminal, TerminalError> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors; the name, termios and size are optional.
        check(unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        })
        .map_err(TerminalError::Open)?;
        // SAFETY: both descriptors are new and owned by nothing else.
        let (master, pty) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        let name = std::fs::read_link(format!("/proc/self/fd/{}", pty.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let failed = |e| TerminalError::Send(socket.display().to_string(), e);
        let stream = UnixStream::connect(socket).map_err(failed)?;
        stream
            .send_with_fd(name.as_bytes(), master.as_raw_fd())
            .map_err(|e| failed(io::Error::from_raw_os_error(e.errno())))?;
        let terminal = HostTerminal { pty };
        terminal.make_raw().map_err(TerminalError::Setup)?;
        Ok(terminal)
    }

    fn make_raw(&self) -> io::Result<()> {
        let fd = self.pty.as_raw_fd();
        // SAFETY: zero is a valid termios, filled by tcgetattr before use.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr/tcsetattr on a pty this struct owns, with a termios on the stack.
        unsafe {
            check(libc::tcgetattr(fd, &mut t))?;
            libc::cfmakeraw(&mut t);
            check(libc::tcsetattr(fd, libc::TCSANOW, &t))
        }
    }

    /// Makes this process a session leader with the pty as its controlling terminal, so that
    /// a resize of the master sends it SIGWINCH.
    pub fn control(&self) -> Result<(), TerminalError> {
        // SAFETY: setsid and TIOCSCTTY take no pointers.
        unsafe {
            check(libc::setsid()).map_err(TerminalError::Setup)?;
            check(libc::ioctl(self.pty.as_raw_fd(), libc::TIOCSCTTY, 0))
                .map_err(TerminalError::Setup)
        }
    }

    pub fn size(&self) -> WindowSize {
        size_of(&self.pty)
    }
}

/// The size of the terminal `file` is, 0×0 if unknown.
pub fn size_of(file: &File) -> WindowSize {
    // SAFETY: zero is a valid winsize, which TIOCGWINSZ fills.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize that lives through the call.
    unsafe { libc::ioctl(file.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn sends_the_master_and_keeps_a_raw_pty() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let terminal = HostTerminal::send_to(&path).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let mut name = [0u8; 64];
        let (n, master) = stream.recv_with_fd(&mut name).unwrap();
        assert!(std::str::from_utf8(&name[..n])
            .unwrap()
            .starts_with("/dev/pts/"));
        let mut master = master.unwrap();
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that lives through the call.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
        assert_eq!(
            terminal.size(),
            WindowSize {
                rows: 33,
                cols: 101
            }
        );
        // Raw: no echo, no newline translation.
        master.write_all(b"a\n").unwrap();
        let mut got = [0u8; 2];
        (&terminal.pty).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\n");
        (&terminal.pty).write_all(b"b\n").unwrap();
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"b\n");
    }
}
