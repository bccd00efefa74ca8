use std::fs;
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::unix_socket::ListenError;
use crate::virtio::block::test_utils::{mem, R, W};
use crate::virtio::console::test_utils::guest;
use crate::virtio::net::test_utils::Driver;
use crate::virtio::test_utils::{notify_queue, run_until_idle, CountingInterrupt};
use crate::virtio::vsock::muxer::{port_path, CONNECT_TIMEOUT};
use crate::virtio::vsock::packet::{Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const CID: u64 = 3;
const TX_RINGS: u64 = 0x1000;
const EVENT_RINGS: u64 = 0x2000;
/// Receive chain `i` is at `RX_BUF + i * 0x2000`, transmit chain `i` at `TX_BUF + i *
/// 0x2000`.
const RX_BUF: u64 = 0x1_0000;
const TX_BUF: u64 = 0x4_0000;
/// Where event buffers go.
const EVENT_BUF: u64 = 0x8_0000;
const RX_ROOM: u32 = 4096;
const FIRST_LOCAL_PORT: u32 = 1 << 30;

fn tmp() -> TempDir {
    TempDir::new_with_prefix("/tmp/rvmm-vsock-").unwrap()
}

fn cfg(dir: &TempDir) -> VsockConfig {
    VsockConfig {
        cid: CID,
        uds_path: dir.as_path().join("v.sock"),
    }
}

/// A packet from the guest port `src` to host port `dst`, with `buf_alloc` of credit.
fn g(op: Op, src: u32, dst: u32, buf_alloc: u32) -> Header {
    Header::new(op, (CID, src), (HOST_CID, dst)).with_credit(buf_alloc, Wrapping(0))
}

fn parse(b: &[u8]) -> Header {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    Header {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

fn host_stream(stream: UnixStream) -> UnixStream {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream
}

fn read_exact(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// An activated device on an event loop, with driver-side queues.
struct Rig<'a> {
    _dir: TempDir,
    path: PathBuf,
    mem: &'a GuestMemoryMmap,
    vsock: Arc<Mutex<Vsock>>,
    manager: Manager,
    irq: Arc<CountingInterrupt>,
    rx: Driver<'a>,
    tx: Driver<'a>,
    ev: Driver<'a>,
    rx_seen: usize,
    rx_posted: u64,
    tx_next: u64,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = tmp();
        let cfg = cfg(&dir);
        let vsock = Arc::new(Mutex::new(Vsock::new(cfg.clone()).unwrap()));
        let mut manager = Manager::new().unwrap();
        manager.add_subscriber(vsock.clone());
        let irq = Arc::new(CountingInterrupt::default());
        let (rx, tx, ev) = (
            Driver::new(mem, 0),
            Driver::new(mem, TX_RINGS),
            Driver::new(mem, EVENT_RINGS),
        );
        let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
        let queues = vec![rx.queue(), tx.queue(), ev.queue()];
        vsock
            .lock()
            .unwrap()
            .activate(mem.clone(), queues, interrupt)
            .unwrap();
        let mut rig = Self {
            _dir: dir,
            path: cfg.uds_path,
            mem,
            vsock,
            manager,
            irq,
            rx,
            tx,
            ev,
            rx_seen: 0,
            rx_posted: 0,
            tx_next: 0,
        };
        rig.run();
        rig
    }

    fn notify(&self, queue: usize) {
        notify_queue(&self.vsock, queue)
    }

    /// Runs the loop until it has nothing to do; returns the events it handled.
    fn run(&mut self) -> usize {
        run_until_idle(&mut self.manager)
    }

    /// Posts `n` receive chains of one descriptor each; chain `i` (its head index) is at
    /// `RX_BUF + i * 0x2000`.
    fn post_rx(&mut self, n: u64) {
        for _ in 0..n {
            let addr = RX_BUF + self.rx_posted * 0x2000;
            self.rx_posted += 1;
            self.rx.post(&[(addr, HDR_LEN as u32 + RX_ROOM, W)]);
        }
        self.notify(RX_QUEUE);
        self.run();
    }

    /// Sends one packet (header and payload in one descriptor) and runs the loop.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let addr = TX_BUF + self.tx_next * 0x2000;
        self.tx_next += 1;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.tx.post(&[(addr, (HDR_LEN + data.len()) as u32, R)]);
        self.notify(TX_QUEUE);
        self.run();
    }

    /// The packets the device put in the receive queue since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used();
        let new = used[self.rx_seen..]
            .iter()
            .map(|&(head, len)| {
                let addr = RX_BUF + u64::from(head) * 0x2000;
                let bytes = guest(self.mem, addr, len as usize);
                let hdr = parse(&bytes[..HDR_LEN]);
                assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
                (hdr, bytes[HDR_LEN..].to_vec())
            })
            .collect();
        self.rx_seen = used.len();
        new
    }

    /// The operations of the packets since the last call.
    fn recv_ops(&mut self) -> Vec<Op> {
        self.recv()
            .into_iter()
            .map(|(h, _)| h.checked_op().unwrap())
            .collect()
    }

    fn connections(&self) -> usize {
        self.vsock.lock().unwrap().connections()
    }
}

