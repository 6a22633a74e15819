//! Hardened host-side client for the agent API.
//!
//! The VMM exposes the guest's virtio-vsock as a Firecracker-style *hybrid*
//! Unix socket: the host connects to the socket, writes `CONNECT <port>\n`,
//! reads back `OK <hostport>\n`, and from then on the stream is a raw byte
//! pipe to the guest's vsock port. [`AgentClient`] runs gRPC (HTTP/2) over
//! such a stream.
//!
//! The guest is untrusted. Therefore:
//! * the handshake reply is read byte by byte with a hard length cap
//!   ([`HANDSHAKE_MAX_LINE`]) and a timeout, and must be exactly `OK <u32>\n`;
//! * every RPC has a deadline, decoded messages are capped
//!   ([`ClientOptions::max_decoding_message_size`]) and so are HTTP/2 headers;
//! * every reply is validated (string lengths, no control characters, value
//!   ranges, API revision) before it is handed out as a typed value;
//! * text from the guest that ends up in an error (gRPC status messages,
//!   handshake lines) is truncated and escaped.
//!
//! The channel's connector performs a fresh handshake for every (re)connect,
//! so the client recovers by itself when the VMM or the agent drops the
//! connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::v1::agent_service_client::AgentServiceClient;
use crate::v1::{GuestInfoRequest, PingRequest, ShutdownRequest};
use crate::{API_VERSION, MAX_MESSAGE_SIZE};

/// Longest accepted handshake reply line, including the trailing `\n`.
pub const HANDSHAKE_MAX_LINE: usize = 64;
/// Longest accepted `PingResponse.agent_version`, in bytes.
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Longest accepted `kernel_release` / `kernel_version`, in bytes.
pub const MAX_KERNEL_STRING_LEN: usize = 256;
/// Largest accepted `online_cpus`.
pub const MAX_ONLINE_CPUS: u32 = 4096;
/// Guest-provided text (gRPC status messages, bad handshake lines) is cut to
/// this many characters before it is put into a [`ClientError`].
pub const MAX_GUEST_TEXT_IN_ERRORS: usize = 256;
/// Cap on the HTTP/2 header list the guest may send (bytes).
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Tunables for [`AgentClient`]. `Default` gives values suited to a local VM.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Upper bound for the whole hybrid handshake (Unix connect, `CONNECT`
    /// line, `OK` reply).
    pub handshake_timeout: Duration,
    /// Upper bound for establishing the gRPC connection (the connector, which
    /// includes a handshake, plus HTTP/2 setup).
    pub connect_timeout: Duration,
    /// Deadline of every RPC.
    pub request_timeout: Duration,
    /// Largest reply message accepted from the guest. Clamped to
    /// [`MAX_MESSAGE_SIZE`].
    pub max_decoding_message_size: usize,
    /// First pause between attempts of [`AgentClient::connect_with_retry`].
    pub retry_initial_backoff: Duration,
    /// Longest pause between attempts (the backoff doubles up to this).
    pub retry_max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_decoding_message_size: MAX_MESSAGE_SIZE,
            retry_initial_backoff: Duration::from_millis(10),
            retry_max_backoff: Duration::from_millis(200),
        }
    }
}

