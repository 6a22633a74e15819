//! End-to-end tests of strict decoding, both directions, through real tonic
//! servers and clients on Unix sockets (through the fake VMM proxy):
//! * the agent's generated server refuses requests carrying unknown fields
//!   (raw bytes sent by a raw gRPC client);
//! * [`AgentClient`] refuses replies carrying unknown fields (raw bytes sent
//!   by a raw gRPC server standing in for a hostile agent).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prost::bytes::{Buf, BufMut};
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::e2e_tests::{fast_opts, setup, TestAgent};
use super::{AgentClient, ClientError, HybridConnector};
use crate::strict_codec::test_wire::{interface, len_field, varint_field as unknown_varint};
use crate::strict_codec::StrictDecodeError;
use crate::testing::{Behavior, HybridVsockProxy};
use crate::v1::*;
use crate::{AGENT_VSOCK_PORT, API_VERSION, SERVICE_NAME};

// ---- wire helpers -------------------------------------------------------------

fn with_unknown<M: Message>(m: &M, number: u32) -> Vec<u8> {
    let mut out = m.encode_to_vec();
    out.extend(unknown_varint(number));
    out
}

/// Sends and receives message bodies as they are, so tests can put any bytes
/// on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

// ---- the agent refuses requests -------------------------------------------------

/// A raw gRPC channel to the agent behind `proxy`.
async fn raw_channel(proxy: &HybridVsockProxy) -> Channel {
    let connector = HybridConnector {
        path: Arc::new(proxy.path().to_path_buf()),
        port: AGENT_VSOCK_PORT,
        handshake_timeout: fast_opts().handshake_timeout,
        first: Arc::new(Mutex::new(None)),
    };
    Endpoint::from_static("http://husk-agent.vsock")
        .connect_with_connector(connector)
        .await
        .unwrap()
}

async fn raw_call(channel: &Channel, method: &str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::try_from(format!("/{SERVICE_NAME}/{method}")).unwrap();
    grpc.unary(Request::new(body), path, RawCodec)
        .await
        .map(Response::into_inner)
}

fn assert_invalid_argument(r: Result<Vec<u8>, Status>, want: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert_eq!(s.message(), want);
        }
        Ok(b) => panic!("accepted ({} reply bytes); wanted {want:?}", b.len()),
    }
}

fn create_request() -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec_json: b"{}".to_vec(),
        rootfs_path: "/run/husk/c1/rootfs".into(),
        stdin: false,
        terminal: false,
    }
}

#[tokio::test]
async fn agent_rejects_unknown_top_level_field() {
    let (_dir, proxy) = setup(TestAgent::default()).await;
    let ch = raw_channel(&proxy).await;

    let r = raw_call(&ch, "CreateContainer", with_unknown(&create_request(), 17)).await;
    assert_invalid_argument(r, "husk.agent.v1.CreateContainerRequest: unknown field 17");

    // The same request without the extra field still works.
    let reply = raw_call(&ch, "CreateContainer", create_request().encode_to_vec())
        .await
        .unwrap();
    let reply = CreateContainerResponse::decode(reply.as_slice()).unwrap();
    assert_eq!(reply.container_id, "c1");
}