#[test]
fn new_checks_cid_and_socket_path() {
    let dir = tmp();
    for cid in [0, 2, u64::from(u32::MAX)] {
        let err = Vsock::new(VsockConfig { cid, ..cfg(&dir) }).err().unwrap();
        assert!(matches!(err, VsockError::Cid(c) if c == cid), "{err}");
    }
    let path = cfg(&dir).uds_path;
    fs::write(&path, b"").unwrap();
    let err = Vsock::new(cfg(&dir)).err().unwrap();
    assert!(
        matches!(err, VsockError::Listen(ListenError::NotSocket(_))),
        "{err}"
    );
    fs::remove_file(&path).unwrap();

    let live = UnixListener::bind(&path).unwrap();
    let err = Vsock::new(cfg(&dir)).err().unwrap();
    assert!(
        matches!(err, VsockError::Listen(ListenError::InUse(_))),
        "{err}"
    );
    // Left behind: nobody listens on the file any more.
    drop(live);
    assert!(path.exists());
    let vsock = Vsock::new(cfg(&dir)).unwrap();
    assert_eq!(vsock.cid(), CID);
    // Only the socket: its temporary name is gone.
    assert_eq!(fs::read_dir(dir.as_path()).unwrap().count(), 1);
    drop(vsock);
    assert!(!path.exists());

    let err = Vsock::new(VsockConfig {
        cid: CID,
        uds_path: dir.as_path().join("missing/v.sock"),
    })
    .err()
    .unwrap();
    assert!(
        matches!(err, VsockError::Listen(ListenError::Bind { .. })),
        "{err}"
    );
}

#[test]
fn identity_features_and_config() {
    let dir = tmp();
    let mut vsock = Vsock::new(cfg(&dir)).unwrap();
    assert_eq!(vsock.device_type(), 19);
    assert_eq!(vsock.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(vsock.queue_events().len(), 3);
    assert_eq!(
        vsock.avail_features(),
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    );
    vsock.write_config(0, &[9; 8]);
    let mut config = [0xff; 12];
    vsock.read_config(0, &mut config);
    assert_eq!(config, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut high = [0xff; 4];
    vsock.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
}

#[test]
fn host_connects_to_a_guest_listener() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    // The host connects before the driver posted receive buffers: the REQUEST waits.
    let mut host = host_stream(UnixStream::connect(&rig.path).unwrap());
    host.write_all(b"CONNECT 52\n").unwrap();
    rig.run();
    assert!(rig.recv().is_empty());
    rig.post_rx(4);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!(req.checked_op().unwrap(), Op::Request);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!((req.src_port, req.dst_port), (FIRST_LOCAL_PORT, 52));
    assert!(rig.irq.count() > 0);

    rig.send(g(Op::Response, 52, FIRST_LOCAL_PORT, 4096), &[]);
    assert_eq!(read_exact(&mut host, 14), b"OK 1073741824\n");
    host.write_all(b"hello").unwrap();
    rig.run();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.checked_op().unwrap(), Op::Rw);
    assert_eq!(pkts[0].1, b"hello");
    rig.send(g(Op::Rw, 52, FIRST_LOCAL_PORT, 4096), b"world");
    assert_eq!(read_exact(&mut host, 5), b"world");

    // The host process goes away: the guest hears SHUTDOWN, closes, and gets the RST.
    drop(host);
    rig.run();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.checked_op().unwrap(), Op::Shutdown);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_SEND);
    let close =
        g(Op::Shutdown, 52, FIRST_LOCAL_PORT, 4096).with_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
    rig.send(close, &[]);
    assert_eq!(rig.recv_ops(), vec![Op::Rst]);
    assert_eq!(rig.connections(), 0);
}

