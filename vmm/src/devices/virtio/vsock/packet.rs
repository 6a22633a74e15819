//! Vsock packets: the 44-byte header and validated views of guest descriptor chains.
//!
//! Every chain the guest hands us is checked before we touch it: bounded length, no loops, no
//! zero-length or out-of-memory descriptors, the right direction for the queue, room for the
//! header, and a `len` field that fits both the chain and our fixed maximum. Headers and payloads
//! may be split across descriptors arbitrarily.

use std::ops::Deref;

use virtio_queue::DescriptorChain;

use super::super::chain::{self, ChainError, GuestBufs};
use super::super::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload we send or accept in one packet (Linux uses 64 KiB buffers).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Longest descriptor chain we accept. Linux uses 1 or 2 descriptors per packet.
pub const MAX_CHAIN_DESCS: usize = 16;
/// Well-known CID of the host.
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flag: the sender will not receive any more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// OP_SHUTDOWN flag: the sender will not send any more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Why a descriptor chain or packet was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain is empty or its head descriptor is unreadable")]
    EmptyChain,
    #[error("descriptor {position} of the chain has zero length")]
    ZeroLength { position: usize },
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("descriptor chain loops back to descriptor {0}")]
    Loop(u16),
    #[error("descriptor chain is longer than {MAX_CHAIN_DESCS} descriptors")]
    TooLong,
    #[error("descriptor chain is truncated (invalid next index or unreadable descriptor)")]
    Truncated,
    #[error("device-writable descriptor in a tx (driver-to-device) chain")]
    UnexpectedWritable,
    #[error("device-readable descriptor in an rx (device-to-driver) chain")]
    UnexpectedReadable,
    #[error("chain holds {0} bytes, less than the {HDR_LEN}-byte header")]
    ShortHeader(u64),
    #[error("header len {len} exceeds the {room} payload bytes in the chain")]
    LenExceedsBuffer { len: u32, room: u64 },
    #[error("header len {0} exceeds the maximum payload of {MAX_PAYLOAD} bytes")]
    LenTooLarge(u32),
    #[error("unsupported socket type {0}")]
    BadType(u16),
    #[error("unknown op {0}")]
    BadOp(u16),
    #[error("src_cid {got} is not the guest's cid {expected}")]
    BadSrcCid { got: u64, expected: u64 },
    #[error("dst_cid {0} is not the host cid {HOST_CID}")]
    BadDstCid(u64),
    #[error("control op {op} carries {len} payload bytes")]
    PayloadOnControl { op: u16, len: u32 },
    #[error("guest memory access at {addr:#x} failed: {reason}")]
    Memory { addr: u64, reason: String },
}

impl From<ChainError> for PacketError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Empty => Self::EmptyChain,
            ChainError::ZeroLength { position } => Self::ZeroLength { position },
            ChainError::OutOfRange { addr, len } => Self::OutOfRange { addr, len },
            ChainError::Loop(i) => Self::Loop(i),
            ChainError::TooLong { .. } => Self::TooLong,
            ChainError::Truncated => Self::Truncated,
            ChainError::Memory { addr, reason } => Self::Memory { addr, reason },
        }
    }
}

/// `struct virtio_vsock_hdr`, host-endian. Serialized little endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
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

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// The validated buffers of one descriptor chain, all of one direction.
#[derive(Debug)]
pub struct Segments {
    bufs: GuestBufs,
}

impl Segments {
    /// Walks `chain`, requiring every descriptor to be device-writable (`writable`) or
    /// device-readable, non-empty and inside guest memory.
    pub fn from_chain<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemory,
        writable: bool,
    ) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let descs = chain::walk(chain, mem, MAX_CHAIN_DESCS)?;
        let mut bufs = GuestBufs::new();
        for d in &descs {
            if d.writable != writable {
                return Err(if writable {
                    PacketError::UnexpectedReadable
                } else {
                    PacketError::UnexpectedWritable
                });
            }
            bufs.push(d);
        }
        Ok(Self { bufs })
    }

    pub fn total(&self) -> u64 {
        self.bufs.total()
    }

    /// Reads `buf.len()` bytes at `offset` of the chain. The caller keeps within `total()`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), PacketError> {
        Ok(self.bufs.read_at(mem, offset, buf)?)
    }

    /// Writes `buf` at `offset` of the chain. The caller keeps within `total()`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), PacketError> {
        Ok(self.bufs.write_at(mem, offset, buf)?)
    }
}

/// A packet the guest sent on the tx queue, header validated.
#[derive(Debug)]
pub struct TxPacket {
    pub hdr: Header,
    segs: Segments,
}

