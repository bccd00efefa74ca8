//! The jail rvmm enters once the VM is built and before any thread starts (Firecracker's
//! jailer, done in-process): a mount namespace whose root is an empty read-only tmpfs holding
//! only the directories of its sockets, a new IPC namespace, no capabilities, `no_new_privs`,
//! not dumpable, and, when started as root, an unprivileged user and group. What the VMM
//! needs after set-up it already holds as open descriptors.
//!
//! Everything here acts on the calling thread only (namespaces, capabilities), so it must run
//! while the process has one thread.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The user and group the jailed VMM becomes when started as root: `nobody`.
pub const DEFAULT_USER: JailUser = JailUser {
    uid: 65534,
    gid: 65534,
};

/// Where the new root is put together (a tmpfs mounted there, in the new mount namespace only).
const STAGING: &str = "/tmp";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: cannot {step}")]
    Step {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("jail: {0} is /, which would keep the whole file system reachable")]
    KeepsRoot(String),
}

/// An unprivileged identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for JailUser {
    type Err = String;

    /// `UID:GID`, both numbers other than 0.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not UID:GID (numbers, not 0)");
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        let uid: u32 = uid.parse().map_err(|_| bad())?;
        let gid: u32 = gid.parse().map_err(|_| bad())?;
        if uid == 0 || gid == 0 {
            return Err(bad());
        }
        Ok(JailUser { uid, gid })
    }
}

/// What the jail keeps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailConfig {
    /// Directories still reached by path, at the same path: where the vsock and API sockets
    /// are (guest connections to host ports connect there, and the sockets are removed at
    /// the end).
    pub keep: Vec<PathBuf>,
    /// Who the VMM becomes when started as root.
    pub user: JailUser,
}

/// Enters the jail. Call it with one thread in the process.
pub fn enter(cfg: &JailConfig) -> Result<(), JailError> {
    // SAFETY: these calls take no pointers.
    let (uid, gid, root) = unsafe { (libc::getuid(), libc::getgid(), libc::geteuid() == 0) };
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if !root {
        // Mounting takes capabilities, which an unprivileged user has in a namespace of its own.
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare takes no pointers.
    check(unsafe { libc::unshare(flags) }, "enter new namespaces")?;
    if !root {
        map_self(uid, gid)?;
    }
    // Opened in the new namespace (a bind mount's source must be in it), before anything is
    // mounted over them.
    let keep = open_kept(&cfg.keep)?;
    build_root(&keep)?;
    drop_bounding_set()?;
    if root {
        keeping_death_signal(|| become_user(cfg.user))?;
    }
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "set no_new_privs")?;
    // SAFETY: as above.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    check(rc, "make the process not dumpable")?;
    #[cfg(feature = "test-hooks")]
    probe();
    Ok(())
}

/// Each kept directory (its real path) and a descriptor for it.
fn open_kept(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, File)>, JailError> {
    let mut kept: Vec<(PathBuf, File)> = Vec::new();
    for dir in dirs {
        let real = dir
            .canonicalize()
            .map_err(step(format!("find {}", dir.display())))?;
        if real == Path::new("/") {
            return Err(JailError::KeepsRoot(dir.display().to_string()));
        }
        if kept.iter().any(|(p, _)| *p == real) {
            continue;
        }
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&real)
            .map_err(step(format!("open {}", real.display())))?;
        kept.push((real, file));
    }
    Ok(kept)
}

/// Root and group map to themselves in the new user namespace.
fn map_self(uid: u32, gid: u32) -> Result<(), JailError> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(step(format!("write {file}")))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

/// A tmpfs with the kept directories bound in at their own paths becomes the root; the old
/// root is detached, and the new one made read-only.
fn build_root(keep: &[(PathBuf, File)]) -> Result<(), JailError> {
    // Nothing done in this namespace may reach the host's.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("rvmm-jail"),
        STAGING,
        Some("tmpfs"),
        hardened,
        Some("mode=0755,size=64k"),
    )?;
    for (real, dir) in keep {
        let target = Path::new(STAGING).join(real.strip_prefix("/").unwrap_or(real));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(step(format!("create {}", target.display())))?;
        let source = format!("/proc/self/fd/{}", dir.as_raw_fd());
        mount(
            Some(&source),
            &target.to_string_lossy(),
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    std::env::set_current_dir(STAGING).map_err(step(format!("enter {STAGING}")))?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached next.
    let dot = c".";
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    let pivot = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(pivot as i32, "pivot_root")?;
    // SAFETY: as above.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, "detach the old root")?;
    std::env::set_current_dir("/").map_err(step("enter the new root".into()))?;
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hardened,
        None,
    )
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let c = |s: &str| CString::new(s).map_err(|e| step(format!("mount {target}"))(e.into()));
    let source = source.map(c).transpose()?;
    let target_c = c(target)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(rc, &format!("mount {target}"))
}