#[test]
fn a_host_connection_the_guest_never_answers_is_reset() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    rig.post_rx(4);
    let mut host = host_stream(UnixStream::connect(&rig.path).unwrap());
    host.write_all(b"CONNECT 52\n").unwrap();
    rig.run();
    assert_eq!(rig.recv_ops(), vec![Op::Request]);
    std::thread::sleep(CONNECT_TIMEOUT + Duration::from_millis(200));
    rig.run();
    assert_eq!(rig.recv_ops(), vec![Op::Rst]);
    assert_eq!(rig.connections(), 0);
    // The host process sees its connection end, without an OK line.
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // A late answer is a stray packet: the guest gets an RST for it.
    rig.send(g(Op::Response, 52, FIRST_LOCAL_PORT, 4096), &[]);
    assert_eq!(rig.recv_ops(), vec![Op::Rst]);
}

#[test]
fn guest_connects_to_a_host_listener_or_gets_reset() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(port_path(&rig.path, 80)).unwrap();
    rig.post_rx(4);
    rig.send(g(Op::Request, 1000, 80, 4096), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].0;
    assert_eq!(resp.checked_op().unwrap(), Op::Response);
    assert_eq!((resp.src_port, resp.dst_port), (80, 1000));
    let mut host = host_stream(listener.accept().unwrap().0);

    rig.send(g(Op::Rw, 1000, 80, 4096), b"ping");
    assert_eq!(read_exact(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    rig.run();
    assert_eq!(rig.recv()[0].1, b"pong");

    // Nobody listens on port 81.
    rig.send(g(Op::Request, 1001, 81, 4096), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    let rst = pkts[0].0;
    assert_eq!(rst.checked_op().unwrap(), Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (81, 1001));

    rig.send(g(Op::Rst, 1000, 80, 4096), &[]);
    assert_eq!(rig.connections(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
    assert!(rig.recv().is_empty());
}

#[test]
fn hostile_and_stray_packets_are_dropped_or_reset() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    rig.post_rx(8);
    // Data for a connection that does not exist.
    rig.send(g(Op::Rw, 1000, 80, 4096), b"x");
    // Not from the guest's CID: nothing to answer.
    let mut spoofed = g(Op::Request, 1000, 80, 4096);
    spoofed.src_cid = 7;
    rig.send(spoofed, &[]);
    let unknown_op = Header {
        op: 99,
        ..g(Op::Rw, 1000, 80, 4096)
    };
    rig.send(unknown_op, &[]);
    let datagram = Header {
        type_: 2,
        ..g(Op::Request, 1000, 80, 4096)
    };
    rig.send(datagram, &[]);
    // Another guest's CID is unreachable.
    let mut elsewhere = g(Op::Request, 1000, 80, 4096);
    elsewhere.dst_cid = 5;
    rig.send(elsewhere, &[]);
    // An RST is never answered.
    rig.send(g(Op::Rst, 1000, 80, 4096), &[]);
    assert_eq!(rig.recv_ops(), vec![Op::Rst; 4]);

    // `len` beyond the descriptor: the chain is returned, nothing else happens.
    let mut absurd = g(Op::Rw, 1000, 80, 4096);
    absurd.len = u32::MAX;
    mem.write_slice(&absurd.to_bytes(), GuestAddress(TX_BUF))
        .unwrap();
    rig.tx.post(&[(TX_BUF, HDR_LEN as u32 + 8, R)]);
    rig.notify(TX_QUEUE);
    rig.run();
    assert_eq!(rig.tx.used().len(), 7);
    assert!(rig.recv().is_empty());
}

#[test]
fn host_data_is_bounded_by_guest_credit() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(port_path(&rig.path, 80)).unwrap();
    rig.post_rx(6);
    rig.send(g(Op::Request, 1000, 80, 100), &[]);
    assert_eq!(rig.recv_ops(), vec![Op::Response]);
    let mut host = host_stream(listener.accept().unwrap().0);
    host.write_all(&[7; 250]).unwrap();
    rig.run();
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].1, [7; 100]);
    // The guest read 100 bytes.
    let update = g(Op::CreditUpdate, 1000, 80, 100).with_credit(100, Wrapping(100));
    rig.send(update, &[]);
    assert_eq!(rig.recv()[0].1.len(), 100);
    let update = update.with_credit(100, Wrapping(200));
    rig.send(update, &[]);
    assert_eq!(rig.recv()[0].1.len(), 50);
    rig.send(g(Op::CreditRequest, 1000, 80, 100), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts[0].0.checked_op().unwrap(), Op::CreditUpdate);
    assert_eq!(
        pkts[0].0.buf_alloc,
        crate::virtio::vsock::connection::TX_BUF_SIZE
    );
}

