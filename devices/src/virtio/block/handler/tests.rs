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
    fn serve(&mut self, request_type: u32, sector: u64, descs: &[(u64, u32, u16)]) -> (u8, u32) {
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
