//! Interface addresses.

use husk_proto::network::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};

use super::netlink::Netlink;
use super::NetworkError;

/// Adds (or replaces) each address on link `index`. IPv6 addresses skip
/// duplicate address detection: the pod's IPAM owns them, and DAD would keep
/// them unusable ("tentative") for a second or more after the call.
pub(super) async fn add_all(
    nl: &Netlink,
    field: &str,
    index: u32,
    addresses: &[IpNet],
) -> Result<(), NetworkError> {
    for (i, a) in addresses.iter().enumerate() {
        let mut req = nl
            .handle
            .address()
            .add(index, a.addr, a.prefix_len)
            .replace();
        if a.addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(|e| {
            NetworkError::kernel(&format!("{field}.addresses[{i}]"), "RTM_NEWADDR", e)
        })?;
    }
    Ok(())
}