#[tokio::test]
async fn agent_rejects_unknown_field_in_repeated_nested_message() {
    let agent = TestAgent::default();
    let received = Arc::clone(&agent.network_requests);
    let (_dir, proxy) = setup(agent).await;
    let ch = raw_channel(&proxy).await;

    let route = NetworkRoute {
        destination: "default".into(),
        gateway: "10.0.0.1".into(),
        ..Default::default()
    };
    let mut body = len_field(1, &interface("02:00:00:00:00:01").encode_to_vec());
    body.extend(len_field(2, &route.encode_to_vec()));
    body.extend(len_field(
        1,
        &with_unknown(&interface("02:00:00:00:00:02"), 99),
    ));
    let r = raw_call(&ch, "SetupNetwork", body).await;
    assert_invalid_argument(
        r,
        "husk.agent.v1.NetworkInterface: unknown field 99 \
         (in husk.agent.v1.SetupNetworkRequest.interfaces[1])",
    );

    // Second route, a nested message of another type.
    let mut body = len_field(2, &route.encode_to_vec());
    body.extend(len_field(2, &with_unknown(&route, 6)));
    let r = raw_call(&ch, "SetupNetwork", body).await;
    assert_invalid_argument(
        r,
        "husk.agent.v1.NetworkRoute: unknown field 6 \
         (in husk.agent.v1.SetupNetworkRequest.routes[1])",
    );
    // The handler never saw either request.
    assert!(received.lock().unwrap().is_empty());

    // (TestAgent knows only this MAC.)
    let valid = SetupNetworkRequest {
        interfaces: vec![interface("02:11:22:33:44:55")],
        routes: vec![route],
        ..Default::default()
    };
    raw_call(&ch, "SetupNetwork", valid.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(*received.lock().unwrap(), vec![valid]);
}

#[tokio::test]
async fn agent_rejects_garbage_and_truncated_requests() {
    let (_dir, proxy) = setup(TestAgent::default()).await;
    let ch = raw_channel(&proxy).await;

    let r = raw_call(&ch, "CreateContainer", vec![0xff; 16]).await;
    assert_invalid_argument(
        r,
        "husk.agent.v1.CreateContainerRequest: malformed protobuf at byte 0: bad field key",
    );

    let mut truncated = create_request().encode_to_vec();
    truncated.truncate(truncated.len() - 3);
    let r = raw_call(&ch, "CreateContainer", truncated).await;
    assert_invalid_argument(
        r,
        "husk.agent.v1.CreateContainerRequest: malformed protobuf at byte 8: length past the end",
    );

    // Known fields only, but not what prost accepts (container_id as a
    // varint): prost's error, still INVALID_ARGUMENT.
    let r = raw_call(&ch, "CreateContainer", unknown_varint(1)).await;
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(
                s.message()
                    .starts_with("husk.agent.v1.CreateContainerRequest: failed to decode"),
                "{}",
                s.message()
            );
        }
        Ok(_) => panic!("accepted"),
    }

    // The connection and the server survive all of it.
    let reply = raw_call(&ch, "Ping", PingRequest {}.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(
        PingResponse::decode(reply.as_slice()).unwrap().api_version,
        API_VERSION
    );
}

#[tokio::test]
async fn agent_answers_ping_with_unknown_fields() {
    // Ping is the version handshake: a host on a newer revision must still
    // learn this agent's revision.
    let (_dir, proxy) = setup(TestAgent::default()).await;
    let ch = raw_channel(&proxy).await;
    let reply = raw_call(&ch, "Ping", unknown_varint(3)).await.unwrap();
    assert_eq!(
        PingResponse::decode(reply.as_slice()).unwrap().api_version,
        API_VERSION
    );
}

// ---- the client refuses replies --------------------------------------------------

/// A hostile agent: answers each method with fixed raw messages (a stream
/// of them for the streaming methods), or UNIMPLEMENTED.
#[derive(Clone, Default)]
struct RawAgent {
    replies: Arc<HashMap<&'static str, Vec<Vec<u8>>>>,
}

impl NamedService for RawAgent {
    const NAME: &'static str = SERVICE_NAME;
}

struct Unary(Option<Vec<u8>>);

impl UnaryService<Vec<u8>> for Unary {
    type Response = Vec<u8>;
    type Future = std::future::Ready<Result<Response<Vec<u8>>, Status>>;
    fn call(&mut self, _: Request<Vec<u8>>) -> Self::Future {
        std::future::ready(match self.0.take() {
            Some(body) => Ok(Response::new(body)),
            None => Err(Status::unimplemented("no reply configured")),
        })
    }
}

struct Streaming(Vec<Vec<u8>>);

type RawStream = tokio_stream::Iter<std::vec::IntoIter<Result<Vec<u8>, Status>>>;

impl ServerStreamingService<Vec<u8>> for Streaming {
    type Response = Vec<u8>;
    type ResponseStream = RawStream;
    type Future = std::future::Ready<Result<Response<RawStream>, Status>>;
    fn call(&mut self, _: Request<Vec<u8>>) -> Self::Future {
        let items: Vec<_> = std::mem::take(&mut self.0).into_iter().map(Ok).collect();
        std::future::ready(Ok(Response::new(tokio_stream::iter(items))))
    }
}

impl tower::Service<http::Request<Body>> for RawAgent {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let replies = self
            .replies
            .get(method.as_str())
            .cloned()
            .unwrap_or_default();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(match method.as_str() {
                "ReadStdout" | "ReadStderr" | "OomEvents" => {
                    grpc.server_streaming(Streaming(replies), req).await
                }
                _ => grpc.unary(Unary(replies.into_iter().next()), req).await,
            })
        })
    }
}

/// Serves `agent` behind a fake VMM proxy and connects an [`AgentClient`].
async fn hostile(agent: RawAgent) -> (tempfile::TempDir, HybridVsockProxy, AgentClient) {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest.sock");
    let listener = tokio::net::UnixListener::bind(&guest).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(
                agent,
                tokio_stream::wrappers::UnixListenerStream::new(listener),
            )
            .await
            .unwrap();
    });
    let proxy = HybridVsockProxy::start(&dir.path().join("vmm.sock"), Behavior::Pipe(guest))
        .await
        .unwrap();
    let client = AgentClient::connect_hybrid(proxy.path(), AGENT_VSOCK_PORT, fast_opts())
        .await
        .unwrap();
    (dir, proxy, client)
}

