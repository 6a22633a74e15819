//! The pod's network, carried into the VM.
//!
//! Whoever made the pod's network namespace (CNI under the CRI, or a user's `ctr run --with-ns`) put
//! interfaces there with addresses and routes. The VM gets one virtio-net device per such interface,
//! backed by a tap that husk-vmm opens *in that namespace*; a tc ingress filter on each side redirects
//! every frame from the interface to its tap and back ("tc mirred", as Kata's default `tcfilter`
//! model), so the namespace's own IP stack never sees the pod's traffic. The guest's interface takes
//! the pod interface's name, MAC, MTU, addresses and routes (the agent's `SetupNetwork`): the pod's IP
//! lives in the guest, and peers that resolved it to the interface's MAC reach the guest unchanged.
//!
//! Netlink requests go to the namespace through a socket opened on a short-lived thread that entered
//! it, so the shim's own threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use husk_proto::client::{InterfaceConfig, IpNet, MacAddr, NetworkConfig, RouteConfig, RouteScope};
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
    RouteScope as KernelScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Most interfaces carried into one VM (a virtio-net device each).
pub const MAX_POD_INTERFACES: usize = 8;
/// Longest interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// tc priority of the redirect filters; any value works, a fixed one lets a later run find them.
const FILTER_PRIORITY: u16 = 1;
/// ETH_P_ALL: the filters match every frame. The kernel compares the filter's protocol with
/// `skb->protocol`, which is in network byte order (iproute2 passes `htons(ETH_P_ALL)`).
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {}: {what}: {source}", path.display())]
    Namespace {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {}: {what}: {source}", path.display())]
    Netlink {
        path: PathBuf,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network namespace {}: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
}

/// A pod interface and the tap that stands in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the pod namespace, given to the guest's interface too (`eth0`).
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Addresses with prefix length; IPv6 link-local ones are left out (the guest derives the same
    /// from the same MAC).
    pub addresses: Vec<(IpAddr, u8)>,
    /// The tap husk-vmm opens in the namespace for this interface.
    pub tap: String,
}

/// A route of the pod namespace's main table through one of the pod interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// The route's family (a default route without gateway has no address to tell it by).
    pub ipv6: bool,
    /// `None` for the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    pub source: Option<IpAddr>,
    /// `true` for a link-scope route (an on-link subnet without gateway).
    pub link_scope: bool,
}

/// What the pod namespace holds, and how the VM is wired into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<PodInterface>,
    pub routes: Vec<PodRoute>,
}

/// Renders a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `f` with a netlink handle whose socket lives in the network namespace `path`.
fn in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle, PathBuf) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let path = path.to_path_buf();
    let ns_err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| NetworkError::Namespace { path, what, source }
    };
    let thread_path = path.clone();
    let worker = std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            let path = thread_path;
            let ns = File::open(&path).map_err(ns_err(&path, "opening it"))?;
            // This thread only, and it ends with this closure.
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(&path, "entering it (setns)")(e.into()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(ns_err(&path, "starting a netlink runtime"))?;
            rt.block_on(async move {
                // The socket is created here, so in the namespace just entered.
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(ns_err(&path, "opening netlink"))?;
                let conn = tokio::spawn(conn);
                let r = f(handle, path).await;
                conn.abort();
                r
            })
        })
        .map_err(ns_err(&path, "starting a thread"))?;
    worker.join().unwrap_or_else(|_| {
        Err(NetworkError::Unsupported {
            path,
            what: "the netlink thread panicked".into(),
        })
    })
}

fn nl(path: &Path, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let (path, what) = (path.to_path_buf(), what.into());
    move |source| NetworkError::Netlink { path, what, source }
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The tap name for the `n`th pod interface (fits IFNAMSIZ for any n < 100).
fn tap_name(n: usize) -> String {
    format!("tap{n}_husk")
}

fn is_our_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with("_husk")
}

