//! The virtio-net device: TAP set-up, configuration space, feature negotiation (with the TAP
//! offloads that follow from it) and the event-loop glue that serves the queues when the driver
//! notifies them and the host side (TAP or stream) when it is readable, or writable again after
//! it could not take a frame. A stream's peer (passt) that hangs up stops the VM.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mac::random_mac;
use super::rx::{Receiver, RxNext};
use super::tx::Transmitter;
use super::{Stream, Tap, TapError, TapIo, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::failure::DeviceFailure;
use crate::snapshot::SnapshotError;
use crate::virtio::common::{read_config_bytes, VirtioCommon};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

/// Length of `struct virtio_net_config` up to `status`.
const CONFIG_LEN: usize = 8;

/// How to back a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing TAP interface.
    pub tap: String,
    /// The guest's MAC address; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
}

/// Errors setting up a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP could not be opened (the message names it and says why).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// No MAC address was given and none could be generated.
    #[error("cannot generate a MAC address")]
    Mac(#[source] io::Error),
    /// The TAP refused to have its offloads reset.
    #[error("cannot set the TAP's offloads")]
    Offload(#[source] io::Error),
    /// A queue EventFd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
}

/// Frame counts since the device was created, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Frames read from the TAP and lost (too big for the guest's buffers, device reset).
    pub dropped_rx: u64,
    /// Frames the guest sent that were dropped (malformed chains, TAP refusals).
    pub dropped_tx: u64,
    /// Received frames that went through the device's host buffer rather than straight into
    /// the guest's buffers.
    pub rx_copied: u64,
    /// Sent frames gathered into a host buffer (for a host side that takes whole frames).
    pub tx_copied: u64,
}

/// A virtio-net device on a TAP or a stream.
pub struct Net {
    tap: Box<dyn TapIo>,
    config_space: [u8; CONFIG_LEN],
    avail_features: u64,
    rx: Receiver,
    tx: Transmitter,
    /// Queues indexed by [`RX_QUEUE`] and [`TX_QUEUE`].
    common: VirtioCommon<2>,
    /// What the host side's fd is registered for with epoll (empty: not registered).
    registered: EventSet,
    /// The receiver can take a frame: watch for readability.
    rx_watch: bool,
    /// A frame, or the rest of one, waits for the host side: watch for writability.
    tx_waiting: bool,
    /// Where a peer process's hang-up is reported (a stream to passt); none for a TAP.
    failure: Option<Arc<DeviceFailure>>,
    /// The host side is gone for good and that was reported: its fd is no longer watched.
    gone: bool,
    warned: LogOnce,
}

