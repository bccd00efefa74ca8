//! virtio-balloon with free page reporting: memory the guest has freed goes back to the host.
//!
//! rvmm never asks the guest to inflate (the target stays 0); what matters is the reporting
//! queue, on which Linux (`CONFIG_PAGE_REPORTING`) hands over runs of free pages a couple of
//! seconds after they were freed. The device discards them: `MADV_DONTNEED` on private guest
//! RAM, `MADV_REMOVE` on shared (memfd) RAM, whose pages would otherwise stay in the file. A
//! page the guest touches again comes back zero-filled, which is all a free page may hold.
//!
//! The statistics queue (`stats`) brings the guest's own memory figures every
//! [`STATS_INTERVAL`] to a file, for the host's tools.
//!
//! `handler` turns chains into page ranges, `discard` gives them back, `device` is the
//! [`crate::virtio::VirtioDevice`] and event-loop glue.

mod device;
pub mod discard;
pub mod handler;
pub mod stats;

use std::time::Duration;

pub use device::{Balloon, BalloonError};

/// The feature bit of free page reporting (virtio-bindings has no balloon header).
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page, whatever the guest's: PFNs on the inflate and deflate queues count
/// 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;

/// The queues, in order: the reporting queue follows the statistics queue, since the
/// free-page-hint queue is not offered (Linux numbers only the queues that exist).
pub const INFLATE: usize = 0;
/// Pages the guest takes back: nothing to do, a discarded page faults back in.
pub const DEFLATE: usize = 1;
/// The guest's memory statistics.
pub const STATS: usize = 2;
/// Free page reports.
pub const REPORTING: usize = 3;
/// Queue count.
pub const QUEUES: usize = 4;
/// How often the device asks for fresh statistics, when they go to a file.
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);
