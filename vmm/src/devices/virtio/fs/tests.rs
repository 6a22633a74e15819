//! Device tests without virtiofsd: a scripted vhost-user peer on a Unix socket stands in for the
//! daemon. The end-to-end test with the real daemon is tests/tests/vm_shared_fs.rs.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::devices::virtio::test_utils::GuestQueue;
use crate::memory::{create_guest_memory_with, MemoryBacking};

// vhost-user request codes the fake peer knows.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// What the fake daemon saw.
#[derive(Default)]
struct Seen {
    requests: Vec<u32>,
    acked_features: Vec<u64>,
    mem_fds: usize,
    call_fds: Vec<File>,
}

struct FakeDaemon {
    socket: std::path::PathBuf,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// `queue_num`: what GET_QUEUE_NUM answers. `hang_up_after`: close the connection after this many
/// requests.
fn fake_daemon(queue_num: u64, hang_up_after: Option<usize>) -> FakeDaemon {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, queue_num, hang_up_after, &s);
    });
    FakeDaemon {
        socket,
        seen,
        thread: Some(thread),
        _dir: dir,
    }
}

fn serve(mut stream: UnixStream, queue_num: u64, hang_up_after: Option<usize>, seen: &Mutex<Seen>) {
    let mut buf = Vec::new();
    let mut fds: Vec<File> = Vec::new();
    let mut handled = 0usize;
    loop {
        // Complete messages first; read more only when none is buffered.
        if buf.len() >= 12 {
            let word = |i: usize| u32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
            let (code, flags, size) = (word(0), word(1), word(2) as usize);
            if buf.len() >= 12 + size {
                let body: Vec<u8> = buf[12..12 + size].to_vec();
                buf.drain(..12 + size);
                if hang_up_after == Some(handled) {
                    return;
                }
                handled += 1;
                let mut s = seen.lock().unwrap();
                s.requests.push(code);
                let value = match code {
                    // VERSION_1, EVENT_IDX, PROTOCOL_FEATURES, and bit 0 which must not reach the guest.
                    GET_FEATURES => Some((1u64 << 32) | (1 << 29) | (1 << 30) | 1),
                    // MQ, REPLY_ACK, CONFIG (0x200, not accepted by the frontend).
                    GET_PROTOCOL_FEATURES => Some(0x1 | 0x8 | 0x200),
                    GET_QUEUE_NUM => Some(queue_num),
                    GET_VRING_BASE => Some(u64::from_le_bytes(body[..8].try_into().unwrap())),
                    _ => None,
                };
                if code == SET_FEATURES {
                    s.acked_features
                        .push(u64::from_le_bytes(body[..8].try_into().unwrap()));
                }
                if code == SET_MEM_TABLE {
                    s.mem_fds += fds.len();
                    fds.clear();
                }
                if code == SET_VRING_CALL {
                    s.call_fds.append(&mut fds);
                }
                if code == SET_VRING_KICK {
                    fds.clear();
                }
                drop(s);
                let reply = match value {
                    Some(v) => Some(v),
                    None if flags & FLAG_NEED_REPLY != 0 => Some(0),
                    None => None,
                };
                if let Some(v) = reply {
                    let mut msg = Vec::with_capacity(20);
                    msg.extend_from_slice(&code.to_le_bytes());
                    msg.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                    msg.extend_from_slice(&8u32.to_le_bytes());
                    msg.extend_from_slice(&v.to_le_bytes());
                    if stream.write_all(&msg).is_err() {
                        return;
                    }
                }
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.recv_with_fd(&mut chunk) {
            Ok((0, _)) | Err(_) => return,
            Ok((n, fd)) => {
                buf.extend_from_slice(&chunk[..n]);
                fds.extend(fd);
            }
        }
    }
}

impl FakeDaemon {
    fn cfg(&self) -> FsConfig {
        FsConfig {
            socket: self.socket.clone(),
            tag: "pod-share".into(),
        }
    }

    fn requests(&self) -> Vec<u32> {
        self.seen.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[test]
fn tags_are_validated() {
    assert_eq!(&validate_tag("rootfs").unwrap()[..7], b"rootfs\0");
    assert!(validate_tag(&"t".repeat(TAG_LEN)).is_ok());
    assert!(matches!(
        validate_tag(&"t".repeat(TAG_LEN + 1)),
        Err(FsError::TagLength { len: 37, .. })
    ));
    assert!(matches!(validate_tag(""), Err(FsError::TagLength { .. })));
    assert!(matches!(validate_tag("a\0b"), Err(FsError::TagNul(_))));
    // A bad tag is refused before any connection is tried.
    let e = Fs::new(FsConfig {
        socket: "/nonexistent/vhost.sock".into(),
        tag: String::new(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, FsError::TagLength { .. }), "{e}");
}

#[test]
fn a_missing_daemon_socket_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Fs::new(FsConfig {
        socket: dir.path().join("absent.sock"),
        tag: "x".into(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, FsError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("absent.sock"), "{e}");
}

#[test]
fn a_daemon_that_hangs_up_during_negotiation_is_an_error() {
    for after in 0..4 {
        let d = fake_daemon(2, Some(after));
        let e = Fs::new(d.cfg()).err().expect("negotiation must fail");
        assert!(matches!(e, FsError::Backend { .. }), "after {after}: {e}");
    }
}

#[test]
fn a_daemon_with_too_few_queues_is_refused() {
    let d = fake_daemon(1, None);
    let e = Fs::new(d.cfg()).err().unwrap();
    assert!(matches!(e, FsError::TooFewQueues { got: 1, .. }), "{e}");
}

#[test]
fn negotiation_masks_features_and_fills_the_config_space() {
    let d = fake_daemon(2, None);
    let fs = Fs::new(d.cfg()).unwrap();
    assert_eq!(fs.device_type(), FS_DEVICE_ID);
    assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    // Only VERSION_1 and EVENT_IDX pass; PROTOCOL_FEATURES and unknown bits stay between us.
    assert_eq!(fs.avail_features(), (1 << 32) | (1 << 29));
    assert_eq!(
        fs.protocol_features(),
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    );
    let mut cfg = [0xffu8; CONFIG_LEN];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..10], b"pod-share\0");
    assert!(cfg[9..TAG_LEN].iter().all(|b| *b == 0));
    assert_eq!(&cfg[TAG_LEN..], &1u32.to_le_bytes());
    let mut tail = [0xffu8; 8];
    fs.read_config(CONFIG_LEN as u64 - 2, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        d.requests(),
        vec![
            SET_OWNER,
            GET_FEATURES,
            SET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM
        ]
    );
}

fn ready_queues(mem: &GuestMemory) -> (Vec<Queue>, Vec<EventFd>) {
    let queues = (0..NUM_QUEUES)
        .map(|i| {
            GuestQueue::new(mem, GuestAddress(0x10_0000 + 0x1_0000 * i as u64), 64).device_queue()
        })
        .collect();
    let evts = (0..NUM_QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    (queues, evts)
}

fn run_until(em: &mut EventManager<Arc<Mutex<Fs>>>, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        em.run_with_timeout(20).unwrap();
        if done() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the event loop"
        );
    }
}

#[test]
fn activation_hands_the_rings_to_the_daemon_and_forwards_its_interrupts() {
    let d = fake_daemon(2, None);
    let fs = Arc::new(Mutex::new(Fs::new(d.cfg()).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
    em.add_subscriber(fs.clone());
    let mem = create_guest_memory_with(64, MemoryBacking::SharedMemfd).unwrap();
    let (queues, evts) = ready_queues(&mem);
    let irq = IrqTrigger::new().unwrap();
    {
        let mut f = fs.lock().unwrap();
        f.ack_features((1 << 32) | (1 << 29));
        f.activate(mem.clone(), queues, evts, irq.clone()).unwrap();
        assert!(f.is_active());
    }
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut expect = vec![SET_FEATURES, SET_MEM_TABLE];
    expect.extend(per_queue);
    expect.extend(per_queue);
    assert_eq!(&d.requests()[6..], &expect[..]);
    {
        let seen = d.seen.lock().unwrap();
        assert_eq!(seen.mem_fds, 1, "the memfd goes with SET_MEM_TABLE");
        assert_eq!(seen.acked_features[1], (1 << 32) | (1 << 29) | (1 << 30));
        assert_eq!(seen.call_fds.len(), NUM_QUEUES);
    }
    // The daemon signals queue 1's call fd: the guest gets a VRING interrupt.
    run_until(&mut em, || true);
    let _ = irq.event().read();
    let mut f = d.seen.lock().unwrap().call_fds[1].try_clone().unwrap();
    f.write_all(&1u64.to_ne_bytes()).unwrap();
    run_until(&mut em, || fs.lock().unwrap().interrupts() == 1);
    assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
    assert_eq!(irq.event().read().unwrap(), 1);

    // Reset stops both rings in the daemon; a second activation sends everything again.
    fs.lock().unwrap().reset();
    assert_eq!(
        d.requests()
            .iter()
            .filter(|c| **c == GET_VRING_BASE)
            .count(),
        2
    );
    let (queues, evts) = ready_queues(&mem);
    fs.lock()
        .unwrap()
        .activate(mem.clone(), queues, evts, irq.clone())
        .unwrap();
    run_until(&mut em, || true);
    assert!(!fs.lock().unwrap().needs_reset());
}

#[test]
fn daemon_death_marks_the_device_for_reset_without_crashing() {
    let d = fake_daemon(2, Some(6 + 2 + 12));
    let fs = Arc::new(Mutex::new(Fs::new(d.cfg()).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
    em.add_subscriber(fs.clone());
    let mem = create_guest_memory_with(64, MemoryBacking::SharedMemfd).unwrap();
    let (queues, evts) = ready_queues(&mem);
    let irq = IrqTrigger::new().unwrap();
    fs.lock()
        .unwrap()
        .activate(mem.clone(), queues, evts, irq.clone())
        .unwrap();
    // The next request makes the fake daemon hang up; the event loop notices the socket close.
    let (q, e) = ready_queues(&mem);
    assert!(matches!(
        fs.lock().unwrap().activate(mem.clone(), q, e, irq.clone()),
        Err(ActivateError::AlreadyActive)
    ));
    fs.lock().unwrap().reset();
    run_until(&mut em, || fs.lock().unwrap().is_dead());
    assert!(fs.lock().unwrap().needs_reset());
    // A dead daemon cannot be activated again, and nothing panics.
    let (q, e) = ready_queues(&mem);
    let err = fs.lock().unwrap().activate(mem.clone(), q, e, irq.clone());
    assert!(matches!(err, Err(ActivateError::Backend(_))), "{err:?}");
    run_until(&mut em, || true);
}

#[test]
fn activation_needs_two_ready_queues_and_a_live_daemon() {
    let d = fake_daemon(2, Some(6));
    let mut fs = Fs::new(d.cfg()).unwrap();
    let mem = create_guest_memory_with(64, MemoryBacking::SharedMemfd).unwrap();
    let irq = IrqTrigger::new().unwrap();
    let (mut q, mut e) = ready_queues(&mem);
    q.pop();
    e.pop();
    assert!(matches!(
        fs.activate(mem.clone(), q, e, irq.clone()),
        Err(ActivateError::QueueCount { expected: 2, .. })
    ));
    let (mut q, e) = ready_queues(&mem);
    q[1].set_ready(false);
    assert!(matches!(
        fs.activate(mem.clone(), q, e, irq.clone()),
        Err(ActivateError::QueueNotReady(1))
    ));
    // The daemon hangs up at the first activation request: a typed error, not a panic or a hang.
    let (q, e) = ready_queues(&mem);
    let err = fs.activate(mem.clone(), q, e, irq.clone());
    assert!(matches!(err, Err(ActivateError::Backend(_))), "{err:?}");
    assert!(fs.needs_reset());
    // Anonymous (unshareable) guest memory is refused the same way, without talking to anyone.
    let d2 = fake_daemon(2, None);
    let mut fs2 = Fs::new(d2.cfg()).unwrap();
    let anon = crate::memory::create_guest_memory(64).unwrap();
    let (q, e) = ready_queues(&anon);
    let err = fs2.activate(anon, q, e, irq);
    assert!(matches!(err, Err(ActivateError::Backend(_))), "{err:?}");
}
