//! What the main thread waits for once the VM runs: a vCPU ending the VM, the guest ending
//! itself (i8042 reset line, ACPI power-off) or panicking (pvpanic), a device whose backend is
//! gone, or SIGINT/SIGTERM (taken through a signalfd so no handler runs on an arbitrary
//! thread).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::create_sigset;

const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block the stop signals")]
    Block(#[source] std::io::Error),
    #[error("cannot create a signalfd")]
    SignalFd(#[source] std::io::Error),
    #[error("cannot wait for the VM to end")]
    Poll(#[source] std::io::Error),
}

/// Why the main thread woke up.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    VcpuExit,
    /// The guest reset or powered itself off.
    GuestStop,
    /// The guest kernel reported a panic.
    GuestPanic,
    /// A device can no longer serve the guest (see `rvmm_devices::failure`).
    DeviceFailure,
    Signal(i32),
    /// A client connected to the API socket.
    ApiRequest,
    /// A client of the API socket asked for the VM's end (never from `wait` itself).
    ShutdownRequest,
}

/// The events that end a running VM, besides the vCPUs' own.
pub struct EndEvents<'a> {
    pub guest_stop: &'a EventFd,
    pub guest_panic: &'a EventFd,
    pub device_failure: &'a EventFd,
}

pub struct ControlWait<'a> {
    events: EndEvents<'a>,
    signal_fd: File,
    /// The API socket's listener, or -1 (which poll skips).
    api_fd: RawFd,
}

impl<'a> ControlWait<'a> {
    /// Blocks the stop signals for this thread and every thread it starts afterwards, so they
    /// are only ever seen through the signalfd.
    pub fn new(events: EndEvents<'a>) -> Result<Self, SignalError> {
        let set = create_sigset(&STOP_SIGNALS)
            .map_err(|e| SignalError::Block(std::io::Error::from_raw_os_error(e.errno())))?;
        // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Block(std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(SignalError::SignalFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let signal_fd = unsafe { File::from_raw_fd(fd) };
        Ok(ControlWait {
            events,
            signal_fd,
            api_fd: -1,
        })
    }

    /// Wakes up for connections to `listener` too.
    pub fn with_api(mut self, listener: RawFd) -> Self {
        self.api_fd = listener;
        self
    }

    /// Sleeps until something ends the VM or a client calls.
    pub fn wait(&self, vcpu_exit_evt: &EventFd) -> Result<Wake, SignalError> {
        let mut fds = [
            pollfd(vcpu_exit_evt.as_raw_fd()),
            pollfd(self.events.guest_stop.as_raw_fd()),
            pollfd(self.events.guest_panic.as_raw_fd()),
            pollfd(self.signal_fd.as_raw_fd()),
            pollfd(self.events.device_failure.as_raw_fd()),
            pollfd(self.api_fd),
        ];
        loop {
            // SAFETY: `fds` is a valid array of pollfd whose length is passed with it.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SignalError::Poll(err));
            }
            // A panic first: its reboot (panic=N) may already have signalled the others.
            if fds[2].revents != 0 {
                return Ok(Wake::GuestPanic);
            }
            if fds[0].revents != 0 {
                return Ok(Wake::VcpuExit);
            }
            if fds[1].revents != 0 {
                return Ok(Wake::GuestStop);
            }
            if fds[4].revents != 0 {
                return Ok(Wake::DeviceFailure);
            }
            if fds[3].revents != 0 {
                return Ok(Wake::Signal(self.read_signal()));
            }
            if fds[5].revents != 0 {
                return Ok(Wake::ApiRequest);
            }
        }
    }

    fn read_signal(&self) -> i32 {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match (&self.signal_fd).read_exact(&mut info) {
            // ssi_signo is the first field (u32) of signalfd_siginfo.
            Ok(()) => u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32,
            Err(_) => libc::SIGTERM,
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
