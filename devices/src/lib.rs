//! Device models for rvmm.
//!
//! Everything here runs on plain guest memory and file descriptors: this crate never talks to
//! KVM, so every device can be unit-tested without `/dev/kvm`. The VMM maps devices on a
//! [`bus::Bus`], turns their interrupt `EventFd`s into KVM irqfds and drives their host-side
//! work from one `event_manager::EventManager`.

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod virtio;

/// Remembers whether a guest-triggerable problem was already reported, so that a hostile or
/// buggy guest cannot flood the host log by repeating it.
#[derive(Debug, Default)]
pub(crate) struct LogOnce(bool);

impl LogOnce {
    /// True the first time only.
    pub(crate) fn first(&mut self) -> bool {
        !std::mem::replace(&mut self.0, true)
    }
}

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