/// Failure of the hybrid vsock handshake; the variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `connect(2)` on the VMM's Unix socket failed.
    #[error("connecting to the Unix socket: {0}")]
    Connect(#[source] io::Error),
    /// Writing `CONNECT <port>\n` failed.
    #[error("writing the CONNECT line: {0}")]
    Write(#[source] io::Error),
    /// Reading the reply failed (e.g. reset: nobody listens on the port).
    #[error("reading the reply line: {0}")]
    Read(#[source] io::Error),
    /// The whole handshake took longer than allowed.
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    /// The VMM closed the stream before a full line (nobody listens yet?).
    #[error("stream closed after {received} bytes of the reply line (is the guest listening?)")]
    Closed {
        /// Bytes of the reply received before EOF.
        received: usize,
    },
    /// No `\n` within [`HANDSHAKE_MAX_LINE`] bytes.
    #[error("reply line longer than {limit} bytes")]
    TooLong {
        /// The cap that was hit.
        limit: usize,
    },
    /// A complete line that is not `OK <u32>`.
    #[error("malformed reply line \"{line}\" (expected \"OK <u32>\")")]
    Malformed {
        /// The line, escaped and truncated.
        line: String,
    },
}

impl HandshakeError {
    /// Whether retrying later may succeed (the guest may not listen yet).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HandshakeError::Connect(_)
                | HandshakeError::Write(_)
                | HandshakeError::Read(_)
                | HandshakeError::Timeout(_)
                | HandshakeError::Closed { .. }
        )
    }
}

/// Errors of [`AgentClient`]. Each carries the socket path, the vsock port and
/// the step or RPC that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hybrid vsock handshake failed.
    #[error("hybrid vsock {} port {port}: handshake: {source}", path.display())]
    Handshake {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// Setting up the gRPC (HTTP/2) channel over the handshaken stream failed.
    #[error("hybrid vsock {} port {port}: gRPC channel setup: {source}", path.display())]
    Channel {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// Transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// An RPC did not complete within its deadline.
    #[error("hybrid vsock {} port {port}: {method}: no reply within {timeout:?}", path.display())]
    Timeout {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// RPC name.
        method: &'static str,
        /// The deadline that expired.
        timeout: Duration,
    },
    /// An RPC failed with a gRPC status (from the agent or the transport).
    #[error("hybrid vsock {} port {port}: {method}: {code:?}: {message}", path.display())]
    Rpc {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// RPC name.
        method: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// Status message, escaped and truncated (guest-controlled text).
        message: String,
    },
    /// The agent implements a different API revision.
    #[error("hybrid vsock {} port {port}: agent API version {actual}, host speaks {expected}", path.display())]
    ApiVersionMismatch {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// [`API_VERSION`].
        expected: u32,
        /// What the agent reported.
        actual: u32,
    },
    /// A reply failed validation.
    #[error("hybrid vsock {} port {port}: {method}: invalid reply field {field}: {reason}", path.display())]
    InvalidReply {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// RPC name.
        method: &'static str,
        /// Offending field.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// [`AgentClient::connect_with_retry`] ran out of time.
    #[error("hybrid vsock {} port {port}: agent did not answer before the deadline ({attempts} attempts); last error: {last}", path.display())]
    DeadlineExceeded {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// Attempts made.
        attempts: u32,
        /// Error of the last attempt.
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Whether a later attempt may succeed (agent not up yet, connection
    /// dropped, ...). Protocol violations and invalid replies are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Handshake { source, .. } => source.is_transient(),
            ClientError::Channel { .. } | ClientError::Timeout { .. } => true,
            ClientError::Rpc { code, .. } => !matches!(
                code,
                tonic::Code::Unimplemented
                    | tonic::Code::InvalidArgument
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::DataLoss
            ),
            ClientError::ApiVersionMismatch { .. }
            | ClientError::InvalidReply { .. }
            | ClientError::DeadlineExceeded { .. } => false,
        }
    }
}

/// Validated reply of `Ping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingInfo {
    /// Agent binary version (≤ [`MAX_AGENT_VERSION_LEN`] bytes, no control
    /// characters). Informational only.
    pub agent_version: String,
    /// Always equal to [`API_VERSION`] (checked).
    pub api_version: u32,
}

/// Validated reply of `GuestInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// uname release, non-empty, ≤ [`MAX_KERNEL_STRING_LEN`] bytes.
    pub kernel_release: String,
    /// uname version, ≤ [`MAX_KERNEL_STRING_LEN`] bytes.
    pub kernel_version: String,
    /// Time since guest boot.
    pub uptime: Duration,
    /// Total guest memory, bytes.
    pub mem_total_bytes: u64,
    /// Available guest memory, bytes (≤ `mem_total_bytes`).
    pub mem_available_bytes: u64,
    /// Online vCPUs, 1..=[`MAX_ONLINE_CPUS`].
    pub online_cpus: u32,
}

