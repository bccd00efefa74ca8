//! passt's side of `-netdev stream`: after one control byte, the input is the byte stream passt
//! sends (frames behind 4-byte big-endian lengths, or anything else). It goes into the peer end
//! of a socketpair in pieces, the stream's `read_frame` emptying the socket after each piece
//! and `write_frame` sending a few frames the other way; then the peer shuts down. Every frame
//! read must be the next one a plain parse of the input finds, the stream must end broken for
//! the reason that parse gives, and the peer must receive exactly the frames taken, each behind
//! its length. Control bits 0-3: log2 of the piece size; bit 4: a 1514-byte receive buffer
//! (longer frames are dropped); bit 5: the smallest send buffer, so that frames are taken in
//! part; bit 6: the peer reads what it is sent while it sends; bit 7: the peer closes its end
//! instead of shutting down its sending side.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use rvmm_devices::virtio::net::{Stream, StreamError, TapIo, HDR_LEN, MAX_FRAME_LEN};

const PEER: &str = "passt";
/// The frames rvmm sends, one per piece: minimal, full-size, larger than the smallest send
/// buffer, and header-only.
const WRITES: [usize; 4] = [60, 1514, 40_000, 14];
/// Receive buffer with control bit 4: a standard Ethernet frame behind the header.
const SMALL_RX: usize = HDR_LEN + 1514;

/// What a plain parse of the input says passt sent: the whole frames, then why the stream
/// ends.
fn parse(mut bytes: &[u8]) -> (Vec<&[u8]>, StreamError) {
    let mut frames = Vec::new();
    loop {
        let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
            return (frames, StreamError::HungUp(PEER.into()));
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME_LEN {
            let peer = PEER.into();
            return (frames, StreamError::Oversize { peer, len });
        }
        let Some(frame) = rest.get(..len) else {
            return (frames, StreamError::HungUp(PEER.into()));
        };
        frames.push(frame);
        bytes = &rest[len..];
    }
}

/// The receive side: the frames still expected and the buffer they are read into.
struct Receiver<'a> {
    expected: std::vec::IntoIter<&'a [u8]>,
    buf: Vec<u8>,
}

impl Receiver<'_> {
    /// Reads frames until the socket is empty (true) or the stream fails (false), checking
    /// each against the parse.
    fn read_all(&mut self, stream: &mut Stream) -> bool {
        loop {
            self.buf[..HDR_LEN].fill(0xaa);
            let got = stream.read_frame(&mut self.buf);
            if matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                return true;
            }
            if matches!(&got, Err(e) if e.raw_os_error() != Some(libc::EINVAL)) {
                assert!(
                    stream.broken().is_some(),
                    "an error but not broken: {got:?}"
                );
                return false;
            }
            let want = self
                .expected
                .next()
                .expect("a frame the input does not hold");
            let fits = HDR_LEN + want.len() <= self.buf.len();
            match got {
                Ok(n) => {
                    assert!(fits, "a frame longer than the buffer was returned");
                    assert_eq!(n, HDR_LEN + want.len());
                    assert!(self.buf[..HDR_LEN].iter().all(|&b| b == 0), "header");
                    assert_eq!(&self.buf[HDR_LEN..n], want);
                }
                Err(_) => assert!(!fits, "a frame that fits the buffer was dropped"),
            }
        }
    }
}

/// The send side: the next frame to offer and everything taken so far, as on the wire.
struct Sender {
    next: usize,
    taken: Vec<u8>,
    done: bool,
}

impl Sender {
    /// Offers the next frame, if any is left and the stream still takes frames.
    fn write_one(&mut self, stream: &mut Stream) {
        let Some(&len) = WRITES.get(self.next).filter(|_| !self.done) else {
            return;
        };
        let frame: Vec<u8> = (0..len).map(|i| (i * 7 + self.next) as u8).collect();
        // Whatever the header says, it does not travel.
        let mut packet = vec![1u8; HDR_LEN];
        packet.extend_from_slice(&frame);
        match stream.write_frame(&packet) {
            Ok(n) => {
                assert_eq!(n, packet.len());
                self.taken.extend_from_slice(&(len as u32).to_be_bytes());
                self.taken.extend_from_slice(&frame);
                self.next += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.done = true,
        }
    }
}

/// Reads what the peer has been sent without waiting.
fn drain(peer: &UnixStream, into: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match (&*peer).read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => panic!("peer read: {e}"),
        }
    }
}

/// Sets the smallest send buffer the kernel allows on `sock`.
fn small_sndbuf(sock: &UnixStream) {
    // The kernel raises 1 to its minimum.
    let size: libc::c_int = 1;
    // SAFETY: SO_SNDBUF reads one int from the pointer, valid for the call; the fd is open.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "SO_SNDBUF: {}", io::Error::last_os_error());
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    rvmm_fuzz::ignore_sigpipe();
    let piece = 1usize << (control & 0xf);
    let (ours, peer) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("non-blocking peer");
    if control & 0x20 != 0 {
        small_sndbuf(&ours);
    }
    let mut stream = Stream::new(ours, PEER).expect("stream");
    let (expected, end) = parse(input);
    let all_frames = expected.len();
    let buf_len = if control & 0x10 != 0 {
        SMALL_RX
    } else {
        rvmm_devices::virtio::net::MAX_PACKET_LEN
    };
    let mut rx = Receiver {
        expected: expected.into_iter(),
        buf: vec![0; buf_len],
    };
    let mut tx = Sender {
        next: 0,
        taken: Vec::new(),
        done: false,
    };
    let mut received = Vec::new();

    tx.write_one(&mut stream);
    let mut at = 0;
    while at < input.len() {
        let end = input.len().min(at + piece);
        match (&peer).write(&input[at..end]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("peer write: {e}"),
        }
        // Reading empties the socket, so the next piece fits.
        let alive = rx.read_all(&mut stream);
        tx.write_one(&mut stream);
        if control & 0x40 != 0 {
            drain(&peer, &mut received);
        }
        if !alive {
            break;
        }
    }

    let peer = if control & 0x80 != 0 {
        drop(peer);
        None
    } else {
        peer.shutdown(Shutdown::Write).expect("peer shutdown");
        Some(peer)
    };
    assert!(
        !rx.read_all(&mut stream),
        "the peer is gone, the stream must say so"
    );
    assert_eq!(
        rx.expected.len(),
        0,
        "{} of {all_frames} frames read",
        all_frames - rx.expected.len()
    );
    assert_eq!(stream.broken(), Some(end.to_string()));

    // The peer still reads: the rest of a frame taken in part must reach it.
    if let Some(peer) = peer {
        let mut flushed = false;
        for _ in 0..1000 {
            drain(&peer, &mut received);
            match stream.flush() {
                Ok(()) => {
                    flushed = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("flush to a peer that reads: {e}"),
            }
        }
        assert!(flushed, "the rest of a frame never went");
        drain(&peer, &mut received);
        assert!(
            received == tx.taken,
            "the peer got other bytes than the frames taken"
        );
    } else {
        assert!(tx.taken.starts_with(&received), "the peer got other bytes");
    }
});
