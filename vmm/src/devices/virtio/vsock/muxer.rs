//! The host side of the vsock device: maps guest packets to connections, accepts host clients
//! on the Unix listener (`CONNECT <port>\n` handshake), and decides what goes to the guest next.
//!
//! All host fds live in the muxer's own epoll set (edge-triggered for streams), so only that one
//! fd needs to be registered with the VMM's event manager and the muxer can add and drop
//! connections without access to it.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::super::health::{warn_limited, LogLimit};
use super::super::GuestMemory;
use super::connection::{ConnKey, Connection, RxOutcome};
use super::packet::{
    Header, TxPacket, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use super::VsockError;

/// Connections plus pending handshakes we keep at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest accepted handshake line, `CONNECT 4294967295\r\n` is 20 bytes.
const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a host client may take to send its CONNECT line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer our REQUEST.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may linger (guest RST or host draining).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on queued RSTs for packets that match no connection.
const MAX_PENDING_RST: usize = 1024;
/// Host ports we hand out for host-initiated connections: high, to stay clear of services.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

const STREAM_EVENTS: EventSet = EventSet::IN
    .union(EventSet::OUT)
    .union(EventSet::READ_HANG_UP)
    .union(EventSet::EDGE_TRIGGERED);
const HANDSHAKE_EVENTS: EventSet = EventSet::IN
    .union(EventSet::READ_HANG_UP)
    .union(EventSet::EDGE_TRIGGERED);

#[derive(Clone, Copy, Debug)]
enum Target {
    Handshake,
    Conn(ConnKey),
}

/// A host client that connected but has not completed its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum HandshakeStep {
    Pending,
    Close(&'static str),
    Connect(u32),
}

impl Handshake {
    fn read_line(&mut self) -> HandshakeStep {
        // Byte by byte, so that data the client sends after the line stays in the socket for
        // the connection. At most MAX_HANDSHAKE_LINE syscalls per client.
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return HandshakeStep::Close("EOF before CONNECT line"),
                Ok(_) if b[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => {
                    if self.line.len() >= MAX_HANDSHAKE_LINE {
                        return HandshakeStep::Close("handshake line too long");
                    }
                    self.line.push(b[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(_) => return HandshakeStep::Close("read error during handshake"),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> HandshakeStep {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line
        .strip_prefix(b"CONNECT ")
        .filter(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit))
        .and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
    match port {
        Some(p) => HandshakeStep::Connect(p),
        None => HandshakeStep::Close("malformed CONNECT line"),
    }
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is out of the epoll set after an accept error (see `accept_clients`).
    listener_paused: bool,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    /// Connections that may have something for the guest, round robin.
    rx_pending: VecDeque<ConnKey>,
    /// RSTs for packets that matched no (longer existing) connection.
    pending_rst: VecDeque<Header>,
    /// One packet's payload, in either direction; never resized.
    scratch: Vec<u8>,
    /// Failed guest connects (the guest picks the port, so it picks how often).
    connect_log: LogLimit,
    /// Connections we reset because of an error (guest protocol violation, host stream I/O,
    /// timeout): a host client sees its connection drop, so say why, but the guest can repeat it.
    reset_log: LogLimit,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        remove_stale_socket(&uds_path)?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Sys {
                what: "non-blocking listener",
                source,
            })?;
        let epoll = Epoll::new().map_err(|source| VsockError::Sys {
            what: "muxer epoll",
            source,
        })?;
        let timer = TimerFd::new().map_err(|e| VsockError::Sys {
            what: "muxer timer",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|source| VsockError::Sys {
                    what: "muxer epoll registration",
                    source,
                })?;
        }
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            listener_paused: false,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rx_pending: VecDeque::new(),
            pending_rst: VecDeque::new(),
            scratch: vec![0u8; MAX_PAYLOAD as usize],
            connect_log: LogLimit::default(),
            reset_log: LogLimit::default(),
        })
    }

    /// The fd to watch (readable) in the VMM event loop.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether [`Self::next_rx`] may have a packet.
    pub fn has_rx_pending(&self) -> bool {
        !self.pending_rst.is_empty() || !self.rx_pending.is_empty()
    }

    /// Drops every connection (device reset). The listener stays so host clients can connect
    /// to the next driver instance.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.clear();
        self.rx_pending.clear();
        self.pending_rst.clear();
        self.resume_listener();
        self.disarm_timer();
    }

    /// Handles whatever the host side reported: new clients, handshake lines, stream readiness,
    /// timeouts.
    pub fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!("vsock: muxer epoll_wait failed: {e}");
                0
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept_clients(),
                TOKEN_TIMER => {
                    let _ = self.timer.wait();
                    self.sweep(Instant::now());
                }
                token => match self.tokens.get(&token).copied() {
                    Some(Target::Handshake) => self.handshake_ready(token),
                    Some(Target::Conn(key)) => self.host_event(key, ev.event_set()),
                    None => {}
                },
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Typically EMFILE. The listener is level-triggered, so stop watching it until
                    // the next timer tick instead of spinning.
                    warn!(
                        "vsock: accept on {} failed, pausing: {e}",
                        self.uds_path.display()
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.listener_paused = true;
                    self.arm_timer();
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                debug!("vsock: connection limit reached, dropping host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("vsock: cannot make host client non-blocking: {e}");
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(HANDSHAKE_EVENTS, token),
            ) {
                warn!("vsock: cannot watch host client: {e}");
                continue;
            }
            self.tokens.insert(token, Target::Handshake);
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                },
            );
            self.arm_timer();
        }
    }

    fn handshake_ready(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        match hs.read_line() {
            HandshakeStep::Pending => {}
            HandshakeStep::Close(why) => {
                debug!("vsock: closing host client: {why}");
                self.drop_handshake(token);
            }
            HandshakeStep::Connect(peer_port) => {
                let Some(hs) = self.handshakes.remove(&token) else {
                    return;
                };
                let key = ConnKey {
                    local_port: self.alloc_local_port(),
                    peer_port,
                };
                // Same token, now watching for writability too.
                if let Err(e) = self.epoll.ctl(
                    ControlOperation::Modify,
                    hs.stream.as_raw_fd(),
                    EpollEvent::new(STREAM_EVENTS, token),
                ) {
                    warn!("vsock: cannot watch host stream: {e}");
                    self.tokens.remove(&token);
                    return;
                }
                let conn = Connection::new_local(
                    hs.stream,
                    key,
                    self.guest_cid,
                    token,
                    Instant::now() + CONNECT_TIMEOUT,
                );
                self.tokens.insert(token, Target::Conn(key));
                self.conns.insert(key, conn);
                self.schedule(key);
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) {
        self.tokens.remove(&token);
        if let Some(h) = self.handshakes.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn host_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.on_host_event(events) {
            Ok(()) if conn.finished() => self.kill(key),
            Ok(()) => self.schedule(key),
            Err(e) => {
                warn_limited!(self.reset_log, ?key, "vsock: resetting connection: {e}");
                self.kill(key);
            }
        }
    }

    /// Dispatches one validated packet from the guest.
    pub fn handle_guest_packet(&mut self, pkt: &TxPacket, mem: &GuestMemory) {
        let h = pkt.hdr;
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.push_rst(key);
            }
            return;
        };
        conn.update_peer_credit(&h);
        let res = match h.op {
            OP_RST => {
                if !conn.peer_closing() && !conn.closing() {
                    // Not the end of an orderly close: the guest side aborted the connection.
                    info!(?key, "vsock: guest reset an open connection");
                }
                self.remove(key);
                return;
            }
            OP_RESPONSE => conn.on_response(),
            OP_SHUTDOWN => conn.on_shutdown(h.flags),
            OP_RW => match pkt.read_payload(mem, &mut self.scratch) {
                Ok(n) => conn.on_rw(&self.scratch[..n]),
                Err(e) => {
                    debug!(?key, "vsock: cannot read payload: {e}");
                    Ok(())
                }
            },
            OP_CREDIT_REQUEST => {
                conn.on_credit_request();
                Ok(())
            }
            // The credit was taken from the header above.
            OP_CREDIT_UPDATE => Ok(()),
            _ => Ok(()),
        };
        match res {
            Err(e) => {
                warn_limited!(self.reset_log, ?key, "vsock: resetting connection: {e}");
                self.kill(key);
            }
            Ok(()) if conn.finished() => self.kill(key),
            Ok(()) => {
                if conn.peer_closing() && conn.deadline.is_none() {
                    conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    self.arm_timer();
                }
                self.schedule(key);
            }
        }
    }

    /// Guest REQUEST to host port `key.local_port`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, req: &Header) {
        if self.conns.contains_key(&key) {
            warn_limited!(self.reset_log, ?key, "vsock: duplicate REQUEST, resetting");
            self.kill(key);
            return;
        }
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            debug!(?key, "vsock: connection limit reached");
            self.push_rst(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let path = PathBuf::from(path);
        // Never blocks the event loop: see `connect_nonblocking`.
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                warn_limited!(self.connect_log, ?key, "vsock: guest connect refused: {e}");
                self.push_rst(key);
                return;
            }
        };
        let token = self.alloc_token();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(STREAM_EVENTS, token),
        ) {
            warn_limited!(
                self.connect_log,
                ?key,
                "vsock: cannot watch host stream: {e}"
            );
            self.push_rst(key);
            return;
        }
        let conn = Connection::new_peer(stream, key, self.guest_cid, token, req);
        self.tokens.insert(token, Target::Conn(key));
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Next packet for the guest, with at most `room` payload bytes; the payload is then in
    /// [`Self::payload`].
    pub fn next_rx(&mut self, room: usize) -> Option<Header> {
        if let Some(h) = self.pending_rst.pop_front() {
            return Some(h);
        }
        while let Some(key) = self.rx_pending.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            match conn.next_rx(&mut self.scratch, room) {
                RxOutcome::Packet(h) => {
                    if conn.closing() && conn.deadline.is_none() {
                        conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                        self.arm_timer();
                    }
                    self.schedule(key);
                    return Some(h);
                }
                RxOutcome::Nothing => {}
                RxOutcome::Kill(e) => {
                    warn_limited!(self.reset_log, ?key, "vsock: resetting connection: {e}");
                    self.kill(key);
                    return self.pending_rst.pop_front();
                }
            }
        }
        None
    }

    /// The payload of the packet last returned by [`Self::next_rx`].
    pub fn payload(&self, len: u32) -> &[u8] {
        &self.scratch[..(len as usize).min(self.scratch.len())]
    }

    /// Expires handshakes and connections whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        let stale: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for t in stale {
            debug!("vsock: host client handshake timed out");
            self.drop_handshake(t);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(Connection::key)
            .collect();
        for key in expired {
            warn_limited!(
                self.reset_log,
                ?key,
                "vsock: connection did not close in time, resetting"
            );
            self.kill(key);
        }
        self.resume_listener();
        if !self.listener_paused
            && self.handshakes.is_empty()
            && self.conns.values().all(|c| c.deadline.is_none())
        {
            self.disarm_timer();
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            match self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            ) {
                Ok(()) => self.listener_paused = false,
                Err(e) => warn!("vsock: cannot resume listener: {e}"),
            }
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_queue && c.has_rx_work() {
                c.in_rx_queue = true;
                self.rx_pending.push_back(key);
            }
        }
    }

    /// Closes the host side and tells the guest with an RST.
    fn kill(&mut self, key: ConnKey) {
        self.remove(key);
        self.push_rst(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn push_rst(&mut self, key: ConnKey) {
        if self.pending_rst.len() >= MAX_PENDING_RST {
            debug!(?key, "vsock: too many pending RSTs, dropping one");
            return;
        }
        self.pending_rst.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn alloc_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are in use, so this ends quickly.
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let tick = Duration::from_secs(1);
            match self.timer.reset(tick, Some(tick)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn!("vsock: cannot arm muxer timer: {e}"),
            }
        }
    }

    fn disarm_timer(&mut self) {
        if self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }
}

