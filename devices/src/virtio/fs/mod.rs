//! virtio-fs as a vhost-user frontend: the device model holds the configuration space and the
//! negotiation, and an external backend (virtiofsd) serves the queues from the shared guest
//! memory.

mod device;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Fs;

/// The longest tag the configuration space holds (virtio 1.2, 5.11.4).
pub const MAX_TAG_LEN: usize = 36;
/// The high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
/// Queue size offered to the driver; virtiofsd handles up to 1024.
const QUEUE_SIZE: u16 = 1024;
/// `tag[36]` then `le32 num_request_queues`.
const CONFIG_LEN: usize = MAX_TAG_LEN + 4;

/// Errors setting up or running a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No backend listens on the socket.
    #[error("cannot connect to the vhost-user backend at {path}")]
    Connect {
        /// The socket given.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user request failed or the backend answered nonsense.
    #[error("vhost-user {step} failed")]
    Protocol {
        /// The request.
        step: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something virtio-fs needs.
    #[error("the vhost-user backend does not offer {0}")]
    Unsupported(&'static str),
    /// The backend closed its socket; it cannot come back without a new VM.
    #[error("the vhost-user backend has disconnected")]
    Disconnected,
    /// Guest memory is private to rvmm, so the backend could not map it.
    #[error("guest memory is not shared (memfd-backed)")]
    NotShareable,
    /// A queue address is outside guest memory.
    #[error("queue {0} lies outside guest memory")]
    QueueAddress(usize),
    /// The tag is empty or too long.
    #[error("tag must be 1 to {MAX_TAG_LEN} bytes")]
    Tag,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A virtio-fs device's options.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// What the guest mounts.
    pub tag: String,
    /// The vhost-user backend's socket.
    pub socket: PathBuf,
}

/// The configuration space of `tag`: NUL-padded, then one request queue.
fn config_space(tag: &str) -> Result<[u8; CONFIG_LEN], FsError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(FsError::Tag);
    }
    let mut config = [0u8; CONFIG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    let requests = (NUM_QUEUES as u32 - 1).to_le_bytes();
    config[MAX_TAG_LEN..].copy_from_slice(&requests);
    Ok(config)
}
