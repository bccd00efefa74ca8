//! The host side of virtio-net as a byte stream: QEMU's `-netdev stream` protocol, which passt
//! speaks on a Unix stream socket. Every Ethernet frame travels with its length in front (4
//! bytes, big-endian) and without a virtio-net header: [`Stream`] puts a zeroed header in front
//! of each frame it reads and takes it off each frame it writes, so that the receive and
//! transmit paths treat it as they treat a TAP. A zeroed header carries no offloads, so the peer
//! must get whole, checksummed frames: [`TapIo::offloads`] is false, and the device offers the
//! guest none.
//!
//! **Reading.** A frame may arrive in pieces: what has come is kept until the rest does. Each
//! read asks for the rest of the current frame and at most the next length in front of the next
//! frame, never more, so the bytes of every frame not yet returned stay in the socket, where
//! level-triggered epoll keeps reporting them.
//!
//! **Writing.** A frame is taken whole or not at all: `WouldBlock` leaves it with the guest,
//! and the device waits for the socket to be writable. When the socket takes only part of a
//! frame, the rest is kept and goes first, as soon as the socket has room, before any other
//! frame. It is not written by blocking until the socket has room: passt reads the rest of a
//! partial frame with a blocking read and finishes a partial frame of its own with a blocking
//! write, so if rvmm blocked on its rest while passt blocked on its own, neither would return.
//!
//! A peer that hangs up, or a length that cannot be a frame (the stream is then out of step),
//! leaves the stream unusable for good: [`TapIo::broken`] says why, and the device stops the VM.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::{TapIo, HDR_LEN, MAX_FRAME_LEN, MAX_PACKET_LEN};

/// Size of the length in front of every frame.
const LEN_PREFIX: usize = 4;

/// Why a stream can no longer carry frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The peer closed its end or reset the connection.
    #[error("{0} hung up")]
    HungUp(String),
    /// A length no frame has: the bytes that follow cannot be told apart any more.
    #[error(
        "{peer} sent a frame of {len} bytes (at most {MAX_FRAME_LEN}): the stream is out of step"
    )]
    Oversize {
        /// Who sent it.
        peer: String,
        /// The length it announced.
        len: usize,
    },
}

impl StreamError {
    fn to_io(&self) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, self.clone())
    }
}

/// A frame backend on a connected Unix stream socket.
pub struct Stream {
    sock: UnixStream,
    /// Who is at the other end, for messages ("passt").
    peer: String,
    /// The frame being read, behind a zeroed virtio-net header.
    frame: Box<[u8]>,
    /// The length of the frame being read, once its prefix is complete.
    frame_len: Option<usize>,
    /// Bytes of that frame read so far.
    frame_got: usize,
    /// The next length prefix, as far as it has been read.
    prefix: [u8; LEN_PREFIX],
    prefix_got: usize,
    /// The unsent rest of a frame the socket took only part of, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    broken: Option<StreamError>,
}

