//! virtio-vsock device model against a plain Unix-socket pair.
//!
//! A driver in a `GuestMemoryMmap` (no guest, no KVM) opens a stream connection from a guest
//! port to a host listener at `PATH_<port>`, the way a guest reaches a host service, and moves
//! data through the real device (queues, muxer, credit-based flow control) while a host thread
//! reads or writes the other end of the Unix socket. The baseline moves the same bytes in the
//! same chunk sizes through `UnixStream::pair()`. Rounds of the two alternate and each side's
//! median round is reported, so background noise hits both alike.
//!
//! Run: `cargo bench -p rvmm-devices --bench vsock`. The Markdown table also goes to
//! `RVMM_BENCH_OUT` (default: `<target dir>/bench-vsock.md`).

#[path = "common/report.rs"]
mod report;
#[path = "common/ring.rs"]
mod ring;

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use ring::Ring;
use rvmm_devices::interrupt::Interrupt;
use rvmm_devices::virtio::vsock::muxer::port_path;
use rvmm_devices::virtio::vsock::packet::{Header, Op, HDR_LEN, HOST_CID, MAX_PKT_DATA};
use rvmm_devices::virtio::vsock::{Vsock, VsockConfig, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use rvmm_devices::virtio::{VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;
type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const CID: u64 = 3;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 1234;
/// The guest's receive buffer (`buf_alloc`): what the device may send before a credit update.
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Bytes moved per round and direction.
const ROUND_BYTES: u64 = 64 << 20;
const ROUNDS: usize = 5;
const CHUNKS: [usize; 2] = [4096, MAX_PKT_DATA as usize];

// Guest memory: three rings, then one packet buffer per receive and transmit slot.
const RX_RING: u64 = 0;
const TX_RING: u64 = Ring::SPAN;
const EVENT_RING: u64 = 2 * Ring::SPAN;
const SLOT_LEN: u64 = 0x11000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = RX_BUFS + QUEUE_SIZE as u64 * SLOT_LEN;
const MEM_SIZE: usize = (TX_BUFS + QUEUE_SIZE as u64 * SLOT_LEN) as usize;

/// Interrupts cost nothing here: the driver polls the used rings.
struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest side: a driver for the receive and transmit queues plus the stream's flow control.
struct Guest {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    vsock: Arc<Mutex<Vsock>>,
    manager: Manager,
    free_tx: Vec<u16>,
    /// The host side's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    /// Payload bytes this side consumed, and the count last told to the device.
    fwd_cnt: Wrapping<u32>,
    sent_fwd_cnt: Wrapping<u32>,
    established: bool,
}

impl Guest {
    fn new(uds_path: PathBuf) -> BenchResult<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        let vsock = Arc::new(Mutex::new(Vsock::new(VsockConfig { cid: CID, uds_path })?));
        let mut manager = Manager::new()?;
        manager.add_subscriber(vsock.clone());
        let mut rx = Ring::new(&mem, RX_RING, QUEUE_SIZE);
        let tx = Ring::new(&mem, TX_RING, QUEUE_SIZE);
        let event = Ring::new(&mem, EVENT_RING, QUEUE_SIZE);
        for i in 0..QUEUE_SIZE {
            let slot = u64::from(i) * SLOT_LEN;
            let rx_len = (HDR_LEN + MAX_PKT_DATA as usize) as u32;
            let write = VRING_DESC_F_WRITE as u16;
            rx.set_desc(i, Descriptor::new(RX_BUFS + slot, rx_len, write, 0))?;
            rx.push(i)?;
            mem.write_slice(&payload(i), GuestAddress(TX_BUFS + slot + HDR_LEN as u64))?;
        }
        rx.publish()?;
        {
            let mut dev = vsock.lock().unwrap();
            dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
            let queues = vec![rx.queue()?, tx.queue()?, event.queue()?];
            let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(NoInterrupt)));
            dev.activate(mem.clone(), queues, interrupt)?;
        }
        Ok(Self {
            mem,
            rx,
            tx,
            vsock,
            manager,
            free_tx: (0..QUEUE_SIZE).rev().collect(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            sent_fwd_cnt: Wrapping(0),
            established: false,
        })
    }

    fn notify(&self, queue: usize) -> io::Result<()> {
        self.vsock.lock().unwrap().queue_events()[queue].write(1)
    }

    /// Queues one packet of `len` payload bytes (the slot's fixed pattern) on the transmit
    /// ring; [`Guest::kick`] sends everything queued.
    fn queue_packet(&mut self, op: Op, len: usize) -> BenchResult<()> {
        let slot = self.free_tx.pop().ok_or("no free transmit slot")?;
        let mut hdr = Header::new(op, (CID, GUEST_PORT), (HOST_CID, HOST_PORT))
            .with_credit(GUEST_BUF_ALLOC, self.fwd_cnt);
        hdr.len = len as u32;
        let addr = TX_BUFS + u64::from(slot) * SLOT_LEN;
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(addr))?;
        let desc_len = (HDR_LEN + len) as u32;
        self.tx
            .set_desc(slot, Descriptor::new(addr, desc_len, 0, 0))?;
        self.tx.push(slot)?;
        if op == Op::Rw {
            self.tx_cnt += len as u32;
        }
        self.sent_fwd_cnt = self.fwd_cnt;
        Ok(())
    }

    fn kick(&mut self) -> BenchResult<()> {
        self.tx.publish()?;
        self.notify(TX_QUEUE)?;
        Ok(())
    }

    /// Runs the device's event loop once, then takes back what it returned; returns the
    /// payload bytes received from the host.
    fn pump(&mut self, timeout_ms: i32) -> BenchResult<u64> {
        self.manager.run_with_timeout(timeout_ms)?;
        for (slot, _) in self.tx.reap()? {
            self.free_tx.push(slot);
        }
        let mut received = 0;
        let used = self.rx.reap()?;
        for &(head, _) in &used {
            let mut raw = [0; HDR_LEN];
            let addr = RX_BUFS + u64::from(head) * SLOT_LEN;
            self.mem.read_slice(&mut raw, GuestAddress(addr))?;
            let field = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
            let (len, op) = (field(24), u16::from_le_bytes([raw[30], raw[31]]));
            self.peer_buf_alloc = field(36);
            self.peer_fwd_cnt = Wrapping(field(40));
            match op {
                op if op == Op::Response as u16 => self.established = true,
                op if op == Op::Rw as u16 => received += u64::from(len),
                op if op == Op::Rst as u16 => return Err("the device reset the connection".into()),
                _ => {}
            }
            self.fwd_cnt += len;
            self.rx.push(head)?;
        }
        if !used.is_empty() {
            self.rx.publish()?;
            self.notify(RX_QUEUE)?;
        }
        Ok(received)
    }

    /// Bytes the host side can still take.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt).0
    }

    fn connect(&mut self, listener: &UnixListener) -> BenchResult<UnixStream> {
        self.queue_packet(Op::Request, 0)?;
        self.kick()?;
        let start = Instant::now();
        while !self.established {
            if start.elapsed().as_secs() > 5 {
                return Err("no RESPONSE from the device".into());
            }
            self.pump(10)?;
        }
        Ok(listener.accept()?.0)
    }

    /// Sends `total` bytes in `chunk`-sized packets within the host side's credit.
    fn send_all(&mut self, total: u64, chunk: usize) -> BenchResult<()> {
        let mut left = total;
        while left > 0 {
            let mut queued = false;
            while left > 0 && !self.free_tx.is_empty() {
                let len = chunk.min(left as usize);
                if (self.credit() as usize) < len {
                    break;
                }
                self.queue_packet(Op::Rw, len)?;
                left -= len as u64;
                queued = true;
            }
            if queued {
                self.kick()?;
            }
            self.pump(if queued { 0 } else { 10 })?;
        }
        Ok(())
    }

    /// Receives `total` bytes, telling the device about consumed bytes each time half the
    /// receive buffer has been read.
    fn receive_all(&mut self, total: u64) -> BenchResult<()> {
        let mut got = 0;
        while got < total {
            got += self.pump(10)?;
            if (self.fwd_cnt - self.sent_fwd_cnt).0 >= GUEST_BUF_ALLOC / 2 {
                self.queue_packet(Op::CreditUpdate, 0)?;
                self.kick()?;
            }
        }
        Ok(())
    }
}

