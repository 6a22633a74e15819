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
//! * every reply is decoded strictly: a field unknown to this API revision,
//!   at any nesting level, fails the call with
//!   [`ClientError::ReplyRejected`] (see [`crate::strict_codec`]);
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

use crate::strict_codec::StrictDecodeError;
use crate::v1::agent_service_client::AgentServiceClient;
use crate::v1::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest, GuestInfoRequest,
    ListProcessesRequest, MountStorageRequest, OomEventsRequest, OomEventsResponse,
    PauseContainerRequest, PingRequest, ReadStderrRequest, ReadStderrResponse, ReadStdoutRequest,
    ReadStdoutResponse, RemoveContainerRequest, ResizePtyRequest, ResumeContainerRequest,
    ShutdownRequest, SignalProcessRequest, StartContainerRequest, StatsContainerRequest,
    StatsContainerResponse, UnmountStorageRequest, UpdateContainerRequest, WaitProcessRequest,
    WriteStdinRequest,
};
use crate::{is_valid_id, API_VERSION, MAX_MESSAGE_SIZE, MAX_STDIN_CHUNK, MAX_STDIO_CHUNK};

pub use crate::network::{
    InterfaceConfig, IpNet, MacAddr, NeighborConfig, NetworkConfig, RouteConfig, RouteScope,
};

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
/// Most processes accepted in a `ListProcesses` reply.
pub const MAX_LISTED_PROCESSES: usize = 1025;
/// Most pids accepted in a `ListProcesses` reply.
pub const MAX_LISTED_PIDS: usize = 65536;
/// Most `memory.stat` keys accepted in a `StatsContainer` reply.
pub const MAX_MEMORY_STAT_KEYS: usize = 128;
/// Most io.stat devices accepted in a `StatsContainer` reply.
pub const MAX_IO_DEVICES: usize = 256;
/// Most network interfaces accepted in a `StatsContainer` reply.
pub const MAX_NETWORK_INTERFACES: usize = 64;
/// Largest pid accepted (Linux PID_MAX_LIMIT).
pub const MAX_PID: u32 = 4 * 1024 * 1024;
/// Largest exit status accepted (255, or 128 + signal 64).
pub const MAX_EXIT_STATUS: u32 = 255;

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
    /// A reply was refused while decoding: a field unknown to this API
    /// revision (at any nesting level), or not valid protobuf. The guest is
    /// untrusted, so replies are decoded as strictly as the agent decodes
    /// requests (see [`crate::strict_codec`]).
    #[error("hybrid vsock {} port {port}: {method}: reply rejected: {source}", path.display())]
    ReplyRejected {
        /// VMM socket.
        path: PathBuf,
        /// Guest vsock port.
        port: u32,
        /// RPC name.
        method: &'static str,
        /// What the decoder refused.
        #[source]
        source: StrictDecodeError,
    },
    /// The caller's request was refused before sending (bad id, too large).
    #[error("{method}: invalid request field {field}: {reason}")]
    InvalidRequest {
        /// RPC name.
        method: &'static str,
        /// Offending field.
        field: &'static str,
        /// Why.
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
            | ClientError::ReplyRejected { .. }
            | ClientError::InvalidRequest { .. }
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

/// Validated reply of `WaitProcess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code or 128 + signal, ≤ [`MAX_EXIT_STATUS`].
    pub exit_status: u32,
    /// Reap time (guest clock).
    pub exited_at: std::time::SystemTime,
    /// The container had an OOM kill.
    pub oom_killed: bool,
}

/// One process of a validated `ListProcesses` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    /// Empty for init (only the first entry).
    pub exec_id: String,
    /// Guest pid, 1..=[`MAX_PID`].
    pub pid: u32,
    /// Exit status if it exited.
    pub exit_status: Option<u32>,
}

/// Validated reply of `ListProcesses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcesses {
    /// Processes the agent started, init first.
    pub processes: Vec<ContainerProcess>,
    /// Every pid in the container.
    pub pids: Vec<u32>,
}

/// Parameters of [`AgentClient::create_container`].
#[derive(Debug, Clone, Default)]
pub struct CreateContainer {
    /// New container id.
    pub container_id: String,
    /// config.json.
    pub oci_spec_json: Vec<u8>,
    /// Root file system path in the guest.
    pub rootfs_path: String,
    /// Give the process a stdin pipe.
    pub stdin: bool,
    /// Run it on a terminal.
    pub terminal: bool,
}

/// Parameters of [`AgentClient::mount_storage`]; see `MountStorageRequest`
/// in agent.proto and [`crate::storage::validate_mount`] for what is valid.
#[derive(Debug, Clone, Default)]
pub struct MountStorage {
    /// "virtiofs", "tmpfs", "ext4", "erofs", "xfs" or "bind".
    pub fstype: String,
    /// Tag, `/dev/vdX`, `serial:ID` or guest path (by `fstype`).
    pub source: String,
    /// Absolute path below `/run/husk/`.
    pub target: String,
    /// Mount options (`ro`, `nosuid`, `size=64m`, ...).
    pub options: Vec<String>,
    /// Mount read-only.
    pub readonly: bool,
}

enum OutputInner {
    Stdout(tonic::Streaming<ReadStdoutResponse>),
    Stderr(tonic::Streaming<ReadStderrResponse>),
}

/// A process's stdout or stderr, chunk by chunk (each validated to be
/// 1..=[`MAX_STDIO_CHUNK`] bytes). No deadline: it ends at the process's EOF.
pub struct OutputStream {
    inner: OutputInner,
    method: &'static str,
    client: AgentClient,
}

impl fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputStream")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl OutputStream {
    /// The next chunk; `None` at EOF.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, ClientError>> {
        let r = match &mut self.inner {
            OutputInner::Stdout(s) => s.message().await.map(|m| m.map(|m| m.data)),
            OutputInner::Stderr(s) => s.message().await.map(|m| m.map(|m| m.data)),
        };
        match r {
            Ok(None) => None,
            Ok(Some(data)) if data.is_empty() || data.len() > MAX_STDIO_CHUNK => {
                Some(Err(self.client.invalid(
                    self.method,
                    "data",
                    format!("{} bytes, must be 1..={MAX_STDIO_CHUNK}", data.len()),
                )))
            }
            Ok(Some(data)) => Some(Ok(data)),
            Err(status) => Some(Err(self.client.rpc_error(self.method, &status))),
        }
    }

    /// Reads to EOF, refusing more than `limit` bytes in total.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(self.client.invalid(
                    self.method,
                    "data",
                    format!("more than the caller's limit of {limit} bytes"),
                ));
            }
            out.extend(chunk);
        }
        Ok(out)
    }
}

