//! Device-level tests: the test plays the guest driver on an in-memory virtqueue, backed by a
//! real temporary image file.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::status::DEVICE_NEEDS_RESET;
use crate::devices::virtio::test_utils::{
    mmio_driver_setup, mmio_read as r, mmio_write as w, test_memory, EventLoop, GuestQueue,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;

const SECTORS: u64 = 64;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x8100;
const DATA: u64 = 0x10000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Value the test writes into the status byte before each request, to see that it changed.
const STATUS_POISON: u8 = 0xaa;

/// Sector `s` of the initial image is filled with byte `s`.
fn image(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for s in 0..sectors {
        f.write_all(&[s as u8; SECTOR_SIZE as usize]).unwrap();
    }
    f.flush().unwrap();
    f
}

struct Harness {
    file: tempfile::NamedTempFile,
    dev: Block,
    mem: GuestMemory,
    q: GuestQueue,
    irq: IrqTrigger,
}

impl Harness {
    fn new(read_only: bool, id: Option<&str>) -> Self {
        Self::with_queue(read_only, id, 64)
    }

    fn with_queue(read_only: bool, id: Option<&str>, qsize: u16) -> Self {
        let file = image(SECTORS);
        let mut dev = Block::new(BlockConfig {
            path: file.path().to_path_buf(),
            read_only,
            id: id.map(str::to_owned),
        })
        .unwrap();
        let mem = test_memory();
        let q = GuestQueue::new(&mem, GuestAddress(0x1000), qsize);
        let irq = IrqTrigger::new().unwrap();
        dev.activate(
            mem.clone(),
            vec![q.device_queue()],
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            irq.clone(),
        )
        .unwrap();
        Self {
            file,
            dev,
            mem,
            q,
            irq,
        }
    }

    fn header(&self, req: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem
            .write_obj(STATUS_POISON, GuestAddress(STATUS))
            .unwrap();
    }

    /// Publishes `header + data + status` and runs the device; returns (status, used len).
    fn request(&mut self, req: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.header(req, sector);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS, 1, true));
        self.run(&bufs)
    }

    /// Publishes `n` one-sector reads, each with its own data buffer and status byte, all sharing
    /// the header (the last one written, sector `n - 1`, is what the device reads for every one).
    fn queue_reads(&mut self, n: u64) {
        for s in 0..n {
            self.header(VIRTIO_BLK_T_IN, s % SECTORS);
            self.q.add_chain(&[
                (HDR, 16, false),
                (DATA + 512 * s, 512, true),
                (STATUS + s, 1, true),
            ]);
        }
    }

    /// Publishes an arbitrary chain and runs the device; returns (status byte, used len).
    fn run(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
        let head = self.q.add_chain(bufs);
        self.complete(head)
    }

    fn complete(&mut self, head: u16) -> (u8, u32) {
        self.dev.process_queue();
        self.dev.settle();
        let (id, len) = self.q.pop_used().expect("request was not completed");
        assert_eq!(id, u32::from(head));
        assert!(self.q.pop_used().is_none());
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn file_sector(&self, s: u64) -> Vec<u8> {
        let all = std::fs::read(self.file.path()).unwrap();
        all[(s * SECTOR_SIZE) as usize..((s + 1) * SECTOR_SIZE) as usize].to_vec()
    }

    /// A plain one-sector read must still work (the device survived whatever came before).
    fn assert_still_works(&mut self) {
        let before = self.dev.stats().reads;
        let r = self.request(VIRTIO_BLK_T_IN, 5, &[(DATA, 512, true)]);
        assert_eq!(r, (OK, 513));
        assert_eq!(self.read_guest(DATA, 512), vec![5u8; 512]);
        assert_eq!(self.dev.stats().reads, before + 1);
    }
}

#[test]
fn features_and_config_space() {
    let h = Harness::new(false, None);
    let f = h.dev.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} not offered");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.dev.device_type(), 2);
    assert_eq!(h.dev.queue_max_sizes(), &[256]);
    let mut cfg = [0u8; 24];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    // Unaligned and out-of-range reads.
    let mut b = [0xffu8; 4];
    h.dev.read_config(21, &mut b);
    assert_eq!(b, [2, 0, 0, 0]);
    h.dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);

    let ro = Harness::new(true, None);
    assert_ne!(ro.dev.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(ro.dev.is_read_only());
}