impl Stream {
    /// Takes over `sock`, connected to `peer`, and makes it non-blocking.
    pub fn new(sock: UnixStream, peer: &str) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            peer: peer.to_string(),
            frame: vec![0; MAX_PACKET_LEN].into_boxed_slice(),
            frame_len: None,
            frame_got: 0,
            prefix: [0; LEN_PREFIX],
            prefix_got: 0,
            pending: Vec::new(),
            pending_at: 0,
            broken: None,
        })
    }

    /// Fails with the reason the stream is unusable, if it is.
    fn usable(&self) -> io::Result<()> {
        match &self.broken {
            Some(e) => Err(e.to_io()),
            None => Ok(()),
        }
    }

    /// Marks the stream unusable; returns the error to hand out.
    fn break_with(&mut self, err: StreamError) -> io::Error {
        let io = err.to_io();
        self.broken.get_or_insert(err);
        io
    }

    /// A socket error: a hang-up breaks the stream, anything else (`WouldBlock`) passes.
    fn socket_error(&mut self, e: io::Error) -> io::Error {
        match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => {
                self.break_with(StreamError::HungUp(self.peer.clone()))
            }
            _ => e,
        }
    }

    /// Reads what is there of the current frame and the next prefix: the byte count, or the
    /// error (`WouldBlock` when nothing is queued).
    fn fill(&mut self) -> io::Result<usize> {
        let body = match self.frame_len {
            Some(len) => HDR_LEN + self.frame_got..HDR_LEN + len,
            None => 0..0,
        };
        let n = loop {
            let mut bufs = [
                IoSliceMut::new(&mut self.frame[body.clone()]),
                IoSliceMut::new(&mut self.prefix[self.prefix_got..]),
            ];
            match self.sock.read_vectored(&mut bufs) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.socket_error(e)),
                Ok(0) => return Err(self.break_with(StreamError::HungUp(self.peer.clone()))),
                Ok(n) => break n,
            }
        };
        let to_body = n.min(body.len());
        self.frame_got += to_body;
        self.prefix_got += n - to_body;
        Ok(n)
    }

    /// Starts the next frame once its prefix is complete.
    fn take_prefix(&mut self) -> io::Result<()> {
        let len = u32::from_be_bytes(self.prefix) as usize;
        if len > MAX_FRAME_LEN {
            let peer = self.peer.clone();
            return Err(self.break_with(StreamError::Oversize { peer, len }));
        }
        self.frame_len = Some(len);
        self.frame_got = 0;
        self.prefix_got = 0;
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl TapIo for Stream {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.usable()?;
        loop {
            match self.frame_len {
                None if self.prefix_got == LEN_PREFIX => self.take_prefix()?,
                Some(len) if self.frame_got == len => break,
                _ => {
                    self.fill()?;
                }
            }
        }
        let len = HDR_LEN + self.frame_got;
        self.frame_len = None;
        // The header stays zeroed: the frame is whole and checksummed.
        match buf.get_mut(..len) {
            Some(dst) => {
                dst.copy_from_slice(&self.frame[..len]);
                Ok(len)
            }
            // As a TAP does: the frame is dropped, the stream stays in step.
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.usable()?;
        self.flush()?;
        let frame = buf
            .get(HDR_LEN..)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // At most MAX_PACKET_LEN: the transmitter refuses longer chains.
        let prefix = (frame.len() as u32).to_be_bytes();
        let sent = loop {
            let bufs = [IoSlice::new(&prefix), IoSlice::new(frame)];
            match self.sock.write_vectored(&bufs) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.socket_error(e)),
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(n) => break n,
            }
        };
        // Taken: what the socket did not take goes first, once it has room.
        if sent < LEN_PREFIX {
            self.pending.extend_from_slice(&prefix[sent..]);
            self.pending.extend_from_slice(frame);
        } else {
            self.pending.extend_from_slice(&frame[sent - LEN_PREFIX..]);
        }
        Ok(buf.len())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        match flags {
            0 => Ok(()),
            _ => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    fn offloads(&self) -> bool {
        false
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.pending_at < self.pending.len() {
            match self.sock.write(&self.pending[self.pending_at..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.socket_error(e)),
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(n) => self.pending_at += n,
            }
        }
        self.pending.clear();
        self.pending_at = 0;
        Ok(())
    }

    fn peer(&self) -> Option<&str> {
        Some(&self.peer)
    }

    fn broken(&self) -> Option<String> {
        self.broken.as_ref().map(ToString::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::ETH_HLEN;

    /// Our stream and the peer's end, blocking with a timeout so that a test cannot hang.
    fn pair() -> (Stream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        (Stream::new(ours, "passt").unwrap(), theirs)
    }

    /// A frame of `len` bytes whose byte `i` is `(i + seed) % 251`.
    fn frame(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed) % 251) as u8).collect()
    }

    /// The frame as it travels on the stream.
    fn wire(frame: &[u8]) -> Vec<u8> {
        let mut w = (frame.len() as u32).to_be_bytes().to_vec();
        w.extend_from_slice(frame);
        w
    }

    /// The frame as the receiver gets it: behind a zeroed header.
    fn with_header(frame: &[u8]) -> Vec<u8> {
        let mut p = vec![0; HDR_LEN];
        p.extend_from_slice(frame);
        p
    }

    fn read(stream: &mut Stream) -> io::Result<Vec<u8>> {
        let mut buf = vec![0xaa; MAX_PACKET_LEN];
        let n = stream.read_frame(&mut buf)?;
        Ok(buf[..n].to_vec())
    }

    fn would_block<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn frames_in_pieces_are_put_together() {
        let (mut s, mut peer) = pair();
        let f = frame(1500, 3);
        let w = wire(&f);
        assert!(would_block(read(&mut s)));
        // Split inside the prefix, inside the frame, and one byte at the end.
        for piece in [&w[..2], &w[2..700], &w[700..w.len() - 1]] {
            peer.write_all(piece).unwrap();
            assert!(would_block(read(&mut s)));
        }
        peer.write_all(&w[w.len() - 1..]).unwrap();
        assert_eq!(read(&mut s).unwrap(), with_header(&f));
        assert!(would_block(read(&mut s)));
        assert_eq!(s.broken(), None);
    }

    #[test]
    fn several_frames_in_one_write_come_out_one_by_one() {
        let (mut s, mut peer) = pair();
        let frames = [frame(60, 1), frame(ETH_HLEN, 2), frame(MAX_FRAME_LEN, 3)];
        let all: Vec<u8> = frames.iter().flat_map(|f| wire(f)).collect();
        let t = std::thread::spawn(move || peer.write_all(&all).map(|()| peer));
        for f in &frames {
            // The largest frame is more than the socket holds: wait for its rest.
            let got = loop {
                match read(&mut s) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    r => break r.unwrap(),
                }
            };
            assert_eq!(got, with_header(f));
        }
        let _peer = t.join().unwrap().unwrap();
        assert!(would_block(read(&mut s)));
    }

    #[test]
    fn reads_stop_at_the_next_prefix() {
        let (mut s, mut peer) = pair();
        let (a, b) = (frame(100, 1), frame(200, 2));
        let mut both = wire(&a);
        both.extend(wire(&b));
        peer.write_all(&both).unwrap();
        assert_eq!(read(&mut s).unwrap(), with_header(&a));
        // b's bytes are still in the socket, so epoll still reports it readable.
        let mut pending = 0;
        // SAFETY: FIONREAD writes one int to the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut pending) };
        assert_eq!(ret, 0);
        assert_eq!(pending, 200);
        assert_eq!(read(&mut s).unwrap(), with_header(&b));
    }

    #[test]
    fn an_oversize_length_breaks_the_stream() {
        let (mut s, mut peer) = pair();
        peer.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
            .unwrap();
        peer.write_all(&[0; 64]).unwrap();
        let err = read(&mut s).unwrap_err();
        assert!(err.raw_os_error().is_none(), "{err}");
        let why = format!(
            "passt sent a frame of {} bytes (at most {MAX_FRAME_LEN}): the stream is out of step",
            MAX_FRAME_LEN + 1
        );
        assert_eq!(err.to_string(), why);
        assert_eq!(s.broken(), Some(why));
        // It stays broken both ways.
        assert!(read(&mut s).is_err());
        assert!(s.write_frame(&with_header(&frame(60, 0))).is_err());
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_in_step() {
        let (mut s, mut peer) = pair();
        let (big, next) = (frame(2000, 1), frame(60, 2));
        peer.write_all(&wire(&big)).unwrap();
        peer.write_all(&wire(&next)).unwrap();
        let mut small = vec![0; 1000];
        let err = s.read_frame(&mut small).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(read(&mut s).unwrap(), with_header(&next));
    }

    #[test]
    fn hang_up_breaks_the_stream() {
        let (mut s, mut peer) = pair();
        // Half a frame, then the peer goes away.
        peer.write_all(&wire(&frame(100, 0))[..50]).unwrap();
        drop(peer);
        let err = read(&mut s).unwrap_err();
        assert_eq!(err.to_string(), "passt hung up");
        assert_eq!(s.broken().as_deref(), Some("passt hung up"));
        assert!(s.write_frame(&with_header(&frame(60, 0))).is_err());

        let (mut s, peer) = pair();
        drop(peer);
        let err = s.write_frame(&with_header(&frame(60, 0))).unwrap_err();
        assert_eq!(err.to_string(), "passt hung up");
        assert_eq!(s.broken().as_deref(), Some("passt hung up"));
    }

    #[test]
    fn writes_carry_the_length_instead_of_the_header() {
        let (mut s, mut peer) = pair();
        let f = frame(1514, 7);
        let mut packet = with_header(&f);
        // Whatever the header says, it does not travel.
        packet[0] = 1;
        assert_eq!(s.write_frame(&packet).unwrap(), packet.len());
        let mut got = vec![0; 4 + f.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, wire(&f));
        assert!(!s.offloads() && s.set_offload(0).is_ok());
        assert!(s.set_offload(libc::TUN_F_CSUM).is_err());
        assert_eq!(s.peer(), Some("passt"));
    }

    #[test]
    fn a_full_socket_takes_whole_frames_and_keeps_the_rest_of_a_partial_one() {
        let (mut s, mut peer) = pair();
        // The smallest send buffer the kernel allows (it raises 1 to its minimum): the first
        // frame fills it part way.
        let size: libc::c_int = 1;
        // SAFETY: SO_SNDBUF reads one int from the pointer, valid for the call.
        let ret = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0);
        let (a, b) = (frame(40_000, 1), frame(60, 2));
        assert_eq!(s.write_frame(&with_header(&a)).unwrap(), HDR_LEN + a.len());
        assert!(!s.pending.is_empty(), "the socket took only part of it");
        // Nothing else goes before the rest of it.
        assert!(would_block(s.write_frame(&with_header(&b))));
        assert!(would_block(s.flush()));
        let want = wire(&a);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; want.len()];
            peer.read_exact(&mut got).map(|()| (got == want, peer))
        });
        // The rest goes out as the peer reads.
        while would_block(s.flush()) {
            std::thread::yield_now();
        }
        let (whole, mut peer) = reader.join().unwrap().unwrap();
        assert!(whole, "the frame arrives whole");
        assert!(s.pending.is_empty());
        s.write_frame(&with_header(&b)).unwrap();
        let mut got = vec![0; 4 + b.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, wire(&b));
    }
}
