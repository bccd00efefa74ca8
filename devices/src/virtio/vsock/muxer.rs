//! The host side of the device, Firecracker's "hybrid" vsock: guest streams become Unix
//! socket connections.
//!
//! A host process reaches a guest listener by connecting to the device's socket at PATH and
//! writing `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n` and the
//! stream is the connection. A guest connecting to host port P reaches a host listener on
//! `PATH_P`. Every connection's socket is watched through the event loop only for what its
//! state machine waits for, and packets for the guest are queued until the driver posts
//! receive buffers.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use log::{debug, warn};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, State};
use super::packet::{Header, Op, HOST_CID};
use crate::{warn_once, LogOnce, Problem};

/// Most connections (and pending host handshakes) at once; with [`super::connection::TX_BUF_SIZE`]
/// this bounds the memory a guest and host processes can make the device hold.
pub const MAX_CONNECTIONS: usize = 256;
/// Most RSTs for unknown connections waiting for receive buffers; a guest that floods them
/// without reading loses the excess (it retries or times out).
const MAX_STRAY_RSTS: usize = 64;
/// Longest `CONNECT <port>` line.
const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a host-initiated connection waits for the guest to accept or refuse it before it
/// is reset and the host process gets an end-of-file. Firecracker waits 2 s; a guest under
/// emulation or on a loaded host answers a busy agent's port slower than that.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Host ports for host-initiated connections start here, clear of the ports guests usually
/// connect to (as in Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host port, guest port).
type Key = (u32, u32);

/// A connection and its event-loop bookkeeping.
struct Entry {
    conn: Connection<UnixStream>,
    /// What epoll watches on its socket (empty: not registered).
    registered: EventSet,
    /// In the queue of connections with packets for the guest.
    queued: bool,
}

/// Connections between the guest and host Unix sockets.
pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    /// The socket file we bound, removed when the device goes away.
    uds_id: Option<(u64, u64)>,
    listener: UnixListener,
    conns: HashMap<Key, Entry>,
    by_fd: HashMap<RawFd, Key>,
    /// Accepted host sockets still sending their `CONNECT` line, by fd.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Connections that may have packets for the guest, in turn.
    rx_ready: VecDeque<Key>,
    /// RSTs for packets that matched no connection.
    stray_rsts: VecDeque<Header>,
    /// Host-initiated connections by the time the guest must have answered, oldest first.
    connect_deadlines: VecDeque<(Instant, Key)>,
    /// Fires at the first of `connect_deadlines`; none if it could not be made.
    connect_timer: Option<TimerFd>,
    next_port: u32,
    warned: LogOnce,
}

