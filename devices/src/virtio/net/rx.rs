//! The receive path: frames from the TAP (or the stream to passt, which reads like one) into
//! the receive queue's buffers.
//!
//! A frame is read from the TAP only once the driver has posted a buffer for it, so while the
//! guest is not reading, frames wait in the kernel's TAP queue (which drops, and counts, what
//! overflows it) rather than in an unbounded host buffer. With merged receive buffers a frame is
//! spread over as many chains as it needs and `num_buffers` in its header says how many;
//! without, it needs one chain big enough for all of it. A frame already read but still short of
//! buffers is held (one at most) until the driver posts more.
//!
//! Where the host side can read into many buffers at once (a TAP: readv), the frame before was
//! large (a bulk transfer) and the chains taken for the next frame can hold any frame (with
//! merged buffers, as many chains as that takes), the frame is read straight into them: no host
//! buffer and no copy. Otherwise it is read into the host buffer and copied, which for small
//! frames costs less than listing enough buffers for the largest.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::{TapIo, ETH_HLEN, HDR_LEN, MAX_PACKET_LEN, NUM_BUFFERS_OFFSET, QUEUE_SIZE};
use crate::virtio::drain::{pop_chain, DrainError};
use crate::virtio::iovec::{guest_iovecs, IovecList};
use crate::virtio::sg::{SgError, SgList};
use crate::{warn_once, LogOnce, Problem};

/// Most frames delivered per call: bounds the event loop's time here while the driver keeps
/// posting buffers; level-triggered epoll brings the loop back for the rest.
const RX_BUDGET: usize = 64;
/// The most buffers one readv takes (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Frames are read straight into guest buffers after a frame of at least this many bytes:
/// below it, copying is cheaper (`cargo bench -p rvmm-devices --bench net`).
const DIRECT_AFTER: usize = 16 << 10;

/// Errors while receiving; the queue-level ones end a [`Receiver::pump`], the others cost one
/// chain or one frame and are only logged.
#[derive(Debug, thiserror::Error)]
pub enum RxError {
    /// The queue itself is unusable (rings unreadable, avail index insane).
    #[error("virtio queue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The driver claims more chains than the ring holds, or names a head beyond the queue.
    #[error("avail ring is inconsistent")]
    BrokenRing,
    /// The used ring or `used_event` could not be accessed.
    #[error("cannot access the used ring")]
    Ring(#[source] GuestMemoryError),
    /// A chain's shape was refused; it is returned empty.
    #[error("invalid receive chain")]
    Chain(#[source] SgError),
    /// A chain without room for the virtio-net header; it is returned empty.
    #[error("receive chain of {0} bytes has no room for the header")]
    ShortChain(u64),
    /// The frame is larger than the chain (or, with merged buffers, the whole ring).
    #[error("frame of {len} bytes does not fit in {room} bytes of receive buffers")]
    DoesNotFit {
        /// Header plus frame.
        len: u64,
        /// The buffers it could have had.
        room: u64,
    },
    /// The host side handed out less than a header and an Ethernet header.
    #[error("the host side delivered a runt of {0} bytes")]
    Runt(usize),
    /// Copying into validated guest buffers failed.
    #[error("cannot write the frame to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// Reading the TAP (or stream) failed.
    #[error("read from the host side failed")]
    Tap(#[source] io::Error),
}

impl From<DrainError> for RxError {
    fn from(e: DrainError) -> Self {
        match e {
            DrainError::Queue(e) => Self::Queue(e),
            DrainError::BrokenRing => Self::BrokenRing,
        }
    }
}

/// What the receiver wants from the event loop next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxNext {
    /// Wait for the TAP to become readable.
    Watch,
    /// No (or not enough) receive buffers: leave the TAP alone until the driver posts some and
    /// notifies the receive queue.
    WaitForBuffers,
    /// The TAP is unusable: stop watching it.
    Stop,
}

/// The result of one [`Receiver::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    /// What to wait for next.
    pub next: RxNext,
    /// The driver needs an interrupt for the chains returned.
    pub notify: bool,
}

/// A receive chain taken off the ring for the next frame.
struct Reserved {
    head: u16,
    /// Its entry in the avail ring (the queue's `next_avail` before it was taken).
    pos: u16,
    sg: SgList,
}

enum Gathered {
    /// The first this many reserved chains hold the pending frame.
    Enough(usize),
    /// The ring ran dry first.
    Short,
    /// The frame can never fit and was dropped.
    Dropped,
}

enum Read {
    /// A frame of this many bytes (header included) is pending.
    Frame(usize),
    /// A frame was read straight into the reserved chains and returned to the driver.
    Delivered,
    /// Nothing queued in the TAP.
    Empty,
    /// One frame was lost.
    Dropped,
    /// The TAP is unusable.
    Failed,
}

/// Moves frames from a TAP into the receive queue.
pub struct Receiver {
    /// The pending frame, header first.
    packet: Box<[u8]>,
    /// Length of the frame read from the TAP but not delivered yet.
    pending: Option<usize>,
    reserved: VecDeque<Reserved>,
    /// (head, length) of one frame's chains, published together.
    used: Vec<(u16, u32)>,
    /// The reserved chains' buffers by host address, for a read straight into them.
    iovecs: IovecList,
    /// Frames read into `packet` and copied to the guest, not read straight into its buffers.
    copied: u64,
    /// Length of the last frame read, header included.
    last_len: usize,
    mergeable: bool,
    guest_csum: bool,
    frames: u64,
    dropped: u64,
    warned: LogOnce,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver for a driver that negotiated neither merged buffers nor checksum offload.
    pub fn new() -> Self {
        Self {
            packet: vec![0; MAX_PACKET_LEN].into_boxed_slice(),
            pending: None,
            reserved: VecDeque::new(),
            used: Vec::new(),
            iovecs: IovecList::default(),
            copied: 0,
            last_len: 0,
            mergeable: false,
            guest_csum: false,
            frames: 0,
            dropped: 0,
            warned: LogOnce::default(),
        }
    }

