//! Device-level tests: the test plays the guest driver on in-memory virtqueues and real host
//! processes on Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::connection::CONN_BUF_SIZE;
use super::packet::*;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::status::DEVICE_NEEDS_RESET;
use crate::devices::virtio::test_utils::{
    mmio_driver_setup, mmio_read, mmio_write, test_memory, EventLoop, GuestQueue,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;

const CID: u64 = 3;
const QSIZE: u16 = 64;
const RX_BUF: u32 = HDR_LEN as u32 + 4096;
const TIMEOUT: Duration = Duration::from_secs(5);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "husk-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest driver's side of the three queues.
struct Guest {
    mem: GuestMemory,
    rxq: GuestQueue,
    txq: GuestQueue,
    evq: GuestQueue,
    rx_bufs: HashMap<u32, u64>,
    rx_slot: u64,
    tx_slot: u64,
}

impl Guest {
    fn new(mem: &GuestMemory) -> Self {
        Self {
            mem: mem.clone(),
            rxq: GuestQueue::new(mem, GuestAddress(0x1000), QSIZE),
            txq: GuestQueue::new(mem, GuestAddress(0x3000), QSIZE),
            evq: GuestQueue::new(mem, GuestAddress(0x5000), QSIZE),
            rx_bufs: HashMap::new(),
            rx_slot: 0,
            tx_slot: 0,
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = 0x10000 + (self.rx_slot % 24) * 0x2000;
            self.rx_slot += 1;
            let head = self.rxq.add_chain(&[(addr, RX_BUF, true)]);
            self.rx_bufs.insert(u32::from(head), addr);
        }
    }

    fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    /// Queues a well-formed packet: header descriptor plus payload descriptor.
    fn send(&mut self, hdr: Header, payload: &[u8]) -> u16 {
        let base = 0x60000 + (self.tx_slot % 4) * 0x10200;
        self.tx_slot += 1;
        let hdr = Header {
            len: payload.len() as u32,
            ..hdr
        };
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        if payload.is_empty() {
            self.txq.add_chain(&[(base, HDR_LEN as u32, false)])
        } else {
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .unwrap();
            self.txq.add_chain(&[
                (base, HDR_LEN as u32, false),
                (base + 0x100, payload.len() as u32, false),
            ])
        }
    }

    /// The next filled rx buffer, as (header, payload).
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rxq.pop_used()?;
        assert!(
            len >= HDR_LEN as u32,
            "rx buffer {id} returned with len {len}"
        );
        let addr = self.rx_bufs[&id];
        let mut raw = [0u8; HDR_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = Header::from_bytes(&raw);
        let mut data = vec![0u8; len as usize - HDR_LEN];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        assert_eq!(hdr.len as usize, data.len());
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (HOST_CID, CID, TYPE_STREAM)
        );
        Some((hdr, data))
    }
}

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    dev: Vsock,
    g: Guest,
    irq: IrqTrigger,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let mut dev = Vsock::new(CID, uds.clone()).unwrap();
        let mem = test_memory();
        let g = Guest::new(&mem);
        let irq = IrqTrigger::new().unwrap();
        let queues = vec![
            g.rxq.device_queue(),
            g.txq.device_queue(),
            g.evq.device_queue(),
        ];
        let evts = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        dev.activate(mem, queues, evts, irq.clone()).unwrap();
        Self {
            _dir: dir,
            uds,
            dev,
            g,
            irq,
        }
    }

    /// Sends a packet and checks the device consumed it.
    fn tx(&mut self, hdr: Header, payload: &[u8]) {
        let head = self.g.send(hdr, payload);
        self.dev.process_tx();
        assert_eq!(self.g.txq.pop_used(), Some((u32::from(head), 0)));
    }

    /// Pumps the device until a packet reaches the guest.
    fn recv_pkt(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(p) = self.g.recv() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet reached the guest");
            self.dev.process_muxer();
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn expect_quiet(&mut self) {
        for _ in 0..3 {
            self.dev.process_muxer();
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(self.g.recv(), None);
    }

    /// Reads from a non-blocking host stream while pumping the device; `Ok(0)` on EOF.
    fn host_read(&mut self, s: &mut UnixStream, buf: &mut [u8]) -> usize {
        s.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match s.read(buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return 0,
                Err(e) => panic!("host read failed: {e}"),
            }
            assert!(Instant::now() < deadline, "host stream stayed silent");
            self.dev.process_muxer();
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn host_read_exact(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let k = self.host_read(s, &mut out[got..]);
            assert_ne!(k, 0, "unexpected EOF");
            got += k;
        }
        out
    }

    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, data) = self.recv_pkt();
        assert_eq!(
            (req.op, req.dst_port, req.buf_alloc),
            (OP_REQUEST, port, CONN_BUF_SIZE)
        );
        assert!(data.is_empty());
        assert!(req.src_port >= 1 << 30);
        (host, req.src_port)
    }

    fn guest_connect(&mut self, guest_port: u32, host_port: u32) -> UnixStream {
        let listener = UnixListener::bind(format!("{}_{host_port}", self.uds.display())).unwrap();
        self.tx(Guest::hdr(OP_REQUEST, guest_port, host_port), &[]);
        let (resp, _) = self.recv_pkt();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, host_port, guest_port)
        );
        listener.accept().unwrap().0
    }
}

