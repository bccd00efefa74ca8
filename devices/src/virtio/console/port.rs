//! The console port's two directions as plain structs: [`Transmitter`] drains the transmit queue
//! into a writer, [`Receiver`] moves host input into the receive queue's buffers.

use std::fs::File;
use std::io::{self, Read, Write};

use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryError, GuestMemoryMmap};

use super::chain::{buffers, read_all, ChainError};
use super::{MAX_TX_CHAIN, RX_CHUNK};
use crate::virtio::drain::{drain, pop_chain, DrainError};
use crate::{warn_once, LogOnce, Problem};

/// Errors while serving a queue.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The queue itself is unusable (rings unreadable, avail index insane).
    #[error("virtio queue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The driver claims more buffers than the ring can hold.
    #[error("avail ring index is inconsistent")]
    BrokenRing,
    /// A chain was refused; it is returned unused.
    #[error("dropping a descriptor chain")]
    Chain(#[source] ChainError),
    /// Copying to or from validated guest buffers failed.
    #[error("guest memory access failed")]
    GuestMemory(#[source] GuestMemoryError),
    /// The host output refused guest bytes; they are dropped, the guest cannot wait for it.
    #[error("console output failed")]
    Output(#[source] io::Error),
}

impl From<DrainError> for PortError {
    fn from(e: DrainError) -> Self {
        match e {
            DrainError::Queue(e) => Self::Queue(e),
            DrainError::BrokenRing => Self::BrokenRing,
        }
    }
}

/// Drains the transmit queue into a writer.
pub struct Transmitter {
    output: Box<dyn Write + Send>,
    /// One chain's bytes, so a scattered chain reaches the writer in one call.
    buf: Vec<u8>,
    warned: LogOnce,
}

impl Transmitter {
    /// Sends every transmitted byte to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        Self {
            output,
            buf: Vec::new(),
            warned: LogOnce::default(),
        }
    }

    /// Writes out every available chain; returns whether the driver needs an interrupt.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, PortError> {
        let mut served = false;
        let notify = drain(mem, queue, |chain| {
            self.transmit(mem, chain);
            served = true;
            // The device writes nothing into a transmit chain.
            0
        });
        // A buffered writer would otherwise hold back a prompt that has no newline.
        if served {
            if let Err(e) = self.output.flush() {
                self.report(PortError::Output(e));
            }
        }
        notify.map_err(PortError::from)
    }

    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) {
        let result = buffers(descriptors, mem, false, MAX_TX_CHAIN)
            .map_err(PortError::Chain)
            .and_then(|bufs| read_all(&bufs, mem, &mut self.buf).map_err(PortError::GuestMemory))
            .and_then(|()| self.output.write_all(&self.buf).map_err(PortError::Output));
        if let Err(e) = result {
            self.report(e);
        }
    }

    fn report(&mut self, e: PortError) {
        let problem = match e {
            PortError::Output(_) => Problem::Output,
            _ => Problem::Chain,
        };
        warn_once!(
            self.warned,
            problem,
            "virtio-console: {}",
            crate::error_chain(&e)
        );
    }
}

/// What the receiver wants from the event loop next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxNext {
    /// Wait for the host input to become readable.
    Watch,
    /// No receive buffers: leave the input alone until the driver posts some and notifies.
    WaitForBuffers,
    /// EOF or a fatal read error: stop.
    Done,
}

/// The result of one [`Receiver::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    /// What to wait for next.
    pub next: RxNext,
    /// The driver needs an interrupt for the buffers returned.
    pub notify: bool,
}

/// Moves host input (stdin, a pipe, a file) into the receive queue. Bytes are read only into
/// a buffer the driver has posted, so nothing is held on the host side and nothing is lost
/// while the guest is not reading.
pub struct Receiver {
    input: File,
    /// False for inputs epoll refuses (regular files, /dev/null): those are always readable.
    pollable: bool,
    eof: bool,
    buf: Box<[u8; RX_CHUNK]>,
    warned: LogOnce,
}

impl Receiver {
    /// Feeds `input` to the guest; it is treated as pollable until [`Self::set_unpollable`].
    pub fn new(input: File) -> Self {
        Self {
            input,
            pollable: true,
            eof: false,
            buf: Box::new([0; RX_CHUNK]),
            warned: LogOnce::default(),
        }
    }

