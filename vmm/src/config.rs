//! What a VM is made of, as the command line or a library user describes it, and its validation.

use std::path::{Path, PathBuf};

use crate::boot::mptable::MAX_VCPUS;
pub use crate::devices::virtio::block::BlockConfig;
pub use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::fs::TAG_LEN;
pub use crate::devices::virtio::net::NetConfig;
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
    /// virtio-blk disks, in the order the guest names them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces on taps, in the order the guest names them (`eth0`, ...).
    pub nets: Vec<NetConfig>,
    /// Shared directories served by vhost-user-fs daemons (guest RAM is then memfd-backed).
    pub fs: Vec<FsConfig>,
    /// Where to serve the control socket (docs/control-socket.md), if anywhere.
    pub control_socket: Option<PathBuf>,
}

/// How many virtio-mmio devices fit: one 4 KiB window and one IOAPIC pin (5..=23) each.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Linux interface names are at most 15 bytes.
const MAX_IFNAME_LEN: usize = 15;

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
    #[error("control socket directory {0} does not exist")]
    ControlDir(PathBuf),
    #[error("disk image {0} does not exist or is not readable")]
    DiskMissing(PathBuf),
    #[error("tap name {0:?} must be 1 to 15 characters, without '/', ':' or whitespace")]
    TapName(String),
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes without NUL, and unique")]
    FsTag(String),
    #[error("vhost-user-fs socket {0} does not exist (start the daemon first)")]
    FsSocketMissing(PathBuf),
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    #[error("{what} {spec:?}: {reason}")]
    Spec {
        what: &'static str,
        spec: String,
        reason: String,
    },
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
        if let Some(p) = &self.control_socket {
            parent_exists(p).map_err(ConfigError::ControlDir)?;
        }
        for d in &self.disks {
            if std::fs::File::open(&d.path).is_err() {
                return Err(ConfigError::DiskMissing(d.path.clone()));
            }
        }
        for n in &self.nets {
            let name = &n.tap_name;
            if name.is_empty()
                || name.len() > MAX_IFNAME_LEN
                || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(ConfigError::TapName(name.clone()));
            }
        }
        for (i, f) in self.fs.iter().enumerate() {
            if f.tag.is_empty()
                || f.tag.len() > TAG_LEN
                || f.tag.contains('\0')
                || self.fs[..i].iter().any(|o| o.tag == f.tag)
            {
                return Err(ConfigError::FsTag(f.tag.clone()));
            }
            if std::fs::symlink_metadata(&f.socket).is_err() {
                return Err(ConfigError::FsSocketMissing(f.socket.clone()));
            }
        }
        let devices =
            self.disks.len() + self.nets.len() + self.fs.len() + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }
}

/// Splits `key=value,flag,...` options; a bare word is a flag with an empty value.
fn options(spec: &str) -> impl Iterator<Item = (&str, &str)> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// `--disk path=FILE[,ro][,id=SERIAL]`
/// Serial of the root image disk, so the guest (and a human) can tell it from pod disks.
pub const ROOTFS_DISK_ID: &str = "husk-rootfs";

/// Boots from a read-only root image instead of an initrd (docs/guest-image.md): `image` becomes
/// the first virtio-blk disk, `/dev/vda`, ahead of the other disks, and the kernel is told to mount
/// it read-only (erofs, or ext4) and run the agent as `/init`. The root parameters go in front of
/// `cmdline_extra`, so init arguments after a `--` there stay init arguments.
pub fn use_root_image(
    image: PathBuf,
    disks: &mut Vec<BlockConfig>,
    cmdline_extra: Option<String>,
) -> Option<String> {
    disks.insert(
        0,
        BlockConfig {
            path: image,
            read_only: true,
            id: Some(ROOTFS_DISK_ID.into()),
        },
    );
    let root = "root=/dev/vda ro rootfstype=erofs,ext4 init=/init";
    Some(match cmdline_extra {
        Some(extra) if !extra.trim().is_empty() => format!("{root} {extra}"),
        _ => root.to_string(),
    })
}

pub fn parse_disk(spec: &str) -> Result<BlockConfig, ConfigError> {
    let err = |reason: String| ConfigError::Spec {
        what: "disk",
        spec: spec.to_string(),
        reason,
    };
    let mut disk = BlockConfig {
        path: PathBuf::new(),
        read_only: false,
        id: None,
    };
    for (k, v) in options(spec) {
        match (k, v) {
            ("path", p) if !p.is_empty() => disk.path = p.into(),
            ("ro", "") => disk.read_only = true,
            ("id", id) if !id.is_empty() && id.len() <= 20 => disk.id = Some(id.to_string()),
            ("id", _) => return Err(err("id must be 1 to 20 bytes".into())),
            _ => return Err(err(format!("unknown or malformed option {k:?}"))),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(err("path=FILE is required".into()));
    }
    Ok(disk)
}

/// `--net tap=NAME[,mac=aa:bb:cc:dd:ee:ff][,netns=PATH]`
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let err = |reason: String| ConfigError::Spec {
        what: "net",
        spec: spec.to_string(),
        reason,
    };
    let mut net = NetConfig {
        tap_name: String::new(),
        mac: None,
        netns: None,
    };
    for (k, v) in options(spec) {
        match (k, v) {
            ("tap", name) => net.tap_name = name.to_string(),
            ("mac", mac) => {
                net.mac = Some(parse_mac(mac).ok_or_else(|| err(format!("bad MAC {mac:?}")))?)
            }
            ("netns", p) if !p.is_empty() => net.netns = Some(p.into()),
            _ => return Err(err(format!("unknown or malformed option {k:?}"))),
        }
    }
    if net.tap_name.is_empty() {
        return Err(err("tap=NAME is required".into()));
    }
    Ok(net)
}