#[test]
fn host_initiated_connection_full_lifecycle() {
    let mut h = Harness::new();
    h.g.post_rx(16);
    let (mut host, hp) = h.host_connect(1024);
    assert_ne!(h.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    assert!(h.irq.event().read().unwrap() >= 1);

    h.tx(Guest::hdr(OP_RESPONSE, 1024, hp), &[]);
    let ok = format!("OK {hp}\n");
    assert_eq!(h.host_read_exact(&mut host, ok.len()), ok.as_bytes());

    host.write_all(b"ping").unwrap();
    let (p, data) = h.recv_pkt();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, hp, 1024));
    assert_eq!(data, b"ping");

    h.tx(Guest::hdr(OP_RW, 1024, hp), b"pong");
    assert_eq!(h.host_read_exact(&mut host, 4), b"pong");

    // Host half-closes: the guest sees SHUTDOWN(SEND) but can still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (s, _) = h.recv_pkt();
    assert_eq!((s.op, s.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.tx(Guest::hdr(OP_RW, 1024, hp), b"bye");
    assert_eq!(h.host_read_exact(&mut host, 3), b"bye");

    // Guest closes: we answer with RST and the host sees EOF.
    let mut shut = Guest::hdr(OP_SHUTDOWN, 1024, hp);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.tx(shut, &[]);
    let (r, _) = h.recv_pkt();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, hp, 1024));
    assert_eq!(h.host_read(&mut host, &mut [0u8; 8]), 0);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_data_sent_with_connect_line_is_not_lost() {
    let mut h = Harness::new();
    h.g.post_rx(8);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 77\nearly").unwrap();
    let (req, _) = h.recv_pkt();
    h.tx(Guest::hdr(OP_RESPONSE, 77, req.src_port), &[]);
    let (p, data) = h.recv_pkt();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"early"[..]));
}

#[test]
fn guest_initiated_connection_and_host_close() {
    let mut h = Harness::new();
    h.g.post_rx(16);
    let mut s = h.guest_connect(777, 5000);
    h.tx(Guest::hdr(OP_RW, 777, 5000), b"hello");
    assert_eq!(h.host_read_exact(&mut s, 5), b"hello");
    s.write_all(b"world").unwrap();
    let (p, data) = h.recv_pkt();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, 5000, 777));
    assert_eq!(data, b"world");

    // The host closes entirely: SHUTDOWN with both flags, then the guest resets.
    drop(s);
    let (sd, _) = h.recv_pkt();
    assert_eq!(
        (sd.op, sd.flags),
        (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    h.tx(Guest::hdr(OP_RST, 777, 5000), &[]);
    assert_eq!(h.dev.connection_count(), 0);
    h.expect_quiet();

    // Anything for the dead connection gets an RST.
    h.tx(Guest::hdr(OP_RW, 777, 5000), b"late");
    let (r, _) = h.recv_pkt();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 5000, 777));
}

