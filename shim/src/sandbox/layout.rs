//! Where a pod's files live on the host (`<state_dir>/<sandbox id>/`) and in the guest.
//!
//! ```text
//! /run/husk/<sandbox id>/
//!   shared/                 the virtio-fs share (a bind mount of itself, marked shared so that rootfs mounts
//!     <container id>/rootfs   made after virtiofsd started propagate into its mount namespace)
//!     <container id>/mounts/  host files and directories a container bind-mounts (resolv.conf, volumes)
//!   vsock.sock              the VMM's hybrid vsock socket (the agent is reached through it)
//!   control.sock            the VMM's control socket
//!   virtiofsd.sock          vhost-user socket between the VMM and virtiofsd
//!   vmm.pid virtiofsd.pid   for the cleanup `delete` after the shim was killed
//!   vmm.log virtiofsd.log console.log
//! ```

use std::path::{Path, PathBuf};

/// Tag of the pod's virtio-fs share.
pub const SHARE_TAG: &str = "husk";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE: &str = "/run/husk/shared";

/// A pod's directory on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    root: PathBuf,
}

impl SandboxDir {
    pub fn new(state_dir: &Path, sandbox_id: &str) -> Self {
        Self {
            root: state_dir.join(sandbox_id),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }
    pub fn vsock(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }
    pub fn control(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.root.join("virtiofsd.sock")
    }
    pub fn vmm_pid(&self) -> PathBuf {
        self.root.join("vmm.pid")
    }
    pub fn virtiofsd_pid(&self) -> PathBuf {
        self.root.join("virtiofsd.pid")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.root.join("vmm.log")
    }
    pub fn virtiofsd_log(&self) -> PathBuf {
        self.root.join("virtiofsd.log")
    }
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// A container's directory in the share (host side).
    pub fn container(&self, container_id: &str) -> PathBuf {
        self.shared().join(container_id)
    }
    /// Where a container's root filesystem is mounted on the host.
    pub fn container_rootfs(&self, container_id: &str) -> PathBuf {
        self.container(container_id).join("rootfs")
    }
    /// The same directory as the guest sees it.
    pub fn guest_container_rootfs(container_id: &str) -> String {
        format!("{GUEST_SHARE}/{container_id}/rootfs")
    }
    /// Host-side directory for the n-th bind mount source of a container.
    pub fn container_mount(&self, container_id: &str, n: usize) -> PathBuf {
        self.container(container_id)
            .join("mounts")
            .join(n.to_string())
    }
    pub fn guest_container_mount(container_id: &str, n: usize) -> String {
        format!("{GUEST_SHARE}/{container_id}/mounts/{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_guest_paths_agree() {
        let d = SandboxDir::new(Path::new("/run/husk"), "pod1");
        assert_eq!(
            d.container_rootfs("c1"),
            Path::new("/run/husk/pod1/shared/c1/rootfs")
        );
        let host_rel = d.container_rootfs("c1");
        let host_rel = host_rel.strip_prefix(d.shared()).unwrap();
        let guest = SandboxDir::guest_container_rootfs("c1");
        let guest_rel = Path::new(&guest).strip_prefix(GUEST_SHARE).unwrap();
        assert_eq!(host_rel, guest_rel);
        let m = d.container_mount("c1", 2);
        assert_eq!(
            m.strip_prefix(d.shared()).unwrap(),
            Path::new(&SandboxDir::guest_container_mount("c1", 2))
                .strip_prefix(GUEST_SHARE)
                .unwrap()
        );
    }
}
