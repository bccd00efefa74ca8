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
    /// Its buffers by host address, listed the first time a frame may be read straight in.
    iov: IovecList,
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

    /// Frames that went through the host buffer (none from a TAP into merged buffers).
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
                    self.reserved.push_back(Reserved {
                        head,
                        pos,
                        sg,
                        iov: IovecList::default(),
                    });
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
        for chain in self.reserved.iter_mut().take(chains) {
            if chain.iov.0.is_empty() {
                let spans = chain.sg.list.iter().map(|b| (b.addr, b.len as usize));
                // Buffers that cannot be listed take the copy, which reports them.
                if guest_iovecs(mem, spans, &mut chain.iov.0).is_err() {
                    chain.iov.0.clear();
                    return Ok(false);
                }
            }
            self.iovecs.0.extend_from_slice(&chain.iov.0);
        }
        Ok(self.iovecs.0.len() <= IOV_MAX)
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
        let fixed = match self.iovecs.0[0] {
            // The usual case: the header lies in the first buffer, written through its address.
            first if first.iov_len >= HDR_LEN => {
                let hdr = first.iov_base.cast::<u8>();
                // SAFETY: the first HDR_LEN bytes of a listed guest buffer, mapped while `mem`
                // lives; the kernel wrote the header there just now.
                unsafe {
                    let mut bytes = [0u8; HDR_LEN];
                    std::ptr::copy_nonoverlapping(hdr, bytes.as_mut_ptr(), HDR_LEN);
                    complete_header(&mut bytes, count, self.guest_csum);
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), hdr, HDR_LEN);
                }
                Ok(())
            }
            _ => {
                let first = &self.reserved[0].sg;
                let mut hdr = [0u8; HDR_LEN];
                first.read_into(mem, &mut hdr).and_then(|()| {
                    complete_header(&mut hdr, count, self.guest_csum);
                    first.write_from(mem, &hdr).map(drop)
                })
            }
        };
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
mod tests {
    use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;

    use super::super::test_utils::*;
    use super::*;
    use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::net::test_utils::Driver;

    const FILL: u8 = 0xee;

    fn receiver(mergeable: bool) -> Receiver {
        let mut rx = Receiver::new();
        rx.set_features(mergeable, true);
        rx
    }

    fn pumped(next: RxNext, notify: bool) -> Pumped {
        Pumped { next, notify }
    }

    /// `p` as the guest should see it: with `num_buffers` set.
    fn with_num_buffers(p: &[u8], n: u16) -> Vec<u8> {
        let mut p = p.to_vec();
        p[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&n.to_le_bytes());
        p
    }

