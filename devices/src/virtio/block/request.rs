//! Parsing and validation of virtio-blk requests (virtio 1.1, 5.2.6).
//!
//! Everything the guest controls is checked here, before any I/O: descriptor flags and order,
//! buffers inside guest memory, the status byte, lengths and sector ranges. The handler can then
//! trust a [`Request`].

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{MAX_RANGES, MAX_RANGE_SECTORS, QUEUE_SIZE, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: u32 = 16;

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain ended on a descriptor that claims a successor: a loop, a bad index, a bad
    /// indirect table or a chain over 4 GiB.
    #[error("descriptor chain is broken")]
    BrokenChain,
    /// More descriptors than any legal chain has.
    #[error("descriptor chain is longer than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The spec requires device-readable buffers to precede device-writable ones.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// No device-writable byte at the end of the chain for the status.
    #[error("no status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is too short")]
    ShortHeader,
    /// Data flows the wrong way for the request type (or a FLUSH carries data).
    #[error("request type {0} has data in the wrong direction")]
    WrongDirection(u32),
    /// Read/write length not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// Sectors beyond the end of the disk (or an overflowing range).
    #[error("sectors {sector}+{count} are past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
    },
    /// Discard/write-zeroes payload not a whole number of ranges, empty, or too many ranges.
    #[error("invalid discard/write-zeroes payload of {0} bytes")]
    BadRanges(u64),
    /// A range longer than advertised.
    #[error("range of {0} sectors exceeds the advertised maximum")]
    RangeTooLong(u32),
    /// Flags this device does not support (status UNSUPP rather than IOERR).
    #[error("unsupported range flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Reading the request from guest memory failed.
    #[error("cannot read the request from guest memory")]
    GuestMemory,
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One DISCARD or WRITE_ZEROES range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub count: u32,
    /// WRITE_ZEROES may deallocate the range.
    pub unmap: bool,
}

