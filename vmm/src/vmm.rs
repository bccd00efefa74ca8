//! Builds a VM from a [`VmConfig`] and runs it until the guest resets, powers off, fails, or
//! rvmm is asked to stop by a signal.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_clock_data, KVM_MAX_CPUID_ENTRIES};
use rvmm_devices::bus::Bus;
use rvmm_devices::failure::DeviceFailure;
use rvmm_devices::legacy::ioapic::IoApic;
use rvmm_devices::legacy::serial::{Serial, SerialInput};
use rvmm_devices::snapshot::SnapshotError as DeviceSnapshotError;
use rvmm_devices::virtio::mmio::MmioTransport;
use rvmm_firmware::acpi::AcpiConfig;
use rvmm_firmware::layout;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ApiError, ApiSocket};
use crate::boot::{self, BootConfig, BootError};
use crate::config::{ConfigError, CpuTemplate, Seccomp, VmConfig};
use crate::console_out::PanicWatch;
use crate::device_manager::{
    attach_ioapic, attach_legacy, attach_virtio_devices, DeviceError, LegacyDevices, VirtioContext,
    VirtioSlots,
};
use crate::event_loop::{DeviceLoop, EventLoopError};
use crate::exit::Buses;
use crate::jail::{self, JailError};
use crate::passt::{self, Passt, PasstError};
use crate::running::{RunningVm, SavedParts};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::signals::{ControlWait, EndEvents, SignalError, Wake};
use crate::snapshot::{self, RestoreOptions, SnapshotError, VmState};
use crate::terminal::dup_stdin;
use crate::virtiofsd::{start_all, Virtiofsd, VirtiofsdError};
use crate::vstate::cpuid;
use crate::vstate::kvm::{KvmError, KvmHost};
use crate::vstate::memory::{create_guest_memory, MemoryBacking, MemoryError};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{BootState, Outcome, RunContext, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::VcpuStateError;
use crate::vstate::vm::{IrqChip, Vm, VmError};

/// How long stopping may take before rvmm gives up on a vCPU thread and exits anyway.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const KICK_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error("cannot read the host's supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("the guest CPUID has more entries than KVM accepts")]
    CpuidTooLarge,
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot duplicate stdin for the console")]
    Stdin(#[source] std::io::Error),
    #[error("cannot connect stdin to the serial console")]
    SerialInput(#[source] rvmm_devices::legacy::serial::SerialError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("main thread")]
    Seccomp(#[source] SeccompError),
    #[error("cannot set up the event manager")]
    EventManager(#[source] event_manager::Error),
    #[error(transparent)]
    Virtiofsd(#[from] VirtiofsdError),
    #[error(transparent)]
    Passt(#[from] PasstError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("restore: {0}")]
    Restore(String),
    #[error("restore")]
    DeviceState(#[from] DeviceSnapshotError),
    #[error("restore")]
    VcpuState(#[from] VcpuStateError),
    #[error("restore: cannot set the VM's clock")]
    Clock(#[source] kvm_ioctls::Error),
    #[error("restore: cannot route the I/O APIC's pins")]
    Routes(#[source] std::io::Error),
    #[error(transparent)]
    Options(#[from] ConfigError),
    #[error("{0}")]
    Guest(String),
    /// A device's backend is gone; the reason, with how its virtiofsd or passt ended where
    /// known.
    #[error("{0}")]
    DeviceFailed(String),
}

/// How the VM ended, for the process exit status.
#[derive(Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off: a normal end.
    Guest,
    /// rvmm was told to stop by a signal.
    Signal(i32),
    /// The guest kernel panicked (pvpanic); the console's panic line, if one was seen.
    Panic(Option<String>),
}

/// A VM ready to run: memory loaded, vCPUs configured, devices attached.
pub struct Vmm {
    // Kept alive for the life of the VM: KVM maps this memory into the guest.
    mem: GuestMemoryMmap,
    vm: Vm,
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    legacy: LegacyDevices,
    /// The split irqchip's I/O APIC model (the ACPI platform).
    ioapic: Option<Arc<Mutex<IoApic>>>,
    /// The virtio devices' transports, in slot order.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    console_watch: Arc<PanicWatch>,
    device_failure: Arc<DeviceFailure>,
    event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// What the VM was built from: a snapshot records it.
    config: VmConfig,
    msr_indices: Arc<Vec<u32>>,
    api: Option<ApiSocket>,
    /// Opened while `/proc` is still there (a jail hides it): snapshots skip the pages the
    /// guest never touched.
    pagemap: Option<std::fs::File>,
    // Last, so that the devices have closed their sockets when each is reaped.
    virtiofsd: Vec<Virtiofsd>,
    passt: Option<Passt>,
}

/// How the VM's memory and vCPUs get their first state.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// Load the kernel and put the vCPUs at its entry point.
    Boot,
    /// Map the snapshot's memory and load its vCPU and device states.
    Restore { dir: &'a Path, state: &'a VmState },
}

impl Vmm {
    pub fn build(cfg: &VmConfig) -> Result<Self, VmmError> {
        Self::assemble(cfg, Start::Boot)
    }

    /// A VM in the state of the snapshot in `dir`, with the snapshot's configuration as
    /// `options` change it (other disk images, TAPs, socket paths).
    pub fn restore(dir: &Path, options: &RestoreOptions) -> Result<Self, VmmError> {
        let state = snapshot::read(dir)?;
        let cfg = options.apply(&state.config)?;
        Self::assemble(&cfg, Start::Restore { dir, state: &state })
    }

    fn assemble(cfg: &VmConfig, start: Start) -> Result<Self, VmmError> {
        // First: no passt or a busy port is refused at once; passt starts as the VM is built.
        let passt = passt::start_for(cfg)?;
        let api = cfg.api_socket.as_deref().map(ApiSocket::bind).transpose()?;
        let host = KvmHost::open()?;
        host.check_vcpus(cfg.vcpus)?;
        let template = cfg.cpu_template.unwrap_or(if host.emulated {
            CpuTemplate::Baseline
        } else {
            CpuTemplate::Host
        });
        // The MP table describes a PC with PIC and PIT; ACPI a hardware-reduced platform.
        let irqchip = if cfg.acpi {
            IrqChip::Split
        } else {
            IrqChip::Legacy
        };
        let vm = Vm::new(&host.kvm, irqchip)?;
        let mem = match start {
            Start::Boot => create_guest_memory(cfg.memory_bytes(), memory_backing(cfg))?,
            Start::Restore { dir, .. } => {
                snapshot::map_memory(dir, &layout::ram_regions(cfg.memory_bytes()))?
            }
        };

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let ioapic = match irqchip {
            IrqChip::Split => Some(attach_ioapic(&vm, &mut mmio, cfg.vcpus)?),
            IrqChip::Legacy => None,
        };
        let console_watch = Arc::new(PanicWatch::default());
        let device_failure = Arc::new(DeviceFailure::new().map_err(VmmError::EventFd)?);
        let legacy = attach_legacy(&vm, &mut pio, cfg.console, &console_watch)?;
        let mut event_manager = EventManager::new().map_err(VmmError::EventManager)?;
        let mut slots = VirtioSlots::default();
        let mut virtio = VirtioContext {
            vm: &vm,
            mem: &mem,
            mmio: &mut mmio,
            event_manager: &mut event_manager,
            slots: &mut slots,
            console_watch: &console_watch,
            device_failure: &device_failure,
        };
        let (mut virtiofsd, shares) = start_all(&cfg.shares)?;
        let (passt, user_net) = passt::ready(passt)?;
        attach_virtio_devices(&mut virtio, cfg, &shares, user_net)?;
        virtiofsd.iter_mut().for_each(Virtiofsd::connected);

        let parts = Parts {
            host: &host,
            vm: &vm,
            mem: &mem,
            template,
            slots: &slots,
            ioapic: ioapic.as_ref(),
            serial: legacy.serial.as_ref(),
        };
        let vcpus = match start {
            Start::Boot => boot_vcpus(cfg, &parts)?,
            Start::Restore { state, .. } => restore_vcpus(cfg, &parts, state)?,
        };
        // Last: with the legacy irqchip KVM finishes a grace period begun by its creation
        // before it adds a memory slot, so the work above overlaps that wait.
        vm.register_memory(&host.kvm, &mem)?;
        // Only once the VM is built, so that a refused configuration gives just its error.
        if host.emulated {
            log::warn!(
                "this host's KVM emulates guest kernel code (nested kvm_pvm): guests will be \
                 slow; using the {} CPU template",
                template_name(template)
            );
        }
        let msr_indices = host
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_else(|e| {
                log::debug!("no MSR list, snapshots will lack MSRs: {e}");
                Vec::new()
            });
        Ok(Vmm {
            mem,
            vm,
            vcpus,
            buses: Arc::new(Buses { pio, mmio }),
            legacy,
            ioapic,
            transports: slots.transports().to_vec(),
            console_watch,
            device_failure,
            event_manager,
            config: cfg.clone(),
            msr_indices: Arc::new(msr_indices),
            api,
            // Only a VM with an API socket can be snapshotted.
            pagemap: cfg
                .api_socket
                .as_ref()
                .and_then(|_| std::fs::File::open("/proc/self/pagemap").ok()),
            virtiofsd,
            passt,
        })
    }

    /// Runs the guest to its end. The calling thread waits for the end; vCPUs and devices
    /// run on their own threads.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        let mut control = ControlWait::new(EndEvents {
            guest_stop: &self.legacy.guest_stop_evt,
            guest_panic: &self.legacy.guest_panic_evt,
            device_failure: self.device_failure.event(),
        })?;
        if let Some(api) = &self.api {
            control = control.with_api(api.as_raw_fd());
        }
        if let Some(serial) = &self.legacy.serial {
            let stdin = dup_stdin().map_err(VmmError::Stdin)?;
            let input = SerialInput::new(serial.clone(), stdin).map_err(VmmError::SerialInput)?;
            self.event_manager
                .add_subscriber(Arc::new(Mutex::new(input)));
        }
        // While the process still has one thread: namespaces and capabilities are per thread.
        if let Some(jail) = &self.config.jail {
            jail::enter(jail)?;
        }
        let filters = match self.config.seccomp {
            Seccomp::On => Some(Arc::new(Filters::new().map_err(VmmError::Seccomp)?)),
            Seccomp::Off => {
                log::warn!(
                    "seccomp filters are off (--seccomp off): rvmm's threads may make any \
                     system call"
                );
                None
            }
        };
        let device_loop = DeviceLoop::start(self.event_manager, filters.clone())?;

        let exit_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?);
        let ctx = RunContext {
            buses: self.buses.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            outcome: Arc::new(Mutex::new(None)),
            exit_evt: exit_evt.clone(),
            seccomp: filters.clone(),
            pause: Arc::new(PauseGate::default()),
            msr_indices: self.msr_indices.clone(),
        };
        let mut handles = Vec::new();
        let mut started = Ok(());
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(ctx.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    started = Err(VmmError::Vcpu(e));
                    break;
                }
            }
        }
        // The main thread is restricted last: starting threads needs calls the others lack.
        if let (Ok(()), Some(filters)) = (&started, &filters) {
            started = filters.apply(ThreadKind::Main).map_err(VmmError::Seccomp);
        }
        let wake = match started {
            Ok(()) => {
                let mut running = RunningVm {
                    gate: &ctx.pause,
                    handles: &handles,
                    devices: &device_loop,
                    saved: SavedParts {
                        vm: &self.vm,
                        mem: &self.mem,
                        ioapic: self.ioapic.as_ref(),
                        serial: self.legacy.serial.as_ref(),
                        transports: &self.transports,
                        config: &self.config,
                        pagemap: self.pagemap.as_ref(),
                    },
                };
                wait_serving(&control, &exit_evt, self.api.as_ref(), &mut running)
            }
            Err(_) => Ok(Wake::VcpuExit),
        };
        // Every thread is stopped before any error is returned.
        stop_vcpus(&ctx, handles);
        device_loop.stop();
        started?;
        let wake = wake?;

        match wake {
            Wake::GuestStop => Ok(VmExit::Guest),
            Wake::ShutdownRequest => {
                log::info!("the VM ends at a request on the API socket");
                Ok(VmExit::Guest)
            }
            // Served in wait_serving.
            Wake::ApiRequest => Ok(VmExit::Guest),
            Wake::GuestPanic => Ok(VmExit::Panic(self.console_watch.panic_line())),
            Wake::Signal(signo) => Ok(VmExit::Signal(signo)),
            Wake::DeviceFailure => Err(VmmError::DeviceFailed(failure_reason(
                &self.device_failure,
                &mut self.virtiofsd,
                self.passt.as_mut(),
            ))),
            Wake::VcpuExit => {
                let outcome = ctx.outcome.lock().unwrap_or_else(|p| p.into_inner()).take();
                match outcome {
                    Some(Outcome::Error(msg)) => Err(VmmError::Guest(msg)),
                    Some(Outcome::Reset | Outcome::Shutdown) | None => Ok(VmExit::Guest),
                }
            }
        }
    }
}

/// A vhost-user backend maps guest RAM itself, from the fds in the memory table: then it is
/// shared.
fn memory_backing(cfg: &VmConfig) -> MemoryBacking {
    if cfg.fs.is_empty() && cfg.shares.is_empty() {
        MemoryBacking::Anonymous
    } else {
        MemoryBacking::Shared
    }
}

/// What the failed device reported, and how the virtiofsd processes and passt, those that have
/// ended, did.
fn failure_reason(
    failure: &DeviceFailure,
    daemons: &mut [Virtiofsd],
    passt: Option<&mut Passt>,
) -> String {
    let mut reason = failure.reason().unwrap_or_default();
    let ends = daemons.iter_mut().filter_map(Virtiofsd::ended);
    for end in ends.chain(passt.and_then(Passt::ended)) {
        reason.push_str(&format!(" ({end})"));
    }
    reason
}

/// What a VM's first state is put into.
struct Parts<'a> {
    host: &'a KvmHost,
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    template: CpuTemplate,
    slots: &'a VirtioSlots,
    ioapic: Option<&'a Arc<Mutex<IoApic>>>,
    serial: Option<&'a Arc<Mutex<Serial>>>,
}

/// Loads the kernel (with the tables that describe the machine) and puts the vCPUs at its
/// entry point.
fn boot_vcpus(cfg: &VmConfig, p: &Parts) -> Result<Vec<Vcpu>, VmmError> {
    let mut cmdline = cfg.cmdline.clone();
    if p.host.emulated && p.template == CpuTemplate::Baseline {
        cmdline.push(cpuid::BASELINE_KERNEL_PARAMS);
    }
    // With ACPI the DSDT describes the devices; without it the command line must.
    if !cfg.acpi {
        for slot in p.slots.allocated() {
            cmdline.virtio_mmio_device(slot);
        }
    }
    let acpi = cfg.acpi.then(|| AcpiConfig {
        num_cpus: cfg.vcpus,
        virtio: p.slots.allocated(),
        serial: p.serial.is_some(),
    });
    let boot_state = boot::load(
        p.mem,
        &BootConfig {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: cmdline.as_str(),
            vcpus: cfg.vcpus,
            mem_size: cfg.memory_bytes(),
            acpi,
        },
    )?;
    create_vcpus(p.host, p.vm, p.template, cfg.vcpus, &boot_state)
}

/// Loads the snapshot's device, clock and vCPU states into the freshly built VM (whose
/// memory already is the snapshot's).
fn restore_vcpus(cfg: &VmConfig, p: &Parts, state: &VmState) -> Result<Vec<Vcpu>, VmmError> {
    let refused = |why: &str| VmmError::Restore(why.to_string());
    if state.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(refused("its vCPU count does not match its configuration"));
    }
    let ioapic = p.ioapic.ok_or_else(|| refused("a snapshot needs ACPI"))?;
    lock(ioapic)
        .restore(&state.ioapic)
        .map_err(VmmError::Routes)?;
    if let (Some(serial), Some(saved)) = (p.serial, &state.serial) {
        lock(serial).restore(saved);
    }
    let transports = p.slots.transports();
    if transports.len() != state.virtio.len() {
        return Err(refused("its virtio devices do not match its configuration"));
    }
    let clock = kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    };
    p.vm.fd().set_clock(&clock).map_err(VmmError::Clock)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (id, saved) in (0..cfg.vcpus).zip(&state.vcpus) {
        let vcpu = Vcpu::new(p.vm, id)?;
        vcpu.restore(saved)?;
        vcpus.push(vcpu);
    }
    // After the local APICs: an interrupt a restored device raises at once (a configuration
    // change, vsock's transport reset) would otherwise be overwritten by their saved state.
    for (transport, saved) in transports.iter().zip(&state.virtio) {
        lock(transport).restore(saved)?;
    }
    Ok(vcpus)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vCPU per `count`, each with the template's CPUID and its own topology ids.
fn create_vcpus(
    host: &KvmHost,
    vm: &Vm,
    template: CpuTemplate,
    count: u8,
    boot_state: &BootState,
) -> Result<Vec<Vcpu>, VmmError> {
    let supported = host
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::Cpuid)?;
    let mut base = supported.as_slice().to_vec();
    cpuid::apply_template(&mut base, template);
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let mut entries = base.clone();
        cpuid::set_topology(&mut entries, id, count);
        let cpuid =
            kvm_bindings::CpuId::from_entries(&entries).map_err(|_| VmmError::CpuidTooLarge)?;
        let vcpu = Vcpu::new(vm, id)?;
        vcpu.configure(&cpuid, boot_state)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Waits for the VM's end, serving the API socket's clients in between.
fn wait_serving(
    control: &ControlWait,
    exit_evt: &EventFd,
    api: Option<&ApiSocket>,
    vm: &mut RunningVm,
) -> Result<Wake, SignalError> {
    loop {
        match (control.wait(exit_evt)?, api) {
            (Wake::ApiRequest, Some(api)) => {
                if api.serve(vm) {
                    return Ok(Wake::ShutdownRequest);
                }
            }
            (wake, _) => return Ok(wake),
        }
    }
}

/// Sets the stop flag, lets paused vCPUs go, kicks every vCPU out of KVM_RUN and waits for
/// each thread to end. The wait returns as soon as a thread ends; a kick is repeated only if
/// the first one landed just before the thread re-entered the guest.
fn stop_vcpus(ctx: &RunContext, handles: Vec<VcpuHandle>) {
    ctx.stop.store(true, Ordering::Release);
    ctx.pause.open();
    let deadline = Instant::now() + STOP_TIMEOUT;
    for h in &handles {
        h.kick();
    }
    for h in &handles {
        while !h.wait_end(KICK_INTERVAL) {
            if Instant::now() > deadline {
                log::error!("a vCPU did not stop within {STOP_TIMEOUT:?}");
                return;
            }
            h.kick();
        }
    }
    handles.into_iter().for_each(VcpuHandle::join);
}

fn template_name(template: CpuTemplate) -> &'static str {
    match template {
        CpuTemplate::Host => "host",
        CpuTemplate::Baseline => "baseline",
    }
}