#[track_caller]
fn assert_rejected(
    r: Result<impl std::fmt::Debug, ClientError>,
    method: &str,
    want: StrictDecodeError,
) {
    match r {
        Err(e @ ClientError::ReplyRejected { .. }) => {
            assert!(!e.is_retryable());
            let ClientError::ReplyRejected {
                method: m, source, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(*m, method);
            assert_eq!(*source, want, "{e}");
        }
        other => panic!("{method}: wanted ReplyRejected, got {other:?}"),
    }
}

fn unknown(message: &str, number: u32, at: &str) -> StrictDecodeError {
    StrictDecodeError::UnknownField {
        message: message.into(),
        number,
        at: at.into(),
    }
}

#[tokio::test]
async fn client_rejects_unknown_fields_in_replies() {
    let ping = PingResponse {
        agent_version: "9.9.9".into(),
        api_version: API_VERSION,
    };
    let info = GuestInfoResponse {
        kernel_release: "6.1.0".into(),
        kernel_version: "#1".into(),
        uptime_ms: 1,
        mem_total_bytes: 1 << 30,
        mem_available_bytes: 1 << 29,
        online_cpus: 1,
    };
    let mut memory = with_unknown(&ContainerMemoryStats::default(), 42);
    memory.extend(len_field(5, &[0x0a, 0x01, b'k', 0x10, 0x01])); // stat {"k": 1}
    let mut stats = len_field(1, b"c1");
    stats.extend(len_field(3, &memory));
    let listed = ListedProcess {
        exec_id: String::new(),
        pid: 10,
        exited: false,
        exit_status: 0,
    };
    let mut list = len_field(2, &listed.encode_to_vec());
    list.extend(len_field(2, &with_unknown(&listed, 8)));
    let chunk = ReadStdoutResponse {
        data: b"hello".to_vec(),
    };
    let replies: HashMap<&'static str, Vec<Vec<u8>>> = [
        // A newer agent's Ping reply: accepted (the version handshake).
        ("Ping", vec![with_unknown(&ping, 3)]),
        ("GuestInfo", vec![with_unknown(&info, 7)]),
        ("StatsContainer", vec![stats]),
        ("ListProcesses", vec![list]),
        (
            "ReadStdout",
            vec![chunk.encode_to_vec(), with_unknown(&chunk, 2)],
        ),
        ("StartContainer", vec![vec![0x0a, 0x09, b'c']]),
    ]
    .into();
    let (_dir, _proxy, client) = hostile(RawAgent {
        replies: Arc::new(replies),
    })
    .await;

    let p = client.ping().await.unwrap();
    assert_eq!(p.agent_version, "9.9.9");

    assert_rejected(
        client.guest_info().await,
        "GuestInfo",
        unknown("husk.agent.v1.GuestInfoResponse", 7, ""),
    );
    assert_rejected(
        client.stats_container("c1").await,
        "StatsContainer",
        unknown(
            "husk.agent.v1.ContainerMemoryStats",
            42,
            "husk.agent.v1.StatsContainerResponse.memory",
        ),
    );
    assert_rejected(
        client.list_processes("c1").await,
        "ListProcesses",
        unknown(
            "husk.agent.v1.ListedProcess",
            8,
            "husk.agent.v1.ListProcessesResponse.processes[1]",
        ),
    );

    // A stream: the valid chunk arrives, the next one is refused.
    let mut out = client.read_stdout("c1", "").await.unwrap();
    assert_eq!(out.next().await.unwrap().unwrap(), b"hello");
    match out.next().await {
        Some(Err(ClientError::ReplyRejected { method, source, .. })) => {
            assert_eq!(method, "ReadStdout");
            assert_eq!(source, unknown("husk.agent.v1.ReadStdoutResponse", 2, ""));
        }
        other => panic!("{other:?}"),
    }

    // Truncated garbage: a clean error naming the reply type.
    let e = client.start_container("c1").await.unwrap_err();
    assert!(matches!(
        &e,
        ClientError::ReplyRejected {
            source: StrictDecodeError::Malformed {
                reason: "length past the end",
                ..
            },
            ..
        }
    ));
    assert!(
        e.to_string().ends_with(
            "StartContainer: reply rejected: husk.agent.v1.StartContainerResponse: \
             malformed protobuf at byte 0: length past the end"
        ),
        "{e}"
    );

    // A status the agent sends is still an Rpc error, not a rejection.
    let e = client.shutdown().await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Rpc {
                code: Code::Unimplemented,
                ..
            }
        ),
        "{e:?}"
    );
}
