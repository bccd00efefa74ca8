//! What to do with one vCPU exit: a pure function of the exit and the buses, so tests can feed
//! it made-up exits without KVM.

use kvm_ioctls::VcpuExit;
use rvmm_devices::bus::Bus;

/// Port 0x80 is the POST/debug port Linux writes to as an I/O delay; nothing lives there.
const POST_PORT: u16 = 0x80;

/// KVM_SYSTEM_EVENT_* types (linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// How the vCPU loop goes on after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest.
    Continue,
    /// The guest asked to reset (i8042 pulse, system event): rvmm ends.
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN): a reset too, but never one a guest asks
    /// for with `reboot=k`, so rvmm says so before it ends.
    TripleFault,
    /// The guest powered off or halted for good: rvmm ends.
    Shutdown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExitError {
    #[error("KVM could not emulate a guest instruction (internal error)")]
    InternalError,
    #[error("KVM failed to enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    #[error("unexpected vCPU exit: {0}")]
    Unexpected(String),
}

/// The two address spaces a guest reaches devices through.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Dispatches one exit. Accesses to unmapped addresses read as all-ones and writes vanish,
/// as on a real bus, so a probing guest does not stop the VM.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &Buses) -> Result<Flow, ExitError> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Ok(Flow::Continue)
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) && port != POST_PORT {
                log::trace!("write to unmapped port {port:#x}");
            }
            Ok(Flow::Continue)
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("read from unmapped MMIO {addr:#x}");
                data.fill(0xff);
            }
            Ok(Flow::Continue)
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("write to unmapped MMIO {addr:#x}");
            }
            Ok(Flow::Continue)
        }
        // The split irqchip reports the end of a level-triggered interrupt. rvmm's lines are
        // all edge-triggered, so only a guest that set a pin to level gets here: nothing to
        // re-deliver.
        VcpuExit::IoapicEoi(_) => Ok(Flow::Continue),
        // With the in-kernel local APICs HLT stays in KVM; one that reaches us can never wake.
        VcpuExit::Hlt => Ok(Flow::Shutdown),
        VcpuExit::Shutdown => Ok(Flow::TripleFault),
        VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _) => Ok(Flow::Reset),
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _) => Ok(Flow::Shutdown),
        VcpuExit::InternalError => Err(ExitError::InternalError),
        VcpuExit::FailEntry(reason, _) => Err(ExitError::FailEntry(reason)),
        other => Err(ExitError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvmm_devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    /// Remembers the last write and answers reads with a fixed byte.
    #[derive(Default)]
    struct Probe {
        written: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.written.push((offset, data.to_vec()));
        }
    }

    fn buses() -> (Buses, Arc<Mutex<Probe>>, Arc<Mutex<Probe>>) {
        let pio_dev = Arc::new(Mutex::new(Probe::default()));
        let mmio_dev = Arc::new(Mutex::new(Probe::default()));
        let mut pio = Bus::new();
        pio.insert(pio_dev.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(mmio_dev.clone(), 0xd000_0000, 0x1000).unwrap();
        (Buses { pio, mmio }, pio_dev, mmio_dev)
    }

    #[test]
    fn port_io_reaches_the_device() {
        let (b, pio, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f9, &[7]), &b),
            Ok(Flow::Continue)
        );
        assert_eq!(pio.lock().unwrap().written, vec![(1, vec![7])]);
        let mut data = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3fa, &mut data), &b).unwrap();
        assert_eq!(data, [0x42]);
    }

    #[test]
    fn unmapped_reads_are_all_ones() {
        let (b, _, _) = buses();
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x60, &mut data), &b).unwrap();
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xfee0_0000, &mut data), &b).unwrap();
        assert_eq!(data, [0xff; 4]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(POST_PORT, &[0]), &b),
            Ok(Flow::Continue)
        );
    }

    #[test]
    fn mmio_reaches_the_device() {
        let (b, _, mmio) = buses();
        handle_exit(VcpuExit::MmioWrite(0xd000_0070, &[1, 0, 0, 0]), &b).unwrap();
        assert_eq!(mmio.lock().unwrap().written, vec![(0x70, vec![1, 0, 0, 0])]);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0001, &mut data), &b).unwrap();
        assert_eq!(data, [0x41; 4]);
    }

    #[test]
    fn stops_and_errors() {
        let (b, _, _) = buses();
        assert_eq!(handle_exit(VcpuExit::Hlt, &b), Ok(Flow::Shutdown));
        assert_eq!(
            handle_exit(VcpuExit::IoapicEoi(0x21), &b),
            Ok(Flow::Continue)
        );
        assert_eq!(handle_exit(VcpuExit::Shutdown, &b), Ok(Flow::TripleFault));
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, &[]), &b),
            Ok(Flow::Reset)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, &[]), &b),
            Ok(Flow::Shutdown)
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &b),
            Err(ExitError::InternalError)
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &b),
            Err(ExitError::FailEntry(0x21))
        );
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &b),
            Err(ExitError::Unexpected(_))
        ));
    }
}
