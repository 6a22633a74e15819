//! End to end: the pod VM's network set up through the agent API (`SetupNetwork`), as the shim
//! will do it from the pod's CNI interface. The host side is a tap (the pod's network namespace
//! would hold it), given to husk-vmm with `--net tap=...,mac=...`; the guest's interface is found
//! by that MAC, renamed, given an MTU, IPv4 and IPv6 addresses, a default route through the tap's
//! address, a permanent neighbour, and resolv.conf / hosts files. A container (its spec binds the
//! resolv.conf the way the shim's spec rewrite will) then proves it from inside: pings through the
//! connected route, through the default route, over IPv6, reads the resolv.conf and the neighbour
//! table; the host pings the guest; StatsContainer's interface counters grow. Unknown MACs and bad
//! requests give their codes. Needs KVM, root, /dev/net/tun and build/testhost/virtiofsd: run
//! through tests/testhost/run (make e2e).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_proto::client::{
    AgentClient, ClientError, ClientOptions, CreateContainer, InterfaceConfig, IpNet, MountStorage,
    NeighborConfig, NetworkConfig, RouteConfig, RouteScope,
};
use husk_proto::network::RESOLV_CONF_PATH;
use husk_proto::v1::NetworkInterfaceStats;
use husk_tests::virtiofsd::Virtiofsd;
use husk_tests::{vm_test_setup, VmFailure, VmOptions, VmProcess};
use serde_json::{json, Value};

const TAP: &str = "hkt-net0";
const GUEST_MAC: &str = "02:11:22:33:44:66";
/// The host's address on the tap, the guest's, and a host address outside the guest's subnet
/// (reachable only through the default route).
const HOST_IP: &str = "10.79.0.1";
const GUEST_IP: &str = "10.79.0.2";
const FAR_IP: &str = "10.80.0.1";
const HOST_IP6: &str = "fd00:79::1";
const GUEST_IP6: &str = "fd00:79::2";
/// A neighbour nobody answers for: only the permanent entry makes it appear in the guest's table.
const FAKE_NEIGHBOR: &str = "10.79.0.99";
const FAKE_NEIGHBOR_MAC: &str = "02:aa:bb:cc:dd:ee";
const RESOLV_CONF: &str = "nameserver 10.79.0.53\nsearch pod.husk.test\noptions ndots:5\n";

const TAG: &str = "husk-pod";
const SHARED: &str = "/run/husk/shared";
const APPLETS: &[&str] = &["sh", "cat", "ping", "ping6", "sleep", "grep", "ip"];

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "`{cmd}` failed");
}

/// Removes the tap even when the test fails.
struct TapCleanup;
impl Drop for TapCleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
    }
}

fn build_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // The bind mount target of the pod's resolv.conf.
    std::fs::write(dir.join("etc/resolv.conf"), "").unwrap();
    let bb = dir.join("bin/busybox");
    std::fs::copy("/bin/busybox", &bb).unwrap();
    for a in APPLETS {
        std::fs::hard_link(&bb, dir.join("bin").join(a)).unwrap();
    }
}

/// A container in the pod's (the guest's) network namespace, with the pod's resolv.conf bound
/// over /etc/resolv.conf, as the shim's spec rewrite does.
fn spec(id: &str, script: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_NET_RAW"], "effective": ["CAP_NET_RAW"], "permitted": ["CAP_NET_RAW"]
            }
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid","noexec","nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","mode=755"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": RESOLV_CONF_PATH,
             "options": ["rbind", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/default/{id}"),
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    })
}

fn config(host_mac: &str) -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: GUEST_MAC.parse().unwrap(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![
                format!("{GUEST_IP}/24").parse().unwrap(),
                format!("{GUEST_IP6}/64").parse().unwrap(),
            ],
            up: true,
        }],
        routes: vec![RouteConfig {
            destination: IpNet::default_route(false),
            gateway: Some(HOST_IP.parse().unwrap()),
            device: "eth0".into(),
            source: None,
            scope: RouteScope::Auto,
        }],
        neighbors: vec![
            NeighborConfig {
                ip: HOST_IP.parse().unwrap(),
                mac: host_mac.parse().unwrap(),
                device: "eth0".into(),
            },
            NeighborConfig {
                ip: FAKE_NEIGHBOR.parse().unwrap(),
                mac: FAKE_NEIGHBOR_MAC.parse().unwrap(),
                device: "eth0".into(),
            },
        ],
        resolv_conf: Some(RESOLV_CONF.as_bytes().to_vec()),
        hosts: Some(b"127.0.0.1 localhost\n10.79.0.2 pod\n".to_vec()),
    }
}

