//! Fast starts for `rvmm run`: the container guest is booted once to "agent ready", its
//! agent parked, and the VM snapshotted into the cache; later runs with the same guest, rvmm
//! and VM shape restore that snapshot instead of booting. The snapshot's second disk is an
//! empty image slot: each restore fills it with the run's image disk (the guest learns the
//! new size from a configuration-change interrupt). The agent, whose connection the vsock
//! transport reset ends, connects again as at a boot, and its first request gives it the
//! host's time and fresh entropy and has it mount the image (`Message::Resume`).
//!
//! The cache key covers everything the snapshot depends on: the rvmm binary, the guest's
//! kernel and root disk, vCPUs, memory, networks and published ports. A snapshot that fails
//! to restore is removed, and the run boots instead, with a warning.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rvmm_agent::protocol::{Message, Resume};
use rvmm_vmm::error_chain;
use sha2::{Digest, Sha256};

use crate::session::{Session, SessionError};
use crate::vm::{Origin, VmError, VmLaunch, VmProcess};

/// Bumped when what a snapshot holds for the agent changes meaning.
const FORMAT: u32 = 1;
/// The image slot's placeholder: an empty disk.
const EMPTY_DISK: &str = "empty.img";
/// The snapshot directory the building VM writes, in its own run directory.
const BUILT: &str = "snapshot";
/// Snapshots kept; the oldest go when a new one is made.
const KEEP: usize = 4;
const ENTROPY_BYTES: usize = 32;
/// How long the agent may take to resume: it waits up to 10 s for the image disk.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("the snapshot cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the guest agent answered {0}")]
    Unexpected(String),
}