impl Net {
    /// Opens the TAP and picks the MAC address.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&cfg.tap)?;
        Self::with_tap(Box::new(tap), cfg.mac)
    }

    /// A device on an already open TAP, or anything else that moves frames like one.
    pub fn with_tap(tap: Box<dyn TapIo>, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Self::build(tap, mac, None)
    }

    /// A device on a stream to a peer process (passt): no offloads, and a peer that hangs up
    /// or a stream that breaks is reported to `failure`, which stops the VM.
    pub fn with_stream(
        stream: Stream,
        mac: Option<[u8; 6]>,
        failure: Arc<DeviceFailure>,
    ) -> Result<Self, NetError> {
        Self::build(Box::new(stream), mac, Some(failure))
    }

    fn build(
        mut tap: Box<dyn TapIo>,
        mac: Option<[u8; 6]>,
        failure: Option<Arc<DeviceFailure>>,
    ) -> Result<Self, NetError> {
        let mac = match mac {
            Some(mac) => mac,
            None => random_mac().map_err(NetError::Mac)?,
        };
        // Transmit offloads need a host side that completes them from the virtio-net header;
        // receive offloads are offered only if it can also hand such frames out.
        let host_offloads = tap.offloads();
        let guest_offloads = host_offloads
            && tap
                .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                .is_ok();
        tap.set_offload(0).map_err(NetError::Offload)?;
        Ok(Self {
            tap,
            config_space: config_space(mac),
            avail_features: features(host_offloads, guest_offloads),
            rx: Receiver::new(),
            tx: Transmitter::new(),
            common: VirtioCommon::new("virtio-net", QUEUE_SIZE).map_err(NetError::EventFd)?,
            registered: EventSet::empty(),
            rx_watch: false,
            tx_waiting: false,
            failure,
            gone: false,
            warned: LogOnce::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config_space[..6]);
        mac
    }

    /// Frame counts so far.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            rx_frames: self.rx.frames(),
            tx_frames: self.tx.frames(),
            dropped_rx: self.rx.dropped(),
            dropped_tx: self.tx.dropped(),
            rx_copied: self.rx.copied(),
            tx_copied: self.tx.copied(),
        }
    }

    /// Sends what the guest transmitted, up to a frame the host side cannot take yet.
    fn transmit(&mut self, ops: &mut EventOps) {
        let mut blocked = false;
        self.common
            .serve(Problem::TxQueue, "transmit queue: ", |mem, queues| {
                let served = self
                    .tx
                    .process_queue(mem, &mut queues[TX_QUEUE], self.tap.as_mut());
                blocked = self.tx.blocked();
                served
            });
        self.flush(blocked, ops);
    }

    /// Sends the rest of a frame the host side took in part, then watches for writability
    /// while that rest or a frame the transmitter could not send (`blocked`) waits.
    fn flush(&mut self, blocked: bool, ops: &mut EventOps) {
        let unsent = matches!(self.tap.flush(), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.tx_waiting = blocked || unsent;
        self.settle(ops);
    }

    /// The host side can take frames again.
    fn writable(&mut self, ops: &mut EventOps) {
        if self.common.is_active() {
            self.transmit(ops);
        } else {
            self.flush(false, ops);
        }
    }

    /// An event on the host side's fd: a peer's hang-up ends the VM; otherwise send what waits
    /// for writability and receive what is readable.
    fn host_event(&mut self, set: EventSet, ops: &mut EventOps) {
        let hang_up = EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR;
        if self.failure.is_some() && set.intersects(hang_up) {
            let peer = self.tap.peer().unwrap_or("the host side");
            let reason = self
                .tap
                .broken()
                .unwrap_or_else(|| format!("{peer} hung up"));
            self.fail(reason, ops);
            return;
        }
        if set.contains(EventSet::OUT) {
            self.writable(ops);
        }
        if set != EventSet::OUT {
            self.receive(ops);
        }
    }

    /// Delivers frames while there are frames and buffers, then makes the host side's epoll
    /// registration match what the receiver waits for.
    fn receive(&mut self, ops: &mut EventOps) {
        // Before activation there is nowhere to put frames; the driver's first receive
        // notification brings the watch back.
        let mut next = RxNext::WaitForBuffers;
        let mut notify = false;
        if let Some(active) = self.common.active() {
            let queue = &mut active.queues[RX_QUEUE];
            match self.rx.pump(&active.mem, queue, self.tap.as_mut()) {
                Ok(pumped) => (next, notify) = (pumped.next, pumped.notify),
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::RxQueue,
                        "virtio-net: receive queue: {}",
                        crate::error_chain(&e)
                    );
                    notify = true;
                }
            }
        }
        if notify {
            self.common.signal_used_queue();
        }
        self.rx_watch = next == RxNext::Watch;
        self.settle(ops);
    }

    /// Reports a host side that broke for good, else brings the epoll registration up to date.
    fn settle(&mut self, ops: &mut EventOps) {
        if let (false, Some(_), Some(reason)) = (self.gone, &self.failure, self.tap.broken()) {
            self.fail(reason, ops);
        } else {
            self.watch(ops);
        }
    }

    /// The host side can never serve the guest again: the VM stops with `reason`.
    fn fail(&mut self, reason: String, ops: &mut EventOps) {
        self.gone = true;
        if let Some(failure) = &self.failure {
            failure.report(format!("virtio-net: {reason}"));
        }
        self.watch(ops);
    }

    /// Watches the host side's fd for readability exactly when the receiver can take a frame
    /// (so the loop neither spins on frames it cannot deliver nor misses ones it can), for
    /// writability while a frame waits for it, and always for a peer's hang-up.
    fn watch(&mut self, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if !self.gone {
            if self.rx_watch {
                want |= EventSet::IN;
            }
            if self.tx_waiting {
                want |= EventSet::OUT;
            }
            if self.failure.is_some() {
                want |= EventSet::READ_HANG_UP;
            }
        }
        if want == self.registered {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let res = if self.registered.is_empty() {
            ops.add(Events::new_raw(fd, want))
        } else if want.is_empty() {
            ops.remove(Events::new_raw(fd, self.registered))
        } else {
            ops.modify(Events::new_raw(fd, want))
        };
        match res {
            Ok(()) => self.registered = want,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Epoll,
                    "virtio-net: cannot update epoll interest in the host side: {e:?}"
                );
            }
        }
    }

    fn set_offload(&mut self, flags: u32) {
        if let Err(e) = self.tap.set_offload(flags) {
            warn_once!(
                self.warned,
                Problem::Offload,
                "virtio-net: cannot set TAP offloads {flags:#x}: {e}"
            );
        }
    }
}

