//! Test helpers: guest memory and a driver-side split virtqueue that lets tests build arbitrary
//! (including malformed) descriptor chains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::MmioTransport;
use super::GuestMemory;
use crate::devices::bus::BusDevice;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// 1 MiB of guest memory at address 0.
pub fn test_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// The driver's view of one split virtqueue laid out at `base`.
pub struct GuestQueue {
    mem: GuestMemory,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    pub fn new(mem: &GuestMemory, base: GuestAddress, size: u16) -> Self {
        let desc = base.0;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = Self {
            mem: mem.clone(),
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used)).unwrap();
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        q
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// (descriptor table, available ring, used ring) addresses.
    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// A device-side queue pointing at this ring, ready to use.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Writes raw descriptor `idx`.
    pub fn set_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.desc + 16 * u64::from(idx));
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Builds a well-formed chain from `(addr, len, device_writable)` buffers and publishes it.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(idx, addr, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Next (descriptor id, written length) from the used ring, if the device added one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let e = GuestAddress(self.used + 4 + 8 * slot);
        let id: u32 = self.mem.read_obj(e).unwrap();
        let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

/// A device's event loop on its own thread, as the VMM runs it.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl EventLoop {
    pub fn start<T: MutEventSubscriber + Send + 'static>(dev: Arc<Mutex<T>>) -> Self {
        let mut em = EventManager::<Arc<Mutex<T>>>::new().unwrap();
        em.add_subscriber(dev);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(10).unwrap();
            }
        });
        EventLoop { stop, thread }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// Writes 32-bit MMIO register `off` of the transport, as a driver does.
pub fn mmio_write(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Reads 32-bit MMIO register `off` of the transport.
pub fn mmio_read(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Plays the driver from reset through `FEATURES_OK` and queue setup: for each of the two feature
/// words it acks what `ack(word, offered)` returns, then sets up `queues` in order and marks them
/// ready. The caller writes `DRIVER_OK`. Returns the two words the device offered.
pub fn mmio_driver_setup(
    t: &mut MmioTransport,
    ack: impl Fn(u32, u32) -> u32,
    queues: &[&GuestQueue],
) -> [u32; 2] {
    mmio_write(t, 0x70, 1);
    mmio_write(t, 0x70, 3);
    let mut offered = [0; 2];
    for word in 0..2u32 {
        mmio_write(t, 0x14, word);
        offered[word as usize] = mmio_read(t, 0x10);
        mmio_write(t, 0x24, word);
        mmio_write(t, 0x20, ack(word, offered[word as usize]));
    }
    mmio_write(t, 0x70, 11);
    for (i, q) in queues.iter().enumerate() {
        let (d, a, u) = q.addrs();
        mmio_write(t, 0x30, i as u32);
        mmio_write(t, 0x38, u32::from(q.size()));
        mmio_write(t, 0x80, d as u32);
        mmio_write(t, 0x90, a as u32);
        mmio_write(t, 0xa0, u as u32);
        mmio_write(t, 0x44, 1);
    }
    offered
}