/// OOM kills reported by the agent (`OomEvents`), each a validated
/// container id. No deadline.
pub struct OomEventStream {
    inner: tonic::Streaming<OomEventsResponse>,
    client: AgentClient,
}

impl fmt::Debug for OomEventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OomEventStream").finish_non_exhaustive()
    }
}

impl OomEventStream {
    /// The next OOM-killed container's id; `None` if the agent ended it.
    pub async fn next(&mut self) -> Option<Result<String, ClientError>> {
        match self.inner.message().await {
            Ok(None) => None,
            Ok(Some(ev)) if !is_valid_id(&ev.container_id) => Some(Err(self.client.invalid(
                "OomEvents",
                "container_id",
                "not a valid id".into(),
            ))),
            Ok(Some(ev)) => Some(Ok(ev.container_id)),
            Err(status) => Some(Err(self.client.rpc_error("OomEvents", &status))),
        }
    }
}

fn check_id(
    method: &'static str,
    field: &'static str,
    id: &str,
    allow_empty: bool,
) -> Result<(), ClientError> {
    if (allow_empty && id.is_empty()) || is_valid_id(id) {
        return Ok(());
    }
    Err(ClientError::InvalidRequest {
        method,
        field,
        reason: format!(
            "{:?} is not a valid id",
            id.chars().take(80).collect::<String>()
        ),
    })
}

