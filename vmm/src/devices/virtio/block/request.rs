//! virtio-blk requests: chain layout checks and their execution against the backing file.
//!
//! A request is a byte stream: device-readable bytes (the 16-byte header, then the data of an
//! OUT request), then device-writable bytes (the data of an IN or GET_ID request, then one status
//! byte, the very last byte of the chain). Descriptor boundaries are irrelevant. Data moves
//! directly between the file and guest memory (`pread`/`pwrite` on volatile slices), so no buffer
//! is ever sized by a guest-provided length.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::super::chain::{ChainError, Desc, GuestBufs};
use super::super::GuestMemory;

/// Sector size of the virtio-blk protocol (independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_outhdr` (type, reserved, sector).
pub const HDR_LEN: u64 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Largest data transfer we accept in one request. Linux issues at most `max_sectors_kb`
/// (1280 KiB by default) per request; the bound only keeps lengths far from overflow.
pub const MAX_DATA_LEN: u64 = 128 << 20;

/// A chain we cannot answer: no status byte we could trust. It is returned with used length 0.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
}

/// Why a request failed (status `IOERR` or `UNSUPP`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("chain holds {0} device-readable bytes, less than the 16-byte header")]
    ShortHeader(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("request type {req} carries {len} unexpected device-readable data bytes")]
    UnexpectedReadable { req: u32, len: u64 },
    #[error("request type {req} carries {len} unexpected device-writable data bytes")]
    UnexpectedWritable { req: u32, len: u64 },
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("data length {0} exceeds the maximum of {MAX_DATA_LEN}")]
    TooLarge(u64),
    #[error("GET_ID without a data buffer")]
    NoIdBuffer,
    #[error("sector {sector} + {len} bytes is beyond the end of the disk ({capacity} sectors)")]
    OutOfBounds {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("I/O error: {0}")]
    Io(String),
}

impl RequestError {
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The two halves of a request chain.
#[derive(Debug)]
pub struct RequestChain {
    readable: GuestBufs,
    /// Data (if any) followed by the status byte; never empty.
    writable: GuestBufs,
}

impl RequestChain {
    /// Checks the layout: all readable descriptors before all writable ones, and at least one
    /// writable byte for the status.
    pub fn new(descs: &[Desc]) -> Result<Self, Malformed> {
        let mut readable = GuestBufs::new();
        let mut writable = GuestBufs::new();
        for d in descs {
            if d.writable {
                writable.push(d);
            } else if writable.total() > 0 {
                return Err(Malformed::ReadableAfterWritable);
            } else {
                readable.push(d);
            }
        }
        if writable.total() == 0 {
            return Err(Malformed::NoStatus);
        }
        Ok(Self { readable, writable })
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.writable.addr_of(self.writable.total() - 1)
    }

    /// Device-writable data bytes (excluding the status byte).
    fn in_len(&self) -> u64 {
        self.writable.total() - 1
    }

    /// Device-readable data bytes (excluding the header).
    fn out_len(&self) -> u64 {
        self.readable.total().saturating_sub(HDR_LEN)
    }
}

/// The backing file and what the guest may do with it.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; ID_LEN],
}

/// What a request did, by type (for statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
}

/// A successful request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub kind: Kind,
    /// Bytes moved between the disk and the guest.
    pub bytes: u64,
    /// Data bytes written to guest memory (for the used length; excludes the status byte).
    pub to_guest: u32,
}