fn eth0(stats: &[NetworkInterfaceStats]) -> NetworkInterfaceStats {
    assert!(
        stats.iter().all(|s| s.name != "lo"),
        "lo is not reported: {stats:?}"
    );
    stats
        .iter()
        .find(|s| s.name == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in {stats:?}"))
        .clone()
}

/// The gRPC code of an agent refusal, as its name.
fn rpc_code(e: &ClientError) -> String {
    match e {
        ClientError::Rpc { code, .. } => format!("{code:?}"),
        e => format!("not an RPC error: {e}"),
    }
}

async fn scenario(c: AgentClient, host_mac: String) {
    // Unknown MAC: NOT_FOUND naming it, before anything else was set up.
    let mut wrong = config(&host_mac);
    wrong.interfaces[0].mac = "02:de:ad:be:ef:01".parse().unwrap();
    let e = c.setup_network(&wrong).await.unwrap_err();
    assert_eq!(rpc_code(&e), "NotFound", "{e}");
    assert!(
        e.to_string()
            .contains("interfaces[0].mac: no interface with MAC 02:de:ad:be:ef:01"),
        "{e}"
    );
    // A bad CIDR is refused by the client before it is sent (the agent runs the same check and
    // answers INVALID_ARGUMENT: agent/src/service.rs tests).
    let mut bad = config(&host_mac);
    bad.interfaces[0].addresses[0] = IpNet {
        addr: GUEST_IP.parse().unwrap(),
        prefix_len: 40,
    };
    match c.setup_network(&bad).await.unwrap_err() {
        ClientError::InvalidRequest { field, reason, .. } => {
            assert_eq!(field, "interfaces");
            assert!(
                reason.starts_with("interfaces[0].addresses[0]:"),
                "{reason}"
            );
        }
        e => panic!("not refused locally: {e}"),
    }
    // A route through a device the guest does not have: NOT_FOUND naming the route.
    let mut nodev = config(&host_mac);
    nodev.routes[0].device = "eth9".into();
    let e = c.setup_network(&nodev).await.unwrap_err();
    assert_eq!(rpc_code(&e), "NotFound", "{e}");
    assert!(e.to_string().contains("routes[0].device"), "{e}");

    // The real thing, twice (idempotent: the shim may retry after a lost reply).
    let good = config(&host_mac);
    c.setup_network(&good).await.unwrap();
    c.setup_network(&good).await.unwrap();

    let share = MountStorage {
        fstype: "virtiofs".into(),
        source: TAG.into(),
        target: SHARED.into(),
        options: vec!["nodev".into()],
        readonly: false,
    };
    c.mount_storage(share).await.unwrap();

    // A long-lived container to read the pod's counters through.
    let create = |id: &str, script: &str| CreateContainer {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(&spec(id, script)).unwrap(),
        rootfs_path: format!("{SHARED}/{id}/rootfs"),
        ..CreateContainer::default()
    };
    c.create_container(create("idle", "sleep 1000"))
        .await
        .unwrap();
    c.start_container("idle").await.unwrap();
    let before = eth0(&c.stats_container("idle").await.unwrap().network);

    // The host reaches the guest.
    let out = Command::new("busybox")
        .args(["ping", "-c", "2", "-W", "10", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host -> guest ping: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The guest reaches the host: the connected route, the default route, IPv6; then its view.
    let script = format!(
        "ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-v4-ok; \
         ping -c 2 -W 10 {FAR_IP} >/dev/null && echo ping-default-route-ok; \
         ping6 -c 2 -W 10 {HOST_IP6} >/dev/null && echo ping-v6-ok; \
         echo ---resolv; cat /etc/resolv.conf; echo ---arp; cat /proc/net/arp; \
         echo ---link; ip link show eth0; echo ---route; ip route"
    );
    c.create_container(create("net", &script)).await.unwrap();
    c.start_container("net").await.unwrap();
    let exit = c
        .wait_process("net", "", Some(Duration::from_secs(120)))
        .await
        .unwrap();
    let mut out = c.read_stdout("net", "").await.unwrap();
    let out = String::from_utf8(out.read_to_end(1 << 20).await.unwrap()).unwrap();
    let mut err = c.read_stderr("net", "").await.unwrap();
    let err = String::from_utf8(err.read_to_end(1 << 20).await.unwrap()).unwrap();
    eprintln!("container output:\n{out}\nstderr:\n{err}");
    assert_eq!(exit.exit_status, 0, "{out}{err}");
    for want in ["ping-v4-ok", "ping-default-route-ok", "ping-v6-ok"] {
        assert!(out.lines().any(|l| l == want), "missing {want}: {out}{err}");
    }
    let resolv = out
        .split("---resolv\n")
        .nth(1)
        .and_then(|s| s.split("---arp\n").next())
        .unwrap();
    assert_eq!(resolv, RESOLV_CONF);
    let arp = out.split("---arp\n").nth(1).unwrap();
    let fake = arp
        .lines()
        .find(|l| l.starts_with(&format!("{FAKE_NEIGHBOR} ")))
        .unwrap_or_else(|| panic!("no permanent neighbour {FAKE_NEIGHBOR}: {arp}"));
    // Flags 0x6: ATF_COM | ATF_PERM.
    assert!(
        fake.contains("0x6") && fake.contains(FAKE_NEIGHBOR_MAC) && fake.ends_with("eth0"),
        "{fake}"
    );
    let link = out.split("---link\n").nth(1).unwrap();
    assert!(
        link.contains("mtu 1400") && link.contains(GUEST_MAC),
        "{link}"
    );
    let routes = out.split("---route\n").nth(1).unwrap();
    assert!(
        routes.contains(&format!("default via {HOST_IP} dev eth0")),
        "{routes}"
    );

    // The counters grew by at least the pings (2 + 2 + 2 from the guest, 2 from the host).
    let after = eth0(&c.stats_container("idle").await.unwrap().network);
    eprintln!("eth0 before: {before:?}\neth0 after: {after:?}");
    assert!(
        after.tx_packets >= before.tx_packets + 8,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.rx_packets >= before.rx_packets + 8,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.rx_bytes > before.rx_bytes + 8 * 84,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.tx_bytes > before.tx_bytes + 8 * 84,
        "{before:?} -> {after:?}"
    );

    c.remove_container("net", true).await.unwrap();
    c.remove_container("idle", true).await.unwrap();
}

#[test]
fn setup_network_configures_the_guest_from_the_host() {
    let a = vm_test_setup();
    let _tap = TapCleanup;
    sh(&format!(
        "ip tuntap add dev {TAP} mode tap && ip link set {TAP} up && \
         ip addr add {HOST_IP}/24 dev {TAP} && ip addr add {FAR_IP}/32 dev {TAP} && \
         ip -6 addr add {HOST_IP6}/64 dev {TAP} nodad"
    ));
    let host_mac = std::fs::read_to_string(format!("/sys/class/net/{TAP}/address"))
        .unwrap()
        .trim()
        .to_string();
    husk_tests::once_more_on_nested_cpu_fault(|| run_network_vm(&a, &host_mac));
}

/// One VM (tap, share with the containers' roots) through every network scenario.
fn run_network_vm(a: &husk_tests::Artifacts, host_mac: &str) -> Result<(), VmFailure> {
    let tmp = tempfile::Builder::new()
        .prefix("husk-net-")
        .tempdir_in("/tmp")
        .unwrap();
    let share = tmp.path().join("share");
    for id in ["idle", "net"] {
        build_rootfs(&share.join(id).join("rootfs"));
    }
    let vfsd = Virtiofsd::start(tmp.path(), &share, "vfsd", "auto", false);
    let opts = VmOptions {
        vcpus: 2,
        mem_mib: 256,
        // Only for the failure report: where the vCPUs of a guest that stopped are.
        control_socket: true,
        extra_args: vec![
            "--fs".into(),
            format!("socket={},tag={TAG}", vfsd.socket.display()),
            "--net".into(),
            format!("tap={TAP},mac={GUEST_MAC}"),
        ],
        ..VmOptions::agent(a)
    };
    let mut vm = VmProcess::spawn(a, &opts).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let opts = ClientOptions {
                request_timeout: Duration::from_secs(60),
                retry_initial_backoff: Duration::from_millis(10),
                retry_max_backoff: Duration::from_millis(100),
                ..ClientOptions::default()
            };
            let c = vm
                .connect_agent_with(opts, Duration::from_secs(120))
                .await
                .expect("the agent answers");
            scenario(c.clone(), host_mac.to_string()).await;
            c.shutdown().await.unwrap();
        })
    }));
    if let Err(p) = result {
        let (report, fault) = vm.post_mortem(&a.kernel);
        eprintln!("{report}\n--- virtiofsd:\n{}", vfsd.log());
        return Err((p, fault));
    }
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "husk-vmm exit: {status}");
    Ok(())
}
