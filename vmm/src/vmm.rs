//! Builds a VM from a [`VmConfig`] and runs it until the guest resets, powers off, fails, or
//! rvmm is asked to stop by a signal.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use rvmm_devices::bus::Bus;
use rvmm_devices::failure::DeviceFailure;
use rvmm_devices::legacy::serial::SerialInput;
use rvmm_firmware::acpi::AcpiConfig;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ApiError, ApiSocket, RunState, VmControl};
use crate::boot::{self, BootConfig, BootError};
use crate::config::{CpuTemplate, Seccomp, VmConfig};
use crate::console_out::PanicWatch;
use crate::device_manager::{
    attach_ioapic, attach_legacy, attach_virtio_devices, DeviceError, LegacyDevices, VirtioContext,
    VirtioSlots,
};
use crate::event_loop::{DeviceLoop, EventLoopError};
use crate::exit::Buses;
use crate::passt::{self, Passt, PasstError};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::signals::{ControlWait, EndEvents, SignalError, Wake};
use crate::terminal::dup_stdin;
use crate::virtiofsd::{start_all, Virtiofsd, VirtiofsdError};
use crate::vstate::cpuid;
use crate::vstate::kvm::{KvmError, KvmHost};
use crate::vstate::memory::{create_guest_memory, MemoryBacking, MemoryError};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{BootState, Outcome, RunContext, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{IrqChip, Vm, VmError};

/// How long stopping may take before rvmm gives up on a vCPU thread and exits anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const KICK_INTERVAL: Duration = Duration::from_millis(10);

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
    _mem: GuestMemoryMmap,
    _vm: Vm,
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    legacy: LegacyDevices,
    console_watch: Arc<PanicWatch>,
    device_failure: Arc<DeviceFailure>,
    event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    seccomp: Seccomp,
    /// vCPU count and memory size in MiB.
    shape: (u8, u64),
    api: Option<ApiSocket>,
    // Last, so that the devices have closed their sockets when each is reaped.
    virtiofsd: Vec<Virtiofsd>,
    passt: Option<Passt>,
}

impl Vmm {
    pub fn build(cfg: &VmConfig) -> Result<Self, VmmError> {
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
        let mem = create_guest_memory(cfg.memory_bytes(), memory_backing(cfg))?;

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        if irqchip == IrqChip::Split {
            attach_ioapic(&vm, &mut mmio, cfg.vcpus)?;
        }
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
        let mut cmdline = cfg.cmdline.clone();
        if host.emulated && template == CpuTemplate::Baseline {
            cmdline.push(cpuid::BASELINE_KERNEL_PARAMS);
        }
        let (mut virtiofsd, shares) = start_all(&cfg.shares)?;
        let (passt, user_net) = passt::ready(passt)?;
        attach_virtio_devices(&mut virtio, cfg, &shares, user_net)?;
        virtiofsd.iter_mut().for_each(Virtiofsd::connected);
        // With ACPI the DSDT describes the devices; without it the command line must.
        if !cfg.acpi {
            for slot in slots.allocated() {
                cmdline.virtio_mmio_device(slot);
            }
        }
        let acpi = cfg.acpi.then(|| AcpiConfig {
            num_cpus: cfg.vcpus,
            virtio: slots.allocated(),
            serial: legacy.serial.is_some(),
        });

        let boot_state = boot::load(
            &mem,
            &BootConfig {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: cmdline.as_str(),
                vcpus: cfg.vcpus,
                mem_size: cfg.memory_bytes(),
                acpi,
            },
        )?;

        let vcpus = create_vcpus(&host, &vm, template, cfg.vcpus, &boot_state)?;
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
        Ok(Vmm {
            _mem: mem,
            _vm: vm,
            vcpus,
            buses: Arc::new(Buses { pio, mmio }),
            legacy,
            console_watch,
            device_failure,
            event_manager,
            seccomp: cfg.seccomp,
            shape: (cfg.vcpus, cfg.memory_mib),
            api,
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
        let filters = match self.seccomp {
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
                    shape: self.shape,
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

/// What the API socket's requests act on.
struct RunningVm<'a> {
    gate: &'a PauseGate,
    handles: &'a [VcpuHandle],
    shape: (u8, u64),
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
        self.shape
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
