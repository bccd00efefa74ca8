//! The host side of virtio-net: a TAP interface opened with a virtio-net header in front of
//! every frame, so checksum and segmentation offloads pass between guest and host kernel
//! untouched.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::HDR_LEN;

/// The kernel's TUN/TAP clone device.
pub(super) const TUN_PATH: &str = "/dev/net/tun";

/// A frame source and sink with a virtio-net header in front of every frame: the TAP, a stream
/// to passt ([`super::Stream`]), or a stand-in in tests and benchmarks.
pub trait TapIo: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (all of `buf`, or an error). `WouldBlock`: nothing of it was taken, and
    /// the caller keeps it until the fd is writable.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Writes one frame gathered from `iov` (guest buffers, by host address) as
    /// [`TapIo::write_frame`] does, without copying it into one buffer first; `None` where the
    /// host side needs the frame in one buffer.
    ///
    /// # Safety
    /// Every entry of `iov` must name readable memory that stays mapped during the call.
    unsafe fn write_frame_iovecs(&mut self, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
        let _ = iov;
        None
    }
    /// Whether [`TapIo::read_frame_iovecs`] can put a frame straight into guest buffers.
    fn scatter_reads(&self) -> bool {
        false
    }
    /// Reads one frame into `iov` (guest buffers, by host address) as [`TapIo::read_frame`]
    /// does, with no host buffer in between; only called where [`TapIo::scatter_reads`].
    ///
    /// # Safety
    /// Every entry of `iov` must name writable memory that stays mapped during the call.
    unsafe fn read_frame_iovecs(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let _ = iov;
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Tells the kernel which offloads (`TUN_F_*`) the reader handles, i.e. which partially
    /// checksummed and segmentation-offload frames it may hand out.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// Whether the host side acts on the offloads in the virtio-net header (partial checksums,
    /// segmentation). When it does not, the device offers the guest no offloads, so that every
    /// frame is whole and checksummed.
    fn offloads(&self) -> bool {
        true
    }
    /// Sends the rest of a frame that an earlier [`TapIo::write_frame`] took but could not send
    /// at once; `WouldBlock` while some of it is left, until the fd is writable.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The process at the other end, if there is one (passt): its hang-up ends the VM.
    fn peer(&self) -> Option<&str> {
        None
    }
    /// Why the host side can never carry frames again, once that is so. Never for a TAP, whose
    /// failures cost a frame each.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a name the kernel accepts for an interface.
    #[error("invalid TAP name {0:?} (1 to 15 characters, no '/', '%', ':' or whitespace)")]
    InvalidName(String),
    /// The interface does not exist (in this network namespace).
    #[error("TAP {0} does not exist (create it with `ip tuntap add {0} mode tap`)")]
    Missing(String),
    /// The TUN/TAP driver is not available.
    #[error("cannot open {TUN_PATH} (is the tun module loaded?)")]
    NoTunDevice(#[source] io::Error),
    /// Neither CAP_NET_ADMIN nor ownership of the TAP.
    #[error("no permission to use TAP {0} (run as root, or create it with `ip tuntap add {0} mode tap user $USER`)")]
    Permission(String),
    /// Another process (another VM?) has the TAP open.
    #[error("TAP {0} is busy (another process has it open)")]
    Busy(String),
    /// The interface exists but is not a single-queue TAP.
    #[error("{0} is not a single-queue TAP interface")]
    NotTap(String),
    /// Any other failure while attaching to or configuring the TAP.
    #[error("cannot set up TAP {name}")]
    Setup {
        /// The TAP.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to the existing TAP `name`, non-blocking, with a 12-byte virtio-net header
    /// (`struct virtio_net_hdr_v1`) in front of every frame and no offloads until
    /// [`TapIo::set_offload`].
    pub fn open(name: &str) -> Result<Self, TapError> {
        let cname = valid_name(name)?;
        // TUNSETIFF would quietly create a fresh, unconnected interface.
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => TapError::Permission(name.into()),
                _ => TapError::NoTunDevice(e),
            })?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        set_iff(&file, &cname, flags).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => TapError::Permission(name.into()),
            Some(libc::EBUSY) => TapError::Busy(name.into()),
            Some(libc::EINVAL) => TapError::NotTap(name.into()),
            _ => TapError::Setup {
                name: name.into(),
                source: e,
            },
        })?;
        let mut tap = Self { file };
        let setup = |source| TapError::Setup {
            name: name.into(),
            source,
        };
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(setup(io::Error::last_os_error()));
        }
        // A persistent TAP keeps the offloads its previous user set.
        tap.set_offload(0).map_err(setup)?;
        Ok(tap)
    }
}

/// Checks `name` the way the kernel's `dev_valid_name` does, refusing `%` too: `tap%d` would
/// ask the kernel to invent a name.
fn valid_name(name: &str) -> Result<CString, TapError> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == '%' || c == ':' || c == '\0' || c.is_whitespace());
    if bad {
        return Err(TapError::InvalidName(name.into()));
    }
    CString::new(name).map_err(|_| TapError::InvalidName(name.into()))
}

/// An `ifreq` naming the interface `name`, everything else zero.
pub(super) fn ifreq(name: &CString) -> libc::ifreq {
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and plain
    // structs), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // `valid_name` kept it under IFNAMSIZ, so the terminating NUL stays.
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// One writev of `iov` to `fd`: for a TAP (or a datagram socket), one frame.
///
/// # Safety
/// Every entry of `iov` must name readable memory that stays mapped during the call.
pub(super) unsafe fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // A frame has at most a queue's worth of buffers, far below IOV_MAX.
    let count = iov.len() as libc::c_int;
    // SAFETY: the kernel only reads the buffers, which the caller vouches for.
    let ret = unsafe { libc::writev(fd, iov.as_ptr(), count) };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// readv(2) of one frame into `iov`.
///
/// # Safety
/// Every entry of `iov` must name writable memory that stays mapped during the call.
pub(super) unsafe fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // The receiver gives at most IOV_MAX entries.
    let count = iov.len() as libc::c_int;
    // SAFETY: the kernel writes only into the buffers, which the caller vouches for.
    let ret = unsafe { libc::readv(fd, iov.as_ptr(), count) };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// TUNSETIFF: attaches `file` to the interface `name` with `flags`.
pub(super) fn set_iff(file: &File, name: &CString, flags: libc::c_int) -> io::Result<()> {
    let mut req = ifreq(name);
    // IFF_* flags all fit the kernel's short.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is, valid for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl TapIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One read returns exactly one frame.
        self.file.read(buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One write sends exactly one frame, all of it or nothing.
        self.file.write(buf)
    }

    unsafe fn write_frame_iovecs(&mut self, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
        // SAFETY: the caller vouches for the buffers.
        Some(unsafe { writev(self.file.as_raw_fd(), iov) })
    }

    fn scatter_reads(&self) -> bool {
        true
    }

    unsafe fn read_frame_iovecs(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller vouches for the buffers.
        unsafe { readv(self.file.as_raw_fd(), iov) }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for name in [
            "",
            "tap%d",
            "a/b",
            "a b",
            "a:b",
            ".",
            "..",
            "sixteen-chars-xx",
            "x\0y",
        ] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::InvalidName(_)), "{name:?}: {err}");
        }
        assert!(valid_name("fifteen-chars-x").is_ok());
    }

    #[test]
    fn missing_taps_are_reported_by_name() {
        let err = Tap::open("rvmm-no-such").unwrap_err();
        assert!(matches!(err, TapError::Missing(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "TAP rvmm-no-such does not exist (create it with `ip tuntap add rvmm-no-such mode tap`)"
        );
    }
}
