//! virtio-blk device model against plain pread/pwrite on the same file, and, with O_DIRECT,
//! against fio on io_uring at the same queue depth.
//!
//! The device side builds split-ring requests in a `GuestMemoryMmap` (no guest, no KVM), makes
//! a batch of them available and runs the real `BlockHandler::process_queue`, as the event loop
//! does after one queue notification, then (on io_uring) `process_completions` as each
//! completion event arrives. The host side does the same I/O (sizes, offsets, order) with
//! `read_exact_at`/`write_all_at` into ordinary buffers. Rounds of the sides alternate, and
//! each side's median round is reported, so background noise hits them alike.
//!
//! The O_DIRECT part keeps N requests in flight, re-posting each as it comes back, as a guest
//! at queue depth N does, and compares with `fio --ioengine=io_uring --direct=1 --iodepth=N`
//! on the same file.
//!
//! Run: `cargo bench -p rvmm-devices --bench blk`. The scratch file lives in `RVMM_BENCH_DIR`
//! (default: the temp dir); the Markdown table also goes to `RVMM_BENCH_OUT` (default:
//! `<target dir>/bench-blk.md`).

#[path = "common/report.rs"]
mod report;
#[path = "common/ring.rs"]
mod ring;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ring::Ring;
use rvmm_devices::virtio::block::handler::{BlockHandler, DirectIo};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
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

/// How the device model serves requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// preadv/pwritev, one request after the other.
    Sync,
    /// io_uring, the default.
    Uring,
    /// io_uring on an O_DIRECT descriptor.
    Direct,
}

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
    /// Watches the completion eventfd edge-triggered, as rvmm's event loop does.
    epoll: Option<OwnedFd>,
}

impl Driver {
    fn new(file: &File, w: &Workload, engine: Engine) -> BenchResult<Self> {
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
        let handler = handler(file, engine)?;
        let epoll = handler.completion_event().map(watch).transpose()?;
        Ok(Self {
            epoll,
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
            self.post(i, offsets)?;
        }
        self.ring.publish()?;
        self.handler.process_queue(&self.mem, &mut self.queue)?;
        while self.handler.in_flight() > 0 {
            self.complete()?;
        }
        Ok(())
    }

    /// Waits for io_uring completions and returns them to the ring.
    fn complete(&mut self) -> BenchResult<()> {
        let epoll = self.epoll.as_ref().ok_or("no io_uring")?;
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        loop {
            // SAFETY: room for one event, for the duration of the call.
            let ready = unsafe { libc::epoll_wait(epoll.as_raw_fd(), &mut event, 1, 10_000) };
            match ready {
                1 => break,
                // io_uring's completion work interrupts the wait.
                -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return Err("no io_uring completion within 10 s".into()),
            }
        }
        self.handler
            .process_completions(&self.mem, &mut self.queue)?;
        Ok(())
    }

    /// Keeps `batch` requests in flight for `time`, re-posting each as it returns; returns
    /// requests per second.
    fn run_at_depth(&mut self, offsets: &mut Offsets, time: Duration) -> BenchResult<f64> {
        self.ring.reap()?;
        for i in 0..self.batch {
            self.post(i, offsets)?;
        }
        self.ring.publish()?;
        self.handler.process_queue(&self.mem, &mut self.queue)?;
        let start = Instant::now();
        let mut done = 0;
        while start.elapsed() < time {
            self.complete()?;
            for (head, _) in self.ring.reap()? {
                done += 1;
                self.post(usize::from(head / 3), offsets)?;
            }
            self.ring.publish()?;
            self.handler.process_queue(&self.mem, &mut self.queue)?;
        }
        let rate = f64::from(done) / start.elapsed().as_secs_f64();
        while self.handler.in_flight() > 0 {
            self.complete()?;
        }
        self.ring.reap()?;
        Ok(rate)
    }

    /// Makes request slot `i` available again, at the next offset.
    fn post(&mut self, i: usize, offsets: &mut Offsets) -> BenchResult<()> {
        let hdr = HEADERS + 16 * i as u64;
        self.mem.write_obj(self.request_type, GuestAddress(hdr))?;
        self.mem
            .write_obj(offsets.next_offset() / 512, GuestAddress(hdr + 8))?;
        self.ring.push(3 * i as u16)?;
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

/// An epoll instance watching `done` edge-triggered.
fn watch(done: &EventFd) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call without pointers.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; the kernel copies `event` during the call.
    let ret = unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, done.as_raw_fd(), &mut event) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(epoll)
}

/// The device's handler for `file`, served by `engine`.
fn handler(file: &File, engine: Engine) -> BenchResult<BlockHandler> {
    let capacity = FILE_SIZE / 512;
    if engine != Engine::Direct {
        let mut handler = BlockHandler::new(file.try_clone()?, capacity, false, [0; 20]);
        if engine == Engine::Uring {
            handler.enable_io_uring()?;
        }
        return Ok(handler);
    }
    let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&fd)?;
    let mut handler = BlockHandler::new(direct, capacity, false, [0; 20]);
    let (mem_align, offset_align) = handler.dio_alignment()?;
    handler.set_direct(DirectIo {
        buffered: file.try_clone()?,
        mem_align,
        offset_align,
    });
    handler.enable_io_uring()?;
    Ok(handler)
}

