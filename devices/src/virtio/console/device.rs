//! The virtio-console device: configuration space, feature negotiation and the event-loop glue
//! that serves the queues when the driver notifies them and the host input when it is readable.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::port::{Receiver, RxNext, Transmitter};
use super::{QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::snapshot::SnapshotError;
use crate::virtio::common::VirtioCommon;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::{warn_once, LogOnce, Problem};

/// Errors setting up a virtio-console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A queue EventFd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
}

/// A virtio-console device with one port.
pub struct Console {
    tx: Transmitter,
    rx: Option<Receiver>,
    /// Queues indexed by [`RX_QUEUE`] and [`TX_QUEUE`].
    common: VirtioCommon<2>,
    /// The host input is registered with epoll.
    watching: bool,
    warned: LogOnce,
}

impl Console {
    /// `output` gets every byte the guest transmits (hvc0 → rvmm's stdout); `input` (host stdin
    /// or a pipe/file/`/dev/null`) is fed to the guest's receive queue.
    pub fn new(output: Box<dyn Write + Send>, input: Option<File>) -> Result<Self, ConsoleError> {
        Ok(Self {
            tx: Transmitter::new(output),
            rx: input.map(Receiver::new),
            common: VirtioCommon::new("virtio-console", QUEUE_SIZE)
                .map_err(ConsoleError::EventFd)?,
            watching: false,
            warned: LogOnce::default(),
        })
    }

    /// Writes out what the guest transmitted.
    fn transmit(&mut self) {
        self.common
            .serve(Problem::TxQueue, "transmit queue: ", |mem, queues| {
                self.tx.process_queue(mem, &mut queues[TX_QUEUE])
            });
    }

    /// Fills receive buffers from the host input, then makes the input's epoll registration
    /// match what the receiver wants next.
    fn receive(&mut self, may_read: bool, ops: &mut EventOps) {
        let Some(rx) = self.rx.as_mut() else {
            return;
        };
        // Before activation there is nowhere to put input; the driver's first receive
        // notification brings the watch back.
        let mut next = RxNext::WaitForBuffers;
        let mut notify = false;
        if let Some(active) = self.common.active() {
            match rx.pump(&active.mem, &mut active.queues[RX_QUEUE], may_read) {
                Ok(pumped) => (next, notify) = (pumped.next, pumped.notify),
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::RxQueue,
                        "virtio-console: receive queue: {}",
                        crate::error_chain(&e)
                    );
                    notify = true;
                }
            }
        }
        if notify {
            self.common.signal_used_queue();
        }
        self.apply(next, ops);
    }

    /// Watches the input for readability exactly when the receiver waits for it, so the loop
    /// neither spins on input it cannot deliver nor misses input it can.
    fn apply(&mut self, next: RxNext, ops: &mut EventOps) {
        let Some(rx) = self.rx.as_ref() else {
            return;
        };
        let watch = next == RxNext::Watch && rx.pollable();
        if watch == self.watching {
            return;
        }
        let events = Events::new(rx.input(), EventSet::IN);
        let res = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match res {
            Ok(()) => self.watching = watch,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Epoll,
                    "virtio-console: cannot update epoll interest in the input: {e:?}"
                );
            }
        }
    }
}

fn features() -> u64 {
    [VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX]
        .into_iter()
        .fold(0, |acc, bit| acc | 1 << bit)
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        features()
    }

    fn set_acked_features(&mut self, _features: u64) {
        // Nothing to adapt: EVENT_IDX is applied by the transport.
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr) only has meaning
        // with SIZE, MULTIPORT or EMERG_WRITE, none of which is offered: it all reads as zero.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
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
        self.common.activate(mem, queues, interrupt)
    }

    fn reset(&mut self) -> bool {
        // The input stays open; it is unwatched at its next event and watched again once the
        // driver posts receive buffers.
        self.common.reset();
        true
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        // Every chain is answered as it is popped, or put back (a receive buffer with no
        // input for it yet).
        self.common.queue_positions()
    }
}

