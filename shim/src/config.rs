//! The shim's configuration: `/etc/husk/config.toml` (or `$HUSK_CONFIG`), then per-pod overrides from an
//! allow-listed set of annotations.
//!
//! ```toml
//! kernel = "/usr/share/husk/vmlinux"        # guest kernel (vmlinux or bzImage)
//! rootfs = "/usr/share/husk/rootfs.erofs"   # guest root, a read-only erofs disk with husk-agent as /init
//! initrd = "/usr/share/husk/initrd.img"     # the alternative: the same files as an initrd
//! vmm = "/usr/bin/husk-vmm"                  # default: next to the shim binary
//! virtiofsd = "/usr/libexec/husk/virtiofsd"  # default: next to the shim binary
//! vcpus = 1
//! memory_mib = 256
//! debug_console = false                      # keep the guest console in the pod's state dir
//! log_level = "info"                         # the shim's tracing filter
//! state_dir = "/run/husk"
//! # Keys a pod may override with `io.husk.config.<key>` annotations.
//! allowed_annotations = ["vcpus", "memory_mib"]
//! ```
//!
//! The guest boots from `rootfs` when that file exists (`husk-vmm --rootfs`: `/dev/vda`, read-only), else
//! from `initrd` (docs/guest-image.md); `rootfs = ""` turns the disk off, `initrd = ""` the fallback.
//!
//! Paths (kernel, rootfs, initrd, vmm, virtiofsd, state_dir) are host paths chosen by the node's administrator; they
//! can be made overridable by listing them in `allowed_annotations`, but a pod author who can pick the kernel
//! or the VMM binary owns the node, so the default list has only sizes and the debug console.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is read from unless `$HUSK_CONFIG` names another file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// Environment variable naming another configuration file (tests, side-by-side installs).
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
/// Prefix of the annotations that override configuration keys.
pub const ANNOTATION_PREFIX: &str = "io.husk.config.";

/// Most vCPUs a pod may ask for (the VMM's own limit).
pub const MAX_VCPUS: u32 = 32;
/// Smallest and largest guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the Husk configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the Husk configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("annotation {annotation}: {reason}")]
    Annotation { annotation: String, reason: String },
    #[error("configuration key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(
        "no guest image: neither rootfs {rootfs:?} nor initrd {initrd:?} is a file (run 'make install', \
         or set rootfs or initrd in the Husk configuration)"
    )]
    NoGuestImage { rootfs: PathBuf, initrd: PathBuf },
}

/// What the guest boots from, as the VMM is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestImage {
    /// A read-only root disk (erofs): `husk-vmm --rootfs`.
    Rootfs(PathBuf),
    /// An initramfs: `husk-vmm --initrd`.
    Initrd(PathBuf),
}

impl GuestImage {
    /// The husk-vmm option that takes [`Self::path`].
    pub fn vmm_flag(&self) -> &'static str {
        match self {
            GuestImage::Rootfs(_) => "--rootfs",
            GuestImage::Initrd(_) => "--initrd",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            GuestImage::Rootfs(p) | GuestImage::Initrd(p) => p,
        }
    }

    /// For error messages.
    pub fn what(&self) -> &'static str {
        match self {
            GuestImage::Rootfs(_) => "guest image (rootfs)",
            GuestImage::Initrd(_) => "guest image (initrd)",
        }
    }
}

/// The effective configuration of one pod VM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    pub kernel: PathBuf,
    /// The read-only root image; empty: not used.
    pub rootfs: PathBuf,
    /// The initrd, used when `rootfs` is empty or missing; empty: not used.
    pub initrd: PathBuf,
    pub vmm: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub debug_console: bool,
    pub log_level: String,
    pub state_dir: PathBuf,
    pub allowed_annotations: Vec<String>,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            kernel: "/usr/share/husk/vmlinux".into(),
            rootfs: "/usr/share/husk/rootfs.erofs".into(),
            initrd: "/usr/share/husk/initrd.img".into(),
            vmm: None,
            virtiofsd: None,
            vcpus: 1,
            memory_mib: 256,
            debug_console: false,
            log_level: "info".into(),
            state_dir: "/run/husk".into(),
            // Not debug_console: the console log is written by the guest, without a size limit.
            allowed_annotations: vec!["vcpus".into(), "memory_mib".into()],
        }
    }
}

/// Every key of [`ShimConfig`] an annotation could name.
const KEYS: &[&str] = &[
    "kernel",
    "rootfs",
    "initrd",
    "vmm",
    "virtiofsd",
    "vcpus",
    "memory_mib",
    "debug_console",
    "log_level",
];

