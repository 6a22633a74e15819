//! End to end as Kubernetes does it: containerd 1.6's CRI plugin (what the kubelet talks to), with a
//! RuntimeClass handler `husk` → `io.containerd.husk.v2`, a pod sandbox ("pause") image and CNI's
//! bridge plugin from Debian's containernetworking-plugins. The test plays the kubelet over the CRI
//! gRPC API: RunPodSandbox, CreateContainer, StartContainer, ExecSync, ContainerStats, Stop/Remove,
//! and checks what a pod user sees: the guest kernel, the pod's hostname and DNS, the pod IP from CNI on
//! the VM's eth0, traffic both ways, the container log. Runs in the nested test host: `make e2e`.

use std::io::Read;
use std::time::{Duration, Instant};

use husk_tests::containerd::{
    build_busybox_image, busybox_image_tar, husk_shim_config, Containerd, ContainerdOptions,
    LeakSnapshot, BUSYBOX_IMAGE,
};
use husk_tests::cri::CriClient;
use husk_tests::{project_root, vm_test_setup};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatsRequest, CreateContainerRequest, DnsConfig,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};

/// containerd's namespace for CRI objects.
const K8S_NS: &str = "k8s.io";
const RUNTIME_HANDLER: &str = "husk";
const PAUSE_IMAGE: &str = "husk.test/pause:1";
const GUEST_KERNEL_RELEASE: &str = "6.1.192-husk";
const POD_SUBNET_GATEWAY: &str = "10.89.0.1";

/// CNI's bridge plugin with host-local IPAM: a pod gets 10.89.0.x on a veth whose host end is on
/// bridge huskcni0 (10.89.0.1, the pod's default gateway) — what a simple cluster's CNI leaves.
fn cni_conflist() -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "husk-test",
        "plugins": [{
            "type": "bridge",
            "bridge": "huskcni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.89.0.0/24", "gateway": POD_SUBNET_GATEWAY}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    })
    .to_string()
}

