//! The virtio-vsock device: the listening socket, configuration space, and the event-loop glue
//! that moves packets between the queues and the muxer.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{read_tx, RxChain, MAX_PKT_DATA};
use super::{EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::snapshot::SnapshotError;
use crate::unix_socket::{listen_at, ListenError};
use crate::virtio::common::{read_config_bytes, VirtioCommon};
use crate::virtio::drain::{drain, drain_until, pop_chain, DrainError};
use crate::virtio::sg::SgList;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

/// Most packets put into the receive queue per event: bounds the loop's time here while the
/// driver keeps posting buffers; the device kicks itself for the rest.
const RX_BUDGET: usize = 256;
/// `struct virtio_vsock_event`'s id telling the driver to drop every connection
/// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, virtio 1.2, 5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How to set up a virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// Where host processes connect to reach guest ports; guest connections to host port P go
    /// to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Errors setting up a virtio-vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0 to 2 are reserved and u32::MAX means "any".
    #[error("guest CID {0} is reserved (use 3 to 4294967294)")]
    Cid(u64),
    /// The host side's socket.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// A queue EventFd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
}

/// A virtio-vsock device whose host side is Unix sockets.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    /// Queues indexed by [`RX_QUEUE`], [`TX_QUEUE`] and [`super::EVENT_QUEUE`].
    common: VirtioCommon<3>,
    /// The driver reset the device: the connections are closed at the next event, where
    /// their sockets can be taken out of the event loop.
    reset_pending: bool,
    /// A restore left the guest's connections without their host sockets: the driver must be
    /// told, in the next event buffer it posts.
    transport_reset: bool,
    /// One transmitted packet's payload.
    tx_data: Vec<u8>,
    /// One received packet's payload, on its way to guest memory.
    rx_data: Box<[u8]>,
    warned: LogOnce,
}

impl Vsock {
    /// Checks the CID and binds the listening socket (replacing a stale socket file nobody
    /// listens on).
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockError> {
        if cfg.cid < 3 || cfg.cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(cfg.cid));
        }
        let common = VirtioCommon::new("virtio-vsock", QUEUE_SIZE).map_err(VsockError::EventFd)?;
        // Last, so that nothing can fail between binding and the muxer that removes the file.
        let listener = listen_at(&cfg.uds_path)?;
        Ok(Self {
            cid: cfg.cid,
            muxer: Muxer::new(cfg.cid, cfg.uds_path, listener),
            common,
            reset_pending: false,
            transport_reset: false,
            tx_data: Vec::with_capacity(MAX_PKT_DATA as usize),
            rx_data: vec![0; MAX_PKT_DATA as usize].into_boxed_slice(),
            warned: LogOnce::default(),
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.muxer.connections()
    }

    /// Hands what the guest sent to the muxer.
    fn transmit(&mut self, ops: &mut EventOps) {
        let Self {
            common,
            muxer,
            tx_data,
            warned,
            ..
        } = self;
        let Some(active) = common.active_or_idle() else {
            return;
        };
        let mem = &active.mem;
        let res = drain(mem, &mut active.queues[TX_QUEUE], |mut chain| {
            match read_tx(mem, &mut chain, tx_data) {
                Ok(hdr) => muxer.handle_packet(&hdr, tx_data, ops),
                Err(e) => {
                    warn_once!(
                        warned,
                        Problem::TxChain,
                        "virtio-vsock: dropping a packet: {}",
                        crate::error_chain(&e)
                    );
                }
            }
            0
        });
        let notify = res.unwrap_or_else(|e| {
            warn_once!(
                warned,
                Problem::Queue,
                "virtio-vsock: transmit queue: {}",
                crate::error_chain(&e)
            );
            // Chains returned before the failure still need announcing.
            true
        });
        if notify {
            self.common.signal_used_queue();
        }
    }

    /// Puts a pending transport reset event into the event queue's next usable buffer.
    fn send_transport_reset(&mut self) {
        let pending = &mut self.transport_reset;
        let warned = &mut self.warned;
        self.common
            .serve(Problem::Queue, "event queue: ", |mem, queues| {
                drain_until(mem, &mut queues[EVENT_QUEUE], |chain| {
                    if !*pending {
                        return None;
                    }
                    let id = EVENT_TRANSPORT_RESET.to_le_bytes();
                    let sg = SgList::new(chain, mem, true, QUEUE_SIZE.into(), u64::MAX);
                    match sg.map(|sg| (sg.len >= id.len() as u64).then_some(sg)) {
                        Ok(Some(sg)) if sg.write_from(mem, &id).is_ok() => {
                            *pending = false;
                            Some(id.len() as u32)
                        }
                        // Unusable: returned empty, and the event waits for the next one.
                        _ => {
                            warn_once!(
                                warned,
                                Problem::RxChain,
                                "virtio-vsock: refusing an event buffer"
                            );
                            Some(0)
                        }
                    }
                })
            });
    }

    /// Puts the muxer's packets into the receive queue while both last.
    fn deliver(&mut self, ops: &mut EventOps) {
        let Some(active) = self.common.active() else {
            return;
        };
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = 0;
        let res = fill_rx(
            &active.mem,
            queue,
            &mut self.muxer,
            &mut self.rx_data,
            ops,
            (&mut used, &mut self.warned),
        );
        let notify = used > 0 && queue.needs_notification(&active.mem).unwrap_or(true);
        if let Err(e) = res {
            warn_once!(
                self.warned,
                Problem::Queue,
                "virtio-vsock: receive queue: {}",
                crate::error_chain(&e)
            );
        } else if used == RX_BUDGET && self.muxer.has_rx() {
            // Come back for the rest after the other event sources had their turn.
            self.common.kick(RX_QUEUE, "receive");
        }
        if notify {
            self.common.signal_used_queue();
        }
    }
}