#[test]
fn guest_connect_without_host_listener_is_reset() {
    let mut h = Harness::new();
    h.g.post_rx(4);
    h.tx(Guest::hdr(OP_REQUEST, 1234, 4321), &[]);
    let (r, _) = h.recv_pkt();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 4321, 1234));
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_to_guest_flow_control() {
    let mut h = Harness::new();
    h.g.post_rx(16);
    let mut s = h.guest_connect(10, 20);
    // The guest advertises 8 bytes of buffer.
    let mut credit = Guest::hdr(OP_CREDIT_UPDATE, 10, 20);
    credit.buf_alloc = 8;
    h.tx(credit, &[]);
    s.write_all(&[b'x'; 20]).unwrap();
    let (p, data) = h.recv_pkt();
    assert_eq!((p.op, data.len()), (OP_RW, 8));
    let (cr, _) = h.recv_pkt();
    assert_eq!(cr.op, OP_CREDIT_REQUEST);
    h.expect_quiet();
    credit.fwd_cnt = 8;
    h.tx(credit, &[]);
    let (p, data) = h.recv_pkt();
    assert_eq!((p.op, data.len()), (OP_RW, 8));
    // Out of credit again with 4 bytes left on the host side.
    assert_eq!(h.recv_pkt().0.op, OP_CREDIT_REQUEST);
    // Credit request from the guest is answered with our counters.
    let mut req = Guest::hdr(OP_CREDIT_REQUEST, 10, 20);
    (req.buf_alloc, req.fwd_cnt) = (8, 8);
    h.tx(req, &[]);
    let (cu, _) = h.recv_pkt();
    assert_eq!((cu.op, cu.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_SIZE));
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let mut h = Harness::new();
    h.g.post_rx(8);
    let _s = h.guest_connect(11, 21); // never reads
    let chunk = vec![0xabu8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..100 {
        h.tx(Guest::hdr(OP_RW, 11, 21), &chunk);
        if let Some((p, _)) = h.g.recv() {
            if p.op == OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "guest was never reset");
    assert_eq!(h.dev.connection_count(), 0);
}

/// (name, header bytes or the default, descriptors as (addr, len, flags, relative next)).
type Case = (
    &'static str,
    Option<[u8; HDR_LEN]>,
    Vec<(u64, u32, u16, u16)>,
);

#[test]
fn malformed_tx_chains_are_dropped_and_device_keeps_working() {
    let mut h = Harness::new();
    h.g.post_rx(4);
    let good = Guest::hdr(OP_REQUEST, 1, 2).to_bytes();
    let base = 0x90000u64;
    h.g.mem.write_slice(&good, GuestAddress(base)).unwrap();
    let with = |f: fn(&mut Header)| {
        let mut hd = Guest::hdr(OP_RW, 1, 2);
        hd.len = 4;
        f(&mut hd);
        hd.to_bytes()
    };
    let mut cases: Vec<Case> = vec![
        ("zero length", None, vec![(base, 0, 0, 0)]),
        ("out of range", None, vec![(0x2000_0000, 44, 0, 0)]),
        ("wraps address space", None, vec![(u64::MAX - 10, 44, 0, 0)]),
        (
            "wrong direction",
            None,
            vec![(base, 44, VRING_DESC_F_WRITE, 0)],
        ),
        ("short header", None, vec![(base, 40, 0, 0)]),
        (
            "header split, second half writable",
            None,
            vec![
                (base, 20, VRING_DESC_F_NEXT, 1),
                (base + 20, 24, VRING_DESC_F_WRITE, 0),
            ],
        ),
        ("loop", None, vec![(base, 44, VRING_DESC_F_NEXT, 0)]),
        (
            "next out of table",
            None,
            vec![(base, 44, VRING_DESC_F_NEXT, 500)],
        ),
    ];
    for (name, f) in [
        (
            "len larger than buffer",
            (|h: &mut Header| h.len = 100) as fn(&mut Header),
        ),
        ("len larger than max", |h| h.len = u32::MAX),
        ("wrong src cid", |h| h.src_cid = 99),
        ("wrong dst cid", |h| h.dst_cid = 1),
        ("host cid as src", |h| h.src_cid = HOST_CID),
        ("unknown op", |h| h.op = 42),
        ("unknown type", |h| h.type_ = 7),
    ] {
        cases.push((
            name,
            Some(with(f)),
            vec![(base, 44, VRING_DESC_F_NEXT, 1), (base + 0x100, 4, 0, 0)],
        ));
    }
    for (i, (name, hdr, descs)) in cases.into_iter().enumerate() {
        let hdr = hdr.unwrap_or(good);
        h.g.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        // Use descriptors 40.. so indices in `descs` are relative.
        for (j, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let next = if next == 500 { 500 } else { 40 + next };
            h.g.txq.set_desc(40 + j as u16, addr, len, flags, next);
        }
        h.g.txq.publish(40);
        let before = h.dev.dropped_chains();
        h.dev.process_tx();
        assert_eq!(
            h.g.txq.pop_used(),
            Some((40, 0)),
            "{name}: chain not returned"
        );
        assert_eq!(
            h.dev.dropped_chains(),
            before + 1,
            "{name}: not counted as dropped"
        );
        assert_eq!(h.dev.connection_count(), 0, "{name}");
        assert_eq!(h.g.recv(), None, "{name}: produced a packet");
        assert_eq!(h.dev.dropped_chains() as usize, i + 1);
    }
    // The device still works: a connect to a missing port is reset.
    h.tx(Guest::hdr(OP_REQUEST, 1, 2), &[]);
    let (r, _) = h.recv_pkt();
    assert_eq!(r.op, OP_RST);
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let mut h = Harness::new();
    // Device-readable buffer, too-short buffer, out-of-range buffer, then a good one.
    let bad = [
        (0x10000u64, RX_BUF, 0u16),
        (0x10000, 40, VRING_DESC_F_WRITE),
        (0x4000_0000, RX_BUF, VRING_DESC_F_WRITE),
    ];
    for (i, &(addr, len, flags)) in bad.iter().enumerate() {
        h.g.rxq.set_desc(50 + i as u16, addr, len, flags, 0);
        h.g.rxq.publish(50 + i as u16);
    }
    h.g.post_rx(1);
    h.tx(Guest::hdr(OP_REQUEST, 1, 2), &[]);
    for i in 0..3 {
        assert_eq!(h.g.rxq.pop_used(), Some((50 + i, 0)));
    }
    let (r, _) = h.g.recv().expect("RST in the good buffer");
    assert_eq!(r.op, OP_RST);
    assert_eq!(h.dev.dropped_chains(), 3);
}

#[test]
fn packets_wait_for_rx_buffers() {
    let mut h = Harness::new();
    h.tx(Guest::hdr(OP_REQUEST, 1, 2), &[]);
    assert_eq!(h.g.recv(), None);
    h.g.post_rx(1);
    h.dev.process_rx();
    assert_eq!(h.g.recv().unwrap().0.op, OP_RST);
    // An unused buffer is not consumed when there is nothing to send.
    h.g.post_rx(1);
    h.dev.process_rx();
    assert_eq!(h.g.rxq.pop_used(), None);
}

#[test]
fn bad_handshakes_are_closed() {
    let mut h = Harness::new();
    h.g.post_rx(4);
    let mut garbage = UnixStream::connect(&h.uds).unwrap();
    garbage.write_all(b"HELLO\n").unwrap();
    assert_eq!(h.host_read(&mut garbage, &mut [0u8; 8]), 0);
    let mut long = UnixStream::connect(&h.uds).unwrap();
    long.write_all(&[b'A'; 100]).unwrap();
    assert_eq!(h.host_read(&mut long, &mut [0u8; 8]), 0);
    h.expect_quiet();

    // A silent client and an unanswered CONNECT are dropped when their deadlines pass.
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    let (mut unanswered, hp) = h.host_connect(99);
    h.dev.process_muxer();
    h.dev.muxer.sweep(Instant::now() + Duration::from_secs(60));
    silent.set_nonblocking(true).unwrap();
    assert_eq!(silent.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(h.host_read(&mut unanswered, &mut [0u8; 8]), 0);
    let (r, _) = h.recv_pkt();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, hp, 99));
    // A late RESPONSE is answered with RST.
    h.tx(Guest::hdr(OP_RESPONSE, 99, hp), &[]);
    assert_eq!(h.recv_pkt().0.op, OP_RST);
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mut h = Harness::new();
    h.g.post_rx(16);
    // RW before the handshake completed.
    let (mut host, hp) = h.host_connect(5);
    h.tx(Guest::hdr(OP_RW, 5, hp), b"x");
    assert_eq!(h.recv_pkt().0.op, OP_RST);
    assert_eq!(h.host_read(&mut host, &mut [0u8; 8]), 0);
    // RESPONSE on a guest-initiated (already established) connection.
    let mut s = h.guest_connect(6, 7);
    h.tx(Guest::hdr(OP_RESPONSE, 6, 7), &[]);
    assert_eq!(h.recv_pkt().0.op, OP_RST);
    assert_eq!(h.host_read(&mut s, &mut [0u8; 8]), 0);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn reset_closes_everything_and_deactivates() {
    let mut h = Harness::new();
    h.g.post_rx(4);
    let mut s = h.guest_connect(1, 2);
    h.dev.reset();
    assert!(!h.dev.is_active());
    s.set_nonblocking(true).unwrap();
    assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0);
    h.dev.process_tx();
    h.dev.process_rx();
    // The listener survives for the next driver instance.
    assert!(UnixStream::connect(&h.uds).is_ok());
}

#[test]
fn new_rejects_bad_cid_and_non_socket_path() {
    let dir = TempDir::new();
    assert!(matches!(
        Vsock::new(2, dir.0.join("a")),
        Err(VsockError::InvalidCid(2))
    ));
    let file = dir.0.join("regular");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Vsock::new(3, file.clone()),
        Err(VsockError::NotASocket(_))
    ));
    // A stale socket is replaced.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let v = Vsock::new(3, stale.clone()).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    assert_eq!(v.uds_path(), stale.as_path());
    let mut cfg = [0u8; 8];
    v.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 3);
}

