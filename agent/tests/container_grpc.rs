//! The container API end to end: the real `husk-agent` binary on the host
//! (`--listen-unix`), the real hardened host client, through a fake VMM
//! hybrid vsock socket. Needs root (namespaces, mounts).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::client::{AgentClient, ClientError, ClientOptions, CreateContainer};
use husk_proto::testing::{Behavior, HybridVsockProxy};
use husk_proto::AGENT_VSOCK_PORT;
use serde_json::json;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real agent binary serving on a Unix socket behind a fake VMM's hybrid vsock socket, and a
/// client connected through it; all of it torn down on drop.
struct AgentUnderTest {
    client: AgentClient,
    _agent: KillOnDrop,
    _proxy: HybridVsockProxy,
    _dir: tempfile::TempDir,
}

impl AgentUnderTest {
    async fn start(opts: ClientOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let vmm_sock = dir.path().join("vmm.sock");
        let proxy = HybridVsockProxy::start(&vmm_sock, Behavior::Pipe(agent_sock.clone()))
            .await
            .unwrap();
        let agent = KillOnDrop(
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
            opts,
            Instant::now() + Duration::from_secs(20),
        )
        .await
        .unwrap();
        AgentUnderTest {
            client,
            _agent: agent,
            _proxy: proxy,
            _dir: dir,
        }
    }
}

fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Rpc { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_wait_stdout_over_grpc() {
    let root = common::busybox_rootfs();
    let agent = AgentUnderTest::start(ClientOptions::default()).await;
    let c = &agent.client;
    let rootfs = root.path().to_str().unwrap().to_string();

    // create -> read stdout/stderr -> start -> wait
    let spec = common::spec("echo hello from $(hostname); echo oops >&2; exit 3");
    let pid = c
        .create_container(CreateContainer {
            container_id: "web".into(),
            oci_spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs_path: rootfs.clone(),
            ..CreateContainer::default()
        })
        .await
        .unwrap();
    assert!(pid > 1);
    let mut out = c.read_stdout("web", "").await.unwrap();
    let mut err = c.read_stderr("web", "").await.unwrap();
    let out = tokio::spawn(async move { out.read_to_end(1 << 20).await });
    let err = tokio::spawn(async move { err.read_to_end(1 << 20).await });
    c.start_container("web").await.unwrap();
    let exit = c
        .wait_process("web", "", Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(exit.exit_status, 3);
    assert!(!exit.oom_killed);
    assert_eq!(out.await.unwrap().unwrap(), b"hello from husk-test\n");
    assert_eq!(err.await.unwrap().unwrap(), b"oops\n");
    let e = c.start_container("web").await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    c.remove_container("web", false).await.unwrap();
    let e = c.wait_process("web", "", None).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::NotFound), "{e}");

    // A long-running container with an exec'd process fed through stdin.
    let spec = common::spec("sleep 1000");
    c.create_container(CreateContainer {
        container_id: "db".into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs_path: rootfs.clone(),
        ..CreateContainer::default()
    })
    .await
    .unwrap();
    c.start_container("db").await.unwrap();
    let proc_json = serde_json::to_vec(&json!({
        "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "no-such-command"], "cwd": "/", "env": ["PATH=/bin"]
    }))
    .unwrap();
    // sh starts; the command does not exist, so sh exits 127.
    c.exec_process("db", "tr", proc_json, false, false)
        .await
        .unwrap();
    let exit = c
        .wait_process("db", "tr", Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(exit.exit_status, 127);
    let proc_json = serde_json::to_vec(&json!({
        "user": {"uid": 0, "gid": 0}, "args": ["cat"], "cwd": "/", "env": ["PATH=/bin"]
    }))
    .unwrap();
    let pid = c
        .exec_process("db", "cat", proc_json, true, false)
        .await
        .unwrap();
    let mut out = c.read_stdout("db", "cat").await.unwrap();
    c.write_stdin("db", "cat", b"ping\n".to_vec())
        .await
        .unwrap();
    assert_eq!(out.next().await.unwrap().unwrap(), b"ping\n");
    c.close_stdin("db", "cat").await.unwrap();
    assert!(out.next().await.is_none());
    assert_eq!(
        c.wait_process("db", "cat", None).await.unwrap().exit_status,
        0
    );
    let list = c.list_processes("db").await.unwrap();
    assert_eq!(list.processes.len(), 3);
    assert_eq!(list.processes[0].exec_id, "");
    assert_eq!(list.processes[0].exit_status, None);
    let cat = list.processes.iter().find(|p| p.exec_id == "cat").unwrap();
    assert_eq!((cat.pid, cat.exit_status), (pid, Some(0)));
    // No cgroup v2 on this host: stats and pause say so.
    let e = c.stats_container("db").await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    let e = c.pause_container("db").await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    let e = c.remove_container("db", false).await.unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    c.signal_process("db", "", 9, false).await.unwrap();
    assert_eq!(
        c.wait_process("db", "", None).await.unwrap().exit_status,
        137
    );
    c.remove_container("db", true).await.unwrap();

    // Bad specs: INVALID_ARGUMENT naming the field; bad ids refused locally.
    let mut spec = common::spec("true");
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}]);
    let e = c
        .create_container(CreateContainer {
            container_id: "bad".into(),
            oci_spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs_path: rootfs.clone(),
            ..CreateContainer::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("process.rlimits[0].soft"), "{e}");
    let e = c.start_container("../etc").await.unwrap_err();
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
    c.ping().await.unwrap();
}

