//! virtio-vsock with a host side on Unix sockets (Firecracker's "hybrid" vsock).
//!
//! `packet` reads and writes the packet header and the chains that carry it, `connection` is
//! one stream's state machine with its credit-based flow control, `muxer` maps connections to
//! host Unix sockets, and `device` is the [`crate::virtio::VirtioDevice`] and event-loop glue.

pub mod connection;
mod device;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockConfig, VsockError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue: transport events, of which the device sends only the reset that
/// follows a restore.
pub const EVENT_QUEUE: usize = 2;
