//! Device-level tests against REAL tap interfaces: the test plays the guest driver on in-memory
//! virtqueues and watches/injects frames on the host side with an AF_PACKET socket bound to the
//! tap. They need root and /dev/net/tun, and fail (not skip) without them.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{
    mmio_driver_setup, mmio_read, mmio_write, test_memory, EventLoop, GuestQueue,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// IEEE 802 "local experimental" ethertype: nothing else on a test tap uses it.
const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x02];
const TIMEOUT: Duration = Duration::from_secs(5);
const QSIZE: u16 = 256;
const RX_AREA: (u64, u64) = (0x2_0000, 0x8_0000);
const TX_AREA: u64 = 0x8_0000;

fn feat(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(1 << VIRTIO_F_VERSION_1, |f, &b| f | (1 << b))
}

fn require_root_and_tun() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "virtio-net tests need /dev/net/tun (load the tun module)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "virtio-net tests need root (CAP_NET_ADMIN) to create tap devices"
    );
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run `ip` (iproute2 is needed by the virtio-net tests)")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes a link (and optionally a netns) when the test ends, pass or fail.
struct Cleanup {
    link: String,
    netns: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match &self.netns {
            Some(ns) => {
                let _ = ip(&["-n", ns, "link", "del", &self.link]);
                let _ = ip(&["netns", "del", ns]);
            }
            None => {
                let _ = ip(&["link", "del", &self.link]);
            }
        }
    }
}

/// Brings a host-namespace tap up without IPv6 (whose autoconfiguration would add traffic).
fn link_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip_ok(&["link", "set", "dev", name, "up"]);
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The host side of a tap: an AF_PACKET socket bound to it, receiving only `ETHERTYPE`.
struct PacketSock {
    fd: OwnedFd,
}

impl PacketSock {
    fn open(ifname: &str, netns: Option<&Path>) -> Self {
        let ifname = ifname.to_owned();
        match netns {
            None => Self::open_here(&ifname),
            Some(ns) => {
                let ns = ns.to_path_buf();
                thread::spawn(move || {
                    let f = std::fs::File::open(&ns).unwrap();
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    Self::open_here(&ifname)
                })
                .join()
                .unwrap()
            }
        }
    }

    fn open_here(ifname: &str) -> Self {
        Self::open_proto(ifname, ETHERTYPE)
    }

    /// A socket for frames of `ethertype` only (in the caller's network namespace).
    fn open_proto(ifname: &str, ethertype: u16) -> Self {
        let proto = ethertype.to_be();
        // Protocol 0 at socket(2): a packet socket opened with a protocol receives from EVERY
        // interface until bind(2) narrows it, so frames of tests running in parallel on their
        // own taps could be queued here. bind(2) below sets both the protocol and the tap.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh, valid descriptor we own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string alive for the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(
            index,
            0,
            "{ifname} has no ifindex: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the given length, alive for the call.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            ret,
            0,
            "bind(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        Self { fd }
    }

    /// Transmits `frame` on the tap interface, i.e. towards the guest.
    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length during the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the guest sent, if one arrives within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "recv: {e}");
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The guest driver's side of the two queues.
struct Guest {
    mem: GuestMemory,
    rxq: GuestQueue,
    txq: GuestQueue,
    rx_bufs: HashMap<u32, (u64, u32)>,
    rx_next: u64,
    tx_slot: u64,
}

impl Guest {
    fn new(mem: &GuestMemory) -> Self {
        Self {
            mem: mem.clone(),
            rxq: GuestQueue::new(mem, GuestAddress(0x1000), QSIZE),
            txq: GuestQueue::new(mem, GuestAddress(0x6000), QSIZE),
            rx_bufs: HashMap::new(),
            rx_next: RX_AREA.0,
            tx_slot: 0,
        }
    }

