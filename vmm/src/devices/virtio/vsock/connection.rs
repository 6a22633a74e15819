//! One vsock stream connection between a guest port and a host Unix stream, with virtio-vsock
//! credit accounting in both directions.
//!
//! Host -> guest data is never buffered: it is read from the Unix stream straight into the
//! scratch buffer for one rx packet, and only as much as the guest's advertised credit allows.
//! Guest -> host data is written to the stream and, if the stream is full, buffered up to the
//! credit we advertise (`CONN_BUF_SIZE`); a guest that sends beyond it is reset.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection (`buf_alloc`); also the bound on
/// guest data we hold for a slow host reader.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Announce our `fwd_cnt` once this much was forwarded since the last announcement, so the
/// guest's view of our free space never drops below half the buffer once we have drained it.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;
const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// (host-side port, guest-side port). Host ports are the guest's destination for guest-initiated
/// connections and allocated by us for host-initiated ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: our REQUEST is queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("guest sent {op} in state {state:?}")]
    UnexpectedOp { op: u16, state: ConnState },
    #[error("guest sent data after shutting down its send side")]
    DataAfterShutdown,
    #[error("guest exceeded its credit: {buffered} bytes buffered + {len} new > {CONN_BUF_SIZE}")]
    CreditExceeded { buffered: usize, len: usize },
    #[error("host stream I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// What the connection wants to put on the rx queue next.
#[derive(Debug)]
pub enum RxOutcome {
    /// A packet whose payload (if `len > 0`) is in the first `len` bytes of the scratch buffer.
    Packet(Header),
    Nothing,
    /// The host stream failed: reset the connection.
    Kill(ConnError),
}

pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    pub token: u64,
    state: ConnState,
    // Guest's receive window, from the headers it sends us.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes we sent to the guest.
    tx_cnt: u32,
    credit_request_sent: bool,
    // Our receive window.
    /// Guest payload bytes written to the host stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    to_host: VecDeque<u8>,
    /// Handshake reply (`OK <port>\n`) not yet written; not guest data, so not credit-accounted.
    reply: Vec<u8>,
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    write_shut: bool,
    peer_shutdown: u32,
    shutdown_sent: u32,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    /// When the muxer gives up on this connection (handshake or close not completed).
    pub deadline: Option<Instant>,
    pub in_rx_queue: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            credit_request_sent: false,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            reply: Vec::new(),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            write_shut: false,
            peer_shutdown: 0,
            shutdown_sent: 0,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            deadline: None,
            in_rx_queue: false,
        }
    }

    /// A host process asked (`CONNECT <port>`) to reach guest port `key.peer_port`.
    pub fn new_local(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        token: u64,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, token, ConnState::LocalInit);
        c.need_request = true;
        // Data may already sit behind the CONNECT line; an edge for it may have been consumed.
        c.host_readable = true;
        c.deadline = Some(deadline);
        c
    }

    /// The guest connected (`req`) and we reached the host listener.
    pub fn new_peer(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        token: u64,
        req: &Header,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, token, ConnState::Established);
        c.need_response = true;
        c.host_readable = true;
        c.update_peer_credit(req);
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
    }

    /// Bytes the guest can still take. A guest claiming more forwarded than we sent only hurts
    /// itself, but never yields more than its `buf_alloc`.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn on_response(&mut self) -> Result<(), ConnError> {
        if self.state != ConnState::LocalInit || self.need_request {
            return Err(ConnError::UnexpectedOp {
                op: OP_RESPONSE,
                state: self.state,
            });
        }
        self.state = ConnState::Established;
        self.deadline = None;
        self.reply = format!("OK {}\n", self.key.local_port).into_bytes();
        self.flush()
    }

    pub fn on_rw(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        if self.state != ConnState::Established {
            return Err(ConnError::UnexpectedOp {
                op: OP_RW,
                state: self.state,
            });
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::DataAfterShutdown);
        }
        let buffered = self.to_host.len();
        if buffered + payload.len() > CONN_BUF_SIZE as usize {
            return Err(ConnError::CreditExceeded {
                buffered,
                len: payload.len(),
            });
        }
        let mut rest = payload;
        if self.to_host.is_empty() && self.reply.is_empty() {
            match self.stream.write(payload) {
                Ok(n) => {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    rest = &payload[n..];
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.to_host.extend(rest);
        self.check_credit_update();
        Ok(())
    }

    /// Records the guest's shutdown flags; see [`Self::finished`] for when the connection ends.
    pub fn on_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        if self.state != ConnState::Established {
            return Err(ConnError::UnexpectedOp {
                op: OP_SHUTDOWN,
                state: self.state,
            });
        }
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        self.flush()
    }

    pub fn on_credit_request(&mut self) {
        self.need_credit_update = true;
    }

    pub fn on_host_event(&mut self, events: EventSet) -> Result<(), ConnError> {
        if events.contains(EventSet::ERROR) {
            let err = self
                .stream
                .take_error()
                .ok()
                .flatten()
                .unwrap_or_else(|| io::Error::other("EPOLLERR on host stream"));
            return Err(err.into());
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
            self.host_readable = true;
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes buffered data to the host stream until it would block.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e.into()),
            }
        }
        self.check_credit_update();
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            // The guest will send no more: let the host reader see EOF.
            self.write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                if e.kind() != io::ErrorKind::NotConnected {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn check_credit_update(&mut self) {
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.need_credit_update = true;
        }
    }

    /// The guest shut down both directions and everything it sent reached the host: the
    /// connection ends with our RST.
    pub fn finished(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_BOTH && self.to_host.is_empty() && self.reply.is_empty()
    }

    /// Whether the guest asked to close but data is still waiting for the host.
    pub fn peer_closing(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_BOTH
    }

    /// SHUTDOWN flags we owe the guest once the host stream reached EOF.
    fn desired_shutdown(&self) -> u32 {
        if !self.host_eof {
            return 0;
        }
        SHUTDOWN_SEND | if self.host_hup { SHUTDOWN_RCV } else { 0 }
    }

    fn wants_to_read(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && (self.peer_shutdown & SHUTDOWN_RCV == 0 || self.host_hup)
    }

    /// Whether [`Self::next_rx`] may produce a packet.
    pub fn has_rx_work(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || (self.wants_to_read() && (self.peer_credit() > 0 || !self.credit_request_sent))
            || self.desired_shutdown() & !self.shutdown_sent != 0
    }

    /// Whether we told the guest that the host is gone and only wait for its RST.
    pub fn closing(&self) -> bool {
        self.shutdown_sent == SHUTDOWN_BOTH
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Produces the next packet for the guest, reading host data into `scratch[..room]`.
    pub fn next_rx(&mut self, scratch: &mut [u8], room: usize) -> RxOutcome {
        if self.need_request {
            self.need_request = false;
            return RxOutcome::Packet(self.header(OP_REQUEST, 0, 0));
        }
        if self.need_response {
            self.need_response = false;
            return RxOutcome::Packet(self.header(OP_RESPONSE, 0, 0));
        }
        if self.wants_to_read() {
            if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                // The guest reads no more and the host is gone: treat as EOF.
                self.host_eof = true;
            } else {
                let credit = self.peer_credit() as usize;
                let n = credit.min(room).min(scratch.len());
                if credit == 0 {
                    if !self.credit_request_sent {
                        self.credit_request_sent = true;
                        return RxOutcome::Packet(self.header(OP_CREDIT_REQUEST, 0, 0));
                    }
                } else if n > 0 {
                    match self.stream.read(&mut scratch[..n]) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.host_readable = false;
                        }
                        Ok(k) => {
                            self.tx_cnt = self.tx_cnt.wrapping_add(k as u32);
                            return RxOutcome::Packet(self.header(OP_RW, 0, k as u32));
                        }
                        Err(e) if would_block(&e) => self.host_readable = false,
                        Err(e) => return RxOutcome::Kill(e.into()),
                    }
                }
            }
        }
        let desired = self.desired_shutdown();
        if desired & !self.shutdown_sent != 0 {
            self.shutdown_sent |= desired;
            return RxOutcome::Packet(self.header(OP_SHUTDOWN, self.shutdown_sent, 0));
        }
        if self.need_credit_update {
            return RxOutcome::Packet(self.header(OP_CREDIT_UPDATE, 0, 0));
        }
        RxOutcome::Nothing
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 5000,
            peer_port: 6000,
        };
        let req = Header {
            buf_alloc: 16,
            ..Default::default()
        };
        (Connection::new_peer(a, key, CID, 7, &req), b)
    }

    fn next(c: &mut Connection) -> (Header, Vec<u8>) {
        let mut scratch = vec![0u8; 1024];
        match c.next_rx(&mut scratch, 1024) {
            RxOutcome::Packet(h) => (h, scratch[..h.len as usize].to_vec()),
            other => panic!("expected packet, got {other:?}"),
        }
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let (mut c, mut host) = pair();
        assert_eq!(next(&mut c).0.op, OP_RESPONSE);
        host.write_all(&[7u8; 40]).unwrap();
        let (h, data) = next(&mut c);
        assert_eq!(
            (h.op, h.len, h.src_cid, h.dst_cid),
            (OP_RW, 16, HOST_CID, CID)
        );
        assert_eq!(data, vec![7u8; 16]);
        // Out of credit: one credit request, then nothing until the guest updates.
        assert_eq!(next(&mut c).0.op, OP_CREDIT_REQUEST);
        assert!(!c.has_rx_work());
        c.update_peer_credit(&Header {
            buf_alloc: 16,
            fwd_cnt: 16,
            ..Default::default()
        });
        assert!(c.has_rx_work());
        assert_eq!(next(&mut c).1.len(), 16);
    }

    #[test]
    fn guest_data_beyond_credit_is_refused() {
        let (mut c, _host) = pair();
        let chunk = vec![1u8; 64 * 1024];
        let mut refused = false;
        // The socket buffer takes some, then we buffer up to CONN_BUF_SIZE, then refuse.
        for _ in 0..200 {
            if let Err(e) = c.on_rw(&chunk) {
                assert!(matches!(e, ConnError::CreditExceeded { .. }));
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(c.to_host.len() <= CONN_BUF_SIZE as usize);
    }

    #[test]
    fn shutdown_and_credit_update_flow() {
        let (mut c, mut host) = pair();
        next(&mut c);
        // Forwarding half the buffer triggers a credit update.
        c.on_rw(&vec![0u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        let mut sink = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
        host.read_exact(&mut sink).unwrap();
        let (h, _) = next(&mut c);
        assert_eq!(
            (h.op, h.fwd_cnt),
            (OP_CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD)
        );
        // Guest stops sending: host sees EOF.
        c.on_shutdown(SHUTDOWN_SEND).unwrap();
        assert_eq!(host.read(&mut sink).unwrap(), 0);
        assert!(!c.finished());
        c.on_shutdown(SHUTDOWN_RCV).unwrap();
        assert!(c.finished());
        assert!(matches!(c.on_rw(b"x"), Err(ConnError::DataAfterShutdown)));
    }

    #[test]
    fn host_close_becomes_guest_shutdown() {
        let (mut c, host) = pair();
        next(&mut c);
        drop(host);
        c.on_host_event(EventSet::IN | EventSet::HANG_UP).unwrap();
        let (h, _) = next(&mut c);
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert!(c.closing());
        assert!(!c.has_rx_work());
    }
}
