//! The virtio-mmio transport (`MmioTransport`) driven by a hostile driver: a sequence of register
//! and config-space reads and writes of any offset and size, guest memory writes (rings, requests)
//! between them, and event-loop turns that run the device's queue handling the way the event
//! manager does when a queue eventfd fires. The device is a real virtio-blk over a small image
//! file (input byte 0 even) or a real virtio-vsock (odd). Nothing may panic, the status register
//! only ever shows states of the status state machine, and the device is never active without
//! DRIVER_OK.
//!
//! Input: `[device: u8]` then operations until the input ends; an operation is an opcode byte
//! (bits 0-1: access size 1/2/4/8; bits 2-3: 0 read, 1 write, 2 guest memory write, 3 event-loop
//! turn) and its operands:
//!
//! ```text
//! read:   [offset: u16 LE]
//! write:  [offset: u16 LE][value: size bytes LE]
//! memory: [addr: u16 LE][len: u8][len bytes]     (into the first 64 KiB of guest memory)
//! turn:   nothing
//! ```
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use husk_fuzz::{memory, scratch_dir, REGION0};
use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::virtio::block::{Block, BlockConfig, SECTOR_SIZE};
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::status::{DEVICE_NEEDS_RESET, DRIVER_OK, FAILED};
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const SECTORS: u64 = 64;
const STATUS: u64 = 0x70;
const GUEST_CID: u64 = 3;
/// Host port with a listener, so guest connects can succeed.
const HOST_PORT: u32 = 1024;

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = scratch_dir("mmio-blk").join("disk.img");
        std::fs::write(&path, vec![0x5a; (SECTORS * SECTOR_SIZE) as usize]).unwrap();
        path
    })
}

fn vsock_host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let uds = scratch_dir("mmio-vsock").join("v.sock");
        let mut port = uds.clone().into_os_string();
        port.push(format!("_{HOST_PORT}"));
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).unwrap();
        listener.set_nonblocking(true).unwrap();
        (uds, listener)
    })
}

enum Dev {
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
}

impl Dev {
    fn is_active(&self) -> bool {
        match self {
            Dev::Block(b) => b.lock().unwrap().is_active(),
            Dev::Vsock(v) => v.lock().unwrap().is_active(),
        }
    }

    /// What the event loop runs when the device's eventfds fire (it also runs them after
    /// activation and reset, through the devices' control eventfd).
    fn turn(&self) {
        match self {
            Dev::Block(b) => {
                let mut b = b.lock().unwrap();
                b.process_queue();
                b.settle();
            }
            Dev::Vsock(v) => {
                let mut v = v.lock().unwrap();
                v.process_tx();
                v.process_muxer();
                v.process_rx();
            }
        }
    }

    fn features(&self) -> (u64, u64) {
        match self {
            Dev::Block(b) => {
                let b = b.lock().unwrap();
                (b.avail_features(), b.acked_features())
            }
            // Vsock keeps no acked features we can see.
            Dev::Vsock(v) => (v.lock().unwrap().avail_features(), 0),
        }
    }
}

struct Ops<'a>(&'a [u8]);

impl<'a> Ops<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (self.0.len() >= n).then(|| {
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        })
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
}

fn check(t: &mut MmioTransport, dev: &Dev) {
    let mut b = [0u8; 4];
    t.read(STATUS, &mut b);
    let status = u32::from_le_bytes(b);
    assert_eq!(status, t.status());
    // ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK, plus FAILED and NEEDS_RESET.
    let stage = status & !(FAILED | DEVICE_NEEDS_RESET);
    assert!([0, 1, 3, 11, 15].contains(&stage), "status {status:#x}");
    if dev.is_active() {
        assert_ne!(status & DRIVER_OK, 0, "device active without DRIVER_OK");
    }
    let (avail, acked) = dev.features();
    assert_eq!(acked & !avail, 0, "device acked features it never offered");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dev = if which & 1 == 0 {
        let b = Block::new(BlockConfig {
            path: image().clone(),
            read_only: which & 2 != 0,
            id: Some("fuzz".into()),
        })
        .unwrap();
        Dev::Block(Arc::new(Mutex::new(b)))
    } else {
        let (uds, _) = vsock_host();
        Dev::Vsock(Arc::new(Mutex::new(
            Vsock::new(GUEST_CID, uds.clone()).unwrap(),
        )))
    };
    let mem = memory();
    let mut t = match &dev {
        Dev::Block(b) => MmioTransport::new(mem.clone(), b.clone()),
        Dev::Vsock(v) => MmioTransport::new(mem.clone(), v.clone()),
    }
    .unwrap();
    let mut ops = Ops(rest);
    while let Some(&[op]) = ops.take(1) {
        let size = 1usize << (op & 3);
        match (op >> 2) & 3 {
            0 => {
                let Some(off) = ops.u16() else { break };
                let mut buf = [0u8; 8];
                t.read(u64::from(off), &mut buf[..size]);
                if off == 0 && size == 4 {
                    assert_eq!(&buf[..4], b"virt");
                }
            }
            1 => {
                let (Some(off), Some(val)) = (ops.u16(), ops.take(size)) else {
                    break;
                };
                t.write(u64::from(off), val);
            }
            2 => {
                let (Some(addr), Some(&[len])) = (ops.u16(), ops.take(1)) else {
                    break;
                };
                let Some(bytes) = ops.take(usize::from(len)) else {
                    break;
                };
                let end = (usize::from(addr) + bytes.len()).min(REGION0.1);
                let n = end - usize::from(addr);
                mem.write_slice(&bytes[..n], GuestAddress(u64::from(addr)))
                    .unwrap();
            }
            _ => {
                for evt in t.queue_evts() {
                    let _ = evt.read();
                }
                dev.turn();
                let _ = t.interrupt_evt().read();
            }
        }
        check(&mut t, &dev);
    }
    // The guest goes away: a final turn, then a reset, as on reboot.
    dev.turn();
    // For checking what the seeds reach: `HUSK_FUZZ_VERBOSE=1 cargo fuzz run mmio_transport SEED`.
    if std::env::var_os("HUSK_FUZZ_VERBOSE").is_some() {
        let stats = match &dev {
            Dev::Block(b) => format!("{:?}", b.lock().unwrap().stats()),
            Dev::Vsock(v) => format!("{} connections", v.lock().unwrap().connection_count()),
        };
        eprintln!(
            "status {:#x}, active {}, {stats}",
            t.status(),
            dev.is_active()
        );
    }
    t.write(STATUS, &0u32.to_le_bytes());
    assert_eq!(t.status(), 0);
    assert!(!dev.is_active(), "device still active after reset");
    if let Dev::Vsock(_) = dev {
        // Close what the guest opened, so the backlog never fills.
        while vsock_host().1.accept().is_ok() {}
    }
});