/// Why a guest-initiated connection could not reach its host listener.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot create a socket to connect to {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path} cannot be a Unix socket address: {source}")]
    Address {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("no host listener at {0}")]
    NoListener(PathBuf),
    #[error("host listener at {0} has a full backlog")]
    Busy(PathBuf),
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// Connects to the Unix socket at `path` on a non-blocking socket. A Unix-domain connect either
/// completes at once or fails; the only case that would block a blocking socket is a listener
/// whose backlog is full, and here that is `EAGAIN` (`Busy`). The guest chooses the port, so it
/// must not be able to stall the event loop by aiming at a slow host service.
pub fn connect_nonblocking(path: &Path) -> Result<UnixStream, ConnectError> {
    let addr = UnixAddr::new(path).map_err(|source| ConnectError::Address {
        path: path.to_path_buf(),
        source,
    })?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| ConnectError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    loop {
        return match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(UnixStream::from(fd)),
            Err(Errno::EINTR) => continue,
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => {
                Err(ConnectError::NoListener(path.to_path_buf()))
            }
            Err(Errno::EAGAIN) => Err(ConnectError::Busy(path.to_path_buf())),
            // Includes EINPROGRESS, which Linux does not return for Unix sockets: a connection
            // we would have to wait for is one we do not want.
            Err(source) => Err(ConnectError::Connect {
                path: path.to_path_buf(),
                source,
            }),
        };
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Leave no socket file behind for the next VMM to trip over.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Removes a socket left over by a previous VMM; refuses to delete anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(VsockError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VsockError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert!(matches!(
            parse_connect(b"CONNECT 1024"),
            HandshakeStep::Connect(1024)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT 52\r"),
            HandshakeStep::Connect(52)
        ));
        for bad in [
            &b"CONNECT "[..],
            b"CONNECT +1",
            b"CONNECT 1 ",
            b"CONNECT 99999999999",
            b"connect 1",
            b"HELLO",
            b"",
        ] {
            assert!(
                matches!(parse_connect(bad), HandshakeStep::Close(_)),
                "{bad:?}"
            );
        }
    }
}
