//! virtio-blk device model against plain pread/pwrite on the same file.
//!
//! The device side builds split-ring requests in a `GuestMemoryMmap` (no guest, no KVM), makes
//! a batch of them available and runs the real `BlockHandler::process_queue`, as the event loop
//! does after one queue notification. The host side does the same I/O (sizes, offsets, order)
//! with `read_exact_at`/`write_all_at` into ordinary buffers. Rounds of the two alternate, and
//! each side's median round is reported, so background noise hits both alike.
//!
//! Run: `cargo bench -p rvmm-devices --bench blk`. The scratch file lives in `RVMM_BENCH_DIR`
//! (default: the temp dir); the Markdown table also goes to `RVMM_BENCH_OUT` (default:
//! `<target dir>/bench-blk.md`).

#[path = "common/report.rs"]
mod report;
#[path = "common/ring.rs"]
mod ring;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ring::Ring;
use rvmm_devices::virtio::block::handler::BlockHandler;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const FILE_SIZE: u64 = 256 << 20;
const QUEUE_SIZE: u16 = 256;
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(250);

// Guest memory layout: the ring, then request headers and status bytes, then data buffers.
const RING: u64 = 0x0;
const HEADERS: u64 = Ring::SPAN;
const STATUS: u64 = HEADERS + 0x1000;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 32 << 20;

/// One row of the table.
struct Workload {
    name: &'static str,
    /// Bytes per request.
    block: usize,
    /// Requests per queue notification.
    batch: usize,
    write: bool,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read",
        block: 4096,
        batch: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "4 KiB random write",
        block: 4096,
        batch: 32,
        write: true,
        random: true,
    },
    Workload {
        name: "1 MiB sequential read",
        block: 1 << 20,
        batch: 8,
        write: false,
        random: false,
    },
    Workload {
        name: "1 MiB sequential write",
        block: 1 << 20,
        batch: 8,
        write: true,
        random: false,
    },
];

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The byte offsets of a workload's requests, the same sequence for both sides.
struct Offsets {
    state: u64,
    next: u64,
    block: u64,
    random: bool,
}

impl Offsets {
    fn new(w: &Workload) -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
            next: 0,
            block: w.block as u64,
            random: w.random,
        }
    }
}

impl Offsets {
    fn next_offset(&mut self) -> u64 {
        let blocks = FILE_SIZE / self.block;
        let index = if self.random {
            // xorshift64: cheap, deterministic, no dependency.
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % blocks
        } else {
            let i = self.next;
            self.next = (self.next + 1) % blocks;
            i
        };
        index * self.block
    }
}

/// A driver-side split ring in guest memory with one fixed chain (header, data, status) per
/// request slot.
struct Driver {
    mem: GuestMemoryMmap,
    ring: Ring,
    queue: Queue,
    handler: BlockHandler,
    block: usize,
    batch: usize,
    request_type: u32,
}

impl Driver {
    fn new(file: &File, w: &Workload) -> BenchResult<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        let ring = Ring::new(&mem, RING, QUEUE_SIZE);
        let data_flags = if w.write { 0 } else { VRING_DESC_F_WRITE };
        for i in 0..w.batch {
            let slot = 3 * i as u16;
            let next = VRING_DESC_F_NEXT as u16;
            let data_addr = DATA + (i * w.block) as u64;
            let descs = [
                Descriptor::new(HEADERS + 16 * i as u64, 16, next, slot + 1),
                Descriptor::new(
                    data_addr,
                    w.block as u32,
                    next | data_flags as u16,
                    slot + 2,
                ),
                Descriptor::new(STATUS + i as u64, 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (j, d) in descs.into_iter().enumerate() {
                ring.set_desc(slot + j as u16, d)?;
            }
            mem.write_slice(&pattern(i, w.block), GuestAddress(data_addr))?;
        }
        let capacity = FILE_SIZE / 512;
        let handler = BlockHandler::new(file.try_clone()?, capacity, false, [0; 20]);
        Ok(Self {
            queue: ring.queue()?,
            mem,
            ring,
            handler,
            block: w.block,
            batch: w.batch,
            request_type: if w.write {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            },
        })
    }

    /// Makes one batch available and serves it the way a queue notification would.
    fn run_batch(&mut self, offsets: &mut Offsets) -> BenchResult<()> {
        for i in 0..self.batch {
            let offset = offsets.next_offset();
            let hdr = HEADERS + 16 * i as u64;
            self.mem.write_obj(self.request_type, GuestAddress(hdr))?;
            self.mem.write_obj(offset / 512, GuestAddress(hdr + 8))?;
            self.ring.push(3 * i as u16)?;
        }
        self.ring.publish()?;
        self.handler.process_queue(&self.mem, &mut self.queue)?;
        Ok(())
    }

    /// Every request so far was returned, and the last batch's succeeded.
    fn check(&self) -> BenchResult<()> {
        let pending = self.ring.in_flight()?;
        if pending != 0 {
            return Err(format!("{pending} requests not returned").into());
        }
        for i in 0..self.batch as u64 {
            let status: u8 = self.mem.read_obj(GuestAddress(STATUS + i))?;
            if u32::from(status) != VIRTIO_BLK_S_OK {
                return Err(format!("request failed with status {status}").into());
            }
        }
        Ok(())
    }

    fn data(&self, i: usize) -> BenchResult<Vec<u8>> {
        let mut buf = vec![0; self.block];
        let addr = DATA + (i * self.block) as u64;
        self.mem.read_slice(&mut buf, GuestAddress(addr))?;
        Ok(buf)
    }
}

/// The same I/O with plain positional syscalls.
struct Host {
    file: File,
    bufs: Vec<Vec<u8>>,
    write: bool,
}

impl Host {
    fn new(file: &File, w: &Workload) -> BenchResult<Self> {
        Ok(Self {
            file: file.try_clone()?,
            bufs: (0..w.batch).map(|i| pattern(i, w.block)).collect(),
            write: w.write,
        })
    }

