//! Pings a husk-agent and prints its guest info.
//!
//! ```text
//! agent_ping HYBRID_SOCK [PORT]      # through a VMM hybrid vsock socket
//! agent_ping --direct AGENT_SOCK     # an agent run with --listen-unix
//! ```
//!
//! With `AGENT_PING_SHUTDOWN=1` in the environment it then calls `Shutdown`.
//!
//! `--direct` puts an in-process fake VMM socket (`testing::HybridVsockProxy`)
//! in front of the agent's Unix socket, so the real client code path is used.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_proto::client::{AgentClient, ClientOptions};
use husk_proto::testing::{Behavior, HybridVsockProxy};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut _proxy = None;
    let _dir;
    let (sock, port) = match args.as_slice() {
        [flag, agent] if flag == "--direct" => {
            _dir = tempfile::tempdir().expect("tempdir");
            let sock = _dir.path().join("vmm.sock");
            let proxy = HybridVsockProxy::start(&sock, Behavior::Pipe(PathBuf::from(agent)))
                .await
                .expect("proxy");
            _proxy = Some(proxy);
            (sock, husk_proto::AGENT_VSOCK_PORT)
        }
        [sock] => (PathBuf::from(sock), husk_proto::AGENT_VSOCK_PORT),
        [sock, port] => (PathBuf::from(sock), port.parse().expect("port")),
        _ => {
            eprintln!("usage: agent_ping HYBRID_SOCK [PORT] | agent_ping --direct AGENT_SOCK");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now();
    let client = match AgentClient::connect_with_retry(
        &sock,
        port,
        ClientOptions::default(),
        Instant::now() + Duration::from_secs(10),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let ping = client.ping().await;
    println!("connected in {:?}; ping: {ping:?}", t0.elapsed());
    println!("guest_info: {:?}", client.guest_info().await);
    if std::env::var_os("AGENT_PING_SHUTDOWN").is_some() {
        println!("shutdown: {:?}", client.shutdown().await);
    }
}