/// Client of the agent's `AgentService` over a hybrid vsock Unix socket.
///
/// Cheap to clone; clones share one HTTP/2 connection. All methods take
/// `&self` and may be called concurrently.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient<Channel>,
    uds_path: PathBuf,
    port: u32,
    request_timeout: Duration,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("uds_path", &self.uds_path)
            .field("port", &self.port)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Connects to guest vsock `port` through the VMM's hybrid socket at
    /// `uds_path`: performs the handshake, then sets up a gRPC channel over
    /// the stream. Reconnects (after the connection drops) redo the
    /// handshake. Does not check that the agent answers: see
    /// [`AgentClient::connect_with_retry`] for that.
    pub async fn connect_hybrid(
        uds_path: &Path,
        port: u32,
        opts: ClientOptions,
    ) -> Result<AgentClient, ClientError> {
        let (stream, hostport) = hybrid_handshake(uds_path, port, opts.handshake_timeout)
            .await
            .map_err(|source| ClientError::Handshake {
                path: uds_path.to_path_buf(),
                port,
                source,
            })?;
        tracing::debug!(path = %uds_path.display(), port, hostport, "hybrid vsock connected");

        let connector = HybridConnector {
            path: Arc::new(uds_path.to_path_buf()),
            port,
            handshake_timeout: opts.handshake_timeout,
            first: Arc::new(Mutex::new(Some(stream))),
        };
        // The authority is never resolved: the connector ignores the URI.
        let channel = Endpoint::from_static("http://husk-agent.vsock")
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
            .connect_with_connector(connector)
            .await
            .map_err(|source| ClientError::Channel {
                path: uds_path.to_path_buf(),
                port,
                source,
            })?;

        let inner = AgentServiceClient::new(channel)
            .max_decoding_message_size(opts.max_decoding_message_size.min(MAX_MESSAGE_SIZE))
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(AgentClient {
            inner,
            uds_path: uds_path.to_path_buf(),
            port,
            request_timeout: opts.request_timeout,
        })
    }

    /// Like [`AgentClient::connect_hybrid`], but retries with a short
    /// exponential backoff until the agent answers a `Ping` (with the right
    /// API revision) or `deadline` passes. Meant for right after VM boot,
    /// when the VMM socket exists before the agent listens. Non-retryable
    /// errors (malformed handshake, invalid reply, version mismatch) are
    /// returned at once.
    pub async fn connect_with_retry(
        uds_path: &Path,
        port: u32,
        opts: ClientOptions,
        deadline: Instant,
    ) -> Result<AgentClient, ClientError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut backoff = opts.retry_initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = async {
                let client = Self::connect_hybrid(uds_path, port, opts.clone()).await?;
                client.ping().await?;
                Ok::<_, ClientError>(client)
            };
            let last = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(client)) => {
                    tracing::debug!(path = %uds_path.display(), port, attempts, "agent answered");
                    return Ok(client);
                }
                Ok(Err(e)) if !e.is_retryable() => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => ClientError::Timeout {
                    path: uds_path.to_path_buf(),
                    port,
                    method: "connect",
                    timeout: opts.connect_timeout,
                },
            };
            let now = tokio::time::Instant::now();
            if now + backoff >= deadline {
                return Err(ClientError::DeadlineExceeded {
                    path: uds_path.to_path_buf(),
                    port,
                    attempts,
                    last: Box::new(last),
                });
            }
            tracing::trace!(attempts, error = %last, "agent not ready, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(opts.retry_max_backoff);
        }
    }

    /// The VMM socket this client talks through.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The guest vsock port this client talks to.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// `Ping`: checks liveness and that the agent speaks [`API_VERSION`].
    pub async fn ping(&self) -> Result<PingInfo, ClientError> {
        const M: &str = "Ping";
        let mut c = self.inner.clone();
        let r = self
            .call(M, async move { c.ping(PingRequest {}).await })
            .await?;
        check_text(r.agent_version.as_str(), MAX_AGENT_VERSION_LEN, false)
            .map_err(|reason| self.invalid(M, "agent_version", reason))?;
        if r.api_version != API_VERSION {
            return Err(ClientError::ApiVersionMismatch {
                path: self.uds_path.clone(),
                port: self.port,
                expected: API_VERSION,
                actual: r.api_version,
            });
        }
        Ok(PingInfo {
            agent_version: r.agent_version,
            api_version: r.api_version,
        })
    }

    /// `GuestInfo`: kernel and resource facts, validated.
    pub async fn guest_info(&self) -> Result<GuestInfo, ClientError> {
        const M: &str = "GuestInfo";
        let mut c = self.inner.clone();
        let r = self
            .call(M, async move { c.guest_info(GuestInfoRequest {}).await })
            .await?;
        check_text(&r.kernel_release, MAX_KERNEL_STRING_LEN, true)
            .map_err(|reason| self.invalid(M, "kernel_release", reason))?;
        check_text(&r.kernel_version, MAX_KERNEL_STRING_LEN, false)
            .map_err(|reason| self.invalid(M, "kernel_version", reason))?;
        if r.mem_available_bytes > r.mem_total_bytes {
            return Err(self.invalid(
                M,
                "mem_available_bytes",
                format!(
                    "{} exceeds mem_total_bytes {}",
                    r.mem_available_bytes, r.mem_total_bytes
                ),
            ));
        }
        if r.online_cpus == 0 || r.online_cpus > MAX_ONLINE_CPUS {
            return Err(self.invalid(
                M,
                "online_cpus",
                format!("{} not in 1..={MAX_ONLINE_CPUS}", r.online_cpus),
            ));
        }
        Ok(GuestInfo {
            kernel_release: r.kernel_release,
            kernel_version: r.kernel_version,
            uptime: Duration::from_millis(r.uptime_ms),
            mem_total_bytes: r.mem_total_bytes,
            mem_available_bytes: r.mem_available_bytes,
            online_cpus: r.online_cpus,
        })
    }

    /// `Shutdown`: asks the agent to power the guest off. Returns once the
    /// agent acknowledged; the VM goes away shortly after (the caller should
    /// wait for the VMM process to exit).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        let mut c = self.inner.clone();
        self.call(
            "Shutdown",
            async move { c.shutdown(ShutdownRequest {}).await },
        )
        .await
        .map(|_| ())
    }

    async fn call<T, F>(&self, method: &'static str, fut: F) -> Result<T, ClientError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Err(_) => Err(ClientError::Timeout {
                path: self.uds_path.clone(),
                port: self.port,
                method,
                timeout: self.request_timeout,
            }),
            Ok(Err(status)) => Err(ClientError::Rpc {
                path: self.uds_path.clone(),
                port: self.port,
                method,
                code: status.code(),
                message: sanitize_for_error(status.message().as_bytes()),
            }),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    fn invalid(&self, method: &'static str, field: &'static str, reason: String) -> ClientError {
        ClientError::InvalidReply {
            path: self.uds_path.clone(),
            port: self.port,
            method,
            field,
            reason,
        }
    }
}

