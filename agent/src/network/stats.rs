//! Interface counters for `StatsContainer`: every container of the pod
//! shares the guest's network namespace, so these are the pod's.

use husk_proto::v1::NetworkInterfaceStats;
use rtnetlink::packet_route::link::LinkAttribute;

use super::links;
use super::netlink::Netlink;
use super::NetworkError;

/// Most interfaces reported (the host client refuses more).
pub const MAX_REPORTED_INTERFACES: usize = 64;

/// Counters of every link except `lo` (as runc and cAdvisor report them),
/// in index order.
pub(super) async fn collect(nl: &Netlink) -> Result<Vec<NetworkInterfaceStats>, NetworkError> {
    let mut out = Vec::new();
    let mut links = links::dump(nl, "network").await?;
    links.sort_by_key(|m| m.header.index);
    for m in &links {
        let mut name = None;
        let mut stats = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.as_str()),
                LinkAttribute::Stats64(s) => stats = Some(s),
                _ => {}
            }
        }
        let (Some(name), Some(s)) = (name, stats) else {
            continue;
        };
        if name == "lo" {
            continue;
        }
        if out.len() == MAX_REPORTED_INTERFACES {
            tracing::warn!(
                total = links.len(),
                "more than {MAX_REPORTED_INTERFACES} interfaces: counters of the rest not reported"
            );
            break;
        }
        out.push(NetworkInterfaceStats {
            name: name.to_string(),
            rx_bytes: s.rx_bytes,
            rx_packets: s.rx_packets,
            rx_errors: s.rx_errors,
            rx_dropped: s.rx_dropped,
            tx_bytes: s.tx_bytes,
            tx_packets: s.tx_packets,
            tx_errors: s.tx_errors,
            tx_dropped: s.tx_dropped,
        });
    }
    Ok(out)
}
