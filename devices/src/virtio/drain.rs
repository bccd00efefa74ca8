//! Draining a queue whose chains are each answered at once (block and rng requests; net,
//! console and vsock transmit): pop, serve, return, with EVENT_IDX notification suppression
//! around the batch.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// The queue itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// Rings unreadable or unwritable, avail index insane.
    #[error("virtio queue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The driver claims more chains than it made available.
    #[error("avail ring index is inconsistent")]
    BrokenRing,
}

/// Serves every available chain with `serve`, which returns the bytes it wrote into the chain;
/// returns whether the driver needs an interrupt.
pub fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<bool, DrainError> {
    let mut served_total = 0usize;
    loop {
        // With EVENT_IDX, suppress notifications while draining, then re-check for chains
        // added before the driver saw notifications re-enabled.
        queue.disable_notification(mem).map_err(DrainError::Queue)?;
        let mut served = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = serve(chain);
            queue.add_used(mem, head, used).map_err(DrainError::Queue)?;
            served += 1;
        }
        served_total += served;
        if !queue.enable_notification(mem).map_err(DrainError::Queue)? {
            break;
        }
        // More announced but none could be popped: looping would spin forever.
        if served == 0 {
            return Err(DrainError::BrokenRing);
        }
    }
    if served_total == 0 {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(DrainError::Queue)
}