/// Performs the hybrid vsock handshake on `uds_path` for guest `port`, all
/// within `timeout`. Returns the stream, positioned right after the reply
/// line (not a byte further), and the host-side port from the reply.
pub async fn hybrid_handshake(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), HandshakeError> {
    let steps = async {
        let mut stream = UnixStream::connect(uds_path)
            .await
            .map_err(HandshakeError::Connect)?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(HandshakeError::Write)?;
        let line = read_reply_line(&mut stream, HANDSHAKE_MAX_LINE).await?;
        let hostport = parse_handshake_reply(&line)?;
        Ok((stream, hostport))
    };
    tokio::time::timeout(timeout, steps)
        .await
        .unwrap_or(Err(HandshakeError::Timeout(timeout)))
}

/// Reads one `\n`-terminated line of at most `limit` bytes (newline
/// included) and returns it without the newline. Reads byte by byte so that
/// nothing after the newline (the start of the raw stream) is consumed.
pub async fn read_reply_line<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Vec<u8>, HandshakeError> {
    let mut line = Vec::with_capacity(limit);
    loop {
        if line.len() >= limit {
            return Err(HandshakeError::TooLong { limit });
        }
        let mut b = [0u8; 1];
        let n = r.read(&mut b).await.map_err(HandshakeError::Read)?;
        if n == 0 {
            return Err(HandshakeError::Closed {
                received: line.len(),
            });
        }
        if b[0] == b'\n' {
            return Ok(line);
        }
        line.push(b[0]);
    }
}

