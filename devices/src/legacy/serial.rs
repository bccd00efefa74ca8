//! COM1: a 16550A UART (vm-superio) whose output goes to a writer and whose input comes from a
//! host file descriptor pumped by the event loop.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::warn;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, SerialEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::{warn_once, LogOnce, Problem};

/// Number of consecutive I/O ports the UART decodes.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Largest chunk read from the host input at once: the UART FIFO is 64 bytes, more could not be
/// delivered anyway.
const INPUT_CHUNK: usize = 64;

/// Errors from the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Raising the UART interrupt failed.
    #[error("failed to signal the serial irq")]
    Irq(#[source] io::Error),
    /// Writing guest output to the host failed.
    #[error("failed to write serial output")]
    Output(#[source] io::Error),
    /// Creating the input wake-up EventFd failed.
    #[error("failed to create the serial input eventfd")]
    EventFd(#[source] io::Error),
    /// Only one [`SerialInput`] can feed a UART.
    #[error("serial input is already attached")]
    InputAttached,
}

/// Bytes the UART's receive FIFO holds (vm-superio's FIFO_SIZE).
const FIFO_SIZE: usize = 64;

/// The UART's interrupt output: one EventFd write per edge. Shared, so that a restore can
/// build the UART again around the same line.
#[derive(Clone)]
struct IrqTrigger(Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes a paused [`SerialInput`] once the guest has drained the receive FIFO. Armed only while
/// the input is paused, so the common case (FIFO never full) costs no extra wake-ups.
#[derive(Default)]
struct RxDrained {
    armed: AtomicBool,
    evt: OnceLock<EventFd>,
}

impl SerialEvents for RxDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if !self.armed.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Some(Err(e)) = self.evt.get().map(|evt| evt.write(1)) {
            warn!("serial: cannot wake the input pump: {e}");
        }
    }
}

type Uart = vm_superio::Serial<IrqTrigger, Arc<RxDrained>, Box<dyn Write + Send>>;

/// The UART's registers and receive FIFO, for a snapshot (vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most 64).
    pub in_buffer: Vec<u8>,
}

/// COM1 8250 UART (vm-superio) whose output goes to a writer and whose IRQ fires an EventFd.
pub struct Serial {
    uart: Uart,
    warned: LogOnce,
}

impl Serial {
    /// Creates the UART; `irq` is signalled on every interrupt edge (register it as an irqfd).
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::with_events(IrqTrigger(Arc::new(irq)), Arc::default(), out),
            warned: LogOnce::default(),
        }
    }

    /// The UART's state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts a saved state back, keeping this UART's interrupt line, input wake-up and output.
    /// Received bytes beyond the FIFO's 64 (only a corrupt snapshot has them) are dropped. As
    /// vm-superio does, an interrupt the state has pending is raised again; if that fails (an
    /// eventfd at its limit already signals the line) the UART keeps its state, with a warning.
    pub fn restore(&mut self, s: &SerialSnapshot) {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.iter().take(FIFO_SIZE).copied().collect(),
        };
        let trigger = self.uart.interrupt_evt().clone();
        let events = self.uart.events().clone();
        // The output moves over only once the new UART exists: a failure must not lose it.
        match Uart::from_state(&state, trigger, events, Box::new(io::sink())) {
            Ok(mut uart) => {
                std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
                self.uart = uart;
            }
            Err(e) => warn!("serial: cannot restore the UART: {e:?}"),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(e)) => Err(SerialError::Irq(e)),
            Err(UartError::IOError(e)) => Err(SerialError::Output(e)),
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Requests one signal of the drained EventFd at the next moment the guest empties the FIFO.
    fn arm_drained(&self) {
        self.uart.events().armed.store(true, Ordering::Relaxed);
    }

    fn attach_drained(&self, evt: EventFd) -> Result<(), SerialError> {
        self.uart
            .events()
            .evt
            .set(evt)
            .map_err(|_| SerialError::InputAttached)
    }

    /// The UART registers are bytes; anything else is a guest bug we refuse.
    fn register(&mut self, offset: u64, len: usize) -> Option<u8> {
        match u8::try_from(offset) {
            Ok(reg) if len == 1 && offset < SERIAL_PORT_LEN => Some(reg),
            _ => {
                warn_once!(
                    self.warned,
                    Problem::Access,
                    "serial: ignoring {len}-byte access at offset {offset:#x}"
                );
                None
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.register(offset, data.len()) {
            Some(reg) => data[0] = self.uart.read(reg),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = self.register(offset, data.len()) else {
            return;
        };
        let err = match self.uart.write(reg, data[0]) {
            Ok(()) => return,
            Err(UartError::Trigger(e)) => SerialError::Irq(e),
            Err(UartError::IOError(e)) => SerialError::Output(e),
            // Only input can overflow the FIFO.
            Err(UartError::FullFifo) => return,
        };
        // Output that cannot be written is dropped (the guest can't be blocked); say so once.
        warn_once!(
            self.warned,
            Problem::Output,
            "serial: {}",
            crate::error_chain(&err)
        );
    }
}

/// What the input pump wants from the event loop next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Wait for the host input to become readable.
    Watch,
    /// The FIFO is full: wait for the guest to drain it.
    WaitForRoom,
    /// EOF or a fatal read error: stop.
    Done,
}

/// Event-loop glue feeding host input (stdin, a pipe, a file) into the UART without dropping
/// bytes: it reads no more than the FIFO can take and pauses while the FIFO is full.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: File,
    drained: EventFd,
    /// Bytes read from the host that the FIFO did not accept yet.
    pending: Vec<u8>,
    /// False for inputs epoll refuses (regular files, /dev/null): those are always readable.
    pollable: bool,
    watching: bool,
    eof: bool,
}

