//! Validation of `MountStorage` / `UnmountStorage` requests, shared by the
//! agent (which must refuse bad requests whoever sends them) and the host
//! client (which refuses them before sending, so the caller gets the same
//! field-named error without a round trip). Pure string checks, no I/O.

use std::fmt;

/// Every storage target lives strictly below this guest directory.
pub const STORAGE_ROOT: &str = "/run/husk";
/// Longest target or bind source path.
pub const MAX_STORAGE_PATH_LEN: usize = 4096;
/// Longest path component.
const MAX_COMPONENT_LEN: usize = 255;
/// Most entries in `MountStorageRequest.options`.
pub const MAX_MOUNT_OPTIONS: usize = 32;
/// Longest single mount option.
const MAX_OPTION_LEN: usize = 64;
/// A virtio-fs tag is at most 36 bytes (the device's config space field).
pub const MAX_VIRTIOFS_TAG_LEN: usize = 36;
/// A virtio-blk serial (VIRTIO_BLK_ID_BYTES) is at most 20 bytes.
pub const MAX_BLOCK_SERIAL_LEN: usize = 20;
/// Prefix of a block device given by its virtio-blk serial.
pub const SERIAL_PREFIX: &str = "serial:";

/// A refused request: the field (`source`, `options[2]`, ...) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageError {
    /// The offending request field.
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for StorageError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> StorageError {
    StorageError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The file systems `MountStorage` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// virtio-fs share, by tag.
    Virtiofs,
    /// Fresh tmpfs.
    Tmpfs,
    /// Block device file systems.
    Ext4,
    /// Read-only by nature (the kernel refuses rw mounts).
    Erofs,
    /// Block device file system.
    Xfs,
    /// Bind mount of a guest path.
    Bind,
}

impl FsType {
    /// Parses the request's `fstype`.
    pub fn parse(s: &str) -> Option<FsType> {
        Some(match s {
            "virtiofs" => FsType::Virtiofs,
            "tmpfs" => FsType::Tmpfs,
            "ext4" => FsType::Ext4,
            "erofs" => FsType::Erofs,
            "xfs" => FsType::Xfs,
            "bind" => FsType::Bind,
            _ => return None,
        })
    }

    /// The name as in the request (and, except `bind`, for mount(2)).
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Virtiofs => "virtiofs",
            FsType::Tmpfs => "tmpfs",
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
            FsType::Xfs => "xfs",
            FsType::Bind => "bind",
        }
    }

    /// Whether the source is a block device.
    pub fn is_block(self) -> bool {
        matches!(self, FsType::Ext4 | FsType::Erofs | FsType::Xfs)
    }
}

/// Where the file system comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSource {
    /// virtio-fs tag.
    Tag(String),
    /// tmpfs needs no source.
    None,
    /// `/dev/vdX`.
    BlockPath(String),
    /// A virtio-blk serial (without the `serial:` prefix).
    BlockSerial(String),
    /// Guest path for a bind mount.
    Path(String),
}

/// Access-time policy among the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Atime {
    /// `relatime`.
    Relative,
    /// `noatime`.
    Never,
}

/// Parsed mount options: flags for mount(2) plus tmpfs data options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `ro` or the request's `readonly`.
    pub readonly: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `nodev`.
    pub nodev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// `relatime` / `noatime`.
    pub atime: Option<Atime>,
    /// tmpfs options passed as mount data (`size=64m`, `mode=755`), in order.
    pub data: Vec<String>,
}