fn payload(seed: u16) -> Vec<u8> {
    (0..MAX_PKT_DATA as usize)
        .map(|i| (i as u16).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}

fn read_all(mut stream: impl Read, total: u64) -> io::Result<()> {
    let mut buf = vec![0; 256 * 1024];
    let mut got = 0;
    while got < total {
        match stream.read(&mut buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n as u64,
        }
    }
    Ok(())
}

fn write_all(mut stream: impl Write, total: u64, chunk: usize) -> io::Result<()> {
    let buf = payload(0);
    let mut left = total;
    while left > 0 {
        let len = chunk.min(left as usize);
        stream.write_all(&buf[..len])?;
        left -= len as u64;
    }
    Ok(())
}

fn mib_per_s(start: Instant) -> f64 {
    ROUND_BYTES as f64 / f64::from(1 << 20) / start.elapsed().as_secs_f64()
}

/// One round through the device: guest to host when `to_host`, else host to guest.
fn device_round(
    guest: &mut Guest,
    host: &UnixStream,
    to_host: bool,
    chunk: usize,
) -> BenchResult<f64> {
    let start = Instant::now();
    let host = host.try_clone()?;
    if to_host {
        let reader = thread::spawn(move || read_all(host, ROUND_BYTES));
        guest.send_all(ROUND_BYTES, chunk)?;
        // What the host socket could not take at once waits in the device until the event
        // loop sees the socket writable again.
        while !reader.is_finished() {
            guest.pump(10)?;
        }
        reader.join().map_err(|_| "reader panicked")??;
    } else {
        let writer = thread::spawn(move || write_all(host, ROUND_BYTES, chunk));
        guest.receive_all(ROUND_BYTES)?;
        writer.join().map_err(|_| "writer panicked")??;
    }
    Ok(mib_per_s(start))
}

/// The same bytes and chunk size through a plain socket pair.
fn plain_round(chunk: usize) -> BenchResult<f64> {
    let (a, b) = UnixStream::pair()?;
    let start = Instant::now();
    let reader = thread::spawn(move || read_all(b, ROUND_BYTES));
    write_all(a, ROUND_BYTES, chunk)?;
    reader.join().map_err(|_| "reader panicked")??;
    Ok(mib_per_s(start))
}

struct Row {
    direction: &'static str,
    chunk: usize,
    device: f64,
    plain: f64,
}

fn measure(guest: &mut Guest, host: &UnixStream) -> BenchResult<Vec<Row>> {
    let mut rows = Vec::new();
    for (direction, to_host) in [("guest → host", true), ("host → guest", false)] {
        for chunk in CHUNKS {
            let (mut device, mut plain) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                device.push(device_round(guest, host, to_host, chunk)?);
                plain.push(plain_round(chunk)?);
            }
            rows.push(Row {
                direction,
                chunk,
                device: report::median(device),
                plain: report::median(plain),
            });
        }
    }
    Ok(rows)
}

