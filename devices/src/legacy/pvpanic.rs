//! pvpanic: one I/O port through which a guest kernel reports that it panicked (QEMU's
//! `docs/specs/pvpanic.txt`; Linux's pvpanic driver, found through ACPI `QEMU0001`). A guest
//! booted with `panic=1` reboots a second later, which would look like a clean stop: this
//! tells the VMM it was not.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{warn_once, LogOnce, Problem};

/// Ports the device decodes.
pub const PVPANIC_PORT_LEN: u64 = 1;

/// The guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// A crash kernel is loaded and will take over (the guest goes on: not an end).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port; map it where the DSDT says.
pub struct Pvpanic {
    panic_evt: EventFd,
    warned: LogOnce,
}

impl Pvpanic {
    /// `panic_evt` is signalled when the guest reports a panic.
    pub fn new(panic_evt: EventFd) -> Self {
        Self {
            panic_evt,
            warned: LogOnce::default(),
        }
    }
}

impl BusDevice for Pvpanic {
    /// A read returns the events the device understands; the driver sends only those.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&events) = data.first() else { return };
        if events & PVPANIC_CRASH_LOADED != 0 {
            log::info!("pvpanic: the guest kernel crashed into its crash kernel");
        }
        if events & PVPANIC_PANICKED == 0 {
            return;
        }
        if let Err(e) = self.panic_evt.write(1) {
            warn_once!(
                self.warned,
                Problem::Signal,
                "pvpanic: cannot signal the guest's panic: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (Pvpanic, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (Pvpanic::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn read_offers_both_events() {
        let (mut dev, _evt) = device();
        let mut data = [0xffu8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [PVPANIC_PANICKED | PVPANIC_CRASH_LOADED, 0]);
    }

    #[test]
    fn panicked_signals() {
        let (mut dev, evt) = device();
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_writes_do_not_signal() {
        let (mut dev, evt) = device();
        for events in [0, PVPANIC_CRASH_LOADED, 0xfc] {
            dev.write(0, &[events]);
        }
        dev.write(0, &[]);
        assert!(evt.read().is_err());
    }
}