impl SerialInput {
    /// Feeds `input` into `serial`; fails if that UART already has an input.
    pub fn new(serial: Arc<Mutex<Serial>>, input: File) -> Result<Self, SerialError> {
        let drained = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let clone = drained.try_clone().map_err(SerialError::EventFd)?;
        lock(&serial).attach_drained(clone)?;
        Ok(Self {
            serial,
            input,
            drained,
            pending: Vec::with_capacity(INPUT_CHUNK),
            pollable: true,
            watching: false,
            eof: false,
        })
    }

    /// Moves `pending` into the FIFO; true when everything fit.
    fn deliver(pending: &mut Vec<u8>, serial: &mut Serial) -> bool {
        match serial.enqueue_input(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            // The bytes are queued; only the interrupt edge was lost, and the guest will see
            // them at its next poll of LSR.
            Err(e) => warn!("serial input: {e}"),
        }
        pending.is_empty()
    }

    /// Moves host input into the FIFO as far as it goes. `may_read` is false when the input has
    /// not been reported readable: a pollable input may be a blocking fd (a tty), so it is read
    /// at most once per readiness event.
    fn pump(&mut self, mut may_read: bool) -> Next {
        loop {
            let room = {
                let mut serial = lock(&self.serial);
                let fit = Self::deliver(&mut self.pending, &mut serial);
                if self.eof && fit {
                    return Next::Done;
                }
                let room = if fit { serial.fifo_capacity() } else { 0 };
                if room == 0 {
                    serial.arm_drained();
                    return Next::WaitForRoom;
                }
                room
            };
            if !may_read {
                return Next::Watch;
            }
            // Read without holding the UART lock so vCPUs never wait on host I/O. The guest can
            // only drain the FIFO meanwhile, so `room` bytes still fit afterwards.
            let mut buf = [0u8; INPUT_CHUNK];
            match (&self.input).read(&mut buf[..room.min(INPUT_CHUNK)]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Watch,
                Err(e) => {
                    warn!("serial input: read failed, closing it: {e}");
                    self.eof = true;
                }
            }
            may_read = !self.pollable;
        }
    }

    fn input_events(&self) -> Events {
        Events::new(&self.input, EventSet::IN)
    }

