//! Where a shared VM's state lives: `<base>/vms/<name>/` with `vm.json` (written by the keeper
//! once the agent answered), the keeper's log and the guest console. Whether the VM runs is
//! never taken from the file: the keeper holds an exclusive `flock` on the directory's `lock`
//! for its whole life, so a keeper that died, however it died, leaves a lock anyone can take,
//! and its directory is stale.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rvmm_agent::registry::valid_name;
use serde::{Deserialize, Serialize};

use super::SharedError;

const RECORD: &str = "vm.json";
const LOCK: &str = "lock";
const KEEPER_LOG: &str = "keeper.log";

/// `$XDG_RUNTIME_DIR/rvmm`, else `/run/rvmm` for root and `/tmp/rvmm-UID` for others.
pub fn state_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rvmm");
    }
    // SAFETY: getuid has no preconditions.
    match unsafe { libc::getuid() } {
        0 => PathBuf::from("/run/rvmm"),
        uid => PathBuf::from(format!("/tmp/rvmm-{uid}")),
    }
}

/// A running shared VM, as its keeper describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    /// The keeper, which `rvmm vm stop` signals.
    pub pid: i32,
    /// The VM's own rvmm process, whose memory `rvmm vm status` reports.
    pub vm_pid: i32,
    pub cpus: u8,
    pub memory_mib: u64,
    /// The VM's vsock socket: sessions with its agent start here.
    pub vsock: PathBuf,
    /// Host ports forwarded to the VM.
    pub publish: Vec<String>,
    /// The image disk cache the VM shares: `rvmm run --vm` builds disks there.
    pub images: PathBuf,
    /// Seconds since the epoch when the VM became ready.
    pub started: u64,
}

/// The state directory of the VM `name`.
pub struct VmDir {
    pub name: String,
    pub path: PathBuf,
}

impl VmDir {
    pub fn new(base: &Path, name: &str) -> Result<VmDir, SharedError> {
        check_name(name)?;
        Ok(VmDir {
            name: name.into(),
            path: base.join("vms").join(name),
        })
    }

    /// Every VM directory under `base`, by name.
    pub fn all(base: &Path) -> Vec<VmDir> {
        let mut names: Vec<String> = fs::read_dir(base.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
            .iter()
            .filter_map(|n| VmDir::new(base, n).ok())
            .collect()
    }

    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// The guest's memory statistics, as the VM's balloon writes them.
    pub fn balloon_stats(&self) -> PathBuf {
        self.path.join("balloon.json")
    }

    pub fn keeper_log(&self) -> PathBuf {
        self.path.join(KEEPER_LOG)
    }

    /// The keeper's lock: held until the returned file is closed. Stale state of an earlier
    /// keeper is removed once it is taken.
    pub fn lock(&self) -> Result<File, SharedError> {
        let io_err = |e| SharedError::State(self.path.clone(), e);
        fs::create_dir_all(&self.path).map_err(io_err)?;
        let file = open_lock(&self.path.join(LOCK), true).map_err(io_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(SharedError::VmRunning(self.name.clone()));
        }
        // What a keeper that was killed left: its record, console log and socket directory.
        for entry in fs::read_dir(&self.path).map_err(io_err)?.flatten() {
            let name = entry.file_name();
            if name == LOCK || name == KEEPER_LOG {
                continue;
            }
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        Ok(file)
    }

    /// Whether a keeper holds the lock.
    pub fn alive(&self) -> bool {
        let Ok(file) = open_lock(&self.path.join(LOCK), false) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; a shared lock taken here goes with the file.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }

    /// The record of a running VM; None while it starts, or when it is not running.
    pub fn record(&self) -> Option<VmRecord> {
        let text = fs::read(self.path.join(RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save(&self, record: &VmRecord) -> Result<(), SharedError> {
        let io_err = |e| SharedError::State(self.path.clone(), e);
        let tmp = self.path.join(format!("{RECORD}.tmp"));
        let json = serde_json::to_vec_pretty(record).map_err(|e| io_err(e.into()))?;
        fs::write(&tmp, json).map_err(io_err)?;
        fs::rename(&tmp, self.path.join(RECORD)).map_err(io_err)
    }

    /// Removes the directory of a VM that is not running.
    pub fn remove(&self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn open_lock(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

/// Names are shorter than containers': the VM's vsock socket path must fit in 108 bytes.
const MAX_NAME: usize = 40;

fn check_name(name: &str) -> Result<(), SharedError> {
    (valid_name(name) && name.len() <= MAX_NAME)
        .then_some(())
        .ok_or_else(|| SharedError::BadName(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            pid: 1,
            vm_pid: 2,
            cpus: 2,
            memory_mib: 1024,
            vsock: "/tmp/v".into(),
            publish: vec!["8080:80".into()],
            images: "/cache/images".into(),
            started: 3,
        }
    }

    #[test]
    fn the_lock_says_whether_a_keeper_lives() {
        let base = TempDir::new().unwrap();
        let dir = VmDir::new(base.as_path(), "dev").unwrap();
        assert!(!dir.alive());
        let lock = dir.lock().unwrap();
        assert!(dir.alive());
        assert!(matches!(dir.lock(), Err(SharedError::VmRunning(n)) if n == "dev"));
        dir.save(&record("dev")).unwrap();
        assert_eq!(dir.record(), Some(record("dev")));
        drop(lock);
        assert!(!dir.alive());
        // A new keeper drops what the dead one left.
        let _lock = dir.lock().unwrap();
        assert_eq!(dir.record(), None);
        assert_eq!(
            VmDir::all(base.as_path())
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["dev"]
        );
    }

    #[test]
    fn refuses_names_that_are_not_plain_words() {
        let base = Path::new("/nonexistent");
        for bad in ["", "-x", ".x", "a/b", "../x", &"x".repeat(41)] {
            assert!(
                matches!(VmDir::new(base, bad), Err(SharedError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(VmDir::new(base, "dev-1.x_y").is_ok());
    }
}