#[test]
fn constructor_errors_are_clear() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1000).unwrap();
    let cfg = |path: &Path| BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        id: None,
    };
    let e = Block::new(cfg(f.path())).err().unwrap();
    assert!(
        matches!(e, BlockError::UnalignedSize { size: 1000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("not a multiple of 512"));

    let e = Block::new(cfg(Path::new("/nonexistent/husk.img")))
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::Open { .. }), "{e}");

    f.as_file().set_len(1024).unwrap();
    let e = Block::new(BlockConfig {
        id: Some("x".repeat(21)),
        ..cfg(f.path())
    })
    .err()
    .unwrap();
    assert!(matches!(e, BlockError::IdTooLong { len: 21, .. }), "{e}");
    let b = Block::new(BlockConfig {
        id: Some("x".repeat(20)),
        ..cfg(f.path())
    })
    .unwrap();
    assert_eq!(b.capacity(), 2);
    // An empty image is a valid (useless) disk.
    f.as_file().set_len(0).unwrap();
    assert_eq!(Block::new(cfg(f.path())).unwrap().capacity(), 0);
}

#[test]
fn read_write_round_trip_across_descriptors() {
    let mut h = Harness::new(false, None);
    // Initial contents.
    let r = h.request(VIRTIO_BLK_T_IN, 3, &[(DATA, 1024, true)]);
    assert_eq!(r, (OK, 1025));
    assert_eq!(h.read_guest(DATA, 512), vec![3u8; 512]);
    assert_eq!(h.read_guest(DATA + 512, 512), vec![4u8; 512]);
    assert_ne!(h.irq.status() & VIRTIO_MMIO_INT_VRING, 0);

    // Write two sectors from three descriptors whose boundaries are not sector aligned.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    h.mem
        .write_slice(&payload[..700], GuestAddress(DATA))
        .unwrap();
    h.mem
        .write_slice(&payload[700..1000], GuestAddress(DATA + 0x1000))
        .unwrap();
    h.mem
        .write_slice(&payload[1000..], GuestAddress(DATA + 0x2000))
        .unwrap();
    let r = h.request(
        VIRTIO_BLK_T_OUT,
        10,
        &[
            (DATA, 700, false),
            (DATA + 0x1000, 300, false),
            (DATA + 0x2000, 24, false),
        ],
    );
    assert_eq!(r, (OK, 1));
    assert_eq!(h.file_sector(10), payload[..512]);
    assert_eq!(h.file_sector(11), payload[512..]);
    assert_eq!(h.file_sector(12), vec![12u8; 512]);

    // Read it back into two other descriptors, the status byte sharing the last one.
    h.header(VIRTIO_BLK_T_IN, 10);
    let r = h.run(&[
        (HDR, 16, false),
        (DATA + 0x4000, 100, true),
        (DATA + 0x5000, 925, true),
    ]);
    assert_eq!(r.1, 1025);
    let mut back = h.read_guest(DATA + 0x4000, 100);
    back.extend(h.read_guest(DATA + 0x5000, 924));
    assert_eq!(back, payload);
    assert_eq!(h.read_guest(DATA + 0x5000 + 924, 1), [OK]);

    // The very last sector is reachable.
    let r = h.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[(DATA, 512, true)]);
    assert_eq!(r, (OK, 513));
    assert_eq!(h.read_guest(DATA, 512), vec![(SECTORS - 1) as u8; 512]);

    let s = h.dev.stats();
    assert_eq!(
        (s.reads, s.writes, s.read_bytes, s.write_bytes),
        (3, 1, 2560, 1024)
    );
    assert_eq!((s.failed, s.malformed), (0, 0));
}

#[test]
fn flush_and_get_id() {
    let mut h = Harness::new(false, Some("husk-root"));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(h.dev.stats().flushes, 1);

    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let r = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!(r, (OK, 21));
    let mut want = b"husk-root".to_vec();
    want.resize(20, 0);
    assert_eq!(h.read_guest(DATA, 20), want);
    // A larger buffer gets 20 bytes, a smaller one a prefix.
    h.mem.write_slice(&[0xff; 64], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 64, true)]),
        (OK, 21)
    );
    assert_eq!(h.read_guest(DATA + 20, 1), [0xff]);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, true)]),
        (OK, 5)
    );
    assert_eq!(h.read_guest(DATA, 4), b"husk");
    // GET_ID without a buffer, FLUSH with data: IOERR.
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[]), (IOERR, 1));
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, true)]),
        (IOERR, 1)
    );
    assert_eq!(h.dev.stats().get_ids, 3);

    // Without an id the serial is empty.
    let mut h = Harness::new(false, None);
    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
        (OK, 21)
    );
    assert_eq!(h.read_guest(DATA, 20), [0u8; 20]);
}

