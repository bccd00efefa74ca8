//! Guest console output: written to stdout as it comes, and watched for the kernel's panic
//! line so that rvmm can repeat it when the guest reports a panic (pvpanic).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// What Linux's panic() prints first.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// Longer console lines are cut here for the watch (stdout still gets all of them).
const MAX_LINE: usize = 512;

/// The console bytes seen so far, as far as the panic line is concerned.
#[derive(Default)]
pub struct PanicWatch {
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    line: Vec<u8>,
    panic_line: Option<String>,
}

impl WatchState {
    /// Ends the current line; keeps it from the mark on (without the log's timestamp) if it
    /// is the first panic line.
    fn take_line(&mut self) {
        if self.panic_line.is_none() {
            if let Some(at) = find(&self.line, PANIC_MARK) {
                self.panic_line =
                    Some(String::from_utf8_lossy(&self.line[at..]).trim().to_string());
            }
        }
        self.line.clear();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl PanicWatch {
    pub fn feed(&self, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for &b in bytes {
            match b {
                b'\n' => state.take_line(),
                b'\r' => {}
                _ if state.line.len() < MAX_LINE => state.line.push(b),
                _ => {}
            }
        }
    }

    /// The first panic line, including one still missing its newline.
    pub fn panic_line(&self) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.take_line();
        state.panic_line.clone()
    }
}

/// Writes guest console bytes to stdout straight away (an interactive prompt has no newline
/// to flush a line buffer) and shows them to the panic watch.
pub struct ConsoleOut {
    watch: Arc<PanicWatch>,
}

impl ConsoleOut {
    pub fn new(watch: Arc<PanicWatch>) -> Self {
        Self { watch }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        let n = out.write(buf)?;
        out.flush()?;
        self.watch.feed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_panic_line_across_writes() {
        let watch = PanicWatch::default();
        watch.feed(b"[    1.0] Run /init as init process\r\n[    1.2] Kernel pan");
        watch.feed(b"ic - not syncing: Attempted to kill init! exitcode=0x00000000\r\n");
        watch.feed(b"[    1.3] Kernel panic - not syncing: second\r\n");
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000")
        );
    }

    #[test]
    fn an_unfinished_line_counts() {
        let watch = PanicWatch::default();
        watch.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs");
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: VFS: Unable to mount root fs")
        );
    }

    #[test]
    fn no_panic_no_line() {
        let watch = PanicWatch::default();
        watch.feed(b"RVMM-INIT uptime=1.2\n");
        watch.feed(&[b'x'; 4 * MAX_LINE]);
        assert_eq!(watch.panic_line(), None);
    }
}