/// What a request asks for, with its validated buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read sectors into device-writable buffers.
    Read {
        /// First sector.
        sector: u64,
        /// Destination buffers, in order.
        data: Vec<Segment>,
    },
    /// Write sectors from device-readable buffers.
    Write {
        /// First sector.
        sector: u64,
        /// Source buffers, in order.
        data: Vec<Segment>,
    },
    /// Make previous writes durable.
    Flush,
    /// Return the device ID string into device-writable buffers.
    GetId {
        /// Destination buffers, in order.
        data: Vec<Segment>,
    },
    /// Deallocate ranges (contents afterwards unspecified).
    Discard(Vec<Range>),
    /// Zero ranges.
    WriteZeroes(Vec<Range>),
    /// A request type this device does not implement.
    Unsupported(u32),
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub operation: Operation,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A descriptor chain split into its device-readable and device-writable buffers, with the
/// status byte (the chain's last byte) taken off the end.
#[derive(Debug)]
pub struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Chain {
    /// Walks a chain, checking buffer bounds and direction order. An error here means there is
    /// no trustworthy status byte to report it in.
    pub fn new(
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, RequestError> {
        let mut readable = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        let mut last_has_next = false;
        // With no indirect descriptors a chain never exceeds the queue size; indirect tables
        // could be longer but no driver needs that for one block request.
        let limit = usize::from(QUEUE_SIZE);
        for (count, desc) in descriptors.enumerate() {
            if count == limit {
                return Err(RequestError::TooManyDescriptors(limit));
            }
            last_has_next = desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !mem.check_range(seg.addr, seg.len as usize) {
                return Err(RequestError::OutsideMemory {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(RequestError::ReadableAfterWritable);
            }
        }
        // virtio-queue's iterator stops silently on a bad chain; the last descriptor it yields
        // then still has NEXT set.
        if last_has_next {
            return Err(RequestError::BrokenChain);
        }
        let last = writable
            .last_mut()
            .filter(|seg| seg.len > 0)
            .ok_or(RequestError::NoStatus)?;
        last.len -= 1;
        let status = last.addr.unchecked_add(u64::from(last.len));
        writable.retain(|seg| seg.len > 0);
        Ok(Self {
            readable,
            writable,
            status,
        })
    }
}

impl Request {
    /// Validates a chain's header and payload against a disk of `capacity` sectors.
    pub fn parse(chain: Chain, mem: &GuestMemoryMmap, capacity: u64) -> Result<Self, RequestError> {
        let mut readable = chain.readable;
        let header = take_header(mem, &mut readable)?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let writable = chain.writable;
        let no_data = |segs: &[Segment]| segs.is_empty();
        let wrong_way = RequestError::WrongDirection(request_type);
        let operation = match request_type {
            VIRTIO_BLK_T_IN if no_data(&readable) => {
                check_sectors(sector, &writable, capacity)?;
                Operation::Read {
                    sector,
                    data: writable,
                }
            }
            VIRTIO_BLK_T_OUT if no_data(&writable) => {
                check_sectors(sector, &readable, capacity)?;
                Operation::Write {
                    sector,
                    data: readable,
                }
            }
            VIRTIO_BLK_T_FLUSH if no_data(&readable) && no_data(&writable) => Operation::Flush,
            VIRTIO_BLK_T_GET_ID if no_data(&readable) => Operation::GetId { data: writable },
            VIRTIO_BLK_T_DISCARD if no_data(&writable) => {
                Operation::Discard(parse_ranges(mem, &readable, capacity, false)?)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if no_data(&writable) => {
                Operation::WriteZeroes(parse_ranges(mem, &readable, capacity, true)?)
            }
            VIRTIO_BLK_T_IN
            | VIRTIO_BLK_T_OUT
            | VIRTIO_BLK_T_FLUSH
            | VIRTIO_BLK_T_GET_ID
            | VIRTIO_BLK_T_DISCARD
            | VIRTIO_BLK_T_WRITE_ZEROES => return Err(wrong_way),
            other => Operation::Unsupported(other),
        };
        Ok(Self {
            operation,
            status: chain.status,
        })
    }
}

/// Total length of `segs`; cannot overflow a u64 since each is under 4 GiB and there are at
/// most `QUEUE_SIZE` of them.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

fn check_sectors(sector: u64, data: &[Segment], capacity: u64) -> Result<(), RequestError> {
    let len = total_len(data);
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    check_range(sector, len / SECTOR_SIZE, capacity)
}

fn check_range(sector: u64, count: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, count }),
    }
}

/// Parses `struct virtio_blk_discard_write_zeroes` entries.
fn parse_ranges(
    mem: &GuestMemoryMmap,
    data: &[Segment],
    capacity: u64,
    write_zeroes: bool,
) -> Result<Vec<Range>, RequestError> {
    let len = total_len(data);
    let entry = u64::from(RANGE_LEN);
    if len == 0 || !len.is_multiple_of(entry) || len / entry > u64::from(MAX_RANGES) {
        return Err(RequestError::BadRanges(len));
    }
    let bytes = read_all(mem, data)?;
    bytes
        .chunks_exact(RANGE_LEN as usize)
        .map(|raw| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[..8]);
            let sector = u64::from_le_bytes(sector);
            let count = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            // virtio 1.1, 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            let allowed = if write_zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(RequestError::UnsupportedFlags(flags));
            }
            if count > MAX_RANGE_SECTORS {
                return Err(RequestError::RangeTooLong(count));
            }
            check_range(sector, count.into(), capacity)?;
            Ok(Range {
                sector,
                count,
                unmap: flags != 0,
            })
        })
        .collect()
}

/// Reads the request header off the front of the device-readable buffers, leaving the rest
/// in `segs`.
fn take_header(
    mem: &GuestMemoryMmap,
    segs: &mut Vec<Segment>,
) -> Result<[u8; HEADER_LEN as usize], RequestError> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut pos = 0;
    let mut used = 0;
    for seg in segs.iter_mut() {
        if pos == header.len() {
            break;
        }
        let take = (header.len() - pos).min(seg.len as usize);
        mem.read_slice(&mut header[pos..pos + take], seg.addr)
            .map_err(|_| RequestError::GuestMemory)?;
        pos += take;
        // At most HEADER_LEN.
        seg.addr = seg.addr.unchecked_add(take as u64);
        seg.len -= take as u32;
        if seg.len == 0 {
            used += 1;
        }
    }
    if pos < header.len() {
        return Err(RequestError::ShortHeader);
    }
    segs.drain(..used);
    Ok(header)
}