#[test]
fn read_only_disk_rejects_writes() {
    let mut h = Harness::new(true, None);
    h.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    let r = h.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]);
    assert_eq!(r, (IOERR, 1));
    assert_eq!(h.file_sector(1), vec![1u8; 512]);
    assert_eq!(h.dev.stats().failed, 1);
    // Reads and flushes still work.
    h.assert_still_works();
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn requests_beyond_capacity_fail() {
    let mut h = Harness::new(false, None);
    for (req, sector, len, writable) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512, true),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024, true),
        (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024, false),
        (VIRTIO_BLK_T_OUT, SECTORS, 512, false),
        // sector * 512 and sector + len overflow.
        (VIRTIO_BLK_T_IN, u64::MAX, 512, true),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512, true),
        (VIRTIO_BLK_T_OUT, u64::MAX - 1, 1024, false),
    ] {
        let r = h.request(req, sector, &[(DATA, len, writable)]);
        assert_eq!(r, (IOERR, 1), "req {req} sector {sector} len {len}");
    }
    assert_eq!(h.dev.stats().failed, 7);
    assert_eq!(h.file_sector(SECTORS - 1), vec![(SECTORS - 1) as u8; 512]);
    assert_eq!(
        std::fs::metadata(h.file.path()).unwrap().len(),
        SECTORS * 512
    );
    h.assert_still_works();
}

#[test]
fn unsupported_requests() {
    let mut h = Harness::new(false, None);
    for req in [
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        2,
        99,
        u32::MAX,
    ] {
        let r = h.request(req, 0, &[(DATA, 16, false)]);
        assert_eq!(r, (UNSUPP, 1), "req {req}");
    }
    assert_eq!(h.dev.stats().unsupported, 5);
    h.assert_still_works();
}

#[test]
fn bad_layouts_get_ioerr() {
    let mut h = Harness::with_queue(false, None, 256);
    // Wrong direction: IN with device-readable data, OUT with device-writable data.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]),
        (IOERR, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]),
        (IOERR, 1)
    );
    assert_eq!(h.file_sector(0), vec![0u8; 512]);
    // Data not a multiple of 512.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 511, true)]),
        (IOERR, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 513, false)]),
        (IOERR, 1)
    );
    // Header too short: 8 bytes, then status.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.run(&[(HDR, 8, false), (STATUS, 1, true)]), (IOERR, 1));
    // Only a status byte.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.run(&[(STATUS, 1, true)]), (IOERR, 1));
    // Header split over two descriptors is fine.
    h.header(VIRTIO_BLK_T_IN, 7);
    let r = h.run(&[
        (HDR, 5, false),
        (HDR + 5, 11, false),
        (DATA, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(r, (OK, 513));
    assert_eq!(h.read_guest(DATA, 512), vec![7u8; 512]);
    // A total data length beyond MAX_DATA_LEN, built from overlapping descriptors (the guest can
    // name far more memory than it has): rejected without allocating or touching the file.
    let big: Vec<_> = (0..200).map(|_| (DATA, 0xe_0000, false)).collect();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &big), (IOERR, 1));
    assert_eq!(h.file_sector(0), vec![0u8; 512]);
    assert_eq!(h.dev.stats().failed, 7);
    assert_eq!(h.dev.stats().malformed, 0);
    h.assert_still_works();
}