    /// The host input, for epoll registration.
    pub fn input(&self) -> &File {
        &self.input
    }

    /// Whether the input can be watched with epoll.
    pub fn pollable(&self) -> bool {
        self.pollable
    }

    /// Marks the input as one epoll refuses; it is then read whenever buffers are posted.
    pub fn set_unpollable(&mut self) {
        self.pollable = false;
    }

    /// Fills posted receive buffers from the input. `may_read` is false when the input has not
    /// been reported readable: a pollable input may be a blocking fd (a tty), so it is read at
    /// most once per readiness event.
    pub fn pump(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        mut may_read: bool,
    ) -> Result<Pumped, PortError> {
        let mut returned = 0usize;
        // The driver announced buffers when notifications were re-enabled.
        let mut announced = false;
        let next = loop {
            if self.eof {
                break RxNext::Done;
            }
            if !may_read {
                break RxNext::Watch;
            }
            let Some(chain) = pop_chain(mem, queue)? else {
                if announced {
                    return Err(PortError::BrokenRing);
                }
                // Out of buffers: ask the driver to notify when it posts more (with EVENT_IDX
                // it would not otherwise), then re-check for ones posted meanwhile.
                announced = queue.enable_notification(mem).map_err(PortError::Queue)?;
                if announced {
                    continue;
                }
                break RxNext::WaitForBuffers;
            };
            announced = false;
            let head = chain.head_index();
            let bufs = match buffers(chain, mem, true, u64::MAX) {
                Ok(bufs) => bufs,
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::Chain,
                        "virtio-console: {}",
                        crate::error_chain(&PortError::Chain(e))
                    );
                    queue.add_used(mem, head, 0).map_err(PortError::Queue)?;
                    returned += 1;
                    continue;
                }
            };
            match self.read(bufs.len) {
                Some(n) => {
                    let written = bufs
                        .write_from(mem, &self.buf[..n])
                        .map_err(PortError::GuestMemory)?;
                    // At most RX_CHUNK.
                    queue
                        .add_used(mem, head, written as u32)
                        .map_err(PortError::Queue)?;
                    returned += 1;
                    may_read = !self.pollable;
                }
                // Nothing read: the buffer stays with the device for the next bytes.
                None => {
                    queue.go_to_previous_position();
                    if !self.eof {
                        break RxNext::Watch;
                    }
                }
            }
        };
        let notify = returned > 0 && queue.needs_notification(mem).map_err(PortError::Queue)?;
        Ok(Pumped { next, notify })
    }

    /// Reads at most `room` bytes into `buf`; `None` when nothing is available now or at EOF
    /// (then `eof` is set). A failing input is closed like one at EOF, which also makes this
    /// warning a one-off.
    fn read(&mut self, room: u64) -> Option<usize> {
        let len = usize::try_from(room).map_or(RX_CHUNK, |room| room.min(RX_CHUNK));
        loop {
            match (&self.input).read(&mut self.buf[..len]) {
                Ok(0) => self.eof = true,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!("virtio-console: input failed, closing it: {e}");
                    self.eof = true;
                }
            }
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::super::test_utils::*;
    use super::*;

    fn transmitter() -> (Transmitter, SharedBuf) {
        let out = SharedBuf::default();
        (Transmitter::new(Box::new(out.clone())), out)
    }

    /// A file-backed receiver, read until the buffers run out.
    fn file_receiver(bytes: &[u8]) -> (Receiver, TempFile) {
        let file = TempFile::new().unwrap();
        file.as_file().write_all(bytes).unwrap();
        let mut rx = Receiver::new(File::open(file.as_path()).unwrap());
        rx.set_unpollable();
        (rx, file)
    }

    fn pumped(next: RxNext, notify: bool) -> Pumped {
        Pumped { next, notify }
    }

    #[test]
    fn transmitted_chains_reach_the_writer() {
        let mem = mem();
        mem.write_slice(b"hello, ", GuestAddress(BUF)).unwrap();
        mem.write_slice(b"world", GuestAddress(BUF + 0x300))
            .unwrap();
        mem.write_slice(b"!\n", GuestAddress(BUF + 0x100)).unwrap();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 7, R), (BUF + 0x300, 5, R)]);
        driver.post(&[(BUF + 0x100, 2, R)]);
        let mut queue = driver.queue();
        let (mut tx, out) = transmitter();
        assert!(tx.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(out.take(), b"hello, world!\n");
        assert_eq!(driver.used(), vec![(0, 0), (2, 0)]);
        // Nothing new: nothing to do, no interrupt.
        assert!(!tx.process_queue(&mem, &mut queue).unwrap());
    }

    #[test]
    fn hostile_transmit_chains_are_returned_unwritten() {
        let mem = mem();
        mem.write_slice(b"ok", GuestAddress(BUF)).unwrap();
        let top = MEM_SIZE as u64;
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 2, R), (BUF + 2, 1, W)]);
        driver.post(&[(top - 1, 2, R)]);
        driver.post(&[(BUF, MAX_TX_CHAIN as u32 + 1, R)]);
        driver.post(&[(BUF, 0, R)]);
        // 4 → 5 → 5 → …
        driver.post(&[(BUF, 2, R), (BUF, 2, R)]);
        let looped = Descriptor::new(BUF, 2, VRING_DESC_F_NEXT as u16, 5);
        driver
            .mock
            .desc_table()
            .store(5, RawDescriptor::from(looped))
            .unwrap();
        driver.post(&[(BUF, 2, R)]);
        let mut queue = driver.queue();
        let (mut tx, out) = transmitter();
        assert!(tx.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(out.take(), b"ok");
        let used = driver.used();
        assert_eq!(used.len(), 6);
        assert!(used.iter().all(|&(_, len)| len == 0));
    }

    #[test]
    fn failing_output_still_returns_chains() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, R)]);
        driver.post(&[(BUF, 4, R)]);
        let mut queue = driver.queue();
        let mut tx = Transmitter::new(Box::new(Broken));
        assert!(tx.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(driver.used(), vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn bogus_avail_index_does_not_spin() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, W)]);
        // Claim far more buffers than the ring holds.
        driver.mock.avail().idx().store(1000);
        let mut queue = driver.queue();
        let (mut tx, _out) = transmitter();
        assert!(matches!(
            tx.process_queue(&mem, &mut queue),
            Err(PortError::BrokenRing)
        ));
        let (mut rx, _file) = file_receiver(b"x");
        let mut queue = driver.queue();
        assert!(matches!(
            rx.pump(&mem, &mut queue, true),
            Err(PortError::BrokenRing)
        ));
    }

    #[test]
    fn input_fills_buffers_up_to_their_size() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, W)]);
        driver.post(&[(BUF + 0x100, 3, W), (BUF + 0x200, 5, W)]);
        driver.post(&[(BUF + 0x300, 100, W)]);
        let mut queue = driver.queue();
        let (mut rx, _file) = file_receiver(b"hello, world!");
        let got = rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, true));
        assert_eq!(driver.used(), vec![(0, 4), (1, 8), (3, 1)]);
        assert_eq!(guest(&mem, BUF, 4), b"hell");
        assert_eq!(guest(&mem, BUF + 0x100, 3), b"o, ");
        assert_eq!(guest(&mem, BUF + 0x200, 5), b"world");
        assert_eq!(guest(&mem, BUF + 0x300, 1), b"!");
        // EOF leaves the next buffer with the driver's queue, unused.
        driver.post(&[(BUF + 0x400, 8, W)]);
        let got = rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(got, pumped(RxNext::Done, false));
        assert_eq!(driver.used().len(), 3);
        assert_eq!(queue.next_avail(), 3);
    }

    #[test]
    fn large_buffers_take_a_chunk_per_read() {
        let mem = mem();
        let sent: Vec<u8> = (0..RX_CHUNK + 100).map(|i| (i * 7) as u8).collect();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 2 * RX_CHUNK as u32, W)]);
        driver.post(&[(BUF + 0x4000, 2 * RX_CHUNK as u32, W)]);
        let mut queue = driver.queue();
        let (mut rx, _file) = file_receiver(&sent);
        rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(driver.used(), vec![(0, RX_CHUNK as u32), (1, 100)]);
        assert_eq!(guest(&mem, BUF, RX_CHUNK), sent[..RX_CHUNK]);
        assert_eq!(guest(&mem, BUF + 0x4000, 100), sent[RX_CHUNK..]);
    }

    #[test]
    fn pollable_input_is_read_once_per_readiness() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, W)]);
        driver.post(&[(BUF + 0x100, 4, W)]);
        let mut queue = driver.queue();
        let (input, mut writer) = pipe();
        let mut rx = Receiver::new(input);
        writer.write_all(b"abcdef").unwrap();
        // Not reported readable: not touched (a blocking fd would hang the loop).
        let got = rx.pump(&mem, &mut queue, false).unwrap();
        assert_eq!(got, pumped(RxNext::Watch, false));
        assert!(driver.used().is_empty());
        for (want_used, want) in [(1, &b"abcd"[..]), (2, b"ef")] {
            let got = rx.pump(&mem, &mut queue, true).unwrap();
            assert_eq!(got, pumped(RxNext::Watch, true));
            assert_eq!(driver.used().len(), want_used);
            let (_, len) = driver.used()[want_used - 1];
            let addr = if want_used == 1 { BUF } else { BUF + 0x100 };
            assert_eq!(guest(&mem, addr, len as usize), want);
        }
    }

    #[test]
    fn input_waits_in_the_host_while_there_are_no_buffers() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        let mut queue = driver.queue();
        let (input, mut writer) = pipe();
        let mut rx = Receiver::new(input);
        let sent = b"0123456789";
        writer.write_all(sent).unwrap();
        drop(writer);
        let got = rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(got, pumped(RxNext::WaitForBuffers, false));
        // A small buffer takes only its share; the rest stays in the pipe.
        driver.post(&[(BUF, 3, W)]);
        assert_eq!(rx.pump(&mem, &mut queue, true).unwrap().next, RxNext::Watch);
        assert_eq!(
            rx.pump(&mem, &mut queue, true).unwrap().next,
            RxNext::WaitForBuffers
        );
        driver.post(&[(BUF + 0x100, 64, W)]);
        assert_eq!(rx.pump(&mem, &mut queue, true).unwrap().next, RxNext::Watch);
        let mut got = guest(&mem, BUF, 3);
        got.extend(guest(&mem, BUF + 0x100, 7));
        assert_eq!(driver.used(), vec![(0, 3), (1, 7)]);
        assert_eq!(got, sent);
        // Then EOF, with the next buffer kept for nothing.
        driver.post(&[(BUF + 0x200, 64, W)]);
        assert_eq!(rx.pump(&mem, &mut queue, true).unwrap().next, RxNext::Done);
        assert_eq!(driver.used().len(), 2);
    }

    #[test]
    fn hostile_receive_chains_are_skipped() {
        let mem = mem();
        let top = MEM_SIZE as u64;
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, R)]);
        driver.post(&[(BUF, 4, W), (BUF + 4, 4, R)]);
        driver.post(&[(top - 2, 4, W)]);
        driver.post(&[(BUF, 0, W)]);
        driver.post(&[(BUF + 0x100, 8, W)]);
        let mut queue = driver.queue();
        mem.write_slice(&[0xaa; 8], GuestAddress(BUF)).unwrap();
        let (mut rx, _file) = file_receiver(b"data");
        rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(driver.used(), vec![(0, 0), (1, 0), (3, 0), (4, 0), (5, 4)]);
        assert_eq!(guest(&mem, BUF, 8), [0xaa; 8]);
        assert_eq!(guest(&mem, BUF + 0x100, 4), b"data");
    }

    #[test]
    fn dev_null_ends_without_using_buffers() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 4, W)]);
        let mut queue = driver.queue();
        let mut rx = Receiver::new(File::open("/dev/null").unwrap());
        rx.set_unpollable();
        let got = rx.pump(&mem, &mut queue, true).unwrap();
        assert_eq!(got, pumped(RxNext::Done, false));
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn running_out_of_buffers_asks_for_a_notification() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, 1, W)]);
        driver.post(&[(BUF + 1, 1, W)]);
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        let (mut rx, _file) = file_receiver(b"abc");
        rx.pump(&mem, &mut queue, true).unwrap();
        // avail_event follows the used ring (16 entries).
        let avail_event = driver.mock.used_addr().0 + 4 + 8 * 16;
        let avail_event: u16 = mem.read_obj(GuestAddress(avail_event)).unwrap();
        assert_eq!(avail_event, 2);
    }
}
