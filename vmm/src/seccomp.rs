//! Seccomp filters: once set-up is done, every rvmm thread may make only the system calls its
//! kind of thread needs (lists taken from `strace -f` of the tests' guests). Anything else
//! raises SIGSYS, whose handler writes one line naming the system call and exits with status 1:
//! a clear death rather than a silent hang or a bare "Bad system call".

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot compile the {0} seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The kinds of rvmm threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Waits for the VM to end (signalfd, poll), then stops and joins the others.
    Main,
    /// Runs KVM_RUN and the device register accesses that exit to userspace.
    Vcpu,
    /// The device event loop: disk, TAP, vsock socket, console and rng I/O.
    Devices,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
        }
    }
}

/// The compiled filters of every thread kind, built once before any thread starts.
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
    devices: BpfProgram,
}

impl Filters {
    /// Compiles the filters and installs the SIGSYS handler that reports a forbidden call.
    pub fn new() -> Result<Self, SeccompError> {
        install_sigsys_handler()?;
        Ok(Filters {
            main: compile(ThreadKind::Main)?,
            vcpu: compile(ThreadKind::Vcpu)?,
            devices: compile(ThreadKind::Devices)?,
        })
    }

    /// Restricts the calling thread for good; a thread's filter cannot be loosened later.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = match kind {
            ThreadKind::Main => &self.main,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Devices => &self.devices,
        };
        KIND.with(|k| k.set(kind.name()));
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))
    }
}

thread_local! {
    /// Read by the SIGSYS handler: a const-initialised TLS slot, so reading it there is safe.
    static KIND: Cell<&'static str> = const { Cell::new("rvmm") };
}

ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);
ioctl_iow_nr!(
    KVM_SET_GSI_ROUTING,
    kvm_bindings::KVMIO,
    0x6a,
    kvm_bindings::kvm_irq_routing
);

/// What any thread does: memory allocation, locks, logging, signals, and ending itself.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // virtio-blk's io_uring: submitted and reaped on the device thread, waited on at a reset
    // (vCPU thread) and when the VM is dropped (main thread). The ring itself takes only reads,
    // writes and fsyncs of the disk images (devices/src/virtio/block/uring.rs).
    libc::SYS_io_uring_enter,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_read,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
];

/// The main thread once the VM runs: it polls its signalfd and the exit eventfds, serves the
/// API socket's clients (each with read and write timeouts), kicks and joins the other
/// threads, and drops the VM, which removes the socket files and reaps `--share`'s virtiofsd
/// processes and `--net user`'s passt (kill, below). A snapshot (API `snapshot`) makes its
/// directory and writes its files: the state, and guest memory with holes for zero pages
/// (the page map, read with pread64, says which pages the guest never touched).
const MAIN: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_recvfrom,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_wait4,
];

/// A vCPU thread, past the common calls: virtio-fs activation and reset talk to virtiofsd.
const VCPU: &[i64] = &[libc::SYS_recvmsg, libc::SYS_sendmsg];

/// The device event loop: disk images (flush, discard), the TAP, the stream to passt (each read
/// takes the rest of a frame and the next length; each write a length and its frame), vsock
/// sockets (host connections both ways), stdin, getrandom.
const DEVICES: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_getrandom,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    // virtio-vsock's timer for host connections the guest does not answer.
    libc::SYS_timerfd_settime,
    libc::SYS_writev,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let own = match kind {
        ThreadKind::Main => MAIN,
        // Device register accesses on the vCPU thread signal eventfds (write), may set the
        // TAP's offloads or the interrupt routes (ioctls, below), and start or stop a
        // vhost-user backend's vrings (requests and their fds on its socket).
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Devices => DEVICES,
    };
    // An empty rule list allows the call with any arguments.
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().chain(own).map(|&nr| (nr, vec![])).collect();
    // Nothing executable is ever mapped after set-up.
    let no_exec = || arg_masked(2, libc::PROT_EXEC as u64, 0);
    map.insert(libc::SYS_mmap, vec![no_exec()?]);
    map.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // std checks a descriptor is open before closing it (in debug builds).
    map.insert(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)?]);
    map.insert(libc::SYS_ioctl, ioctl_rules(kind)?);
    if kind == ThreadKind::Main {
        // Only SIGKILL, for a virtiofsd or passt that does not leave by itself.
        map.insert(libc::SYS_kill, vec![arg_eq(1, libc::SIGKILL as u64)?]);
    }
    if kind == ThreadKind::Devices {
        // Only Unix sockets, for guest connections to host listeners.
        map.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
    }
    Ok(map)
}

