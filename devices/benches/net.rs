//! virtio-net transmit and receive paths against plain writes to and reads from the same TAP.
//!
//! The device side builds split-ring transmit chains (a header descriptor and a frame
//! descriptor each) in a `GuestMemoryMmap` (no guest, no KVM), makes a batch of them available
//! and runs the real `Transmitter::process_queue`, as the event loop does after one queue
//! notification. The host side writes the same header-plus-frame packets to the TAP with one
//! `write` each. Rounds of the two alternate, and each side's median round is reported, so
//! background noise hits both alike. The receive half is in `net/rx.rs`.
//!
//! Needs root: the TAP lives in a private network namespace (created with `ip`), where the
//! frames reach an interface with no addresses and are dropped by the kernel, so nothing leaves
//! the host. Without root, or without `ip`, the bench says why and skips.
//!
//! Run: `cargo bench -p rvmm-devices --bench net`. The Markdown table also goes to
//! `RVMM_BENCH_OUT` (default: `<target dir>/bench-net.md`).

#[path = "common/report.rs"]
mod report;
#[path = "common/ring.rs"]
mod ring;
#[path = "net/rx.rs"]
mod rx;

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use ring::Ring;
use rvmm_devices::virtio::net::tx::Transmitter;
use rvmm_devices::virtio::net::{Tap, TapIo, HDR_LEN};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const TAP_NAME: &str = "rvmmbench0";
const QUEUE_SIZE: u16 = 256;
const BATCH: usize = 32;
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(250);

// Guest memory layout: the ring, then headers, then frames.
const RING: u64 = 0x0;
const HEADERS: u64 = Ring::SPAN;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 8 << 20;

/// Frame sizes (Ethernet header included): minimum, standard MTU, jumbo, largest.
const FRAME_SIZES: [usize; 4] = [60, 1514, 9000, 65550];
/// Received frame sizes: the largest is what the TAP's MTU (the largest that recent kernels allow a TAP) lets the kernel send.
const RX_FRAME_SIZES: [usize; 4] = [60, 1514, 9000, TAP_MTU + 14];
const TAP_MTU: usize = 65521;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A driver-side split ring in guest memory with one fixed chain per request slot.
struct Driver {
    mem: GuestMemoryMmap,
    ring: Ring,
    queue: Queue,
    tx: Transmitter,
}

impl Driver {
    fn new(frame_len: usize) -> BenchResult<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        let ring = Ring::new(&mem, RING, QUEUE_SIZE);
        for i in 0..BATCH {
            let slot = 2 * i as u16;
            let header = HEADERS + (i * HDR_LEN) as u64;
            let data = DATA + (i * frame_len) as u64;
            let descs = [
                Descriptor::new(header, HDR_LEN as u32, VRING_DESC_F_NEXT as u16, slot + 1),
                Descriptor::new(data, frame_len as u32, 0, 0),
            ];
            for (j, d) in descs.into_iter().enumerate() {
                ring.set_desc(slot + j as u16, d)?;
            }
            mem.write_slice(&[0; HDR_LEN], GuestAddress(header))?;
            mem.write_slice(&frame(i, frame_len), GuestAddress(data))?;
        }
        Ok(Self {
            queue: ring.queue()?,
            mem,
            ring,
            tx: Transmitter::new(),
        })
    }

    /// Makes one batch available and sends it the way a queue notification would.
    fn run_batch(&mut self, tap: &mut Tap) -> BenchResult<()> {
        for i in 0..BATCH {
            self.ring.push(2 * i as u16)?;
        }
        self.ring.publish()?;
        self.tx.process_queue(&self.mem, &mut self.queue, tap)?;
        Ok(())
    }

    /// Every chain so far was returned and every frame reached the TAP.
    fn check(&self) -> BenchResult<()> {
        let pending = self.ring.in_flight()?;
        if pending != 0 || self.tx.dropped() != 0 {
            return Err(format!(
                "{pending} chains not returned, {} frames dropped",
                self.tx.dropped()
            )
            .into());
        }
        Ok(())
    }
}

/// A broadcast frame with the IEEE local experimental EtherType (nothing in the kernel takes
/// it) and distinct contents.
fn frame(seed: usize, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x52, 0x54, 0, 0, 0, 1, 0x88, 0xb5]);
    f.extend((14..len).map(|i| ((i * 31 + seed * 7) % 251) as u8));
    f
}

