//! The console's terminal: raw mode for an interactive console, restored on every way out,
//! and the console's own handle on stdin.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::OnceLock;

/// The settings found at start, for [`restore_from_signal_handler`].
static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// While alive, stdin (when it is a terminal) passes every key to the guest unprocessed: no
/// line editing, no echo, and Ctrl-C goes to the guest rather than killing rvmm. The saved
/// settings come back on drop: normal exit, error return or unwinding.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawTerminal { saved: None };
        }
        let fd = stdin.as_raw_fd();
        // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is stdin and `saved` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return RawTerminal { saved: None };
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        // SAFETY: `fd` is stdin and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return RawTerminal { saved: None };
        }
        let _ = SAVED.set(saved);
        RawTerminal { saved: Some(saved) }
    }
}

/// Puts the terminal back as [`RawTerminal::enter`] found it, for a signal handler that ends
/// the process (no destructor runs then). Async-signal-safe: an atomic load and tcsetattr,
/// which is one ioctl.
pub fn restore_from_signal_handler() {
    if let Some(saved) = SAVED.get() {
        // SAFETY: restores settings read from stdin in `enter`; `saved` lives forever.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the settings read from this same descriptor in `enter`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, saved) };
        }
    }
}

/// A separate handle on stdin, owned by the console's input handler.
pub fn dup_stdin() -> std::io::Result<File> {
    // SAFETY: dup() of fd 0 has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::dup(std::io::stdin().as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}