/// A validated `MountStorageRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// File system type.
    pub fstype: FsType,
    /// Parsed source.
    pub source: StorageSource,
    /// Target (checked by [`validate_target`]).
    pub target: String,
    /// Parsed options.
    pub options: MountOptions,
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// Checks an absolute, normalised path: starts with `/`, no empty, `.` or
/// `..` components, no trailing slash (except the root itself), no NUL or
/// control characters, bounded length.
fn check_abs_path(s: &str, field: &str) -> Result<(), StorageError> {
    if s.is_empty() {
        return Err(err(field, "empty"));
    }
    if s.len() > MAX_STORAGE_PATH_LEN {
        return Err(err(
            field,
            format!("{} bytes, limit {MAX_STORAGE_PATH_LEN}", s.len()),
        ));
    }
    if has_control(s) {
        return Err(err(field, "contains NUL or control characters"));
    }
    let Some(rest) = s.strip_prefix('/') else {
        return Err(err(field, "must be an absolute path"));
    };
    if rest.is_empty() {
        return Ok(());
    }
    for c in rest.split('/') {
        match c {
            "" => return Err(err(field, "empty path component (// or a trailing /)")),
            "." | ".." => return Err(err(field, "must not contain . or .. components")),
            c if c.len() > MAX_COMPONENT_LEN => {
                return Err(err(
                    field,
                    format!("a component is longer than {MAX_COMPONENT_LEN} bytes"),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a `MountStorage` / `UnmountStorage` target: an absolute,
/// normalised path strictly below [`STORAGE_ROOT`].
pub fn validate_target(target: &str) -> Result<(), StorageError> {
    check_abs_path(target, "target")?;
    match target
        .strip_prefix(STORAGE_ROOT)
        .and_then(|r| r.strip_prefix('/'))
    {
        // The agent's own network files live there; a mount on top would hide them from containers.
        Some(r) if r == "network" || r.starts_with("network/") => Err(err(
            "target",
            format!(
                "{} is reserved for SetupNetwork",
                crate::network::NETWORK_FILES_DIR
            ),
        )),
        Some(r) if !r.is_empty() => Ok(()),
        _ => Err(err(
            "target",
            format!("must be a path below {STORAGE_ROOT}/"),
        )),
    }
}

/// Whether `s` looks like a virtio-blk device node: `/dev/vd` + 1..=3
/// lowercase letters + an optional partition number.
fn is_vd_path(s: &str) -> bool {
    let Some(name) = s.strip_prefix("/dev/vd") else {
        return false;
    };
    let letters = name.bytes().take_while(u8::is_ascii_lowercase).count();
    let digits = &name[letters..];
    (1..=3).contains(&letters) && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_source(fstype: FsType, source: &str) -> Result<StorageSource, StorageError> {
    match fstype {
        FsType::Virtiofs => {
            if source.is_empty() || source.len() > MAX_VIRTIOFS_TAG_LEN || has_control(source) {
                return Err(err(
                    "source",
                    format!(
                        "a virtio-fs tag is 1..={MAX_VIRTIOFS_TAG_LEN} bytes without control characters"
                    ),
                ));
            }
            Ok(StorageSource::Tag(source.to_string()))
        }
        FsType::Tmpfs => {
            if source.len() > 64 || has_control(source) {
                return Err(err(
                    "source",
                    "for tmpfs: at most 64 bytes, no control characters",
                ));
            }
            Ok(StorageSource::None)
        }
        FsType::Ext4 | FsType::Erofs | FsType::Xfs => {
            if let Some(serial) = source.strip_prefix(SERIAL_PREFIX) {
                let ok = !serial.is_empty()
                    && serial.len() <= MAX_BLOCK_SERIAL_LEN
                    && serial
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                if !ok {
                    return Err(err(
                        "source",
                        format!(
                            "a virtio-blk serial is 1..={MAX_BLOCK_SERIAL_LEN} of [A-Za-z0-9_.-]"
                        ),
                    ));
                }
                return Ok(StorageSource::BlockSerial(serial.to_string()));
            }
            if is_vd_path(source) {
                return Ok(StorageSource::BlockPath(source.to_string()));
            }
            Err(err(
                "source",
                format!(
                    "{:?} is neither /dev/vdX nor {SERIAL_PREFIX}ID",
                    source.chars().take(80).collect::<String>()
                ),
            ))
        }
        FsType::Bind => {
            check_abs_path(source, "source")?;
            Ok(StorageSource::Path(source.to_string()))
        }
    }
}

/// `N` with an optional suffix from `suffixes`; at most 20 digits.
fn is_size(v: &str, suffixes: &[u8]) -> bool {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let rest = &v.as_bytes()[digits..];
    (1..=20).contains(&digits)
        && (rest.is_empty() || (rest.len() == 1 && suffixes.contains(&rest[0])))
}

fn parse_options(
    fstype: FsType,
    options: &[String],
    readonly: bool,
) -> Result<MountOptions, StorageError> {
    if options.len() > MAX_MOUNT_OPTIONS {
        return Err(err(
            "options",
            format!("{} entries, limit {MAX_MOUNT_OPTIONS}", options.len()),
        ));
    }
    let mut o = MountOptions {
        readonly,
        ..MountOptions::default()
    };
    let mut rw = false;
    for (i, opt) in options.iter().enumerate() {
        let field = format!("options[{i}]");
        if opt.len() > MAX_OPTION_LEN || has_control(opt) {
            return Err(err(
                field,
                format!("longer than {MAX_OPTION_LEN} bytes or has control characters"),
            ));
        }
        let shown = opt.as_str();
        match opt.as_str() {
            "ro" => o.readonly = true,
            "rw" => rw = true,
            "nosuid" => o.nosuid = true,
            "nodev" => o.nodev = true,
            "noexec" => o.noexec = true,
            "relatime" => o.atime = Some(Atime::Relative),
            "noatime" => o.atime = Some(Atime::Never),
            _ => {
                let Some((k, v)) = opt.split_once('=') else {
                    return Err(err(field, format!("unknown mount option {shown:?}")));
                };
                let ok = match k {
                    "size" => is_size(v, b"kKmMgG%"),
                    "nr_inodes" => is_size(v, b"kKmMgG"),
                    "mode" => {
                        (1..=4).contains(&v.len()) && v.bytes().all(|b| (b'0'..=b'7').contains(&b))
                    }
                    "uid" | "gid" => v.len() <= 10 && v.parse::<u32>().is_ok(),
                    _ => return Err(err(field, format!("unknown mount option {shown:?}"))),
                };
                if fstype != FsType::Tmpfs {
                    return Err(err(
                        field,
                        format!("mount option {shown:?} applies to tmpfs only"),
                    ));
                }
                if !ok {
                    return Err(err(field, format!("bad value in mount option {shown:?}")));
                }
                o.data.push(opt.clone());
            }
        }
    }
    if rw && o.readonly {
        return Err(err("options", "rw contradicts ro / readonly"));
    }
    Ok(o)
}

/// Validates a whole `MountStorageRequest`.
pub fn validate_mount(
    fstype: &str,
    source: &str,
    target: &str,
    options: &[String],
    readonly: bool,
) -> Result<MountSpec, StorageError> {
    let fs = FsType::parse(fstype).ok_or_else(|| {
        err(
            "fstype",
            format!(
                "{:?} is not one of virtiofs, tmpfs, ext4, erofs, xfs, bind",
                fstype.chars().take(40).collect::<String>()
            ),
        )
    })?;
    let source = parse_source(fs, source)?;
    validate_target(target)?;
    let options = parse_options(fs, options, readonly)?;
    Ok(MountSpec {
        fstype: fs,
        source,
        target: target.to_string(),
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(
        fstype: &str,
        source: &str,
        target: &str,
        opts: &[&str],
    ) -> Result<MountSpec, StorageError> {
        let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        validate_mount(fstype, source, target, &opts, false)
    }

    #[test]
    fn good_requests() {
        let m = v("virtiofs", "pod-share", "/run/husk/shared", &["nodev"]).unwrap();
        assert_eq!(m.source, StorageSource::Tag("pod-share".into()));
        assert!(m.options.nodev && !m.options.readonly);
        let m = v(
            "tmpfs",
            "",
            "/run/husk/t/1",
            &["size=64m", "mode=1777", "nosuid", "ro"],
        )
        .unwrap();
        assert_eq!(m.options.data, ["size=64m", "mode=1777"]);
        assert!(m.options.readonly && m.options.nosuid);
        assert_eq!(
            v("ext4", "/dev/vdb", "/run/husk/b", &[]).unwrap().source,
            StorageSource::BlockPath("/dev/vdb".into())
        );
        assert_eq!(
            v("erofs", "serial:img-1", "/run/husk/b", &["ro"])
                .unwrap()
                .source,
            StorageSource::BlockSerial("img-1".into())
        );
        assert!(v("xfs", "/dev/vdaa1", "/run/husk/x", &["noatime"]).is_ok());
        assert_eq!(
            v("bind", "/run/husk/shared/c1", "/run/husk/c1", &["ro"])
                .unwrap()
                .source,
            StorageSource::Path("/run/husk/shared/c1".into())
        );
        assert!(
            validate_mount("tmpfs", "", "/run/husk/t", &[], true)
                .unwrap()
                .options
                .readonly
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let field = |r: Result<MountSpec, StorageError>| r.unwrap_err().field;
        assert_eq!(field(v("nfs", "x", "/run/husk/a", &[])), "fstype");
        assert_eq!(field(v("", "x", "/run/husk/a", &[])), "fstype");
        for t in [
            "",
            "run/husk/a",
            "/run/husk",
            "/run/husk/",
            "/run/huskx/a",
            "/run/husk/../etc",
            "/run/husk/a/../../etc",
            "/run/husk/network",
            "/run/husk/network/x",
            "/run/husk/./a",
            "/run/husk//a",
            "/run/husk/a/",
            "/run/husk/a\0b",
            "/run/husk/a\nb",
            "/tmp/a",
        ] {
            assert_eq!(field(v("tmpfs", "", t, &[])), "target", "{t:?}");
        }
        let long = format!("/run/husk/{}", "a/".repeat(2100));
        assert_eq!(
            field(v("tmpfs", "", long.trim_end_matches('/'), &[])),
            "target"
        );
        for s in ["", &"t".repeat(37), "a\0"] {
            assert_eq!(
                field(v("virtiofs", s, "/run/husk/a", &[])),
                "source",
                "{s:?}"
            );
        }
        for s in [
            "",
            "/dev/sda",
            "/dev/vd",
            "/dev/vdA",
            "/dev/vda/../sda",
            "vda",
            "serial:",
            "serial:a/b",
            &format!("serial:{}", "x".repeat(21)),
        ] {
            assert_eq!(field(v("ext4", s, "/run/husk/a", &[])), "source", "{s:?}");
        }
        for s in ["", "rel/path", "/a/../b", "/a//b"] {
            assert_eq!(field(v("bind", s, "/run/husk/a", &[])), "source", "{s:?}");
        }
    }

    #[test]
    fn options_are_checked_one_by_one() {
        let e = v("tmpfs", "", "/run/husk/a", &["nodev", "suid"]).unwrap_err();
        assert_eq!(e.field, "options[1]");
        assert!(
            e.to_string().contains("unknown mount option \"suid\""),
            "{e}"
        );
        let e = v("tmpfs", "", "/run/husk/a", &["exec=1"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown mount option \"exec=1\""),
            "{e}"
        );
        let e = v("ext4", "/dev/vdb", "/run/husk/a", &["size=1m"]).unwrap_err();
        assert!(e.to_string().contains("tmpfs only"), "{e}");
        for bad in [
            "size=",
            "size=1t",
            "size=m",
            "mode=8",
            "mode=12345",
            "uid=-1",
            "uid=x",
            "nr_inodes=1%",
        ] {
            let e = v("tmpfs", "", "/run/husk/a", &[bad]).unwrap_err();
            assert_eq!(e.field, "options[0]", "{bad}");
        }
        assert_eq!(
            v("tmpfs", "", "/run/husk/a", &["ro", "rw"])
                .unwrap_err()
                .field,
            "options"
        );
        let many = vec!["nodev"; MAX_MOUNT_OPTIONS + 1];
        assert_eq!(
            v("tmpfs", "", "/run/husk/a", &many).unwrap_err().field,
            "options"
        );
    }
}
