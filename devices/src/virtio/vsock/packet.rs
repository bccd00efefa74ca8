//! `struct virtio_vsock_hdr` and the chains that carry it: the transmit queue's chains are
//! parsed (and their payload copied out) with the `virtio-vsock` crate, which checks the
//! header's `len` against the descriptors; the receive queue's chains are filled from a
//! [`Header`] and a payload.

use std::num::Wrapping;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap, VolatileMemoryError};

/// Length of the packet header.
pub const HDR_LEN: usize = PKT_HEADER_SIZE;
/// The host's CID, the only peer the guest can reach.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload of one packet either way (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Why a packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's shape or the header's `len` does not match the descriptors.
    #[error("malformed packet chain")]
    Chain(#[source] virtio_vsock::packet::Error),
    /// Copying to or from validated guest buffers failed.
    #[error("cannot access the packet in guest memory")]
    Memory(#[source] VolatileMemoryError),
    /// A socket type other than STREAM.
    #[error("unsupported socket type {0}")]
    Type(u16),
    /// An operation code the protocol does not have.
    #[error("unknown operation {0}")]
    Op(u16),
}

/// `VIRTIO_VSOCK_OP_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connect.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or torn down.
    Rst = 3,
    /// Half or full close, per the SHUTDOWN_* flags.
    Shutdown = 4,
    /// Payload.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = PacketError;

    fn try_from(op: u16) -> Result<Self, PacketError> {
        Ok(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return Err(PacketError::Op(op)),
        })
    }
}

/// A packet header as it is on the wire (type and op unchecked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation code.
    pub op: u16,
    /// SHUTDOWN_* flags.
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// A STREAM header from `(src_cid, src_port)` to `(dst_cid, dst_port)` without payload.
    pub fn new(op: Op, src: (u64, u32), dst: (u64, u32)) -> Self {
        Self {
            src_cid: src.0,
            src_port: src.1,
            dst_cid: dst.0,
            dst_port: dst.1,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Self::default()
        }
    }

    /// The RST that refuses this packet: same ports, reversed.
    pub fn rst_reply(&self) -> Self {
        Self::new(
            Op::Rst,
            (self.dst_cid, self.dst_port),
            (self.src_cid, self.src_port),
        )
    }

    /// The operation, if the socket type is STREAM and the code is known.
    pub fn checked_op(&self) -> Result<Op, PacketError> {
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        Op::try_from(self.op)
    }

    /// Sets the credit fields.
    pub fn with_credit(mut self, buf_alloc: u32, fwd_cnt: Wrapping<u32>) -> Self {
        self.buf_alloc = buf_alloc;
        self.fwd_cnt = fwd_cnt.0;
        self
    }

    /// Sets the SHUTDOWN_* flags.
    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// The little-endian wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn of(pkt: &VsockPacket<'_, ()>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }
}

/// Reads the packet of one transmit chain: returns its header and leaves its payload (header
/// `len` bytes, at most [`MAX_PKT_DATA`]) in `data`. The header is read once, so the guest
/// cannot change it between check and use.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<&GuestMemoryMmap>,
    data: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    let pkt =
        VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Chain)?;
    let hdr = Header::of(&pkt);
    data.clear();
    if let Some(slice) = pkt.data_slice() {
        data.resize(slice.len(), 0);
        slice.read_slice(data, 0).map_err(PacketError::Memory)?;
    }
    Ok(hdr)
}

