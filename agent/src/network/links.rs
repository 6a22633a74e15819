//! Links: found by MAC, renamed, MTU, up/down; `lo` up.

use husk_proto::network::{InterfaceConfig, MacAddr};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::LinkUnspec;
use tokio_stream::StreamExt;

use super::netlink::Netlink;
use super::NetworkError;

/// What the set-up needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Link {
    pub(super) index: u32,
    pub(super) name: String,
    pub(super) mac: Option<MacAddr>,
    pub(super) mtu: u32,
    pub(super) up: bool,
}

impl Link {
    pub(super) fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Address(a) => {
                    link.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr);
                }
                _ => {}
            }
        }
        link
    }
}

/// Every link, as full messages (the stats need their counters too).
pub(super) async fn dump(nl: &Netlink, field: &str) -> Result<Vec<LinkMessage>, NetworkError> {
    let mut out = Vec::new();
    let mut s = nl.handle.link().get().execute();
    while let Some(m) = s.next().await {
        out.push(m.map_err(|e| NetworkError::kernel(field, "RTM_GETLINK", e))?);
    }
    Ok(out)
}

/// Every link.
pub(super) async fn list(nl: &Netlink, field: &str) -> Result<Vec<Link>, NetworkError> {
    Ok(dump(nl, field)
        .await?
        .iter()
        .map(Link::from_message)
        .collect())
}

/// The index of the link called `name`; NOT_FOUND naming `field` if none.
pub(super) async fn index_by_name(
    nl: &Netlink,
    field: &str,
    name: &str,
) -> Result<u32, NetworkError> {
    list(nl, field)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| NetworkError::NotFound {
            field: field.to_string(),
            what: format!("no interface named {name:?}"),
        })
}

async fn change(
    nl: &Netlink,
    field: &str,
    msg: LinkMessage,
    step: &'static str,
) -> Result<(), NetworkError> {
    nl.handle
        .link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| NetworkError::kernel(field, step, e))
}

/// Finds the link with the interface's MAC and gives it its name and MTU.
/// Returns its index.
pub(super) async fn configure(
    nl: &Netlink,
    field: &str,
    iface: &InterfaceConfig,
) -> Result<u32, NetworkError> {
    let links = list(nl, field).await?;
    let link = links
        .iter()
        .find(|l| l.mac == Some(iface.mac))
        .ok_or_else(|| NetworkError::NotFound {
            field: format!("{field}.mac"),
            what: format!("no interface with MAC {}", iface.mac),
        })?;
    if !iface.name.is_empty() && iface.name != link.name {
        // The kernel renames only links that are down.
        if link.up {
            let down = LinkUnspec::new_with_index(link.index).down().build();
            change(nl, field, down, "RTM_NEWLINK (down to rename)").await?;
        }
        let rename = LinkUnspec::new_with_index(link.index)
            .name(iface.name.clone())
            .build();
        change(nl, &format!("{field}.name"), rename, "RTM_NEWLINK (rename)").await?;
        tracing::debug!(from = %link.name, to = %iface.name, "interface renamed");
    }
    if iface.mtu != 0 && iface.mtu != link.mtu {
        let mtu = LinkUnspec::new_with_index(link.index)
            .mtu(iface.mtu)
            .build();
        change(nl, &format!("{field}.mtu"), mtu, "RTM_NEWLINK (mtu)").await?;
    }
    Ok(link.index)
}

/// Brings link `index` up or down.
pub(super) async fn set_up(
    nl: &Netlink,
    field: &str,
    index: u32,
    up: bool,
) -> Result<(), NetworkError> {
    let b = LinkUnspec::new_with_index(index);
    let msg = if up { b.up() } else { b.down() }.build();
    change(nl, &format!("{field}.up"), msg, "RTM_NEWLINK (up/down)").await
}

/// Brings `lo` up if it is not (init does it at boot; this makes the call
/// self-sufficient).
pub(super) async fn loopback_up(nl: &Netlink) -> Result<(), NetworkError> {
    let links = list(nl, "lo").await?;
    match links.iter().find(|l| l.name == "lo") {
        Some(lo) if !lo.up => set_up(nl, "lo", lo.index, true).await,
        _ => Ok(()),
    }
}
