//! Attaches device models to the buses, their interrupts to KVM and their event handlers to
//! the device event loop.

use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use rvmm_devices::bus::{Bus, BusError};
use rvmm_devices::failure::DeviceFailure;
use rvmm_devices::interrupt::EventFdInterrupt;
use rvmm_devices::legacy::acpi_sleep::{AcpiSleep, ACPI_SLEEP_PORT_LEN};
use rvmm_devices::legacy::i8042::I8042;
use rvmm_devices::legacy::ioapic::{IoApic, IOAPIC_MMIO_LEN};
use rvmm_devices::legacy::pvpanic::{Pvpanic, PVPANIC_PORT_LEN};
use rvmm_devices::legacy::serial::Serial;
use rvmm_devices::virtio::balloon::{Balloon, BalloonError};
use rvmm_devices::virtio::block::{Block, BlockConfig, BlockError};
use rvmm_devices::virtio::console::{Console, ConsoleError};
use rvmm_devices::virtio::fs::{Fs, FsError};
use rvmm_devices::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use rvmm_devices::virtio::net::{format_mac, Net, NetError, Stream};
use rvmm_devices::virtio::rng::{Rng, RngError};
use rvmm_devices::virtio::vsock::{Vsock, VsockError};
use rvmm_devices::virtio::VirtioDevice;
use rvmm_firmware::acpi::S5_SLEEP_TYPE;
use rvmm_firmware::layout::{self, VirtioSlot};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{ConsoleKind, DiskConfig, FsConfig, NetBackend, NetConfig, VmConfig};
use crate::console_out::{ConsoleOut, PanicWatch};
use crate::event_loop::DeviceEventManager;
use crate::vstate::vm::{Vm, VmError};