/// A receive chain: room for a header and up to `room()` payload bytes.
pub struct RxChain<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxChain<'a> {
    /// Validates a receive chain (device-writable, header-sized head, payload within
    /// [`MAX_PKT_DATA`]).
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: &mut DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
            .map_err(PacketError::Chain)?;
        Ok(Self { pkt })
    }

    /// Payload bytes the chain can take.
    pub fn room(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |s| s.len().min(MAX_PKT_DATA as usize))
    }

    /// Writes the header (with `len` set to the payload's length) and the payload, which must
    /// fit in [`Self::room`]; returns the bytes written.
    pub fn fill(&mut self, mut hdr: Header, data: &[u8]) -> Result<u32, PacketError> {
        // At most MAX_PKT_DATA.
        hdr.len = data.len() as u32;
        if let Some(slice) = self.pkt.data_slice().filter(|_| !data.is_empty()) {
            slice.write_slice(data, 0).map_err(PacketError::Memory)?;
        }
        self.pkt
            .set_header_from_raw(&hdr.to_bytes())
            .map_err(PacketError::Chain)?;
        Ok((HDR_LEN + data.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::block::test_utils::{mem, MEM_SIZE, R, W};
    use crate::virtio::console::test_utils::{guest, BUF};
    use crate::virtio::net::test_utils::Driver;

    fn hdr(len: u32) -> Header {
        let mut h = Header::new(Op::Rw, (3, 1000), (HOST_CID, 52)).with_credit(4096, Wrapping(7));
        h.len = len;
        h
    }

    fn tx(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Result<Header, PacketError> {
        let mut driver = Driver::new(mem, 0);
        driver.post(descs);
        let mut queue = driver.queue();
        let mut chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, mem).unwrap();
        read_tx(mem, &mut chain, &mut Vec::new())
    }

    #[test]
    fn header_round_trips_and_checks_op_and_type() {
        let h = hdr(5).with_flags(SHUTDOWN_SEND);
        let b = h.to_bytes();
        assert_eq!(&b[..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(h.checked_op().unwrap(), Op::Rw);
        let rst = h.rst_reply();
        assert_eq!((rst.src_cid, rst.src_port), (HOST_CID, 52));
        assert_eq!((rst.dst_cid, rst.dst_port), (3, 1000));
        assert_eq!(rst.checked_op().unwrap(), Op::Rst);
        let bad_op = Header { op: 8, ..h };
        assert!(matches!(bad_op.checked_op(), Err(PacketError::Op(8))));
        let bad_type = Header { type_: 2, ..h };
        assert!(matches!(bad_type.checked_op(), Err(PacketError::Type(2))));
    }

    #[test]
    fn transmit_chains_are_read_whole_or_refused() {
        let mem = mem();
        let h = hdr(5);
        mem.write_slice(&h.to_bytes(), GuestAddress(BUF)).unwrap();
        mem.write_slice(b"hello", GuestAddress(BUF + 0x100))
            .unwrap();
        let mut data = Vec::new();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, HDR_LEN as u32, R), (BUF + 0x100, 5, R)]);
        let mut queue = driver.queue();
        let mut chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &mem).unwrap();
        assert_eq!(read_tx(&mem, &mut chain, &mut data).unwrap(), h);
        assert_eq!(data, b"hello");

        // Header and payload in one descriptor (Linux 6.2+).
        mem.write_slice(b"hello", GuestAddress(BUF + HDR_LEN as u64))
            .unwrap();
        assert_eq!(tx(&mem, &[(BUF, HDR_LEN as u32 + 5, R)]).unwrap(), h);

        let cases: [&[(u64, u32, u16)]; 4] = [
            &[(BUF, HDR_LEN as u32 - 1, R)],
            &[(BUF, HDR_LEN as u32, W)],
            // `len` beyond the payload descriptor.
            &[(BUF, HDR_LEN as u32, R), (BUF + 0x100, 4, R)],
            &[(BUF, HDR_LEN as u32, R), (MEM_SIZE as u64 - 2, 5, R)],
        ];
        for descs in cases {
            assert!(
                matches!(tx(&mem, descs), Err(PacketError::Chain(_))),
                "{descs:x?}"
            );
        }
        let absurd = hdr(MAX_PKT_DATA + 1);
        mem.write_slice(&absurd.to_bytes(), GuestAddress(BUF))
            .unwrap();
        let err = tx(
            &mem,
            &[(BUF, HDR_LEN as u32, R), (BUF + 0x100, u32::MAX, R)],
        );
        assert!(matches!(err, Err(PacketError::Chain(_))));
    }

    #[test]
    fn receive_chains_are_filled() {
        let mem = mem();
        let mut driver = Driver::new(&mem, 0);
        driver.post(&[(BUF, HDR_LEN as u32 + 16, W)]);
        driver.post(&[(BUF + 0x100, 10, R)]);
        let mut queue = driver.queue();
        let mut chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &mem).unwrap();
        let mut rx = RxChain::new(&mem, &mut chain).unwrap();
        assert_eq!(rx.room(), 16);
        assert_eq!(rx.fill(hdr(0), b"abc").unwrap(), HDR_LEN as u32 + 3);
        let mut want = hdr(3).to_bytes().to_vec();
        want.extend(b"abc");
        assert_eq!(guest(&mem, BUF, HDR_LEN + 3), want);
        let mut chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &mem).unwrap();
        assert!(RxChain::new(&mem, &mut chain).is_err());
    }
}