/// Each thread kind gets only the ioctl requests it makes.
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let requests: Vec<u64> = match kind {
        // The VM's clock, for a snapshot.
        ThreadKind::Main => vec![KVM_GET_CLOCK()],
        // KVM_GET_*REGS: the register dump when the guest cannot go on. The other KVM_GET_*:
        // each vCPU saves its state as it parks at a pause. KVM_SET_GSI_ROUTING: the guest
        // programming the I/O APIC model.
        ThreadKind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_CPUID2(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_SET_GSI_ROUTING(),
            libc::TUNSETOFFLOAD,
        ],
        // Accepted vsock connections are made non-blocking.
        ThreadKind::Devices => vec![libc::FIONBIO],
    };
    let mut rules: Vec<SeccompRule> = requests
        .into_iter()
        .map(|r| arg_eq(1, r))
        .collect::<Result<_, _>>()?;
    // The logger asks whether stderr is a terminal (TCGETS) before it writes, on any thread.
    rules.push(arg_eq(1, libc::TCGETS)?);
    // Restoring the terminal on stdin: RawTerminal on the main thread, the SIGSYS handler on
    // any thread (glibc's tcsetattr reads the settings back).
    rules.push(SeccompRule::new(vec![
        cond_eq(0, libc::STDIN_FILENO as u64)?,
        cond_eq(1, libc::TCSETS)?,
    ])?);
    Ok(rules)
}

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![cond_eq(index, value)?])
}

fn cond_eq(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn arg_masked(index: u8, mask: u64, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])
}

fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind).map_err(|e| SeccompError::Build(kind.name(), e))?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Compile(kind.name(), e))
}

/// Offset of `si_syscall` in a SIGSYS siginfo_t on x86-64: after si_signo, si_errno, si_code,
/// padding and `si_call_addr`. The libc crate has no accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;
const MSG_HEAD: &[u8] = b"rvmm: error: seccomp: the ";
const MSG_MID: &[u8] = b" thread made a forbidden system call, number ";
const MSG_TAIL: &[u8] = b" (--seccomp off disables the filters)\n";

/// Reports the forbidden call, restores the terminal and ends the process. Async-signal-safe:
/// it only formats into a stack buffer and calls write(2), tcsetattr on stdin and _exit(2),
/// all on every allow-list.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose `_sigsys` member holds
    // the system call number at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let kind = KIND.with(Cell::get).as_bytes();
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut digits = [0u8; 12];
    let number = format_decimal(nr, &mut digits);
    for part in [MSG_HEAD, kind, MSG_MID, number, MSG_TAIL] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write(2) from a valid buffer, and _exit(2): both async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    crate::terminal::restore_from_signal_handler();
    // SAFETY: _exit(2) ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(1) }
}

/// Writes `n` in decimal into the end of `out` without allocating; returns the digits.
fn format_decimal(n: i32, out: &mut [u8; 12]) -> &[u8] {
    let mut value = i64::from(n).unsigned_abs();
    let mut start = out.len();
    loop {
        start -= 1;
        out[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    if n < 0 {
        start -= 1;
        out[start] = b'-';
    }
    &out[start..]
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SeccompError::Handler);
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices] {
            let program = compile(kind).unwrap();
            assert!(!program.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn formats_numbers_without_allocating() {
        let mut buf = [0u8; 12];
        assert_eq!(format_decimal(0, &mut buf), b"0");
        assert_eq!(format_decimal(59, &mut buf), b"59");
        assert_eq!(format_decimal(-1, &mut buf), b"-1");
        assert_eq!(format_decimal(i32::MIN, &mut buf), b"-2147483648");
    }

    #[test]
    fn kvm_ioctl_numbers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        // As linux/kvm.h defines them.
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_CPUID2(), 0xc008_ae91);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_GET_DEBUGREGS(), 0x8080_aea1);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS(), 0x8188_aea6);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
    }
}
