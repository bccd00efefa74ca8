//! One vCPU: its boot state (64-bit long mode, Linux boot protocol registers) and the thread
//! that runs KVM_RUN and hands each exit to [`crate::exit::handle_exit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_EXIT_INTERNAL_ERROR,
};
use kvm_ioctls::VcpuFd;
use rvmm_firmware::gdt::{BootSegments, Segment};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::{handle_exit, Buses, Flow};
use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vstate::vm::Vm;

// Control-register and EFER bits of the 64-bit entry state.
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// MSRs given defined values at boot.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: all of RAM is cacheable.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

// Local APIC LVT registers and delivery modes, wired as on a PC (LINT0 ExtINT, LINT1 NMI).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_LVT_MASKED: u32 = 1 << 16;

/// Bit 1 of RFLAGS is reserved and must be set.
const RFLAGS_RESERVED: u64 = 0x2;
/// Power-on x87 control word and SSE control/status.
const FPU_FCW: u16 = 0x37f;
const FPU_MXCSR: u32 = 0x1f80;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU state ({what})")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the MSR list")]
    Msrs,
    #[error("cannot start the vCPU thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Where the guest starts: everything the Linux 64-bit boot protocol wants in registers.
#[derive(Clone, Copy, Debug)]
pub struct BootState {
    pub entry: u64,
    pub stack: u64,
    pub zero_page: u64,
    pub cr3: u64,
    pub segments: BootSegments,
    /// Whether the guest has an 8259 PIC behind LINT0 (the MP-table platform). Otherwise
    /// LINT0 is masked: the hardware-reduced platform has no PIC, and when it still had KVM's
    /// (left at reset, never programmed by Linux there) its interrupts through LINT0 hung the
    /// boot here at the switch to the kvm-clock clocksource.
    pub legacy_pic: bool,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Vcpu { id, fd })
    }

    /// Puts the vCPU in the state the kernel's 64-bit entry point expects. Application
    /// processors get the same state but wait for INIT/SIPI in the in-kernel LAPIC.
    pub fn configure(&self, cpuid: &CpuId, boot: &BootState) -> Result<(), VcpuError> {
        let setup = |what| move |source| VcpuError::Setup { what, source };
        self.fd.set_cpuid2(cpuid).map_err(setup("cpuid"))?;
        self.fd.set_msrs(&boot_msrs()?).map_err(setup("msrs"))?;
        self.fd.set_regs(&boot_regs(boot)).map_err(setup("regs"))?;
        let mut sregs = self.fd.get_sregs().map_err(setup("get sregs"))?;
        let s = &boot.segments;
        sregs.cs = kvm_seg(&s.code);
        sregs.ds = kvm_seg(&s.data);
        sregs.es = kvm_seg(&s.data);
        sregs.fs = kvm_seg(&s.data);
        sregs.gs = kvm_seg(&s.data);
        sregs.ss = kvm_seg(&s.data);
        sregs.tr = kvm_seg(&s.tss);
        sregs.gdt.base = s.gdt_base;
        sregs.gdt.limit = s.gdt_limit;
        sregs.idt.base = s.idt_base;
        sregs.idt.limit = s.idt_limit;
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.cr3 = boot.cr3;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(setup("sregs"))?;
        let fpu = kvm_fpu {
            fcw: FPU_FCW,
            mxcsr: FPU_MXCSR,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(setup("fpu"))?;
        let mut lapic = self.fd.get_lapic().map_err(setup("get lapic"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        if !boot.legacy_pic {
            update_lvt(&mut lapic.regs, APIC_LVT0, |v| v | APIC_LVT_MASKED);
        }
        self.fd.set_lapic(&lapic).map_err(setup("lapic"))
    }

    /// Loads a snapshot's state instead of the boot state.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuStateError> {
        state.restore(&self.fd)
    }

    /// Starts the KVM_RUN loop on its own thread.
    pub fn start(self, ctx: RunContext) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let name = format!("vcpu{}", self.id);
        // Nothing is ever sent: the sender is dropped when the thread ends, panics included,
        // which wakes whoever waits on `done` at once.
        let (ended, done) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _ended = ended;
                self.run_loop(ctx)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread, done })
    }

    fn run_loop(mut self, ctx: RunContext) {
        if let Some(filters) = &ctx.seccomp {
            if let Err(e) = filters.apply(ThreadKind::Vcpu) {
                let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
                let msg = format!("vCPU {}: {e}{}", self.id, cause.unwrap_or_default());
                ctx.report(self.id, Outcome::Error(msg));
                return;
            }
        }
        let outcome = loop {
            ctx.pause.pass(self.id, || self.save_state(&ctx));
            if ctx.stop.load(Ordering::Acquire) {
                break None;
            }
            let result = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &ctx.buses),
                // A kick: look at the stop flag again.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Ok(Flow::Continue)
                }
                Err(e) => break Some(Outcome::Error(format!("KVM_RUN failed: {e}"))),
            };
            match result {
                Ok(Flow::Continue) => {}
                Ok(Flow::Reset) => break Some(Outcome::Reset),
                Ok(Flow::TripleFault) => {
                    log::warn!(
                        "the guest reset itself by a triple fault\n{}",
                        self.dump_state()
                    );
                    break Some(Outcome::Reset);
                }
                Ok(Flow::Shutdown) => break Some(Outcome::Shutdown),
                Err(e) => break Some(Outcome::Error(format!("{e}\n{}", self.dump_state()))),
            }
        };
        if let Some(outcome) = outcome {
            ctx.report(self.id, outcome);
        }
    }

    /// The vCPU's state for a snapshot, once KVM has finished the instruction whose I/O exit
    /// was just handled (an MMIO read's value lands in its register only on the next entry):
    /// KVM_RUN with `immediate_exit` completes it and returns at once.
    fn save_state(&mut self, ctx: &RunContext) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let mut completed = Ok(());
        // An access split over two exits needs two entries.
        for _ in 0..4 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) => {
                    completed = Err(format!("vCPU {}: KVM_RUN: {e}", self.id));
                    break;
                }
                Ok(exit) => {
                    if let Err(e) = handle_exit(exit, &ctx.buses) {
                        completed = Err(format!("vCPU {}: {e}", self.id));
                        break;
                    }
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        VcpuState::save(&self.fd, &ctx.msr_indices)
            .map_err(|e| format!("vCPU {}: {}", self.id, crate::error_chain(&e)))
    }

    /// Registers and, for internal errors, KVM's extra data: what a developer needs to find
    /// the instruction that could not run.
    fn dump_state(&mut self) -> String {
        let mut out = format!("vCPU {} state:", self.id);
        if let Ok(r) = self.fd.get_regs() {
            out += &format!(
                "\n  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} \
                 rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            );
        }
        if let Ok(s) = self.fd.get_sregs() {
            out += &format!(
                "\n  cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            );
        }
        let run = self.fd.get_kvm_run();
        if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the exit union is the one KVM
            // filled in; it is plain integers, valid for any bit pattern.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            out += &format!(
                "\n  internal error suberror={} data={:x?}",
                internal.suberror,
                &internal.data[..n]
            );
        }
        out
    }
}