    /// Posts `n` single-descriptor rx buffers of `size` bytes.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            if self.rx_next + u64::from(size) > RX_AREA.1 {
                self.rx_next = RX_AREA.0;
            }
            let addr = self.rx_next;
            self.rx_next += u64::from(size);
            self.mem
                .write_slice(&vec![0xee; size as usize], GuestAddress(addr))
                .unwrap();
            let head = self.rxq.add_chain(&[(addr, size, true)]);
            self.rx_bufs.insert(u32::from(head), (addr, size));
        }
    }

    /// Queues `hdr + frame` on the tx queue, split into descriptors of at most `split` bytes.
    fn send(&mut self, hdr: [u8; 12], frame: &[u8], split: usize) -> u16 {
        let base = TX_AREA + (self.tx_slot % 16) * 0x8000;
        self.tx_slot += 1;
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        self.mem.write_slice(&bytes, GuestAddress(base)).unwrap();
        let bufs: Vec<_> = bytes
            .chunks(split)
            .enumerate()
            .map(|(i, c)| (base + (i * split) as u64, c.len() as u32, false))
            .collect();
        self.txq.add_chain(&bufs)
    }

    /// The next received frame: (vnet header, frame, buffers used).
    fn recv(&mut self) -> Option<([u8; 12], Vec<u8>, u16)> {
        let (id, len) = self.rxq.pop_used()?;
        let (addr, size) = self.rx_bufs[&id];
        assert!(
            len >= 12 && len <= size,
            "rx used len {len} for a {size}-byte buffer"
        );
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        let hdr: [u8; 12] = data[..12].try_into().unwrap();
        let nbufs = u16::from_le_bytes([hdr[10], hdr[11]]);
        assert!(nbufs >= 1);
        let mut frame = data[12..].to_vec();
        for _ in 1..nbufs {
            let (id, len) = self.rxq.pop_used().expect("merged buffer missing");
            let (addr, _) = self.rx_bufs[&id];
            let mut more = vec![0u8; len as usize];
            self.mem.read_slice(&mut more, GuestAddress(addr)).unwrap();
            frame.extend(more);
        }
        Some((hdr, frame, nbufs))
    }
}

struct Harness {
    dev: Net,
    g: Guest,
    irq: IrqTrigger,
    sock: PacketSock,
    _cleanup: Cleanup,
}

impl Harness {
    fn new(features: u64) -> Self {
        require_root_and_tun();
        let name = unique("hk");
        let cleanup = Cleanup {
            link: name.clone(),
            netns: None,
        };
        let mut dev = Net::new(NetConfig {
            tap_name: name.clone(),
            mac: Some(GUEST_MAC),
            netns: None,
        })
        .unwrap_or_else(|e| panic!("cannot create tap {name}: {e}"));
        assert_eq!(dev.tap_name(), name);
        link_up(&name);
        let mem = test_memory();
        let g = Guest::new(&mem);
        let irq = IrqTrigger::new().unwrap();
        dev.ack_features(features);
        dev.activate(
            mem,
            vec![g.rxq.device_queue(), g.txq.device_queue()],
            (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            irq.clone(),
        )
        .unwrap();
        let sock = PacketSock::open(&name, None);
        Self {
            dev,
            g,
            irq,
            sock,
            _cleanup: cleanup,
        }
    }

    /// Pumps the device until a frame of ours reaches the guest.
    fn recv_frame(&mut self) -> ([u8; 12], Vec<u8>, u16) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.dev.process_rx();
            while let Some((hdr, frame, n)) = self.g.recv() {
                if frame.len() >= 14 && frame[12..14] == ETHERTYPE.to_be_bytes() {
                    return (hdr, frame, n);
                }
            }
            assert!(Instant::now() < deadline, "no frame reached the guest");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn expect_tx(&mut self, frame: &[u8]) {
        let got = self
            .sock
            .recv(TIMEOUT)
            .expect("frame did not come out of the tap");
        assert_eq!(got, frame);
    }
}

#[test]
fn features_config_and_mac() {
    let h = Harness::new(feat(&[]));
    let f = h.dev.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} not offered");
    }
    assert_eq!(h.dev.device_type(), 1);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256]);
    let mut cfg = [0u8; 8];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    assert_eq!(h.dev.mac(), GUEST_MAC);

    // A random MAC is unicast and locally administered.
    let name = unique("hk");
    let _c = Cleanup {
        link: name.clone(),
        netns: None,
    };
    let n = Net::new(NetConfig {
        tap_name: name,
        mac: None,
        netns: None,
    })
    .unwrap();
    assert_eq!(n.mac()[0] & 0x03, 0x02);

    for bad in ["", "a-name-far-too-long", "a/b", "a b"] {
        let e = Net::new(NetConfig {
            tap_name: bad.into(),
            mac: None,
            netns: None,
        })
        .err()
        .unwrap();
        assert!(
            matches!(e, NetError::Tap(TapError::InvalidName(_))),
            "{bad}: {e}"
        );
    }
    let e = Net::new(NetConfig {
        tap_name: "hkx".into(),
        mac: Some([1, 2, 3, 4, 5, 6]),
        netns: None,
    })
    .err()
    .unwrap();
    assert!(matches!(e, NetError::MulticastMac(_)), "{e}");
    let e = Net::new(NetConfig {
        tap_name: "hkx".into(),
        mac: None,
        netns: Some("/nonexistent/netns".into()),
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
}

#[test]
fn tx_frames_come_out_of_the_tap() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    let frame = eth_frame([0xff; 6], GUEST_MAC, &payload(300, 1));
    // One descriptor; header and frame split across many descriptors.
    for split in [4096, 7, 12, 100] {
        let head = h.g.send([0; 12], &frame, split);
        h.dev.process_tx();
        assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)));
        h.expect_tx(&frame);
    }
    assert_ne!(h.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    // A batch gets one interrupt.
    let _ = h.irq.event().read();
    for i in 0..10u8 {
        h.g.send([0; 12], &eth_frame([0xff; 6], GUEST_MAC, &[i; 60]), 4096);
    }
    h.dev.process_tx();
    assert_eq!(h.irq.event().read().unwrap(), 1);
    for i in 0..10u8 {
        assert!(h.g.txq.pop_used().is_some());
        h.expect_tx(&eth_frame([0xff; 6], GUEST_MAC, &[i; 60]));
    }
    let s = h.dev.stats();
    assert_eq!((s.tx_frames, s.tx_dropped, s.tx_malformed), (14, 0, 0));
    assert_eq!(s.tx_bytes, 4 * frame.len() as u64 + 10 * 74);
}

