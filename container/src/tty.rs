//! `rvmm run -t`: rvmm's own terminal while the container has one in the guest. The terminal
//! is raw (every key, Ctrl-C included, goes to the container as a byte; the guest's pty does the
//! line discipline and output processing), and comes back as it was on every way out: the
//! guard's drop runs on return, error and unwinding, and the signals that would end rvmm are
//! caught and forwarded to the container instead (see [`crate::run`]).

use std::io::{self, IsTerminal};
use std::os::fd::AsRawFd;

use rvmm_agent::protocol::WindowSize;

#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    #[error("-t: the input device is not a TTY")]
    NotATty,
    #[error("-t: cannot set up the terminal")]
    Setup(#[source] io::Error),
}

/// stdin's terminal in raw mode until dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin's terminal in raw mode; an error when stdin is not a terminal.
    pub fn enter() -> Result<RawTerminal, TtyError> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Err(TtyError::NotATty);
        }
        let fd = stdin.as_raw_fd();
        // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is stdin and `saved` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(TtyError::Setup(io::Error::last_os_error()));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only writes the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `fd` is stdin and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(TtyError::Setup(io::Error::last_os_error()));
        }
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from this same descriptor in `enter`.
        unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSADRAIN, &self.saved) };
    }
}

/// The size of the terminal on stdin; 0×0 when unknown.
pub fn stdin_size() -> WindowSize {
    // SAFETY: zero is a valid winsize, which TIOCGWINSZ fills.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize that lives through the call.
    unsafe { libc::ioctl(io::stdin().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    }
}
