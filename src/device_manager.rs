//! Attaches device models to the buses, their interrupts to KVM and their event handlers to
//! the device event loop.

use std::io::Write;
use std::sync::{Arc, Mutex};

use rvmm_devices::bus::{Bus, BusError};
use rvmm_devices::legacy::i8042::I8042;
use rvmm_devices::legacy::serial::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::ConsoleKind;
use crate::vstate::vm::{Vm, VmError};

/// PC I/O ports and the IO-APIC pin of COM1.
const COM1_PORT: u64 = 0x3f8;
const COM1_PORT_COUNT: u64 = 8;
const COM1_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_COUNT: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error("cannot wire a device interrupt")]
    Interrupt(#[source] VmError),
}

/// The legacy PC devices every guest gets.
pub struct LegacyDevices {
    /// COM1, when the console is the serial port.
    pub serial: Option<Arc<Mutex<Serial>>>,
    /// Signalled when the guest pulses the i8042 reset line.
    pub reset_evt: EventFd,
}

/// Writes guest console bytes to stdout straight away: an interactive prompt has no newline
/// to flush a line buffer.
struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        let n = out.write(buf)?;
        out.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

pub fn attach_legacy(
    vm: &Vm,
    pio: &mut Bus,
    console: ConsoleKind,
) -> Result<LegacyDevices, DeviceError> {
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    let i8042_reset = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(i8042_reset))),
        I8042_PORT,
        I8042_PORT_COUNT,
    )
    .map_err(DeviceError::Bus)?;

    let serial = match console {
        ConsoleKind::Serial => {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            vm.register_irqfd(&irq, COM1_IRQ)
                .map_err(DeviceError::Interrupt)?;
            let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(ConsoleOut))));
            pio.insert(serial.clone(), COM1_PORT, COM1_PORT_COUNT)
                .map_err(DeviceError::Bus)?;
            Some(serial)
        }
        ConsoleKind::None => None,
    };
    Ok(LegacyDevices { serial, reset_evt })
}