/// No capability can come back through exec or file capabilities.
fn drop_bounding_set() -> Result<(), JailError> {
    for cap in 0.. {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if err.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                break;
            }
            return Err(step("drop the capability bounding set".into())(err));
        }
    }
    // SAFETY: as above.
    let ambient = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(ambient, "clear ambient capabilities")
}

fn become_user(user: JailUser) -> Result<(), JailError> {
    let what = format!("become {}:{}", user.uid, user.gid);
    // SAFETY: an empty group list: no pointer is read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, &what)?;
    // SAFETY: integer arguments; glibc applies them to every thread (there is one).
    let rc = unsafe { libc::setresgid(user.gid, user.gid, user.gid) };
    check(rc, &what)?;
    // SAFETY: as above.
    let rc = unsafe { libc::setresuid(user.uid, user.uid, user.uid) };
    check(rc, &what)
}

/// Runs `change` (of credentials, which clears the parent-death signal) and sets that signal
/// again, so a VM whose parent asked to be taken along when it dies still is. A parent that
/// died in between gets the signal sent at once.
fn keeping_death_signal(change: impl FnOnce() -> Result<(), JailError>) -> Result<(), JailError> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which is valid.
    let rc = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
    check(rc, "read the parent-death signal")?;
    // SAFETY: getppid takes no arguments.
    let parent = unsafe { libc::getppid() };
    change()?;
    if signal != 0 {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) };
        check(rc, "set the parent-death signal again")?;
        // SAFETY: getppid takes no arguments.
        let now = unsafe { libc::getppid() };
        if now != parent {
            // SAFETY: raise sends the signal number the kernel gave us to this thread.
            unsafe { libc::raise(signal) };
        }
    }
    Ok(())
}

/// The kernel's capability sets, as capset takes them (version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the effective, permitted and inheritable sets.
fn drop_capabilities() -> Result<(), JailError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: the header and the two data words are valid for the call, as capset(2) asks.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(rc as i32, "drop capabilities")
}

fn check(rc: i32, what: &str) -> Result<(), JailError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(step(what.to_string())(io::Error::last_os_error()))
    }
}

fn step(step: String) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

/// For the jail test: tries to open `RVMM_TEST_JAIL_PROBE` from inside the jail and says how
/// that went on stderr.
#[cfg(feature = "test-hooks")]
fn probe() {
    if let Some(path) = std::env::var_os("RVMM_TEST_JAIL_PROBE") {
        let path = Path::new(&path);
        match File::open(path) {
            Ok(_) => eprintln!("rvmm: jail probe: opened {}", path.display()),
            Err(e) => eprintln!("rvmm: jail probe: {}: {e}", path.display()),
        }
    }
}

/// A path made absolute against the current directory, as the jail's `/` will not be it.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The directory a socket at `path` lives in.
pub fn socket_dir(path: &Path) -> PathBuf {
    let abs = absolute(path);
    abs.parent().map_or(abs.clone(), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_parses_uid_and_gid() {
        let u: JailUser = "1000:100".parse().unwrap();
        assert_eq!(
            u,
            JailUser {
                uid: 1000,
                gid: 100
            }
        );
        for bad in ["", "1000", "0:1", "1:0", "a:1", "1:-1", "1:2:3"] {
            assert!(bad.parse::<JailUser>().is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_dir_is_absolute() {
        assert_eq!(
            socket_dir(Path::new("/run/x/api.sock")),
            Path::new("/run/x")
        );
        let rel = socket_dir(Path::new("api.sock"));
        assert!(rel.is_absolute());
        assert_eq!(rel, std::env::current_dir().unwrap());
    }

    #[test]
    fn keeping_the_root_is_refused() {
        let err = open_kept(&[PathBuf::from("/")]).unwrap_err();
        assert!(err.to_string().contains("whole file system"), "{err}");
    }
}
