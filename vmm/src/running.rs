//! What the API socket's requests act on while the VM runs: its pause gate, its vCPU and
//! device threads, and what a snapshot reads.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rvmm_devices::legacy::ioapic::IoApic;
use rvmm_devices::legacy::serial::Serial;
use rvmm_devices::snapshot::SnapshotError as DeviceSnapshotError;
use rvmm_devices::virtio::mmio::{MmioState, MmioTransport};
use vm_memory::GuestMemoryMmap;

use crate::api::{RunState, VmControl};
use crate::config::VmConfig;
use crate::event_loop::DeviceLoop;
use crate::snapshot::{self, Header, VmState};
use crate::vmm::{KICK_INTERVAL, STOP_TIMEOUT};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::VcpuHandle;
use crate::vstate::vm::Vm;

/// How long a snapshot waits between tries for a device with requests in flight.
const BUSY_RETRY: Duration = Duration::from_millis(10);

/// What a snapshot reads besides the vCPUs.
pub struct SavedParts<'a> {
    pub vm: &'a Vm,
    pub mem: &'a GuestMemoryMmap,
    pub ioapic: Option<&'a Arc<Mutex<IoApic>>>,
    pub serial: Option<&'a Arc<Mutex<Serial>>>,
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    pub config: &'a VmConfig,
    /// `/proc/self/pagemap`, where it could be opened.
    pub pagemap: Option<&'a std::fs::File>,
}

pub struct RunningVm<'a> {
    pub gate: &'a PauseGate,
    pub handles: &'a [VcpuHandle],
    pub devices: &'a DeviceLoop,
    pub saved: SavedParts<'a>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmControl for RunningVm<'_> {
    fn state(&self) -> RunState {
        if self.gate.is_closed() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        self.gate.close();
        let deadline = Instant::now() + STOP_TIMEOUT;
        // Kicked again until parked: a kick that lands just before KVM_RUN is lost.
        while Instant::now() < deadline {
            self.handles.iter().for_each(VcpuHandle::kick);
            if self.gate.wait_parked(self.handles.len(), KICK_INTERVAL) {
                return Ok(());
            }
        }
        self.gate.open();
        Err(format!("the vCPUs did not stop within {STOP_TIMEOUT:?}"))
    }

    fn resume(&mut self) -> Result<(), String> {
        self.gate.open();
        Ok(())
    }

    fn shape(&self) -> (u8, u64) {
        (self.saved.config.vcpus, self.saved.config.memory_mib)
    }

    /// The vCPUs saved their states as they parked; the device thread is held while the
    /// devices and guest memory are read, so that no device moves a queue in between.
    fn snapshot(&mut self, dir: &Path) -> Result<(), String> {
        let parts = &self.saved;
        let Some(ioapic) = parts.ioapic else {
            return Err("a VM without ACPI (--no-acpi) cannot be snapshotted".into());
        };
        let vcpus = self
            .gate
            .saved()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        if vcpus.len() != self.handles.len() {
            return Err("not every vCPU saved its state".into());
        }
        let virtio = self.hold_devices()?;
        let clock_ns = parts.vm.fd().get_clock().map(|c| c.clock);
        let result = clock_ns
            .map_err(|e| format!("cannot read the VM's clock: {e}"))
            .and_then(|clock_ns| {
                let state = VmState {
                    header: Header::here(),
                    config: parts.config.clone(),
                    clock_ns,
                    vcpus,
                    ioapic: lock(ioapic).save(),
                    serial: parts.serial.map(|s| lock(s).save()),
                    virtio,
                };
                snapshot::write(dir, &state, parts.mem, parts.pagemap)
                    .map_err(|e| crate::error_chain(&e))
            });
        self.devices.release();
        result
    }
}

impl RunningVm<'_> {
    /// Holds the device thread with every device's state saved: a device with requests in
    /// flight is given time to finish them.
    fn hold_devices(&self) -> Result<Vec<MmioState>, String> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if !self.devices.hold(STOP_TIMEOUT) {
                return Err(format!(
                    "the device thread did not stop within {STOP_TIMEOUT:?}"
                ));
            }
            let saved: Result<Vec<_>, _> = self
                .saved
                .transports
                .iter()
                .map(|t| lock(t).save())
                .collect();
            match saved {
                Ok(states) => return Ok(states),
                Err(DeviceSnapshotError::Busy(_)) if Instant::now() < deadline => {
                    self.devices.release();
                    std::thread::sleep(BUSY_RETRY);
                }
                Err(e) => {
                    self.devices.release();
                    return Err(crate::error_chain(&e));
                }
            }
        }
    }
}
