//! The pod-network plumbing against a real network namespace on this host (needs root and
//! /dev/net/tun, which every Husk node has): a veth with IPv4/IPv6 addresses and routes, as CNI's
//! bridge plugin leaves it, is read back, a tap is joined to it with tc redirects, and removed again.
//! Traffic through a booted VM is the shim end-to-end test's (tests/tests/shim_containerd.rs).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use husk_shim::sandbox::network::{mac_string, PodNetwork};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    ip(&args)
}

/// Deletes the namespace (and with it the veth pair and the tap) however the test ends.
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_cni_style_namespace_is_read_and_its_interface_joined_to_a_tap() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, tc); run it as root"
    );
    let ns = format!("husk-nt-{}", std::process::id());
    let host_end = format!("hnt{}", std::process::id() % 100_000);
    ip(&["netns", "add", &ns]);
    let _guard = Netns(ns.clone());
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", &host_end]);
    ip(&["link", "set", &host_end, "up"]);
    for cmd in [
        "ip link set lo up",
        "ip link set eth0 mtu 1450 up",
        "ip addr add 10.99.0.2/24 dev eth0",
        "ip -6 addr add fd00:99::2/64 dev eth0 nodad",
        "ip route add default via 10.99.0.1",
        "ip route add 10.100.0.0/16 via 10.99.0.1 src 10.99.0.2",
    ] {
        in_ns(&ns, &cmd.split(' ').collect::<Vec<_>>());
    }
    let mac = in_ns(&ns, &["cat", "/sys/class/net/eth0/address"]);
    let netns = PathBuf::from(format!("/run/netns/{ns}"));

    let net = PodNetwork::scan(&netns).expect("scan");
    assert_eq!(net.interfaces.len(), 1, "{net:?}");
    let eth0 = &net.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(mac_string(&eth0.mac), mac.trim());
    assert_eq!(eth0.mtu, 1450);
    let v4: IpAddr = "10.99.0.2".parse().unwrap();
    let v6: IpAddr = "fd00:99::2".parse().unwrap();
    assert!(eth0.addresses.contains(&(v4, 24)), "{:?}", eth0.addresses);
    assert!(eth0.addresses.contains(&(v6, 64)), "{:?}", eth0.addresses);
    assert!(
        eth0.addresses
            .iter()
            .all(|(a, _)| !a.to_string().starts_with("fe80")),
        "link-local addresses are left out: {:?}",
        eth0.addresses
    );
    let gw: IpAddr = "10.99.0.1".parse().unwrap();
    let default = net
        .routes
        .iter()
        .find(|r| r.destination.is_none() && r.gateway == Some(gw))
        .unwrap_or_else(|| panic!("default route via 10.99.0.1: {:?}", net.routes));
    assert_eq!(default.device, "eth0");
    let subnet = net
        .routes
        .iter()
        .find(|r| r.destination == Some(("10.100.0.0".parse().unwrap(), 16)))
        .unwrap_or_else(|| panic!("10.100.0.0/16: {:?}", net.routes));
    assert_eq!(subnet.gateway, Some(gw));
    assert_eq!(subnet.source, Some(v4));
    assert!(
        !net.routes
            .iter()
            .any(|r| r.destination == Some(("10.99.0.0".parse().unwrap(), 24))),
        "the kernel's own subnet route is not copied: {:?}",
        net.routes
    );
    assert_eq!(
        net.vmm_net_args(),
        vec![format!(
            "tap={},mac={},netns={}",
            eth0.tap,
            mac.trim(),
            netns.display()
        )]
    );

    // Before: the namespace's own stack answers a TCP SYN to a closed port with a reset.
    assert_eq!(syn_to_pod(), std::io::ErrorKind::ConnectionRefused);

    // husk-vmm would open the tap in the namespace; a persistent one stands in for it here.
    in_ns(
        &ns,
        &["ip", "tuntap", "add", "dev", &eth0.tap, "mode", "tap"],
    );
    net.connect_taps().expect("connect");
    net.connect_taps().expect("connecting twice is fine");
    for (dev, to) in [("eth0", eth0.tap.as_str()), (eth0.tap.as_str(), "eth0")] {
        let f = in_ns(&ns, &["tc", "filter", "show", "dev", dev, "ingress"]);
        // Every frame (ETH_P_ALL in network byte order shows as "all"), exactly one filter even after
        // two connects.
        assert!(f.contains("protocol all"), "{dev}: {f}");
        assert_eq!(
            f.matches("mirred (Egress Redirect to device").count(),
            1,
            "{dev} → {to}: {f}"
        );
        assert!(f.contains(&format!("device {to})")), "{dev} → {to}: {f}");
    }
    // After: the SYN is stolen for the tap (nobody reads it here), the namespace's stack never sees it.
    assert_eq!(syn_to_pod(), std::io::ErrorKind::TimedOut);
    let link = in_ns(&ns, &["ip", "link", "show", &eth0.tap]);
    assert!(link.contains("mtu 1450") && link.contains(",UP"), "{link}");

    let again = PodNetwork::scan(&netns).expect("rescan");
    assert_eq!(again.interfaces.len(), 1, "our tap is not a pod interface");

    net.disconnect().expect("disconnect");
    let q = in_ns(&ns, &["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!q.contains("ingress"), "{q}");
    assert_eq!(syn_to_pod(), std::io::ErrorKind::ConnectionRefused);
}

/// How a TCP connect from the host end to a closed port at the pod address ends.
fn syn_to_pod() -> std::io::ErrorKind {
    let addr = "10.99.0.2:9".parse().unwrap();
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
        Ok(_) => panic!("something listens on 10.99.0.2:9"),
        Err(e) => e.kind(),
    }
}
