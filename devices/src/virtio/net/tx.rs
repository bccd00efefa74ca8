//! The transmit path: each chain of the transmit queue is one header plus frame, written to the
//! TAP in one writev straight from its device-readable buffers (a host side that needs frames
//! whole, the stream to passt, gets them gathered into one buffer). A host side that cannot
//! take a frame now (a stream to passt whose socket is full) leaves it on the ring: the
//! transmitter stops there and the device waits for the host side to be writable.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryError, GuestMemoryMmap};

use super::{TapIo, ETH_HLEN, HDR_LEN, MAX_PACKET_LEN, QUEUE_SIZE};
use crate::virtio::drain::{drain_until, DrainError};
use crate::virtio::iovec::{guest_iovecs, IovecList};
use crate::virtio::sg::{SgError, SgList};
use crate::{warn_once, LogOnce, Problem};

/// Why a frame was not sent; it is dropped and counted.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The chain's shape was refused.
    #[error("invalid transmit chain")]
    Chain(#[source] SgError),
    /// Less than a header and an Ethernet header.
    #[error("transmit chain of {0} bytes is too short for a header and a frame")]
    TooShort(u64),
    /// More than a header and the largest frame.
    #[error("transmit chain of {0} bytes is longer than {MAX_PACKET_LEN}")]
    TooLong(u64),
    /// Copying from validated guest buffers failed.
    #[error("cannot read the frame from guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// The host side refused the frame (TAP interface down, malformed header, passt gone, …).
    #[error("write to the host side failed")]
    Tap(#[source] io::Error),
}

/// Drains the transmit queue into a TAP.
pub struct Transmitter {
    /// One header plus frame, gathered for a host side that takes only whole frames.
    packet: Box<[u8]>,
    /// The chain's buffers, by guest and by host address; kept to reuse their allocations.
    sg: SgList,
    iovecs: IovecList,
    /// Frames copied into `packet` on their way out.
    copied: u64,
    /// The last pass stopped at a frame the host side could not take yet.
    blocked: bool,
    frames: u64,
    dropped: u64,
    warned: LogOnce,
}

impl Default for Transmitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Transmitter {
    /// A transmitter with its gather buffer.
    pub fn new() -> Self {
        Self {
            packet: vec![0; MAX_PACKET_LEN].into_boxed_slice(),
            sg: SgList::default(),
            iovecs: IovecList(Vec::with_capacity(usize::from(QUEUE_SIZE))),
            copied: 0,
            blocked: false,
            frames: 0,
            dropped: 0,
            warned: LogOnce::default(),
        }
    }

    /// Frames written to the TAP so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames that had to be copied into a host buffer (none on a TAP).
    pub fn copied(&self) -> u64 {
        self.copied
    }

    /// Frames dropped so far: refused chains and frames the TAP refused.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether the last [`Transmitter::process_queue`] stopped at a frame the host side could
    /// not take yet (`WouldBlock`): the rest waits until it is writable.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Sends every available chain, or those before one the host side cannot take yet; returns
    /// whether the driver needs an interrupt.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut dyn TapIo,
    ) -> Result<bool, DrainError> {
        self.blocked = false;
        drain_until(mem, queue, |chain| {
            match self.transmit(mem, chain, tap) {
                Ok(()) => self.frames += 1,
                Err(TxError::Tap(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return None;
                }
                // A host side gone for good is the device's to report, as the reason the VM
                // stops; the frame is only counted.
                Err(TxError::Tap(_)) if tap.broken().is_some() => self.dropped += 1,
                Err(e) => self.report(e),
            }
            // The device writes nothing into a transmit chain.
            Some(0)
        })
    }

    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        descriptors: impl Iterator<Item = Descriptor>,
        tap: &mut dyn TapIo,
    ) -> Result<(), TxError> {
        let sg = &mut self.sg;
        sg.refill(descriptors, mem, false, QUEUE_SIZE.into(), u64::MAX)
            .map_err(TxError::Chain)?;
        if sg.len < (HDR_LEN + ETH_HLEN) as u64 {
            return Err(TxError::TooShort(sg.len));
        }
        if sg.len > MAX_PACKET_LEN as u64 {
            return Err(TxError::TooLong(sg.len));
        }
        self.iovecs.0.clear();
        let spans = sg.list.iter().map(|b| (b.addr, b.len as usize));
        guest_iovecs(mem, spans, &mut self.iovecs.0).map_err(TxError::GuestMemory)?;
        let mut gathered = false;
        loop {
            // SAFETY: the iovecs name guest memory inside its regions (checked by SgList and
            // guest_iovecs), mapped for as long as `mem` lives.
            let sent = match unsafe { tap.write_frame_iovecs(&self.iovecs.0) } {
                Some(sent) => sent,
                None => {
                    // At most MAX_PACKET_LEN.
                    let packet = &mut self.packet[..sg.len as usize];
                    if !gathered {
                        sg.read_into(mem, packet).map_err(TxError::GuestMemory)?;
                        self.copied += 1;
                        gathered = true;
                    }
                    tap.write_frame(packet)
                }
            };
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock (a full stream socket; a TAP takes every frame) keeps the frame
                // on the ring; any other refusal drops it, as a NIC would.
                Err(e) => return Err(TxError::Tap(e)),
            }
        }
    }

    fn report(&mut self, e: TxError) {
        self.dropped += 1;
        let problem = match e {
            TxError::Tap(_) => Problem::Tap,
            _ => Problem::Chain,
        };
        warn_once!(
            self.warned,
            problem,
            "virtio-net: dropping a transmitted frame: {}",
            crate::error_chain(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::*;
    use super::*;
    use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
    use crate::virtio::console::test_utils::BUF;
    use crate::virtio::net::test_utils::Driver;

    fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn scattered_descriptors_become_one_write() {
        let mem = mem();
        let p = packet(1, 100, 3);
        // Header split over two buffers, frame over three, one of them empty.
        put(&mem, BUF, &p[..5]);
        put(&mem, BUF + 0x100, &p[5..40]);
        put(&mem, BUF + 0x200, &p[40..]);
        let q = packet(0, 60, 9);
        put(&mem, BUF + 0x1000, &q);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[
            (BUF, 5, R),
            (BUF + 0x100, 35, R),
            (BUF + 0x300, 0, R),
            (BUF + 0x200, 72, R),
        ]);
        driver.post(&[(BUF + 0x1000, q.len() as u32, R)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let mut tx = Transmitter::new();
        assert!(tx.process_queue(&mem, &mut queue, &mut tap).unwrap());
        assert_eq!(peer.recv().unwrap(), p);
        assert_eq!(peer.recv().unwrap(), q);
        assert_eq!(peer.recv(), None);
        assert_eq!(driver.used(), vec![(0, 0), (4, 0)]);
        assert_eq!((tx.frames(), tx.dropped()), (2, 0));
        // Straight from guest memory: no frame was copied on the way.
        assert_eq!(tx.copied(), 0);
        // Nothing new: nothing to do, no interrupt.
        assert!(!tx.process_queue(&mem, &mut queue, &mut tap).unwrap());
    }

    #[test]
    fn a_host_side_that_needs_whole_frames_gets_one_copy_each() {
        let mem = mem();
        let p = packet(1, 100, 3);
        put(&mem, BUF, &p[..40]);
        put(&mem, BUF + 0x200, &p[40..]);
        let mut driver = Driver::new(&mem, 0);
        for _ in 0..2 {
            driver.post(&[(BUF, 40, R), (BUF + 0x200, p.len() as u32 - 40, R)]);
        }
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        tap.vectored = false;
        let mut tx = Transmitter::new();
        assert!(tx.process_queue(&mem, &mut queue, &mut tap).unwrap());
        assert_eq!(peer.recv().unwrap(), p);
        assert_eq!(peer.recv().unwrap(), p);
        assert_eq!((tx.frames(), tx.copied()), (2, 2));
    }

    #[test]
    fn largest_frame_passes() {
        let mem = mem();
        let p = packet(0, MAX_PACKET_LEN - HDR_LEN, 1);
        put(&mem, BUF, &p);
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 12, R), (BUF + 12, p.len() as u32 - 12, R)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let mut tx = Transmitter::new();
        tx.process_queue(&mem, &mut queue, &mut tap).unwrap();
        assert_eq!(peer.recv().unwrap(), p);
        assert_eq!(tx.dropped(), 0);
    }

    #[test]
    fn hostile_chains_are_dropped_and_counted() {
        let mem = mem();
        let top = MEM_SIZE as u64;
        put(&mem, BUF, &packet(0, 64, 0));
        let mut driver = Driver::new(&mem, 0);
        // Header too short (and header only, no Ethernet header).
        driver.post(&[(BUF, 8, R)]);
        driver.post(&[(BUF, (HDR_LEN + ETH_HLEN - 1) as u32, R)]);
        // Longer than 64 KiB + header, in one buffer and scattered.
        driver.post(&[(BUF, MAX_PACKET_LEN as u32 + 1, R)]);
        driver.post(&[(BUF, MAX_PACKET_LEN as u32, R), (BUF, 1, R)]);
        // Device-writable buffers, first or later.
        driver.post(&[(BUF, 76, W)]);
        driver.post(&[(BUF, 12, R), (BUF + 12, 64, W)]);
        // Outside guest memory.
        driver.post(&[(BUF, 12, R), (top - 10, 64, R)]);
        // A loop: 10 → 11 → 11 → …
        driver.post(&[(BUF, 12, R), (BUF + 12, 64, R)]);
        let looped = Descriptor::new(BUF + 12, 64, VRING_DESC_F_NEXT as u16, 11);
        driver
            .mock
            .desc_table()
            .store(11, RawDescriptor::from(looped))
            .unwrap();
        // And a good one after all that.
        driver.post(&[(BUF, 76, R)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        let mut tx = Transmitter::new();
        assert!(tx.process_queue(&mem, &mut queue, &mut tap).unwrap());
        assert_eq!(peer.recv().unwrap(), packet(0, 64, 0));
        assert_eq!(peer.recv(), None);
        let used = driver.used();
        assert_eq!(used.len(), 9);
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!((tx.frames(), tx.dropped()), (1, 8));
    }

    #[test]
    fn tap_errors_drop_the_frame_and_go_on() {
        let mem = mem();
        put(&mem, BUF, &packet(0, 64, 0));
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 76, R)]);
        driver.post(&[(BUF, 76, R)]);
        let mut queue = driver.queue();
        let (mut tap, peer) = FakeTap::new();
        // What a TAP whose interface is down answers.
        tap.fail_writes = Some(libc::EIO);
        let mut tx = Transmitter::new();
        assert!(tx.process_queue(&mem, &mut queue, &mut tap).unwrap());
        assert_eq!(driver.used(), vec![(0, 0), (1, 0)]);
        assert_eq!((tx.frames(), tx.dropped()), (0, 2));
        assert_eq!(peer.recv(), None);
    }

    #[test]
    fn bogus_avail_index_does_not_spin() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 76, R)]);
        driver.mock.avail().idx().store(1000);
        let mut queue = driver.queue();
        let (mut tap, _peer) = FakeTap::new();
        assert!(matches!(
            Transmitter::new().process_queue(&mem, &mut queue, &mut tap),
            Err(DrainError::BrokenRing)
        ));
    }
}