#[test]
fn rx_frames_land_in_the_guest_with_a_vnet_header() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_GUEST_CSUM]));
    h.g.post_rx(16, 2048);
    for len in [46, 500, 1486] {
        let frame = eth_frame(GUEST_MAC, PEER_MAC, &payload(len, 9));
        h.sock.send(&frame);
        let (hdr, got, nbufs) = h.recv_frame();
        assert_eq!(got, frame);
        assert_eq!(nbufs, 1);
        // No checksum offload, no GSO for a frame injected with a packet socket.
        assert_eq!(hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        assert_eq!(hdr[1], GSO_NONE);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    }
    assert_ne!(h.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    let s = h.dev.stats();
    assert!(s.rx_frames >= 3);
    assert_eq!((s.rx_dropped, s.rx_malformed), (0, 0));
}

#[test]
fn rx_frames_span_mergeable_buffers() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    h.g.post_rx(64, 64);
    let frame = eth_frame(GUEST_MAC, PEER_MAC, &payload(286, 3));
    h.sock.send(&frame);
    let (_, got, nbufs) = h.recv_frame();
    // 12 + 300 bytes in 64-byte buffers.
    assert_eq!(nbufs, 5);
    assert_eq!(got, frame);
}

#[test]
fn without_mergeable_buffers_a_frame_must_fit_one_buffer() {
    let mut h = Harness::new(feat(&[]));
    h.g.post_rx(1, 256);
    let big = eth_frame(GUEST_MAC, PEER_MAC, &payload(400, 5));
    let small = eth_frame(GUEST_MAC, PEER_MAC, &payload(100, 6));
    h.sock.send(&big);
    h.sock.send(&small);
    let (hdr, got, nbufs) = h.recv_frame();
    assert_eq!((got, nbufs), (small, 1));
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    assert!(h.dev.stats().rx_dropped >= 1);
}

