//! One stream connection between a guest port and a host Unix socket: the vsock state
//! machine and its credit-based flow control, as plain code over any byte stream.
//!
//! Both directions are bounded. Guest to host: the guest may have at most [`TX_BUF_SIZE`]
//! bytes that the host socket has not taken yet (our `buf_alloc`); what the socket cannot
//! take at once waits in a buffer of that size, and our `fwd_cnt` only advances as bytes
//! leave it, so a slow host reader stops the guest instead of growing memory. A guest that
//! sends beyond its credit is reset. Host to guest: we read from the host socket only as many
//! bytes as the guest has advertised room for and the receive chain can hold, so unread data
//! stays in the kernel's socket buffer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Our receive buffer per connection (`buf_alloc`): the most guest data held for a host
/// socket that is not reading.
pub const TX_BUF_SIZE: u32 = 128 * 1024;
/// Once the guest believes it has less than this much credit left, tell it about the bytes
/// the host consumed; above it, the update would only cost a packet.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 2;

/// The host end of a connection.
pub trait Stream: Read + Write {
    /// Tells the host peer that no more data will come (it reads end-of-file).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Why a connection was reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest ignored its credit.
    #[error("guest sent {len} bytes with {free} bytes of credit")]
    CreditExceeded {
        /// Payload length.
        len: usize,
        /// Credit it had.
        free: usize,
    },
    /// The guest sent data after announcing it would not.
    #[error("guest sent data after shutting down its sending side")]
    DataAfterShutdown,
    /// An operation that makes no sense in the connection's state.
    #[error("unexpected {op:?} in state {state:?}")]
    Unexpected {
        /// The operation.
        op: Op,
        /// The state.
        state: State,
    },
    /// Writing to the host socket failed.
    #[error("host socket write failed")]
    Write(#[source] io::Error),
    /// Reading from the host socket failed.
    #[error("host socket read failed")]
    Read(#[source] io::Error),
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Requesting,
    /// Data flows (possibly half-closed).
    Established,
    /// Torn down; an RST is still to be sent to the guest.
    Reset,
    /// Gone: the muxer drops it.
    Closed,
}

/// One connection, keyed by (host port, guest port).
pub struct Connection<S> {
    stream: S,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Guest data the host socket has not taken yet; at most [`TX_BUF_SIZE`] bytes.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    sent_fwd_cnt: Wrapping<u32>,
    /// The guest's receive buffer and how much of what we sent it consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Host bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    send_request: bool,
    send_response: bool,
    send_credit: bool,
    send_shutdown: bool,
    /// epoll said the host socket is readable and it has not been drained since.
    readable: bool,
    /// SHUTDOWN_* flags the guest sent.
    guest_shutdown: u32,
    /// The host socket reached end-of-file.
    host_eof: bool,
    /// The host socket's write side is shut (the guest stopped sending).
    host_write_shut: bool,
}

impl<S: Stream> Connection<S> {
    fn with_state(stream: S, guest_cid: u64, key: (u32, u32), state: State) -> Self {
        Self {
            stream,
            guest_cid,
            local_port: key.0,
            peer_port: key.1,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            sent_fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            send_request: false,
            send_response: false,
            send_credit: false,
            send_shutdown: false,
            readable: false,
            guest_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
        }
    }

    /// A connection a host process asked for: a REQUEST to `peer_port` is queued.
    pub fn host_initiated(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut conn = Self::with_state(
            stream,
            guest_cid,
            (local_port, peer_port),
            State::Requesting,
        );
        conn.send_request = true;
        conn
    }

    /// A connection the guest asked for with `request`, already connected on the host: a
    /// RESPONSE is queued.
    pub fn guest_initiated(stream: S, guest_cid: u64, request: &Header) -> Self {
        let key = (request.dst_port, request.src_port);
        let mut conn = Self::with_state(stream, guest_cid, key, State::Established);
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn.send_response = true;
        conn
    }

    /// Gives up on a host-initiated connection the guest has not answered: it is reset (the
    /// guest gets an RST, the host process an end-of-file). False once answered.
    pub fn expire(&mut self) -> bool {
        if self.state != State::Requesting {
            return false;
        }
        self.state = State::Reset;
        true
    }

    /// The host end.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Handles a packet from the guest for this connection. On error the connection is
    /// reset (an RST is queued).
    pub fn on_packet(&mut self, hdr: &Header, op: Op, data: &[u8]) -> Result<(), ConnError> {
        if matches!(self.state, State::Reset | State::Closed) {
            return Ok(());
        }
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        let res = match (self.state, op) {
            (_, Op::Rst) => {
                log::debug!(
                    "virtio-vsock: guest port {} reset its connection to host port {}",
                    hdr.src_port,
                    hdr.dst_port
                );
                self.state = State::Closed;
                Ok(())
            }
            (State::Requesting, Op::Response) => self.accepted(),
            (State::Established, Op::Rw) => self.recv(data),
            (State::Established, Op::CreditUpdate) => Ok(()),
            (State::Established, Op::CreditRequest) => {
                self.send_credit = true;
                Ok(())
            }
            (State::Established, Op::Shutdown) => {
                self.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush()
            }
            (state, op) => Err(ConnError::Unexpected { op, state }),
        };
        self.fail_on(res)
    }

    /// Handles readiness of the host socket. On error the connection is reset.
    pub fn on_event(&mut self, set: EventSet) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Ok(());
        }
        // A hang-up or error surfaces as end-of-file or an error on the next read or write.
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.readable = true;
        }
        let res = self.flush();
        self.fail_on(res)
    }

    /// The next packet for the guest, if any; a payload goes into the start of `buf`, whose
    /// length is the room in the receive chain. On error the connection is reset and the next
    /// call returns the RST.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Result<Option<(Header, usize)>, ConnError> {
        let op = match self.state {
            State::Closed => return Ok(None),
            State::Reset => {
                self.state = State::Closed;
                Op::Rst
            }
            State::Requesting if std::mem::take(&mut self.send_request) => Op::Request,
            State::Requesting => return Ok(None),
            State::Established => {
                if std::mem::take(&mut self.send_response) {
                    Op::Response
                } else if let Some(len) = self.read_host(buf)? {
                    let mut hdr = self.header(Op::Rw);
                    // At most the buffer, itself at most MAX_PKT_DATA.
                    hdr.len = len as u32;
                    return Ok(Some((hdr, len)));
                } else if self.state == State::Reset {
                    // End-of-file completed a close: the RST replaces the SHUTDOWN.
                    return self.next_packet(buf);
                } else if std::mem::take(&mut self.send_shutdown) {
                    return Ok(Some((
                        self.header(Op::Shutdown).with_flags(SHUTDOWN_SEND),
                        0,
                    )));
                } else if self.send_credit {
                    Op::CreditUpdate
                } else {
                    return Ok(None);
                }
            }
        };
        Ok(Some((self.header(op), 0)))
    }

    /// Whether [`Self::next_packet`] may have something.
    pub fn has_packet(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::Reset => true,
            State::Requesting => self.send_request,
            State::Established => {
                self.send_response
                    || self.send_shutdown
                    || self.send_credit
                    || (self.readable && self.may_read())
            }
        }
    }

    /// What to wait for on the host socket: readable while the guest can take data and we
    /// have not seen it readable yet, writable while guest data waits for it.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state != State::Established {
            return set;
        }
        if !self.readable && self.may_read() {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Bytes the guest can still take from us.
    fn credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent gets nothing until it stops.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_read(&self) -> bool {
        !self.host_eof && self.guest_shutdown & SHUTDOWN_RCV == 0 && self.credit() > 0
    }

    /// A header to the guest; it carries our credit, so no separate update is due.
    fn header(&mut self, op: Op) -> Header {
        self.send_credit = false;
        self.sent_fwd_cnt = self.fwd_cnt;
        Header::new(
            op,
            (HOST_CID, self.local_port),
            (self.guest_cid, self.peer_port),
        )
        .with_credit(TX_BUF_SIZE, self.fwd_cnt)
    }

    fn fail_on(&mut self, res: Result<(), ConnError>) -> Result<(), ConnError> {
        if res.is_err() {
            self.state = State::Reset;
        }
        res
    }

    /// The guest accepted a host-initiated connection: tell the host process which port the
    /// connection has on our side, as Firecracker does.
    fn accepted(&mut self) -> Result<(), ConnError> {
        let reply = format!("OK {}\n", self.local_port);
        // The handshake is the first thing written to the socket: its buffer takes it whole.
        self.stream
            .write_all(reply.as_bytes())
            .map_err(ConnError::Write)?;
        self.state = State::Established;
        Ok(())
    }

    /// Guest data: straight to the host socket if nothing is queued before it, the rest into
    /// the buffer its credit reserved.
    fn recv(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::DataAfterShutdown);
        }
        let free = TX_BUF_SIZE as usize - self.tx_buf.len();
        if data.len() > free {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                free,
            });
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.consumed(written);
        }
        self.tx_buf.extend(&data[written..]);
        self.flush()
    }

    /// Moves buffered guest data to the host socket as far as it takes it, then does what
    /// follows from an emptier buffer: credit, write shutdown, full close.
    fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let front = self.tx_buf.as_slices().0;
            let len = front.len();
            let n = write_some(&mut self.stream, front)?;
            self.tx_buf.drain(..n);
            self.consumed(n);
            if n < len {
                break;
            }
        }
        if !self.tx_buf.is_empty() {
            return Ok(());
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The host peer may be gone already; a failure here changes nothing.
            let _ = self.stream.shutdown_write();
        }
        let guest_done = self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
        let both_done = self.guest_shutdown & SHUTDOWN_SEND != 0 && self.host_eof;
        if guest_done || both_done {
            // Nothing more will flow either way: the RST ends the connection for the guest.
            self.state = State::Reset;
        }
        Ok(())
    }

    /// Accounts for `n` guest bytes taken by the host socket.
    fn consumed(&mut self, n: usize) {
        // At most TX_BUF_SIZE.
        self.fwd_cnt += n as u32;
        let unseen = (self.fwd_cnt - self.sent_fwd_cnt).0;
        let in_flight = self.tx_buf.len() as u32 + unseen;
        if unseen > 0 && TX_BUF_SIZE - in_flight.min(TX_BUF_SIZE) < CREDIT_UPDATE_THRESHOLD {
            self.send_credit = true;
        }
    }

    /// Reads host data for the guest, as much as its credit and `buf` allow.
    fn read_host(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ConnError> {
        let want = buf.len().min(self.credit() as usize);
        if !self.readable || !self.may_read() || want == 0 {
            return Ok(None);
        }
        loop {
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    self.send_shutdown = true;
                    self.flush()?;
                    return Ok(None);
                }
                Ok(n) => {
                    // At most `want`, itself below 4 GiB.
                    self.rx_cnt += n as u32;
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) => {
                    self.state = State::Reset;
                    return Err(ConnError::Read(e));
                }
            }
        }
    }
}