/// Checks that the device moved the right bytes before timing it.
fn verify(file: &File, w: &Workload, engine: Engine) -> BenchResult<()> {
    let mut driver = Driver::new(file, w, engine)?;
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

/// Requests per second of (sync device, io_uring device, host), medians over alternating
/// rounds.
fn measure(file: &File, w: &Workload) -> BenchResult<[f64; 3]> {
    let mut drivers = Vec::new();
    for engine in [Engine::Sync, Engine::Uring] {
        verify(file, w, engine)?;
        drivers.push(Driver::new(file, w, engine)?);
    }
    let mut host = Host::new(file, w)?;
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (driver, rates) in drivers.iter_mut().zip(&mut rates) {
            rates.push(round(|o| driver.run_batch(o), w)?);
            driver.check()?;
        }
        rates[2].push(round(|o| Ok(host.run_batch(o)?), w)?);
    }
    Ok(rates.map(report::median))
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

fn table(rows: &[(&Workload, [f64; 3])], path: &str, host: &str) -> String {
    let mut out = format!(
        "virtio-blk device model vs pread/pwrite: {} MiB file at {path}, page-cache warm \
         (pre-written, fsynced, read once; writes stay in the page cache). Batches of N \
         requests per queue notification, the device side including the driver's ring \
         updates, served synchronously (preadv/pwritev) or as rvmm does (reads on io_uring, \
         waiting for the completion event; buffered writes with pwritev); median of {ROUNDS} alternating rounds of {} ms. \
         Host: {host}.\n\n",
        FILE_SIZE >> 20,
        ROUND_TIME.as_millis()
    );
    out.push_str(
        "| workload | N | sync ops/s | rvmm ops/s | pread/pwrite ops/s | rvmm MiB/s | \
         sync ratio | rvmm ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (w, [sync, uring, host]) in rows {
        let mib = |ops: f64| ops * w.block as f64 / f64::from(1 << 20);
        out.push_str(&format!(
            "| {} | {} | {sync:.0} | {uring:.0} | {host:.0} | {:.1} | {:.3} | {:.3} |\n",
            w.name,
            w.batch,
            mib(*uring),
            sync / host,
            uring / host,
        ));
    }
    out
}

/// The O_DIRECT rows: 4 KiB random I/O at a queue depth, the device on io_uring vs fio.
const DIRECT: [Workload; 3] = [
    Workload {
        name: "4 KiB random read, O_DIRECT",
        block: 4096,
        batch: 1,
        write: false,
        random: true,
    },
    Workload {
        name: "4 KiB random read, O_DIRECT",
        block: 4096,
        batch: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "4 KiB random write, O_DIRECT",
        block: 4096,
        batch: 32,
        write: true,
        random: true,
    },
];
const DIRECT_ROUNDS: usize = 5;
const DIRECT_TIME: Duration = Duration::from_secs(1);

/// fio's IOPS for `w` on `path`: io_uring, O_DIRECT, the same depth, one second.
fn fio(path: &Path, w: &Workload) -> BenchResult<f64> {
    let out = Command::new("fio")
        .args([
            "--name=rvmm",
            "--ioengine=io_uring",
            "--direct=1",
            "--minimal",
        ])
        .args(["--time_based", "--runtime=1", "--randrepeat=0"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={FILE_SIZE}"))
        .arg(format!("--bs={}", w.block))
        .arg(format!("--iodepth={}", w.batch))
        .arg(format!(
            "--rw={}",
            if w.write { "randwrite" } else { "randread" }
        ))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    // Terse format 3: field 7 is the read IOPS, 48 the write IOPS.
    let text = String::from_utf8_lossy(&out.stdout);
    let field = if w.write { 48 } else { 7 };
    let iops = text
        .trim()
        .split(';')
        .nth(field)
        .ok_or("short fio output")?;
    Ok(iops.parse()?)
}

/// IOPS of (device, fio) for an O_DIRECT row, medians over alternating runs.
fn measure_direct(tmp: &TempFile, w: &Workload) -> BenchResult<(f64, f64)> {
    verify(tmp.as_file(), w, Engine::Direct)?;
    let mut driver = Driver::new(tmp.as_file(), w, Engine::Direct)?;
    let mut offsets = Offsets::new(w);
    let (mut dev, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..DIRECT_ROUNDS {
        dev.push(driver.run_at_depth(&mut offsets, DIRECT_TIME)?);
        peer.push(fio(tmp.as_path(), w)?);
    }
    Ok((report::median(dev), report::median(peer)))
}

fn direct_table(rows: &[(&Workload, f64, f64)], path: &str) -> String {
    let mut out = format!(
        "\nO_DIRECT on the host's disk, same file ({path}): the device model on io_uring \
         keeping N requests in flight (each re-posted as it returns, the driver's ring work \
         included) vs `fio --ioengine=io_uring --direct=1 --iodepth=N`; median of \
         {DIRECT_ROUNDS} alternating runs of {} s.\n\n\
         | workload | QD | device IOPS | fio IOPS | ratio |\n|---|---:|---:|---:|---:|\n",
        DIRECT_TIME.as_secs()
    );
    for (w, dev, fio) in rows {
        out.push_str(&format!(
            "| {} | {} | {dev:.0} | {fio:.0} | {:.3} |\n",
            w.name,
            w.batch,
            dev / fio
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
        rows.push((w, measure(tmp.as_file(), w)?));
    }
    let path = tmp.as_path().display().to_string();
    let mut text = table(&rows, &path, &host);
    let mut direct = Vec::new();
    for w in &DIRECT {
        let (dev, peer) = measure_direct(&tmp, w)?;
        direct.push((w, dev, peer));
    }
    text.push_str(&direct_table(&direct, &path));
    report::publish("blk", &text)?;
    Ok(())
}