#[test]
fn malformed_chains_are_consumed_without_status() {
    let mut h = Harness::with_queue(false, None, 512);
    let expect_dropped = |h: &mut Harness, head: u16, what: &str| {
        let before = h.dev.stats().malformed;
        let (status, len) = h.complete(head);
        assert_eq!(len, 0, "{what}");
        assert_eq!(status, STATUS_POISON, "{what}: status written");
        assert_eq!(h.dev.stats().malformed, before + 1, "{what}");
        h.assert_still_works();
    };

    h.header(VIRTIO_BLK_T_IN, 0);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (DATA, 0, true), (STATUS, 1, true)]);
    expect_dropped(&mut h, head, "zero-length descriptor");

    h.header(VIRTIO_BLK_T_IN, 0);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (0xfff_0000, 512, true), (STATUS, 1, true)]);
    expect_dropped(&mut h, head, "out-of-range descriptor");

    h.header(VIRTIO_BLK_T_IN, 0);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (u64::MAX, 1, true)]);
    expect_dropped(&mut h, head, "status at an address that wraps");

    h.header(VIRTIO_BLK_T_IN, 0);
    let head = h.q.add_chain(&[(HDR, 16, false), (DATA, 512, true)]);
    // The last descriptor is writable, so its last byte is the status: this is an IN of 511
    // bytes, which fails alignment. Not malformed, but IOERR.
    let (_, len) = h.complete(head);
    assert_eq!(len, 1);

    h.header(VIRTIO_BLK_T_OUT, 0);
    let head = h.q.add_chain(&[(HDR, 16, false), (DATA, 512, false)]);
    expect_dropped(&mut h, head, "no status descriptor");

    h.header(VIRTIO_BLK_T_OUT, 0);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]);
    expect_dropped(&mut h, head, "read-only status byte");

    h.header(VIRTIO_BLK_T_IN, 0);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)]);
    expect_dropped(&mut h, head, "readable after writable");

    // Loop: 300 -> 301 -> 300.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.q.set_desc(300, HDR, 16, VRING_DESC_F_NEXT, 301);
    h.q.set_desc(301, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 300);
    h.q.publish(300);
    expect_dropped(&mut h, 300, "loop");

    // Next index beyond the queue.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.q.set_desc(302, HDR, 16, VRING_DESC_F_NEXT, 4000);
    h.q.publish(302);
    expect_dropped(&mut h, 302, "truncated");

    // More descriptors than seg_max + 2.
    h.header(VIRTIO_BLK_T_OUT, 0);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend((0..SEG_MAX + 1).map(|_| (DATA, 512, false)));
    bufs.push((STATUS, 1, true));
    let head = h.q.add_chain(&bufs);
    expect_dropped(&mut h, head, "chain too long");
    // ... while exactly seg_max data descriptors are fine: 253 * 64 + 192 bytes = 32 sectors.
    h.header(VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend((0..SEG_MAX - 1).map(|i| (DATA + 64 * u64::from(i), 64, true)));
    bufs.push((DATA + 64 * u64::from(SEG_MAX - 1), 192, true));
    bufs.push((STATUS, 1, true));
    let head = h.q.add_chain(&bufs);
    assert_eq!(h.complete(head), (OK, 32 * 512 + 1));
    assert_eq!(h.read_guest(DATA + 31 * 512, 512), vec![31u8; 512]);

    assert_eq!(h.dev.stats().malformed, 9);
    // (A head index beyond the queue size breaks the ring itself: see
    // `broken_ring_needs_reset_until_the_driver_resets`.)
    assert!(!h.dev.needs_reset());
}

#[test]
fn batch_is_interrupted_once_and_reset_stops_the_device() {
    let mut h = Harness::new(false, None);
    h.queue_reads(8);
    h.dev.process_queue();
    h.dev.settle();
    for _ in 0..8 {
        assert_eq!(h.q.pop_used().unwrap().1, 513);
    }
    assert_eq!(h.irq.event().read().unwrap(), 1);
    // All eight read sector 7 (the header was rewritten before each publish).
    assert_eq!(h.read_guest(DATA + 512 * 7, 512), vec![7u8; 512]);

    h.dev.reset();
    assert!(!h.dev.is_active());
    h.header(VIRTIO_BLK_T_IN, 0);
    h.q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    h.dev.process_queue();
    h.dev.settle();
    assert!(h.q.pop_used().is_none());
}

/// The whole stack as the VMM wires it: MMIO registers, an event manager thread, notifications
/// through the transport and interrupts through the irq eventfd.
/// Plays the driver up to `FEATURES_OK` with the request queue on `q`: every low feature the
/// device offers, plus VERSION_1. The caller writes `DRIVER_OK`. Returns the offered low word.
fn bring_up(t: &mut MmioTransport, q: &GuestQueue) -> u32 {
    let ack = |word, offered| if word == 0 { offered } else { 1 };
    mmio_driver_setup(t, ack, &[q])[0]
}

