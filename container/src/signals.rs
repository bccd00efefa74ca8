//! Signals by name, and the ones `rvmm run` and `rvmm exec` pass on to the container.

use std::io;

use rvmm_agent::protocol::Message;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;

use crate::session::AgentSender;
use crate::tty;

/// A signal by name (`SIGTERM`, `TERM`) or number.
pub fn parse_signal(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = name.strip_prefix("SIG").unwrap_or(name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    };
    Some(n)
}

/// Ctrl-C and friends go to the container, as they would to a local process; the VM itself
/// is in its own process group and does not see them. With `tty`, a resized terminal's new
/// size goes to the container's terminal.
pub fn forward_signals(sender: AgentSender, tty: bool) -> io::Result<()> {
    let mut forwarded = vec![SIGINT, SIGTERM, SIGHUP, SIGQUIT];
    if tty {
        forwarded.push(SIGWINCH);
    }
    let mut signals = Signals::new(forwarded)?;
    std::thread::spawn(move || {
        for signo in signals.forever() {
            let msg = match signo {
                SIGWINCH => Message::Resize(tty::stdin_size()),
                _ => Message::Signal(signo),
            };
            if sender.send(&msg).is_err() {
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("TERM"), Some(15));
        assert_eq!(parse_signal("KILL"), Some(9));
        assert_eq!(parse_signal("9"), Some(9));
        for bad in ["", "0", "65", "SIGNOPE", "-1"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }
}