/// Copies small guest buffers (header, ranges) into host memory.
fn read_all(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<Vec<u8>, RequestError> {
    let mut out = vec![0u8; total_len(segs) as usize];
    let mut pos = 0;
    for seg in segs {
        let end = pos + seg.len as usize;
        mem.read_slice(&mut out[pos..end], seg.addr)
            .map_err(|_| RequestError::GuestMemory)?;
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::*;
    use super::*;

    const CAPACITY: u64 = 64;

    fn parse(descs: &[(u64, u32, u16)], mem: &GuestMemoryMmap) -> Result<Request, RequestError> {
        Request::parse(Chain::new(chain(descs).into_iter(), mem)?, mem, CAPACITY)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn valid_requests() {
        let mem = mem();
        let status = GuestAddress(STATUS);
        let hdr = (HDR, 16, R);
        let st = (STATUS, 1, W);
        type Case = (u32, u64, Descs, Operation);
        let cases: Vec<Case> = vec![
            (
                VIRTIO_BLK_T_IN,
                3,
                vec![hdr, (DATA, 512, W), (DATA + 0x1000, 1024, W), st],
                Operation::Read {
                    sector: 3,
                    data: vec![seg(DATA, 512), seg(DATA + 0x1000, 1024)],
                },
            ),
            (
                VIRTIO_BLK_T_OUT,
                CAPACITY - 1,
                vec![hdr, (DATA, 512, R), st],
                Operation::Write {
                    sector: CAPACITY - 1,
                    data: vec![seg(DATA, 512)],
                },
            ),
            (VIRTIO_BLK_T_FLUSH, 99, vec![hdr, st], Operation::Flush),
            (
                VIRTIO_BLK_T_GET_ID,
                0,
                vec![hdr, (DATA, 20, W), st],
                Operation::GetId {
                    data: vec![seg(DATA, 20)],
                },
            ),
            (2, 0, vec![hdr, (DATA, 7, W), st], Operation::Unsupported(2)),
        ];
        for (request_type, sector, descs, want) in cases {
            header(&mem, request_type, sector);
            let req = parse(&descs, &mem).unwrap();
            assert_eq!(req.operation, want, "type {request_type}");
            assert_eq!(req.status, status);
        }
    }

    #[test]
    fn any_layout_is_accepted() {
        let mem = mem();
        // Header and data in one buffer.
        header(&mem, VIRTIO_BLK_T_OUT, 1);
        let req = parse(&[(HDR, 16 + 512, R), (STATUS, 1, W)], &mem).unwrap();
        let want = Operation::Write {
            sector: 1,
            data: vec![seg(HDR + 16, 512)],
        };
        assert_eq!(req.operation, want);
        // Header split in two; status shares the data buffer; zero-length buffers vanish.
        header(&mem, VIRTIO_BLK_T_IN, 2);
        let descs = [(HDR, 8, R), (HDR + 8, 8, R), (DATA, 0, W), (DATA, 1025, W)];
        let req = parse(&descs, &mem).unwrap();
        let want = Operation::Read {
            sector: 2,
            data: vec![seg(DATA, 1024)],
        };
        assert_eq!(req.operation, want);
        assert_eq!(req.status, GuestAddress(DATA + 1024));
    }

    #[test]
    fn ranges_are_parsed() {
        let mem = mem();
        range(&mem, DATA, 4, 8, 0);
        range(&mem, DATA + 16, 60, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        // The two entries straddle descriptor boundaries.
        let descs = [
            (HDR, 16, R),
            (DATA, 10, R),
            (DATA + 10, 22, R),
            (STATUS, 1, W),
        ];
        let want = vec![
            Range {
                sector: 4,
                count: 8,
                unmap: false,
            },
            Range {
                sector: 60,
                count: 4,
                unmap: true,
            },
        ];
        assert_eq!(
            parse(&descs, &mem).unwrap().operation,
            Operation::WriteZeroes(want)
        );
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let descs = [(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
        let want = vec![Range {
            sector: 4,
            count: 8,
            unmap: false,
        }];
        assert_eq!(
            parse(&descs, &mem).unwrap().operation,
            Operation::Discard(want)
        );
    }

    #[test]
    fn chains_without_a_usable_status_are_refused() {
        let mem = mem();
        let top = MEM_SIZE as u64;
        let hdr = (HDR, 16, R);
        let cases: Vec<(Descs, RequestError)> = vec![
            (vec![], RequestError::NoStatus),
            (vec![hdr], RequestError::NoStatus),
            (vec![hdr, (STATUS, 0, W)], RequestError::NoStatus),
            (
                vec![hdr, (STATUS, 1, W), (DATA, 1, R)],
                RequestError::ReadableAfterWritable,
            ),
            (
                vec![hdr, (top, 1, W)],
                RequestError::OutsideMemory { addr: top, len: 1 },
            ),
            (
                vec![hdr, (top - 512, 513, W), (STATUS, 1, W)],
                RequestError::OutsideMemory {
                    addr: top - 512,
                    len: 513,
                },
            ),
            (
                vec![(u64::MAX, 16, R), (STATUS, 1, W)],
                RequestError::OutsideMemory {
                    addr: u64::MAX,
                    len: 16,
                },
            ),
            (
                vec![(HDR, u32::MAX, R), (STATUS, 1, W)],
                RequestError::OutsideMemory {
                    addr: HDR,
                    len: u32::MAX,
                },
            ),
        ];
        for (descs, want) in cases {
            let err = Chain::new(chain(&descs).into_iter(), &mem).unwrap_err();
            assert_eq!(err, want, "{descs:x?}");
        }
        // The iterator stopped on a descriptor that says more follow.
        let mut broken = chain(&[hdr, (STATUS, 1, W)]);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        broken[1] = Descriptor::new(STATUS, 1, W | next, 5);
        let err = Chain::new(broken.into_iter(), &mem).unwrap_err();
        assert_eq!(err, RequestError::BrokenChain);
        let long = vec![(DATA, 1, W); usize::from(QUEUE_SIZE) + 1];
        let err = Chain::new(chain(&long).into_iter(), &mem).unwrap_err();
        assert_eq!(err, RequestError::TooManyDescriptors(QUEUE_SIZE.into()));
    }

    #[test]
    fn bad_layouts_are_refused() {
        use RequestError::*;
        let mem = mem();
        let hdr = (HDR, 16, R);
        let st = (STATUS, 1, W);
        type Case = (u32, u64, Descs, RequestError);
        let cases: Vec<Case> = vec![
            (VIRTIO_BLK_T_IN, 0, vec![(HDR, 15, R), st], ShortHeader),
            (VIRTIO_BLK_T_IN, 0, vec![(DATA, 512, W), st], ShortHeader),
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![hdr, (DATA, 512, R), st],
                WrongDirection(0),
            ),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![hdr, (DATA, 512, W), st],
                WrongDirection(1),
            ),
            (
                VIRTIO_BLK_T_FLUSH,
                0,
                vec![hdr, (DATA, 8, W), st],
                WrongDirection(4),
            ),
            (
                VIRTIO_BLK_T_FLUSH,
                0,
                vec![hdr, (DATA, 8, R), st],
                WrongDirection(4),
            ),
            (
                VIRTIO_BLK_T_GET_ID,
                0,
                vec![hdr, (DATA, 20, R), st],
                WrongDirection(8),
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![hdr, (DATA, 16, W), st],
                WrongDirection(11),
            ),
        ];
        for (request_type, sector, descs, want) in cases {
            header(&mem, request_type, sector);
            assert_eq!(parse(&descs, &mem).unwrap_err(), want, "{descs:x?}");
        }
    }

    #[test]
    fn bad_lengths_and_sectors_are_refused() {
        use RequestError::*;
        let mem = mem();
        let hdr = (HDR, 16, R);
        let st = (STATUS, 1, W);
        type Case = (u32, u64, Descs, RequestError);
        let cases: Vec<Case> = vec![
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![hdr, (DATA, 511, W), st],
                UnalignedLength(511),
            ),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![hdr, (DATA, 513, R), st],
                UnalignedLength(513),
            ),
            (
                VIRTIO_BLK_T_IN,
                CAPACITY,
                vec![hdr, (DATA, 512, W), st],
                OutOfRange {
                    sector: CAPACITY,
                    count: 1,
                },
            ),
            (
                VIRTIO_BLK_T_OUT,
                CAPACITY - 1,
                vec![hdr, (DATA, 1024, R), st],
                OutOfRange {
                    sector: CAPACITY - 1,
                    count: 2,
                },
            ),
            (
                VIRTIO_BLK_T_IN,
                u64::MAX,
                vec![hdr, (DATA, 512, W), st],
                OutOfRange {
                    sector: u64::MAX,
                    count: 1,
                },
            ),
            (VIRTIO_BLK_T_DISCARD, 0, vec![hdr, st], BadRanges(0)),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![hdr, (DATA, 15, R), st],
                BadRanges(15),
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                vec![hdr, (DATA, 33 * 16, R), st],
                BadRanges(528),
            ),
        ];
        for (request_type, sector, descs, want) in cases {
            header(&mem, request_type, sector);
            assert_eq!(parse(&descs, &mem).unwrap_err(), want, "{descs:x?}");
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        use RequestError::*;
        let mem = mem();
        let descs = [(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let cases = [
            (VIRTIO_BLK_T_DISCARD, 0, 1, unmap, UnsupportedFlags(unmap)),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2, UnsupportedFlags(2)),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                MAX_RANGE_SECTORS + 1,
                0,
                RangeTooLong(MAX_RANGE_SECTORS + 1),
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                CAPACITY - 1,
                2,
                0,
                OutOfRange {
                    sector: CAPACITY - 1,
                    count: 2,
                },
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                u64::MAX,
                1,
                0,
                OutOfRange {
                    sector: u64::MAX,
                    count: 1,
                },
            ),
        ];
        for (request_type, sector, count, flags, want) in cases {
            header(&mem, request_type, 0);
            range(&mem, DATA, sector, count, flags);
            assert_eq!(parse(&descs, &mem).unwrap_err(), want);
        }
    }
}