const I8042_PORT: u64 = 0x60;
const I8042_PORT_COUNT: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot duplicate stdin for the console")]
    Stdin(#[source] std::io::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error("cannot wire a device interrupt")]
    Interrupt(#[source] VmError),
    #[error("cannot register a queue notification")]
    Notify(#[source] VmError),
    #[error("virtio transport")]
    Transport(#[source] MmioError),
    #[error(transparent)]
    Disk(BlockError),
    #[error("virtio console")]
    Console(#[source] ConsoleError),
    #[error(transparent)]
    Net(NetError),
    #[error("--net user without its passt")]
    NoPasst,
    #[error("virtio rng")]
    Rng(#[source] RngError),
    #[error("virtio balloon")]
    Balloon(#[source] BalloonError),
    #[error("--balloon-stats {0}")]
    BalloonStats(std::path::PathBuf, #[source] std::io::Error),
    #[error("virtio vsock")]
    Vsock(#[source] VsockError),
    #[error("--fs tag {tag}")]
    Fs {
        tag: String,
        #[source]
        source: FsError,
    },
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(u32),
}

/// The legacy PC devices every guest gets.
pub struct LegacyDevices {
    /// COM1, when the console is the serial port.
    pub serial: Option<Arc<Mutex<Serial>>>,
    /// Signalled when the guest ends itself: a reset through the i8042, or a power-off
    /// through the ACPI sleep control register.
    pub guest_stop_evt: EventFd,
    /// Signalled when the guest kernel reports a panic through pvpanic.
    pub guest_panic_evt: EventFd,
}

pub fn attach_legacy(
    vm: &Vm,
    pio: &mut Bus,
    console: ConsoleKind,
    watch: &Arc<PanicWatch>,
) -> Result<LegacyDevices, DeviceError> {
    let guest_stop_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    let i8042_reset = guest_stop_evt.try_clone().map_err(DeviceError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(i8042_reset))),
        I8042_PORT,
        I8042_PORT_COUNT,
    )
    .map_err(DeviceError::Bus)?;
    // Only reachable through the FADT; without ACPI tables the guest never finds it.
    let poweroff = guest_stop_evt.try_clone().map_err(DeviceError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleep::new(S5_SLEEP_TYPE, poweroff))),
        u64::from(layout::ACPI_SLEEP_PORT),
        ACPI_SLEEP_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;
    // Also found only through ACPI (the DSDT's QEMU0001).
    let guest_panic_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    let panicked = guest_panic_evt.try_clone().map_err(DeviceError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(Pvpanic::new(panicked))),
        u64::from(layout::PVPANIC_PORT),
        PVPANIC_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;

    let serial = match console {
        ConsoleKind::Serial => {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            vm.register_irqfd(&irq, layout::COM1_IRQ)
                .map_err(DeviceError::Interrupt)?;
            let serial = Arc::new(Mutex::new(Serial::new(
                irq,
                Box::new(ConsoleOut::new(watch.clone())),
            )));
            pio.insert(
                serial.clone(),
                u64::from(layout::COM1_PORT),
                u64::from(layout::COM1_PORT_COUNT),
            )
            .map_err(DeviceError::Bus)?;
            Some(serial)
        }
        ConsoleKind::Virtio | ConsoleKind::None => None,
    };
    Ok(LegacyDevices {
        serial,
        guest_stop_evt,
        guest_panic_evt,
    })
}

/// The I/O APIC model of the split irqchip, at the address and with the id the MADT gives.
pub fn attach_ioapic(
    vm: &Vm,
    mmio: &mut Bus,
    num_cpus: u8,
) -> Result<Arc<Mutex<IoApic>>, DeviceError> {
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        layout::ioapic_id(num_cpus),
        Box::new(vm.msi_routes()),
    )));
    mmio.insert(ioapic.clone(), layout::IOAPIC_ADDR, IOAPIC_MMIO_LEN)
        .map_err(DeviceError::Bus)?;
    Ok(ioapic)
}

/// Hands out one window and one interrupt pin per virtio device, in order, and remembers
/// them: the ACPI tables or the command line describe exactly this list to the guest. Also
/// keeps each slot's transport, for snapshots.
#[derive(Default)]
pub struct VirtioSlots {
    used: Vec<VirtioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioSlots {
    pub fn allocate(&mut self) -> Result<VirtioSlot, DeviceError> {
        let index = self.used.len() as u32;
        let slot =
            VirtioSlot::nth(index).ok_or(DeviceError::TooManyDevices(layout::VIRTIO_SLOT_COUNT))?;
        self.used.push(slot);
        Ok(slot)
    }

    /// Every slot handed out so far, in order.
    pub fn allocated(&self) -> &[VirtioSlot] {
        &self.used
    }

    /// The transports of the slots, in order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }
}

/// Everything a virtio device gets attached to.
pub struct VirtioContext<'a> {
    pub vm: &'a Vm,
    pub mem: &'a GuestMemoryMmap,
    pub mmio: &'a mut Bus,
    pub event_manager: &'a mut DeviceEventManager,
    pub slots: &'a mut VirtioSlots,
    /// Watches the console for the kernel's panic line.
    pub console_watch: &'a Arc<PanicWatch>,
    /// Where a device whose backend is gone reports it.
    pub device_failure: &'a Arc<DeviceFailure>,
}

/// Puts `device` behind a virtio-mmio transport: register window on the MMIO bus, queue
/// notifications as ioeventfds (no exit to userspace), its interrupt as an irqfd, and its
/// queue handling on the device event loop.
pub fn attach_virtio<D>(
    ctx: &mut VirtioContext,
    device: Arc<Mutex<D>>,
) -> Result<VirtioSlot, DeviceError>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let slot = ctx.slots.allocate()?;
    let irq = Arc::new(EventFdInterrupt::new().map_err(DeviceError::EventFd)?);
    ctx.vm
        .register_irqfd(irq.eventfd(), slot.irq)
        .map_err(DeviceError::Interrupt)?;
    let transport =
        MmioTransport::new(ctx.mem.clone(), device.clone(), irq).map_err(DeviceError::Transport)?;
    for (evt, queue) in transport.queue_notify_events() {
        ctx.vm
            .register_mmio_ioeventfd(evt, slot.addr + QUEUE_NOTIFY_OFFSET, queue)
            .map_err(DeviceError::Notify)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    ctx.mmio
        .insert(transport.clone(), slot.addr, MMIO_WINDOW_SIZE)
        .map_err(DeviceError::Bus)?;
    ctx.slots.transports.push(transport);
    ctx.event_manager.add_subscriber(device);
    Ok(slot)
}

/// Attaches every virtio device the configuration asks for, plus the virtio-fs devices of
/// rvmm's own virtiofsd processes (`shares`); their slots are in `ctx.slots`. Disks come first
/// so that their guest names follow the command line's order. `user_net` is the stream to the
/// passt of `--net user`.
pub fn attach_virtio_devices(
    ctx: &mut VirtioContext,
    cfg: &VmConfig,
    shares: &[FsConfig],
    user_net: Option<Stream>,
) -> Result<(), DeviceError> {
    attach_disks(ctx, &cfg.disks)?;
    attach_nets(ctx, &cfg.nets, user_net)?;
    if cfg.rng {
        let rng = Rng::new().map_err(DeviceError::Rng)?;
        attach_virtio(ctx, Arc::new(Mutex::new(rng)))?;
    }
    if let Some(balloon) = &cfg.balloon {
        let stats = balloon
            .stats
            .as_deref()
            .map(|path| {
                std::fs::File::create(path)
                    .map_err(|e| DeviceError::BalloonStats(path.to_path_buf(), e))
            })
            .transpose()?;
        let balloon = Balloon::new(stats).map_err(DeviceError::Balloon)?;
        attach_virtio(ctx, Arc::new(Mutex::new(balloon)))?;
    }
    if let Some(vsock) = &cfg.vsock {
        let device = Vsock::new(rvmm_devices::virtio::vsock::VsockConfig {
            cid: vsock.cid,
            uds_path: vsock.uds.clone(),
        })
        .map_err(DeviceError::Vsock)?;
        attach_virtio(ctx, Arc::new(Mutex::new(device)))?;
    }
    attach_fs(ctx, &cfg.fs)?;
    attach_fs(ctx, shares)?;
    if cfg.console == ConsoleKind::Virtio {
        let stdin = crate::terminal::dup_stdin().map_err(DeviceError::Stdin)?;
        let console = Console::new(
            Box::new(ConsoleOut::new(ctx.console_watch.clone())),
            Some(stdin),
        )
        .map_err(DeviceError::Console)?;
        attach_virtio(ctx, Arc::new(Mutex::new(console)))?;
    }
    Ok(())
}

/// Attaches the disks in order (vda, vdb, …).
fn attach_disks(ctx: &mut VirtioContext, disks: &[DiskConfig]) -> Result<(), DeviceError> {
    for disk in disks {
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            serial: disk.serial.clone(),
            direct: disk.direct,
        })
        .map_err(DeviceError::Disk)?;
        attach_virtio(ctx, Arc::new(Mutex::new(block)))?;
    }
    Ok(())
}

