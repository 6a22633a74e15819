//! Shared harness for the fuzz targets: turns fuzz input into guest memory holding a split
//! virtqueue (raw descriptors, available ring, payload bytes), the way a hostile driver would.
//!
//! Input layout (missing bytes read as zero, so every input is usable):
//!
//! ```text
//! [knobs: 4 bytes, target-specific]
//! [n_desc: u8, clamped to QSIZE] [avail_idx: u8]
//! [n_desc raw descriptors: addr u64 LE, len u32 LE, flags u16 LE, next u16 LE]
//! [min(avail_idx, QSIZE) available-ring entries: u16 LE]
//! [payload: the rest, copied to guest address PAYLOAD]
//! ```
//!
//! `avail_idx` may exceed the queue size, which exercises the invalid-ring-index path.
//! Guest memory is two regions with a hole between them, so descriptors can straddle it.

use husk_vmm::devices::virtio::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Queue size of every fuzzed queue.
pub const QSIZE: u16 = 16;
/// Where the payload bytes of the input land in guest memory.
pub const PAYLOAD: u64 = 0x1000;
/// First region: rings and payload.
pub const REGION0: (u64, usize) = (0, 0x1_0000);
/// Second region, after a hole: buffers the harness itself posts (e.g. vsock rx).
pub const REGION1: (u64, usize) = (0x2_0000, 0x1_0000);

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// Parsed fuzz input.
pub struct Input<'a> {
    pub knobs: [u8; 4],
    pub descs: Vec<[u8; 16]>,
    pub avail_idx: u16,
    pub ring: Vec<u16>,
    pub payload: &'a [u8],
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let s = self.take(N);
        out[..s.len()].copy_from_slice(s);
        out
    }
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Self {
        let mut c = Cursor(data);
        let knobs = c.array::<4>();
        let [n_desc, avail_idx] = c.array::<2>();
        let n_desc = usize::from(n_desc).min(usize::from(QSIZE));
        let descs = (0..n_desc).map(|_| c.array::<16>()).collect();
        let avail_idx = u16::from(avail_idx);
        let ring = (0..avail_idx.min(QSIZE))
            .map(|_| u16::from_le_bytes(c.array::<2>()))
            .collect();
        Input {
            knobs,
            descs,
            avail_idx,
            ring,
            payload: c.0,
        }
    }

    /// Writes the descriptors and available ring of queue `q`, and the payload.
    pub fn lay_out(&self, mem: &GuestMemory, q: u64) {
        let (desc, avail, _) = ring_addrs(q);
        for (i, d) in self.descs.iter().enumerate() {
            mem.write_slice(d, GuestAddress(desc + 16 * i as u64))
                .unwrap();
        }
        for (i, head) in self.ring.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(avail + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        let room = REGION0.1 - PAYLOAD as usize;
        let payload = &self.payload[..self.payload.len().min(room)];
        mem.write_slice(payload, GuestAddress(PAYLOAD)).unwrap();
    }
}

/// Fresh, zeroed guest memory.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ])
    .unwrap()
}

/// (descriptor table, available ring, used ring) of queue `q` (q < 4).
pub fn ring_addrs(q: u64) -> (u64, u64, u64) {
    let base = q * 0x400;
    (base, base + 0x100, base + 0x200)
}

/// A ready device-side queue for ring `q`.
pub fn queue(mem: &GuestMemory, q: u64) -> Queue {
    let (desc, avail, used) = ring_addrs(q);
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(mem));
    queue
}

/// Posts `n` well-formed single-descriptor buffers of `len` bytes on ring `q`, in REGION1.
pub fn post_buffers(mem: &GuestMemory, q: u64, n: u16, len: u32, flags: u16) {
    let (desc, avail, _) = ring_addrs(q);
    for i in 0..n.min(QSIZE) {
        let a = GuestAddress(desc + 16 * u64::from(i));
        let addr = REGION1.0 + u64::from(i) * u64::from(len);
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(a.0 + 14)).unwrap();
        mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    mem.write_obj(n.min(QSIZE), GuestAddress(avail + 2))
        .unwrap();
}

/// A scratch directory for this fuzzing process: under `$HUSK_FUZZ_SCRATCH` (`make fuzz` sets it
/// and removes it afterwards), else on tmpfs if available, so that fsync is cheap.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let base = if let Some(dir) = std::env::var_os("HUSK_FUZZ_SCRATCH") {
        std::path::PathBuf::from(dir)
    } else if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("husk-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
