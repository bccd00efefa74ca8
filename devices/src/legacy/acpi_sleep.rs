//! The ACPI sleep control and status registers of a hardware-reduced platform (ACPI 6.5,
//! 4.8.3.7-8): one byte in I/O space through which the guest enters a sleep state. Only S5
//! (soft off) is offered, and entering it ends the VM: a guest `poweroff` becomes a normal
//! exit of the VMM.

use log::info;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{warn_once, LogOnce, Problem};

/// Ports the register pair decodes (control and status share one byte).
pub const ACPI_SLEEP_PORT_LEN: u64 = 1;

/// SLP_EN: write with a sleep type to enter that state.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The sleep registers; map them at the port the FADT names.
pub struct AcpiSleep {
    s5_type: u8,
    poweroff_evt: EventFd,
    warned: LogOnce,
}

impl AcpiSleep {
    /// `s5_type` is the SLP_TYP the DSDT's `_S5_` package gives; `poweroff_evt` is signalled
    /// when the guest enters it.
    pub fn new(s5_type: u8, poweroff_evt: EventFd) -> Self {
        Self {
            s5_type,
            poweroff_evt,
            warned: LogOnce::default(),
        }
    }
}

impl BusDevice for AcpiSleep {
    /// The status register never reports WAK_STS: a VM that entered S5 does not come back.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Writes without SLP_EN (such as Linux clearing WAK_STS first) change nothing.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type != self.s5_type {
            warn_once!(
                self.warned,
                Problem::SleepType,
                "acpi: guest asked for sleep type {sleep_type}, only S5 is offered"
            );
            return;
        }
        info!("guest powered off (ACPI S5)");
        if let Err(e) = self.poweroff_evt.write(1) {
            warn_once!(
                self.warned,
                Problem::Signal,
                "acpi: cannot signal the power-off: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const S5: u8 = 5;

    fn device() -> (AcpiSleep, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (AcpiSleep::new(S5, evt.try_clone().unwrap()), evt)
    }

    fn signalled(evt: &EventFd) -> bool {
        evt.read().is_ok()
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, evt) = device();
        // What Linux's acpi_hw_extended_sleep() writes: clear WAK_STS, then SLP_TYP | SLP_EN.
        dev.write(0, &[0x80]);
        assert!(!signalled(&evt));
        dev.write(0, &[(S5 << 2) | SLP_EN]);
        assert!(signalled(&evt));
    }

    #[test]
    fn other_writes_do_nothing() {
        let (mut dev, evt) = device();
        for value in [S5 << 2, (3 << 2) | SLP_EN, SLP_EN, !SLP_EN] {
            dev.write(0, &[value]);
        }
        dev.write(0, &[]);
        assert!(!signalled(&evt));
    }

    #[test]
    fn status_reads_zero() {
        let (mut dev, _evt) = device();
        let mut data = [0xffu8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
