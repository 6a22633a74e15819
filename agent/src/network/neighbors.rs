//! Permanent neighbour (ARP / NDP) entries.

use husk_proto::network::NeighborConfig;

use super::links;
use super::netlink::Netlink;
use super::NetworkError;

/// Adds `n` as a permanent entry, replacing one for the same address.
pub(super) async fn replace(
    nl: &Netlink,
    field: &str,
    n: &NeighborConfig,
) -> Result<(), NetworkError> {
    let index = links::index_by_name(nl, &format!("{field}.device"), &n.device).await?;
    nl.handle
        .neighbours()
        .add(index, n.ip)
        .link_layer_address(&n.mac.0)
        .replace()
        .execute()
        .await
        .map_err(|e| NetworkError::kernel(field, "RTM_NEWNEIGH", e))
}