#[test]
fn rx_backpressure_keeps_frames_until_buffers_arrive() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    let frames: Vec<_> = (0..3)
        .map(|i| eth_frame(GUEST_MAC, PEER_MAC, &payload(200, i)))
        .collect();
    for f in &frames {
        h.sock.send(f);
    }
    // No buffers: nothing is read, the device stops asking for tap input.
    thread::sleep(Duration::from_millis(50));
    h.dev.process_rx();
    assert!(!h.dev.wants_tap_input());
    assert_eq!(h.dev.stats().rx_frames, 0);
    assert!(h.g.rxq.pop_used().is_none());

    // One buffer too small for a whole frame (MRG): the frame is held, not dropped.
    h.g.post_rx(1, 100);
    h.dev.rx_queue_notified();
    assert!(!h.dev.wants_tap_input());
    assert!(h.g.rxq.pop_used().is_none());

    h.g.post_rx(8, 2048);
    h.dev.rx_queue_notified();
    for f in &frames {
        let (_, got, _) = h.recv_frame();
        assert_eq!(&got, f);
    }
    assert!(h.dev.wants_tap_input());
    assert_eq!(h.dev.stats().rx_dropped, 0);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_CSUM]));
    let frame = eth_frame([0xff; 6], GUEST_MAC, &payload(100, 2));
    let good = |h: &mut Harness| {
        let head = h.g.send([0; 12], &frame, 4096);
        h.dev.process_tx();
        assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)));
        h.expect_tx(&frame);
    };
    let dropped = |h: &mut Harness, head: u16, what: &str| {
        let before = h.dev.stats();
        h.dev.process_tx();
        assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)), "{what}");
        let after = h.dev.stats();
        assert_eq!(
            after.tx_malformed + after.tx_dropped,
            before.tx_malformed + before.tx_dropped + 1,
            "{what}"
        );
        assert_eq!(after.tx_frames, before.tx_frames, "{what}");
    };

    let head = h.g.txq.add_chain(&[(TX_AREA, 0, false)]);
    dropped(&mut h, head, "zero length");
    let head =
        h.g.txq
            .add_chain(&[(TX_AREA, 12, false), (0xfff_0000, 100, false)]);
    dropped(&mut h, head, "out of range");
    let head =
        h.g.txq
            .add_chain(&[(TX_AREA, 12, false), (TX_AREA + 12, 100, true)]);
    dropped(&mut h, head, "device-writable descriptor");
    let head = h.g.txq.add_chain(&[(TX_AREA, 11, false)]);
    dropped(&mut h, head, "shorter than the header");
    h.g.txq.set_desc(200, TX_AREA, 12, VRING_DESC_F_NEXT, 201);
    h.g.txq.set_desc(201, TX_AREA, 100, VRING_DESC_F_NEXT, 200);
    h.g.txq.publish(200);
    dropped(&mut h, 200, "loop");
    // Larger than any frame, from overlapping descriptors: dropped without a big allocation.
    let bufs: Vec<_> = (0..40).map(|_| (TX_AREA, 0x1_0000, false)).collect();
    let head = h.g.txq.add_chain(&bufs);
    dropped(&mut h, head, "too large");
    let bufs: Vec<_> = (0..MAX_CHAIN_DESCS + 1)
        .map(|_| (TX_AREA, 20, false))
        .collect();
    let head = h.g.txq.add_chain(&bufs);
    dropped(&mut h, head, "too many descriptors");
    // TSO without HOST_TSO4, and an unknown GSO type.
    let mut hdr = [0u8; 12];
    hdr[1] = GSO_TCPV4;
    let head = h.g.send(hdr, &frame, 4096);
    dropped(&mut h, head, "undeclared TSO");
    hdr[1] = 3;
    let head = h.g.send(hdr, &frame, 4096);
    dropped(&mut h, head, "unknown gso type");
    let s = h.dev.stats();
    assert_eq!((s.tx_malformed, s.tx_dropped), (6, 3));
    // Nothing of that reached the wire, and the device still works.
    assert!(h.sock.recv(Duration::from_millis(50)).is_none());
    good(&mut h);
    // A negotiated checksum offload request is passed to the tap, which fills the checksum.
    // (IPv4/UDP: csum_start = 14 + 20, csum_offset = 6.)
    let mut ipv4_udp = vec![
        0x45, 0, 0, 36, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ipv4_udp.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 16, 0, 0]);
    ipv4_udp.extend_from_slice(b"husk-udp");
    let mut f = eth_frame([0xff; 6], GUEST_MAC, &ipv4_udp);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut hdr = [0u8; 12];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&6u16.to_le_bytes());
    let head = h.g.send(hdr, &f, 4096);
    h.dev.process_tx();
    assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)));
    assert_eq!(h.dev.stats().tx_frames, 2);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    let (a, b) = (RX_AREA.0, RX_AREA.0 + 0x1000);
    let h1 = h.g.rxq.add_chain(&[(a, 2048, false)]);
    let h2 = h.g.rxq.add_chain(&[(a, 8, true)]);
    let h3 = h.g.rxq.add_chain(&[(a, 0, true)]);
    h.g.rxq
        .set_desc(100, a, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 100);
    h.g.rxq.publish(100);
    let good = h.g.rxq.add_chain(&[(b, 2048, true)]);
    h.g.rx_bufs.insert(u32::from(good), (b, 2048));
    let frame = eth_frame(GUEST_MAC, PEER_MAC, &payload(80, 4));
    h.sock.send(&frame);
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        h.dev.process_rx();
        while let Some(u) = h.g.rxq.pop_used() {
            seen.push(u);
        }
        if seen.len() >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "used ring: {seen:?}");
        thread::sleep(Duration::from_millis(2));
    }
    let bad: Vec<_> = seen[..4].to_vec();
    assert_eq!(bad, [h1, h2, h3, 100].map(|i| (u32::from(i), 0)).to_vec());
    assert_eq!(seen[4].0, u32::from(good));
    assert_eq!(h.dev.stats().rx_malformed, 4);
    // The good buffer got a frame (ours, or some other traffic on the tap).
    assert!(seen[4].1 > 12);
}