    /// Concatenates what the used entries say was written, buffer by buffer.
    fn gathered(mem: &GuestMemoryMmap, parts: &[(u64, usize)]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|&(addr, len)| guest(mem, addr, len))
            .collect()
    }

    #[test]
    fn single_chains_take_whole_frames() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 1000, W), (BUF + 0x1000, 1000, W)]);
        driver.post(&[(BUF + 0x2000, 2000, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let (p, q) = (packet(0, 1500, 1), packet(0, 60, 2));
        peer.send(&p);
        peer.send(&q);
        let mut rx = receiver(false);
        // Both chains used: the TAP is left alone until the driver posts more.
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
        assert_eq!(driver.used(), vec![(0, 1512), (2, 72)]);
        let first = gathered(&mem, &[(BUF, 1000), (BUF + 0x1000, 512)]);
        assert_eq!(first, with_num_buffers(&p, 1));
        assert_eq!(guest(&mem, BUF + 0x2000, 72), with_num_buffers(&q, 1));
        assert_eq!((rx.frames(), rx.dropped()), (2, 0));
    }

    #[test]
    fn merged_buffers_spread_a_frame_and_count_them() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        for i in 0..5 {
            driver.post(&[(BUF + i * 0x1000, 1000, W)]);
        }
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let (p, q) = (packet(0, 2500, 3), packet(0, 100, 4));
        peer.send(&p);
        peer.send(&q);
        let mut rx = receiver(true);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::Watch, true));
        assert_eq!(
            driver.used(),
            vec![(0, 1000), (1, 1000), (2, 512), (3, 112)]
        );
        let first = gathered(
            &mem,
            &[(BUF, 1000), (BUF + 0x1000, 1000), (BUF + 0x2000, 512)],
        );
        assert_eq!(first, with_num_buffers(&p, 3));
        assert_eq!(guest(&mem, BUF + 0x3000, 112), with_num_buffers(&q, 1));
        // The fifth chain stays with the device for the next frame.
        assert_eq!(queue.next_avail(), 5);
        assert_eq!(rx.reserved.len(), 1);
    }

    /// Merged buffers that together hold the largest frame several times over: 16 chains of
    /// 8000 bytes, 8 KiB apart. Three frames come from the TAP: 20000 bytes, 20000 bytes marked
    /// DATA_VALID, then 100.
    fn big_merged_ring(vectored: bool) -> Received {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        for i in 0..16 {
            driver.post(&[(BUF + i * 0x2000, 8000, W)]);
        }
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        tap.vectored = vectored;
        peer.send(&packet(0, 20000, 4));
        peer.send(&packet(VIRTIO_NET_HDR_F_DATA_VALID as u8, 20000, 5));
        peer.send(&packet(0, 100, 6));
        let mut rx = Receiver::new();
        rx.set_features(true, false);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::Watch, true));
        let second = gathered(
            &mem,
            &[
                (BUF + 0x6000, 8000),
                (BUF + 0x8000, 8000),
                (BUF + 0xa000, 4012),
            ],
        );
        Received {
            used: driver.used(),
            second,
            third: guest(&mem, BUF + 0xc000, 112),
            rx,
        }
    }

    /// What [`big_merged_ring`] saw: the used entries and the last two frames in guest memory.
    struct Received {
        rx: Receiver,
        used: Vec<(u32, u32)>,
        second: Vec<u8>,
        third: Vec<u8>,
    }

    #[test]
    fn after_a_large_frame_frames_go_straight_into_merged_buffers() {
        let Received {
            rx,
            used,
            second,
            third,
        } = big_merged_ring(true);
        let chains = [
            (0, 8000),
            (1, 8000),
            (2, 4012),
            (3, 8000),
            (4, 8000),
            (5, 4012),
        ];
        assert_eq!(used, [&chains[..], &[(6, 112)]].concat());
        // The device completes the header in guest memory: chains taken, no flags.
        let mut p = with_num_buffers(&packet(VIRTIO_NET_HDR_F_DATA_VALID as u8, 20000, 5), 3);
        p[0] = 0;
        assert_eq!(second, p);
        assert_eq!(third, with_num_buffers(&packet(0, 100, 6), 1));
        // Only the first frame, with none large before it, went through the host buffer.
        assert_eq!((rx.frames(), rx.copied(), rx.dropped()), (3, 1, 0));
        // The chains taken beyond the frames wait for the next one.
        assert_eq!(rx.reserved.len(), 8);
    }

    #[test]
    fn a_host_side_without_scatter_reads_gets_the_same_frames_by_copy() {
        let direct = big_merged_ring(true);
        let copied = big_merged_ring(false);
        assert_eq!(
            (&copied.used, &copied.second, &copied.third),
            (&direct.used, &direct.second, &direct.third)
        );
        assert_eq!((copied.rx.frames(), copied.rx.copied()), (3, 3));
    }

    #[test]
    fn without_buffers_frames_stay_in_the_tap() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        let (mut tap, peer) = FakeTap::new();
        let (p, q) = (packet(0, 60, 5), packet(0, 200, 5));
        peer.send(&p);
        peer.send(&q);
        let mut rx = receiver(true);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
        assert_eq!(driver.used(), vec![(0, 72)]);
        // The second frame was not taken off the TAP.
        assert_eq!(rx.pending, None);
        // The driver is asked to notify at its next buffer (avail_event after 16 used entries).
        assert_eq!(mem.read_obj::<u16>(driver.avail_event()).unwrap(), 1);
        // Pumping again without buffers changes nothing.
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, false));
        driver.post(&[(BUF + 0x1000, 4096, W)]);
        driver.post(&[(BUF + 0x2000, 4096, W)]);
        // Having seen the first frame, the driver wants an interrupt for the next one.
        mem.write_obj(1u16, driver.used_event()).unwrap();
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::Watch, true));
        assert_eq!(driver.used(), vec![(0, 72), (1, 212)]);
        assert_eq!(guest(&mem, BUF + 0x1000, 212), with_num_buffers(&q, 1));
        assert_eq!((rx.frames(), rx.dropped()), (2, 0));
    }

    #[test]
    fn a_frame_short_of_buffers_waits_for_more() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 1000, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let p = packet(0, 2500, 6);
        peer.send(&p);
        let mut rx = receiver(true);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, false));
        assert!(driver.used().is_empty());
        assert_eq!(rx.pending, Some(p.len()));
        driver.post(&[(BUF + 0x1000, 1000, W)]);
        driver.post(&[(BUF + 0x2000, 1000, W)]);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
        assert_eq!(driver.used(), vec![(0, 1000), (1, 1000), (2, 512)]);
        let all = gathered(
            &mem,
            &[(BUF, 1000), (BUF + 0x1000, 1000), (BUF + 0x2000, 512)],
        );
        assert_eq!(all, with_num_buffers(&p, 3));
        assert_eq!((rx.frames(), rx.dropped()), (1, 0));
    }

    #[test]
    fn held_chains_are_given_back_only_if_taken_last_and_in_a_row() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 1000, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let mut rx = receiver(true);
        assert_eq!(rx.held(queue.next_avail()), Some(0));
        // A chain waits for a frame.
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(rx.held(queue.next_avail()), Some(1));
        // A frame needs more: a chain too short for a header is returned between two held.
        peer.send(&packet(0, 2500, 6));
        driver.post(&[(BUF + 0x1000, 4, W)]);
        driver.post(&[(BUF + 0x2000, 1000, W)]);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(driver.used(), vec![(1, 0)]);
        assert_eq!((queue.next_avail(), rx.reserved.len()), (3, 2));
        assert_eq!(rx.held(queue.next_avail()), None);
        // Once the frame is delivered, the next chain held is again the last taken.
        driver.post(&[(BUF + 0x3000, 1000, W)]);
        driver.post(&[(BUF + 0x4000, 1000, W)]);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(driver.used().len(), 4);
        assert_eq!(rx.held(queue.next_avail()), Some(1));
    }

    #[test]
    fn frames_too_big_for_a_chain_are_dropped_and_counted() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let q = packet(0, 50, 7);
        peer.send(&packet(0, 200, 7));
        // A runt, then a frame that fits.
        peer.send(&[0; HDR_LEN + ETH_HLEN - 1]);
        peer.send(&q);
        let mut rx = receiver(false);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        // The chain that was too small for the first frame took the third.
        assert_eq!(driver.used(), vec![(0, 62)]);
        assert_eq!(guest(&mem, BUF, 62), with_num_buffers(&q, 1));
        assert_eq!((rx.frames(), rx.dropped()), (1, 2));
    }

    #[test]
    fn a_frame_bigger_than_the_whole_ring_is_dropped() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        let size = driver.queue().size();
        for i in 0..u64::from(size) {
            driver.post(&[(BUF + i * 0x100, 100, W)]);
        }
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let q = packet(0, 50, 8);
        peer.send(&packet(0, 100 * usize::from(size), 8));
        peer.send(&q);
        let mut rx = receiver(true);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(driver.used(), vec![(0, 62)]);
        assert_eq!(guest(&mem, BUF, 62), with_num_buffers(&q, 1));
        assert_eq!((rx.frames(), rx.dropped()), (1, 1));
    }

    #[test]
    fn hostile_receive_chains_are_returned_empty() {
        let mem = mem();
        let top = MEM_SIZE as u64;
        mem.write_slice(&[FILL; 0x100], GuestAddress(BUF)).unwrap();
        let mut driver = Driver::new(&mem, 0);
        // Device-readable, mixed, outside memory, no room for the header, a loop (5 → 6 → 6).
        driver.post(&[(BUF, 100, R)]);
        driver.post(&[(BUF, 50, W), (BUF + 50, 50, R)]);
        driver.post(&[(top - 50, 100, W)]);
        driver.post(&[(BUF, (HDR_LEN - 1) as u32, W)]);
        driver.post(&[(BUF, 50, W), (BUF + 50, 50, W)]);
        let looped = Descriptor::new(BUF + 50, 50, (VRING_DESC_F_NEXT | W as u32) as u16, 6);
        driver
            .mock
            .desc_table()
            .store(6, RawDescriptor::from(looped))
            .unwrap();
        driver.post(&[(BUF + 0x1000, 100, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let p = packet(0, 60, 9);
        peer.send(&p);
        let mut rx = receiver(true);
        rx.pump(&mem, &mut queue, &mut tap).unwrap();
        let want = vec![(0, 0), (1, 0), (3, 0), (4, 0), (5, 0), (7, 72)];
        assert_eq!(driver.used(), want);
        assert_eq!(guest(&mem, BUF, 0x100), vec![FILL; 0x100]);
        assert_eq!(guest(&mem, BUF + 0x1000, 72), with_num_buffers(&p, 1));
        assert_eq!((rx.frames(), rx.dropped()), (1, 0));
    }

    #[test]
    fn checksum_flags_reach_only_drivers_that_asked() {
        let mem = mem();
        let flags = VIRTIO_NET_HDR_F_DATA_VALID as u8;
        for guest_csum in [false, true] {
            let mut driver = Driver::new(&mem, 0);
            driver.post(&[(BUF, 100, W)]);
            let mut queue = driver.queue();
            let (mut tap, peer) = FakeTap::new();
            peer.send(&packet(flags, 60, 0));
            let mut rx = Receiver::new();
            rx.set_features(false, guest_csum);
            rx.pump(&mem, &mut queue, &mut tap).unwrap();
            let want = if guest_csum { flags } else { 0 };
            assert_eq!(guest(&mem, BUF, 1), [want]);
        }
    }

    #[test]
    fn event_idx_decides_the_interrupt() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        driver.post(&[(BUF + 0x100, 100, W)]);
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        let used_event = driver.used_event();
        let (mut tap, peer) = FakeTap::new();
        let mut rx = receiver(true);
        // The driver wants an interrupt only after the fifth frame: none for the first.
        mem.write_obj(4u16, used_event).unwrap();
        peer.send(&packet(0, 60, 0));
        assert!(!rx.pump(&mem, &mut queue, &mut tap).unwrap().notify);
        // Now at the next used entry (the second one, index 1).
        mem.write_obj(1u16, used_event).unwrap();
        peer.send(&packet(0, 60, 0));
        assert!(rx.pump(&mem, &mut queue, &mut tap).unwrap().notify);
        assert_eq!(driver.used().len(), 2);
    }

    #[test]
    fn tap_failures_cost_a_frame_or_stop_the_receiver() {
        struct Failing(FakeTap, i32);
        impl std::os::fd::AsRawFd for Failing {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.0.as_raw_fd()
            }
        }
        impl TapIo for Failing {
            fn read_frame(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(self.1))
            }
            fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.write_frame(buf)
            }
            fn set_offload(&mut self, flags: u32) -> io::Result<()> {
                self.0.set_offload(flags)
            }
        }
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        let mut queue = driver.queue();
        let mut rx = receiver(true);
        // An oversized frame: dropped, and the next read (of the same failing tap) too, until
        // the budget ends the call.
        let mut tap = Failing(FakeTap::new().0, libc::EFAULT);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::Watch, false));
        assert_eq!(rx.dropped(), RX_BUDGET as u64);
        // The interface was deleted: stop.
        let mut tap = Failing(FakeTap::new().0, libc::EBADFD);
        let got = rx.pump(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(got, pumped(RxNext::Stop, false));
        // The chain is still reserved for when frames come again.
        assert!(driver.used().is_empty());
    }

    #[test]
    fn reset_forgets_chains_and_counts_the_pending_frame() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        peer.send(&packet(0, 500, 0));
        let mut rx = receiver(true);
        assert_eq!(
            rx.pump(&mem, &mut queue, &mut tap).unwrap().next,
            RxNext::WaitForBuffers
        );
        rx.reset();
        assert_eq!((rx.pending, rx.reserved.len(), rx.dropped()), (None, 0, 1));
    }

    #[test]
    fn bogus_avail_index_does_not_spin() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 100, W)]);
        driver.mock.avail().idx().store(1000);
        let mut queue = driver.queue();
        let (mut tap, _peer) = FakeTap::new();
        assert!(matches!(
            receiver(true).pump(&mem, &mut queue, &mut tap),
            Err(RxError::BrokenRing)
        ));
    }
}