/// How a vCPU thread ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Reset,
    Shutdown,
    Error(String),
}

/// What every vCPU thread shares: the buses, the stop flag, and where to report the end.
#[derive(Clone)]
pub struct RunContext {
    pub buses: Arc<Buses>,
    pub stop: Arc<AtomicBool>,
    /// The first outcome wins; later ones (other vCPUs being stopped) are dropped.
    pub outcome: Arc<Mutex<Option<Outcome>>>,
    pub exit_evt: Arc<EventFd>,
    /// Closed while the VM is paused (the API socket's `pause`).
    pub pause: Arc<PauseGate>,
    /// The MSRs a vCPU saves as it parks (`KVM_GET_MSR_INDEX_LIST`).
    pub msr_indices: Arc<Vec<u32>>,
    /// Each vCPU thread installs its filter before it first enters the guest.
    pub seccomp: Option<Arc<Filters>>,
}

impl RunContext {
    fn report(&self, id: u8, outcome: Outcome) {
        log::debug!("vCPU {id} stopped: {outcome:?}");
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        drop(slot);
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }
}

pub struct VcpuHandle {
    thread: JoinHandle<()>,
    done: Receiver<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN so the thread sees the stop flag. Sending it more than once is
    /// harmless and covers a kick that lands just before the thread re-enters the guest.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread id belongs to a thread we own and have not joined yet.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), SIGRTMIN()) };
    }

    /// Waits up to `timeout` for the thread to end; true once it has.
    pub fn wait_end(&self, timeout: Duration) -> bool {
        matches!(
            self.done.recv_timeout(timeout),
            Err(RecvTimeoutError::Disconnected) | Ok(())
        )
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// The kick signal only has to interrupt the ioctl; its handler does nothing.
fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), on_kick).map_err(VcpuError::Signal);
    });
    result
}

fn boot_regs(boot: &BootState) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: boot.entry,
        rsp: boot.stack,
        rbp: boot.stack,
        rsi: boot.zero_page,
        ..Default::default()
    }
}

fn boot_msrs() -> Result<Msrs, VcpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ])
    .map_err(|_| VcpuError::Msrs)
}

fn kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

/// Sets the delivery-mode field (bits 10:8) of a local APIC LVT register.
fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    update_lvt(regs, offset, |v| (v & !0x700) | (mode << 8));
}

/// Rewrites the 32-bit local APIC register at `offset` through `f`.
fn update_lvt(regs: &mut [libc::c_char; 1024], offset: usize, f: impl Fn(u32) -> u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = f(u32::from_le_bytes(bytes));
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_is_set_in_place() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // masked bit 16 must stay
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x04);
        regs[APIC_LVT0 + 2] = 0;
        update_lvt(&mut regs, APIC_LVT0, |v| v | APIC_LVT_MASKED);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x04);
    }

    #[test]
    fn boot_registers_follow_the_protocol() {
        let boot = BootState {
            entry: 0x100_0000,
            stack: 0x8ff0,
            zero_page: 0x7000,
            cr3: 0x9000,
            segments: BootSegments::default(),
            legacy_pic: true,
        };
        let r = boot_regs(&boot);
        assert_eq!(
            (r.rip, r.rsp, r.rsi, r.rflags),
            (0x100_0000, 0x8ff0, 0x7000, 2)
        );
        assert_eq!(boot_msrs().unwrap().as_slice().len(), 11);
    }
}