/// A disk (serial `serial-1`) behind the MMIO transport, with its event loop running, as the VMM
/// wires it; the image file lives as long as the first element.
fn mmio_rig() -> (
    tempfile::NamedTempFile,
    Arc<Mutex<Block>>,
    GuestMemory,
    MmioTransport,
    EventLoop,
) {
    let img = image(SECTORS);
    let blk = Arc::new(Mutex::new(
        Block::new(BlockConfig {
            path: img.path().to_path_buf(),
            read_only: false,
            id: Some("serial-1".into()),
        })
        .unwrap(),
    ));
    let mem = test_memory();
    let t = MmioTransport::new(mem.clone(), blk.clone()).unwrap();
    let event_loop = EventLoop::start(blk.clone());
    (img, blk, mem, t, event_loop)
}

/// Sends GET_ID through the running device and waits for it: the serial and `OK` come back.
fn get_id(t: &mut MmioTransport, q: &mut GuestQueue, mem: &GuestMemory) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[0u8; 20], GuestAddress(DATA)).unwrap();
    mem.write_obj(STATUS_POISON, GuestAddress(STATUS)).unwrap();
    let head = q.add_chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    w(t, 0x50, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        if let Some(u) = q.pop_used() {
            break u;
        }
        assert!(Instant::now() < deadline, "GET_ID never completed");
        thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, (u32::from(head), 21));
    let mut id = [0u8; 8];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial-1");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
}