/// The whole stack as the VMM wires it: MMIO registers, an event manager thread, notifications
/// through the transport and interrupts through the irq eventfd.
#[test]
fn event_manager_drives_device_through_mmio_transport() {
    let dir = TempDir::new();
    let uds = dir.0.join("v.sock");
    let vsock = Arc::new(Mutex::new(Vsock::new(CID, uds.clone()).unwrap()));
    let mem = test_memory();
    let mut t = MmioTransport::new(mem.clone(), vsock.clone()).unwrap();
    let event_loop = EventLoop::start(vsock.clone());

    let w = mmio_write;
    let mut g = Guest::new(&mem);
    mmio_bring_up(&mut t, &g);

    g.post_rx(8);
    w(&mut t, 0x50, 0);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let req = loop {
        if let Some((hdr, _)) = g.recv() {
            break hdr;
        }
        assert!(Instant::now() < deadline, "REQUEST never arrived");
        thread::sleep(Duration::from_millis(2));
    };
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    assert!(t.interrupt_evt().read().unwrap() >= 1);
    let mut isr = [0u8; 4];
    t.read(0x60, &mut isr);
    assert_eq!(
        u32::from_le_bytes(isr) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );

    g.send(Guest::hdr(OP_RESPONSE, 1024, req.src_port), &[]);
    w(&mut t, 0x50, 1);
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    let ok = format!("OK {}\n", req.src_port);
    let mut line = vec![0u8; ok.len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, ok.as_bytes());

    host.write_all(b"data").unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let data = loop {
        if let Some((hdr, data)) = g.recv() {
            assert_eq!(hdr.op, OP_RW);
            break data;
        }
        assert!(Instant::now() < deadline, "data never arrived");
        thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(data, b"data");

    // Driver reset: the device drops its connections and stops.
    w(&mut t, 0x70, 0);
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);
    assert!(!vsock.lock().unwrap().is_active());

    event_loop.stop();
}