/// Fills receive chains with the muxer's packets, at most [`RX_BUDGET`]; counts the chains
/// returned in `used`.
fn fill_rx(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    buf: &mut [u8],
    ops: &mut EventOps,
    (used, warned): (&mut usize, &mut LogOnce),
) -> Result<(), DrainError> {
    let mut announced = false;
    while muxer.has_rx() && *used < RX_BUDGET {
        let Some(mut chain) = pop_chain(mem, queue)? else {
            if announced {
                return Err(DrainError::BrokenRing);
            }
            // With EVENT_IDX the driver would not notify otherwise; chains posted before it
            // saw the request are announced here.
            announced = queue.enable_notification(mem).map_err(DrainError::Queue)?;
            if !announced {
                return Ok(());
            }
            continue;
        };
        announced = false;
        let head = chain.head_index();
        let len = match RxChain::new(mem, &mut chain) {
            Ok(mut rx) => {
                let room = rx.room();
                let Some((hdr, n)) = muxer.next_rx(&mut buf[..room], ops) else {
                    // Nothing after all (a socket had no data): keep the chain.
                    queue.go_to_previous_position();
                    return Ok(());
                };
                rx.fill(hdr, &buf[..n])
            }
            Err(e) => Err(e),
        };
        let len = len.unwrap_or_else(|e| {
            warn_once!(
                warned,
                Problem::RxChain,
                "virtio-vsock: receive chain: {}",
                crate::error_chain(&e)
            );
            0
        });
        queue.add_used(mem, head, len).map_err(DrainError::Queue)?;
        *used += 1;
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, _features: u64) {
        // Nothing to adapt: EVENT_IDX is applied by the transport.
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.common.ignore_config_write(offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        self.common.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.common.activate(mem, queues, interrupt)?;
        // Packets queued before activation (host connection requests) need the receive
        // buffers the driver posted without a usable notification.
        self.common.kick(RX_QUEUE, "receive");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        self.reset_pending = true;
        self.transport_reset = false;
        // The connections are closed in the event loop, which this wakes.
        self.common.kick(RX_QUEUE, "receive");
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        // Every chain is answered as it is popped, or put back (a receive buffer with no
        // packet for it yet).
        self.common.queue_positions()
    }

    fn restored(&mut self) {
        // The host sockets of the guest's connections went with the old device: drop what is
        // left of them, and have the driver reset its side. Both happen in the event loop,
        // at the kick the restore gives every queue.
        self.reset_pending = true;
        self.transport_reset = true;
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if std::mem::take(&mut self.reset_pending) {
            self.muxer.reset(ops);
        }
        let fd = events.fd();
        if let Some(queue) = self.common.queue_event(fd) {
            match queue {
                TX_QUEUE => self.transmit(ops),
                EVENT_QUEUE if self.transport_reset => self.send_transport_reset(),
                // Receive notifications mean new buffers, handled below.
                _ => {}
            }
        } else if !self.muxer.handle_event(fd, events.event_set(), ops) {
            return;
        }
        self.deliver(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queue_events(ops);
        self.muxer.init(ops);
    }
}

#[cfg(test)]
mod tests;