/// Decides from a link message whether it is a pod interface; `None` for loopback, non-Ethernet
/// links, links that are down (e.g. the `gretap0` / `erspan0` fallback devices a netns gets when
/// ip_gre is loaded), links without a unicast MAC, and our own taps.
fn pod_interface(l: &LinkMessage) -> Option<(String, u32, [u8; 6], u32)> {
    if l.header.link_layer_type != LinkLayerType::Ether
        || l.header.flags.contains(LinkFlags::Loopback)
        || !l.header.flags.contains(LinkFlags::Up)
    {
        return None;
    }
    let name = link_name(l)?;
    if is_our_tap(name) || name.len() > MAX_IFNAME {
        return None;
    }
    let mac: [u8; 6] = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
        _ => None,
    })?;
    if !MacAddr(mac).is_unicast() {
        return None;
    }
    let mtu = l
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500);
    Some((name.to_string(), l.header.index, mac, mtu))
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// A route worth copying into the guest: main table, unicast, through a pod interface, not one the
/// kernel derives by itself from an address (the guest's kernel adds those when it gets the address).
fn pod_route(r: &RouteMessage, interfaces: &[PodInterface]) -> Option<PodRoute> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let Some(oif) = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    }) else {
        // Multipath routes carry their devices in RTA_MULTIPATH.
        tracing::warn!(?r, "pod route without a single output device: not copied");
        return None;
    };
    let device = interfaces.iter().find(|i| i.index == oif)?.name.clone();
    let mut route = PodRoute {
        ipv6: r.header.address_family == AddressFamily::Inet6,
        destination: None,
        gateway: None,
        device,
        source: None,
        link_scope: r.header.scope == KernelScope::Link,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                route.destination = route_addr(d).map(|ip| (ip, r.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => route.gateway = route_addr(g),
            RouteAttribute::PrefSource(s) => route.source = route_addr(s),
            RouteAttribute::Via(_) => {
                tracing::warn!(
                    ?r,
                    "pod route with a next hop of another family: not copied"
                );
                return None;
            }
            _ => {}
        }
    }
    if route
        .destination
        .is_some_and(|(ip, _)| is_ipv6_link_local(&ip))
    {
        return None;
    }
    Some(route)
}

/// Orders routes so that each gateway is reachable when its route is added: on-link routes first.
fn order_routes(routes: &mut [PodRoute]) {
    routes.sort_by_key(|r| (r.gateway.is_some(), r.destination.is_none()));
}

