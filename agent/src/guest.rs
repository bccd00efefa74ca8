//! What PID 1 does to the guest itself: mounts, the vsock connection to the host, power off.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use rvmm_agent::protocol::{Resume, IMAGE_TAG};

/// The image disk: the second virtio disk, after the guest's own root.
pub const IMAGE_DISK: &str = "/dev/vdb";
/// The host's well-known vsock CID.
const HOST_CID: u32 = 2;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const BUSYBOX: &str = "/bin/busybox";
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
/// Whether something is mounted at `path`: it sits on another device than its parent.
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    match (dev(path), path.parent().and_then(dev)) {
        (Some(here), Some(parent)) => here != parent,
        _ => false,
    }
}

pub fn unmount(target: &Path) {
    if let Ok(target) = cstr(target) {
        // SAFETY: `target` is a valid NUL-terminated string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The kernel file systems crun needs, a tmpfs for bundles and overlay upper layers, and the
/// image disk, where there is one, read-only at `image_dir`.
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
    // Containers on the guest's network (`rvmm run`'s default) need its loopback; eth0 is up
    // already where rvmm's `--net user` had the kernel configure it (`ip=`).
    if let Err(e) = run_ip(&["link", "set", "lo", "up"]) {
        log_line(&format!("cannot bring up lo: {e}"));
    }
    std::fs::create_dir_all(image_dir)?;
    // A VM booted to be snapshotted gets its image at each restore (`resume`).
    if disk_size(image_disk)? == 0 {
        return Ok(());
    }
    mount_image(image_disk, image_dir)
}

/// The size of the disk at `path`; 0 where there is none (rvmm-oci's VMs get their roots over
/// virtio-fs instead).
fn disk_size(path: &Path) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    match File::open(path) {
        Ok(mut disk) => disk.seek(SeekFrom::End(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn mount_image(image_disk: &Path, image_dir: &str) -> io::Result<()> {
    let disk = image_disk.to_string_lossy();
    mount(&disk, Path::new(image_dir), "ext4", libc::MS_RDONLY, "")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot mount the image disk {disk}: {e}")))
}

/// How long a restored guest waits for its image disk to get the size the host gave it.
const IMAGE_WAIT: Duration = Duration::from_secs(10);
const IMAGE_POLL: Duration = Duration::from_millis(2);

/// A guest restored from a snapshot: the host's time, a reseeded random pool, and the image
/// disk that was empty at the snapshot and has been given its image since (the kernel learns
/// the new size from a configuration-change interrupt, so it may take a moment).
pub fn resume(req: &Resume, image_disk: &Path, image_dir: &str) -> Result<(), String> {
    set_clock(req.realtime_ns).map_err(|e| format!("cannot set the clock: {e}"))?;
    if let Err(e) = reseed(&req.entropy) {
        log_line(&format!("cannot reseed the random pool: {e}"));
    }
    if is_mount_point(Path::new(image_dir)) || !image_disk.exists() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + IMAGE_WAIT;
    while disk_size(image_disk).map_err(|e| e.to_string())? == 0 {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the image disk {} is still empty after {IMAGE_WAIT:?}",
                image_disk.display()
            ));
        }
        sleep(IMAGE_POLL);
    }
    mount_image(image_disk, image_dir).map_err(|e| e.to_string())
}

fn set_clock(realtime_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct rand_pool_info` with room for the entropy the host sends.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; ENTROPY_MAX],
}

const ENTROPY_MAX: usize = 64;
/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `entropy` to the random pool and reseeds the generator from it at once, so that
/// copies restored from one snapshot stop drawing the same numbers.
fn reseed(entropy: &[u8]) -> io::Result<()> {
    let len = entropy.len().min(ENTROPY_MAX);
    let mut info = RandPoolInfo {
        entropy_count: (len * 8) as libc::c_int,
        buf_size: len as libc::c_int,
        buf: [0; ENTROPY_MAX],
    };
    info.buf[..len].copy_from_slice(&entropy[..len]);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: both ioctls act on a random device we opened; RNDADDENTROPY reads `info`,
    // whose `buf_size` bytes follow its header.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where a shared VM mounts its image store and each image disk in it.
const IMAGE_SHARE: &str = "/run/rvmm-images";
const IMAGE_ROOTS: &str = "/run/rvmm-roots";

/// The root of the image disk `file` on the VM's image share, loop-mounted read-only once
/// per VM (later containers of the image share it).
pub fn image_root(file: &str) -> Result<PathBuf, String> {
    // One at a time: two first runs of an image must not both mount it.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let stem = file
        .strip_suffix(".ext4")
        .filter(|s| !s.is_empty() && !s.starts_with('.') && !s.contains('/'))
        .ok_or_else(|| format!("image {file:?} is not a disk file name"))?;
    let share = Path::new(IMAGE_SHARE);
    if !is_mount_point(share) {
        std::fs::create_dir_all(share).map_err(|e| format!("{IMAGE_SHARE}: {e}"))?;
        mount(IMAGE_TAG, share, "virtiofs", libc::MS_RDONLY, "").map_err(|e| {
            format!(
                "cannot mount the image store (virtio-fs {IMAGE_TAG}): {e}; is this a shared VM?"
            )
        })?;
    }
    let root = Path::new(IMAGE_ROOTS).join(stem);
    if is_mount_point(&root) {
        return Ok(root);
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let out = Command::new(BUSYBOX)
        .args(["mount", "-t", "ext4", "-o", "loop,ro"])
        .arg(share.join(file))
        .arg(&root)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(format!("cannot mount image {file}: {}", why.trim()));
    }
    Ok(root)
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

/// A new vsock stream socket and the address of `cid`:`port`.
fn vsock_socket(cid: u32, port: u32) -> io::Result<(File, libc::sockaddr_vm)> {
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
    addr.svm_cid = cid;
    addr.svm_port = port;
    Ok((sock, addr))
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn connect_vsock(port: u32) -> io::Result<File> {
    let (sock, addr) = vsock_socket(HOST_CID, port)?;
    let addr = (&addr as *const libc::sockaddr_vm).cast();
    // SAFETY: `addr` points at a valid sockaddr_vm of the length passed.
    if unsafe { libc::connect(sock.as_raw_fd(), addr, VSOCK_ADDR_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// A vsock listener on `port` for any CID.
pub fn listen_vsock(port: u32) -> io::Result<File> {
    let (sock, addr) = vsock_socket(libc::VMADDR_CID_ANY, port)?;
    let addr = (&addr as *const libc::sockaddr_vm).cast();
    // SAFETY: `addr` points at a valid sockaddr_vm of the length passed; listen takes
    // integers.
    let rc = unsafe {
        match libc::bind(sock.as_raw_fd(), addr, VSOCK_ADDR_LEN) {
            0 => libc::listen(sock.as_raw_fd(), 8),
            rc => rc,
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The next connection on a listener from [`listen_vsock`].
pub fn accept(listener: &File) -> io::Result<File> {
    // SAFETY: accept4 on a listening socket; null address pointers are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
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

/// The guest's network as the host's namespace had it: `net`'s interface (found by its MAC)
/// with its MTU, addresses, default route and the container's net sysctls, and loopback up,
/// so that a container in the guest's own namespace is on the caller's network.
pub fn configure_network(net: &rvmm_agent::protocol::GuestNetwork) -> Result<(), String> {
    let name = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("network: {e}"))?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(&net.mac))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .ok_or_else(|| format!("no network interface has the MAC {}", net.mac))?;
    let mtu = net.mtu.to_string();
    let mut steps: Vec<Vec<&str>> = vec![
        vec!["link", "set", "lo", "up"],
        vec!["link", "set", &name, "mtu", &mtu, "up"],
    ];
    for address in &net.addresses {
        steps.push(vec!["addr", "add", address, "dev", &name]);
    }
    if let Some(gateway) = &net.gateway {
        steps.push(vec![
            "route", "add", "default", "via", gateway, "dev", &name,
        ]);
    }
    for args in steps {
        run_ip(&args)?;
    }
    for (name, value) in &net.sysctls {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| format!("sysctl {name}: {e}"))?;
    }
    Ok(())
}

/// busybox `ip` with `args`; its complaint when it fails.
fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(BUSYBOX)
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(format!("ip {}: {}", args.join(" "), said.trim()));
    }
    Ok(())
}

/// A line on the console, which PID 1 must not die for.
fn log_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "rvmm-agent: {line}");
}
