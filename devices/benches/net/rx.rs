//! The receive half of the net bench: frames the kernel sends out of the TAP's interface (a
//! packet socket in the bench's namespace) are drained by the virtio-net receive path into
//! merged receive buffers of one page each, the Linux driver's usual kind, and, on the host
//! side, by plain reads into one buffer. The device is measured twice: on the TAP as it is
//! (large frames read straight into the guest buffers), and on a TAP that cannot scatter, so
//! every frame goes through the device's host buffer and is copied. Only the draining is
//! timed, not the sending.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rvmm_devices::virtio::net::rx::{Receiver, RxNext};
use rvmm_devices::virtio::net::{Tap, TapIo, HDR_LEN, MAX_PACKET_LEN, QUEUE_SIZE};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::ring::Ring;
use super::{frame, BenchResult, DATA, MEM_SIZE, RING, ROUNDS, ROUND_TIME};

/// Each receive buffer: one page.
const BUFFER: u64 = 4096;
/// The local experimental EtherType of [`frame`].
const ETHERTYPE: u16 = 0x88b5;

/// Frames per second drained by the device on the TAP, the device made to copy, and the host;
/// and the share of frames the device on the TAP copied.
pub struct RxRow {
    pub frame_len: usize,
    pub tap: f64,
    pub copied: f64,
    pub host: f64,
    pub copies_per_frame: f64,
}

/// Sends frames out of the TAP's interface, so that they queue for the TAP's reader.
struct Sender {
    sock: OwnedFd,
    ifindex: i32,
}

impl Sender {
    fn new(ifname: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new socket that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { sock, ifindex })
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE.to_be();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: the frame and the address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                len,
            )
        };
        match usize::try_from(sent) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(_) => Err(io::ErrorKind::WriteZero.into()),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

/// The TAP as a host side that cannot scatter: the receiver reads into its own buffer.
struct Copying<'a>(&'a mut Tap);

impl AsRawFd for Copying<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl TapIo for Copying<'_> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_frame(buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_frame(buf)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.0.set_offload(flags)
    }
}

/// A driver with every ring entry posted as a one-page receive buffer.
struct RxDriver {
    mem: GuestMemoryMmap,
    ring: Ring,
    queue: Queue,
    rx: Receiver,
}

impl RxDriver {
    fn new() -> BenchResult<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        let mut ring = Ring::new(&mem, RING, QUEUE_SIZE);
        for head in 0..QUEUE_SIZE {
            let addr = DATA + u64::from(head) * BUFFER;
            ring.set_desc(
                head,
                Descriptor::new(addr, BUFFER as u32, VRING_DESC_F_WRITE as u16, 0),
            )?;
            ring.push(head)?;
        }
        ring.publish()?;
        let mut rx = Receiver::new();
        rx.set_features(true, true);
        Ok(Self {
            queue: ring.queue()?,
            mem,
            ring,
            rx,
        })
    }

    /// Receives `frames` frames, then posts the buffers they took again.
    fn drain(&mut self, tap: &mut dyn TapIo, frames: u64) -> BenchResult<()> {
        let goal = self.rx.frames() + frames;
        while self.rx.frames() < goal {
            let pumped = self.rx.pump(&self.mem, &mut self.queue, tap)?;
            if pumped.next == RxNext::Stop || self.rx.dropped() != 0 {
                return Err("the receiver stopped or dropped a frame".into());
            }
        }
        for (head, _) in self.ring.reap()? {
            self.ring.push(head)?;
        }
        self.ring.publish()?;
        Ok(())
    }
}

/// How many frames of `len` bytes one round trip of the ring takes: what the posted buffers
/// hold, less the buffers the receiver keeps taken for the largest frame.
fn batch(frame_len: usize) -> usize {
    let pages = |bytes: usize| bytes.div_ceil(BUFFER as usize);
    let free = usize::from(QUEUE_SIZE) - pages(MAX_PACKET_LEN) - 1;
    (free / pages(HDR_LEN + frame_len)).min(64)
}

/// Frames per second over one round: each pass sends `frames` (untimed), then drains them.
fn round(
    sender: &Sender,
    frames: &[Vec<u8>],
    mut drain: impl FnMut() -> BenchResult<()>,
) -> BenchResult<f64> {
    let (mut timed, mut count) = (Duration::ZERO, 0);
    while timed < ROUND_TIME {
        for f in frames {
            sender.send(f)?;
        }
        let start = Instant::now();
        drain()?;
        timed += start.elapsed();
        count += frames.len();
    }
    Ok(count as f64 / timed.as_secs_f64())
}

fn host_drain(tap: &mut Tap, buf: &mut [u8], frames: usize) -> BenchResult<()> {
    let mut got = 0;
    while got < frames {
        match tap.read_frame(buf) {
            Ok(_) => got += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One row: medians over alternating rounds of the three.
pub fn measure(tap: &mut Tap, ifname: &str, frame_len: usize) -> BenchResult<RxRow> {
    let sender = Sender::new(ifname)?;
    let frames: Vec<Vec<u8>> = (0..batch(frame_len)).map(|i| frame(i, frame_len)).collect();
    let n = frames.len() as u64;
    let (mut direct_dev, mut copy_dev) = (RxDriver::new()?, RxDriver::new()?);
    let mut buf = vec![0u8; MAX_PACKET_LEN];
    let (mut direct, mut copied, mut host) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        direct.push(round(&sender, &frames, || direct_dev.drain(tap, n))?);
        copied.push(round(&sender, &frames, || {
            copy_dev.drain(&mut Copying(tap), n)
        })?);
        host.push(round(&sender, &frames, || {
            host_drain(tap, &mut buf, frames.len())
        })?);
    }
    if copy_dev.rx.copied() != copy_dev.rx.frames() {
        return Err("the device on a TAP that cannot scatter read a frame straight in".into());
    }
    Ok(RxRow {
        frame_len,
        tap: super::report::median(direct),
        copied: super::report::median(copied),
        host: super::report::median(host),
        copies_per_frame: direct_dev.rx.copied() as f64 / direct_dev.rx.frames() as f64,
    })
}

pub fn table(rows: &[RxRow]) -> String {
    let mut out = format!(
        "\nvirtio-net receive path vs plain TAP reads: frames sent out of the TAP's interface \
         by a packet socket, then drained into merged receive buffers of {BUFFER} bytes (all \
         {QUEUE_SIZE} posted, re-posted after each batch), by the device on the TAP (after a \
         large frame it reads the next straight into them with readv; smaller ones it copies), \
         by the device on a TAP that cannot scatter (every frame copied), and by plain reads \
         into one buffer. Only the draining is timed.\n\n"
    );
    out.push_str(
        "| frame | device frames/s | copies/frame | device, all copied | host frames/s | ratio | \
         ratio, all copied |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} B | {:.0} | {:.2} | {:.0} | {:.0} | {:.3} | {:.3} |\n",
            r.frame_len,
            r.tap,
            r.copies_per_frame,
            r.copied,
            r.host,
            r.tap / r.host,
            r.copied / r.host
        ));
    }
    out
}