#[test]
fn event_manager_drives_device_through_mmio_transport() {
    let (_img, blk, mem, mut t, event_loop) = mmio_rig();

    assert_eq!(r(&mut t, 0x08), 2);
    assert_eq!(r(&mut t, 0x100), SECTORS as u32);
    let mut q = GuestQueue::new(&mem, GuestAddress(0x1000), 64);
    let offered = bring_up(&mut t, &q);
    w(&mut t, 0x70, 15);
    assert_eq!(t.status(), 15);
    assert_eq!(
        blk.lock().unwrap().acked_features(),
        u64::from(offered) | (1 << VIRTIO_F_VERSION_1)
    );

    get_id(&mut t, &mut q, &mem);
    assert!(t.interrupt_evt().read().unwrap() >= 1);
    assert_eq!(
        r(&mut t, 0x60) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );

    // 21 reads, each of its own sector, in one notification: the I/O threads run
    // them side by side and the event loop returns every completion with the right data.
    let (hdrs, statuses, bufs) = (0x20000u64, 0x21000u64, 0x30000u64);
    let mut heads = Vec::new();
    for i in 0..21u64 {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&(i % SECTORS).to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(hdrs + 16 * i)).unwrap();
        heads.push(q.add_chain(&[
            (hdrs + 16 * i, 16, false),
            (bufs + 512 * i, 512, true),
            (statuses + i, 1, true),
        ]));
    }
    w(&mut t, 0x50, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < heads.len() {
        match q.pop_used() {
            Some(u) => done.push(u),
            None => {
                assert!(Instant::now() < deadline, "{} of 21 completed", done.len());
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
    done.sort_unstable();
    let mut want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 513)).collect();
    want.sort_unstable();
    assert_eq!(done, want);
    for i in 0..21u64 {
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(bufs + 512 * i))
            .unwrap();
        assert_eq!(got, vec![(i % SECTORS) as u8; 512], "request {i}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(statuses + i)).unwrap(), OK);
    }
    let threads = blk.lock().unwrap().io_threads();
    assert!(
        (1..=MAX_WORKERS).contains(&threads),
        "{threads} I/O threads"
    );
    assert_eq!(blk.lock().unwrap().stats().reads, 21);

    w(&mut t, 0x70, 0);
    assert!(!blk.lock().unwrap().is_active());
    event_loop.stop();
}

/// At activation the VMM runs out of file descriptors, so the event loop cannot watch the queue:
/// the device reports `DEVICE_NEEDS_RESET` (with a config interrupt) instead of sitting deaf, and
/// after a reset, with descriptors available again, it serves requests. RLIMIT_NOFILE is per
/// process, so the test runs itself again in a child process.
#[test]
fn queue_the_event_loop_cannot_watch_needs_reset() {
    const CHILD: &str = "HUSK_TEST_NO_FDS_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let name = format!(
            "{}::queue_the_event_loop_cannot_watch_needs_reset",
            module_path!().split_once("::").unwrap().1
        );
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child test: {text}"
        );
        return;
    }

    let (_img, blk, mem, mut t, event_loop) = mmio_rig();
    let mut q = GuestQueue::new(&mem, GuestAddress(0x1000), 64);
    bring_up(&mut t, &q);

    // Take every descriptor number up to the highest one open now.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let tight = libc::rlimit {
        rlim_cur: highest + 1,
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct; this process is the child running this test alone.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) }, 0);
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    // One descriptor left: the transport's copy of the queue eventfd at activation takes it, so
    // the device's own registration is what runs out.
    fillers.pop();

    w(&mut t, 0x70, 15);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !blk.lock().unwrap().needs_reset() {
        assert!(Instant::now() < deadline, "the device never failed");
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(r(&mut t, 0x70) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    assert_eq!(
        r(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );

    drop(fillers);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    w(&mut t, 0x70, 0);
    q = GuestQueue::new(&mem, GuestAddress(0x1000), 64);
    bring_up(&mut t, &q);
    w(&mut t, 0x70, 15);
    assert_eq!(t.status(), 15);
    get_id(&mut t, &mut q, &mem);
    event_loop.stop();
}

/// A reset ends the driver instance: requests it queued are dropped or finish before the reset
/// returns, and none of them is ever returned on the next instance's ring.
#[test]
fn reset_never_returns_requests_of_the_old_driver() {
    let mut h = Harness::new(false, None);
    h.queue_reads(16);
    h.dev.process_queue();
    // No settle: whatever the threads are doing, the reset waits for them.
    h.dev.reset();
    reactivate(&mut h);
    h.dev.settle();
    assert!(
        h.q.pop_used().is_none(),
        "an old request reached the new ring"
    );
    h.dev.complete_io();
    assert!(h.q.pop_used().is_none());
    h.assert_still_works();
}

/// With EVENT_IDX the device tells the driver how far it has read (`avail_event`), so the driver
/// notifies once per batch, and it interrupts only when the driver's `used_event` is crossed.
#[test]
fn event_idx_batches_notifications_and_interrupts() {
    let file = image(SECTORS);
    let mut dev = Block::new(BlockConfig {
        path: file.path().to_path_buf(),
        read_only: false,
        id: None,
    })
    .unwrap();
    dev.ack_features(dev.avail_features());
    assert_ne!(dev.acked_features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    let mem = test_memory();
    let qsize = 16u16;
    let mut q = GuestQueue::new(&mem, GuestAddress(0x1000), qsize);
    let irq = IrqTrigger::new().unwrap();
    dev.activate(
        mem.clone(),
        vec![q.device_queue()],
        vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        irq.clone(),
    )
    .unwrap();
    let (_, avail, used) = q.addrs();
    let used_event = GuestAddress(avail + 4 + 2 * u64::from(qsize));
    let avail_event = GuestAddress(used + 4 + 8 * u64::from(qsize));
    // The driver wants an interrupt once the third request completes (used_event = 2).
    mem.write_obj(2u16, used_event).unwrap();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let flush =
        |q: &mut GuestQueue, i: u64| q.add_chain(&[(HDR, 16, false), (STATUS + i, 1, true)]);

    flush(&mut q, 0);
    flush(&mut q, 1);
    dev.process_queue();
    dev.settle();
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
    assert_eq!(irq.status(), 0, "interrupted before used_event was crossed");
    assert!(q.pop_used().is_some() && q.pop_used().is_some());

    flush(&mut q, 2);
    dev.process_queue();
    dev.settle();
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
    assert_eq!(irq.status() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
    assert_eq!(q.pop_used().map(|(_, len)| len), Some(1));
    for i in 0..3 {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), OK);
    }
    assert_eq!(dev.stats().flushes, 3);
}

/// An available index far beyond the queue size makes every pop fail while the ring still claims
/// requests: the device must return (found by the blk_request fuzz target), not spin.
#[test]
fn broken_available_index_does_not_spin() {
    let mut h = Harness::new(false, None);
    let (_, avail, _) = h.q.addrs();
    h.mem.write_obj(200u16, GuestAddress(avail + 2)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let watchdog = thread::spawn(move || {
        let start = Instant::now();
        while !d.load(Ordering::SeqCst) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "process_queue spins"
            );
            thread::sleep(Duration::from_millis(10));
        }
    });
    h.dev.process_queue();
    h.dev.settle();
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(h.q.pop_used().is_none());
    assert!(h.dev.needs_reset());
}

/// Re-activates `h.dev` on a fresh ring (what the driver does after a reset).
fn reactivate(h: &mut Harness) {
    h.q = GuestQueue::new(&h.mem, GuestAddress(0x1000), 64);
    h.dev
        .activate(
            h.mem.clone(),
            vec![h.q.device_queue()],
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            h.irq.clone(),
        )
        .unwrap();
}

/// A ring that breaks at run time (virtio 1.2, 2.1.2): the device stops using its queue,
/// raises a config interrupt and reports NEEDS_RESET until the driver resets it; after the
/// reset it works again.
#[test]
fn broken_ring_needs_reset_until_the_driver_resets() {
    type Break = fn(&mut Harness);
    let cases: [(&str, Break); 2] = [
        ("available index beyond the queue size", |h| {
            let (_, avail, _) = h.q.addrs();
            h.mem.write_obj(200u16, GuestAddress(avail + 2)).unwrap();
        }),
        ("head index beyond the queue size", |h| h.q.publish(4000)),
    ];
    for (what, break_ring) in cases {
        let mut h = Harness::new(false, None);
        h.assert_still_works();
        let _ = h.irq.event().read();
        h.irq.ack(u32::MAX);

        h.header(VIRTIO_BLK_T_IN, 0);
        break_ring(&mut h);
        h.dev.process_queue();
        h.dev.settle();
        assert!(h.dev.needs_reset(), "{what}");
        assert!(!h.dev.is_active(), "{what}");
        assert_eq!(h.irq.status(), VIRTIO_MMIO_INT_CONFIG, "{what}");
        assert_eq!(h.irq.event().read().unwrap(), 1, "{what}");
        assert!(h.q.pop_used().is_none(), "{what}");
        assert_eq!(h.read_guest(STATUS, 1), [STATUS_POISON], "{what}");

        // A well-formed request behind the broken entry is not touched, however often the
        // driver notifies, and no further interrupt is raised.
        let (_, avail, _) = h.q.addrs();
        h.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        h.header(VIRTIO_BLK_T_IN, 5);
        h.q.set_desc(10, HDR, 16, VRING_DESC_F_NEXT, 11);
        h.q.set_desc(11, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 12);
        h.q.set_desc(12, STATUS, 1, VRING_DESC_F_WRITE, 0);
        h.mem.write_obj(10u16, GuestAddress(avail + 4)).unwrap();
        for _ in 0..3 {
            h.dev.process_queue();
            h.dev.settle();
        }
        assert_eq!(h.read_guest(STATUS, 1), [STATUS_POISON], "{what}");
        assert!(h.irq.event().read().is_err(), "{what}: interrupted again");
        assert_eq!(h.dev.stats().reads, 1, "{what}");

        // Activation without a reset is refused; after the reset the device works again.
        assert!(matches!(
            h.dev.activate(
                h.mem.clone(),
                vec![h.q.device_queue()],
                vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                h.irq.clone(),
            ),
            Err(ActivateError::AlreadyActive)
        ));
        h.dev.reset();
        assert!(!h.dev.needs_reset(), "{what}");
        reactivate(&mut h);
        h.assert_still_works();
        assert!(!h.dev.needs_reset(), "{what}");
    }
}

/// A hostile driver that republishes heads still in flight cannot grow the I/O queue: the device
/// stops popping at as many requests in flight as the queue has entries, and resumes as they
/// complete.
#[test]
fn republished_heads_are_throttled_not_queued() {
    let mut h = Harness::new(false, None);
    h.header(VIRTIO_BLK_T_IN, 3);
    let head =
        h.q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    // The same chain published 128 times, a full ring (64) per notification, without letting
    // the device complete anything in between.
    for _ in 0..63 {
        h.q.publish(head);
    }
    h.dev.process_queue();
    for _ in 0..64 {
        h.q.publish(head);
    }
    h.dev.process_queue();
    let count = |h: &mut Harness| std::iter::from_fn(|| h.q.pop_used()).count();
    // Popping stopped at 64 in flight; completing them resumed it.
    h.dev.settle();
    assert_eq!(count(&mut h), 64, "completions of the first ring");
    h.dev.settle();
    assert_eq!(count(&mut h), 64);
    assert_eq!(h.dev.stats().reads, 128);
    assert!(!h.dev.needs_reset());
    h.assert_still_works();
}

/// What the Linux driver does under `fio --iodepth=16`, through the event loop: 16 requests
/// always outstanding, kicks only when the device's `avail_event` asks for one, `used_event` set
/// after each interrupt and the ring checked again. Any lost notification or interrupt in the
/// device stalls the loop, which the test reports instead of hanging.
#[test]
fn queue_depth_16_with_event_idx_never_stalls() {
    const DEPTH: u16 = 16;
    const QSIZE: u16 = 64;
    const REQUESTS: usize = 20_000;
    let file = image(SECTORS);
    let blk = Arc::new(Mutex::new(
        Block::new(BlockConfig {
            path: file.path().to_path_buf(),
            read_only: true,
            id: None,
        })
        .unwrap(),
    ));
    let mem = test_memory();
    let mut q = GuestQueue::new(&mem, GuestAddress(0x1000), QSIZE);
    let irq = IrqTrigger::new().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    {
        let mut dev = blk.lock().unwrap();
        let features = dev.avail_features();
        dev.ack_features(features);
        dev.activate(
            mem.clone(),
            vec![q.device_queue()],
            vec![kick.try_clone().unwrap()],
            irq.clone(),
        )
        .unwrap();
    }
    let event_loop = EventLoop::start(blk.clone());

    let (_, avail, used) = q.addrs();
    let used_event = GuestAddress(avail + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(used + 4 + 8 * u64::from(QSIZE));
    let (hdrs, statuses, bufs) = (0x20000u64, 0x21000u64, 0x30000u64);
    let mut sector_of = [0u64; DEPTH as usize];
    let mut free: Vec<u16> = (0..DEPTH).collect();
    let mut avail_idx = 0u16;
    let (mut submitted, mut completed) = (0usize, 0usize);
    let mut rng = 0x2545_f491_u64;
    while completed < REQUESTS {
        // Submit into every free slot; slot i owns descriptors 3i..3i+2.
        let old = avail_idx;
        while let Some(slot) = free.pop() {
            if submitted == REQUESTS {
                free.push(slot);
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let sector = rng % SECTORS;
            sector_of[usize::from(slot)] = sector;
            let i = u64::from(slot);
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&hdr, GuestAddress(hdrs + 16 * i)).unwrap();
            let d = 3 * slot;
            q.set_desc(d, hdrs + 16 * i, 16, VRING_DESC_F_NEXT, d + 1);
            q.set_desc(
                d + 1,
                bufs + 512 * i,
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                d + 2,
            );
            q.set_desc(d + 2, statuses + i, 1, VRING_DESC_F_WRITE, 0);
            q.publish(d);
            avail_idx = avail_idx.wrapping_add(1);
            submitted += 1;
        }
        // vring_need_event: kick only if avail_event lies in [old, avail_idx).
        std::sync::atomic::fence(Ordering::SeqCst);
        let event: u16 = mem.read_obj(avail_event).unwrap();
        if avail_idx.wrapping_sub(event).wrapping_sub(1) < avail_idx.wrapping_sub(old) {
            kick.write(1).unwrap();
        }
        // Wait for an interrupt, then reap, re-arm used_event and reap again.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(irq.event()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        let _ = irq.event().read();
        let before = completed;
        loop {
            while let Some((id, len)) = q.pop_used() {
                let slot = (id / 3) as u16;
                assert_eq!(len, 513);
                let i = u64::from(slot);
                assert_eq!(mem.read_obj::<u8>(GuestAddress(statuses + i)).unwrap(), OK);
                let mut got = [0u8; 1];
                mem.read_slice(&mut got, GuestAddress(bufs + 512 * i))
                    .unwrap();
                assert_eq!(u64::from(got[0]), sector_of[usize::from(slot)]);
                free.push(slot);
                completed += 1;
            }
            let seen: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
            mem.write_obj(seen, used_event).unwrap();
            std::sync::atomic::fence(Ordering::SeqCst);
            if mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() == seen {
                break;
            }
        }
        // Every wait follows a re-armed used_event with requests outstanding: the next
        // completion must interrupt.
        assert!(
            n > 0,
            "no interrupt in 5 s: {completed} of {REQUESTS} completed ({} found after the \
             wait), {} outstanding",
            completed - before,
            submitted - completed
        );
    }
    assert_eq!(blk.lock().unwrap().stats().reads, REQUESTS as u64);
    event_loop.stop();
}
