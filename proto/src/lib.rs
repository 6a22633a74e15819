//! Husk's agent API: the gRPC protocol spoken between the host and
//! `husk-agent` (PID 1 inside each microVM) over virtio-vsock.
//!
//! * [`v1`] holds the generated protobuf messages for package `husk.agent.v1`
//!   (always), the tonic server (`v1::agent_service_server`, feature `server`)
//!   and the raw tonic client (`v1::agent_service_client`, feature `client`).
//! * [`client`] (feature `client`) is the hardened host-side client: it speaks
//!   the Firecracker-style hybrid vsock handshake (`CONNECT <port>\n` /
//!   `OK <hostport>\n`) on the VMM's Unix socket, bounds every read and every
//!   call in time and size, and validates every reply, since the guest is
//!   untrusted.
//!
//! * [`strict_codec`] is the codec of every generated method: it refuses
//!   messages with fields unknown to this API revision (prost would drop them
//!   silently), in the agent's requests and in the client's replies alike.
//!
//! Versioning: see the comments at the top of `agent.proto`. [`API_VERSION`]
//! is the API revision this crate implements; the agent reports its own in
//! `PingResponse.api_version` and the client refuses a mismatch.

#![forbid(unsafe_code)]

/// Generated code for protobuf package `husk.agent.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("husk.agent.v1");
}

#[cfg(feature = "client")]
pub mod client;

pub mod network;
pub mod storage;
pub mod strict_codec;

#[cfg(feature = "test-util")]
pub mod testing;

/// Revision of the agent API implemented by this crate. Reported by the agent
/// in `PingResponse.api_version`; the host client requires an exact match.
pub const API_VERSION: u32 = 2;

/// vsock port on which the agent serves [`v1`]'s `AgentService`.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Upper bound for any single gRPC message, in either direction (4 MiB).
/// Both the agent's server and the host client enforce it.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Largest chunk of process output in one `ReadStdout`/`ReadStderr` message.
pub const MAX_STDIO_CHUNK: usize = 32 * 1024;

/// Largest `WriteStdin` payload.
pub const MAX_STDIN_CHUNK: usize = 1024 * 1024;

/// Largest OCI spec / process JSON accepted by the agent.
pub const MAX_SPEC_SIZE: usize = 1024 * 1024;

/// Longest container / exec id.
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` is a valid container or (non-empty) exec id:
/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Fully qualified gRPC service name, e.g. for logs.
pub const SERVICE_NAME: &str = "husk.agent.v1.AgentService";

#[cfg(test)]
mod tests {
    #[test]
    fn ids() {
        for ok in ["a", "A1", "0", "abc_def.ghi-jkl", &"x".repeat(64)] {
            assert!(super::is_valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "_a",
            ".",
            "-x",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(!super::is_valid_id(bad), "{bad}");
        }
    }
}