fn cache_err(path: &Path) -> impl FnOnce(io::Error) -> WarmError + '_ {
    move |source| WarmError::Cache {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a VM like `l` can start from a snapshot: not with host directories (virtio-fs
/// keeps queue state in virtiofsd), a balloon or another network namespace.
pub fn eligible(l: &VmLaunch) -> bool {
    l.shares.is_empty() && !l.balloon && l.balloon_stats.is_none() && l.netns.is_none()
}

/// A VM like `l` restored from the cached snapshot (made first if there is none), with its
/// agent resumed and the first session open; None, after a warning, where that failed and
/// the caller should boot instead.
pub fn start(l: &VmLaunch, cache: &Path, timeout: Duration) -> Option<(VmProcess, Session)> {
    let dir = match snapshot_dir(l, cache) {
        Ok(dir) => dir,
        Err(e) => {
            log::warn!("cannot use start-up snapshots: {}", error_chain(&e));
            return None;
        }
    };
    if !dir.is_dir() {
        if let Err(e) = build(l, &dir, timeout) {
            log::warn!(
                "cannot make a start-up snapshot: {}; booting",
                error_chain(&e)
            );
            return None;
        }
    }
    match restore(l, &dir, timeout) {
        Ok(started) => Some(started),
        Err(e) => {
            log::warn!(
                "cannot restore the start-up snapshot {}: {}; booting instead (the snapshot is \
                 removed)",
                dir.display(),
                error_chain(&e)
            );
            let _ = fs::remove_dir_all(&dir);
            None
        }
    }
}

/// `<cache>/<key>`, the key a digest of what the snapshot depends on.
fn snapshot_dir(l: &VmLaunch, cache: &Path) -> Result<PathBuf, WarmError> {
    let stamp = |path: &Path| -> Result<String, WarmError> {
        let m = fs::metadata(path).map_err(cache_err(path))?;
        Ok(format!(
            "{} {} {}.{} {}",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ))
    };
    let parts = [
        format!("format {FORMAT} rvmm {}", env!("CARGO_PKG_VERSION")),
        stamp(l.vmm)?,
        stamp(&l.guest.kernel)?,
        stamp(&l.guest.rootfs)?,
        format!("cpus {} memory {}", l.cpus, l.memory_mib),
        format!("nets {:?} publish {:?}", l.nets, l.publish),
    ];
    let digest = Sha256::digest(parts.join("\n").as_bytes());
    let key: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(cache.join(key))
}

/// Boots a VM like `l` with an empty image slot, parks its agent, and snapshots it into
/// `dir`. The VM runs in a directory beside `dir`: it is jailed, and writes its snapshot
/// where its sockets are; the finished snapshot is then renamed into place.
fn build(l: &VmLaunch, dir: &Path, timeout: Duration) -> Result<(), WarmError> {
    let cache = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(cache).map_err(cache_err(cache))?;
    let slot = cache.join(EMPTY_DISK);
    fs::write(&slot, b"").map_err(cache_err(&slot))?;
    let launch = VmLaunch {
        image_disk: Some(&slot),
        console_log: None,
        run_dir_in: Some(cache),
        ..*l
    };
    let mut vm = VmProcess::start(&launch)?;
    let mut session = vm.connect(timeout)?;
    match session.ask(&Message::Park)? {
        Message::Done => {}
        // Parked all the same; restored runs only start slower.
        Message::Failed(e) => log::warn!("the start-up snapshot's warm-up container failed: {e}"),
        other => return Err(WarmError::Unexpected(format!("{other:?}"))),
    }
    // With the session open: the agent waits on it, and each restored copy's reset ends it.
    vm.api(&serde_json::json!({ "request": "pause" }))?;
    let built = vm.run_dir().join(BUILT);
    vm.api(&serde_json::json!({ "request": "snapshot", "dir": built }))?;
    drop(session);
    match fs::rename(&built, dir) {
        Ok(()) => {}
        // Another run made it meanwhile.
        Err(_) if dir.is_dir() => {}
        Err(e) => return Err(cache_err(dir)(e)),
    }
    drop(vm);
    prune(cache);
    Ok(())
}

/// Restores a VM like `l` from `dir` and resumes its agent, which connects again once the
/// transport reset has ended its connection of the snapshot.
fn restore(l: &VmLaunch, dir: &Path, timeout: Duration) -> Result<(VmProcess, Session), WarmError> {
    let started = Instant::now();
    let mut vm = VmProcess::launch(l, Origin::Restore(dir))?;
    let mut session = vm.connect(timeout)?;
    log::debug!("restored guest: agent back after {:?}", started.elapsed());
    let realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let resume = Resume {
        realtime_ns,
        entropy: random_bytes().map_err(cache_err(Path::new("/dev/urandom")))?,
    };
    session.set_timeout(Some(RESUME_TIMEOUT))?;
    match session.ask(&Message::Resume(resume))? {
        Message::Done => {
            log::debug!("restored guest: resumed after {:?}", started.elapsed());
            session.set_timeout(None)?;
            Ok((vm, session))
        }
        other => Err(WarmError::Unexpected(format!("{other:?}"))),
    }
}

fn random_bytes() -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0u8; ENTROPY_BYTES];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Removes all but the [`KEEP`] newest snapshots in `cache`. VMs restored from a removed
/// one go on: their memory is mapped.
fn prune(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    let mut snapshots: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| is_key(&e.file_name().to_string_lossy()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    snapshots.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (_, old) in snapshots.iter().skip(KEEP) {
        if let Err(e) = fs::remove_dir_all(old) {
            log::debug!("cannot remove the old snapshot {}: {e}", old.display());
        }
    }
}

fn is_key(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestFiles;
    use vmm_sys_util::tempdir::TempDir;

    fn files(dir: &Path) -> GuestFiles {
        let guest = GuestFiles {
            kernel: dir.join("vmlinux"),
            rootfs: dir.join("rootfs.ext4"),
        };
        fs::write(&guest.kernel, b"kernel").unwrap();
        fs::write(&guest.rootfs, b"rootfs").unwrap();
        guest
    }

    fn launch<'a>(vmm: &'a Path, guest: &'a GuestFiles) -> VmLaunch<'a> {
        VmLaunch {
            vmm,
            guest,
            image_disk: None,
            cpus: 1,
            memory_mib: 256,
            nets: &[],
            publish: &[],
            shares: &[],
            netns: None,
            console_log: None,
            run_dir_in: None,
            balloon: false,
            balloon_stats: None,
        }
    }

    #[test]
    fn the_key_follows_the_guest_and_the_vm_shape_but_not_the_image() {
        let dir = TempDir::new().unwrap();
        let guest = files(dir.as_path());
        let vmm = dir.as_path().join("rvmm");
        fs::write(&vmm, b"rvmm").unwrap();
        let cache = dir.as_path().join("cache");
        let base = launch(&vmm, &guest);
        let key = snapshot_dir(&base, &cache).unwrap();
        assert!(is_key(&key.file_name().unwrap().to_string_lossy()));
        let image = dir.as_path().join("image.ext4");
        let with_image = VmLaunch {
            image_disk: Some(&image),
            ..base
        };
        assert_eq!(snapshot_dir(&with_image, &cache).unwrap(), key);
        let nets = ["user".to_string()];
        for other in [
            VmLaunch { cpus: 2, ..base },
            VmLaunch {
                memory_mib: 512,
                ..base
            },
            VmLaunch {
                nets: &nets,
                ..base
            },
        ] {
            assert_ne!(snapshot_dir(&other, &cache).unwrap(), key);
        }
        // A rebuilt guest is another guest.
        fs::write(&guest.rootfs, b"rootfs, rebuilt").unwrap();
        assert_ne!(snapshot_dir(&base, &cache).unwrap(), key);
    }

    #[test]
    fn host_directories_and_balloons_boot() {
        let dir = TempDir::new().unwrap();
        let guest = files(dir.as_path());
        let vmm = dir.as_path().join("rvmm");
        let base = launch(&vmm, &guest);
        assert!(eligible(&base));
        let shares = ["tag=v0,path=/tmp".to_string()];
        assert!(!eligible(&VmLaunch {
            shares: &shares,
            ..base
        }));
        assert!(!eligible(&VmLaunch {
            balloon: true,
            ..base
        }));
    }

    #[test]
    fn pruning_keeps_the_newest_snapshots() {
        let dir = TempDir::new().unwrap();
        let cache = dir.as_path();
        for i in 0..KEEP + 2 {
            let snap = cache.join(format!("{i:032x}"));
            fs::create_dir(&snap).unwrap();
            let when = UNIX_EPOCH + Duration::from_secs(1_000 + i as u64);
            fs::File::open(&snap).unwrap().set_modified(when).unwrap();
        }
        fs::write(cache.join(EMPTY_DISK), b"").unwrap();
        prune(cache);
        let mut left: Vec<String> = fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected: Vec<String> = (2..KEEP + 2).map(|i| format!("{i:032x}")).collect();
        expected.push(EMPTY_DISK.into());
        expected.sort();
        assert_eq!(left, expected);
    }
}
