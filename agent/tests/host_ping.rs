//! Runs the real `husk-agent` binary on the host with `--listen-unix` and
//! talks to it with the real host client, through a fake VMM hybrid vsock
//! socket (`husk_proto::testing::HybridVsockProxy`) that pipes to the
//! agent's Unix socket.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::client::{AgentClient, ClientOptions};
use husk_proto::testing::{Behavior, HybridVsockProxy};
use husk_proto::{AGENT_VSOCK_PORT, API_VERSION};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_guest_info_shutdown_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let vmm_sock = dir.path().join("vmm.sock");

    // The "VMM" is up before the "guest" listens, as after a real boot.
    let proxy = HybridVsockProxy::start(&vmm_sock, Behavior::Pipe(agent_sock.clone()))
        .await
        .unwrap();
    let mut agent = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .arg("--listen-unix")
            .arg(&agent_sock)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let client = AgentClient::connect_with_retry(
        &vmm_sock,
        AGENT_VSOCK_PORT,
        ClientOptions::default(),
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();

    let ping = client.ping().await.unwrap();
    assert_eq!(ping.api_version, API_VERSION);
    assert_eq!(ping.agent_version, env!("CARGO_PKG_VERSION"));

    let info = client.guest_info().await.unwrap();
    assert!(!info.kernel_release.is_empty());
    assert!(info.online_cpus >= 1);
    assert!(info.mem_available_bytes <= info.mem_total_bytes);
    assert!(info.uptime > Duration::ZERO);
    assert_eq!(proxy.ports().first(), Some(&AGENT_VSOCK_PORT));

    // Not PID 1: Shutdown makes the agent exit 0 (and signals nobody).
    client.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after Shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("husk-agent "));
}
