//! virtio-rng (entropy device) fed from the host's `getrandom(2)`.
//!
//! `handler` fills the request queue's buffers, `device` is the
//! [`crate::virtio::VirtioDevice`] and event-loop glue.

mod device;
pub mod handler;

pub use device::{Rng, RngError};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes put into one chain: bounds the event loop's time, and the host memory, spent on
/// one request (Linux asks for at most a few hundred bytes at a time).
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;