#[test]
fn many_connections_stay_apart_until_reset() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(port_path(&rig.path, 80)).unwrap();
    rig.post_rx(8);
    let ports = [1000, 1001, 1002, 1003];
    let mut hosts = Vec::new();
    for port in ports {
        rig.send(g(Op::Request, port, 80, 4096), &[]);
        hosts.push(host_stream(listener.accept().unwrap().0));
    }
    assert_eq!(rig.recv_ops(), vec![Op::Response; 4]);
    assert_eq!(rig.connections(), 4);
    for (i, host) in hosts.iter_mut().enumerate() {
        host.write_all(format!("to {}", ports[i]).as_bytes())
            .unwrap();
    }
    rig.run();
    let mut pkts = rig.recv();
    pkts.sort_by_key(|(h, _)| h.dst_port);
    for (i, (hdr, data)) in pkts.iter().enumerate() {
        assert_eq!(hdr.dst_port, ports[i]);
        assert_eq!(data, format!("to {}", ports[i]).as_bytes());
    }
    for port in ports.iter().rev() {
        rig.send(g(Op::Rw, *port, 80, 4096), format!("{port}").as_bytes());
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        assert_eq!(read_exact(host, 4), format!("{}", ports[i]).as_bytes());
    }

    // A driver reset closes every connection.
    assert!(rig.vsock.lock().unwrap().reset());
    rig.run();
    assert_eq!(rig.connections(), 0);
    for host in &mut hosts {
        assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
    }
}

#[test]
fn a_restored_device_drops_its_connections_and_resets_the_guest_transport() {
    let mem = mem();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(port_path(&rig.path, 80)).unwrap();
    rig.post_rx(2);
    rig.send(g(Op::Request, 1000, 80, 4096), &[]);
    let mut host = host_stream(listener.accept().unwrap().0);
    assert_eq!(rig.recv_ops(), [Op::Response]);
    // What a restore does; the driver has no event buffer posted yet.
    rig.vsock.lock().unwrap().restored();
    rig.notify(EVENT_QUEUE);
    rig.run();
    assert_eq!(rig.connections(), 0);
    assert_eq!(host.read(&mut [0; 4]).unwrap(), 0);
    assert!(rig.ev.used().is_empty());

    let irqs = rig.irq.count();
    mem.write_slice(&[0xff; 4], GuestAddress(EVENT_BUF))
        .unwrap();
    // Too short for an event: returned empty, and the next buffer gets it.
    rig.ev.post(&[(EVENT_BUF + 0x100, 2, W)]);
    rig.ev.post(&[(EVENT_BUF, 4, W)]);
    rig.ev.post(&[(EVENT_BUF + 0x200, 4, W)]);
    rig.notify(EVENT_QUEUE);
    rig.run();
    assert_eq!(rig.ev.used(), [(0, 0), (1, 4)]);
    assert_eq!(
        guest(&mem, EVENT_BUF, 4),
        EVENT_TRANSPORT_RESET.to_le_bytes()
    );
    assert_eq!(rig.irq.count(), irqs + 1);
    // Sent once: the last buffer stays with the driver.
    rig.notify(EVENT_QUEUE);
    rig.run();
    assert_eq!(rig.ev.used().len(), 2);
    // And the guest can connect again.
    rig.send(g(Op::Request, 1001, 80, 4096), &[]);
    assert_eq!(rig.recv_ops(), [Op::Response]);
    assert_eq!(rig.connections(), 1);
}