#[test]
fn tap_in_another_network_namespace() {
    require_root_and_tun();
    let ns = unique("hkns");
    ip_ok(&["netns", "add", &ns]);
    let name = unique("hk");
    let _cleanup = Cleanup {
        link: name.clone(),
        netns: Some(ns.clone()),
    };
    // A pre-existing persistent tap inside the namespace, as CNI plugins leave them.
    ip_ok(&["-n", &ns, "tuntap", "add", "dev", &name, "mode", "tap"]);
    let ns_path = PathBuf::from(format!("/var/run/netns/{ns}"));
    let our_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let mut dev = Net::new(NetConfig {
        tap_name: name.clone(),
        mac: Some(GUEST_MAC),
        netns: Some(ns_path.clone()),
    })
    .unwrap();
    assert!(ip(&["-n", &ns, "link", "show", &name]).status.success());
    assert!(
        !ip(&["link", "show", &name]).status.success(),
        "tap leaked into the host namespace"
    );
    // Our own namespace is untouched.
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        our_ns
    );
    ip_ok(&["-n", &ns, "link", "set", "dev", &name, "up"]);

    let mem = test_memory();
    let mut g = Guest::new(&mem);
    dev.ack_features(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    dev.activate(
        mem,
        vec![g.rxq.device_queue(), g.txq.device_queue()],
        (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        IrqTrigger::new().unwrap(),
    )
    .unwrap();
    let sock = PacketSock::open(&name, Some(&ns_path));
    let frame = eth_frame([0xff; 6], GUEST_MAC, b"hello from the guest");
    g.send([0; 12], &frame, 4096);
    dev.process_tx();
    assert_eq!(sock.recv(TIMEOUT).expect("no frame in the netns"), frame);

    g.post_rx(4, 2048);
    let frame = eth_frame(GUEST_MAC, PEER_MAC, b"hello from the netns");
    sock.send(&frame);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        dev.process_rx();
        if let Some((_, got, _)) = g.recv() {
            if got[12..14] == ETHERTYPE.to_be_bytes() {
                assert_eq!(got, frame);
                break;
            }
        }
        assert!(Instant::now() < deadline, "no frame from the netns");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The whole stack as the VMM wires it: MMIO registers, an event manager thread, notifications
/// through the transport, interrupts through the irq eventfd, and rx backpressure through the
/// tap's epoll registration.
#[test]
fn event_manager_drives_device_through_mmio_transport() {
    require_root_and_tun();
    let name = unique("hk");
    let _cleanup = Cleanup {
        link: name.clone(),
        netns: None,
    };
    let net = Arc::new(Mutex::new(
        Net::new(NetConfig {
            tap_name: name.clone(),
            mac: Some(GUEST_MAC),
            netns: None,
        })
        .unwrap(),
    ));
    link_up(&name);
    let sock = PacketSock::open(&name, None);
    let mem = test_memory();
    let mut t = MmioTransport::new(mem.clone(), net.clone()).unwrap();
    let event_loop = EventLoop::start(net.clone());

    let (w, r) = (mmio_write, mmio_read);
    assert_eq!(r(&mut t, 0x08), 1);
    let mut g = Guest::new(&mem);
    mmio_driver_setup(&mut t, |_, offered| offered, &[&g.rxq, &g.txq]);
    w(&mut t, 0x70, 15);
    assert_eq!(t.status(), 15);
    let mac: Vec<u8> = (0..6u64)
        .map(|i| {
            let mut b = [0u8; 1];
            t.read(0x100 + i, &mut b);
            b[0]
        })
        .collect();
    assert_eq!(mac, GUEST_MAC);

    // tx through the queue notification.
    let frame = eth_frame([0xff; 6], GUEST_MAC, b"tx via mmio");
    g.send([0; 12], &frame, 4096);
    w(&mut t, 0x50, 1);
    assert_eq!(sock.recv(TIMEOUT).expect("tx frame"), frame);

    let wait_rx = |g: &mut Guest, want: &[u8]| {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((_, got, _)) = g.recv() {
                if got[12..14] == ETHERTYPE.to_be_bytes() {
                    assert_eq!(got, want);
                    return;
                }
            }
            assert!(Instant::now() < deadline, "rx frame never arrived");
            thread::sleep(Duration::from_millis(2));
        }
    };
    // rx with buffers posted.
    g.post_rx(4, 2048);
    w(&mut t, 0x50, 0);
    let frame = eth_frame(GUEST_MAC, PEER_MAC, b"rx via mmio");
    sock.send(&frame);
    wait_rx(&mut g, &frame);
    assert!(t.interrupt_evt().read().unwrap() >= 1);

    // Use up the remaining buffers with frames of ours, then one more frame must wait.
    for i in 0..3u8 {
        let f = eth_frame(GUEST_MAC, PEER_MAC, &[i; 50]);
        sock.send(&f);
        wait_rx(&mut g, &f);
    }
    let waiting = eth_frame(GUEST_MAC, PEER_MAC, b"waits for a buffer");
    sock.send(&waiting);
    thread::sleep(Duration::from_millis(100));
    assert!(g.rxq.pop_used().is_none());
    assert!(!net.lock().unwrap().wants_tap_input());
    g.post_rx(4, 2048);
    w(&mut t, 0x50, 0);
    wait_rx(&mut g, &waiting);

    // Driver reset stops the device.
    w(&mut t, 0x70, 0);
    assert!(!net.lock().unwrap().is_active());
    event_loop.stop();
}

/// With EVENT_IDX the rx ring asks for a notification only when the device runs out of buffers
/// (refills while it has some cost no VM exit), and available indexes beyond the queue size (a
/// broken or hostile ring: every pop fails while the ring claims entries) make neither queue spin.
#[test]
fn event_idx_rx_notifications_only_when_stalled_and_broken_rings_do_not_spin() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX]));
    let (_, rx_avail, rx_used) = h.g.rxq.addrs();
    let avail_event = GuestAddress(rx_used + 4 + 8 * u64::from(QSIZE));
    h.g.post_rx(4, 2048);
    h.dev.rx_queue_notified();
    assert!(h.dev.wants_tap_input());
    // One buffer taken for the next frame; the driver is not asked about refills.
    assert_eq!(h.g.mem.read_obj::<u16>(avail_event).unwrap(), 0);

    let frames: Vec<_> = (0..5)
        .map(|i| eth_frame(GUEST_MAC, PEER_MAC, &payload(300, i)))
        .collect();
    for f in &frames {
        h.sock.send(f);
    }
    let deadline = Instant::now() + TIMEOUT;
    while h.dev.stats().rx_frames < 4 {
        assert!(Instant::now() < deadline, "frames did not reach the guest");
        thread::sleep(Duration::from_millis(5));
        h.dev.process_rx();
    }
    // Out of buffers with a frame pending: now the driver is asked to notify at index 4.
    assert!(!h.dev.wants_tap_input());
    assert_eq!(h.g.mem.read_obj::<u16>(avail_event).unwrap(), 4);

    let (_, tx_avail, _) = h.g.txq.addrs();
    // More than QSIZE entries beyond what the device has seen.
    h.g.mem
        .write_obj(1000u16, GuestAddress(rx_avail + 2))
        .unwrap();
    h.g.mem
        .write_obj(1000u16, GuestAddress(tx_avail + 2))
        .unwrap();
    h.dev.rx_queue_notified();
    h.dev.process_tx();
    assert!(!h.dev.wants_tap_input());
    assert!(h.dev.needs_reset());
}