/// `--fs socket=PATH,tag=TAG`
pub fn parse_fs(spec: &str) -> Result<FsConfig, ConfigError> {
    let err = |reason: String| ConfigError::Spec {
        what: "fs",
        spec: spec.to_string(),
        reason,
    };
    let mut fs = FsConfig {
        socket: PathBuf::new(),
        tag: String::new(),
    };
    for (k, v) in options(spec) {
        match (k, v) {
            ("socket", p) if !p.is_empty() => fs.socket = p.into(),
            ("tag", t) if !t.is_empty() && t.len() <= TAG_LEN => fs.tag = t.to_string(),
            ("tag", _) => return Err(err(format!("tag must be 1 to {TAG_LEN} bytes"))),
            _ => return Err(err(format!("unknown or malformed option {k:?}"))),
        }
    }
    if fs.socket.as_os_str().is_empty() {
        return Err(err("socket=PATH is required".into()));
    }
    if fs.tag.is_empty() {
        return Err(err("tag=TAG is required".into()));
    }
    Ok(fs)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
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
            disks: Vec::new(),
            nets: Vec::new(),
            fs: Vec::new(),
            control_socket: None,
        }
    }

    #[test]
    fn disk_and_net_specs() {
        let d = parse_disk("path=/tmp/a.img,ro,id=rootfs").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("rootfs"));
        assert!(!parse_disk("path=/x").unwrap().read_only);
        assert!(parse_disk("ro").is_err());
        assert!(parse_disk("path=/x,id=123456789012345678901").is_err());
        assert!(parse_disk("path=/x,bogus=1").is_err());

        let n = parse_net("tap=tap0,mac=02:00:00:aa:bb:cc,netns=/var/run/netns/p").unwrap();
        assert_eq!(n.tap_name, "tap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(n.netns, Some(PathBuf::from("/var/run/netns/p")));
        assert!(parse_net("mac=02:00:00:aa:bb:cc").is_err());
        for bad in [
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:cc:dd",
            "zz:00:00:aa:bb:cc",
            "2:0:0:a:b:c",
        ] {
            assert!(parse_net(&format!("tap=t,mac={bad}")).is_err(), "{bad}");
        }
        let mut c = good();
        c.nets.push(parse_net("tap=this-name-is-too-long").unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::TapName(_))));
        let mut c = good();
        c.disks.push(parse_disk("path=/nonexistent.img").unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::DiskMissing(_))));
    }

    #[test]
    fn fs_specs() {
        let f = parse_fs("socket=/run/vfs.sock,tag=pod-share").unwrap();
        assert_eq!(f.socket, PathBuf::from("/run/vfs.sock"));
        assert_eq!(f.tag, "pod-share");
        let t36 = "a".repeat(36);
        assert_eq!(parse_fs(&format!("socket=/s,tag={t36}")).unwrap().tag, t36);
        for bad in [
            "tag=x",
            "socket=/s",
            "socket=/s,tag=",
            "socket=,tag=x",
            "socket=/s,tag=x,ro",
            &format!("socket=/s,tag={t36}b"),
        ] {
            assert!(parse_fs(bad).is_err(), "{bad}");
        }

        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vfs.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let share = |tag: &str| FsConfig {
            socket: sock.clone(),
            tag: tag.into(),
        };
        let mut c = good();
        c.fs.push(share("a"));
        assert_eq!(c.validate(), Ok(()));
        c.fs.push(share("a"));
        assert_eq!(c.validate(), Err(ConfigError::FsTag("a".into())));
        let mut c = good();
        c.fs.push(share("nul\0tag"));
        assert!(matches!(c.validate(), Err(ConfigError::FsTag(_))));
        let mut c = good();
        c.fs.push(FsConfig {
            socket: dir.path().join("absent.sock"),
            tag: "a".into(),
        });
        assert!(matches!(c.validate(), Err(ConfigError::FsSocketMissing(_))));
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

    #[test]
    fn root_image_is_the_first_read_only_disk() {
        let mut disks = vec![parse_disk("path=/pod.img").unwrap()];
        let extra = use_root_image(
            "/img/rootfs.erofs".into(),
            &mut disks,
            Some("-- a b".into()),
        );
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].path, PathBuf::from("/img/rootfs.erofs"));
        assert!(disks[0].read_only);
        assert_eq!(disks[0].id.as_deref(), Some(ROOTFS_DISK_ID));
        assert_eq!(disks[1].path, PathBuf::from("/pod.img"));
        assert_eq!(
            extra.as_deref(),
            Some("root=/dev/vda ro rootfstype=erofs,ext4 init=/init -- a b")
        );
        let mut none = Vec::new();
        assert_eq!(
            use_root_image("/r".into(), &mut none, None).as_deref(),
            Some("root=/dev/vda ro rootfstype=erofs,ext4 init=/init")
        );
    }
}