/// Attaches one virtio-fs device per `--fs`, each connected to its vhost-user backend.
fn attach_fs(ctx: &mut VirtioContext, shares: &[FsConfig]) -> Result<(), DeviceError> {
    for cfg in shares {
        let fs = Fs::new(
            rvmm_devices::virtio::fs::FsConfig {
                tag: cfg.tag.clone(),
                socket: cfg.socket.clone(),
            },
            ctx.device_failure.clone(),
        )
        .map_err(|source| DeviceError::Fs {
            tag: cfg.tag.clone(),
            source,
        })?;
        attach_virtio(ctx, Arc::new(Mutex::new(fs)))?;
    }
    Ok(())
}

/// Attaches one virtio-net interface per `--net` (eth0, eth1, …): on its TAP, or on the
/// stream to passt.
fn attach_nets(
    ctx: &mut VirtioContext,
    nets: &[NetConfig],
    mut user_net: Option<Stream>,
) -> Result<(), DeviceError> {
    for (index, cfg) in nets.iter().enumerate() {
        let mac = Some(cfg.guest_mac());
        let (net, on) = match &cfg.backend {
            NetBackend::Tap(tap) => {
                let tap_cfg = rvmm_devices::virtio::net::NetConfig {
                    tap: tap.clone(),
                    mac,
                };
                (Net::new(tap_cfg), format!("TAP {tap}"))
            }
            NetBackend::User => {
                let stream = user_net.take().ok_or(DeviceError::NoPasst)?;
                let failure = ctx.device_failure.clone();
                (Net::with_stream(stream, mac, failure), "passt".into())
            }
        };
        let net = net.map_err(DeviceError::Net)?;
        log::info!("eth{index} on {on} has MAC {}", format_mac(&net.mac()));
        attach_virtio(ctx, Arc::new(Mutex::new(net)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_and_bounded() {
        let mut slots = VirtioSlots::default();
        let first = slots.allocate().unwrap();
        assert_eq!(
            first,
            VirtioSlot {
                addr: 0xd000_0000,
                irq: 5
            }
        );
        let second = slots.allocate().unwrap();
        assert_eq!(
            second,
            VirtioSlot {
                addr: 0xd000_1000,
                irq: 6
            }
        );
        for _ in 2..layout::VIRTIO_SLOT_COUNT {
            slots.allocate().unwrap();
        }
        assert!(matches!(
            slots.allocate(),
            Err(DeviceError::TooManyDevices(19))
        ));
        assert_eq!(slots.allocated().len(), 19);
        assert_eq!(slots.allocated()[..2], [first, second]);
    }
}