impl TxPacket {
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemory,
        guest_cid: u64,
    ) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let segs = Segments::from_chain(chain, mem, false)?;
        if segs.total() < HDR_LEN as u64 {
            return Err(PacketError::ShortHeader(segs.total()));
        }
        let mut raw = [0u8; HDR_LEN];
        segs.read_at(mem, 0, &mut raw)?;
        let hdr = Header::from_bytes(&raw);
        if hdr.len > MAX_PAYLOAD {
            return Err(PacketError::LenTooLarge(hdr.len));
        }
        let room = segs.total() - HDR_LEN as u64;
        if u64::from(hdr.len) > room {
            return Err(PacketError::LenExceedsBuffer { len: hdr.len, room });
        }
        if hdr.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid {
                got: hdr.src_cid,
                expected: guest_cid,
            });
        }
        if hdr.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(hdr.dst_cid));
        }
        if hdr.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(hdr.type_));
        }
        match hdr.op {
            OP_RW => {}
            OP_REQUEST | OP_RESPONSE | OP_RST | OP_SHUTDOWN | OP_CREDIT_UPDATE
            | OP_CREDIT_REQUEST => {
                if hdr.len != 0 {
                    return Err(PacketError::PayloadOnControl {
                        op: hdr.op,
                        len: hdr.len,
                    });
                }
            }
            op => return Err(PacketError::BadOp(op)),
        }
        Ok(Self { hdr, segs })
    }

    /// Copies the payload (`hdr.len` bytes, at most [`MAX_PAYLOAD`]) into `buf`, which must be
    /// at least that long.
    pub fn read_payload(&self, mem: &GuestMemory, buf: &mut [u8]) -> Result<usize, PacketError> {
        let len = self.hdr.len as usize;
        let dst = buf
            .get_mut(..len)
            .ok_or(PacketError::LenTooLarge(self.hdr.len))?;
        self.segs.read_at(mem, HDR_LEN as u64, dst)?;
        Ok(len)
    }
}

/// An empty buffer the guest posted on the rx queue.
#[derive(Debug)]
pub struct RxBuffer {
    segs: Segments,
}