    fn run_batch(&mut self, offsets: &mut Offsets) -> io::Result<()> {
        for buf in &mut self.bufs {
            let offset = offsets.next_offset();
            if self.write {
                self.file.write_all_at(buf, offset)?;
            } else {
                self.file.read_exact_at(buf, offset)?;
            }
        }
        Ok(())
    }
}

/// Distinct, non-zero contents for each data buffer.
fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251 + 1) as u8)
        .collect()
}

/// Runs batches for one round; returns requests per second.
fn round(mut batch: impl FnMut(&mut Offsets) -> BenchResult<()>, w: &Workload) -> BenchResult<f64> {
    let mut offsets = Offsets::new(w);
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < ROUND_TIME {
        batch(&mut offsets)?;
        requests += w.batch;
    }
    Ok(requests as f64 / start.elapsed().as_secs_f64())
}

/// Checks that the device moved the right bytes before timing it.
fn verify(file: &File, w: &Workload) -> BenchResult<()> {
    let mut driver = Driver::new(file, w)?;
    driver.run_batch(&mut Offsets::new(w))?;
    driver.check()?;
    let mut offsets = Offsets::new(w);
    for i in 0..w.batch {
        let offset = offsets.next_offset();
        let mut on_disk = vec![0; w.block];
        file.read_exact_at(&mut on_disk, offset)?;
        if driver.data(i)? != on_disk {
            return Err(format!("{}: request {i} moved the wrong bytes", w.name).into());
        }
    }
    Ok(())
}

/// Requests per second of (device, host), medians over alternating rounds.
fn measure(file: &File, w: &Workload) -> BenchResult<(f64, f64)> {
    verify(file, w)?;
    let mut driver = Driver::new(file, w)?;
    let mut host = Host::new(file, w)?;
    let (mut dev, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        dev.push(round(|o| driver.run_batch(o), w)?);
        driver.check()?;
        plain.push(round(|o| Ok(host.run_batch(o)?), w)?);
    }
    Ok((report::median(dev), report::median(plain)))
}

/// A scratch file with distinct contents, written back and read once so every request hits
/// clean, cached pages.
fn scratch_file() -> BenchResult<TempFile> {
    let dir = std::env::var_os("RVMM_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let tmp = TempFile::new_in(&dir)?;
    let mut file = tmp.as_file();
    let chunk = pattern(3, 1 << 20);
    for _ in 0..FILE_SIZE / chunk.len() as u64 {
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    io::copy(&mut File::open(tmp.as_path())?, &mut io::sink())?;
    Ok(tmp)
}

fn table(rows: &[(&Workload, f64, f64)], path: &str, host: &str) -> String {
    let mut out = format!(
        "virtio-blk device model vs pread/pwrite: {} MiB file at {path}, page-cache warm \
         (pre-written, fsynced, read once; writes stay in the page cache). Batches of N \
         requests per queue notification, the device side including the driver's ring \
         updates; median of {ROUNDS} alternating rounds of {} ms. Host: {host}.\n\n",
        FILE_SIZE >> 20,
        ROUND_TIME.as_millis()
    );
    out.push_str(
        "| workload | N | device ops/s | host ops/s | device MiB/s | host MiB/s | ratio | \
         overhead µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (w, dev, host) in rows {
        let mib = |ops: f64| ops * w.block as f64 / f64::from(1 << 20);
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.3} | {:.2} |\n",
            w.name,
            w.batch,
            dev,
            host,
            mib(*dev),
            mib(*host),
            dev / host,
            (1.0 / dev - 1.0 / host) * 1e6
        ));
    }
    out
}

fn main() -> BenchResult<()> {
    if !report::requested("blk") {
        return Ok(());
    }
    let host = report::host_line();
    let tmp = scratch_file()?;
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        let (dev, host) = measure(tmp.as_file(), w)?;
        rows.push((w, dev, host));
    }
    let text = table(&rows, &tmp.as_path().display().to_string(), &host);
    report::publish("blk", &text)?;
    Ok(())
}