/// A storage validation error as an `InvalidRequest`. The field is one of a
/// fixed set (`options[3]` becomes `options`, the index stays in the reason).
fn storage_request_error(method: &'static str, e: crate::storage::StorageError) -> ClientError {
    let field = match e.field.as_str() {
        "fstype" => "fstype",
        "source" => "source",
        "target" => "target",
        _ => "options",
    };
    ClientError::InvalidRequest {
        method,
        field,
        reason: e.to_string(),
    }
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
            // No channel-wide request timeout: every method bounds its own
            // call (WaitProcess and the streams must be able to outlive it).
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

    // ---- containers ----

    fn echo(
        &self,
        method: &'static str,
        field: &'static str,
        got: &str,
        want: &str,
    ) -> Result<(), ClientError> {
        if got != want {
            return Err(self.invalid(
                method,
                field,
                format!("does not echo the request ({} bytes)", got.len()),
            ));
        }
        Ok(())
    }

    fn check_pid(&self, method: &'static str, pid: u32) -> Result<u32, ClientError> {
        if pid == 0 || pid > MAX_PID {
            return Err(self.invalid(method, "pid", format!("{pid} not in 1..={MAX_PID}")));
        }
        Ok(pid)
    }

    /// `CreateContainer`: sets the container up to just before its exec.
    /// Returns the init pid.
    pub async fn create_container(&self, req: CreateContainer) -> Result<u32, ClientError> {
        const M: &str = "CreateContainer";
        check_id(M, "container_id", &req.container_id, false)?;
        if req.oci_spec_json.len() > crate::MAX_SPEC_SIZE {
            return Err(ClientError::InvalidRequest {
                method: M,
                field: "oci_spec_json",
                reason: format!(
                    "{} bytes, limit {}",
                    req.oci_spec_json.len(),
                    crate::MAX_SPEC_SIZE
                ),
            });
        }
        let id = req.container_id.clone();
        let mut c = self.inner.clone();
        let r = self
            .call(M, async move {
                c.create_container(CreateContainerRequest {
                    container_id: req.container_id,
                    oci_spec_json: req.oci_spec_json,
                    rootfs_path: req.rootfs_path,
                    stdin: req.stdin,
                    terminal: req.terminal,
                })
                .await
            })
            .await?;
        self.echo(M, "container_id", &r.container_id, &id)?;
        self.check_pid(M, r.pid)
    }

    /// `StartContainer`: execs the created container's process.
    pub async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        const M: &str = "StartContainer";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let container_id = container_id.to_string();
        let id = container_id.clone();
        let r = self
            .call(M, async move {
                c.start_container(StartContainerRequest { container_id })
                    .await
            })
            .await?;
        self.echo(M, "container_id", &r.container_id, &id)
    }

    /// `ExecProcess`: starts `process_json` (an OCI process) in a running
    /// container. Returns its pid.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdin: bool,
        terminal: bool,
    ) -> Result<u32, ClientError> {
        const M: &str = "ExecProcess";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, false)?;
        let mut c = self.inner.clone();
        let req = ExecProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            process_json,
            stdin,
            terminal,
        };
        let r = self
            .call(M, async move { c.exec_process(req).await })
            .await?;
        self.echo(M, "container_id", &r.container_id, container_id)?;
        self.echo(M, "exec_id", &r.exec_id, exec_id)?;
        self.check_pid(M, r.pid)
    }

    /// `SignalProcess` (`exec_id` empty: init; `all`: every process).
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        const M: &str = "SignalProcess";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
        };
        self.call(M, async move { c.signal_process(req).await })
            .await
            .map(|_| ())
    }

    /// `WaitProcess`: waits up to `timeout` (`None`: forever) for the exit.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
        timeout: Option<Duration>,
    ) -> Result<ProcessExit, ClientError> {
        const M: &str = "WaitProcess";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = WaitProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let fut = async move { c.wait_process(req).await };
        let r = match timeout {
            Some(t) => self.call_within(M, t, fut).await?,
            None => fut
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| self.rpc_error(M, &s))?,
        };
        self.echo(M, "container_id", &r.container_id, container_id)?;
        self.echo(M, "exec_id", &r.exec_id, exec_id)?;
        if r.exit_status > MAX_EXIT_STATUS {
            return Err(self.invalid(
                M,
                "exit_status",
                format!("{} > {MAX_EXIT_STATUS}", r.exit_status),
            ));
        }
        if r.exited_at_unix_nanos == 0 {
            return Err(self.invalid(M, "exited_at_unix_nanos", "zero".into()));
        }
        Ok(ProcessExit {
            exit_status: r.exit_status,
            exited_at: std::time::UNIX_EPOCH + Duration::from_nanos(r.exited_at_unix_nanos),
            oom_killed: r.oom_killed,
        })
    }

    /// `RemoveContainer`.
    pub async fn remove_container(
        &self,
        container_id: &str,
        force: bool,
    ) -> Result<(), ClientError> {
        const M: &str = "RemoveContainer";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let req = RemoveContainerRequest {
            container_id: container_id.to_string(),
            force,
        };
        self.call(M, async move { c.remove_container(req).await })
            .await
            .map(|_| ())
    }

    /// `ListProcesses`, validated (bounded lists, valid ids and pids).
    pub async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<ContainerProcesses, ClientError> {
        const M: &str = "ListProcesses";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let req = ListProcessesRequest {
            container_id: container_id.to_string(),
        };
        let r = self
            .call(M, async move { c.list_processes(req).await })
            .await?;
        self.echo(M, "container_id", &r.container_id, container_id)?;
        if r.processes.is_empty() || r.processes.len() > MAX_LISTED_PROCESSES {
            return Err(self.invalid(
                M,
                "processes",
                format!(
                    "{} entries, must be 1..={MAX_LISTED_PROCESSES}",
                    r.processes.len()
                ),
            ));
        }
        if r.pids.len() > MAX_LISTED_PIDS {
            return Err(self.invalid(
                M,
                "pids",
                format!("{} entries, limit {MAX_LISTED_PIDS}", r.pids.len()),
            ));
        }
        let mut processes = Vec::with_capacity(r.processes.len());
        for (i, p) in r.processes.into_iter().enumerate() {
            let ok_id = if i == 0 {
                p.exec_id.is_empty()
            } else {
                is_valid_id(&p.exec_id)
            };
            if !ok_id {
                return Err(self.invalid(M, "processes.exec_id", format!("entry {i}: bad id")));
            }
            self.check_pid(M, p.pid)?;
            if p.exit_status > MAX_EXIT_STATUS {
                return Err(self.invalid(
                    M,
                    "processes.exit_status",
                    format!("{} > {MAX_EXIT_STATUS}", p.exit_status),
                ));
            }
            processes.push(ContainerProcess {
                exec_id: p.exec_id,
                pid: p.pid,
                exit_status: p.exited.then_some(p.exit_status),
            });
        }
        for pid in &r.pids {
            self.check_pid(M, *pid)?;
        }
        Ok(ContainerProcesses {
            processes,
            pids: r.pids,
        })
    }

    /// `ReadStdout`: the process's stdout (or terminal output) as a stream.
    pub async fn read_stdout(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<OutputStream, ClientError> {
        const M: &str = "ReadStdout";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = ReadStdoutRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let s = self
            .call(M, async move { c.read_stdout(req).await })
            .await?;
        Ok(OutputStream {
            inner: OutputInner::Stdout(s),
            method: M,
            client: self.clone(),
        })
    }

    /// `ReadStderr`: the process's stderr as a stream.
    pub async fn read_stderr(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<OutputStream, ClientError> {
        const M: &str = "ReadStderr";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = ReadStderrRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let s = self
            .call(M, async move { c.read_stderr(req).await })
            .await?;
        Ok(OutputStream {
            inner: OutputInner::Stderr(s),
            method: M,
            client: self.clone(),
        })
    }

    /// `WriteStdin`: writes all of `data` (≤ [`MAX_STDIN_CHUNK`]); waits, without the request
    /// timeout, for as long as the process takes to read it.
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<(), ClientError> {
        const M: &str = "WriteStdin";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        if data.len() > MAX_STDIN_CHUNK {
            return Err(ClientError::InvalidRequest {
                method: M,
                field: "data",
                reason: format!("{} bytes, limit {MAX_STDIN_CHUNK}", data.len()),
            });
        }
        let len = data.len();
        let mut c = self.inner.clone();
        let req = WriteStdinRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            data,
        };
        // No deadline: the agent answers once the process has read the bytes, and a process
        // may rightly leave its stdin unread for minutes (backpressure, not a hang). A dead VM
        // or agent ends the call through the connection; CloseStdin ends it with ABORTED.
        let r = c
            .write_stdin(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.rpc_error(M, &s))?;
        if r.written as usize != len {
            return Err(self.invalid(M, "written", format!("{} of {len} bytes", r.written)));
        }
        Ok(())
    }

    /// `CloseStdin`.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        const M: &str = "CloseStdin";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = CloseStdinRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        self.call(M, async move { c.close_stdin(req).await })
            .await
            .map(|_| ())
    }

    /// `ResizePty`.
    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        const M: &str = "ResizePty";
        check_id(M, "container_id", container_id, false)?;
        check_id(M, "exec_id", exec_id, true)?;
        let mut c = self.inner.clone();
        let req = ResizePtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            rows: rows.into(),
            cols: cols.into(),
        };
        self.call(M, async move { c.resize_pty(req).await })
            .await
            .map(|_| ())
    }

    /// `PauseContainer` (cgroup v2 freeze).
    pub async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        const M: &str = "PauseContainer";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let req = PauseContainerRequest {
            container_id: container_id.to_string(),
        };
        self.call(M, async move { c.pause_container(req).await })
            .await
            .map(|_| ())
    }

    /// `ResumeContainer`.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        const M: &str = "ResumeContainer";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let req = ResumeContainerRequest {
            container_id: container_id.to_string(),
        };
        self.call(M, async move { c.resume_container(req).await })
            .await
            .map(|_| ())
    }

    /// `StatsContainer`, validated (bounded maps and lists, sane keys).
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        const M: &str = "StatsContainer";
        check_id(M, "container_id", container_id, false)?;
        let mut c = self.inner.clone();
        let req = StatsContainerRequest {
            container_id: container_id.to_string(),
        };
        let r = self
            .call(M, async move { c.stats_container(req).await })
            .await?;
        self.echo(M, "container_id", &r.container_id, container_id)?;
        if let Some(m) = &r.memory {
            if m.stat.len() > MAX_MEMORY_STAT_KEYS {
                return Err(self.invalid(
                    M,
                    "memory.stat",
                    format!("{} keys, limit {MAX_MEMORY_STAT_KEYS}", m.stat.len()),
                ));
            }
            for k in m.stat.keys() {
                check_text(k, 64, true).map_err(|reason| self.invalid(M, "memory.stat", reason))?;
            }
        }
        if r.io.len() > MAX_IO_DEVICES {
            return Err(self.invalid(
                M,
                "io",
                format!("{} devices, limit {MAX_IO_DEVICES}", r.io.len()),
            ));
        }
        if r.network.len() > MAX_NETWORK_INTERFACES {
            return Err(self.invalid(
                M,
                "network",
                format!(
                    "{} interfaces, limit {MAX_NETWORK_INTERFACES}",
                    r.network.len()
                ),
            ));
        }
        for n in &r.network {
            check_text(&n.name, crate::network::MAX_INTERFACE_NAME_LEN, true)
                .map_err(|reason| self.invalid(M, "network.name", reason))?;
        }
        Ok(r)
    }

    /// `OomEvents`: OOM kills from now on.
    pub async fn oom_events(&self) -> Result<OomEventStream, ClientError> {
        let mut c = self.inner.clone();
        let s = self
            .call("OomEvents", async move {
                c.oom_events(OomEventsRequest {}).await
            })
            .await?;
        Ok(OomEventStream {
            inner: s,
            client: self.clone(),
        })
    }

    /// `UpdateContainer`: applies an OCI `linux.resources` object (JSON,
    /// at most [`crate::MAX_SPEC_SIZE`] bytes) to the container's cgroup.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), ClientError> {
        const M: &str = "UpdateContainer";
        check_id(M, "container_id", container_id, false)?;
        if resources_json.len() > crate::MAX_SPEC_SIZE {
            return Err(ClientError::InvalidRequest {
                method: M,
                field: "resources_json",
                reason: format!(
                    "{} bytes, limit {}",
                    resources_json.len(),
                    crate::MAX_SPEC_SIZE
                ),
            });
        }
        let mut c = self.inner.clone();
        let req = UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources_json,
        };
        self.call(M, async move { c.update_container(req).await })
            .await
            .map(|_| ())
    }

    /// `MountStorage`: mounts a file system below `/run/husk/` in the guest.
    /// The request is validated here first (same rules as the agent's).
    pub async fn mount_storage(&self, req: MountStorage) -> Result<(), ClientError> {
        const M: &str = "MountStorage";
        crate::storage::validate_mount(
            &req.fstype,
            &req.source,
            &req.target,
            &req.options,
            req.readonly,
        )
        .map_err(|e| storage_request_error(M, e))?;
        let mut c = self.inner.clone();
        let req = MountStorageRequest {
            fstype: req.fstype,
            source: req.source,
            target: req.target,
            options: req.options,
            readonly: req.readonly,
        };
        self.call(M, async move { c.mount_storage(req).await })
            .await
            .map(|_| ())
    }

    /// `UnmountStorage`: undoes a [`AgentClient::mount_storage`].
    pub async fn unmount_storage(&self, target: &str) -> Result<(), ClientError> {
        const M: &str = "UnmountStorage";
        crate::storage::validate_target(target).map_err(|e| storage_request_error(M, e))?;
        let mut c = self.inner.clone();
        let req = UnmountStorageRequest {
            target: target.to_string(),
        };
        self.call(M, async move { c.unmount_storage(req).await })
            .await
            .map(|_| ())
    }

    /// `SetupNetwork`: configures the guest's interfaces (found by MAC),
    /// routes and neighbours, and writes resolv.conf / hosts to
    /// [`crate::network::RESOLV_CONF_PATH`] / [`crate::network::HOSTS_PATH`]
    /// in the guest (for the container specs to bind-mount). Idempotent: call
    /// it again with the same config after a lost reply.
    ///
    /// `config` is validated here first, with the agent's own rules
    /// ([`NetworkConfig::from_request`]): a bad value is
    /// [`ClientError::InvalidRequest`] whose `field` is the list it is in
    /// (`interfaces`, `routes`, `neighbors`, `resolv_conf`, `hosts`) and whose
    /// reason names the exact field (`routes[1].gateway: ...`). The agent's
    /// refusals come back as [`ClientError::Rpc`]: `NotFound` for a MAC or a
    /// device the guest does not have, `InvalidArgument`, `FailedPrecondition`
    /// or `Internal` (with the step and errno) for what the guest kernel
    /// refuses.
    ///
    /// ```no_run
    /// # async fn f(client: husk_proto::client::AgentClient) -> Result<(), husk_proto::client::ClientError> {
    /// use husk_proto::client::{InterfaceConfig, NetworkConfig, RouteConfig, RouteScope};
    /// let config = NetworkConfig {
    ///     interfaces: vec![InterfaceConfig {
    ///         mac: "02:11:22:33:44:55".parse().unwrap(),
    ///         name: "eth0".into(),
    ///         mtu: 1500,
    ///         addresses: vec!["10.88.0.5/16".parse().unwrap()],
    ///         up: true,
    ///     }],
    ///     routes: vec![RouteConfig {
    ///         destination: husk_proto::client::IpNet::default_route(false),
    ///         gateway: Some("10.88.0.1".parse().unwrap()),
    ///         device: "eth0".into(),
    ///         source: None,
    ///         scope: RouteScope::Auto,
    ///     }],
    ///     resolv_conf: Some(b"nameserver 10.96.0.10\n".to_vec()),
    ///     ..NetworkConfig::default()
    /// };
    /// client.setup_network(&config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn setup_network(&self, config: &NetworkConfig) -> Result<(), ClientError> {
        const M: &str = "SetupNetwork";
        let req = config.to_request();
        // The agent's own validation, on what goes on the wire.
        crate::network::NetworkConfig::from_request(&req).map_err(|e| {
            ClientError::InvalidRequest {
                method: M,
                field: e.top_level_field(),
                reason: e.to_string(),
            }
        })?;
        // Unreachable within the caps above; kept so that a raised cap cannot
        // produce a request the agent's decoder refuses.
        let len = prost::Message::encoded_len(&req);
        if len > MAX_MESSAGE_SIZE {
            return Err(ClientError::InvalidRequest {
                method: M,
                field: "request",
                reason: format!("request of {len} bytes, limit {MAX_MESSAGE_SIZE}"),
            });
        }
        let mut c = self.inner.clone();
        self.call(M, async move { c.setup_network(req).await })
            .await
            .map(|_| ())
    }

    async fn call_within<T, F>(
        &self,
        method: &'static str,
        timeout: Duration,
        fut: F,
    ) -> Result<T, ClientError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(ClientError::Timeout {
                path: self.uds_path.clone(),
                port: self.port,
                method,
                timeout,
            }),
            Ok(Err(status)) => Err(self.rpc_error(method, &status)),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    fn rpc_error(&self, method: &'static str, status: &tonic::Status) -> ClientError {
        // The strict decoder's own refusal of a reply carries the error as
        // the status's source; a status sent by the agent never has one.
        let rejected =
            std::error::Error::source(status).and_then(|e| e.downcast_ref::<StrictDecodeError>());
        if let Some(e) = rejected {
            return ClientError::ReplyRejected {
                path: self.uds_path.clone(),
                port: self.port,
                method,
                source: e.clone(),
            };
        }
        ClientError::Rpc {
            path: self.uds_path.clone(),
            port: self.port,
            method,
            code: status.code(),
            message: sanitize_for_error(status.message().as_bytes()),
        }
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
            Ok(Err(status)) => Err(self.rpc_error(method, &status)),
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
#[path = "client_strict_tests.rs"]
mod strict_tests;

#[cfg(all(test, feature = "server", feature = "test-util"))]
mod e2e_tests {
    use super::*;
    use crate::testing::{Behavior, HybridVsockProxy};
    use crate::v1::agent_service_server::{AgentService, AgentServiceServer};
    use crate::v1::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::{Request, Response, Status};

    #[derive(Clone)]
    pub(super) struct TestAgent {
        ping: PingResponse,
        info: GuestInfoResponse,
        delay: Duration,
        shutdowns: Arc<AtomicUsize>,
        /// Container replies (possibly hostile).
        echo_id: Option<String>,
        pid: u32,
        exit_status: u32,
        exited_at: u64,
        chunks: Vec<Vec<u8>>,
        list: ListProcessesResponse,
        /// MountStorage / UnmountStorage / UpdateContainer calls received.
        storage_calls: Arc<AtomicUsize>,
        /// StatsContainer replies with these interfaces (and a sane
        /// memory.stat) instead of 200 memory.stat keys.
        network_stats: Option<Vec<NetworkInterfaceStats>>,
        /// SetupNetwork requests received.
        pub(super) network_requests: Arc<Mutex<Vec<SetupNetworkRequest>>>,
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
                echo_id: None,
                pid: 42,
                exit_status: 3,
                exited_at: 1_700_000_000_000_000_000,
                chunks: vec![b"hello".to_vec()],
                list: ListProcessesResponse {
                    container_id: "c1".into(),
                    processes: vec![ListedProcess {
                        exec_id: String::new(),
                        pid: 42,
                        exited: false,
                        exit_status: 0,
                    }],
                    pids: vec![42],
                },
                storage_calls: Arc::default(),
                network_stats: None,
                network_requests: Arc::default(),
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

        async fn create_container(
            &self,
            r: Request<CreateContainerRequest>,
        ) -> Result<Response<CreateContainerResponse>, Status> {
            let r = r.into_inner();
            Ok(Response::new(CreateContainerResponse {
                container_id: self.echo_id.clone().unwrap_or(r.container_id),
                pid: self.pid,
            }))
        }
        async fn start_container(
            &self,
            r: Request<StartContainerRequest>,
        ) -> Result<Response<StartContainerResponse>, Status> {
            Ok(Response::new(StartContainerResponse {
                container_id: r.into_inner().container_id,
            }))
        }
        async fn exec_process(
            &self,
            r: Request<ExecProcessRequest>,
        ) -> Result<Response<ExecProcessResponse>, Status> {
            let r = r.into_inner();
            Ok(Response::new(ExecProcessResponse {
                container_id: r.container_id,
                exec_id: self.echo_id.clone().unwrap_or(r.exec_id),
                pid: self.pid,
            }))
        }
        async fn signal_process(
            &self,
            _: Request<SignalProcessRequest>,
        ) -> Result<Response<SignalProcessResponse>, Status> {
            Ok(Response::new(SignalProcessResponse {}))
        }
        async fn wait_process(
            &self,
            r: Request<WaitProcessRequest>,
        ) -> Result<Response<WaitProcessResponse>, Status> {
            tokio::time::sleep(self.delay).await;
            let r = r.into_inner();
            Ok(Response::new(WaitProcessResponse {
                container_id: r.container_id,
                exec_id: r.exec_id,
                exit_status: self.exit_status,
                exited_at_unix_nanos: self.exited_at,
                oom_killed: false,
            }))
        }
        async fn remove_container(
            &self,
            _: Request<RemoveContainerRequest>,
        ) -> Result<Response<RemoveContainerResponse>, Status> {
            Err(Status::failed_precondition("running \u{1b}[2J"))
        }
        async fn list_processes(
            &self,
            _: Request<ListProcessesRequest>,
        ) -> Result<Response<ListProcessesResponse>, Status> {
            Ok(Response::new(self.list.clone()))
        }
        type ReadStdoutStream =
            Pin<Box<dyn tokio_stream::Stream<Item = Result<ReadStdoutResponse, Status>> + Send>>;
        async fn read_stdout(
            &self,
            _: Request<ReadStdoutRequest>,
        ) -> Result<Response<Self::ReadStdoutStream>, Status> {
            let items: Vec<_> = self
                .chunks
                .iter()
                .map(|c| Ok(ReadStdoutResponse { data: c.clone() }))
                .collect();
            Ok(Response::new(Box::pin(tokio_stream::iter(items))))
        }
        type ReadStderrStream =
            Pin<Box<dyn tokio_stream::Stream<Item = Result<ReadStderrResponse, Status>> + Send>>;
        async fn read_stderr(
            &self,
            _: Request<ReadStderrRequest>,
        ) -> Result<Response<Self::ReadStderrStream>, Status> {
            Err(Status::unimplemented("no"))
        }
        async fn write_stdin(
            &self,
            r: Request<WriteStdinRequest>,
        ) -> Result<Response<WriteStdinResponse>, Status> {
            // Takes `delay` (a process slow to read), then lies: claims one byte less than sent.
            tokio::time::sleep(self.delay).await;
            let n = r.into_inner().data.len() as u32;
            Ok(Response::new(WriteStdinResponse {
                written: n.saturating_sub(1),
            }))
        }
        async fn close_stdin(
            &self,
            _: Request<CloseStdinRequest>,
        ) -> Result<Response<CloseStdinResponse>, Status> {
            Ok(Response::new(CloseStdinResponse {}))
        }
        async fn resize_pty(
            &self,
            _: Request<ResizePtyRequest>,
        ) -> Result<Response<ResizePtyResponse>, Status> {
            Ok(Response::new(ResizePtyResponse {}))
        }
        async fn pause_container(
            &self,
            _: Request<PauseContainerRequest>,
        ) -> Result<Response<PauseContainerResponse>, Status> {
            Ok(Response::new(PauseContainerResponse {}))
        }
        async fn resume_container(
            &self,
            _: Request<ResumeContainerRequest>,
        ) -> Result<Response<ResumeContainerResponse>, Status> {
            Ok(Response::new(ResumeContainerResponse {}))
        }
        async fn stats_container(
            &self,
            r: Request<StatsContainerRequest>,
        ) -> Result<Response<StatsContainerResponse>, Status> {
            let mut stat = std::collections::HashMap::new();
            let keys = if self.network_stats.is_some() { 2 } else { 200 };
            for i in 0..keys {
                stat.insert(format!("k{i}"), i);
            }
            Ok(Response::new(StatsContainerResponse {
                container_id: r.into_inner().container_id,
                memory: Some(ContainerMemoryStats {
                    stat,
                    ..Default::default()
                }),
                network: self.network_stats.clone().unwrap_or_default(),
                ..Default::default()
            }))
        }
        async fn update_container(
            &self,
            r: Request<UpdateContainerRequest>,
        ) -> Result<Response<UpdateContainerResponse>, Status> {
            self.storage_calls.fetch_add(1, Ordering::SeqCst);
            if r.into_inner().container_id != "c1" {
                return Err(Status::not_found("no such container"));
            }
            Ok(Response::new(UpdateContainerResponse {}))
        }
        async fn mount_storage(
            &self,
            r: Request<MountStorageRequest>,
        ) -> Result<Response<MountStorageResponse>, Status> {
            self.storage_calls.fetch_add(1, Ordering::SeqCst);
            let r = r.into_inner();
            if r.fstype != "virtiofs" || r.options != ["nodev"] || !r.readonly {
                return Err(Status::internal("request not forwarded as given"));
            }
            Ok(Response::new(MountStorageResponse {}))
        }
        async fn unmount_storage(
            &self,
            r: Request<UnmountStorageRequest>,
        ) -> Result<Response<UnmountStorageResponse>, Status> {
            self.storage_calls.fetch_add(1, Ordering::SeqCst);
            if r.into_inner().target != "/run/husk/shared" {
                return Err(Status::not_found("not mounted by MountStorage"));
            }
            Ok(Response::new(UnmountStorageResponse {}))
        }
        async fn setup_network(
            &self,
            r: Request<SetupNetworkRequest>,
        ) -> Result<Response<SetupNetworkResponse>, Status> {
            let r = r.into_inner();
            let unknown = r
                .interfaces
                .iter()
                .find(|i| i.mac != "02:11:22:33:44:55")
                .map(|i| i.mac.clone());
            self.network_requests.lock().unwrap().push(r);
            if let Some(mac) = unknown {
                return Err(Status::not_found(format!(
                    "interfaces[0].mac: no interface with MAC {mac}"
                )));
            }
            Ok(Response::new(SetupNetworkResponse {}))
        }
        type OomEventsStream =
            Pin<Box<dyn tokio_stream::Stream<Item = Result<OomEventsResponse, Status>> + Send>>;
        async fn oom_events(
            &self,
            _: Request<OomEventsRequest>,
        ) -> Result<Response<Self::OomEventsStream>, Status> {
            let items = vec![
                Ok(OomEventsResponse {
                    container_id: "c1".into(),
                }),
                Ok(OomEventsResponse {
                    container_id: "../x".into(),
                }),
            ];
            Ok(Response::new(Box::pin(tokio_stream::iter(items))))
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

    pub(super) fn fast_opts() -> ClientOptions {
        ClientOptions {
            handshake_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        }
    }

    pub(super) async fn setup(agent: TestAgent) -> (tempfile::TempDir, HybridVsockProxy) {
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
        a.ping.api_version = API_VERSION + 1;
        check(a, &format!("agent API version {}", API_VERSION + 1)).await;
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
    async fn container_calls_validate_replies() {
        let (_dir, proxy) = setup(TestAgent::default()).await;
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
            .await
            .unwrap();
        let create = |id: &str| CreateContainer {
            container_id: id.into(),
            oci_spec_json: b"{}".to_vec(),
            rootfs_path: "/r".into(),
            ..CreateContainer::default()
        };
        assert_eq!(c.create_container(create("c1")).await.unwrap(), 42);
        // Ids are checked before anything is sent.
        let e = c.create_container(create("../c1")).await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidRequest {
                    field: "container_id",
                    ..
                }
            ),
            "{e}"
        );
        let e = c.wait_process("c1", "bad id", None).await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidRequest {
                    field: "exec_id",
                    ..
                }
            ),
            "{e}"
        );
        let e = c
            .write_stdin("c1", "", vec![0; MAX_STDIN_CHUNK + 1])
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidRequest { field: "data", .. }),
            "{e}"
        );
        c.start_container("c1").await.unwrap();
        let exit = c.wait_process("c1", "", None).await.unwrap();
        assert_eq!(exit.exit_status, 3);
        let mut out = c.read_stdout("c1", "").await.unwrap();
        assert_eq!(out.read_to_end(100).await.unwrap(), b"hello");
        assert_eq!(c.list_processes("c1").await.unwrap().pids, [42]);
        c.signal_process("c1", "", 9, true).await.unwrap();
        // Hostile or broken replies.
        let e = c.write_stdin("c1", "", b"abc".to_vec()).await.unwrap_err();
        assert!(e.to_string().contains("written: 2 of 3"), "{e}");
        let e = c.stats_container("c1").await.unwrap_err();
        assert!(e.to_string().contains("memory.stat: 200 keys"), "{e}");
        let e = c.remove_container("c1", false).await.unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "escaped: {e}");
        let mut oom = c.oom_events().await.unwrap();
        assert_eq!(oom.next().await.unwrap().unwrap(), "c1");
        assert!(oom.next().await.unwrap().is_err(), "invalid id refused");

        async fn check(agent: TestAgent, want: &str) {
            let (_dir, proxy) = setup(agent).await;
            let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
                .await
                .unwrap();
            let err = match c
                .create_container(CreateContainer {
                    container_id: "c1".into(),
                    ..CreateContainer::default()
                })
                .await
            {
                Err(e) => e,
                Ok(_) => match c.wait_process("c1", "", None).await {
                    Err(e) => e,
                    Ok(_) => match c.list_processes("c1").await {
                        Err(e) => e,
                        Ok(_) => {
                            let mut s = c.read_stdout("c1", "").await.unwrap();
                            s.read_to_end(1 << 20).await.unwrap_err()
                        }
                    },
                },
            };
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(!err.is_retryable());
        }
        let a = TestAgent {
            echo_id: Some("other".into()),
            ..TestAgent::default()
        };
        check(a, "container_id: does not echo").await;
        let a = TestAgent {
            pid: 0,
            ..TestAgent::default()
        };
        check(a, "pid: 0 not in").await;
        let a = TestAgent {
            exit_status: 300,
            ..TestAgent::default()
        };
        check(a, "exit_status: 300").await;
        let a = TestAgent {
            exited_at: 0,
            ..TestAgent::default()
        };
        check(a, "exited_at_unix_nanos").await;
        let mut a = TestAgent::default();
        a.list.pids = vec![0];
        check(a, "ListProcesses: invalid reply field pid").await;
        let mut a = TestAgent::default();
        a.list.processes[0].exec_id = "x".into();
        check(a, "processes.exec_id").await;
        let mut a = TestAgent::default();
        a.list.pids = vec![1; MAX_LISTED_PIDS + 1];
        check(a, "pids: 65537 entries").await;
        let a = TestAgent {
            chunks: vec![b"ok".to_vec(), Vec::new()],
            ..TestAgent::default()
        };
        check(a, "data: 0 bytes").await;
        let a = TestAgent {
            chunks: vec![vec![b'x'; MAX_STDIO_CHUNK + 1]],
            ..TestAgent::default()
        };
        check(a, "data: 32769 bytes").await;
    }

    #[tokio::test]
    async fn storage_and_update_calls_are_validated_before_sending() {
        let agent = TestAgent::default();
        let calls = Arc::clone(&agent.storage_calls);
        let (_dir, proxy) = setup(agent).await;
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
            .await
            .unwrap();
        let good = MountStorage {
            fstype: "virtiofs".into(),
            source: "pod-share".into(),
            target: "/run/husk/shared".into(),
            options: vec!["nodev".into()],
            readonly: true,
        };
        c.mount_storage(good.clone()).await.unwrap();
        c.unmount_storage("/run/husk/shared").await.unwrap();
        c.update_container("c1", br#"{"pids":{"limit":10}}"#.to_vec())
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Refused locally, never sent.
        let field_of = |e: ClientError| match e {
            ClientError::InvalidRequest { field, reason, .. } => (field, reason),
            e => panic!("not an InvalidRequest: {e}"),
        };
        let bad = |f: fn(&mut MountStorage)| {
            let mut m = good.clone();
            f(&mut m);
            m
        };
        let (f, why) = field_of(
            c.mount_storage(bad(|m| m.options.push("suid".into())))
                .await
                .unwrap_err(),
        );
        assert_eq!(f, "options");
        assert!(
            why.contains("options[1]") && why.contains("\"suid\""),
            "{why}"
        );
        let (f, _) = field_of(
            c.mount_storage(bad(|m| m.target = "/run/husk/../etc".into()))
                .await
                .unwrap_err(),
        );
        assert_eq!(f, "target");
        let (f, _) = field_of(
            c.mount_storage(bad(|m| m.fstype = "nfs".into()))
                .await
                .unwrap_err(),
        );
        assert_eq!(f, "fstype");
        let (f, _) = field_of(
            c.mount_storage(bad(|m| {
                m.fstype = "ext4".into();
                m.source = "/dev/sda".into();
            }))
            .await
            .unwrap_err(),
        );
        assert_eq!(f, "source");
        let (f, _) = field_of(c.unmount_storage("/etc").await.unwrap_err());
        assert_eq!(f, "target");
        let (f, _) = field_of(
            c.update_container("c1", vec![b' '; crate::MAX_SPEC_SIZE + 1])
                .await
                .unwrap_err(),
        );
        assert_eq!(f, "resources_json");
        let (f, _) = field_of(c.update_container("../c1", Vec::new()).await.unwrap_err());
        assert_eq!(f, "container_id");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // The agent's errors come back as RPC errors with their code.
        let e = c.unmount_storage("/run/husk/other").await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Rpc {
                    code: tonic::Code::NotFound,
                    ..
                }
            ),
            "{e}"
        );
        let e = c.update_container("c2", b"{}".to_vec()).await.unwrap_err();
        assert!(e.to_string().contains("NotFound"), "{e}");
    }

    fn network_config() -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![InterfaceConfig {
                mac: "02:11:22:33:44:55".parse().unwrap(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec![
                    "10.77.0.2/24".parse().unwrap(),
                    "fd00:77::2/64".parse().unwrap(),
                ],
                up: true,
            }],
            routes: vec![RouteConfig {
                destination: IpNet::default_route(false),
                gateway: Some("10.77.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                scope: RouteScope::Auto,
            }],
            neighbors: vec![NeighborConfig {
                ip: "10.77.0.1".parse().unwrap(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                device: "eth0".into(),
            }],
            resolv_conf: Some(b"nameserver 10.77.0.1\n".to_vec()),
            hosts: None,
        }
    }

    #[tokio::test]
    async fn setup_network_is_validated_before_sending() {
        let agent = TestAgent::default();
        let sent = Arc::clone(&agent.network_requests);
        let (_dir, proxy) = setup(agent).await;
        let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
            .await
            .unwrap();
        let good = network_config();
        c.setup_network(&good).await.unwrap();
        {
            let sent = sent.lock().unwrap();
            assert_eq!(sent.len(), 1);
            let r = &sent[0];
            assert_eq!(r.interfaces[0].mac, "02:11:22:33:44:55");
            assert_eq!(r.interfaces[0].addresses, ["10.77.0.2/24", "fd00:77::2/64"]);
            assert_eq!(r.routes[0].destination, "0.0.0.0/0");
            assert_eq!(r.routes[0].gateway, "10.77.0.1");
            assert_eq!(r.neighbors[0].mac, "02:00:00:00:00:01");
            assert_eq!(
                r.resolv_conf.as_deref(),
                Some(&b"nameserver 10.77.0.1\n"[..])
            );
            assert_eq!(r.hosts, None, "absent stays absent");
        }
        // Refused locally, never sent; the reason names the exact field.
        let refused = |e: ClientError| match e {
            ClientError::InvalidRequest { field, reason, .. } => (field, reason),
            e => panic!("not an InvalidRequest: {e}"),
        };
        let mut bad = good.clone();
        bad.interfaces[0].mtu = 100;
        let (f, why) = refused(c.setup_network(&bad).await.unwrap_err());
        assert_eq!(f, "interfaces");
        assert!(
            why.starts_with("interfaces[0].mtu: 100 not in 1280"),
            "{why}"
        );
        let mut bad = good.clone();
        bad.routes[0].destination = "10.1.0.1/16".parse().unwrap();
        let (f, why) = refused(c.setup_network(&bad).await.unwrap_err());
        assert_eq!(f, "routes");
        assert!(why.starts_with("routes[0].destination:"), "{why}");
        let mut bad = good.clone();
        bad.routes[0].gateway = Some("fd00::1".parse().unwrap());
        let (f, why) = refused(c.setup_network(&bad).await.unwrap_err());
        assert!(
            f == "routes" && why.starts_with("routes[0].gateway:"),
            "{why}"
        );
        let mut bad = good.clone();
        bad.neighbors[0].device = "bad/name".into();
        let (f, _) = refused(c.setup_network(&bad).await.unwrap_err());
        assert_eq!(f, "neighbors");
        let mut bad = good.clone();
        bad.routes = vec![good.routes[0].clone(); crate::network::MAX_ROUTES + 1];
        let (f, why) = refused(c.setup_network(&bad).await.unwrap_err());
        assert!(f == "routes" && why.contains("257 entries"), "{why}");
        let mut bad = good.clone();
        bad.hosts = Some(vec![b'#'; crate::network::MAX_NETWORK_FILE_SIZE + 1]);
        let (f, _) = refused(c.setup_network(&bad).await.unwrap_err());
        assert_eq!(f, "hosts");
        assert_eq!(sent.lock().unwrap().len(), 1, "nothing more was sent");
        // The agent's NotFound comes back with its code.
        let mut other = good.clone();
        other.interfaces[0].mac = "02:99:99:99:99:99".parse().unwrap();
        let e = c.setup_network(&other).await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Rpc {
                    code: tonic::Code::NotFound,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("02:99:99:99:99:99"), "{e}");
    }

    #[tokio::test]
    async fn stats_network_interfaces_are_validated() {
        let iface = |name: &str| NetworkInterfaceStats {
            name: name.into(),
            rx_bytes: 1000,
            tx_packets: 7,
            ..Default::default()
        };
        async fn stats(
            network: Vec<NetworkInterfaceStats>,
        ) -> Result<StatsContainerResponse, ClientError> {
            let (_dir, proxy) = setup(TestAgent {
                network_stats: Some(network),
                ..TestAgent::default()
            })
            .await;
            let c = AgentClient::connect_hybrid(proxy.path(), 1024, fast_opts())
                .await
                .unwrap();
            c.stats_container("c1").await
        }
        let r = stats(vec![iface("eth0"), iface("eth1")]).await.unwrap();
        assert_eq!(r.network.len(), 2);
        assert_eq!(r.network[0].name, "eth0");
        assert_eq!(r.network[0].rx_bytes, 1000);
        let e = stats(vec![iface("eth0"); MAX_NETWORK_INTERFACES + 1])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("network: 65 interfaces"), "{e}");
        let e = stats(vec![iface("")]).await.unwrap_err();
        assert!(e.to_string().contains("network.name: empty"), "{e}");
        let e = stats(vec![iface("a-very-long-interface-name")])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("network.name: 26 bytes"), "{e}");
        let e = stats(vec![iface("eth\u{1b}[2J")]).await.unwrap_err();
        assert!(e.to_string().contains("control character"), "{e}");
    }

    #[tokio::test]
    async fn wait_process_and_write_stdin_outlive_the_request_timeout() {
        let agent = TestAgent {
            delay: Duration::from_millis(600),
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
        assert_eq!(c.wait_process("c1", "", None).await.unwrap().exit_status, 3);
        // A stdin write waits for the reader as long as it takes: the reply (hostile here: one
        // byte short) arrives after 600 ms and is judged, not cut off by the 200 ms timeout.
        let e = c.write_stdin("c1", "", b"abc".to_vec()).await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidReply {
                    field: "written",
                    ..
                }
            ),
            "{e}"
        );
        let e = c
            .wait_process("c1", "", Some(Duration::from_millis(100)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Timeout {
                    method: "WaitProcess",
                    ..
                }
            ),
            "{e}"
        );
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
