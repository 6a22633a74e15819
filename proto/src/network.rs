//! `SetupNetwork`: the typed request and its validation, shared by the agent
//! (which must refuse bad requests whoever sends them) and the host client
//! (which refuses them before sending, with the same field-named errors).
//! Pure parsing, no I/O.
//!
//! [`NetworkConfig::from_request`] turns the wire message into typed values
//! (or a [`NetworkError`] naming the field, e.g. `routes[2].gateway`);
//! [`NetworkConfig::to_request`] is its inverse.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::v1::{NetworkInterface, NetworkNeighbor, NetworkRoute, SetupNetworkRequest};

/// Guest directory where `SetupNetwork` writes `resolv.conf` and `hosts`.
pub const NETWORK_FILES_DIR: &str = "/run/husk/network";
/// Guest path of the pod's resolv.conf (when the request carried one).
pub const RESOLV_CONF_PATH: &str = "/run/husk/network/resolv.conf";
/// Guest path of the pod's hosts file (when the request carried one).
pub const HOSTS_PATH: &str = "/run/husk/network/hosts";

/// Most interfaces in one request.
pub const MAX_INTERFACES: usize = 16;
/// Most addresses on one interface.
pub const MAX_ADDRESSES_PER_INTERFACE: usize = 32;
/// Most routes in one request.
pub const MAX_ROUTES: usize = 256;
/// Most neighbours in one request.
pub const MAX_NEIGHBORS: usize = 256;
/// Largest resolv.conf or hosts content.
pub const MAX_NETWORK_FILE_SIZE: usize = 64 * 1024;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;
/// Smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// Smallest MTU of an interface with IPv6 addresses (the kernel disables
/// IPv6 below it).
pub const MIN_MTU_IPV6: u32 = 1280;
/// Largest MTU accepted.
pub const MAX_MTU: u32 = 65535;

/// A refused request: the field (`interfaces[0].mac`, ...) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkError {
    /// The offending request field, with indexes.
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

impl NetworkError {
    /// The top-level request field (`interfaces`, `routes`, `neighbors`,
    /// `resolv_conf`, `hosts`) that [`NetworkError::field`] lies in.
    pub fn top_level_field(&self) -> &'static str {
        let head = self.field.split(['[', '.']).next().unwrap_or_default();
        match head {
            "interfaces" => "interfaces",
            "routes" => "routes",
            "neighbors" => "neighbors",
            "resolv_conf" => "resolv_conf",
            _ => "hosts",
        }
    }
}

impl fmt::Display for NetworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for NetworkError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> NetworkError {
    NetworkError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Shows at most 64 characters of caller text in an error, escaped.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    format!("{cut:?}")
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether it can name an interface or a neighbour: not all zeros, not
    /// multicast/broadcast (I/G bit clear).
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six colon-separated pairs of hex digits, either case.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{} is not a MAC address (aa:bb:cc:dd:ee:ff)", shown(s));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address with a prefix length (`10.0.0.2/24`, `fd00::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length, at most 32 (IPv4) or 128 (IPv6).
    pub prefix_len: u8,
}