/// A tx ring that breaks at run time (a head index beyond the queue) puts the device into
/// NEEDS_RESET: a config interrupt, no more frames out of the tap and no more tap input until
/// the driver resets it; then it works again.
#[test]
fn broken_ring_needs_reset_until_the_driver_resets() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    let frame = eth_frame([0xff; 6], GUEST_MAC, &payload(100, 7));
    h.g.post_rx(4, 2048);
    h.dev.rx_queue_notified();
    assert!(h.dev.wants_tap_input());
    h.g.send([0; 12], &frame, 4096);
    h.dev.process_tx();
    h.expect_tx(&frame);
    assert!(h.g.txq.pop_used().is_some());
    let _ = h.irq.event().read();
    h.irq.ack(u32::MAX);

    h.g.txq.publish(QSIZE + 3);
    h.g.send([0; 12], &frame, 4096);
    h.dev.process_tx();
    assert!(h.dev.needs_reset());
    assert!(!h.dev.is_active());
    assert!(!h.dev.wants_tap_input());
    assert_eq!(
        h.irq.status(),
        crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(h.irq.event().read().unwrap(), 1);
    // The well-formed frame behind the broken entry never leaves, whatever the driver does.
    h.dev.process_tx();
    h.dev.rx_queue_notified();
    assert_eq!(h.g.txq.pop_used(), None);
    assert!(h.sock.recv(Duration::from_millis(100)).is_none());
    assert!(h.irq.event().read().is_err());

    h.dev.reset();
    assert!(!h.dev.needs_reset());
    let mem = h.g.mem.clone();
    h.g = Guest::new(&mem);
    h.dev.ack_features(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    h.dev
        .activate(
            mem,
            vec![h.g.rxq.device_queue(), h.g.txq.device_queue()],
            (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            h.irq.clone(),
        )
        .unwrap();
    let head = h.g.send([0; 12], &frame, 4096);
    h.dev.process_tx();
    assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)));
    h.expect_tx(&frame);
}