impl Muxer {
    /// A muxer for guest `cid` accepting host connections on `listener`, bound at `uds_path`.
    pub fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            cid,
            uds_id: file_id(&uds_path),
            uds_path,
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rx_ready: VecDeque::new(),
            stray_rsts: VecDeque::new(),
            connect_deadlines: VecDeque::new(),
            connect_timer: TimerFd::new()
                .inspect_err(|e| warn!("virtio-vsock: no timer for host connections: {e}"))
                .ok(),
            next_port: FIRST_LOCAL_PORT,
            warned: LogOnce::default(),
        }
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Starts watching the listening socket.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            warn!("virtio-vsock: cannot watch the listening socket: {e:?}");
        }
        if let Some(timer) = &self.connect_timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                warn!("virtio-vsock: cannot watch the connection timer: {e:?}");
            }
        }
    }

    /// Handles readiness of a socket the muxer watches; false if `fd` is not one of them.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if self.connect_timer.as_ref().map(AsRawFd::as_raw_fd) == Some(fd) {
            self.expire_connects(ops);
        } else if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd, ops);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(entry) = self.conns.get_mut(&key) {
                if let Err(e) = entry.conn.on_event(set) {
                    debug!(
                        "virtio-vsock: connection {key:?}: {}",
                        crate::error_chain(&e)
                    );
                }
            }
            self.sync(key, ops);
        } else {
            return false;
        }
        true
    }

    /// Handles a packet the guest sent, with its payload.
    pub fn handle_packet(&mut self, hdr: &Header, data: &[u8], ops: &mut EventOps) {
        // Nothing can be answered to a packet that does not come from the guest.
        if hdr.src_cid != self.cid {
            warn_once!(
                self.warned,
                Problem::SrcCid,
                "virtio-vsock: dropping a packet from CID {}",
                hdr.src_cid
            );
            return;
        }
        let op = match hdr.checked_op() {
            Ok(op) => op,
            Err(e) => {
                warn_once!(
                    self.warned,
                    Problem::Packet,
                    "virtio-vsock: refusing a packet: {e}"
                );
                if hdr.op != Op::Rst as u16 {
                    self.stray_rst(hdr);
                }
                return;
            }
        };
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.dst_cid != HOST_CID || !self.conns.contains_key(&key) {
            match op {
                Op::Request if hdr.dst_cid == HOST_CID => self.connect_host(hdr, ops),
                Op::Rst => {}
                // Late packets of a closed connection are normal; the RST tells the guest.
                _ => self.stray_rst(hdr),
            }
            return;
        }
        if let Some(entry) = self.conns.get_mut(&key) {
            if let Err(e) = entry.conn.on_packet(hdr, op, data) {
                warn_once!(
                    self.warned,
                    Problem::Connection,
                    "virtio-vsock: resetting connection {key:?}: {e}"
                );
            }
        }
        self.sync(key, ops);
    }

    /// Whether [`Self::next_rx`] may have a packet.
    pub fn has_rx(&self) -> bool {
        !self.stray_rsts.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest, connections taking turns; a payload goes into the start
    /// of `buf`, whose length is the room in the receive chain.
    pub fn next_rx(&mut self, buf: &mut [u8], ops: &mut EventOps) -> Option<(Header, usize)> {
        if let Some(rst) = self.stray_rsts.pop_front() {
            return Some((rst, 0));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            let pkt = match entry.conn.next_packet(buf) {
                Ok(pkt) => pkt,
                Err(e) => {
                    debug!(
                        "virtio-vsock: connection {key:?}: {}",
                        crate::error_chain(&e)
                    );
                    // The connection was reset: the RST is next.
                    entry.conn.next_packet(buf).ok().flatten()
                }
            };
            self.sync(key, ops);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Closes every connection (the driver is gone); host handshakes in progress stay.
    pub fn reset(&mut self, ops: &mut EventOps) {
        for (_, entry) in self.conns.drain() {
            unwatch(ops, &entry);
        }
        self.by_fd.clear();
        self.rx_ready.clear();
        self.stray_rsts.clear();
        self.connect_deadlines.clear();
    }

    /// Resets the host-initiated connections the guest left unanswered for
    /// [`CONNECT_TIMEOUT`].
    fn expire_connects(&mut self, ops: &mut EventOps) {
        if let Some(timer) = &mut self.connect_timer {
            let _ = timer.wait();
        }
        let now = Instant::now();
        while let Some(&(deadline, key)) = self.connect_deadlines.front() {
            if deadline > now {
                break;
            }
            self.connect_deadlines.pop_front();
            if let Some(entry) = self.conns.get_mut(&key) {
                if entry.conn.expire() {
                    debug!("virtio-vsock: guest port {} did not answer in time", key.1);
                    self.sync(key, ops);
                }
            }
        }
        self.arm_connect_timer(now);
    }

    /// Sets the timer to the first deadline, if there is one.
    fn arm_connect_timer(&mut self, now: Instant) {
        let (Some(timer), Some(&(deadline, _))) =
            (&mut self.connect_timer, self.connect_deadlines.front())
        else {
            return;
        };
        // A zero duration would disarm the timer.
        let wait = deadline
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        if let Err(e) = timer.reset(wait, None) {
            warn_once!(
                self.warned,
                Problem::Timer,
                "virtio-vsock: cannot set the connection timer: {e}"
            );
        }
    }

    fn stray_rst(&mut self, hdr: &Header) {
        if self.stray_rsts.len() < MAX_STRAY_RSTS {
            self.stray_rsts.push_back(hdr.rst_reply());
        } else {
            warn_once!(
                self.warned,
                Problem::Stray,
                "virtio-vsock: guest is not reading; dropping RSTs"
            );
        }
    }

    fn at_limit(&mut self) -> bool {
        let full = self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS;
        if full {
            warn_once!(
                self.warned,
                Problem::Limit,
                "virtio-vsock: refusing connections beyond {MAX_CONNECTIONS}"
            );
        }
        full
    }

    /// The guest connects to host port `dst_port`: connect to the host listener on
    /// `PATH_<port>`, or refuse.
    fn connect_host(&mut self, req: &Header, ops: &mut EventOps) {
        if self.at_limit() {
            return self.stray_rst(req);
        }
        let path = port_path(&self.uds_path, req.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, self.cid, req);
                self.insert((req.dst_port, req.src_port), conn, ops);
            }
            Err(e) => {
                debug!("virtio-vsock: {}: {e}", path.display());
                self.stray_rst(req);
            }
        }
    }

    /// Accepts host processes on the listening socket; they send their `CONNECT` line next.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::Accept,
                        "virtio-vsock: accept failed: {e}"
                    );
                    return;
                }
            };
            // Over the limit the host process sees its connection closed.
            if self.at_limit() || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                warn_once!(
                    self.warned,
                    Problem::Epoll,
                    "virtio-vsock: cannot watch a host socket: {e:?}"
                );
                continue;
            }
            self.handshakes
                .insert(stream.as_raw_fd(), (stream, Vec::new()));
        }
    }

    /// Reads what a host process sent of its `CONNECT <port>\n` line; on a whole line,
    /// requests the connection from the guest.
    fn read_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some((stream, line)) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so that nothing after the line (meant for the guest) is consumed.
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(line),
                Ok(1) if line.len() < MAX_HANDSHAKE_LINE => line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some((stream, line)) = self.handshakes.remove(&fd) else {
            return;
        };
        // The connection's own registration replaces the handshake's.
        let _ = ops.remove(Events::new(&stream, EventSet::IN));
        let Some(port) = port else {
            debug!(
                "virtio-vsock: bad handshake {:?}",
                String::from_utf8_lossy(&line)
            );
            return;
        };
        let Some(local) = self.alloc_port(port) else {
            return;
        };
        let conn = Connection::host_initiated(stream, self.cid, local, port);
        self.insert((local, port), conn, ops);
        let now = Instant::now();
        self.connect_deadlines
            .push_back((now + CONNECT_TIMEOUT, (local, port)));
        if self.connect_deadlines.len() == 1 {
            self.arm_connect_timer(now);
        }
    }

    /// A host port for a host-initiated connection to guest port `peer`.
    fn alloc_port(&mut self, peer: u32) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this many tries find a free one.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_port = match port.checked_add(1) {
                Some(next) if next != u32::MAX => next,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.conns.contains_key(&(port, peer)) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, key: Key, conn: Connection<UnixStream>, ops: &mut EventOps) {
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        let entry = Entry {
            conn,
            registered: EventSet::empty(),
            queued: false,
        };
        self.conns.insert(key, entry);
        self.sync(key, ops);
    }

    /// Makes the event loop and the receive queue match what a connection waits for and has,
    /// and drops it once closed.
    fn sync(&mut self, key: Key, ops: &mut EventOps) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state() == State::Closed {
            if let Some(entry) = self.conns.remove(&key) {
                unwatch(ops, &entry);
                self.by_fd.remove(&entry.conn.stream().as_raw_fd());
            }
            return;
        }
        let want = entry.conn.interest();
        if want != entry.registered {
            let fd = entry.conn.stream().as_raw_fd();
            // Unwanted sockets leave epoll entirely: it reports hang-ups even with an empty
            // interest set, and a level-triggered hang-up nobody handles would spin the loop.
            let res = if entry.registered.is_empty() {
                ops.add(Events::new_raw(fd, want))
            } else if want.is_empty() {
                ops.remove(Events::new_raw(fd, entry.registered))
            } else {
                ops.modify(Events::new_raw(fd, want))
            };
            match res {
                Ok(()) => entry.registered = want,
                Err(e) => {
                    warn_once!(
                        self.warned,
                        Problem::Epoll,
                        "virtio-vsock: cannot watch a host socket: {e:?}"
                    );
                }
            }
        }
        if entry.conn.has_packet() && !entry.queued {
            entry.queued = true;
            self.rx_ready.push_back(key);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Only if the path still names our socket: another process may have replaced it.
        if self.uds_id.is_some() && file_id(&self.uds_path) == self.uds_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

/// (device, inode) of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn unwatch(ops: &mut EventOps, entry: &Entry) {
    if !entry.registered.is_empty() {
        let fd = entry.conn.stream().as_raw_fd();
        let _ = ops.remove(Events::new_raw(fd, entry.registered));
    }
}

/// `PATH_<port>`, where host listeners for guest-initiated connections wait.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    path.into()
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the event loop until it accepts, as a blocking
/// connect would.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The path needs its terminating NUL inside `sun_path`.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: a plain system call without pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // The family, the path and its NUL: below size_of::<sockaddr_un>().
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is an initialized sockaddr_un that outlives the call and `len` does not
    // exceed its size.
    let ret = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// The port of a `CONNECT <port>` line (a trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_and_port_paths() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 5 6",
            b"\xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }

    #[test]
    fn nonblocking_connect_reaches_listeners_only() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/rvmm-vsock-").unwrap();
        let path = dir.as_path().join("l");
        let err = connect_nonblocking(&path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_nonblocking(&path).unwrap();
        std::io::Write::write_all(&mut stream, b"x").unwrap();
        let mut byte = [0u8; 1];
        listener.accept().unwrap().0.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let long = dir.as_path().join("x".repeat(120));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    }
}