    /// Applies the negotiated VIRTIO_NET_F_MRG_RXBUF and VIRTIO_NET_F_GUEST_CSUM.
    pub fn set_features(&mut self, mergeable: bool, guest_csum: bool) {
        self.mergeable = mergeable;
        self.guest_csum = guest_csum;
    }

    /// Forgets the reserved chains (the driver's rings are gone) and drops a pending frame.
    pub fn reset(&mut self) {
        if self.pending.take().is_some() {
            self.dropped += 1;
        }
        self.reserved.clear();
    }

    /// How many receive chains are held for the next frame, if they are the chains taken off
    /// the ring last, in a row, up to `next_avail`: a ring moved back by that many gives them
    /// again. `None` while a chain returned meanwhile (refused) lies between them.
    pub fn held(&self, next_avail: u16) -> Option<u16> {
        let Some(first) = self.reserved.front() else {
            return Some(0);
        };
        let taken = next_avail.wrapping_sub(first.pos);
        (usize::from(taken) == self.reserved.len()).then_some(taken)
    }

    /// Frames delivered to the guest so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames that went through the host buffer rather than straight into the guest's.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    /// Frames read from the TAP and lost so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Delivers frames from `tap` while there are frames and buffers for them.
    pub fn pump(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut dyn TapIo,
    ) -> Result<Pumped, RxError> {
        let old_used = queue.next_used();
        let next = self.fill(mem, queue, tap);
        // Chains returned before a failure still need announcing.
        let notify = needs_notification(mem, queue, old_used);
        Ok(Pumped {
            next: next?,
            notify: notify?,
        })
    }

    fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut dyn TapIo,
    ) -> Result<RxNext, RxError> {
        for _ in 0..RX_BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    // A buffer first, so that a frame is never taken off the TAP for nothing.
                    if self.reserved.is_empty() && !self.reserve(mem, queue)? {
                        return Ok(RxNext::WaitForBuffers);
                    }
                    let read = match self.direct_iovecs(mem, queue, tap)? {
                        true => self.read_direct(mem, queue, tap)?,
                        false => self.read(tap),
                    };
                    match read {
                        Read::Frame(len) => len,
                        Read::Empty => return Ok(RxNext::Watch),
                        Read::Delivered | Read::Dropped => continue,
                        Read::Failed => return Ok(RxNext::Stop),
                    }
                }
            };
            self.pending = Some(len);
            match self.gather(mem, queue, len as u64)? {
                Gathered::Enough(count) => self.deliver(mem, queue, count)?,
                Gathered::Short => return Ok(RxNext::WaitForBuffers),
                Gathered::Dropped => {}
            }
        }
        Ok(RxNext::Watch)
    }

    /// Takes the next usable chain off the ring; false when the ring is empty, after asking
    /// the driver to notify when it posts more. Unusable chains are returned empty.
    fn reserve(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, RxError> {
        let mut announced = false;
        loop {
            let pos = queue.next_avail();
            let Some(chain) = pop_chain(mem, queue)? else {
                if announced {
                    return Err(RxError::BrokenRing);
                }
                // With EVENT_IDX the driver would not notify otherwise; chains posted before
                // it saw the request are announced here.
                announced = queue.enable_notification(mem).map_err(RxError::Queue)?;
                if !announced {
                    return Ok(false);
                }
                continue;
            };
            announced = false;
            let head = chain.head_index();
            let err = match SgList::new(chain, mem, true, QUEUE_SIZE.into(), u64::MAX) {
                Ok(sg) if sg.len >= HDR_LEN as u64 => {
                    self.reserved.push_back(Reserved { head, pos, sg });
                    return Ok(true);
                }
                Ok(sg) => RxError::ShortChain(sg.len),
                Err(e) => RxError::Chain(e),
            };
            warn_once!(
                self.warned,
                Problem::Chain,
                "virtio-net: {}",
                crate::error_chain(&err)
            );
            publish(mem, queue, &[(head, 0)])?;
        }
    }

    /// Whether the next frame can be read straight into the reserved chains, which then hold
    /// any frame (with merged buffers more are reserved, as far as the ring has them); if so,
    /// `iovecs` lists their buffers.
    fn direct_iovecs(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &dyn TapIo,
    ) -> Result<bool, RxError> {
        if !tap.scatter_reads() || self.last_len < DIRECT_AFTER {
            return Ok(false);
        }
        let max = MAX_PACKET_LEN as u64;
        let chains = if self.mergeable {
            let mut room: u64 = self.reserved.iter().map(|r| r.sg.len).sum();
            while room < max {
                if self.reserved.len() >= usize::from(queue.size()) || !self.reserve(mem, queue)? {
                    return Ok(false);
                }
                room += self.reserved.back().map_or(0, |r| r.sg.len);
            }
            self.chains_for(max)
        } else if self.reserved[0].sg.len >= max {
            1
        } else {
            return Ok(false);
        };
        self.iovecs.0.clear();
        let buffers = self.reserved.iter().take(chains).flat_map(|r| &r.sg.list);
        let spans = buffers.map(|b| (b.addr, b.len as usize));
        let listed = guest_iovecs(mem, spans, &mut self.iovecs.0);
        // Buffers that cannot be listed take the copy, which reports them.
        Ok(listed.is_ok() && self.iovecs.0.len() <= IOV_MAX)
    }

    /// Reads one frame into the reserved chains that `iovecs` lists, completes its header
    /// there and returns the chains that hold it.
    fn read_direct(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut dyn TapIo,
    ) -> Result<Read, RxError> {
        let result = loop {
            // SAFETY: the iovecs name guest memory inside its regions (checked by SgList and
            // guest_iovecs), mapped for as long as `mem` lives.
            match unsafe { tap.read_frame_iovecs(&self.iovecs.0) } {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let len = match self.classify(result, tap) {
            Read::Frame(len) => len,
            other => return Ok(other),
        };
        let count = self.chains_for(len as u64);
        // The kernel wrote the header; the fields the device owns are filled in where it lies.
        let first = &self.reserved[0].sg;
        let mut hdr = [0u8; HDR_LEN];
        let fixed = first.read_into(mem, &mut hdr).and_then(|()| {
            complete_header(&mut hdr, count, self.guest_csum);
            first.write_from(mem, &hdr).map(drop)
        });
        self.return_chains(mem, queue, count, len, fixed.err())?;
        Ok(Read::Delivered)
    }

    /// Reads one frame from the TAP into `packet`.
    fn read(&mut self, tap: &mut dyn TapIo) -> Read {
        let result = loop {
            match tap.read_frame(&mut self.packet) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.classify(result, tap)
    }

    /// What one read of a frame from `tap` came to.
    fn classify(&mut self, result: io::Result<usize>, tap: &dyn TapIo) -> Read {
        let err = match result {
            Ok(len) if len >= HDR_LEN + ETH_HLEN => {
                self.last_len = len;
                return Read::Frame(len);
            }
            Ok(len) => RxError::Runt(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Empty,
            Err(e) => RxError::Tap(e),
        };
        // The TAP reports a frame too big for the buffer with EFAULT or EINVAL and discards
        // it; other errors (EBADFD: interface deleted) will not go away.
        let fatal = matches!(&err, RxError::Tap(e)
            if !matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)));
        // A host side gone for good is the device's to report, as the reason the VM stops.
        if tap.broken().is_none() {
            warn_once!(
                self.warned,
                Problem::Tap,
                "virtio-net: {}",
                crate::error_chain(&err)
            );
        }
        if fatal {
            return Read::Failed;
        }
        self.dropped += 1;
        Read::Dropped
    }

    /// Reserves chains until they hold the pending frame of `len` bytes.
    fn gather(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        len: u64,
    ) -> Result<Gathered, RxError> {
        let mut room: u64 = self.reserved.iter().map(|r| r.sg.len).sum();
        while room < len {
            // Without merged buffers the one reserved chain must do; with them, a ring full of
            // tiny buffers must not hold the frame forever.
            let limit = if self.mergeable { queue.size() } else { 1 };
            if self.reserved.len() >= usize::from(limit) {
                return Ok(self.drop_pending(RxError::DoesNotFit { len, room }));
            }
            if !self.reserve(mem, queue)? {
                return Ok(Gathered::Short);
            }
            room += self.reserved.back().map_or(0, |r| r.sg.len);
        }
        Ok(Gathered::Enough(self.chains_for(len)))
    }

    /// The fewest reserved chains that hold `len` bytes; later ones wait for the next frame.
    fn chains_for(&self, len: u64) -> usize {
        let mut before = 0;
        self.reserved
            .iter()
            .take_while(|r| {
                let fits = before >= len;
                before += r.sg.len;
                !fits
            })
            .count()
    }

    fn drop_pending(&mut self, err: RxError) -> Gathered {
        self.pending = None;
        self.dropped += 1;
        warn_once!(
            self.warned,
            Problem::Fit,
            "virtio-net: dropping a received frame: {err}"
        );
        Gathered::Dropped
    }

    /// Copies the pending frame into the first `count` reserved chains and returns them.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        count: usize,
    ) -> Result<(), RxError> {
        let len = self.pending.take().unwrap_or_default();
        let packet = &mut self.packet[..len];
        complete_header(packet, count, self.guest_csum);
        let mut rest = &packet[..];
        let mut failed = None;
        for chain in self.reserved.iter().take(count) {
            let n = usize::try_from(chain.sg.len).map_or(rest.len(), |room| room.min(rest.len()));
            if let Err(e) = chain.sg.write_from(mem, &rest[..n]) {
                failed = Some(e);
            }
            rest = &rest[n..];
        }
        self.copied += 1;
        self.return_chains(mem, queue, count, len, failed)
    }

    /// Returns the first `count` reserved chains, which hold a frame of `len` bytes (header
    /// included), or, where writing it `failed`, return them empty and count the frame lost.
    fn return_chains(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        count: usize,
        len: usize,
        failed: Option<GuestMemoryError>,
    ) -> Result<(), RxError> {
        self.used.clear();
        let mut rest = len;
        for chain in self.reserved.drain(..count) {
            let n = usize::try_from(chain.sg.len).map_or(rest, |room| room.min(rest));
            rest -= n;
            // At most MAX_PACKET_LEN.
            self.used.push((chain.head, n as u32));
        }
        match failed {
            None => self.frames += 1,
            Some(e) => {
                // Validated buffers do not fail unless guest memory itself changed: the frame
                // is lost and its chains are returned empty.
                self.dropped += 1;
                self.used.iter_mut().for_each(|(_, len)| *len = 0);
                warn_once!(
                    self.warned,
                    Problem::Memory,
                    "virtio-net: {}",
                    crate::error_chain(&RxError::GuestMemory(e))
                );
            }
        }
        publish(mem, queue, &self.used)
    }
}

/// Fills in the header fields the device owns: how many chains the frame takes (at most the
/// queue size) and, unless the driver asked for checksum offload, no flags.
fn complete_header(hdr: &mut [u8], chains: usize, guest_csum: bool) {
    hdr[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&(chains as u16).to_le_bytes());
    if !guest_csum {
        // virtio 1.1, 5.1.6.4.1: flags must be zero unless GUEST_CSUM was negotiated (the
        // TAP may still mark frames DATA_VALID).
        hdr[0] = 0;
    }
}

/// Puts one frame's chains on the used ring and only then moves the used index, so a driver
/// polling the ring never sees a frame before all its `num_buffers` chains are there
/// (virtio-queue's `add_used` moves the index chain by chain).
fn publish(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    entries: &[(u16, u32)],
) -> Result<(), RxError> {
    let ring = GuestAddress(queue.used_ring());
    let at = |offset: u64| {
        ring.checked_add(offset)
            .ok_or(RxError::Ring(GuestMemoryError::InvalidGuestAddress(ring)))
    };
    let mut next = queue.next_used();
    for &(head, len) in entries {
        // struct virtq_used_elem { le32 id; le32 len; }, after the le16 flags and idx.
        let slot = 4 + 8 * u64::from(next % queue.size());
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, at(slot)?).map_err(RxError::Ring)?;
        next = next.wrapping_add(1);
    }
    mem.store(next.to_le(), at(2)?, Ordering::Release)
        .map_err(RxError::Ring)?;
    queue.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for the chains published since the used index was
/// `old`: always without EVENT_IDX, else if they passed its `used_event`.
fn needs_notification(mem: &GuestMemoryMmap, queue: &Queue, old: u16) -> Result<bool, RxError> {
    let new = queue.next_used();
    if new == old {
        return Ok(false);
    }
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // The used index must be visible before reading what the driver asked for, or an update
    // of `used_event` racing with it could be missed.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    // `used_event` follows the avail ring's flags, idx and `size` entries.
    let addr = avail
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(RxError::Ring(GuestMemoryError::InvalidGuestAddress(avail)))?;
    let used_event = u16::from_le(mem.load(addr, Ordering::Acquire).map_err(RxError::Ring)?);
    Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
}

#[cfg(test)]
mod tests;