    /// Makes the input fd's epoll registration match what the pump wants.
    fn apply(&mut self, next: Next, ops: &mut EventOps) {
        let watch = next == Next::Watch && self.pollable;
        if watch == self.watching {
            return;
        }
        let res = if watch {
            ops.add(self.input_events())
        } else {
            ops.remove(self.input_events())
        };
        match res {
            Ok(()) => self.watching = watch,
            Err(e) => warn!("serial input: cannot update epoll interest: {e:?}"),
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let readable = if events.fd() == self.drained.as_raw_fd() {
            // Only the wake-up matters, not the count.
            let _ = self.drained.read();
            !self.pollable
        } else if events.fd() == self.input.as_raw_fd() {
            true
        } else {
            return;
        };
        let next = self.pump(readable);
        self.apply(next, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            warn!("serial input: cannot watch the drain eventfd: {e:?}");
            return;
        }
        match ops.add(self.input_events()) {
            Ok(()) => self.watching = true,
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                // epoll refuses regular files and /dev/null; they never block, so read them
                // whenever the FIFO has room.
                self.pollable = false;
                let next = self.pump(true);
                self.apply(next, ops);
            }
            Err(e) => warn!("serial input: cannot watch the input: {e:?}"),
        }
    }
}

fn lock(serial: &Mutex<Serial>) -> std::sync::MutexGuard<'_, Serial> {
    serial.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::io::PipeWriter;
    use std::os::fd::OwnedFd;

    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const FIFO: usize = 64;

    /// A writer the test can inspect after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, EventFd, SharedBuf) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0];
        serial.read(offset, &mut b);
        b[0]
    }

    /// Reads RBR until LSR says the FIFO is empty.
    fn drain(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut serial = serial.lock().unwrap();
        let mut got = Vec::new();
        while read_reg(&mut serial, LSR) & LSR_DR != 0 {
            got.push(read_reg(&mut serial, DATA));
        }
        got
    }

    fn pipe() -> (File, PipeWriter) {
        let (r, w) = io::pipe().unwrap();
        (File::from(OwnedFd::from(r)), w)
    }

    #[test]
    fn a_saved_uart_is_restored_with_its_line_input_and_output() {
        let (mut serial, irq, _out) = uart();
        serial.write(IER, &[IER_RDA]);
        serial.write(7, &[0x5a]);
        serial.enqueue_input(b"abc").unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let snap = serial.save();
        assert_eq!((snap.interrupt_enable, snap.scratch), (IER_RDA, 0x5a));
        assert_eq!(snap.in_buffer, b"abc");
        let json = serde_json::to_string(&snap).unwrap();
        let snap: SerialSnapshot = serde_json::from_str(&json).unwrap();

        let (mut fresh, irq, out) = uart();
        fresh.attach_drained(EventFd::new(0).unwrap()).unwrap();
        fresh.restore(&snap);
        assert_eq!(fresh.save(), snap);
        // As vm-superio does, the pending receive interrupt is raised again.
        assert_eq!(irq.read().unwrap(), 1);
        let got: Vec<u8> = (0..3).map(|_| read_reg(&mut fresh, DATA)).collect();
        assert_eq!(got, b"abc");
        assert_eq!(read_reg(&mut fresh, 7), 0x5a);
        // The same output, and the same input wake-up.
        fresh.write(DATA, b"x");
        assert_eq!(*out.0.lock().unwrap(), b"x");
        let again = fresh.attach_drained(EventFd::new(0).unwrap());
        assert!(matches!(again, Err(SerialError::InputAttached)));
    }

    #[test]
    fn an_oversized_fifo_in_a_snapshot_is_cut_to_the_fifo() {
        let (mut serial, _irq, _out) = uart();
        let snap = SerialSnapshot {
            in_buffer: vec![7; 1 << 20],
            ..serial.save()
        };
        serial.restore(&snap);
        assert_eq!(serial.save().in_buffer, vec![7; FIFO]);
        assert_eq!(serial.fifo_capacity(), 0);
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut serial, irq, out) = uart();
        for b in b"hi\n" {
            serial.write(DATA, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
        // THRE interrupts are disabled by default.
        assert!(irq.read().is_err());
    }

    #[test]
    fn thr_write_raises_irq_when_enabled() {
        let (mut serial, irq, _out) = uart();
        serial.write(IER, &[IER_THRE]);
        // Enabling THRE with an empty THR asserts the interrupt at once, like a real 16550.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_reg(&mut serial, IIR) & 0x0f, 0x02);
        serial.write(DATA, b"x");
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let (mut serial, irq, _out) = uart();
        serial.write(IER, &[IER_RDA]);
        assert_eq!(serial.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DR, LSR_DR);
        assert_eq!(read_reg(&mut serial, DATA), b'a');
        assert_eq!(read_reg(&mut serial, DATA), b'b');
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DR, 0);
    }

    #[test]
    fn fifo_full_accepts_only_what_fits() {
        let (mut serial, _irq, _out) = uart();
        assert_eq!(serial.enqueue_input(&[b'z'; 100]).unwrap(), FIFO);
        assert_eq!(serial.fifo_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(serial.enqueue_input(b"").unwrap(), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut serial, _irq, out) = uart();
        let mut two = [0u8; 2];
        serial.read(DATA, &mut two);
        assert_eq!(two, [0xff; 2]);
        serial.write(DATA, b"xy");
        serial.write(SERIAL_PORT_LEN, b"x");
        serial.write(DATA, b"");
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn second_input_is_refused() {
        let (serial, _irq, _out) = uart();
        let serial = Arc::new(Mutex::new(serial));
        let _first = SerialInput::new(serial.clone(), pipe().0).unwrap();
        assert!(matches!(
            SerialInput::new(serial, pipe().0),
            Err(SerialError::InputAttached)
        ));
    }

    #[test]
    fn pump_pauses_when_fifo_is_full_and_keeps_bytes() {
        let (serial, _irq, _out) = uart();
        let serial = Arc::new(Mutex::new(serial));
        let (input, mut writer) = pipe();
        let mut pump = SerialInput::new(serial.clone(), input).unwrap();
        let sent: Vec<u8> = (0..100u8).collect();
        writer.write_all(&sent).unwrap();

        assert_eq!(pump.pump(true), Next::WaitForRoom);
        assert!(pump.drained.read().is_err(), "not drained yet");
        let mut got = drain(&serial);
        assert_eq!(got.len(), FIFO);
        assert_eq!(pump.drained.read().unwrap(), 1);

        assert_eq!(pump.pump(false), Next::Watch);
        assert_eq!(pump.pump(true), Next::Watch);
        got.extend(drain(&serial));
        assert_eq!(got, sent);

        drop(writer);
        assert_eq!(pump.pump(true), Next::Done);
    }

    #[test]
    fn event_loop_feeds_a_pipe_through_a_full_fifo() {
        let (serial, _irq, _out) = uart();
        let serial = Arc::new(Mutex::new(serial));
        let (input, mut writer) = pipe();
        let mut manager = EventManager::<SerialInput>::new().unwrap();
        let id = manager.add_subscriber(SerialInput::new(serial.clone(), input).unwrap());
        let sent: Vec<u8> = (0..200).map(|i| i as u8).collect();
        writer.write_all(&sent).unwrap();
        drop(writer);

        let mut got = Vec::new();
        for _ in 0..20 {
            manager.run_with_timeout(100).unwrap();
            got.extend(drain(&serial));
            if manager.subscriber_mut(id).unwrap().eof {
                break;
            }
        }
        assert_eq!(got, sent);
        assert!(manager.subscriber_mut(id).unwrap().eof);
        // Nothing left to watch: the loop stays idle.
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn unpollable_file_input_is_read_as_room_appears() {
        let (serial, _irq, _out) = uart();
        let serial = Arc::new(Mutex::new(serial));
        let file = TempFile::new().unwrap();
        let sent: Vec<u8> = (0..150).map(|i| (i * 7) as u8).collect();
        file.as_file().write_all(&sent).unwrap();
        let input = File::open(file.as_path()).unwrap();

        let mut manager = EventManager::<SerialInput>::new().unwrap();
        let id = manager.add_subscriber(SerialInput::new(serial.clone(), input).unwrap());
        assert!(!manager.subscriber_mut(id).unwrap().pollable);
        let mut got = drain(&serial);
        while got.len() < sent.len() {
            assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
            got.extend(drain(&serial));
        }
        assert_eq!(got, sent);
        assert!(manager.subscriber_mut(id).unwrap().eof);
    }

    #[test]
    fn dev_null_input_ends_at_once() {
        let (serial, _irq, _out) = uart();
        let serial = Arc::new(Mutex::new(serial));
        let input = File::open("/dev/null").unwrap();
        let mut manager = EventManager::<SerialInput>::new().unwrap();
        let id = manager.add_subscriber(SerialInput::new(serial.clone(), input).unwrap());
        assert!(manager.subscriber_mut(id).unwrap().eof);
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        assert!(drain(&serial).is_empty());
    }
}
