//! Interrupt lines that devices raise towards the guest.

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Something that raises a guest interrupt.
pub trait Interrupt: Send + Sync {
    /// Asserts the interrupt (edge semantics: one call, one injection).
    fn trigger(&self) -> io::Result<()>;

    /// The eventfd KVM injects the interrupt from, when the line is one: another process may
    /// then raise it without a hop through rvmm.
    fn irqfd(&self) -> Option<&EventFd> {
        None
    }
}

/// An interrupt line backed by an EventFd that the VMM registers as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// Creates the line with a fresh non-blocking EventFd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The EventFd to hand to KVM as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }

    fn irqfd(&self) -> Option<&EventFd> {
        Some(&self.evt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_signals_the_eventfd() {
        let irq = EventFdInterrupt::new().unwrap();
        assert!(irq.eventfd().read().is_err(), "fresh eventfd must be idle");
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
    }
}