impl PodNetwork {
    /// Reads the pod interfaces, their addresses and routes from the namespace at `netns`. A namespace
    /// with only loopback gives an empty network (the VM then has no network device, as a pod with
    /// `hostNetwork: false` and no CNI has only `lo`).
    pub fn scan(netns: &Path) -> Result<PodNetwork, NetworkError> {
        // The node's own namespace (`--with-ns network:/proc/1/ns/net`, a misconfigured runtime) would
        // hand the node's NICs to the VM.
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
        if let (Ok(pod), Ok(own)) = (id(netns), id(Path::new("/proc/self/ns/net"))) {
            if pod == own {
                return Err(NetworkError::Unsupported {
                    path: netns.to_path_buf(),
                    what: "this is the node's own network namespace; a pod VM needs a pod network \
                           namespace (hostNetwork pods are not supported)"
                        .into(),
                });
            }
        }
        in_netns(netns, |handle, path| async move {
            let mut interfaces = Vec::new();
            let mut links = handle.link().get().execute();
            while let Some(l) = links.try_next().await.map_err(nl(&path, "listing links"))? {
                if let Some((name, index, mac, mtu)) = pod_interface(&l) {
                    if interfaces.len() == MAX_POD_INTERFACES {
                        let names: Vec<&str> = interfaces
                            .iter()
                            .map(|i: &PodInterface| i.name.as_str())
                            .collect();
                        return Err(NetworkError::Unsupported {
                            path,
                            what: format!(
                                "more than {MAX_POD_INTERFACES} interfaces ({}, {name}, ...)",
                                names.join(", ")
                            ),
                        });
                    }
                    interfaces.push(PodInterface {
                        name,
                        index,
                        mac,
                        mtu,
                        addresses: Vec::new(),
                        tap: tap_name(interfaces.len()),
                    });
                }
            }
            let mut addrs = handle.address().get().execute();
            while let Some(a) = addrs
                .try_next()
                .await
                .map_err(nl(&path, "listing addresses"))?
            {
                let Some(iface) = interfaces.iter_mut().find(|i| i.index == a.header.index) else {
                    continue;
                };
                // IFA_LOCAL is this end of a point-to-point address (IFA_ADDRESS is then the peer).
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = local.or_else(|| {
                    a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(ip) = ip.filter(|ip| !is_ipv6_link_local(ip)) {
                    iface.addresses.push((ip, a.header.prefix_len));
                }
            }
            let mut routes = Vec::new();
            for query in [
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            ] {
                let mut dump = handle.route().get(query).execute();
                while let Some(r) = dump.try_next().await.map_err(nl(&path, "listing routes"))? {
                    routes.extend(pod_route(&r, &interfaces));
                }
            }
            order_routes(&mut routes);
            Ok(PodNetwork {
                netns: path,
                interfaces,
                routes,
            })
        })
    }

    /// The agent request that gives the guest's interfaces (found by the MACs given to husk-vmm) the
    /// pod interfaces' names, MTUs and addresses, and adds the routes. DNS is not part of it: the CRI
    /// bind-mounts the pod's resolv.conf and hosts into each container, which the shim carries through
    /// the share like any other bind mount.
    pub fn guest_setup(&self) -> NetworkConfig {
        NetworkConfig {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| InterfaceConfig {
                    mac: MacAddr(i.mac),
                    name: i.name.clone(),
                    mtu: i.mtu,
                    addresses: i
                        .addresses
                        .iter()
                        .filter_map(|(ip, len)| IpNet::new(*ip, *len))
                        .collect(),
                    up: true,
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| RouteConfig {
                    destination: r
                        .destination
                        .and_then(|(ip, len)| IpNet::new(ip, len))
                        .unwrap_or_else(|| IpNet::default_route(r.ipv6)),
                    gateway: r.gateway,
                    device: r.device.clone(),
                    source: r.source,
                    scope: if r.link_scope {
                        RouteScope::Link
                    } else {
                        RouteScope::Auto
                    },
                })
                .collect(),
            neighbors: Vec::new(),
            resolv_conf: None,
            hosts: None,
        }
    }

    /// husk-vmm `--net` values: one virtio-net device per pod interface, in order (the guest finds
    /// them by MAC, not by order).
    pub fn vmm_net_args(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .map(|i| {
                format!(
                    "tap={},mac={},netns={}",
                    i.tap,
                    mac_string(&i.mac),
                    self.netns.display()
                )
            })
            .collect()
    }

    /// Joins each tap (opened by husk-vmm by now) to its pod interface: a fresh ingress qdisc on both
    /// (one left by a killed shim goes, with its filters that redirect to a tap that no longer
    /// exists), a redirect-everything filter on each, and only then the tap up with the interface's
    /// MTU, so no guest frame reaches the namespace's own IP stack. Running it again gives the same
    /// result.
    pub fn connect_taps(&self) -> Result<(), NetworkError> {
        let interfaces = self.interfaces.clone();
        in_netns(&self.netns, move |handle, path| async move {
            for iface in &interfaces {
                let tap = match handle
                    .link()
                    .get()
                    .match_name(iface.tap.clone())
                    .execute()
                    .try_next()
                    .await
                {
                    Ok(Some(l)) => l,
                    Ok(None) | Err(_) => {
                        return Err(NetworkError::Unsupported {
                            path: path.clone(),
                            what: format!(
                                "tap {} for {} does not exist (husk-vmm opens it at start)",
                                iface.tap, iface.name
                            ),
                        })
                    }
                };
                let tap_index = tap.header.index;
                // The tap is a wire into the guest, not an interface of this namespace: no IPv6
                // link-local address, DAD or router solicitations of its own into the guest.
                let _ = std::fs::write(
                    format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", iface.tap),
                    "1",
                );
                for (from, to, what) in [
                    (iface.index, tap_index, &iface.name),
                    (tap_index, iface.index, &iface.tap),
                ] {
                    let ix = i32::try_from(from).map_err(|_| NetworkError::Unsupported {
                        path: path.clone(),
                        what: format!("link index {from} out of range"),
                    })?;
                    remove_ingress_qdisc(&handle, ix).await;
                    handle
                        .qdisc()
                        .add(ix)
                        .ingress()
                        .execute()
                        .await
                        .map_err(nl(
                            &path,
                            format!(
                                "adding an ingress qdisc to {what} (the host kernel needs \
                                 CONFIG_NET_SCH_INGRESS / module sch_ingress; or another \
                                 qdisc such as clsact is in the way)"
                            ),
                        ))?;
                    handle
                        .traffic_filter(ix)
                        .add()
                        .ingress()
                        .priority(FILTER_PRIORITY)
                        .protocol(ETH_P_ALL_BE)
                        .redirect(to)
                        .map_err(nl(&path, format!("building the redirect filter of {what}")))?
                        .execute()
                        .await
                        .map_err(nl(
                            &path,
                            format!(
                                "adding the redirect filter on {what} (the host kernel needs \
                                 cls_u32 and act_mirred)"
                            ),
                        ))?;
                }
                handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(tap_index)
                            .mtu(iface.mtu)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl(&path, format!("setting tap {} up", iface.tap)))?;
            }
            Ok(())
        })
    }

    /// Removes the ingress qdiscs (and with them the filters) from the pod interfaces; the taps go
    /// away by themselves when husk-vmm closes them. The namespace may be gone already (the CRI
    /// deletes it after the sandbox): that is not an error.
    pub fn disconnect(&self) -> Result<(), NetworkError> {
        if !self.netns.exists() {
            return Ok(());
        }
        let interfaces = self.interfaces.clone();
        in_netns(&self.netns, move |handle, _path| async move {
            for iface in &interfaces {
                remove_ingress_qdisc(&handle, i32::try_from(iface.index).unwrap_or(i32::MAX)).await;
            }
            Ok(())
        })
    }
}

/// Deletes the ingress qdisc of link `index`, if it has one (ENOENT/EINVAL otherwise: ignored).
async fn remove_ingress_qdisc(handle: &Handle, index: i32) {
    let mut del = handle.qdisc().del(index);
    del.message_mut().header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    if let Err(e) = del.execute().await {
        tracing::trace!(index, error = %e, "no ingress qdisc to remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn route(dest: Option<(IpAddr, u8)>, gw: Option<IpAddr>) -> PodRoute {
        PodRoute {
            ipv6: dest.map(|(ip, _)| ip.is_ipv6()).or(gw.map(|g| g.is_ipv6())) == Some(true),
            destination: dest,
            gateway: gw,
            device: "eth0".into(),
            source: None,
            link_scope: gw.is_none(),
        }
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_are_recognised() {
        for n in 0..MAX_POD_INTERFACES {
            let t = tap_name(n);
            assert!(t.len() <= MAX_IFNAME, "{t}");
            assert!(is_our_tap(&t));
        }
        assert!(!is_our_tap("eth0"));
        assert!(!is_our_tap("tap0"));
    }

    #[test]
    fn macs_render_lower_case_with_colons() {
        assert_eq!(
            mac_string(&[0x02, 0x42, 0xac, 0x11, 0x00, 0x0a]),
            "02:42:ac:11:00:0a"
        );
    }

    #[test]
    fn gateway_routes_come_after_on_link_routes() {
        let gw = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)));
        let mut routes = vec![
            route(None, gw),
            route(Some((IpAddr::V4(Ipv4Addr::new(10, 2, 0, 0)), 16)), gw),
            route(Some((IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), 32)), None),
        ];
        order_routes(&mut routes);
        assert!(routes[0].gateway.is_none());
        assert!(routes[1].destination.is_some());
        assert!(routes[2].destination.is_none(), "default route last");
    }

    #[test]
    fn the_guest_gets_names_macs_addresses_and_routes() {
        let gw6: IpAddr = "fd00::1".parse().unwrap();
        let net = PodNetwork {
            netns: "/run/netns/p".into(),
            interfaces: vec![PodInterface {
                name: "eth0".into(),
                index: 2,
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 1400,
                addresses: vec![("10.1.0.5".parse().unwrap(), 24)],
                tap: tap_name(0),
            }],
            routes: vec![
                route(None, Some("10.1.0.1".parse().unwrap())),
                route(None, Some(gw6)),
            ],
        };
        let c = net.guest_setup();
        assert_eq!(c.interfaces.len(), 1);
        assert_eq!(c.interfaces[0].mac, MacAddr([2, 0, 0, 0, 0, 9]));
        assert_eq!(c.interfaces[0].name, "eth0");
        assert_eq!(c.interfaces[0].mtu, 1400);
        assert_eq!(c.interfaces[0].addresses[0].to_string(), "10.1.0.5/24");
        assert!(c.interfaces[0].up);
        assert_eq!(c.routes[0].destination, IpNet::default_route(false));
        assert_eq!(c.routes[1].destination, IpNet::default_route(true));
        assert_eq!(c.routes[1].gateway, Some(gw6));
        assert_eq!(
            net.vmm_net_args(),
            vec!["tap=tap0_husk,mac=02:00:00:00:00:09,netns=/run/netns/p".to_string()]
        );
    }

    fn eth0() -> Vec<PodInterface> {
        vec![PodInterface {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: vec![],
            tap: tap_name(0),
        }]
    }

    #[test]
    fn routes_are_filtered_like_the_guest_needs_them() {
        use rtnetlink::packet_route::route::RouteNextHop;
        let gw4 = Ipv4Addr::new(10, 1, 0, 1);
        let v4 = || RouteMessageBuilder::<Ipv4Addr>::new().output_interface(2);
        let r = pod_route(&v4().gateway(gw4).build(), &eth0()).expect("default via gw");
        assert_eq!(
            (r.destination, r.gateway, r.ipv6),
            (None, Some(IpAddr::V4(gw4)), false)
        );
        assert_eq!(r.device, "eth0");
        // The kernel's own subnet route, another table, another device, a local route: not copied.
        let kernel = v4()
            .destination_prefix(Ipv4Addr::new(10, 1, 0, 0), 24)
            .protocol(RouteProtocol::Kernel)
            .build();
        assert_eq!(pod_route(&kernel, &eth0()), None);
        assert_eq!(
            pod_route(&v4().gateway(gw4).table_id(100).build(), &eth0()),
            None
        );
        let other_dev = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(7)
            .gateway(gw4)
            .build();
        assert_eq!(pod_route(&other_dev, &eth0()), None);
        assert_eq!(
            pod_route(&v4().kind(RouteType::Local).build(), &eth0()),
            None
        );
        // Multipath: no single device, not copied (logged).
        let mp = RouteMessageBuilder::<Ipv4Addr>::new()
            .multipath(vec![RouteNextHop::default()])
            .build();
        assert_eq!(pod_route(&mp, &eth0()), None);
        // An IPv6 default route without gateway keeps its family.
        let v6 = pod_route(
            &RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(2)
                .scope(KernelScope::Link)
                .build(),
            &eth0(),
        )
        .expect("v6 default dev eth0");
        assert!(v6.ipv6 && v6.link_scope && v6.gateway.is_none());
        let net = PodNetwork {
            netns: "/x".into(),
            interfaces: eth0(),
            routes: vec![v6],
        };
        assert_eq!(
            net.guest_setup().routes[0].destination,
            IpNet::default_route(true)
        );
        // fe80::/64 is the guest kernel's own.
        let ll = RouteMessageBuilder::<Ipv6Addr>::new()
            .output_interface(2)
            .destination_prefix(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 64)
            .build();
        assert_eq!(pod_route(&ll, &eth0()), None);
    }

    #[test]
    fn ipv6_link_local_is_recognised() {
        assert!(is_ipv6_link_local(&IpAddr::V6(Ipv6Addr::new(
            0xfe80, 0, 0, 0, 1, 2, 3, 4
        ))));
        assert!(!is_ipv6_link_local(&IpAddr::V6(Ipv6Addr::new(
            0xfd00, 0, 0, 0, 0, 0, 0, 1
        ))));
        assert!(!is_ipv6_link_local(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn a_missing_namespace_is_named_in_the_error() {
        let e = PodNetwork::scan(Path::new("/nonexistent/netns/pod")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns/pod"), "{e}");
    }
}