/// The same frames, header first, written straight to the TAP.
fn host_packets(frame_len: usize) -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            let mut p = vec![0; HDR_LEN];
            p.extend(frame(i, frame_len));
            p
        })
        .collect()
}

fn host_batch(tap: &mut Tap, packets: &[Vec<u8>]) -> io::Result<()> {
    for p in packets {
        tap.write_frame(p)?;
    }
    Ok(())
}

/// Runs batches for one round; returns frames per second.
fn round(mut batch: impl FnMut() -> BenchResult<()>) -> BenchResult<f64> {
    let start = Instant::now();
    let mut frames = 0;
    while start.elapsed() < ROUND_TIME {
        batch()?;
        frames += BATCH;
    }
    Ok(frames as f64 / start.elapsed().as_secs_f64())
}

/// Frames per second of (device, host), medians over alternating rounds.
fn measure(tap: &mut Tap, frame_len: usize) -> BenchResult<(f64, f64)> {
    let mut driver = Driver::new(frame_len)?;
    let packets = host_packets(frame_len);
    driver.run_batch(tap)?;
    driver.check()?;
    let (mut dev, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        dev.push(round(|| driver.run_batch(tap))?);
        driver.check()?;
        plain.push(round(|| Ok(host_batch(tap, &packets)?))?);
    }
    Ok((report::median(dev), report::median(plain)))
}

/// Moves this (single-threaded) process into a fresh network namespace and creates an up TAP
/// there; the reason when that is not possible.
fn private_tap() -> Result<Tap, String> {
    // SAFETY: unshare takes a flag word and only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot create a network namespace: {}",
            io::Error::last_os_error()
        ));
    }
    // No IPv6 in the namespace: its router solicitations and the like would be frames the
    // receive half did not send. A kernel without IPv6 has nothing to turn off.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    for args in [
        &["tuntap", "add", TAP_NAME, "mode", "tap"][..],
        &["link", "set", TAP_NAME, "mtu", &TAP_MTU.to_string()],
        &["link", "set", TAP_NAME, "up"],
    ] {
        let status = Command::new("ip")
            .args(args)
            .status()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !status.success() {
            return Err(format!("ip {} failed", args.join(" ")));
        }
    }
    Tap::open(TAP_NAME).map_err(|e| e.to_string())
}

fn table(rows: &[(usize, f64, f64)], host: &str) -> String {
    let mut out = format!(
        "virtio-net transmit path vs plain TAP writes: a TAP (IFF_VNET_HDR, 12-byte header) in \
         a private network namespace, link up, no addresses: the kernel drops the frames. \
         Batches of {BATCH} chains (header + frame descriptors) per queue notification, the \
         device side including the driver's ring updates; median of {ROUNDS} alternating \
         rounds of {} ms; Gbit/s counts Ethernet frame bytes, not the header. Host: {host}.\n\n",
        ROUND_TIME.as_millis()
    );
    out.push_str(
        "| frame | device frames/s | host frames/s | device Gbit/s | host Gbit/s | ratio | \
         overhead µs/frame |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &(len, dev, host) in rows {
        let gbit = |fps: f64| fps * len as f64 * 8.0 / 1e9;
        out.push_str(&format!(
            "| {len} B | {dev:.0} | {host:.0} | {:.2} | {:.2} | {:.3} | {:.2} |\n",
            gbit(dev),
            gbit(host),
            dev / host,
            (1.0 / dev - 1.0 / host) * 1e6
        ));
    }
    out
}

fn main() -> BenchResult<()> {
    if !report::requested("net") {
        return Ok(());
    }
    let host = report::host_line();
    let mut tap = match private_tap() {
        Ok(tap) => tap,
        Err(why) => {
            println!("net bench: skipped ({why}; needs root)");
            return Ok(());
        }
    };
    let mut rows = Vec::new();
    for len in FRAME_SIZES {
        let (dev, host) = measure(&mut tap, len)?;
        rows.push((len, dev, host));
    }
    let mut text = table(&rows, &host);
    let mut rx_rows = Vec::new();
    for len in RX_FRAME_SIZES {
        rx_rows.push(rx::measure(&mut tap, TAP_NAME, len)?);
    }
    text.push_str(&rx::table(&rx_rows));
    report::publish("net", &text)?;
    Ok(())
}