fn table(rows: &[Row], host: &str) -> String {
    let mut out = format!(
        "virtio-vsock device model vs a plain Unix-socket pair: one stream connection from a \
         guest port to a host listener (`PATH_{HOST_PORT}`), {} MiB per round, median of \
         {ROUNDS} alternating rounds; the driver polls the used rings (no interrupts), the guest \
         advertises {} KiB of receive buffer. Host: {host}.\n\n",
        ROUND_BYTES >> 20,
        GUEST_BUF_ALLOC >> 10,
    );
    out.push_str(
        "| direction | chunk | device MiB/s | plain MiB/s | ratio |\n|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} KiB | {:.0} | {:.0} | {:.3} |\n",
            r.direction,
            r.chunk >> 10,
            r.device,
            r.plain,
            r.device / r.plain
        ));
    }
    out
}

fn main() -> BenchResult<()> {
    if !report::requested("vsock") {
        return Ok(());
    }
    let dir = TempDir::new_with_prefix("/tmp/rvmm-vsock-bench-")?;
    let uds_path = dir.as_path().join("v.sock");
    let listener = UnixListener::bind(port_path(&uds_path, HOST_PORT))?;
    let mut guest = Guest::new(uds_path)?;
    let host = guest.connect(&listener)?;
    let host_line = report::host_line();
    let text = table(&measure(&mut guest, &host)?, &host_line);
    report::publish("vsock", &text)?;
    Ok(())
}
