//! Why a device cannot be saved or restored. The states themselves live with their devices
//! (`virtio::mmio::MmioState`, `legacy::serial::SerialSnapshot`,
//! `legacy::ioapic::IoApicSnapshot`): plain serde data, restored onto freshly built devices of
//! the same configuration while guest memory already holds the saved contents.

use crate::virtio::mmio::MmioError;
use crate::virtio::ActivateError;

/// Errors saving or restoring a device.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The device keeps state rvmm cannot reach (virtio-fs: its queues live in the backend).
    #[error("{0} cannot be snapshotted")]
    Unsupported(&'static str),
    /// The device holds requests it has not answered yet; try again once it has.
    #[error("{0} has requests in flight")]
    Busy(&'static str),
    /// The device was asked for queue positions while it was not running.
    #[error("{0} is not running")]
    NotRunning(&'static str),
    /// The saved state is for another kind of device, or is not one a device can be in.
    #[error("the snapshot does not match this device: {what}")]
    Mismatch {
        /// What differs.
        what: String,
    },
    /// A saved queue cannot be used (misaligned, or its rings outside guest memory).
    #[error("a saved queue is unusable")]
    Queue(#[source] MmioError),
    /// The device refused to start with the saved queues.
    #[error("the restored device cannot start")]
    Activate(#[source] ActivateError),
}
