//! The set-up against a real kernel: a veth pair in a fresh network
//! namespace of a test thread (needs root; skipped with a message without
//! CAP_SYS_ADMIN). `ip` (iproute2) reads back what was configured.

use std::process::Command;

use husk_proto::v1::{NetworkInterface, NetworkNeighbor, NetworkRoute, SetupNetworkRequest};

use super::*;

/// Runs `f` on a thread in a new network namespace, on a tokio runtime of
/// that thread (the netlink sockets and `ip` children are created there).
/// `None` if the namespace cannot be created (not root).
fn in_new_netns<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> Option<T> {
    std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("skipped: cannot create a network namespace ({e}); needs root");
            return None;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Some(rt.block_on(f()))
    })
    .join()
    .unwrap()
}

fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const MAC: &str = "02:11:22:33:44:55";

fn request(files: bool) -> SetupNetworkRequest {
    SetupNetworkRequest {
        interfaces: vec![NetworkInterface {
            mac: MAC.into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec!["10.77.0.2/24".into(), "fd00:77::2/64".into()],
            up: true,
        }],
        routes: vec![
            NetworkRoute {
                destination: "default".into(),
                gateway: "10.77.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            NetworkRoute {
                destination: "default".into(),
                gateway: "fd00:77::1".into(),
                ..Default::default()
            },
            NetworkRoute {
                destination: "10.99.0.0/16".into(),
                device: "eth0".into(),
                source: "10.77.0.2".into(),
                ..Default::default()
            },
        ],
        neighbors: vec![NetworkNeighbor {
            ip: "10.77.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            device: "eth0".into(),
        }],
        resolv_conf: files.then(|| b"nameserver 10.77.0.1\nsearch pod.local\n".to_vec()),
        hosts: files.then(|| b"127.0.0.1 localhost\n".to_vec()),
    }
}

#[test]
fn setup_configures_a_veth_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("network");
    let files2 = files.clone();
    let done = in_new_netns(move || {
        Box::pin(async move {
            ip(&format!(
                "link add vguest address {MAC} type veth peer name vhost"
            ));
            ip("link set vhost up");
            ip("link set lo down");
            let net = Network::with_files_dir(files2.clone());
            net.setup(&request(true)).await.unwrap();
            // The same call again succeeds (replace semantics).
            net.setup(&request(true)).await.unwrap();

            let link = ip("-o link show eth0");
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains(MAC), "{link}");
            assert!(!link.contains("state DOWN"), "{link}");
            assert!(ip("-o link show lo").contains("UP"), "lo brought up");
            let addrs = ip("-o addr show dev eth0");
            assert!(addrs.contains("inet 10.77.0.2/24"), "{addrs}");
            let v6 = addrs.lines().find(|l| l.contains("inet6 fd00:77::2/64"));
            let v6 = v6.unwrap_or_else(|| panic!("no fd00:77::2/64: {addrs}"));
            assert!(!v6.contains("tentative"), "no DAD, usable at once: {v6}");
            let routes = ip("-4 route show");
            assert!(
                routes.contains("default via 10.77.0.1 dev eth0"),
                "{routes}"
            );
            assert!(
                routes.contains("10.99.0.0/16 dev eth0 proto static scope link src 10.77.0.2"),
                "{routes}"
            );
            let routes6 = ip("-6 route show");
            assert!(
                routes6.contains("default via fd00:77::1 dev eth0"),
                "{routes6}"
            );
            let neigh = ip("neigh show dev eth0");
            assert!(
                neigh.contains("10.77.0.1 lladdr 02:00:00:00:00:01 PERMANENT"),
                "{neigh}"
            );
            // One default route, not two (replaced, not added).
            assert_eq!(routes.matches("default").count(), 1, "{routes}");

            // Counters: eth0 (and its peer), never lo.
            let stats = net.interface_stats().await.unwrap();
            let names: Vec<_> = stats.iter().map(|s| s.name.as_str()).collect();
            assert!(
                names.contains(&"eth0") && names.contains(&"vhost"),
                "{names:?}"
            );
            assert!(!names.contains(&"lo"), "{names:?}");

            // A MAC nobody has: NOT_FOUND naming it; nothing else applied.
            let mut r = request(false);
            r.interfaces[0].mac = "02:99:99:99:99:99".into();
            let e = tonic::Status::from(net.setup(&r).await.unwrap_err());
            assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
            assert!(
                e.message()
                    .starts_with("interfaces[0].mac: no interface with MAC 02:99:99:99:99:99"),
                "{e}"
            );
            // An unknown route device: NOT_FOUND naming the route.
            let mut r = request(false);
            r.routes[2].device = "nope0".into();
            let e = tonic::Status::from(net.setup(&r).await.unwrap_err());
            assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
            assert!(e.message().starts_with("routes[2].device:"), "{e}");
            // A bad CIDR: INVALID_ARGUMENT before anything is touched.
            let mut r = request(false);
            r.interfaces[0].addresses[0] = "10.77.0.2/33".into();
            let e = tonic::Status::from(net.setup(&r).await.unwrap_err());
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            assert!(
                e.message().starts_with("interfaces[0].addresses[0]:"),
                "{e}"
            );
            // A gateway the kernel cannot reach: its errno, code and field.
            let mut r = request(false);
            r.routes[0].gateway = "192.0.2.1".into();
            let e = tonic::Status::from(net.setup(&r).await.unwrap_err());
            assert_ne!(e.code(), tonic::Code::Ok);
            assert!(e.message().starts_with("routes[0]: RTM_NEWROUTE:"), "{e}");
        })
    });
    if done.is_none() {
        return;
    }
    assert_eq!(
        std::fs::read(files.join("resolv.conf")).unwrap(),
        b"nameserver 10.77.0.1\nsearch pod.local\n"
    );
    assert_eq!(
        std::fs::read(files.join("hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(files.join("resolv.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn files_are_rewritten_in_place_and_symlinks_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("network");
    files::write(&d, "resolv.conf", b"nameserver 1.1.1.1\n").unwrap();
    let ino =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = ino(&d.join("resolv.conf"));
    files::write(&d, "resolv.conf", b"x").unwrap();
    assert_eq!(std::fs::read(d.join("resolv.conf")).unwrap(), b"x");
    assert_eq!(
        ino(&d.join("resolv.conf")),
        before,
        "same inode: bind mounts see it"
    );
    // A symlink planted at the file is not followed.
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "keep").unwrap();
    std::os::unix::fs::symlink(&target, d.join("hosts")).unwrap();
    let e = files::write(&d, "hosts", b"evil").unwrap_err();
    assert!(e.to_string().starts_with("hosts: opening"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    // Nor at the directory.
    let link_dir = dir.path().join("linked");
    std::os::unix::fs::symlink(dir.path(), &link_dir).unwrap();
    let e = files::write(&link_dir, "hosts", b"evil").unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}