/// Parses a handshake reply line (without its `\n`): exactly `OK `, then 1 to
/// 10 ASCII digits forming a `u32`. Returns that number (the host port).
pub fn parse_handshake_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed {
        line: sanitize_for_error(line),
    };
    let digits = line.strip_prefix(b"OK ").ok_or_else(malformed)?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    // Only ASCII digits: valid UTF-8, and `parse` sees no sign.
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(malformed)
}

/// Checks guest-provided text: at most `max` bytes, optionally non-empty, no
/// control characters (NUL, newlines, escapes) and no bidi overrides.
fn check_text(s: &str, max: usize, non_empty: bool) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{} bytes, limit {max}", s.len()));
    }
    if non_empty && s.is_empty() {
        return Err("empty".to_string());
    }
    if let Some(c) = s.chars().find(|&c| c.is_control() || is_bidi_control(c)) {
        return Err(format!("contains control character U+{:04X}", c as u32));
    }
    Ok(())
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Escapes and truncates guest-controlled bytes for inclusion in an error.
fn sanitize_for_error(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_GUEST_TEXT_IN_ERRORS {
            out.push('…');
            break;
        }
        if c.is_control() || is_bidi_control(c) || c == '"' || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// tower connector for tonic: hands out the already handshaken stream first,
/// then performs a fresh handshake for every reconnect.
#[derive(Clone)]
struct HybridConnector {
    path: Arc<PathBuf>,
    port: u32,
    handshake_timeout: Duration,
    first: Arc<Mutex<Option<UnixStream>>>,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<UnixStream>, HandshakeError>> + Send>>;

impl tower::Service<Uri> for HybridConnector {
    type Response = TokioIo<UnixStream>;
    type Error = HandshakeError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let first = self
            .first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let path = Arc::clone(&self.path);
        let port = self.port;
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let stream = match first {
                Some(stream) => stream,
                None => {
                    let (stream, hostport) = hybrid_handshake(&path, port, timeout).await?;
                    tracing::debug!(path = %path.display(), port, hostport, "hybrid vsock reconnected");
                    stream
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_good_lines() {
        assert_eq!(parse_handshake_reply(b"OK 0").unwrap(), 0);
        assert_eq!(parse_handshake_reply(b"OK 1073741824").unwrap(), 1073741824);
        assert_eq!(parse_handshake_reply(b"OK 4294967295").unwrap(), u32::MAX);
        assert_eq!(parse_handshake_reply(b"OK 0000000007").unwrap(), 7);
    }

    #[test]
    fn parse_garbage_lines() {
        for bad in [
            &b""[..],
            b"OK",
            b"OK ",
            b"ok 5",
            b"OK  5",
            b"OK +5",
            b"OK -5",
            b"OK 5 ",
            b"OK 5\r",
            b"OK 4294967296",
            b"OK 00000000001",
            b"OK 12abc",
            b"ERR no listener",
            b"OK \xff\xfe",
            b"\0OK 5",
        ] {
            match parse_handshake_reply(bad) {
                Err(HandshakeError::Malformed { line }) => {
                    assert!(!line.contains('\0') && !line.contains('\r'), "{line:?}")
                }
                other => panic!("{:?} parsed as {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[tokio::test]
    async fn read_line_stops_at_newline() {
        let (mut a, mut b) = tokio::io::duplex(256);
        a.write_all(b"OK 77\nPRI * HTTP/2.0").await.unwrap();
        drop(a);
        let line = read_reply_line(&mut b, HANDSHAKE_MAX_LINE).await.unwrap();
        assert_eq!(line, b"OK 77");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            rest, b"PRI * HTTP/2.0",
            "bytes after the line must stay unread"
        );
    }

    #[tokio::test]
    async fn read_line_overlong() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[b'9'; 1000]).await.unwrap();
        let err = read_reply_line(&mut b, HANDSHAKE_MAX_LINE)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandshakeError::TooLong { limit: 64 }),
            "{err:?}"
        );
        // exactly 64 bytes including the newline is fine, 65 is not
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut ok = vec![b'1'; 63];
        ok.push(b'\n');
        a.write_all(&ok).await.unwrap();
        assert_eq!(read_reply_line(&mut b, 64).await.unwrap().len(), 63);
    }

    #[tokio::test]
    async fn read_line_eof_before_newline() {
        let (mut a, mut b) = tokio::io::duplex(256);
        a.write_all(b"OK 12").await.unwrap();
        drop(a);
        let err = read_reply_line(&mut b, HANDSHAKE_MAX_LINE)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandshakeError::Closed { received: 5 }),
            "{err:?}"
        );
        assert!(err.is_transient());
    }

    #[test]
    fn text_checks() {
        assert!(check_text("6.1.0", 256, true).is_ok());
        assert!(check_text("", 256, true).is_err());
        assert!(check_text("", 256, false).is_ok());
        assert!(check_text("a\0b", 256, false).is_err());
        assert!(check_text("a\nb", 256, false).is_err());
        assert!(check_text("\u{1b}[2J", 256, false).is_err());
        assert!(check_text("abc\u{202E}", 256, false).is_err());
        assert!(check_text(&"x".repeat(257), 256, false).is_err());
        assert!(check_text(&"x".repeat(256), 256, false).is_ok());
        assert!(check_text("#1 SMP PREEMPT_DYNAMIC Débian", 256, false).is_ok());
    }

    #[test]
    fn sanitize_escapes_and_truncates() {
        let s = sanitize_for_error(b"bad\0\x1b[31m\"x\"\xff");
        assert!(!s.contains('\0') && !s.contains('\x1b'), "{s}");
        let long = sanitize_for_error(&[b'a'; 10_000]);
        assert!(long.chars().count() <= MAX_GUEST_TEXT_IN_ERRORS + 1);
    }
}

/// End-to-end tests: the real client against the real generated server, over
/// a Unix socket behind a fake VMM that speaks the hybrid handshake.
#[cfg(all(test, feature = "server", feature = "test-util"))]
mod e2e_tests {
    use super::*;
    use crate::testing::{Behavior, HybridVsockProxy};
    use crate::v1::agent_service_server::{AgentService, AgentServiceServer};
    use crate::v1::{GuestInfoResponse, PingResponse, ShutdownResponse};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::{Request, Response, Status};

    #[derive(Clone)]
    struct TestAgent {
        ping: PingResponse,
        info: GuestInfoResponse,
        delay: Duration,
        shutdowns: Arc<AtomicUsize>,
    }

    impl Default for TestAgent {
        fn default() -> Self {
            Self {
                ping: PingResponse {
                    agent_version: "0.1.0".into(),
                    api_version: API_VERSION,
                },
                info: GuestInfoResponse {
                    kernel_release: "6.1.0-husk".into(),
                    kernel_version: "#1 SMP".into(),
                    uptime_ms: 1234,
                    mem_total_bytes: 256 << 20,
                    mem_available_bytes: 200 << 20,
                    online_cpus: 2,
                },
                delay: Duration::ZERO,
                shutdowns: Arc::default(),
            }
        }
    }

    #[tonic::async_trait]
    impl AgentService for TestAgent {
        async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
            tokio::time::sleep(self.delay).await;
            Ok(Response::new(self.ping.clone()))
        }
        async fn guest_info(
            &self,
            _: Request<GuestInfoRequest>,
        ) -> Result<Response<GuestInfoResponse>, Status> {
            Ok(Response::new(self.info.clone()))
        }
        async fn shutdown(
            &self,
            _: Request<ShutdownRequest>,
        ) -> Result<Response<ShutdownResponse>, Status> {
            self.shutdowns.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(ShutdownResponse {}))
        }
    }

    /// Serves `agent` on a plain Unix socket (the "guest side" of the pipe).
    async fn serve(path: PathBuf, agent: TestAgent) {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming(
                    AgentServiceServer::new(agent),
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                )
                .await
                .unwrap();
        });
    }

    fn fast_opts() -> ClientOptions {
        ClientOptions {
            handshake_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        }
    }

    async fn setup(agent: TestAgent) -> (tempfile::TempDir, HybridVsockProxy) {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("guest.sock");
        serve(guest.clone(), agent).await;
        let proxy = HybridVsockProxy::start(&dir.path().join("vmm.sock"), Behavior::Pipe(guest))
            .await
            .unwrap();
        (dir, proxy)
    }

    #[tokio::test]
    async fn ping_guest_info_shutdown() {
        let agent = TestAgent::default();
        let shutdowns = agent.shutdowns.clone();
        let (_dir, proxy) = setup(agent).await;
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
            .await
            .unwrap();
        let p = c.ping().await.unwrap();
        assert_eq!(p.api_version, API_VERSION);
        assert_eq!(p.agent_version, "0.1.0");
        let gi = c.guest_info().await.unwrap();
        assert_eq!(gi.kernel_release, "6.1.0-husk");
        assert_eq!(gi.uptime, Duration::from_millis(1234));
        assert_eq!(gi.online_cpus, 2);
        c.shutdown().await.unwrap();
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
        assert_eq!(proxy.ports(), vec![1024]);
    }

    #[tokio::test]
    async fn reconnect_redoes_handshake() {
        let (_dir, proxy) = setup(TestAgent::default()).await;
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
            .await
            .unwrap();
        c.ping().await.unwrap();
        assert_eq!(proxy.handshakes(), 1);
        proxy.drop_connections();
        // The channel notices the dead connection and reconnects through the
        // connector; the first call may still see the old connection die.
        let mut ok = false;
        for _ in 0..20 {
            if c.ping().await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "client did not recover");
        assert_eq!(proxy.handshakes(), 2);
    }

    #[tokio::test]
    async fn handshake_garbage_overlong_eof_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.sock");
        let proxy = HybridVsockProxy::start(&path, Behavior::Reply(b"HELLO\n".to_vec()))
            .await
            .unwrap();
        let err = AgentClient::connect_hybrid(&path, 1024, fast_opts())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Handshake {
                    source: HandshakeError::Malformed { .. },
                    port: 1024,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("vmm.sock"), "{err}");

        proxy.set_behavior(Behavior::Reply(vec![b'A'; 4096]));
        let err = AgentClient::connect_hybrid(&path, 1024, fast_opts())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Handshake {
                    source: HandshakeError::TooLong { .. },
                    ..
                }
            ),
            "{err}"
        );

        proxy.set_behavior(Behavior::Close);
        let err = AgentClient::connect_hybrid(&path, 1024, fast_opts())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Handshake {
                    source: HandshakeError::Closed { .. } | HandshakeError::Read(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_retryable());

        proxy.set_behavior(Behavior::Reply(b"OK 5".to_vec())); // no newline, never closes
        let t0 = Instant::now();
        let err = AgentClient::connect_hybrid(&path, 1024, fast_opts())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Handshake {
                    source: HandshakeError::Timeout(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));

        let err = AgentClient::connect_hybrid(&dir.path().join("missing.sock"), 1024, fast_opts())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Handshake {
                    source: HandshakeError::Connect(_),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hostile_replies_rejected() {
        async fn check(agent: TestAgent, want: &str) {
            let (_dir, proxy) = setup(agent).await;
            let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
                .await
                .unwrap();
            let err = match c.ping().await {
                Err(e) => e,
                Ok(_) => c.guest_info().await.unwrap_err(),
            };
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(!err.is_retryable());
        }
        let mut a = TestAgent::default();
        a.ping.api_version = 2;
        check(a, "agent API version 2").await;
        let mut a = TestAgent::default();
        a.ping.agent_version = "v\u{1b}[2J".into();
        check(a, "agent_version").await;
        let mut a = TestAgent::default();
        a.info.kernel_release = "x".repeat(300);
        check(a, "kernel_release: 300 bytes").await;
        let mut a = TestAgent::default();
        a.info.kernel_release = "6.1\0evil".into();
        check(a, "kernel_release: contains control").await;
        let mut a = TestAgent::default();
        a.info.kernel_version = "y".repeat(257);
        check(a, "kernel_version").await;
        let mut a = TestAgent::default();
        a.info.mem_available_bytes = a.info.mem_total_bytes + 1;
        check(a, "mem_available_bytes").await;
        let mut a = TestAgent::default();
        a.info.online_cpus = 0;
        check(a, "online_cpus").await;
        // A reply larger than the decoding cap is refused by the codec.
        let mut a = TestAgent::default();
        a.info.kernel_version = "z".repeat(MAX_MESSAGE_SIZE + 1);
        check(a, "GuestInfo").await;
    }

    #[tokio::test]
    async fn request_timeout() {
        let agent = TestAgent {
            delay: Duration::from_secs(30),
            ..TestAgent::default()
        };
        let (_dir, proxy) = setup(agent).await;
        let opts = ClientOptions {
            request_timeout: Duration::from_millis(200),
            ..fast_opts()
        };
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, opts)
            .await
            .unwrap();
        let t0 = Instant::now();
        let err = c.ping().await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Either our own deadline or tonic's fires first; both are fine.
        assert!(
            matches!(
                err,
                ClientError::Timeout { method: "Ping", .. }
                    | ClientError::Rpc { method: "Ping", .. }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn retry_until_agent_listens() {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("guest.sock");
        // Guest not listening yet: the proxy closes every connection.
        let proxy =
            HybridVsockProxy::start(&dir.path().join("vmm.sock"), Behavior::Pipe(guest.clone()))
                .await
                .unwrap();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            serve(guest, TestAgent::default()).await;
        });
        let c = AgentClient::connect_with_retry(
            proxy.path(),
            1024,
            fast_opts(),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
        late.await.unwrap();
        assert!(proxy.handshakes() > 1);
        c.guest_info().await.unwrap();
    }

    #[tokio::test]
    async fn retry_gives_up_at_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = HybridVsockProxy::start(&dir.path().join("vmm.sock"), Behavior::Close)
            .await
            .unwrap();
        let t0 = Instant::now();
        let err = AgentClient::connect_with_retry(
            proxy.path(),
            1024,
            fast_opts(),
            Instant::now() + Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        match &err {
            ClientError::DeadlineExceeded { attempts, last, .. } => {
                assert!(*attempts > 1);
                assert!(matches!(**last, ClientError::Handshake { .. }), "{last}");
            }
            other => panic!("{other}"),
        }

        // A hostile reply stops the retries at once.
        proxy.set_behavior(Behavior::Reply(b"NOPE\n".to_vec()));
        let err = AgentClient::connect_with_retry(
            proxy.path(),
            1024,
            fast_opts(),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    }
}