impl MutEventSubscriber for Console {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.common.queue_event(fd) {
            Some(TX_QUEUE) => self.transmit(),
            Some(_) if !self.common.is_active() => self.common.idle(),
            Some(_) => {
                // New buffers: an unpollable input is read now, a pollable one is watched
                // again and read once epoll reports it readable (a tty may be a blocking fd).
                let may_read = self.rx.as_ref().is_some_and(|rx| !rx.pollable());
                self.receive(may_read, ops);
            }
            None if self
                .rx
                .as_ref()
                .is_some_and(|rx| rx.input().as_raw_fd() == fd) =>
            {
                self.receive(true, ops);
            }
            None => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queue_events(ops);
        let Some(rx) = self.rx.as_mut() else {
            return;
        };
        match ops.add(Events::new(rx.input(), EventSet::IN)) {
            Ok(()) => self.watching = true,
            // epoll refuses regular files and /dev/null; they never block, so they are read
            // whenever the driver posts buffers.
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => rx.set_unpollable(),
            Err(e) => warn!("virtio-console: cannot watch the input: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::super::test_utils::*;
    use super::super::RX_CHUNK;
    use super::*;
    use crate::virtio::test_utils::{notify_queue, run_until_idle, CountingInterrupt};

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// Where the transmit queue's rings live; the receive queue's start at 0.
    const TX_RINGS: u64 = 0x1000;

    fn console(input: Option<File>) -> (Console, SharedBuf) {
        let out = SharedBuf::default();
        (Console::new(Box::new(out.clone()), input).unwrap(), out)
    }

    #[test]
    fn identity_features_and_config() {
        let (mut c, _out) = console(None);
        assert_eq!(c.device_type(), VIRTIO_ID_CONSOLE);
        assert_eq!(c.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(c.queue_events().len(), 2);
        assert_eq!(
            c.avail_features(),
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        for offset in [0, 4, 8, 12, u64::MAX] {
            let mut data = [0xff; 4];
            c.read_config(offset, &mut data);
            assert_eq!(data, [0; 4]);
        }
        c.write_config(8, b"x");
        let mut data = [0xff; 4];
        c.read_config(8, &mut data);
        assert_eq!(data, [0; 4]);
    }

    /// A console on an event loop, activated with mock queues.
    struct Rig<'a> {
        console: Arc<Mutex<Console>>,
        out: SharedBuf,
        manager: Manager,
        irq: Arc<CountingInterrupt>,
        rx: Driver<'a>,
        tx: Driver<'a>,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, input: Option<File>) -> Self {
            let (console, out) = console(input);
            let console = Arc::new(Mutex::new(console));
            let mut manager = Manager::new().unwrap();
            manager.add_subscriber(console.clone());
            let irq = Arc::new(CountingInterrupt::default());
            let (rx, tx) = (Driver::new(mem, 0), Driver::new(mem, TX_RINGS));
            let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
            console
                .lock()
                .unwrap()
                .activate(mem.clone(), vec![rx.queue(), tx.queue()], interrupt)
                .unwrap();
            Self {
                console,
                out,
                manager,
                irq,
                rx,
                tx,
            }
        }

        /// What the transport does on a QueueNotify write.
        fn notify(&self, queue: usize) {
            notify_queue(&self.console, queue)
        }

        /// Runs the loop until it has nothing to do; returns the events it handled.
        fn run(&mut self) -> usize {
            run_until_idle(&mut self.manager)
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let mem = mem();
        let mut rig = Rig::new(&mem, None);
        mem.write_slice(b"login: ", GuestAddress(BUF)).unwrap();
        rig.tx.post(&[(BUF, 3, R), (BUF + 3, 4, R)]);
        rig.notify(TX_QUEUE);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.out.take(), b"login: ");
        assert_eq!(rig.tx.used(), vec![(0, 0)]);
        assert_eq!(rig.irq.count(), 1);
    }

    #[test]
    fn pipe_input_waits_for_buffers_without_spinning() {
        let mem = mem();
        let (input, mut writer) = pipe();
        let mut rig = Rig::new(&mem, Some(input));
        writer.write_all(b"root\n").unwrap();
        // Readable but nowhere to put it: one event, then the input is left alone.
        assert_eq!(rig.run(), 1);
        assert!(rig.rx.used().is_empty());
        assert_eq!(rig.irq.count(), 0);

        rig.rx.post(&[(BUF, 64, W)]);
        rig.notify(RX_QUEUE);
        // The notification re-arms the watch, then the input is read.
        assert_eq!(rig.run(), 2);
        assert_eq!(rig.rx.used(), vec![(0, 5)]);
        assert_eq!(guest(&mem, BUF, 5), b"root\n");
        assert_eq!(rig.irq.count(), 1);

        // EOF with no buffer posted: unwatched again; with one, the input is done.
        drop(writer);
        assert_eq!(rig.run(), 1);
        rig.rx.post(&[(BUF, 64, W)]);
        rig.notify(RX_QUEUE);
        assert_eq!(rig.run(), 2);
        assert_eq!(rig.rx.used().len(), 1);
        rig.notify(RX_QUEUE);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.irq.count(), 1);
    }

    #[test]
    fn file_input_is_read_when_buffers_are_posted() {
        let mem = mem();
        let file = TempFile::new().unwrap();
        let sent: Vec<u8> = (0..RX_CHUNK + 10).map(|i| (i * 3) as u8).collect();
        file.as_file().write_all(&sent).unwrap();
        let mut rig = Rig::new(&mem, Some(File::open(file.as_path()).unwrap()));
        // Regular files cannot be watched: nothing happens until buffers arrive.
        assert_eq!(rig.run(), 0);
        rig.rx.post(&[(BUF, RX_CHUNK as u32, W)]);
        rig.rx.post(&[(BUF + 0x2000, RX_CHUNK as u32, W)]);
        rig.rx.post(&[(BUF + 0x4000, RX_CHUNK as u32, W)]);
        rig.notify(RX_QUEUE);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.rx.used(), vec![(0, RX_CHUNK as u32), (1, 10)]);
        let mut got = guest(&mem, BUF, RX_CHUNK);
        got.extend(guest(&mem, BUF + 0x2000, 10));
        assert_eq!(got, sent);
        assert_eq!(rig.irq.count(), 1);
    }

    #[test]
    fn reset_device_ignores_queues_and_input() {
        let mem = mem();
        let (input, mut writer) = pipe();
        let mut rig = Rig::new(&mem, Some(input));
        assert!(rig.console.lock().unwrap().reset());
        rig.rx.post(&[(BUF, 64, W)]);
        rig.tx.post(&[(BUF, 4, R)]);
        rig.notify(RX_QUEUE);
        rig.notify(TX_QUEUE);
        writer.write_all(b"x").unwrap();
        assert_eq!(rig.run(), 3);
        assert!(rig.rx.used().is_empty() && rig.tx.used().is_empty());
        assert!(rig.out.take().is_empty());
        assert_eq!(rig.irq.count(), 0);
    }
}