/// Drives the transport through feature negotiation and queue setup to `DRIVER_OK`.
fn mmio_bring_up(t: &mut MmioTransport, g: &Guest) {
    // Only VERSION_1 (bit 32): the device's optional features stay off.
    let ack = |word, _| u32::from(word == 1);
    mmio_driver_setup(t, ack, &[&g.rxq, &g.txq, &g.evq]);
    mmio_write(t, 0x70, 15);
    assert_eq!(t.status(), 15);
}

/// Waits (pumping nothing: the event loop runs elsewhere) until `f` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A tx ring whose available index runs more than a queue size ahead breaks the device: the
/// driver reads DEVICE_NEEDS_RESET through the MMIO status register after a config interrupt,
/// the connections are closed, later notifications are ignored, and after the driver's reset
/// the device works again.
#[test]
fn broken_ring_sets_needs_reset_through_the_transport_until_reset() {
    let dir = TempDir::new();
    let uds = dir.0.join("v.sock");
    let vsock = Arc::new(Mutex::new(Vsock::new(CID, uds.clone()).unwrap()));
    let mem = test_memory();
    let mut t = MmioTransport::new(mem.clone(), vsock.clone()).unwrap();
    let event_loop = EventLoop::start(vsock.clone());
    let w = mmio_write;

    let mut g = Guest::new(&mem);
    mmio_bring_up(&mut t, &g);
    g.post_rx(8);
    w(&mut t, 0x50, 0);
    // A host client connects; the guest sees the REQUEST.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let mut req = None;
    wait_for("the REQUEST", || {
        req = g.recv();
        req.is_some()
    });
    let req = req.unwrap().0;
    assert_eq!(req.op, OP_REQUEST);
    let _ = t.interrupt_evt().read();
    w(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(mmio_read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);

    // Break the tx ring and notify.
    let (_, tx_avail, _) = g.txq.addrs();
    mem.write_obj(QSIZE + 1, GuestAddress(tx_avail + 2))
        .unwrap();
    w(&mut t, 0x50, 1);
    wait_for("the config interrupt", || {
        mmio_read(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG != 0
    });
    assert!(t.interrupt_evt().read().unwrap() >= 1);
    assert_eq!(mmio_read(&mut t, 0x70), 15 | DEVICE_NEEDS_RESET);
    assert!(!vsock.lock().unwrap().is_active());
    // The host side of the connection is closed.
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);

    // Nothing is processed any more: a well-formed packet behind the broken index stays put,
    // however often the driver notifies, and no further interrupt is raised.
    mem.write_obj(0u16, GuestAddress(tx_avail + 2)).unwrap();
    g.send(Guest::hdr(OP_REQUEST, 5, 6), &[]);
    for _ in 0..3 {
        w(&mut t, 0x50, 1);
        w(&mut t, 0x50, 0);
    }
    thread::sleep(Duration::from_millis(50));
    assert_eq!(g.txq.pop_used(), None);
    assert!(t.interrupt_evt().read().is_err());
    // The driver cannot carry on without a reset.
    w(&mut t, 0x70, 15);
    assert_ne!(mmio_read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);

    // Reset and bring up again on fresh rings: the device works.
    w(&mut t, 0x70, 0);
    assert_eq!(mmio_read(&mut t, 0x70), 0);
    assert_eq!(mmio_read(&mut t, 0x60), 0);
    let mut g = Guest::new(&mem);
    mmio_bring_up(&mut t, &g);
    g.post_rx(4);
    w(&mut t, 0x50, 0);
    g.send(Guest::hdr(OP_REQUEST, 1234, 4321), &[]);
    w(&mut t, 0x50, 1);
    let mut rst = None;
    wait_for("the RST", || {
        rst = g.recv();
        rst.is_some()
    });
    assert_eq!(rst.unwrap().0.op, OP_RST);
    assert_eq!(mmio_read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);

    event_loop.stop();
}

/// A head index beyond the rx queue also breaks the device, directly at the device level.
#[test]
fn broken_rx_head_index_needs_reset() {
    let mut h = Harness::new();
    h.g.rxq.publish(QSIZE);
    // Something for the guest: the RST for a connect to a missing port.
    h.tx(Guest::hdr(OP_REQUEST, 1234, 4321), &[]);
    assert!(h.dev.needs_reset());
    assert_eq!(
        h.irq.status() & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(h.g.rxq.pop_used(), None);
    // Later tx is ignored.
    h.g.send(Guest::hdr(OP_REQUEST, 1, 2), &[]);
    h.dev.process_tx();
    assert_eq!(h.g.txq.pop_used(), None);
    h.dev.reset();
    assert!(!h.dev.needs_reset());
}

/// A full tx ring is handled in two turns: the first leaves the rest and reschedules itself
/// through the tx queue's eventfd (what the event loop watches), the second finishes without
/// rescheduling.
#[test]
fn tx_budget_leaves_work_for_the_next_wakeup_and_reschedules() {
    let dir = TempDir::new();
    let mut dev = Vsock::new(CID, dir.0.join("v.sock")).unwrap();
    let mem = test_memory();
    let rxq = GuestQueue::new(&mem, GuestAddress(0x1000), QSIZE);
    // The whole queue, where nothing else lives.
    let mut txq = GuestQueue::new(&mem, GuestAddress(0xc0000), QUEUE_SIZE);
    let evq = GuestQueue::new(&mem, GuestAddress(0x5000), QSIZE);
    let evts: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let tx_evt = evts[TXQ].try_clone().unwrap();
    dev.activate(
        mem.clone(),
        vec![rxq.device_queue(), txq.device_queue(), evq.device_queue()],
        evts,
        IrqTrigger::new().unwrap(),
    )
    .unwrap();
    // RSTs for connections that do not exist: consumed without a reply.
    let base = 0x90000;
    mem.write_slice(&Guest::hdr(OP_RST, 1, 2).to_bytes(), GuestAddress(base))
        .unwrap();
    let total = usize::from(QUEUE_SIZE);
    for _ in 0..total {
        txq.add_chain(&[(base, HDR_LEN as u32, false)]);
    }
    let drain = |txq: &mut GuestQueue| std::iter::from_fn(|| txq.pop_used()).count();

    dev.process_tx();
    assert_eq!(drain(&mut txq), TX_PACKETS_PER_WAKEUP);
    assert!(TX_PACKETS_PER_WAKEUP < total);
    assert_eq!(tx_evt.read().unwrap(), 1, "no self-notification");

    dev.process_tx();
    assert_eq!(drain(&mut txq), total - TX_PACKETS_PER_WAKEUP);
    assert!(tx_evt.read().is_err(), "rescheduled with nothing left");
    assert!(!dev.needs_reset());
}

/// A guest connect to a host listener whose backlog is full gets an RST at once; it must not
/// block the event loop until the host accepts.
#[test]
fn guest_connect_to_a_full_backlog_is_reset_without_blocking() {
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};

    let mut h = Harness::new();
    h.g.post_rx(4);
    let path = PathBuf::from(format!("{}_4321", h.uds.display()));
    let listener = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&listener, Backlog::new(0).unwrap()).unwrap();
    // Fill the backlog with clients nobody accepts.
    let mut fillers = Vec::new();
    loop {
        match super::muxer::connect_nonblocking(&path) {
            Ok(s) => fillers.push(s),
            Err(super::muxer::ConnectError::Busy(_)) => break,
            Err(e) => panic!("unexpected connect error: {e}"),
        }
        assert!(fillers.len() < 64, "the backlog never filled");
    }

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        h.tx(Guest::hdr(OP_REQUEST, 1234, 4321), &[]);
        let _ = done_tx.send((h.g.recv(), h.dev.connection_count()));
    });
    let (pkt, conns) = done_rx
        .recv_timeout(TIMEOUT)
        .expect("the guest connect blocked on a full backlog");
    let (r, _) = pkt.expect("no RST for the guest");
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 4321, 1234));
    assert_eq!(conns, 0);
    drop(fillers);
}

#[test]
fn connect_errors_are_classified() {
    use super::muxer::{connect_nonblocking, ConnectError};
    let dir = TempDir::new();
    let missing = dir.0.join("missing");
    assert!(matches!(
        connect_nonblocking(&missing),
        Err(ConnectError::NoListener(_))
    ));
    // A socket file nobody listens on any more.
    let stale = dir.0.join("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(matches!(
        connect_nonblocking(&stale),
        Err(ConnectError::NoListener(_))
    ));
    let long = dir.0.join("x".repeat(200));
    assert!(matches!(
        connect_nonblocking(&long),
        Err(ConnectError::Address { .. })
    ));
    let live = dir.0.join("live");
    let l = UnixListener::bind(&live).unwrap();
    let s = connect_nonblocking(&live).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    (&s).write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
}