impl IpNet {
    /// `addr/prefix_len`; `None` if the prefix is too long for the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<IpNet> {
        (prefix_len <= max_prefix(addr)).then_some(IpNet { addr, prefix_len })
    }

    /// `0.0.0.0/0` or `::/0`.
    pub fn default_route(ipv6: bool) -> IpNet {
        let addr = if ipv6 {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0u8; 4])
        };
        IpNet {
            addr,
            prefix_len: 0,
        }
    }

    /// Whether bits beyond the prefix are set (`10.0.0.1/24`): fine for an
    /// interface address, not for a route destination.
    pub fn has_host_bits(&self) -> bool {
        let (bits, len) = match self.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host = len - u32::from(self.prefix_len);
        let mask = 1u128.checked_shl(host).map_or(u128::MAX, |b| b - 1);
        bits & mask != 0
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl FromStr for IpNet {
    type Err = String;

    /// `ADDR/LEN`: the prefix length is required.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{} is not ADDRESS/PREFIX", shown(s)))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{} is not an IP address", shown(a)))?;
        let prefix_ok = !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit());
        let prefix_len = prefix_ok
            .then(|| p.parse::<u8>().ok())
            .flatten()
            .filter(|n| *n <= max_prefix(addr))
            .ok_or_else(|| format!("prefix length {} not in 0..={}", shown(p), max_prefix(addr)))?;
        Ok(IpNet { addr, prefix_len })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Route scope (`ip route ... scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteScope {
    /// "link" without a gateway, "global" with one.
    #[default]
    Auto,
    /// `global` (RT_SCOPE_UNIVERSE).
    Global,
    /// `site`.
    Site,
    /// `link`: the destination is directly attached.
    Link,
    /// `host`: a local address.
    Host,
}

impl RouteScope {
    /// Parses the request's `scope` ("" is [`RouteScope::Auto`]).
    pub fn parse(s: &str) -> Option<RouteScope> {
        Some(match s {
            "" => RouteScope::Auto,
            "global" | "universe" => RouteScope::Global,
            "site" => RouteScope::Site,
            "link" => RouteScope::Link,
            "host" => RouteScope::Host,
            _ => return None,
        })
    }

    /// The request's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteScope::Auto => "",
            RouteScope::Global => "global",
            RouteScope::Site => "site",
            RouteScope::Link => "link",
            RouteScope::Host => "host",
        }
    }
}

/// A guest interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Found by this MAC.
    pub mac: MacAddr,
    /// New name; empty keeps the kernel's.
    pub name: String,
    /// 0 leaves the MTU as is.
    pub mtu: u32,
    /// Addresses with prefix lengths.
    pub addresses: Vec<IpNet>,
    /// Up (true) or down (false).
    pub up: bool,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination (no host bits); `0.0.0.0/0` or `::/0` is the default route.
    pub destination: IpNet,
    /// Next hop, same family.
    pub gateway: Option<IpAddr>,
    /// Output interface name; empty lets the kernel pick it.
    pub device: String,
    /// Preferred source, same family.
    pub source: Option<IpAddr>,
    /// Scope.
    pub scope: RouteScope,
}

/// A permanent neighbour (ARP / NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborConfig {
    /// Its IP address.
    pub ip: IpAddr,
    /// Its link-layer address.
    pub mac: MacAddr,
    /// The interface it is on.
    pub device: String,
}

/// The whole `SetupNetwork` request, typed and validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkConfig {
    /// Interfaces, applied first.
    pub interfaces: Vec<InterfaceConfig>,
    /// Routes, applied second.
    pub routes: Vec<RouteConfig>,
    /// Neighbours, applied third.
    pub neighbors: Vec<NeighborConfig>,
    /// Content of [`RESOLV_CONF_PATH`]; `None` leaves the file alone.
    pub resolv_conf: Option<Vec<u8>>,
    /// Content of [`HOSTS_PATH`]; `None` leaves the file alone.
    pub hosts: Option<Vec<u8>>,
}

/// Checks an interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
/// Stricter than the kernel (which takes almost any byte), so names are safe
/// in paths, logs and errors.
pub fn validate_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "{} must be 1..={MAX_INTERFACE_NAME_LEN} bytes",
            shown(name)
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{} is not a valid name", shown(name)));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(format!(
            "{} may contain only A-Z a-z 0-9 _ . -",
            shown(name)
        ));
    }
    Ok(())
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, NetworkError> {
    s.parse()
        .map_err(|_| err(field, format!("{} is not an IP address", shown(s))))
}

fn parse_optional_ip(field: &str, s: &str) -> Result<Option<IpAddr>, NetworkError> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_ip(field, s).map(Some)
}

fn check_count(field: &str, n: usize, max: usize) -> Result<(), NetworkError> {
    if n > max {
        return Err(err(field, format!("{n} entries, limit {max}")));
    }
    Ok(())
}

fn check_file(field: &str, content: &Option<Vec<u8>>) -> Result<(), NetworkError> {
    match content {
        Some(c) if c.len() > MAX_NETWORK_FILE_SIZE => Err(err(
            field,
            format!("{} bytes, limit {MAX_NETWORK_FILE_SIZE}", c.len()),
        )),
        _ => Ok(()),
    }
}

impl NetworkConfig {
    /// Parses and validates a wire request.
    pub fn from_request(r: &SetupNetworkRequest) -> Result<NetworkConfig, NetworkError> {
        check_count("interfaces", r.interfaces.len(), MAX_INTERFACES)?;
        check_count("routes", r.routes.len(), MAX_ROUTES)?;
        check_count("neighbors", r.neighbors.len(), MAX_NEIGHBORS)?;
        check_file("resolv_conf", &r.resolv_conf)?;
        check_file("hosts", &r.hosts)?;
        let interfaces = r
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, x)| parse_interface(&format!("interfaces[{i}]"), x))
            .collect::<Result<Vec<_>, _>>()?;
        let mut macs = HashSet::new();
        let mut names = HashSet::new();
        for (i, x) in interfaces.iter().enumerate() {
            if !macs.insert(x.mac) {
                return Err(err(
                    format!("interfaces[{i}].mac"),
                    format!("{} appears twice", x.mac),
                ));
            }
            if !x.name.is_empty() && !names.insert(x.name.as_str()) {
                return Err(err(
                    format!("interfaces[{i}].name"),
                    format!("{} appears twice", shown(&x.name)),
                ));
            }
        }
        let routes = r
            .routes
            .iter()
            .enumerate()
            .map(|(i, x)| parse_route(&format!("routes[{i}]"), x))
            .collect::<Result<Vec<_>, _>>()?;
        let neighbors = r
            .neighbors
            .iter()
            .enumerate()
            .map(|(i, x)| parse_neighbor(&format!("neighbors[{i}]"), x))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetworkConfig {
            interfaces,
            routes,
            neighbors,
            resolv_conf: r.resolv_conf.clone(),
            hosts: r.hosts.clone(),
        })
    }

    /// The wire request (the inverse of [`NetworkConfig::from_request`]).
    pub fn to_request(&self) -> SetupNetworkRequest {
        let opt = |a: &Option<IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        SetupNetworkRequest {
            interfaces: self
                .interfaces
                .iter()
                .map(|x| NetworkInterface {
                    mac: x.mac.to_string(),
                    name: x.name.clone(),
                    mtu: x.mtu,
                    addresses: x.addresses.iter().map(IpNet::to_string).collect(),
                    up: x.up,
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|x| NetworkRoute {
                    destination: x.destination.to_string(),
                    gateway: opt(&x.gateway),
                    device: x.device.clone(),
                    source: opt(&x.source),
                    scope: x.scope.as_str().to_string(),
                })
                .collect(),
            neighbors: self
                .neighbors
                .iter()
                .map(|x| NetworkNeighbor {
                    ip: x.ip.to_string(),
                    mac: x.mac.to_string(),
                    device: x.device.clone(),
                })
                .collect(),
            resolv_conf: self.resolv_conf.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

fn parse_interface(f: &str, x: &NetworkInterface) -> Result<InterfaceConfig, NetworkError> {
    let mac: MacAddr = x.mac.parse().map_err(|e| err(format!("{f}.mac"), e))?;
    if !mac.is_unicast() {
        return Err(err(
            format!("{f}.mac"),
            format!("{mac} is not a unicast address"),
        ));
    }
    if !x.name.is_empty() {
        validate_interface_name(&x.name).map_err(|e| err(format!("{f}.name"), e))?;
        if x.name == "lo" {
            return Err(err(format!("{f}.name"), "\"lo\" is the loopback's"));
        }
    }
    check_count(
        &format!("{f}.addresses"),
        x.addresses.len(),
        MAX_ADDRESSES_PER_INTERFACE,
    )?;
    let mut addresses = Vec::with_capacity(x.addresses.len());
    for (i, a) in x.addresses.iter().enumerate() {
        let field = format!("{f}.addresses[{i}]");
        let net: IpNet = a.parse().map_err(|e| err(&field, e))?;
        let ip = net.addr;
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(err(
                &field,
                format!("{net} is not a unicast interface address"),
            ));
        }
        if addresses.contains(&net) {
            return Err(err(&field, format!("{net} appears twice")));
        }
        addresses.push(net);
    }
    let has_v6 = addresses.iter().any(|a| a.addr.is_ipv6());
    let min = if has_v6 { MIN_MTU_IPV6 } else { MIN_MTU };
    if x.mtu != 0 && !(min..=MAX_MTU).contains(&x.mtu) {
        return Err(err(
            format!("{f}.mtu"),
            format!("{} not in {min}..={MAX_MTU} (or 0 to keep)", x.mtu),
        ));
    }
    Ok(InterfaceConfig {
        mac,
        name: x.name.clone(),
        mtu: x.mtu,
        addresses,
        up: x.up,
    })
}

fn same_family(field: String, a: Option<IpAddr>, ipv6: bool) -> Result<(), NetworkError> {
    match a {
        Some(a) if a.is_ipv6() != ipv6 => Err(err(
            field,
            format!(
                "{a} is not an {} address like the destination",
                if ipv6 { "IPv6" } else { "IPv4" }
            ),
        )),
        _ => Ok(()),
    }
}

fn parse_route(f: &str, x: &NetworkRoute) -> Result<RouteConfig, NetworkError> {
    let gateway = parse_optional_ip(&format!("{f}.gateway"), &x.gateway)?;
    let source = parse_optional_ip(&format!("{f}.source"), &x.source)?;
    let destination = if x.destination == "default" {
        match gateway.or(source) {
            Some(a) => IpNet::default_route(a.is_ipv6()),
            None => {
                return Err(err(
                    format!("{f}.destination"),
                    "\"default\" needs a gateway or a source to tell IPv4 from IPv6 \
                     (or write 0.0.0.0/0 or ::/0)",
                ))
            }
        }
    } else {
        let net: IpNet = x
            .destination
            .parse()
            .map_err(|e| err(format!("{f}.destination"), e))?;
        if net.has_host_bits() {
            return Err(err(
                format!("{f}.destination"),
                format!("{net} has bits set beyond the prefix length"),
            ));
        }
        net
    };
    let ipv6 = destination.addr.is_ipv6();
    same_family(format!("{f}.gateway"), gateway, ipv6)?;
    same_family(format!("{f}.source"), source, ipv6)?;
    if let Some(g) = gateway {
        if g.is_unspecified() || g.is_multicast() {
            return Err(err(
                format!("{f}.gateway"),
                format!("{g} is not a unicast address"),
            ));
        }
    }
    if !x.device.is_empty() {
        validate_interface_name(&x.device).map_err(|e| err(format!("{f}.device"), e))?;
    } else if gateway.is_none() {
        return Err(err(
            format!("{f}.device"),
            "a route needs a gateway or a device",
        ));
    }
    let scope = RouteScope::parse(&x.scope).ok_or_else(|| {
        err(
            format!("{f}.scope"),
            format!(
                "{} is not one of global, universe, site, link, host",
                shown(&x.scope)
            ),
        )
    })?;
    Ok(RouteConfig {
        destination,
        gateway,
        device: x.device.clone(),
        source,
        scope,
    })
}

fn parse_neighbor(f: &str, x: &NetworkNeighbor) -> Result<NeighborConfig, NetworkError> {
    let ip = parse_ip(&format!("{f}.ip"), &x.ip)?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(err(format!("{f}.ip"), format!("{ip} is not unicast")));
    }
    let mac: MacAddr = x.mac.parse().map_err(|e| err(format!("{f}.mac"), e))?;
    if !mac.is_unicast() {
        return Err(err(
            format!("{f}.mac"),
            format!("{mac} is not a unicast address"),
        ));
    }
    validate_interface_name(&x.device).map_err(|e| err(format!("{f}.device"), e))?;
    Ok(NeighborConfig {
        ip,
        mac,
        device: x.device.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mac: &str, name: &str, addrs: &[&str]) -> NetworkInterface {
        NetworkInterface {
            mac: mac.into(),
            name: name.into(),
            mtu: 1500,
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            up: true,
        }
    }

    fn route(dst: &str, gw: &str, dev: &str) -> NetworkRoute {
        NetworkRoute {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
            ..NetworkRoute::default()
        }
    }

    fn good() -> SetupNetworkRequest {
        SetupNetworkRequest {
            interfaces: vec![iface(
                "02:AA:bb:cc:dd:01",
                "eth0",
                &["10.88.0.5/16", "fd00:88::5/64"],
            )],
            routes: vec![
                route("default", "10.88.0.1", "eth0"),
                route("default", "fd00:88::1", ""),
                NetworkRoute {
                    destination: "10.99.0.0/24".into(),
                    device: "eth0".into(),
                    source: "10.88.0.5".into(),
                    scope: "link".into(),
                    ..NetworkRoute::default()
                },
            ],
            neighbors: vec![NetworkNeighbor {
                ip: "10.88.0.1".into(),
                mac: "02:00:00:00:00:01".into(),
                device: "eth0".into(),
            }],
            resolv_conf: Some(b"nameserver 10.96.0.10\n".to_vec()),
            hosts: None,
        }
    }

    fn field_of(r: SetupNetworkRequest) -> String {
        let e = NetworkConfig::from_request(&r).unwrap_err();
        format!("{e}")
    }

    #[test]
    fn a_good_request_round_trips() {
        let c = NetworkConfig::from_request(&good()).unwrap();
        assert_eq!(c.interfaces[0].mac.0, [2, 0xaa, 0xbb, 0xcc, 0xdd, 1]);
        assert_eq!(c.interfaces[0].addresses[1].to_string(), "fd00:88::5/64");
        assert_eq!(c.routes[0].destination.to_string(), "0.0.0.0/0");
        assert_eq!(c.routes[1].destination.to_string(), "::/0");
        assert_eq!(c.routes[2].scope, RouteScope::Link);
        // to_request writes canonical forms, which parse to the same config.
        let again = NetworkConfig::from_request(&c.to_request()).unwrap();
        assert_eq!(again, c);
        assert_eq!(c.to_request().interfaces[0].mac, "02:aa:bb:cc:dd:01");
    }

    #[test]
    fn parsers() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:0:0:0:0:1",
            "02-00-00-00-00-01",
            "0g:00:00:00:00:01",
            "+2:00:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/33",
            "::1/129",
            "10.0.0/24",
            "10.0.0.1/+8",
            "10.0.0.1/0008",
            "x/8",
            "/8",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        let n: IpNet = "10.1.2.3/24".parse().unwrap();
        assert!(n.has_host_bits());
        assert!(!"10.1.2.0/24".parse::<IpNet>().unwrap().has_host_bits());
        assert!(!"0.0.0.0/0".parse::<IpNet>().unwrap().has_host_bits());
        assert!(!"::/0".parse::<IpNet>().unwrap().has_host_bits());
        assert!("::1/0".parse::<IpNet>().unwrap().has_host_bits());
        assert!("fd00::1/64".parse::<IpNet>().unwrap().has_host_bits());
        assert!(!"fd00::1/128".parse::<IpNet>().unwrap().has_host_bits());
        for ok in ["eth0", "a", "net-1.2_x", "abcdefghijklmno"] {
            validate_interface_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "eth 0",
            "a/b",
            "abcdefghijklmnop",
            "é",
            "eth0\n",
        ] {
            assert!(validate_interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        type Change = fn(&mut SetupNetworkRequest);
        let cases: Vec<(Change, &str)> = vec![
            (
                |r| r.interfaces[0].mac = "nope".into(),
                "interfaces[0].mac: \"nope\" is not a MAC",
            ),
            (
                |r| r.interfaces[0].mac = "ff:ff:ff:ff:ff:ff".into(),
                "interfaces[0].mac: ff:ff:ff:ff:ff:ff is not a unicast",
            ),
            (
                |r| r.interfaces[0].name = "lo".into(),
                "interfaces[0].name:",
            ),
            (
                |r| r.interfaces[0].name = "x".repeat(16),
                "interfaces[0].name:",
            ),
            (
                |r| r.interfaces[0].addresses[1] = "10.0.0.300/24".into(),
                "interfaces[0].addresses[1]: \"10.0.0.300\" is not an IP",
            ),
            (
                |r| r.interfaces[0].addresses[0] = "224.0.0.1/4".into(),
                "interfaces[0].addresses[0]: 224.0.0.1/4 is not a unicast",
            ),
            (
                |r| r.interfaces[0].addresses.push("10.88.0.5/16".into()),
                "interfaces[0].addresses[2]: 10.88.0.5/16 appears twice",
            ),
            (
                |r| r.interfaces[0].mtu = 1000,
                "interfaces[0].mtu: 1000 not in 1280..=65535",
            ),
            (|r| r.interfaces[0].mtu = 70000, "interfaces[0].mtu: 70000"),
            (
                |r| r.interfaces.push(r.interfaces[0].clone()),
                "interfaces[1].mac: 02:aa:bb:cc:dd:01 appears twice",
            ),
            (
                |r| {
                    let mut i = r.interfaces[0].clone();
                    i.mac = "02:00:00:00:00:09".into();
                    r.interfaces.push(i);
                },
                "interfaces[1].name: \"eth0\" appears twice",
            ),
            (
                |r| r.interfaces = vec![NetworkInterface::default(); MAX_INTERFACES + 1],
                "interfaces: 17 entries, limit 16",
            ),
            (
                |r| r.interfaces[0].addresses = vec!["10.0.0.1/8".into(); 33],
                "interfaces[0].addresses: 33 entries, limit 32",
            ),
            (
                |r| r.routes[0].destination = "10.1.2.3/8".into(),
                "routes[0].destination: 10.1.2.3/8 has bits set",
            ),
            (
                |r| {
                    r.routes[2].destination = "default".into();
                    r.routes[2].source = String::new();
                },
                "routes[2].destination: \"default\" needs a gateway or a source",
            ),
            (
                |r| r.routes[1].destination = "bogus".into(),
                "routes[1].destination: \"bogus\" is not ADDRESS/PREFIX",
            ),
            (
                |r| r.routes[2].source = "fd00::1".into(),
                "routes[2].source: fd00::1 is not an IPv4 address",
            ),
            (
                |r| r.routes[0].gateway = "10.88.0.1x".into(),
                "routes[0].gateway: \"10.88.0.1x\" is not an IP",
            ),
            (
                |r| r.routes[2].device = String::new(),
                "routes[2].device: a route needs a gateway or a device",
            ),
            (|r| r.routes[2].scope = "nowhere".into(), "routes[2].scope:"),
            (
                |r| r.routes = vec![NetworkRoute::default(); MAX_ROUTES + 1],
                "routes: 257 entries",
            ),
            (
                |r| r.neighbors[0].device = String::new(),
                "neighbors[0].device:",
            ),
            (
                |r| r.neighbors[0].mac = "00:00:00:00:00:00".into(),
                "neighbors[0].mac:",
            ),
            (|r| r.neighbors[0].ip = "::".into(), "neighbors[0].ip:"),
            (
                |r| r.resolv_conf = Some(vec![b'#'; MAX_NETWORK_FILE_SIZE + 1]),
                "resolv_conf: 65537 bytes",
            ),
            (
                |r| r.hosts = Some(vec![b'#'; MAX_NETWORK_FILE_SIZE + 1]),
                "hosts: 65537 bytes",
            ),
        ];
        for (change, want) in cases {
            let mut r = good();
            change(&mut r);
            let got = field_of(r);
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn top_level_fields() {
        for (field, top) in [
            ("interfaces[0].mac", "interfaces"),
            ("routes", "routes"),
            ("neighbors[3].ip", "neighbors"),
            ("resolv_conf", "resolv_conf"),
            ("hosts", "hosts"),
        ] {
            assert_eq!(err(field, "x").top_level_field(), top);
        }
    }

    #[test]
    fn empty_request_is_valid() {
        let c = NetworkConfig::from_request(&SetupNetworkRequest::default()).unwrap();
        assert_eq!(c, NetworkConfig::default());
    }
}