fn cri_failed(ctd: &Containerd, what: &str, e: tonic::Status) -> ! {
    panic!("{what}: {e}\ncontainerd log:\n{}", ctd.log_tail(80))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_kubernetes_pod_runs_in_a_husk_vm_through_the_cri() {
    let a = vm_test_setup();
    let root = project_root();
    let dir = tempfile::tempdir().unwrap();
    let config = husk_shim_config(dir.path(), &a).unwrap_or_else(|e| panic!("{e}"));
    let pause_tar = build_busybox_image(
        PAUSE_IMAGE,
        "sleep 2147483647",
        &dir.path().join("pause.tar"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let opts = ContainerdOptions {
        extra_path: vec![root.join("target/release")],
        env: vec![("HUSK_CONFIG".into(), config.display().to_string())],
        enable_cri: true,
        sandbox_image: Some(PAUSE_IMAGE.into()),
        cni_conflist: Some(cni_conflist()),
        extra_config: format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{RUNTIME_HANDLER}]\n  \
             runtime_type = \"io.containerd.husk.v2\"\n"
        ),
        log_level: "debug".into(),
        ..Default::default()
    };
    let ctd = Containerd::start(&opts).unwrap_or_else(|e| panic!("{e}"));
    for tar in [
        busybox_image_tar().unwrap_or_else(|e| panic!("{e}")),
        pause_tar,
    ] {
        ctd.import_image(K8S_NS, &tar)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let cri = CriClient::connect(ctd.address()).unwrap_or_else(|e| panic!("{e}"));
    let before = LeakSnapshot::take();

    // RunPodSandbox: CNI sets up the pod's network namespace, then the sandbox container boots the VM.
    let logs = dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "husk-e2e-uid-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "husk-pod".into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec![POD_SUBNET_GATEWAY.into()],
            searches: vec!["husk.test".into()],
            options: vec!["ndots:2".into()],
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let pod_id = cri
        .block_on(cri.runtime().run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: RUNTIME_HANDLER.into(),
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "RunPodSandbox", e))
        .into_inner()
        .pod_sandbox_id;
    eprintln!("RunPodSandbox took {:?}", started.elapsed());
    let status = cri
        .block_on(cri.runtime().pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "PodSandboxStatus", e))
        .into_inner();
    let pod_ip = status
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        pod_ip.starts_with("10.89.0."),
        "pod IP from CNI: {status:?}"
    );

    // A container of the pod: prints a line (the container log), then serves TCP on 8080.
    let container_id = cri
        .block_on(cri.runtime().create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "server".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: BUSYBOX_IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into()],
                args: vec![
                        "echo container-started; while true; do echo served | nc -l -p 8080; done"
                            .into(),
                    ],
                envs: vec![k8s_cri::v1::KeyValue {
                    key: "GREETING".into(),
                    value: "hello-from-cri".into(),
                }],
                log_path: "server.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "CreateContainer", e))
        .into_inner()
        .container_id;
    cri.block_on(cri.runtime().start_container(StartContainerRequest {
        container_id: container_id.clone(),
    }))
    .unwrap_or_else(|e| cri_failed(&ctd, "StartContainer", e));

    // What the pod sees, through ExecSync (`kubectl exec`).
    let exec = cri
        .block_on(cri.runtime().exec_sync(ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "uname -r; hostname; cat /etc/resolv.conf; ip addr show eth0; ip route; \
                     echo env=$GREETING; ping -c 1 -W 10 {POD_SUBNET_GATEWAY} >/dev/null && echo ping-ok"
                ),
            ],
            timeout: 120,
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "ExecSync", e))
        .into_inner();
    let out = text(&exec.stdout);
    assert_eq!(
        exec.exit_code,
        0,
        "stdout: {out}\nstderr: {}",
        text(&exec.stderr)
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    for want in [
        GUEST_KERNEL_RELEASE,
        "husk-pod",
        "nameserver 10.89.0.1",
        "search husk.test",
        "env=hello-from-cri",
        "ping-ok",
    ] {
        assert!(lines.contains(&want), "{want:?} missing from:\n{out}");
    }
    assert!(
        out.contains(&format!("inet {pod_ip}/24")),
        "the VM's eth0 carries the pod IP {pod_ip}:\n{out}"
    );
    assert!(
        out.contains(&format!("default via {POD_SUBNET_GATEWAY} dev eth0")),
        "{out}"
    );
    let host_release = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    assert_ne!(text(&host_release.stdout).trim(), GUEST_KERNEL_RELEASE);

    // An exec's exit code comes back as the kubelet expects.
    let failing = cri
        .block_on(cri.runtime().exec_sync(ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo oops >&2; exit 4".into()],
            timeout: 60,
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "ExecSync (exit 4)", e))
        .into_inner();
    assert_eq!(failing.exit_code, 4);
    assert_eq!(text(&failing.stderr).trim(), "oops");

    // The node reaches the pod at its IP (a Service's backend, a kubelet probe).
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let addr = format!("{pod_ip}:8080").parse().unwrap();
        if let Ok(mut c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = String::new();
            let _ = c.read_to_string(&mut r);
            if !r.is_empty() {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "no answer from {pod_ip}:8080");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(reply.trim(), "served");

    // Stats, as the kubelet's summary API reads them.
    let stats = cri
        .block_on(cri.runtime().container_stats(ContainerStatsRequest {
            container_id: container_id.clone(),
        }))
        .unwrap_or_else(|e| cri_failed(&ctd, "ContainerStats", e))
        .into_inner()
        .stats
        .unwrap_or_default();
    let working_set = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(working_set > 0, "memory working set: {stats:?}");

    // The container log, written by containerd from the shim's stdout, in the CRI log format.
    let log = std::fs::read_to_string(logs.join("server.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains(" stdout F container-started")),
        "container log: {log:?}"
    );

    // Tear down the way the kubelet does.
    cri.block_on(cri.runtime().stop_container(StopContainerRequest {
        container_id: container_id.clone(),
        timeout: 2,
    }))
    .unwrap_or_else(|e| cri_failed(&ctd, "StopContainer", e));
    cri.block_on(cri.runtime().remove_container(RemoveContainerRequest {
        container_id: container_id.clone(),
    }))
    .unwrap_or_else(|e| cri_failed(&ctd, "RemoveContainer", e));
    cri.block_on(cri.runtime().stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    }))
    .unwrap_or_else(|e| cri_failed(&ctd, "StopPodSandbox", e));
    cri.block_on(cri.runtime().remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    }))
    .unwrap_or_else(|e| cri_failed(&ctd, "RemovePodSandbox", e));

    let leaks = LeakSnapshot::wait_for_no_leaks(&before, Duration::from_secs(30));
    assert!(
        leaks.is_empty(),
        "left behind:\n{}\ncontainerd log:\n{}",
        leaks.join("\n"),
        ctd.log_tail(60)
    );
}
