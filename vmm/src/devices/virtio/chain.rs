//! Validated views of guest descriptor chains, shared by the devices.
//!
//! [`walk`] turns a chain popped from a queue into a bounded list of descriptors, each non-empty
//! and inside guest memory, with loops and truncated chains rejected. [`GuestBufs`] then treats a
//! run of descriptors as one byte stream, so headers and payloads may be split across
//! descriptors any way the driver likes (virtio 1.x "any layout").

use std::ops::{Deref, Range};

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, Permissions};

use super::GuestMemory;

/// Why a descriptor chain was rejected, or a guest buffer could not be accessed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is empty or its head descriptor is unreadable")]
    Empty,
    #[error("descriptor {position} of the chain has zero length")]
    ZeroLength { position: usize },
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("descriptor chain loops back to descriptor {0}")]
    Loop(u16),
    #[error("descriptor chain is longer than {max} descriptors")]
    TooLong { max: usize },
    #[error("descriptor chain is truncated (invalid next index or unreadable descriptor)")]
    Truncated,
    #[error("guest memory access at {addr:#x} failed: {reason}")]
    Memory { addr: u64, reason: String },
}

/// One validated descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// Walks `chain` into at most `max` descriptors, each non-empty and entirely inside guest memory
/// (writable memory for device-writable descriptors). The result is never empty.
pub fn walk<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    max: usize,
) -> Result<Vec<Desc>, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut visited = vec![chain.head_index()];
    // Small, and bounded by `max`, never by anything the guest controls.
    let mut descs = Vec::with_capacity(max.min(4));
    for desc in chain {
        if descs.len() == max {
            return Err(ChainError::TooLong { max });
        }
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength {
                position: descs.len(),
            });
        }
        let writable = desc.is_write_only();
        let perm = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, perm) {
            return Err(ChainError::OutOfRange {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        descs.push(Desc {
            addr: desc.addr(),
            len: desc.len(),
            writable,
        });
        if !desc.has_next() {
            return Ok(descs);
        }
        // virtio-queue bounds the walk by the queue size; we also reject revisits outright.
        if visited.contains(&desc.next()) {
            return Err(ChainError::Loop(desc.next()));
        }
        visited.push(desc.next());
    }
    Err(if descs.is_empty() {
        ChainError::Empty
    } else {
        ChainError::Truncated
    })
}

/// A sequence of guest buffers (already validated by [`walk`]) seen as one byte stream.
#[derive(Debug, Default)]
pub struct GuestBufs {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl GuestBufs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, d: &Desc) {
        self.segs.push((d.addr, d.len));
        self.total += u64::from(d.len);
    }

    /// Total length in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Guest address of byte `offset` of the stream, if it is inside.
    pub fn addr_of(&self, offset: u64) -> Option<GuestAddress> {
        let mut start = 0u64;
        for &(addr, len) in &self.segs {
            let end = start + u64::from(len);
            if offset < end {
                return Some(addr.unchecked_add(offset - start));
            }
            start = end;
        }
        None
    }

    /// Calls `f(guest_addr, range)` for each contiguous guest piece of `[offset, offset+len)`,
    /// where `range` is the position of the piece within that interval. The caller keeps within
    /// `total()`.
    pub fn for_each_piece<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, Range<usize>) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = offset.saturating_add(len).min(self.total);
        let mut seg_start = 0u64;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            let seg_end = seg_start + u64::from(seg_len);
            let from = offset.max(seg_start);
            let to = end.min(seg_end);
            if from < to {
                // A piece is at most one descriptor, so it fits in usize.
                let n = (to - from) as usize;
                f(addr.unchecked_add(from - seg_start), done..done + n)?;
                done += n;
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the stream. The caller keeps within `total()`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let len = buf.len() as u64;
        self.for_each_piece(offset, len, |addr, r| {
            mem.read_slice(&mut buf[r], addr)
                .map_err(|e| mem_err(addr, e))
        })
    }

    /// Writes `buf` at `offset` of the stream. The caller keeps within `total()`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), ChainError> {
        self.for_each_piece(offset, buf.len() as u64, |addr, r| {
            mem.write_slice(&buf[r], addr).map_err(|e| mem_err(addr, e))
        })
    }
}

pub fn mem_err(addr: GuestAddress, e: impl std::fmt::Display) -> ChainError {
    ChainError::Memory {
        addr: addr.0,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue, VRING_DESC_F_NEXT};
    use virtio_queue::QueueT;

    #[test]
    fn walk_validates_and_bufs_span_descriptors() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = gq.device_queue();
        gq.add_chain(&[(0x8000, 3, false), (0x9000, 5, true)]);
        let descs = walk(q.pop_descriptor_chain(&mem).unwrap(), &mem, 4).unwrap();
        assert_eq!(
            descs,
            [
                Desc {
                    addr: GuestAddress(0x8000),
                    len: 3,
                    writable: false
                },
                Desc {
                    addr: GuestAddress(0x9000),
                    len: 5,
                    writable: true
                }
            ]
        );
        let mut bufs = GuestBufs::new();
        descs.iter().for_each(|d| bufs.push(d));
        assert_eq!(bufs.total(), 8);
        bufs.write_at(&mem, 1, b"abcde").unwrap();
        let mut out = [0u8; 5];
        bufs.read_at(&mem, 1, &mut out).unwrap();
        assert_eq!(&out, b"abcde");
        let mut tail = [0u8; 3];
        mem.read_slice(&mut tail, GuestAddress(0x9000)).unwrap();
        assert_eq!(&tail, b"cde");
        assert_eq!(bufs.addr_of(2), Some(GuestAddress(0x8002)));
        assert_eq!(bufs.addr_of(7), Some(GuestAddress(0x9004)));
        assert_eq!(bufs.addr_of(8), None);

        gq.add_chain(&[(0x8000, 1, false), (0x8000, 1, false), (0x8000, 1, false)]);
        assert_eq!(
            walk(q.pop_descriptor_chain(&mem).unwrap(), &mem, 2).unwrap_err(),
            ChainError::TooLong { max: 2 }
        );
        gq.add_chain(&[(0x8000, 1, false), (0x8000, 0, true)]);
        assert_eq!(
            walk(q.pop_descriptor_chain(&mem).unwrap(), &mem, 4).unwrap_err(),
            ChainError::ZeroLength { position: 1 }
        );
        // A descriptor that straddles the end of guest memory.
        gq.add_chain(&[(0xf_fff0, 0x20, true)]);
        assert_eq!(
            walk(q.pop_descriptor_chain(&mem).unwrap(), &mem, 4).unwrap_err(),
            ChainError::OutOfRange {
                addr: 0xf_fff0,
                len: 0x20
            }
        );
        gq.set_desc(13, 0x8000, 4, VRING_DESC_F_NEXT, 13);
        gq.publish(13);
        assert_eq!(
            walk(q.pop_descriptor_chain(&mem).unwrap(), &mem, 4).unwrap_err(),
            ChainError::Loop(13)
        );
    }
}