impl Disk {
    /// Executes the request. The caller writes the status byte.
    pub fn execute(&self, mem: &GuestMemory, rc: &RequestChain) -> Result<Done, RequestError> {
        if rc.readable.total() < HDR_LEN {
            return Err(RequestError::ShortHeader(rc.readable.total()));
        }
        let mut hdr = [0u8; HDR_LEN as usize];
        rc.readable
            .read_at(mem, 0, &mut hdr)
            .map_err(|e| RequestError::Io(e.to_string()))?;
        let req = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        let (in_len, out_len) = (rc.in_len(), rc.out_len());
        let no_readable = || match out_len {
            0 => Ok(()),
            len => Err(RequestError::UnexpectedReadable { req, len }),
        };
        let no_writable = || match in_len {
            0 => Ok(()),
            len => Err(RequestError::UnexpectedWritable { req, len }),
        };
        match req {
            VIRTIO_BLK_T_IN => {
                no_readable()?;
                let offset = self.check_range(sector, in_len)?;
                rc.writable
                    .for_each_piece(0, in_len, |addr, r| {
                        let mut src = FileAt::new(&self.file, offset + r.start as u64);
                        mem.read_exact_volatile_from(addr, &mut src, r.len())
                    })
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(Done {
                    kind: Kind::Read,
                    bytes: in_len,
                    // check_range bounds in_len by MAX_DATA_LEN.
                    to_guest: in_len as u32,
                })
            }
            VIRTIO_BLK_T_OUT => {
                no_writable()?;
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(sector, out_len)?;
                rc.readable
                    .for_each_piece(HDR_LEN, out_len, |addr, r| {
                        let mut dst = FileAt::new(&self.file, offset + r.start as u64);
                        mem.write_all_volatile_to(addr, &mut dst, r.len())
                    })
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(Done {
                    kind: Kind::Write,
                    bytes: out_len,
                    to_guest: 0,
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                no_readable()?;
                no_writable()?;
                self.file
                    .sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(Done {
                    kind: Kind::Flush,
                    bytes: 0,
                    to_guest: 0,
                })
            }
            VIRTIO_BLK_T_GET_ID => {
                no_readable()?;
                if in_len == 0 {
                    return Err(RequestError::NoIdBuffer);
                }
                // The ID is NUL-padded; a shorter buffer gets a prefix (as the spec allows).
                let n = in_len.min(ID_LEN as u64) as usize;
                rc.writable
                    .write_at(mem, 0, &self.id[..n])
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(Done {
                    kind: Kind::GetId,
                    bytes: n as u64,
                    to_guest: n as u32,
                })
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Validates a transfer of `len` bytes at `sector`; returns its byte offset in the file.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Unaligned(len));
        }
        if len > MAX_DATA_LEN {
            return Err(RequestError::TooLarge(len));
        }
        let oob = || RequestError::OutOfBounds {
            sector,
            len,
            capacity: self.capacity,
        };
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .filter(|&end| end <= self.capacity)
            .ok_or_else(oob)?;
        debug_assert!(end <= self.capacity);
        // capacity * 512 is the file size, so this cannot overflow.
        Ok(sector * SECTOR_SIZE)
    }
}

pub fn status_ok() -> u8 {
    VIRTIO_BLK_S_OK as u8
}

/// Positional I/O on a file for vm-memory's volatile copies: `pread`/`pwrite` at `offset`,
/// advancing it, so the file's own cursor is never used.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn off(&self) -> Result<libc::off64_t, VolatileMemoryError> {
        libc::off64_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Fills `buf` unless the file ends first (so a short count means EOF, never a hole).
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let mut done = 0usize;
        while done < buf.len() {
            let off = self.off()?;
            // SAFETY: the fd is valid for the lifetime of `self.file`; `guard` points at
            // `buf.len()` bytes of guest memory that stay mapped while the guard lives (the
            // `VolatileSlice` invariant), and we write at most `buf.len() - done` bytes starting
            // `done` bytes in. The kernel writes guest memory; no Rust reference aliases it.
            let n = unsafe {
                libc::pread64(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    buf.len() - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                buf.bitmap().mark_dirty(0, buf.len());
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let off = self.off()?;
        // SAFETY: the fd is valid for the lifetime of `self.file`; `guard` points at `buf.len()`
        // readable bytes of guest memory that stay mapped while the guard lives.
        let n =
            unsafe { libc::pwrite64(self.file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        self.offset += n as u64;
        Ok(n as usize)
    }
}

/// Writes the status byte; `false` if guest memory rejected it.
pub fn write_status(mem: &GuestMemory, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}
