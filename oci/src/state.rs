//! What rvmm-oci knows of a container between its commands: `<root>/<id>/state.json`, written
//! by `create` and the keeper (the process that holds the VM and whose pid the caller waits
//! on), read by every other command. Whether the container still runs is never taken from the
//! file: the keeper's pid is checked, together with its start time so that a reused pid is
//! not mistaken for it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The runtime spec version the state output follows.
pub const OCI_VERSION: &str = "1.0.2";
const STATE_FILE: &str = "state.json";
/// Where the keeper leaves the one-line reason it failed, for `create` to report.
const ERROR_FILE: &str = "error";
/// The keeper's control socket: `start`, `kill N`.
const CONTROL_SOCKET: &str = "control.sock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "container id {0:?} is not valid (letters, digits, '_', '-', '.'; not starting with '.')"
    )]
    BadId(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("cannot access the state of {0}")]
    Io(String, #[source] std::io::Error),
    #[error("the state of {0} is damaged")]
    Json(String, #[source] serde_json::Error),
}

/// A container's lifecycle as the runtime spec names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    /// `pause`: the VM's vCPUs are stopped (runc's extension of the spec's states).
    Paused,
    Stopped,
}

/// The persisted record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    /// The keeper's pid and start time (clock ticks after boot, /proc/PID/stat field 22).
    pub pid: i32,
    pub start_time: u64,
    pub status: Status,
    pub created: String,
    /// The VM's socket directory, which a killed keeper leaves behind for `delete`.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    #[serde(default)]
    pub annotations: Map<String, Value>,
}

/// The directory of one container's state.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub id: String,
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path, id: &str) -> Result<StateDir, StateError> {
        let valid = !id.is_empty()
            && !id.starts_with('.')
            && id.len() <= 1024
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid {
            return Err(StateError::BadId(id.into()));
        }
        Ok(StateDir {
            id: id.into(),
            dir: root.join(id),
        })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |e| StateError::Io(self.id.clone(), e)
    }

    /// Makes the directory; an existing one means the id is taken.
    pub fn create(&self) -> Result<(), StateError> {
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).map_err(self.io())?;
        }
        match std::fs::create_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(self.id.clone()))
            }
            other => other.map_err(self.io()),
        }
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }

    /// Written whole under another name and renamed, so that readers never see half of it.
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_vec(record).map_err(|e| StateError::Json(self.id.clone(), e))?;
        std::fs::write(&tmp, json).map_err(self.io())?;
        std::fs::rename(&tmp, self.dir.join(STATE_FILE)).map_err(self.io())
    }

    /// The record, or None while `create` has not written one yet.
    pub fn load(&self) -> Result<Option<Record>, StateError> {
        if !self.exists() {
            return Err(StateError::NotFound(self.id.clone()));
        }
        match std::fs::read(self.dir.join(STATE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StateError::Json(self.id.clone(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io(self.id.clone(), e)),
        }
    }

    /// The record with its status as it is now: stopped once the keeper is gone.
    pub fn current(&self) -> Result<Record, StateError> {
        let mut record = self
            .load()?
            .ok_or_else(|| StateError::NotFound(self.id.clone()))?;
        if !keeper_alive(record.pid, record.start_time) {
            record.status = Status::Stopped;
        }
        Ok(record)
    }

    pub fn set_error(&self, message: &str) {
        let _ = std::fs::write(self.dir.join(ERROR_FILE), message);
    }

    pub fn error(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(ERROR_FILE)).ok()
    }

    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(self.io()),
        }
    }
}

/// `pid`'s start time, and whether it is a zombie, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is rest's 0th, field 22 (starttime) its 19th.
    let start = fields.get(19)?.parse().ok()?;
    Some((start, fields.first() == Some(&"Z")))
}

pub fn start_time(pid: i32) -> u64 {
    proc_stat(pid).map_or(0, |(start, _)| start)
}

/// Whether the keeper `pid`, started at `start`, still lives (a zombie has ended).
pub fn keeper_alive(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((s, false)) if s == start)
}

/// Now, as RFC 3339 UTC, for the state's `created`.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// The runtime spec's state document, as `state` prints it.
pub fn spec_state(record: &Record) -> Value {
    let pid = if record.status == Status::Stopped {
        0
    } else {
        record.pid
    };
    serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": record.id,
        "status": record.status,
        "pid": pid,
        "bundle": record.bundle,
        "created": record.created,
        "annotations": record.annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn ids_are_checked() {
        let root = Path::new("/run/x");
        for good in ["a", "abc-1_2.3", "0123456789abcdef"] {
            assert!(StateDir::new(root, good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", ".hidden"] {
            assert!(
                matches!(StateDir::new(root, bad), Err(StateError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn saves_loads_and_sees_a_dead_keeper_as_stopped() {
        let tmp = TempDir::new().unwrap();
        let state = StateDir::new(tmp.as_path(), "c1").unwrap();
        assert!(matches!(state.load(), Err(StateError::NotFound(_))));
        state.create().unwrap();
        assert!(matches!(state.create(), Err(StateError::Exists(_))));
        assert_eq!(state.load().unwrap(), None);
        let me = std::process::id() as i32;
        let mut record = Record {
            id: "c1".into(),
            bundle: "/b".into(),
            pid: me,
            start_time: start_time(me),
            status: Status::Running,
            created: now_rfc3339(),
            run_dir: None,
            annotations: Map::new(),
        };
        state.save(&record).unwrap();
        assert_eq!(state.current().unwrap().status, Status::Running);
        let out = spec_state(&state.current().unwrap());
        assert_eq!(out["status"], "running");
        assert_eq!(out["pid"], me);
        assert_eq!(out["ociVersion"], OCI_VERSION);
        // Same pid, another start time: a reused pid, not our keeper.
        record.start_time += 1;
        state.save(&record).unwrap();
        assert_eq!(state.current().unwrap().status, Status::Stopped);
        assert_eq!(spec_state(&state.current().unwrap())["pid"], 0);
        state.set_error("boom");
        assert_eq!(state.error().as_deref(), Some("boom"));
        state.remove().unwrap();
        assert!(!state.exists());
        state.remove().unwrap();
    }
}
