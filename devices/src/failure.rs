//! A device whose host side is gone for good (a vhost-user backend that hung up) can never
//! serve its guest again. It reports that here, and the VMM stops the VM with the reason: a
//! guest left waiting forever on a filesystem whose daemon died helps nobody, and a container
//! runtime above rvmm needs a clear end to report.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Shared by the devices (which report) and the VMM's main thread (which waits on
/// [`DeviceFailure::event`]).
#[derive(Debug)]
pub struct DeviceFailure {
    evt: EventFd,
    reason: Mutex<Option<String>>,
}

impl DeviceFailure {
    pub fn new() -> io::Result<Self> {
        Ok(DeviceFailure {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records why the VM must stop and wakes the VMM; the first reason is the one kept.
    pub fn report(&self, reason: String) {
        let mut kept = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_none() {
            *kept = Some(reason);
        }
        // A full counter still wakes the waiter: nothing more to do on failure.
        let _ = self.evt.write(1);
    }

    /// Readable once a failure was reported.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }

    /// The first reason reported, if any.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_reason_and_signals() {
        let failure = DeviceFailure::new().unwrap();
        assert_eq!(failure.reason(), None);
        assert!(failure.event().read().is_err(), "not signalled yet");
        failure.report("first".into());
        failure.report("second".into());
        assert_eq!(failure.reason().as_deref(), Some("first"));
        assert_eq!(failure.event().read().unwrap(), 2);
    }
}
