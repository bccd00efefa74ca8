//! What PID 1 does to the guest itself: mounts, the vsock connection to the host, power off.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

/// The image disk: the second virtio disk, after the guest's own root.
pub const IMAGE_DISK: &str = "/dev/vdb";
/// The host's well-known vsock CID.
const HOST_CID: u32 = 2;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const SUBTREE_CONTROL: &str = "/sys/fs/cgroup/cgroup.subtree_control";
const CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];
const CONNECT_TRIES: u32 = 50;
const CONNECT_PAUSE: Duration = Duration::from_millis(100);

fn cstr(s: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

pub fn mount(source: &str, target: &Path, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    let (source, target) = (cstr(source)?, cstr(target)?);
    let (fstype, data) = (cstr(fstype)?, cstr(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches a mount; a failure only leaks a tmpfs-backed overlay until power off.
pub fn unmount(target: &Path) {
    if let Ok(target) = cstr(target) {
        // SAFETY: `target` is a valid NUL-terminated string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The kernel file systems crun needs, a tmpfs for bundles and overlay upper layers, and the
/// image disk read-only at `image_dir`.
pub fn setup(image_disk: &Path, image_dir: &str) -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&str, &str, &str, u64, &str); 6] = [
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, ""),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        std::fs::create_dir_all(target)?;
        match mount(source, Path::new(target), fstype, flags, data) {
            // Already there: the kernel mounts devtmpfs itself (CONFIG_DEVTMPFS_MOUNT).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                let msg = format!("cannot mount {fstype} on {target}: {e}");
                return Err(io::Error::new(e.kind(), msg));
            }
            Ok(()) => {}
        }
    }
    // Let crun give containers their own pids/memory/cpu limits.
    // Let crun give containers their own limits; one at a time, so that a controller this
    // kernel lacks does not keep the others off.
    for controller in CONTROLLERS {
        let _ = std::fs::write(SUBTREE_CONTROL, format!("+{controller}"));
    }
    std::fs::create_dir_all(image_dir)?;
    let disk = image_disk.to_string_lossy();
    mount(&disk, Path::new(image_dir), "ext4", libc::MS_RDONLY, "")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot mount the image disk {disk}: {e}")))
}

/// Whether the cgroup2 root offers `controller`.
pub fn has_controller(controller: &str) -> bool {
    std::fs::read_to_string(Path::new(CGROUP_ROOT).join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
}

/// A stream to the host: its vsock listener on `port`, or a Unix socket (to test the agent
/// in a PID namespace on a host); retried while the device comes up.
pub fn connect_host(port: u32, unix: Option<&Path>) -> io::Result<File> {
    let mut last = io::Error::from(io::ErrorKind::NotConnected);
    for _ in 0..CONNECT_TRIES {
        let conn = match unix {
            Some(path) => UnixStream::connect(path).map(|s| File::from(OwnedFd::from(s))),
            None => connect_vsock(port),
        };
        match conn {
            Ok(f) => return Ok(f),
            Err(e) => last = e,
        }
        sleep(CONNECT_PAUSE);
    }
    Err(last)
}

fn connect_vsock(port: u32) -> io::Result<File> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket owned by nothing else; File closes it on every path.
    let sock = unsafe { File::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = HOST_CID;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Flushes the disks and resets the guest, which ends the VM (rvmm stops on reset).
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // PID 1 exiting panics the kernel, which (panic=1) also resets the guest.
    std::process::exit(1)
}
