//! Executes validated requests against the disk image and drains the request queue.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{total_len, Chain, Operation, Range, Request, RequestError, Segment};
use super::uring::{Completed, Op, Submission, Uring};
use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::virtio::drain::{drain_chains, DrainError, Served};
use crate::virtio::iovec::{advance, guest_iovecs};
use crate::{warn_once, LogOnce, Problem};

/// Chunk written when zeroes must be written out by hand.
const ZERO_CHUNK: usize = 64 * 1024;

/// Errors while serving requests.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The request was malformed.
    #[error("invalid request")]
    Request(#[source] RequestError),
    /// The image refused the operation.
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
    /// Copying between the image and guest memory failed.
    #[error("guest memory I/O failed")]
    GuestMemory(#[source] GuestMemoryError),
    /// A write-type request on a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The request type is not implemented.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The queue itself is unusable (rings unreadable, avail index insane).
    #[error("virtio queue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The driver claims more buffers than the ring can hold.
    #[error("avail ring index is inconsistent")]
    BrokenRing,
}

impl From<DrainError> for HandlerError {
    fn from(e: DrainError) -> Self {
        match e {
            DrainError::Queue(e) => Self::Queue(e),
            DrainError::BrokenRing => Self::BrokenRing,
        }
    }
}

impl HandlerError {
    /// The virtio-blk status byte reporting this error to the driver.
    fn status(&self) -> u8 {
        let status = match self {
            Self::Unsupported(_) | Self::Request(RequestError::UnsupportedFlags(_)) => {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }
}

/// A disk opened with O_DIRECT: the alignment its direct I/O needs, and a buffered descriptor
/// of the same file for requests that do not meet it (Linux keeps the two coherent).
#[derive(Debug)]
pub struct DirectIo {
    /// The same file without O_DIRECT.
    pub buffered: File,
    /// Alignment of buffer addresses.
    pub mem_align: u64,
    /// Alignment of file offsets and lengths.
    pub offset_align: u64,
}

/// Serves virtio-blk requests from one image file, synchronously or on io_uring.
#[derive(Debug)]
pub struct BlockHandler {
    disk: File,
    direct: Option<DirectIo>,
    /// Size in sectors; requests beyond it were refused by parsing.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    uring: Option<Uring>,
    /// Completions reaped and not yet returned; kept to reuse its allocation.
    completed: Vec<Completed>,
    warned: LogOnce,
}

/// Which descriptor of the disk a transfer uses; the index is the io_uring registration's.
const DISK: u32 = 0;
const BUFFERED: u32 = 1;

impl BlockHandler {
    /// Serves `disk`, of `capacity` 512-byte sectors, answering GET_ID with `id`.
    pub fn new(disk: File, capacity: u64, read_only: bool, id: [u8; ID_BYTES]) -> Self {
        Self {
            disk,
            direct: None,
            capacity,
            read_only,
            id,
            uring: None,
            completed: Vec::new(),
            warned: LogOnce::default(),
        }
    }

    /// The disk's direct I/O alignment of (buffer addresses, file offsets and lengths), as
    /// statx reports it; (512, 512) where the kernel does not say, (_, 0) where the file takes
    /// no direct I/O.
    pub fn dio_alignment(&self) -> io::Result<(u64, u64)> {
        // SAFETY: statx is plain old data, for which all zeroes is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty path with AT_EMPTY_PATH names the fd itself; the kernel writes at
        // most one statx into `stx`.
        let ret = unsafe {
            libc::statx(
                self.disk.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
            return Ok((SECTOR_SIZE, SECTOR_SIZE));
        }
        Ok((
            u64::from(stx.stx_dio_mem_align).max(1),
            stx.stx_dio_offset_align.into(),
        ))
    }

    /// Marks the disk as opened with O_DIRECT; before [`BlockHandler::enable_io_uring`].
    pub fn set_direct(&mut self, direct: DirectIo) {
        self.direct = Some(direct);
    }

    /// Serves reads, writes and flushes asynchronously from now on, many in flight; the event
    /// loop then watches [`BlockHandler::completion_event`]. Fails where io_uring is missing or
    /// forbidden, and requests stay synchronous.
    pub fn enable_io_uring(&mut self) -> io::Result<()> {
        // The ring gets descriptors of its own: it lets go of its registered files only some
        // time after it is closed, and the image's lock must go when the device does.
        let mut files = vec![reopen(&self.disk)?];
        if let Some(direct) = &self.direct {
            files.push(reopen(&direct.buffered)?);
        }
        let fds: Vec<_> = files.iter().map(File::as_raw_fd).collect();
        self.uring = Some(Uring::new(QUEUE_SIZE, &fds)?);
        Ok(())
    }

    /// Signalled whenever asynchronous requests complete; never read here, so the event loop
    /// watches it edge-triggered.
    pub fn completion_event(&self) -> Option<&EventFd> {
        self.uring.as_ref().map(Uring::completion_event)
    }

    /// Requests taken from the queue and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, Uring::in_flight)
    }

    /// Waits for every request in flight, without returning them: before a reset.
    pub fn wait_idle(&mut self) {
        if let Some(uring) = &mut self.uring {
            uring.wait_idle();
        }
    }

    /// Serves or starts every available request; returns whether the driver needs an
    /// interrupt.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, HandlerError> {
        let drained = drain_chains(mem, queue, |chain| {
            let head = chain.head_index();
            self.serve(mem, Some(head), chain)
        });
        let Some(uring) = &mut self.uring else {
            return Ok(drained?);
        };
        // Even when the ring turned out broken: what was taken from it must still complete.
        uring.submit().map_err(HandlerError::Io)?;
        // Reads from the page cache complete during the submission: answer them now rather
        // than after another trip through the event loop.
        let done = self.process_completions(mem, queue)?;
        Ok(drained? || done)
    }

    /// Returns the requests that completed on io_uring; returns whether the driver needs an
    /// interrupt. Does not read [`BlockHandler::completion_event`].
    pub fn process_completions(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, HandlerError> {
        let Some(uring) = &mut self.uring else {
            return Ok(false);
        };
        let mut completed = std::mem::take(&mut self.completed);
        let reaped = uring.reap(&mut completed);
        let mut result = Ok(!completed.is_empty());
        for done in completed.drain(..) {
            let answer = done.result.map_err(HandlerError::Io);
            let used = self.answer(mem, done.status, answer);
            if let Err(e) = queue.add_used(mem, done.head, used) {
                result = Err(HandlerError::Queue(e));
            }
        }
        self.completed = completed;
        reaped.map_err(HandlerError::Io)?;
        match result {
            Ok(true) => queue.needs_notification(mem).map_err(HandlerError::Queue),
            other => other,
        }
    }

    /// Serves one chain, or starts it on io_uring when `head` is given and the ring takes it.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        head: Option<u16>,
        descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> Served {
        let chain = match Chain::new(descriptors, mem) {
            Ok(chain) => chain,
            Err(e) => {
                // Without a usable status byte the request can only be returned unanswered.
                warn_once!(
                    self.warned,
                    Problem::Chain,
                    "virtio-blk: dropping request: {e}"
                );
                return Served::Used(0);
            }
        };
        let status = chain.status;
        let request = match Request::parse(chain, mem, self.capacity) {
            Ok(request) => request,
            Err(e) => return Served::Used(self.answer(mem, status, Err(HandlerError::Request(e)))),
        };
        if let Some(head) = head {
            if self.start(mem, head, &request) {
                return Served::Held;
            }
        }
        let result = self.execute(mem, &request.operation);
        Served::Used(self.answer(mem, status, result))
    }

    /// Puts a read, write or flush on io_uring; false when it is to be served synchronously.
    fn start(&mut self, mem: &GuestMemoryMmap, head: u16, request: &Request) -> bool {
        let (op, sector, data) = match &request.operation {
            Operation::Read { sector, data } => (Op::Read, *sector, data.as_slice()),
            // A buffered write only copies into the page cache, which a plain pwritev does at
            // twice the rate of io_uring, whose workers it would need (measured: the blk
            // bench); with O_DIRECT it waits for the device, and goes to the ring.
            Operation::Write { sector, data } if !self.read_only && self.direct.is_some() => {
                (Op::Write, *sector, data.as_slice())
            }
            Operation::Flush => (Op::Flush, 0, &[][..]),
            _ => return false,
        };
        // Errors are left to the synchronous path, which reports them.
        let Ok(iovecs) = segment_iovecs(mem, data) else {
            return false;
        };
        let offset = sector * SECTOR_SIZE;
        let used = if op == Op::Read { total_len(data) } else { 0 };
        let submission = Submission {
            head,
            op,
            file: self.file_for(offset, &iovecs),
            status: request.status,
            iovecs,
            offset,
            // virtio-queue ends chains at 4 GiB, so this always fits.
            used: u32::try_from(used).unwrap_or(u32::MAX),
        };
        self.uring
            .as_mut()
            .is_some_and(|uring| uring.push(submission).is_ok())
    }

    /// Writes the status byte for `result`; returns the chain's used length.
    fn answer(
        &mut self,
        mem: &GuestMemoryMmap,
        status_addr: GuestAddress,
        result: Result<u32, HandlerError>,
    ) -> u32 {
        let (status, written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.report(&e);
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            warn_once!(
                self.warned,
                Problem::Status,
                "virtio-blk: cannot write status: {e}"
            );
        }
        written.saturating_add(1)
    }

    fn report(&mut self, e: &HandlerError) {
        let problem = match e {
            HandlerError::Io(_) | HandlerError::GuestMemory(_) => Problem::Io,
            _ => Problem::Request,
        };
        warn_once!(
            self.warned,
            problem,
            "virtio-blk: {}",
            crate::error_chain(e)
        );
    }

    /// Executes one request; returns the bytes written into guest buffers.
    pub fn execute(&self, mem: &GuestMemoryMmap, op: &Operation) -> Result<u32, HandlerError> {
        let writes = matches!(
            op,
            Operation::Write { .. } | Operation::Discard(_) | Operation::WriteZeroes(_)
        );
        if writes && self.read_only {
            return Err(HandlerError::ReadOnly);
        }
        match op {
            Operation::Read { sector, data } => {
                self.transfer(mem, *sector, data, Direction::ToGuest)?;
                // virtio-queue ends chains at 4 GiB, so this always fits.
                Ok(u32::try_from(total_len(data)).unwrap_or(u32::MAX))
            }
            Operation::Write { sector, data } => {
                self.transfer(mem, *sector, data, Direction::FromGuest)?;
                Ok(0)
            }
            Operation::Flush => self.disk.sync_data().map(|_| 0).map_err(HandlerError::Io),
            Operation::GetId { data } => write_segments(mem, data, &self.id),
            Operation::Discard(ranges) => {
                ranges.iter().try_for_each(|r| self.discard(r))?;
                Ok(0)
            }
            Operation::WriteZeroes(ranges) => {
                ranges.iter().try_for_each(|r| self.write_zeroes(r))?;
                Ok(0)
            }
            Operation::Unsupported(t) => Err(HandlerError::Unsupported(*t)),
        }
    }

    /// The disk descriptor for a transfer: the O_DIRECT one unless the transfer misses its
    /// alignment.
    fn file_for(&self, offset: u64, iovecs: &[libc::iovec]) -> u32 {
        let Some(direct) = &self.direct else {
            return DISK;
        };
        let aligned = offset.is_multiple_of(direct.offset_align)
            && iovecs.iter().all(|iov| {
                (iov.iov_base as u64).is_multiple_of(direct.mem_align)
                    && (iov.iov_len as u64).is_multiple_of(direct.offset_align)
            });
        if aligned {
            DISK
        } else {
            BUFFERED
        }
    }

    /// Moves a read's or write's data with preadv/pwritev straight to or from guest memory.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
        direction: Direction,
    ) -> Result<(), HandlerError> {
        let mut iovecs = segment_iovecs(mem, data).map_err(HandlerError::GuestMemory)?;
        let mut offset = sector * SECTOR_SIZE;
        let fd = match (self.file_for(offset, &iovecs), &self.direct) {
            (BUFFERED, Some(direct)) => direct.buffered.as_raw_fd(),
            _ => self.disk.as_raw_fd(),
        };
        while !iovecs.is_empty() {
            let at =
                i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
            let at = at.map_err(HandlerError::Io)?;
            // At most the queue size plus region splits: far below IOV_MAX.
            let count = iovecs.len() as libc::c_int;
            let ret = match direction {
                // SAFETY: every iovec names mapped guest memory (guest_iovecs checked each
                // range), which the kernel may write; `iovecs` outlives the call.
                Direction::ToGuest => unsafe { libc::preadv64(fd, iovecs.as_ptr(), count, at) },
                // SAFETY: as above; the kernel only reads the buffers.
                Direction::FromGuest => unsafe { libc::pwritev64(fd, iovecs.as_ptr(), count, at) },
            };
            match usize::try_from(ret) {
                Ok(0) => return Err(HandlerError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    advance(&mut iovecs, n);
                    offset += n as u64;
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(HandlerError::Io(e));
                    }
                }
            }
        }
        Ok(())
    }

    fn discard(&self, range: &Range) -> Result<(), HandlerError> {
        let (offset, len) = byte_range(range);
        match fallocate(&self.disk, PUNCH_HOLE, offset, len) {
            // Discard is a hint: an image that cannot punch holes simply keeps the data.
            Err(e) if is_unsupported(&e) => Ok(()),
            res => res.map_err(HandlerError::Io),
        }
    }

    fn write_zeroes(&self, range: &Range) -> Result<(), HandlerError> {
        let (offset, len) = byte_range(range);
        let mut modes = Vec::with_capacity(2);
        if range.unmap {
            modes.push(PUNCH_HOLE);
        }
        modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
        for mode in modes {
            match fallocate(&self.disk, mode, offset, len) {
                Err(e) if is_unsupported(&e) => continue,
                res => return res.map_err(HandlerError::Io),
            }
        }
        self.fill_zeroes(offset, len).map_err(HandlerError::Io)
    }

    /// Writes zeroes out, for images that cannot zero ranges with fallocate.
    fn fill_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let file = self.direct.as_ref().map_or(&self.disk, |d| &d.buffered);
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The host addresses of a request's data buffers.
fn segment_iovecs(
    mem: &GuestMemoryMmap,
    data: &[Segment],
) -> Result<Vec<libc::iovec>, GuestMemoryError> {
    let mut out = Vec::with_capacity(data.len());
    let spans = data.iter().map(|seg| (seg.addr, seg.len as usize));
    guest_iovecs(mem, spans, &mut out)?;
    Ok(out)
}

/// A new open file description of `file`'s inode, with its access mode and O_DIRECT.
fn reopen(file: &File) -> io::Result<File> {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let access = flags & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(access != libc::O_WRONLY)
        .write(access != libc::O_RDONLY)
        .custom_flags(flags & libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    FromGuest,
}

const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn byte_range(range: &Range) -> (u64, u64) {
    // Parsing checked the range against the capacity, so these cannot overflow.
    (
        range.sector * SECTOR_SIZE,
        u64::from(range.count) * SECTOR_SIZE,
    )
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = i64::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is valid for the
        // lifetime of `file`.
        let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies `bytes` into guest buffers, as far as they reach; returns the count copied.
fn write_segments(
    mem: &GuestMemoryMmap,
    data: &[Segment],
    mut bytes: &[u8],
) -> Result<u32, HandlerError> {
    let mut written = 0;
    for seg in data {
        let n = bytes.len().min(seg.len as usize);
        mem.write_slice(&bytes[..n], seg.addr)
            .map_err(HandlerError::GuestMemory)?;
        bytes = &bytes[n..];
        // At most ID_BYTES.
        written += n as u32;
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