/// 20 WriteStdin calls to processes that never read (more than the agent's
/// 16 blocking threads) stay pending without stalling the agent: another
/// container's create, exec and stdin still work; CloseStdin ends each
/// pending call with ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_stdin_writes_do_not_stall_the_agent() {
    const STALLED: usize = 20;
    let root = common::busybox_rootfs();
    // Long enough for the pending writes to outlive the rest of the test.
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let agent = AgentUnderTest::start(opts).await;
    let c = &agent.client;
    let rootfs = root.path().to_str().unwrap().to_string();
    let create = |id: &str, script: &str, stdin: bool| CreateContainer {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(&common::spec(script)).unwrap(),
        rootfs_path: rootfs.clone(),
        stdin,
        ..CreateContainer::default()
    };
    let sleeper = serde_json::to_vec(&json!({
        "user": {"uid": 0, "gid": 0}, "args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"]
    }))
    .unwrap();
    c.create_container(create("stall", "sleep 1000", false))
        .await
        .unwrap();
    c.start_container("stall").await.unwrap();
    for i in 0..STALLED {
        c.exec_process("stall", &format!("w{i}"), sleeper.clone(), true, false)
            .await
            .unwrap();
    }
    let mut writes = Vec::new();
    for i in 0..STALLED {
        let exec_id = format!("w{i}");
        let c2 = c.clone();
        writes.push(tokio::spawn(async move {
            c2.write_stdin("stall", &exec_id, vec![b'x'; husk_proto::MAX_STDIN_CHUNK])
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writes.iter().all(|w| !w.is_finished()),
        "writes wait for room"
    );

    // Another container, with stdin, while those are pending.
    let quick = async {
        c.create_container(create("other", "read l; echo got:$l", true))
            .await
            .unwrap();
        let mut out = c.read_stdout("other", "").await.unwrap();
        c.start_container("other").await.unwrap();
        c.write_stdin("other", "", b"hi\n".to_vec()).await.unwrap();
        assert_eq!(out.read_to_end(1024).await.unwrap(), b"got:hi\n");
        let exit = c.wait_process("other", "", None).await.unwrap();
        assert_eq!(exit.exit_status, 0);
        c.exec_process("stall", "late", sleeper.clone(), false, false)
            .await
            .unwrap();
    };
    tokio::time::timeout(Duration::from_secs(20), quick)
        .await
        .expect("the agent stalled behind the pending stdin writes");

    for (i, w) in writes.into_iter().enumerate() {
        c.close_stdin("stall", &format!("w{i}")).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("CloseStdin ends the pending write")
            .unwrap()
            .unwrap_err();
        assert_eq!(code(&e), Some(tonic::Code::Aborted), "{e}");
        assert!(e.to_string().contains(&format!("w{i}")), "{e}");
    }
    let e = c
        .write_stdin("stall", "w0", b"late".to_vec())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    c.remove_container("other", false).await.unwrap();
    c.signal_process("stall", "", 9, false).await.unwrap();
    c.wait_process("stall", "", None).await.unwrap();
    c.remove_container("stall", true).await.unwrap();
    c.ping().await.unwrap();
}