/// The features offered: transmit offloads when the host side completes them from the header
/// (`host_offloads`), receive offloads when it can also hand such frames out.
fn features(host_offloads: bool, guest_offloads: bool) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ];
    if host_offloads {
        bits.extend([
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]);
    }
    if guest_offloads {
        bits.extend([
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ]);
    }
    bits.into_iter().fold(0, |acc, bit| acc | 1 << bit)
}

/// The TAP offloads for what the driver accepted: the TAP must hand out only frames the driver
/// can take (partial checksums need GUEST_CSUM, which segmentation offload builds on).
fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    flags
}

/// `struct virtio_net_config` (virtio 1.1, 5.1.4) up to `status`: the link is always up.
fn config_space(mac: [u8; 6]) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        let has = |bit: u32| features & (1 << bit) != 0;
        self.rx
            .set_features(has(VIRTIO_NET_F_MRG_RXBUF), has(VIRTIO_NET_F_GUEST_CSUM));
        self.set_offload(tap_offloads(features));
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.1, 5.1.4: the driver writes no field of a VERSION_1 device's config.
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
        // Receive buffers posted before DRIVER_OK came without a usable notification: look at
        // the ring once as if notified.
        self.common.kick(RX_QUEUE, "receive");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The TAP stays open; it is unwatched at its next event and watched again once the
        // driver posts receive buffers.
        self.common.reset();
        self.rx.reset();
        self.rx.set_features(false, false);
        self.set_offload(0);
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        let mut positions = self.common.queue_positions()?;
        // Receive chains held for the next frame go back to the ring, for the restored device
        // to take again (a frame read for them is lost, as on a reset). A transmit chain the
        // host side could not take is still on the ring.
        let rx = &mut positions[RX_QUEUE];
        let held = self
            .rx
            .held(rx.0)
            .ok_or(SnapshotError::Busy("virtio-net"))?;
        rx.0 = rx.0.wrapping_sub(held);
        Ok(positions)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let c = self.counters();
        log::debug!(
            "virtio-net: {} frames received ({} copied, {} lost), {} sent ({} copied, {} dropped)",
            c.rx_frames,
            c.rx_copied,
            c.dropped_rx,
            c.tx_frames,
            c.tx_copied,
            c.dropped_tx
        );
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let queue = self.common.queue_event(fd);
        if self.gone {
            // The VM is stopping: nothing reaches the host side any more.
            return;
        }
        match queue {
            Some(TX_QUEUE) => self.transmit(ops),
            Some(_) if !self.common.is_active() => self.common.idle(),
            Some(_) => self.receive(ops),
            None if fd == self.tap.as_raw_fd() => self.host_event(events.event_set(), ops),
            None => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // The host side is watched for frames only once the driver has posted receive
        // buffers; a stream's peer is watched for its hang-up from the start.
        self.common.watch_queue_events(ops);
        self.watch(ops);
    }
}

#[cfg(test)]
mod tests;
