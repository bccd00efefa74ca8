//! Device models for rvmm.
//!
//! Everything here runs on plain guest memory and file descriptors: this crate never talks to
//! KVM, so every device can be unit-tested without `/dev/kvm`. The VMM maps devices on a
//! [`bus::Bus`], turns their interrupt `EventFd`s into KVM irqfds and drives their host-side
//! work from one `event_manager::EventManager`.

pub mod bus;
pub mod failure;
pub mod interrupt;
pub mod legacy;
pub mod snapshot;
pub mod unix_socket;
pub mod virtio;

/// A kind of guest-triggerable (or host) problem that a device reports only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    // Every virtio device.
    ConfigWrite,
    Idle,
    Irq,
    Queue,
    RxQueue,
    TxQueue,
    Epoll,
    // Request and chain handling.
    Chain,
    RxChain,
    TxChain,
    Request,
    Io,
    Status,
    Memory,
    Output,
    Entropy,
    // virtio-net.
    Fit,
    Tap,
    Offload,
    // The vsock muxer.
    SrcCid,
    Packet,
    Connection,
    Stray,
    Limit,
    Timer,
    Accept,
    // The virtio-mmio transport and legacy devices.
    Access,
    State,
    Features,
    Activate,
    Signal,
    SleepType,
    Route,
}

/// Remembers which problems were already reported, so that a hostile or buggy guest cannot
/// flood the host log by repeating one.
#[derive(Debug, Default)]
pub(crate) struct LogOnce(u64);

impl LogOnce {
    /// True the first time for `problem` only.
    pub(crate) fn first(&mut self, problem: Problem) -> bool {
        let bit = 1u64 << problem as u32;
        let first = self.0 & bit == 0;
        self.0 |= bit;
        first
    }
}

/// `warn!` the first time `problem` comes up in the [`LogOnce`] `log`.
macro_rules! warn_once {
    ($log:expr, $problem:expr, $($arg:tt)+) => {
        if $log.first($problem) {
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use warn_once;

/// Formats an error with its chain of sources, for one-line log messages.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_problem_is_reported_once() {
        let mut log = LogOnce::default();
        assert!(log.first(Problem::Idle));
        assert!(!log.first(Problem::Idle));
        assert!(log.first(Problem::Route));
        assert!(!log.first(Problem::Route));
        assert!(!log.first(Problem::Idle));
    }
}