impl ShimConfig {
    /// The configuration file path: `$HUSK_CONFIG` or [`DEFAULT_CONFIG_PATH`].
    pub fn path_from_env() -> PathBuf {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CONFIG_PATH.into())
    }

    /// Reads and validates a configuration file. A missing file at the default path means "defaults"; a
    /// missing file that was named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let cfg: ShimConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.message().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the configuration the environment names (see [`Self::path_from_env`]).
    pub fn load_from_env() -> Result<Self, ConfigError> {
        let explicit = std::env::var_os(CONFIG_ENV).is_some_and(|v| !v.is_empty());
        Self::load(&Self::path_from_env(), explicit)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Invalid {
                key: "vcpus",
                reason: format!("{} is not in 1..={MAX_VCPUS}", self.vcpus),
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Invalid {
                key: "memory_mib",
                reason: format!(
                    "{} is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            });
        }
        if self.rootfs.as_os_str().is_empty() && self.initrd.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "rootfs",
                reason: "rootfs and initrd are both empty: the guest needs one of them".into(),
            });
        }
        fn set(p: &PathBuf) -> Option<&PathBuf> {
            (!p.as_os_str().is_empty()).then_some(p)
        }
        for (key, p) in [
            ("kernel", Some(&self.kernel)),
            ("rootfs", set(&self.rootfs)),
            ("initrd", set(&self.initrd)),
            ("vmm", self.vmm.as_ref()),
            ("virtiofsd", self.virtiofsd.as_ref()),
            ("state_dir", Some(&self.state_dir)),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: format!("{} is not an absolute path", p.display()),
                    });
                }
            }
        }
        for k in &self.allowed_annotations {
            if !KEYS.contains(&k.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "allowed_annotations",
                    reason: format!(
                        "{k:?} is not a configuration key (known: {})",
                        KEYS.join(", ")
                    ),
                });
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason: format!("{:?} is not a tracing filter", self.log_level),
            });
        }
        Ok(())
    }

    /// Applies the `io.husk.config.*` annotations of a pod. An annotation for an unknown key, for a key the
    /// administrator did not allow, or with a bad value is an error (never silently ignored: the pod would
    /// run with a size its author did not ask for).
    pub fn with_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<ShimConfig, ConfigError> {
        let mut cfg = self.clone();
        for (name, value) in annotations {
            let Some(key) = name.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let err = |reason: String| ConfigError::Annotation {
                annotation: name.clone(),
                reason,
            };
            if !KEYS.contains(&key) {
                return Err(err(format!(
                    "unknown key {key:?} (known: {})",
                    KEYS.join(", ")
                )));
            }
            if !self.allowed_annotations.iter().any(|a| a == key) {
                return Err(err(format!(
                    "overriding {key:?} is not allowed by the node's configuration (allowed_annotations = {:?})",
                    self.allowed_annotations
                )));
            }
            let path = || -> Result<PathBuf, ConfigError> {
                let p = PathBuf::from(value);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(err(format!("{value:?} is not an absolute path")))
                }
            };
            match key {
                "kernel" => cfg.kernel = path()?,
                "rootfs" => cfg.rootfs = path()?,
                "initrd" => cfg.initrd = path()?,
                "vmm" => cfg.vmm = Some(path()?),
                "virtiofsd" => cfg.virtiofsd = Some(path()?),
                "vcpus" => {
                    cfg.vcpus = value
                        .parse()
                        .map_err(|_| err(format!("{value:?} is not a number")))?
                }
                "memory_mib" => {
                    cfg.memory_mib = value
                        .parse()
                        .map_err(|_| err(format!("{value:?} is not a number")))?
                }
                "debug_console" => {
                    cfg.debug_console = value
                        .parse()
                        .map_err(|_| err(format!("{value:?} is not true or false")))?
                }
                "log_level" => cfg.log_level = value.clone(),
                _ => unreachable!("checked against KEYS"),
            }
        }
        cfg.validate().map_err(|e| ConfigError::Annotation {
            annotation: ANNOTATION_PREFIX.to_string() + "*",
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// What the pod VM boots from: `rootfs` if it is set and a file, else `initrd` if it is set and a
    /// file. Checked when a VM starts (not at load: cleanup must work on a node whose images are gone).
    pub fn guest_image(&self) -> Result<GuestImage, ConfigError> {
        let file = |p: &PathBuf| !p.as_os_str().is_empty() && p.is_file();
        if file(&self.rootfs) {
            return Ok(GuestImage::Rootfs(self.rootfs.clone()));
        }
        if file(&self.initrd) {
            return Ok(GuestImage::Initrd(self.initrd.clone()));
        }
        Err(ConfigError::NoGuestImage {
            rootfs: self.rootfs.clone(),
            initrd: self.initrd.clone(),
        })
    }

    /// The VMM binary: configured, else `husk-vmm` next to the shim.
    pub fn vmm_path(&self) -> PathBuf {
        self.vmm
            .clone()
            .unwrap_or_else(|| sibling_binary("husk-vmm"))
    }

    /// The virtio-fs daemon: configured, else `virtiofsd` next to the shim.
    pub fn virtiofsd_path(&self) -> PathBuf {
        self.virtiofsd
            .clone()
            .unwrap_or_else(|| sibling_binary("virtiofsd"))
    }
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_the_default_file_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShimConfig::load(&dir.path().join("none.toml"), false).unwrap();
        assert_eq!(cfg, ShimConfig::default());
        let e = ShimConfig::load(&dir.path().join("none.toml"), true).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
    }

    #[test]
    fn file_keys_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "kernel = \"/k\"\nvcpus = 2\nmemory_mib = 512\n").unwrap();
        let cfg = ShimConfig::load(&p, true).unwrap();
        assert_eq!(
            (cfg.kernel.as_path(), cfg.vcpus, cfg.memory_mib),
            (Path::new("/k"), 2, 512)
        );
        for (bad, needle) in [
            ("vcpu = 2", "unknown field"),
            ("vcpus = 0", "vcpus"),
            ("memory_mib = 1", "memory_mib"),
            ("kernel = \"rel/k\"", "absolute"),
            ("rootfs = \"r.erofs\"", "absolute"),
            ("rootfs = \"\"\ninitrd = \"\"", "both empty"),
            ("allowed_annotations = [\"nope\"]", "allowed_annotations"),
            ("vcpus = \"two\"", "c.toml"),
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = ShimConfig::load(&p, true).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn guest_image_prefers_the_rootfs_and_names_both_paths_when_neither_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (rootfs, initrd) = (
            dir.path().join("rootfs.erofs"),
            dir.path().join("initrd.img"),
        );
        let cfg = ShimConfig {
            rootfs: rootfs.clone(),
            initrd: initrd.clone(),
            ..ShimConfig::default()
        };
        let e = cfg.guest_image().unwrap_err().to_string();
        assert!(
            e.contains(rootfs.to_str().unwrap()) && e.contains(initrd.to_str().unwrap()),
            "{e}"
        );
        std::fs::write(&initrd, b"cpio").unwrap();
        assert_eq!(
            cfg.guest_image().unwrap(),
            GuestImage::Initrd(initrd.clone())
        );
        std::fs::write(&rootfs, b"erofs").unwrap();
        let image = cfg.guest_image().unwrap();
        assert_eq!(image, GuestImage::Rootfs(rootfs.clone()));
        assert_eq!(
            (image.vmm_flag(), image.path()),
            ("--rootfs", rootfs.as_path())
        );
        // An empty rootfs turns the disk off even when the file exists.
        let initrd_only = ShimConfig {
            rootfs: PathBuf::new(),
            ..cfg.clone()
        };
        let image = initrd_only.guest_image().unwrap();
        assert_eq!(
            (image.vmm_flag(), image.path()),
            ("--initrd", initrd.as_path())
        );
        // A directory is not an image.
        let not_files = ShimConfig {
            rootfs: dir.path().into(),
            initrd: PathBuf::new(),
            ..cfg
        };
        assert!(matches!(
            not_files.guest_image(),
            Err(ConfigError::NoGuestImage { .. })
        ));
    }

    #[test]
    fn annotations_override_only_allowed_keys() {
        let base = ShimConfig::default();
        let cfg = base
            .with_annotations(&ann(&[
                ("io.husk.config.vcpus", "2"),
                ("io.husk.config.memory_mib", "1024"),
                ("io.kubernetes.cri.container-type", "sandbox"),
            ]))
            .unwrap();
        assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 1024));
        for (k, v, needle) in [
            ("io.husk.config.kernel", "/evil", "not allowed"),
            ("io.husk.config.rootfs", "/evil.erofs", "not allowed"),
            ("io.husk.config.cpus", "2", "unknown key"),
            ("io.husk.config.vcpus", "lots", "not a number"),
            ("io.husk.config.vcpus", "999", "vcpus"),
            ("io.husk.config.debug_console", "true", "not allowed"),
        ] {
            let e = base
                .with_annotations(&ann(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
        let mut open = base.clone();
        open.allowed_annotations.push("kernel".into());
        open.allowed_annotations.push("debug_console".into());
        assert!(open
            .with_annotations(&ann(&[("io.husk.config.debug_console", "yes")]))
            .unwrap_err()
            .to_string()
            .contains("true or false"));
        let cfg = open
            .with_annotations(&ann(&[("io.husk.config.kernel", "/boot/k")]))
            .unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/boot/k"));
        assert!(open
            .with_annotations(&ann(&[("io.husk.config.kernel", "k")]))
            .is_err());
    }
}
