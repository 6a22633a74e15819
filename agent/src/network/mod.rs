//! The guest's network, over rtnetlink: `SetupNetwork` (interfaces found by
//! MAC, their names, MTUs and addresses, then routes, then neighbours, then
//! resolv.conf / hosts files) and the interface counters of
//! `StatsContainer`. The request is validated by `husk_proto::network` (the
//! same code the host client runs) before anything is touched.

mod addresses;
mod error;
mod files;
mod links;
mod neighbors;
mod netlink;
mod routes;
mod stats;

use std::path::PathBuf;

use husk_proto::network::{NetworkConfig, NETWORK_FILES_DIR};
use husk_proto::v1::{NetworkInterfaceStats, SetupNetworkRequest};

pub use error::NetworkError;
pub use stats::MAX_REPORTED_INTERFACES;

use netlink::Netlink;

/// Applies network configurations, one at a time.
#[derive(Debug)]
pub struct Network {
    /// Serialises `SetupNetwork` calls: each is a sequence of steps that
    /// must not interleave with another's.
    lock: tokio::sync::Mutex<()>,
    /// Where resolv.conf and hosts go.
    files_dir: PathBuf,
}

impl Default for Network {
    fn default() -> Self {
        Self::with_files_dir(PathBuf::from(NETWORK_FILES_DIR))
    }
}

impl Network {
    /// Writes resolv.conf / hosts to `files_dir` instead of
    /// [`NETWORK_FILES_DIR`] (tests).
    pub fn with_files_dir(files_dir: PathBuf) -> Self {
        Self {
            lock: tokio::sync::Mutex::new(()),
            files_dir,
        }
    }

    /// Validates `req`, then applies it in order: `lo` up, interfaces,
    /// routes, neighbours, files. Idempotent ("replace" semantics
    /// throughout). Stops at the first failing step.
    pub async fn setup(&self, req: &SetupNetworkRequest) -> Result<(), NetworkError> {
        let config = NetworkConfig::from_request(req).map_err(NetworkError::Invalid)?;
        let _guard = self.lock.lock().await;
        let nl = Netlink::connect()?;
        links::loopback_up(&nl).await?;
        for (i, iface) in config.interfaces.iter().enumerate() {
            let field = format!("interfaces[{i}]");
            let index = links::configure(&nl, &field, iface).await?;
            addresses::add_all(&nl, &field, index, &iface.addresses).await?;
            links::set_up(&nl, &field, index, iface.up).await?;
            tracing::info!(
                mac = %iface.mac,
                name = %iface.name,
                mtu = iface.mtu,
                addresses = iface.addresses.len(),
                up = iface.up,
                "SetupNetwork: interface configured"
            );
        }
        for (i, route) in config.routes.iter().enumerate() {
            routes::replace(&nl, &format!("routes[{i}]"), route).await?;
        }
        for (i, n) in config.neighbors.iter().enumerate() {
            neighbors::replace(&nl, &format!("neighbors[{i}]"), n).await?;
        }
        if let Some(content) = &config.resolv_conf {
            files::write(&self.files_dir, "resolv.conf", content)?;
        }
        if let Some(content) = &config.hosts {
            files::write(&self.files_dir, "hosts", content)?;
        }
        tracing::info!(
            routes = config.routes.len(),
            neighbors = config.neighbors.len(),
            "SetupNetwork: done"
        );
        Ok(())
    }

    /// Counters of every interface but `lo`, at most
    /// [`MAX_REPORTED_INTERFACES`].
    pub async fn interface_stats(&self) -> Result<Vec<NetworkInterfaceStats>, NetworkError> {
        let nl = Netlink::connect()?;
        stats::collect(&nl).await
    }
}

#[cfg(test)]
mod tests;
