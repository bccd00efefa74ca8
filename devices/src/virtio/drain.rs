//! Draining a queue whose chains are each answered at once (block and rng requests; net,
//! console and vsock transmit): pop, serve, return, with EVENT_IDX notification suppression
//! around the batch. A net transmit chain the host side cannot take yet stays on the ring.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// The queue itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// Rings unreadable or unwritable, avail index insane.
    #[error("virtio queue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The driver claims more chains than the ring holds, or names a head beyond the queue.
    #[error("avail ring is inconsistent")]
    BrokenRing,
}

/// Pops the next available chain. Refuses what virtio-queue would otherwise log at error
/// level on every notification, a log flood under the guest's control: an avail index more
/// than a ring ahead (nothing is popped), and a head index beyond the queue (that entry is
/// consumed, since it names no chain that could be returned).
pub fn pop_chain<'a>(
    mem: &'a GuestMemoryMmap,
    queue: &mut Queue,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DrainError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(DrainError::Queue)?;
    if avail.0.wrapping_sub(queue.next_avail()) > queue.size() {
        return Err(DrainError::BrokenRing);
    }
    match queue.pop_descriptor_chain(mem) {
        Some(chain) if chain.head_index() >= queue.size() => Err(DrainError::BrokenRing),
        chain => Ok(chain),
    }
}

/// Serves every available chain with `serve`, which returns the bytes it wrote into the chain;
/// returns whether the driver needs an interrupt.
pub fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<bool, DrainError> {
    drain_until(mem, queue, |chain| Some(serve(chain)))
}

/// Like [`drain`], but `serve` may answer `None`: that chain stays available, to be popped
/// again by the next drain, and this one ends there.
pub fn drain_until(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> Result<bool, DrainError> {
    drain_chains(mem, queue, |chain| {
        serve(chain).map_or(Served::NotYet, Served::Used)
    })
}

/// What became of a chain handed to a drain's `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Answered, with this many bytes written into its device-writable buffers.
    Used(u32),
    /// Kept by the device, which returns it later (asynchronous I/O).
    Held,
    /// Not taken: it stays available and the drain ends.
    NotYet,
}

/// The general drain: every available chain goes to `serve`; returns whether the driver needs
/// an interrupt for the chains answered at once.
pub fn drain_chains(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Served,
) -> Result<bool, DrainError> {
    let mut used_total = 0usize;
    'drain: loop {
        // With EVENT_IDX, suppress notifications while draining, then re-check for chains
        // added before the driver saw notifications re-enabled.
        queue.disable_notification(mem).map_err(DrainError::Queue)?;
        let mut taken = 0;
        while let Some(chain) = pop_chain(mem, queue)? {
            let head = chain.head_index();
            match serve(chain) {
                Served::Used(used) => {
                    queue.add_used(mem, head, used).map_err(DrainError::Queue)?;
                    used_total += 1;
                }
                Served::Held => {}
                Served::NotYet => {
                    queue.go_to_previous_position();
                    break 'drain;
                }
            }
            taken += 1;
        }
        if !queue.enable_notification(mem).map_err(DrainError::Queue)? {
            break;
        }
        // More announced but none could be popped: looping would spin forever.
        if taken == 0 {
            return Err(DrainError::BrokenRing);
        }
    }
    if used_total == 0 {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(DrainError::Queue)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Address, Bytes};

    use super::*;
    use crate::virtio::block::test_utils::{mem, R};
    use crate::virtio::net::test_utils::Driver;

    #[test]
    fn bad_heads_and_avail_indices_end_the_drain_unserved() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(0x1000, 16, R)]);
        let mut queue = driver.queue();
        let avail = driver.mock.avail_addr();
        // Ring slot 0 names head 200 of a 16-entry queue.
        mem.write_obj(200u16, avail.unchecked_add(4)).unwrap();
        let mut served = 0;
        let res = drain(&mem, &mut queue, |_| {
            served += 1;
            0
        });
        assert!(matches!(res, Err(DrainError::BrokenRing)), "{res:?}");
        // The bad entry is consumed; an avail index a whole ring ahead is refused too.
        mem.write_obj(1000u16, avail.unchecked_add(2)).unwrap();
        let res = drain(&mem, &mut queue, |_| {
            served += 1;
            0
        });
        assert!(matches!(res, Err(DrainError::BrokenRing)), "{res:?}");
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(served, 0);
        assert!(driver.used().is_empty());
    }
}