/// Writes as much of `data` as `stream` takes without blocking.
fn write_some(stream: &mut impl Write, data: &[u8]) -> Result<usize, ConnError> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(ConnError::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(ConnError::Write(e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// What a fake host peer sees and does.
    #[derive(Default)]
    pub(crate) struct Peer {
        /// Bytes the host peer sent, not yet read by the connection.
        pub(crate) to_conn: VecDeque<u8>,
        /// The host peer closed its sending side.
        pub(crate) eof: bool,
        /// Bytes the connection wrote.
        pub(crate) from_conn: Vec<u8>,
        /// How many more bytes the socket takes before it would block.
        pub(crate) room: usize,
        /// The connection shut its write side.
        pub(crate) write_shut: bool,
        /// Writes fail with EPIPE.
        pub(crate) broken: bool,
    }

    /// A host socket whose peer the test controls.
    #[derive(Clone, Default)]
    pub(crate) struct FakeStream(pub(crate) Rc<RefCell<Peer>>);

    impl Read for FakeStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.to_conn.is_empty() {
                return if p.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(p.to_conn.len());
            for (dst, src) in buf.iter_mut().zip(p.to_conn.drain(..n)) {
                *dst = src;
            }
            Ok(n)
        }
    }

    impl Write for FakeStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.broken {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            let n = buf.len().min(p.room);
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            p.room -= n;
            p.from_conn.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Stream for FakeStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.0.borrow_mut().write_shut = true;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::FakeStream;
    use super::*;
    use crate::virtio::vsock::packet::MAX_PKT_DATA;

    const CID: u64 = 3;
    const HOST_PORT: u32 = 52;
    const GUEST_PORT: u32 = 1000;
    const GUEST_BUF: u32 = 8192;

    /// A packet from the guest with its credit (GUEST_BUF, `fwd_cnt`).
    fn from_guest(op: Op, fwd_cnt: u32) -> Header {
        Header::new(op, (CID, GUEST_PORT), (HOST_CID, HOST_PORT))
            .with_credit(GUEST_BUF, Wrapping(fwd_cnt))
    }

    fn guest_conn(room: usize) -> (Connection<FakeStream>, FakeStream) {
        let stream = FakeStream::default();
        stream.0.borrow_mut().room = room;
        let conn = Connection::guest_initiated(stream.clone(), CID, &from_guest(Op::Request, 0));
        (conn, stream)
    }

    fn next(conn: &mut Connection<FakeStream>, room: usize) -> Option<(Header, Vec<u8>)> {
        let mut buf = vec![0; room];
        let (hdr, len) = conn.next_packet(&mut buf).unwrap()?;
        assert_eq!(hdr.len as usize, len);
        Some((hdr, buf[..len].to_vec()))
    }

    fn op(conn: &mut Connection<FakeStream>) -> Option<Op> {
        next(conn, MAX_PKT_DATA as usize).map(|(h, _)| h.checked_op().unwrap())
    }

    #[test]
    fn guest_connects_and_data_flows_both_ways() {
        let (mut conn, stream) = guest_conn(1 << 20);
        assert!(conn.has_packet());
        let (hdr, _) = next(&mut conn, 64).unwrap();
        assert_eq!(hdr.checked_op().unwrap(), Op::Response);
        assert_eq!(
            (hdr.src_port, hdr.dst_port, hdr.dst_cid),
            (HOST_PORT, GUEST_PORT, CID)
        );
        assert_eq!(hdr.buf_alloc, TX_BUF_SIZE);
        assert!(!conn.has_packet());
        assert_eq!(conn.interest(), EventSet::IN);

        conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"ping")
            .unwrap();
        assert_eq!(stream.0.borrow().from_conn, b"ping");
        // Plenty of credit left: no update is worth a packet.
        assert!(!conn.has_packet());

        stream.0.borrow_mut().to_conn.extend(b"pong");
        conn.on_event(EventSet::IN).unwrap();
        assert_eq!(conn.interest(), EventSet::empty());
        let (hdr, data) = next(&mut conn, 64).unwrap();
        assert_eq!(
            (hdr.checked_op().unwrap(), data.as_slice()),
            (Op::Rw, &b"pong"[..])
        );
        assert_eq!(hdr.fwd_cnt, 4);
        // Drained: the next read would block, and the socket is watched again.
        assert!(next(&mut conn, 64).is_none());
        assert_eq!(conn.interest(), EventSet::IN);
    }

    #[test]
    fn host_connects_and_guest_accepts_or_refuses() {
        let stream = FakeStream::default();
        stream.0.borrow_mut().room = 64;
        let mut conn = Connection::host_initiated(stream.clone(), CID, 1 << 30, 80);
        assert_eq!(conn.state(), State::Requesting);
        let (hdr, _) = next(&mut conn, 0).unwrap();
        assert_eq!(hdr.checked_op().unwrap(), Op::Request);
        assert_eq!((hdr.src_port, hdr.dst_port), (1 << 30, 80));
        assert!(!conn.has_packet());
        assert_eq!(conn.interest(), EventSet::empty());
        let resp = Header::new(Op::Response, (CID, 80), (HOST_CID, 1 << 30));
        conn.on_packet(&resp, Op::Response, &[]).unwrap();
        assert_eq!(conn.state(), State::Established);
        assert_eq!(stream.0.borrow().from_conn, b"OK 1073741824\n");

        let mut refused = Connection::host_initiated(FakeStream::default(), CID, 7, 80);
        next(&mut refused, 0).unwrap();
        refused.on_packet(&resp, Op::Rst, &[]).unwrap();
        assert_eq!(refused.state(), State::Closed);
        assert!(!refused.has_packet());
        // Anything else than RESPONSE or RST while requesting resets.
        let mut confused = Connection::host_initiated(FakeStream::default(), CID, 7, 80);
        assert!(confused.on_packet(&resp, Op::Rw, b"x").is_err());
        assert_eq!(op(&mut confused), Some(Op::Rst));
        assert_eq!(confused.state(), State::Closed);
    }

    #[test]
    fn host_reads_are_bounded_by_guest_credit() {
        let (mut conn, stream) = guest_conn(0);
        next(&mut conn, 0).unwrap();
        stream
            .0
            .borrow_mut()
            .to_conn
            .extend(vec![7u8; 3 * GUEST_BUF as usize]);
        conn.on_event(EventSet::IN).unwrap();
        let (_, a) = next(&mut conn, 5000).unwrap();
        let (_, b) = next(&mut conn, 5000).unwrap();
        assert_eq!((a.len(), b.len()), (5000, GUEST_BUF as usize - 5000));
        // Out of credit: nothing is read and the socket is not watched.
        assert!(!conn.has_packet());
        assert!(next(&mut conn, 5000).is_none());
        assert_eq!(conn.interest(), EventSet::empty());
        // The guest consumed 6000 bytes.
        conn.on_packet(&from_guest(Op::CreditUpdate, 6000), Op::CreditUpdate, &[])
            .unwrap();
        assert!(conn.has_packet());
        assert_eq!(next(&mut conn, 1 << 16).unwrap().1.len(), 6000);
        assert_eq!(
            stream.0.borrow().to_conn.len(),
            2 * GUEST_BUF as usize - 6000
        );
    }

    #[test]
    fn slow_host_reader_buffers_within_credit_and_updates_it() {
        let (mut conn, stream) = guest_conn(1000);
        next(&mut conn, 0).unwrap();
        let chunk = vec![1u8; 32 * 1024];
        for _ in 0..4 {
            conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, &chunk)
                .unwrap();
        }
        // 1000 bytes went through; the rest fills our buffer to the last byte of credit.
        assert_eq!(stream.0.borrow().from_conn.len(), 1000);
        assert_eq!(conn.interest(), EventSet::IN | EventSet::OUT);
        let err = conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, &[1; 1001]);
        assert!(matches!(
            err,
            Err(ConnError::CreditExceeded {
                len: 1001,
                free: 1000
            })
        ));
        assert_eq!(op(&mut conn), Some(Op::Rst));

        let (mut conn, stream) = guest_conn(1000);
        next(&mut conn, 0).unwrap();
        for _ in 0..4 {
            conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, &chunk)
                .unwrap();
        }
        // The host reads everything: the guest is told its credit is back.
        stream.0.borrow_mut().room = usize::MAX;
        conn.on_event(EventSet::OUT).unwrap();
        assert_eq!(stream.0.borrow().from_conn.len(), 128 * 1024);
        assert_eq!(conn.interest(), EventSet::IN);
        let (hdr, _) = next(&mut conn, 64).unwrap();
        assert_eq!(hdr.checked_op().unwrap(), Op::CreditUpdate);
        assert_eq!((hdr.fwd_cnt, hdr.buf_alloc), (128 * 1024, TX_BUF_SIZE));
        // Asked for explicitly, an update comes even when little changed.
        conn.on_packet(&from_guest(Op::CreditRequest, 0), Op::CreditRequest, &[])
            .unwrap();
        assert_eq!(op(&mut conn), Some(Op::CreditUpdate));
        assert_eq!(op(&mut conn), None);
    }

    #[test]
    fn shutdowns_half_close_then_reset() {
        // Guest stops sending: the host reads EOF once the buffer is flushed.
        let (mut conn, stream) = guest_conn(2);
        next(&mut conn, 0).unwrap();
        conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"abcd")
            .unwrap();
        let shut = from_guest(Op::Shutdown, 0).with_flags(SHUTDOWN_SEND);
        conn.on_packet(&shut, Op::Shutdown, &[]).unwrap();
        assert!(!stream.0.borrow().write_shut);
        assert!(conn
            .on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"late")
            .is_err());
        assert_eq!(conn.state(), State::Reset);

        let (mut conn, stream) = guest_conn(2);
        next(&mut conn, 0).unwrap();
        conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"abcd")
            .unwrap();
        conn.on_packet(&shut, Op::Shutdown, &[]).unwrap();
        stream.0.borrow_mut().room = 10;
        conn.on_event(EventSet::OUT).unwrap();
        assert!(stream.0.borrow().write_shut);
        assert_eq!(stream.0.borrow().from_conn, b"abcd");
        // The host still sends, then closes: SHUTDOWN to the guest, and with both sides
        // done, an RST.
        stream.0.borrow_mut().to_conn.extend(b"bye");
        stream.0.borrow_mut().eof = true;
        conn.on_event(EventSet::IN | EventSet::HANG_UP).unwrap();
        assert_eq!(next(&mut conn, 64).unwrap().1, b"bye");
        assert_eq!(op(&mut conn), Some(Op::Rst));
        assert_eq!(conn.state(), State::Closed);
        assert_eq!(op(&mut conn), None);
    }

    #[test]
    fn host_eof_sends_shutdown_and_guest_close_resets() {
        let (mut conn, stream) = guest_conn(64);
        next(&mut conn, 0).unwrap();
        stream.0.borrow_mut().eof = true;
        conn.on_event(EventSet::HANG_UP).unwrap();
        let (hdr, _) = next(&mut conn, 64).unwrap();
        assert_eq!(
            (hdr.checked_op().unwrap(), hdr.flags),
            (Op::Shutdown, SHUTDOWN_SEND)
        );
        assert_eq!(conn.interest(), EventSet::empty());
        // Half-closed: the guest can still send.
        conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"more")
            .unwrap();
        assert_eq!(stream.0.borrow().from_conn, b"more");
        let close = from_guest(Op::Shutdown, 0).with_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
        conn.on_packet(&close, Op::Shutdown, &[]).unwrap();
        assert_eq!(op(&mut conn), Some(Op::Rst));
        assert_eq!(conn.state(), State::Closed);
    }

    #[test]
    fn guest_rst_and_host_errors_end_the_connection() {
        let (mut conn, _stream) = guest_conn(64);
        conn.on_packet(&from_guest(Op::Rst, 0), Op::Rst, &[])
            .unwrap();
        assert_eq!(conn.state(), State::Closed);
        assert!(!conn.has_packet());

        let (mut conn, stream) = guest_conn(64);
        next(&mut conn, 0).unwrap();
        stream.0.borrow_mut().broken = true;
        let err = conn.on_packet(&from_guest(Op::Rw, 0), Op::Rw, b"x");
        assert!(matches!(err, Err(ConnError::Write(_))));
        assert_eq!(op(&mut conn), Some(Op::Rst));

        // A second REQUEST on an established connection is a protocol error.
        let (mut conn, _stream) = guest_conn(64);
        let err = conn.on_packet(&from_guest(Op::Request, 0), Op::Request, &[]);
        assert!(matches!(
            err,
            Err(ConnError::Unexpected {
                op: Op::Request,
                ..
            })
        ));
        assert_eq!(op(&mut conn), Some(Op::Rst));
    }

    #[test]
    fn lying_fwd_cnt_gets_no_credit() {
        let (mut conn, stream) = guest_conn(64);
        next(&mut conn, 0).unwrap();
        stream.0.borrow_mut().to_conn.extend(b"data");
        conn.on_packet(&from_guest(Op::CreditUpdate, 100), Op::CreditUpdate, &[])
            .unwrap();
        conn.on_event(EventSet::IN).unwrap();
        assert!(!conn.has_packet());
        assert!(next(&mut conn, 64).is_none());
    }
}