impl RxBuffer {
    pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemory) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let segs = Segments::from_chain(chain, mem, true)?;
        if segs.total() < HDR_LEN as u64 {
            return Err(PacketError::ShortHeader(segs.total()));
        }
        Ok(Self { segs })
    }

    /// Payload bytes that fit after the header, capped at [`MAX_PAYLOAD`].
    pub fn room(&self) -> usize {
        (self.segs.total() - HDR_LEN as u64).min(u64::from(MAX_PAYLOAD)) as usize
    }

    /// Writes the header (with `len` set to the payload length) and payload; returns the number of
    /// bytes written for the used ring.
    pub fn write(
        &self,
        mem: &GuestMemory,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.room())];
        let hdr = Header {
            len: payload.len() as u32,
            ..*hdr
        };
        self.segs.write_at(mem, 0, &hdr.to_bytes())?;
        self.segs.write_at(mem, HDR_LEN as u64, payload)?;
        Ok((HDR_LEN + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        test_memory, GuestQueue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    const CID: u64 = 3;

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 2000,
            len,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    fn parse_tx(mem: &GuestMemory, q: &mut virtio_queue::Queue) -> Result<TxPacket, PacketError> {
        let chain = q.pop_descriptor_chain(mem).expect("chain available");
        TxPacket::parse(chain, mem, CID)
    }

    #[test]
    fn header_roundtrip() {
        let h = Header {
            src_cid: 1,
            dst_cid: 2,
            src_port: 3,
            dst_port: 4,
            len: 5,
            type_: 6,
            op: 7,
            flags: 8,
            buf_alloc: 9,
            fwd_cnt: 10,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn tx_header_and_payload_split_any_way() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = gq.device_queue();
        let mut bytes = hdr(OP_RW, 10).to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        // Same descriptor, header split 20/24 + payload, and header+payload split across three.
        let layouts: [&[usize]; 3] = [&[54], &[20, 24, 10], &[30, 20, 4]];
        for layout in layouts {
            let mut bufs = vec![];
            let mut off = 0;
            for (i, &n) in layout.iter().enumerate() {
                let addr = 0x8000 + 0x100 * i as u64;
                mem.write_slice(&bytes[off..off + n], GuestAddress(addr))
                    .unwrap();
                bufs.push((addr, n as u32, false));
                off += n;
            }
            gq.add_chain(&bufs);
            let pkt = parse_tx(&mem, &mut q).unwrap();
            assert_eq!(pkt.hdr, hdr(OP_RW, 10));
            let mut buf = [0u8; 16];
            assert_eq!(pkt.read_payload(&mem, &mut buf).unwrap(), 10);
            assert_eq!(&buf[..10], b"0123456789");
        }
    }

    #[test]
    fn tx_rejects_malformed_chains() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = gq.device_queue();
        mem.write_slice(&hdr(OP_RW, 4).to_bytes(), GuestAddress(0x8000))
            .unwrap();

        gq.add_chain(&[(0x8000, 0, false)]);
        assert_eq!(
            parse_tx(&mem, &mut q).unwrap_err(),
            PacketError::ZeroLength { position: 0 }
        );
        gq.add_chain(&[(0xfff_0000, 48, false)]);
        assert!(matches!(
            parse_tx(&mem, &mut q).unwrap_err(),
            PacketError::OutOfRange { .. }
        ));
        gq.add_chain(&[(0x8000, 48, true)]);
        assert_eq!(
            parse_tx(&mem, &mut q).unwrap_err(),
            PacketError::UnexpectedWritable
        );
        gq.add_chain(&[(0x8000, 43, false)]);
        assert_eq!(
            parse_tx(&mem, &mut q).unwrap_err(),
            PacketError::ShortHeader(43)
        );
        gq.add_chain(&[(0x8000, 44, false), (0x9000, 3, false)]);
        assert_eq!(
            parse_tx(&mem, &mut q).unwrap_err(),
            PacketError::LenExceedsBuffer { len: 4, room: 3 }
        );
        // Loop: 10 -> 11 -> 10.
        gq.set_desc(10, 0x8000, 44, VRING_DESC_F_NEXT, 11);
        gq.set_desc(11, 0x9000, 4, VRING_DESC_F_NEXT, 10);
        gq.publish(10);
        assert_eq!(parse_tx(&mem, &mut q).unwrap_err(), PacketError::Loop(10));
        // Next index beyond the queue size.
        gq.set_desc(12, 0x8000, 44, VRING_DESC_F_NEXT, 999);
        gq.publish(12);
        assert_eq!(parse_tx(&mem, &mut q).unwrap_err(), PacketError::Truncated);
        // Head index beyond the queue size.
        gq.publish(500);
        assert_eq!(parse_tx(&mem, &mut q).unwrap_err(), PacketError::EmptyChain);

        for (h, err) in [
            (
                hdr(OP_RW, MAX_PAYLOAD + 1),
                PacketError::LenTooLarge(MAX_PAYLOAD + 1),
            ),
            (
                Header {
                    src_cid: 9,
                    ..hdr(OP_RW, 0)
                },
                PacketError::BadSrcCid {
                    got: 9,
                    expected: CID,
                },
            ),
            (
                Header {
                    dst_cid: 1,
                    ..hdr(OP_RW, 0)
                },
                PacketError::BadDstCid(1),
            ),
            (
                Header {
                    type_: 2,
                    ..hdr(OP_RW, 0)
                },
                PacketError::BadType(2),
            ),
            (hdr(0, 0), PacketError::BadOp(0)),
            (hdr(8, 0), PacketError::BadOp(8)),
            (
                hdr(OP_REQUEST, 4),
                PacketError::PayloadOnControl {
                    op: OP_REQUEST,
                    len: 4,
                },
            ),
        ] {
            mem.write_slice(&h.to_bytes(), GuestAddress(0x8000))
                .unwrap();
            gq.add_chain(&[(0x8000, 44, false), (0x9000, 4, false)]);
            assert_eq!(parse_tx(&mem, &mut q).unwrap_err(), err);
        }
    }

    #[test]
    fn tx_rejects_overlong_chain() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, GuestAddress(0x1000), 64);
        let mut q = gq.device_queue();
        let bufs: Vec<_> = (0..MAX_CHAIN_DESCS as u64 + 1)
            .map(|i| (0x8000 + i * 0x100, 44, false))
            .collect();
        gq.add_chain(&bufs);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            TxPacket::parse(chain, &mem, CID).unwrap_err(),
            PacketError::TooLong
        );
    }

    #[test]
    fn rx_buffer_writes_across_descriptors() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = gq.device_queue();
        gq.add_chain(&[(0x8000, 30, true), (0x9000, 20, true), (0xa000, 100, true)]);
        let rx = RxBuffer::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap();
        assert_eq!(rx.room(), 150 - 44);
        let h = hdr(OP_RW, 0);
        let n = rx.write(&mem, &h, b"hello world").unwrap();
        assert_eq!(n, 44 + 11);
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw[..30], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut raw[30..], GuestAddress(0x9000))
            .unwrap();
        assert_eq!(Header::from_bytes(&raw), Header { len: 11, ..h });
        let mut p = [0u8; 11];
        mem.read_slice(&mut p[..6], GuestAddress(0x9000 + 14))
            .unwrap();
        mem.read_slice(&mut p[6..], GuestAddress(0xa000)).unwrap();
        assert_eq!(&p, b"hello world");

        // Wrong direction and too short.
        gq.add_chain(&[(0x8000, 100, false)]);
        assert_eq!(
            RxBuffer::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap_err(),
            PacketError::UnexpectedReadable
        );
        gq.set_desc(9, 0x8000, 40, VRING_DESC_F_WRITE, 0);
        gq.publish(9);
        assert_eq!(
            RxBuffer::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap_err(),
            PacketError::ShortHeader(40)
        );
    }
}
