//! Routes (main table).

use husk_proto::network::{RouteConfig, RouteScope};
use rtnetlink::packet_route::route::RouteScope as NlScope;
use rtnetlink::RouteMessageBuilder;

use super::links;
use super::netlink::Netlink;
use super::NetworkError;

/// The kernel's scope for a route; `Auto` as `ip route` picks it.
fn scope(r: &RouteConfig) -> NlScope {
    match r.scope {
        RouteScope::Auto if r.gateway.is_none() => NlScope::Link,
        RouteScope::Auto | RouteScope::Global => NlScope::Universe,
        RouteScope::Site => NlScope::Site,
        RouteScope::Link => NlScope::Link,
        RouteScope::Host => NlScope::Host,
    }
}

/// Adds `route`, replacing a route to the same destination.
pub(super) async fn replace(
    nl: &Netlink,
    field: &str,
    route: &RouteConfig,
) -> Result<(), NetworkError> {
    // The builder refuses only family mismatches, which validation excludes.
    let invalid = |e: &dyn std::fmt::Display| {
        NetworkError::Invalid(husk_proto::network::NetworkError {
            field: field.to_string(),
            reason: e.to_string(),
        })
    };
    let mut b = RouteMessageBuilder::<std::net::IpAddr>::new()
        .destination_prefix(route.destination.addr, route.destination.prefix_len)
        .map_err(|e| invalid(&e))?
        .scope(scope(route));
    if let Some(g) = route.gateway {
        b = b.gateway(g).map_err(|e| invalid(&e))?;
    }
    if let Some(s) = route.source {
        b = b.pref_source(s).map_err(|e| invalid(&e))?;
    }
    if !route.device.is_empty() {
        let index = links::index_by_name(nl, &format!("{field}.device"), &route.device).await?;
        b = b.output_interface(index);
    }
    nl.handle
        .route()
        .add(b.build())
        .replace()
        .execute()
        .await
        .map_err(|e| NetworkError::kernel(field, "RTM_NEWROUTE", e))
}
