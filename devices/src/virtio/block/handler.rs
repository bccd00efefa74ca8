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
mod tests {
    use std::io::Read;

    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::tempfile::TempFile;

    use super::super::test_utils::*;
    use super::*;

    const SECTORS: usize = 64;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const UNSET: u8 = 0xee;

    struct Setup {
        mem: GuestMemoryMmap,
        image: TempFile,
        handler: BlockHandler,
    }

    fn setup(read_only: bool) -> Setup {
        let image = image(SECTORS);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image.as_path())
            .unwrap();
        let handler = BlockHandler::new(file, SECTORS as u64, read_only, *b"serial-number-twenty");
        Setup {
            mem: mem(),
            image,
            handler,
        }
    }

    impl Setup {
        /// Serves one request; returns (status byte, used length).
        fn serve(
            &mut self,
            request_type: u32,
            sector: u64,
            descs: &[(u64, u32, u16)],
        ) -> (u8, u32) {
            header(&self.mem, request_type, sector);
            self.mem.write_obj(UNSET, GuestAddress(STATUS)).unwrap();
            let Served::Used(used) = self
                .handler
                .serve(&self.mem, None, chain(descs).into_iter())
            else {
                panic!("a synchronous request was held");
            };
            (self.status(), used)
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn contents(&self) -> Vec<u8> {
            let mut buf = Vec::new();
            std::fs::File::open(self.image.as_path())
                .unwrap()
                .read_to_end(&mut buf)
                .unwrap();
            buf
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    const HDR_D: (u64, u32, u16) = (HDR, 16, R);
    const ST_D: (u64, u32, u16) = (STATUS, 1, W);

    #[test]
    fn read_fills_scattered_buffers() {
        let mut s = setup(false);
        let descs = [HDR_D, (DATA, 512, W), (DATA + 0x3000, 1024, W), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_IN, 5, &descs), (OK, 1537));
        assert_eq!(s.guest(DATA, 512), pattern(5 * 512, 512));
        assert_eq!(s.guest(DATA + 0x3000, 1024), pattern(6 * 512, 1024));
    }

    #[test]
    fn write_reaches_the_image() {
        let mut s = setup(false);
        let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8).collect();
        s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let descs = [HDR_D, (DATA, 512, R), (DATA + 512, 512, R), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_OUT, 62, &descs), (OK, 1));
        let contents = s.contents();
        assert_eq!(contents.len(), SECTORS * 512);
        assert_eq!(&contents[62 * 512..], &data[..]);
        assert_eq!(&contents[..62 * 512], &pattern(0, 62 * 512)[..]);
    }

    #[test]
    fn flush_and_get_id() {
        let mut s = setup(false);
        assert_eq!(s.serve(VIRTIO_BLK_T_FLUSH, 0, &[HDR_D, ST_D]), (OK, 1));
        let descs = [HDR_D, (DATA, 20, W), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_GET_ID, 0, &descs), (OK, 21));
        assert_eq!(s.guest(DATA, 20), b"serial-number-twenty");
        // A short buffer gets what fits.
        s.mem.write_slice(&[0; 20], GuestAddress(DATA)).unwrap();
        let descs = [HDR_D, (DATA, 6, W), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_GET_ID, 0, &descs), (OK, 7));
        assert_eq!(s.guest(DATA, 8), b"serial\0\0");
    }

    #[test]
    fn write_zeroes_and_discard() {
        let mut s = setup(false);
        let descs = [HDR_D, (DATA, 32, R), ST_D];
        range(&s.mem, DATA, 2, 3, 0);
        range(&s.mem, DATA + 16, 10, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(s.serve(VIRTIO_BLK_T_WRITE_ZEROES, 0, &descs), (OK, 1));
        let contents = s.contents();
        assert_eq!(contents.len(), SECTORS * 512);
        let mut want = pattern(0, SECTORS * 512);
        want[2 * 512..5 * 512].fill(0);
        want[10 * 512..11 * 512].fill(0);
        assert_eq!(contents, want);

        let descs = [HDR_D, (DATA, 16, R), ST_D];
        range(&s.mem, DATA, 20, 8, 0);
        assert_eq!(s.serve(VIRTIO_BLK_T_DISCARD, 0, &descs), (OK, 1));
        assert_eq!(s.contents().len(), SECTORS * 512);
    }

    #[test]
    fn zeroes_can_be_written_by_hand() {
        let s = setup(false);
        // Chunked: more than one ZERO_CHUNK, not a multiple of it.
        let len = (ZERO_CHUNK + 1024) as u64;
        s.image.as_file().set_len(len + 4096).unwrap();
        s.handler.fill_zeroes(512, len).unwrap();
        let contents = s.contents();
        assert_eq!(&contents[..512], &pattern(0, 512)[..]);
        assert!(contents[512..512 + len as usize].iter().all(|&b| b == 0));
        assert_eq!(contents.len() as u64, len + 4096);
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut s = setup(true);
        s.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
        let write = [HDR_D, (DATA, 512, R), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_OUT, 0, &write), (IOERR, 1));
        range(&s.mem, DATA, 0, 1, 0);
        let ranges = [HDR_D, (DATA, 16, R), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_DISCARD, 0, &ranges), (IOERR, 1));
        assert_eq!(s.serve(VIRTIO_BLK_T_WRITE_ZEROES, 0, &ranges), (IOERR, 1));
        assert_eq!(s.contents(), pattern(0, SECTORS * 512));
        let read = [HDR_D, (DATA, 512, W), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_IN, 0, &read), (OK, 513));
    }

    #[test]
    fn errors_map_to_status_bytes() {
        let mut s = setup(false);
        let cases: [(u32, u64, Descs, u8); 5] = [
            (VIRTIO_BLK_T_SCSI_CMD, 0, vec![HDR_D, ST_D], UNSUPP),
            (
                VIRTIO_BLK_T_GET_ID + 100,
                0,
                vec![HDR_D, (DATA, 9, W), ST_D],
                UNSUPP,
            ),
            (
                VIRTIO_BLK_T_IN,
                SECTORS as u64,
                vec![HDR_D, (DATA, 512, W), ST_D],
                IOERR,
            ),
            (VIRTIO_BLK_T_IN, 0, vec![HDR_D, (DATA, 100, W), ST_D], IOERR),
            (VIRTIO_BLK_T_OUT, 0, vec![(HDR, 8, R), ST_D], IOERR),
        ];
        for (request_type, sector, descs, want) in cases {
            assert_eq!(
                s.serve(request_type, sector, &descs),
                (want, 1),
                "{request_type}"
            );
        }
        range(&s.mem, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let descs = [HDR_D, (DATA, 16, R), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_DISCARD, 0, &descs), (UNSUPP, 1));
    }

    #[test]
    fn unusable_status_leaves_memory_alone() {
        let mut s = setup(false);
        let top = MEM_SIZE as u64;
        for descs in [
            vec![HDR_D, (DATA, 512, W), (top, 1, W)],
            vec![HDR_D, (DATA, 512, W)].into_iter().rev().collect(),
            vec![HDR_D],
        ] {
            s.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
            assert_eq!(s.serve(VIRTIO_BLK_T_IN, 0, &descs), (UNSET, 0));
            assert_eq!(s.guest(DATA, 512), vec![0xaa; 512]);
        }
    }

    #[test]
    fn image_shrinking_under_us_is_an_io_error() {
        let mut s = setup(false);
        s.image.as_file().set_len(512).unwrap();
        let descs = [HDR_D, (DATA, 1024, W), ST_D];
        assert_eq!(s.serve(VIRTIO_BLK_T_IN, 0, &descs).0, IOERR);
    }

    fn queue_with<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let queue = mock.create_queue().unwrap();
        (mock, queue)
    }

    fn next(d: RawDescriptor, next: u16) -> RawDescriptor {
        let d = Descriptor::from(d);
        RawDescriptor::from(Descriptor::new(
            d.addr().0,
            d.len(),
            d.flags() | VRING_DESC_F_NEXT as u16,
            next,
        ))
    }

    #[test]
    fn queue_drain_returns_every_chain() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 1);
        // Two chains: 0→1→2 (a read) and 3→4 (the same header, so a read without data).
        let mut descs = raw_chain(&[HDR_D, (DATA, 512, W), ST_D], 0);
        descs.extend(raw_chain(&[HDR_D, (STATUS + 1, 1, W)], 3));
        let mem = s.mem.clone();
        let (mock, mut queue) = queue_with(&mem, &descs);
        assert!(s.handler.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(mock.used().idx().load(), 2);
        let used: Vec<(u32, u32)> = (0..2)
            .map(|i| {
                let e = mock.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        assert_eq!(used, vec![(0, 513), (3, 1)]);
        assert_eq!(s.status(), OK);
        assert_eq!(s.guest(DATA, 512), pattern(512, 512));
        // Nothing new: nothing to do, no interrupt.
        assert!(!s.handler.process_queue(&mem, &mut queue).unwrap());
    }

    #[test]
    fn looping_chain_is_dropped() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        // 0 → 1 → 1 → 1 ...
        let mut descs = raw_chain(&[HDR_D, (DATA, 512, W)], 0);
        descs[1] = next(descs[1], 1);
        let mem = s.mem.clone();
        let (mock, mut queue) = queue_with(&mem, &descs);
        s.mem.write_obj(UNSET, GuestAddress(DATA + 511)).unwrap();
        assert!(s.handler.process_queue(&mem, &mut queue).unwrap());
        let e = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!((e.id(), e.len()), (0, 0));
        let last: u8 = s.mem.read_obj(GuestAddress(DATA + 511)).unwrap();
        assert_eq!(last, UNSET);
    }

    #[test]
    fn bogus_avail_index_does_not_spin() {
        let mut s = setup(false);
        let mem = s.mem.clone();
        let (mock, mut queue) = queue_with(&mem, &raw_chain(&[HDR_D, ST_D], 0));
        // Claim far more buffers than the ring holds.
        mock.avail().idx().store(1000);
        assert!(matches!(
            s.handler.process_queue(&mem, &mut queue),
            Err(HandlerError::BrokenRing)
        ));
    }

    /// A header for `request_type` at `addr` (the tests' default is at HDR).
    fn header_at(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        mem.write_obj(request_type, GuestAddress(addr)).unwrap();
        mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    /// Returns what io_uring completes until nothing is in flight; whether an interrupt is due.
    fn complete_all(handler: &mut BlockHandler, mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
        let mut notify = false;
        while handler.in_flight() > 0 {
            let fd = handler.completion_event().unwrap().as_raw_fd();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no completion");
            let _ = handler.completion_event().unwrap().read();
            notify |= handler.process_completions(mem, queue).unwrap();
        }
        notify
    }

    fn used_ring(mock: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        (0..mock.used().idx().load())
            .map(|i| {
                let e = mock.used().ring().ref_at(i.into()).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    #[test]
    fn io_uring_serves_requests_in_flight_together() {
        let mut s = setup(false);
        s.handler.enable_io_uring().unwrap();
        let data: Vec<u8> = (0..1024).map(|i| (i % 11) as u8).collect();
        s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        header_at(&s.mem, HDR, VIRTIO_BLK_T_OUT, 3);
        header_at(&s.mem, HDR + 0x20, VIRTIO_BLK_T_IN, 40);
        header_at(&s.mem, HDR + 0x40, VIRTIO_BLK_T_GET_ID, 0);
        let mut descs = raw_chain(&[HDR_D, (DATA, 1024, R), ST_D], 0);
        let read = [
            (HDR + 0x20, 16, R),
            (DATA + 0x1000, 512, W),
            (STATUS + 1, 1, W),
        ];
        descs.extend(raw_chain(&read, 3));
        let id = [
            (HDR + 0x40, 16, R),
            (DATA + 0x2000, 20, W),
            (STATUS + 2, 1, W),
        ];
        descs.extend(raw_chain(&id, 6));
        let mem = s.mem.clone();
        let (mock, mut queue) = queue_with(&mem, &descs);
        // The (buffered) write and GET_ID are answered at once; the read goes to the ring,
        // and may complete during the submission.
        assert!(s.handler.process_queue(&mem, &mut queue).unwrap());
        assert_eq!(used_ring(&mock)[..2], [(0, 1), (6, 21)]);
        complete_all(&mut s.handler, &mem, &mut queue);
        let mut used = used_ring(&mock);
        used.sort_unstable();
        assert_eq!(used, [(0, 1), (3, 513), (6, 21)]);
        assert_eq!(s.guest(STATUS, 3), [OK, OK, OK]);
        assert_eq!(&s.contents()[3 * 512..5 * 512], &data[..]);
        assert_eq!(s.guest(DATA + 0x1000, 512), pattern(40 * 512, 512));
    }

    #[test]
    fn io_uring_flush_completes_after_every_write_before_it() {
        const WRITES: u16 = 8;
        const LEN: u32 = 64 * 1024;
        let image = image(WRITES as usize * LEN as usize / 512);
        // Direct, so that the writes go to the ring too (buffered ones are served at once).
        let Some(mut handler) = direct_handler(image.as_path()) else {
            return;
        };
        let mem = mem();
        let mut descs = Vec::new();
        for i in 0..WRITES {
            let hdr = HDR + 0x20 * u64::from(i);
            header_at(
                &mem,
                hdr,
                VIRTIO_BLK_T_OUT,
                u64::from(i) * u64::from(LEN / 512),
            );
            let data = DATA + u64::from(i) * u64::from(LEN);
            mem.write_slice(&vec![i as u8 + 1; LEN as usize], GuestAddress(data))
                .unwrap();
            let chain = [(hdr, 16, R), (data, LEN, R), (STATUS + u64::from(i), 1, W)];
            descs.extend(raw_chain(&chain, 3 * i));
        }
        let flush = HDR + 0x20 * u64::from(WRITES);
        header_at(&mem, flush, VIRTIO_BLK_T_FLUSH, 0);
        let status = STATUS + u64::from(WRITES);
        descs.extend(raw_chain(&[(flush, 16, R), (status, 1, W)], 3 * WRITES));
        let mock = MockSplitQueue::new(&mem, 32);
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut queue = mock.create_queue().unwrap();
        handler.process_queue(&mem, &mut queue).unwrap();
        complete_all(&mut handler, &mem, &mut queue);
        let used = used_ring(&mock);
        assert_eq!(used.len(), usize::from(WRITES) + 1);
        assert_eq!(used.last(), Some(&(u32::from(3 * WRITES), 1)), "{used:?}");
        let mut contents = Vec::new();
        std::fs::File::open(image.as_path())
            .unwrap()
            .read_to_end(&mut contents)
            .unwrap();
        for (i, chunk) in contents.chunks(LEN as usize).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8 + 1), "write {i}");
        }
    }

    /// A handler on io_uring for `image` opened with O_DIRECT; none where the temp dir's file
    /// system takes no direct I/O.
    fn direct_handler(image: &std::path::Path) -> Option<BlockHandler> {
        let open = |flags| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(image)
        };
        let Ok(direct) = open(libc::O_DIRECT) else {
            eprintln!("SKIPPED: the temp dir takes no O_DIRECT");
            return None;
        };
        let capacity = direct.metadata().unwrap().len() / 512;
        let mut handler = BlockHandler::new(direct, capacity, false, [0; 20]);
        let (mem_align, offset_align) = handler.dio_alignment().unwrap();
        handler.set_direct(DirectIo {
            buffered: open(0).unwrap(),
            mem_align,
            offset_align,
        });
        handler.enable_io_uring().unwrap();
        Some(handler)
    }

    #[test]
    fn direct_disk_sends_unaligned_buffers_through_the_page_cache() {
        let mut s = setup(false);
        let Some(handler) = direct_handler(s.image.as_path()) else {
            return;
        };
        s.handler = handler;
        // One buffer page-aligned, one a byte off.
        for (addr, sector) in [(0x4000, 4), (0x6001, 9)] {
            header_at(&s.mem, HDR, VIRTIO_BLK_T_IN, sector);
            let descs = raw_chain(&[HDR_D, (addr, 512, W), ST_D], 0);
            let mem = s.mem.clone();
            let (mock, mut queue) = queue_with(&mem, &descs);
            s.handler.process_queue(&mem, &mut queue).unwrap();
            complete_all(&mut s.handler, &mem, &mut queue);
            assert_eq!(used_ring(&mock), [(0, 513)]);
            assert_eq!(s.status(), OK);
            assert_eq!(s.guest(addr, 512), pattern(sector as usize * 512, 512));
        }
    }
}
