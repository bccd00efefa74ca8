//! Executes validated requests against the disk image and drains the request queue.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::Queue;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryError, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::request::{total_len, Chain, Operation, Range, Request, RequestError, Segment};
use super::{ID_BYTES, SECTOR_SIZE};
use crate::virtio::drain::{drain, DrainError};
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

/// Serves virtio-blk requests from one image file.
#[derive(Debug)]
pub struct BlockHandler {
    disk: File,
    /// Size in sectors; requests beyond it were refused by parsing.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    warned: LogOnce,
}

impl BlockHandler {
    /// Serves `disk`, of `capacity` 512-byte sectors, answering GET_ID with `id`.
    pub fn new(disk: File, capacity: u64, read_only: bool, id: [u8; ID_BYTES]) -> Self {
        Self {
            disk,
            capacity,
            read_only,
            id,
            warned: LogOnce::default(),
        }
    }

    /// Serves every available request; returns whether the driver needs an interrupt.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, HandlerError> {
        drain(mem, queue, |chain| self.serve(mem, chain)).map_err(HandlerError::from)
    }

    /// Serves one chain; returns the number of bytes written to its device-writable buffers.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> u32 {
        let chain = match Chain::new(descriptors, mem) {
            Ok(chain) => chain,
            Err(e) => {
                // Without a usable status byte the request can only be returned unanswered.
                warn_once!(
                    self.warned,
                    Problem::Chain,
                    "virtio-blk: dropping request: {e}"
                );
                return 0;
            }
        };
        let status_addr = chain.status;
        let result = Request::parse(chain, mem, self.capacity)
            .map_err(HandlerError::Request)
            .and_then(|request| self.execute(mem, &request.operation));
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

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
        direction: Direction,
    ) -> Result<(), HandlerError> {
        let mut file = FileAt {
            file: &self.disk,
            offset: sector * SECTOR_SIZE,
        };
        for seg in data {
            let len = seg.len as usize;
            match direction {
                Direction::ToGuest => mem.read_exact_volatile_from(seg.addr, &mut file, len),
                Direction::FromGuest => mem.write_all_volatile_to(seg.addr, &mut file, len),
            }
            .map_err(HandlerError::GuestMemory)?;
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
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.disk.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
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

/// pread/pwrite at an explicit, advancing offset, so guest memory is filled from and drained
/// to the image without a bounce buffer or a shared file position.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    /// Runs one positional syscall until it moves bytes or fails with something other than
    /// EINTR; advances the offset.
    fn retry(&mut self, mut op: impl FnMut(i64) -> isize) -> Result<usize, VolatileMemoryError> {
        let offset = i64::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::ErrorKind::InvalidInput.into()))?;
        loop {
            let ret = op(offset);
            if let Ok(n) = usize::try_from(ret) {
                self.offset += n as u64;
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(VolatileMemoryError::IOError(e));
            }
        }
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Fills `buf` completely unless the file ends first.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let fd = self.file.as_raw_fd();
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.offset(done)?;
            let guard = rest.ptr_guard_mut();
            // Guest memory is only accessed volatilely, so concurrent guest access is no UB.
            let n = self.retry(|offset| {
                // SAFETY: `guard` covers `rest.len()` mapped bytes borrowed through `buf`; the
                // kernel writes at most that many.
                unsafe { libc::pread64(fd, guard.as_ptr().cast(), rest.len(), offset) }
            });
            buf.bitmap().mark_dirty(done, rest.len());
            match n? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let fd = self.file.as_raw_fd();
        let guard = buf.ptr_guard();
        self.retry(|offset| {
            // SAFETY: `guard` points to `buf.len()` readable bytes of guest memory that stay
            // mapped while `buf` borrows the memory; the kernel only reads them.
            unsafe { libc::pwrite64(fd, guard.as_ptr().cast(), buf.len(), offset) }
        })
    }
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
            let used = self.handler.serve(&self.mem, chain(descs).into_iter());
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
}