/// Deletes links when the test ends, pass or fail (a veth takes its peer with it).
struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for l in self.0.iter().rev() {
            let _ = ip(&["link", "del", l]);
        }
    }
}

/// Frames the guest queues while the tap cannot take them stay on the ring, in order: the
/// device stops at the first EAGAIN, keeps that chain, waits for the tap to become writable
/// and resumes with the same chain, so every frame leaves exactly once.
///
/// A tap write only returns EAGAIN when the skbs written earlier, still charged to the tap's
/// socket, exceed its send buffer; the kernel normally frees them before the write returns.
/// Here the tap is bridged to a veth whose qdisc (tbf, 2 Mbit/s) holds them, and the tap's
/// send buffer is 16 KiB, so a burst of 64 frames of 1 KiB fills it; the qdisc then drains
/// (a frame every 4 ms) and the tap polls writable again.
#[test]
fn tx_backpressure_keeps_the_chain_until_the_tap_is_writable() {
    require_root_and_tun();
    let (tap, br, veth, peer) = (unique("hk"), unique("hkb"), unique("hkv"), unique("hkw"));
    let _links = Links(vec![tap.clone(), veth.clone(), br.clone()]);
    let mut dev = Net::new(NetConfig {
        tap_name: tap.clone(),
        mac: Some(GUEST_MAC),
        netns: None,
    })
    .unwrap();
    let sndbuf: libc::c_int = 16 * 1024;
    // SAFETY: TUNSETSNDBUF reads one `int` through the pointer, valid for the call; the fd is
    // the device's tap.
    let ret = unsafe { libc::ioctl(dev.tap.as_raw_fd(), libc::TUNSETSNDBUF, &sndbuf) };
    assert_eq!(ret, 0, "TUNSETSNDBUF: {}", std::io::Error::last_os_error());
    ip_ok(&["link", "add", &br, "type", "bridge"]);
    ip_ok(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
    ip_ok(&["link", "set", &veth, "master", &br]);
    ip_ok(&["link", "set", &tap, "master", &br]);
    let tc = Command::new("tc")
        .args(["qdisc", "add", "dev", &veth, "root", "tbf", "rate", "2mbit"])
        .args(["burst", "1600", "limit", "1000000"])
        .output()
        .expect("cannot run `tc` (iproute2 is needed by the virtio-net tests)");
    assert!(
        tc.status.success(),
        "tc: {}",
        String::from_utf8_lossy(&tc.stderr)
    );
    for l in [&peer, &veth, &tap, &br] {
        link_up(l);
    }
    let sock = PacketSock::open(&peer, None);

    let mem = test_memory();
    let mut g = Guest::new(&mem);
    dev.ack_features(feat(&[VIRTIO_NET_F_MRG_RXBUF]));
    dev.activate(
        mem.clone(),
        vec![g.rxq.device_queue(), g.txq.device_queue()],
        (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        IrqTrigger::new().unwrap(),
    )
    .unwrap();
    // Unicast to an unknown MAC: the bridge floods it to the veth only.
    const N: usize = 64;
    let frames: Vec<_> = (0..N)
        .map(|i| eth_frame(PEER_MAC, GUEST_MAC, &payload(1000, i as u8)))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        let addr = TX_AREA + 0x800 * i as u64;
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(f);
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        g.txq.add_chain(&[(addr, bytes.len() as u32, false)]);
    }
    let next_avail = |dev: &Net| dev.state.active().unwrap().queues[TXQ].next_avail();
    let mut used = Vec::new();
    let collect = |g: &mut Guest, used: &mut Vec<u32>| {
        while let Some((id, len)) = g.txq.pop_used() {
            assert_eq!(len, 0);
            used.push(id);
        }
    };

    dev.process_tx();
    collect(&mut g, &mut used);
    assert!(
        dev.tx.blocked,
        "all {N} frames went out at once: the tap never said EAGAIN"
    );
    assert!(used.len() < N);
    // Stopped at the chain the tap refused: it is neither returned nor skipped.
    assert_eq!(usize::from(next_avail(&dev)), used.len());
    assert_eq!(dev.stats().tx_frames, used.len() as u64);
    assert!(dev.desired_tap_events().contains(EventSet::OUT));

    let deadline = Instant::now() + TIMEOUT;
    let mut rounds = 1;
    while used.len() < N {
        // What the event loop waits for before it calls process_tx again.
        let mut pfd = libc::pollfd {
            fd: dev.tap.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
        assert_eq!(n, 1, "the tap never became writable again");
        dev.process_tx();
        rounds += 1;
        collect(&mut g, &mut used);
        assert_eq!(usize::from(next_avail(&dev)), used.len());
        if used.len() < N {
            assert!(dev.tx.blocked && dev.desired_tap_events().contains(EventSet::OUT));
        }
        assert!(Instant::now() < deadline, "stuck at {} frames", used.len());
    }
    assert!(!dev.tx.blocked);
    assert!(!dev.desired_tap_events().contains(EventSet::OUT));
    assert!(rounds > 2, "backpressure lasted only one round");
    assert_eq!(used, (0..N as u32).collect::<Vec<_>>());
    let s = dev.stats();
    assert_eq!(
        (s.tx_frames, s.tx_dropped, s.tx_malformed),
        (N as u64, 0, 0)
    );
    // Every frame left exactly once, in order.
    for (i, f) in frames.iter().enumerate() {
        let got = sock
            .recv(TIMEOUT)
            .unwrap_or_else(|| panic!("frame {i} never arrived"));
        assert!(got == *f, "frame {i} differs (a duplicate or a lost frame)");
    }
    assert!(
        sock.recv(Duration::from_millis(100)).is_none(),
        "a frame came twice"
    );
}

/// A TSO frame (HOST_TSO4, gso_type TCPV4, 4 KiB of TCP payload: far above the tap's MTU) is
/// sent whole, and the kernel sees the offload request the guest made: read back through a
/// packet socket with PACKET_VNET_HDR, which reports the skb's GSO and checksum state.
#[test]
fn tso_frame_reaches_the_tap_with_its_vnet_header() {
    let mut h = Harness::new(feat(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]));
    let sock = PacketSock::open_proto(h.dev.tap_name(), 0x0800);
    let on: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR reads one `int` through the pointer, valid for the call.
    let ret = unsafe {
        libc::setsockopt(
            sock.fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(
        ret,
        0,
        "PACKET_VNET_HDR: {}",
        std::io::Error::last_os_error()
    );

    const DATA: usize = 4000;
    const MSS: u16 = 1448;
    let mut ip = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&((20 + 20 + DATA) as u16).to_be_bytes());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // Ports 40000 -> 5001, seq 1, ack 1, data offset 5, ACK|PSH, window 65535.
    let mut tcp = vec![
        0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend(payload(DATA, 11));
    let mut l3 = ip;
    l3.extend(tcp);
    let mut frame = eth_frame(PEER_MAC, GUEST_MAC, &l3);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut hdr = [0u8; 12];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[1] = GSO_TCPV4;
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&MSS.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    let head = h.g.send(hdr, &frame, 1500);
    h.dev.process_tx();
    assert_eq!(h.g.txq.pop_used(), Some((u32::from(head), 0)));
    let s = h.dev.stats();
    assert_eq!((s.tx_frames, s.tx_dropped, s.tx_malformed), (1, 0, 0));
    assert_eq!(s.tx_bytes, frame.len() as u64);

    // The socket also sees whatever else IPv4 the host sends on the tap: find ours.
    let deadline = Instant::now() + TIMEOUT;
    let got = loop {
        let got = sock
            .recv(TIMEOUT)
            .expect("the TSO frame never reached the tap");
        if got.len() > 10 + 12 && got[10 + 6..10 + 12] == GUEST_MAC {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the TSO frame never reached the tap"
        );
    };
    // struct virtio_net_hdr (10 bytes), then the frame, in one piece.
    let (vh, f) = got.split_at(10);
    let le = |i: usize| u16::from_le_bytes([vh[i], vh[i + 1]]);
    assert_eq!(f, &frame[..], "the frame was changed or cut");
    assert_eq!(vh[1], GSO_TCPV4, "gso_type lost: {vh:?}");
    assert_eq!(le(4), MSS, "gso_size: {vh:?}");
    assert_ne!(
        vh[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        0,
        "NEEDS_CSUM lost: {vh:?}"
    );
    assert_eq!((le(6), le(8)), (34, 16), "csum_start/offset: {vh:?}");
}
