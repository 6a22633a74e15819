//! What a VM is made of, as the command line or a library user describes it, and its validation.

use std::path::{Path, PathBuf};

use crate::boot::mptable::MAX_VCPUS;
use crate::memory::MIN_MEM_MIB;

/// Upper bound on guest RAM: far above any pod, low enough to catch a typo (MiB vs KiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// The first CID a guest may use: 0-2 are the hypervisor, local and host.
pub const MIN_GUEST_CID: u64 = 3;

/// The base kernel command line; `VmConfig::cmdline_extra` is appended after it.
/// `reboot=k`: reboot through the i8042, which ends the VM. `panic=-1`: reboot at once on panic.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp random.trust_cpu=on quiet";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    Stdout,
    File(PathBuf),
    Discard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host side of the hybrid vsock: host processes connect here and send `CONNECT <port>\n`.
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub cmdline_extra: Option<String>,
    pub console: ConsoleOutput,
    pub vsock: Option<VsockConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("kernel image {0} does not exist or is not a readable file")]
    KernelMissing(PathBuf),
    #[error("initrd {0} does not exist or is not a readable file")]
    InitrdMissing(PathBuf),
    #[error("{0} vCPUs requested: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("{0} MiB of memory requested: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}")]
    Memory(u64),
    #[error("guest CID {0} is reserved: must be at least {MIN_GUEST_CID} and below 2^32-1")]
    GuestCid(u64),
    #[error("vsock socket directory {0} does not exist")]
    VsockDir(PathBuf),
    #[error("console file directory {0} does not exist")]
    ConsoleDir(PathBuf),
}

fn readable_file(p: &Path) -> bool {
    std::fs::File::open(p)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file())
}

fn parent_exists(p: &Path) -> Result<(), PathBuf> {
    match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(dir.to_path_buf()),
        _ => Ok(()),
    }
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !readable_file(&self.kernel) {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !readable_file(initrd) {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < MIN_GUEST_CID || v.guest_cid >= u32::MAX as u64 {
                return Err(ConfigError::GuestCid(v.guest_cid));
            }
            parent_exists(&v.uds_path).map_err(ConfigError::VsockDir)?;
        }
        if let ConsoleOutput::File(f) = &self.console {
            parent_exists(f).map_err(ConfigError::ConsoleDir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/proc/self/exe"),
            initrd: None,
            vcpus: 1,
            mem_mib: 128,
            cmdline_extra: None,
            console: ConsoleOutput::Discard,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: PathBuf::from("/tmp/v.sock"),
            }),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(good().validate(), Ok(()));
        let mut c = good();
        c.kernel = "/nonexistent/vmlinux".into();
        assert_eq!(
            c.validate(),
            Err(ConfigError::KernelMissing(c.kernel.clone()))
        );
        let mut c = good();
        c.kernel = "/tmp".into();
        assert!(matches!(c.validate(), Err(ConfigError::KernelMissing(_))));
        let mut c = good();
        c.initrd = Some("/nonexistent/initrd".into());
        assert!(matches!(c.validate(), Err(ConfigError::InitrdMissing(_))));
        let mut c = good();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = MAX_VCPUS + 1;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(MAX_VCPUS + 1)));
        let mut c = good();
        c.mem_mib = 16;
        assert_eq!(c.validate(), Err(ConfigError::Memory(16)));
        let mut c = good();
        c.vsock.as_mut().unwrap().guest_cid = 2;
        assert_eq!(c.validate(), Err(ConfigError::GuestCid(2)));
        let mut c = good();
        c.vsock.as_mut().unwrap().uds_path = "/nonexistent/dir/v.sock".into();
        assert!(matches!(c.validate(), Err(ConfigError::VsockDir(_))));
    }
}
