//! The shared, long-lived container VM (`rvmm vm start`), Docker Desktop's model: one VM in
//! the background hosts many containers, and `rvmm run --vm NAME` runs in it without a boot.
//!
//! `rvmm vm start` starts a keeper (`keeper.rs`: rvmm itself, `vm start --foreground`, in a
//! session of its own) that boots the container guest with a balloon (free page reporting),
//! the user network and the host's image store shared read-only over virtio-fs, holds the
//! agent's first connection (whose end powers the guest off) and a lock that says it lives
//! (`state.rs`). Every other command (`client.rs`) opens a session of its own with the agent
//! through the VM's vsock socket: images reach the VM as disk files on the share, which the
//! agent loop-mounts under each container's overlay.

pub mod client;
pub mod keeper;
pub mod state;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::network::{Network, NetworkError};
use crate::session::SessionError;
use crate::vm::VmError;

/// The VM `rvmm run --vm`, `rvmm vm start` and the others use when none is named.
pub const DEFAULT_VM: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("VM name {0:?} is invalid (letters, digits, '_', '.', '-', at most 40, not first '.' or '-')")]
    BadName(String),
    #[error("VM {0} is already running")]
    VmRunning(String),
    #[error("VM {0} is not running (rvmm vm start --name {0})")]
    NoVm(String),
    #[error("VM {0} is paused (rvmm vm resume {0})")]
    Paused(String),
    #[error("VM {name} did not start: {why}")]
    StartFailed { name: String, why: String },
    #[error("VM {name} ended: {why}")]
    VmEnded { name: String, why: String },
    #[error("state directory {0}")]
    State(PathBuf, #[source] io::Error),
    #[error("cannot start the VM's keeper")]
    Spawn(#[source] io::Error),
    #[error("cannot handle signals")]
    Signals(#[source] io::Error),
    #[error("the image store {0} cannot be shared")]
    Images(PathBuf, #[source] io::Error),
    #[error("no running VM has a container named {0:?}")]
    NoContainer(String),
    #[error("VMs {vms} each have a container named {name:?}: pick one with --vm")]
    Ambiguous { name: String, vms: String },
    #[error("the agent answered {0}")]
    Unexpected(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// `rvmm vm start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmOptions {
    pub name: String,
    pub cpus: u8,
    pub memory_mib: u64,
    /// `[HOSTIP:]HOSTPORT:PORT[/tcp|udp]` each: host ports forwarded to the VM, where any
    /// container on the VM's network may listen.
    pub publish: Vec<String>,
    /// None: user-mode networking through passt.
    pub network: Option<Network>,
    /// The container guest's directory; None: the cache's.
    pub guest: Option<PathBuf>,
    /// How long the guest may take to boot to its agent.
    pub agent_timeout: Duration,
    /// Be the keeper: run in this process until the VM is stopped.
    pub foreground: bool,
}
