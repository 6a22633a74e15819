//! The container's file system view: spec mounts, /dev, pivot_root,
//! masked and read-only paths, sysctls.
//!
//! The parent resolves every mount destination inside the rootfs
//! ([`secure_join`]: symlinks are followed as if the rootfs were `/`, so an
//! image cannot point a mount outside of it) and builds a [`RootfsPlan`] of
//! C strings. The child then only makes system calls, without allocating.
//!
//! `pivot_root(2)` is refused when the current root is the initramfs
//! (`rootfs`), as it is for the agent in the guest; the child then falls back
//! to `MS_MOVE` + `chroot` (what runc calls `--no-pivot`).

use std::ffi::CString;

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::process::{Fail, Step};
use super::EngineError;

/// Resolves `path` (container-absolute) inside `root`, following symlinks
/// as if `root` were `/` (never leaving it), up to 40 links. Components that
/// do not exist yet are appended as they are.
pub fn secure_join(root: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let mut todo: Vec<PathBuf> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    let mut cur: Vec<PathBuf> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        let mut full = root.to_path_buf();
        full.extend(&cur);
        full.push(&c);
        match std::fs::symlink_metadata(&full) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&full)?;
                if target.is_absolute() {
                    cur.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(n) => todo.push(PathBuf::from(n)),
                        Component::ParentDir => todo.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            _ => cur.push(c),
        }
    }
    let mut full = root.to_path_buf();
    full.extend(&cur);
    Ok(full)
}

/// One mount, ready for the child.
#[derive(Debug)]
pub(crate) struct MountOp {
    pub label: u32,
    pub source: Option<CString>,
    pub target: CString,
    /// Directories to create first, outermost first.
    pub mkdirs: Vec<CString>,
    /// Create the target as an empty file (bind mount of a file).
    pub file_target: bool,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// A bind mount whose flags need a remount (ro, nosuid, ...).
    pub bind_remount: bool,
    /// MS_PRIVATE / MS_SLAVE / MS_SHARED / MS_UNBINDABLE (| MS_REC), or 0.
    pub propagation: libc::c_ulong,
    /// Guest path to bind-mount (recursively, then remount with the flags)
    /// if the kernel refuses the mount with EPERM: sysfs and cgroup2 in a
    /// user namespace that does not own the network / cgroup namespace, as
    /// runc does.
    pub fallback_bind: Option<CString>,
}

/// A device node to create under the rootfs.
#[derive(Debug)]
pub(crate) struct DeviceOp {
    pub label: u32,
    pub path: CString,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
    pub uid: u32,
    pub gid: u32,
    /// Host device to bind-mount if mknod is refused.
    pub host: Option<CString>,
}

/// Everything the child does to the file system, in order.
#[derive(Debug, Default)]
pub(crate) struct RootfsPlan {
    pub rootfs: CString,
    pub propagation: libc::c_ulong,
    pub mounts: Vec<MountOp>,
    pub devices: Vec<DeviceOp>,
    pub dev_links: Vec<(CString, CString)>,
    pub sysctls: Vec<(u32, CString, Vec<u8>)>,
    pub masked: Vec<(u32, CString)>,
    pub readonly: Vec<(u32, CString)>,
    pub root_readonly: bool,
    /// Human-readable labels for error messages, indexed by `label`.
    pub labels: Vec<String>,
}

pub(crate) fn cstr(b: &[u8], field: &str) -> Result<CString, EngineError> {
    CString::new(b).map_err(|_| EngineError::invalid(field, "contains a NUL byte"))
}

fn cpath(p: &Path, field: &str) -> Result<CString, EngineError> {
    cstr(p.as_os_str().as_bytes(), field)
}

/// Parsed mount options.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct MountOptions {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub bind: bool,
    pub data: Vec<String>,
}

/// Splits OCI mount options into flags, propagation and fs data.
pub(crate) fn parse_options(opts: &[String]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in opts {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match opt.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "remount" => (libc::MS_REMOUNT, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "atime" => (0, libc::MS_NOATIME),
            "noatime" => (libc::MS_NOATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "bind" => {
                o.bind = true;
                (libc::MS_BIND, 0)
            }
            "rbind" => {
                o.bind = true;
                (libc::MS_BIND | libc::MS_REC, 0)
            }
            "private" => {
                o.propagation = libc::MS_PRIVATE;
                (0, 0)
            }
            "rprivate" => {
                o.propagation = libc::MS_PRIVATE | libc::MS_REC;
                (0, 0)
            }
            "shared" => {
                o.propagation = libc::MS_SHARED;
                (0, 0)
            }
            "rshared" => {
                o.propagation = libc::MS_SHARED | libc::MS_REC;
                (0, 0)
            }
            "slave" => {
                o.propagation = libc::MS_SLAVE;
                (0, 0)
            }
            "rslave" => {
                o.propagation = libc::MS_SLAVE | libc::MS_REC;
                (0, 0)
            }
            "unbindable" => {
                o.propagation = libc::MS_UNBINDABLE;
                (0, 0)
            }
            "runbindable" => {
                o.propagation = libc::MS_UNBINDABLE | libc::MS_REC;
                (0, 0)
            }
            other => {
                o.data.push(other.to_string());
                (0, 0)
            }
        };
        o.flags = (o.flags | set) & !clear;
    }
    o
}

/// Default device nodes every container gets when the spec mounts `/dev`:
/// (name, char major, minor).
const DEFAULT_DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Builds the plan for `spec` with its root at `rootfs`.
pub(crate) fn plan(
    spec: &oci_spec::runtime::Spec,
    rootfs: &Path,
) -> Result<RootfsPlan, EngineError> {
    let mut p = RootfsPlan {
        rootfs: cpath(rootfs, "rootfs_path")?,
        propagation: libc::MS_PRIVATE | libc::MS_REC,
        root_readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        ..RootfsPlan::default()
    };
    let linux = spec.linux().as_ref();
    if let Some(prop) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        let o = parse_options(&[prop.to_string()]);
        if o.propagation == 0 {
            return Err(EngineError::invalid(
                "linux.rootfsPropagation",
                format!("{prop:?} is not a propagation mode"),
            ));
        }
        p.propagation = o.propagation;
    }
    let label = |p: &mut RootfsPlan, s: String| {
        p.labels.push(s);
        (p.labels.len() - 1) as u32
    };
    let mut has_dev = false;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let field = format!("mounts[{i}]");
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(EngineError::invalid(
                format!("{field}.destination"),
                "must be absolute",
            ));
        }
        let target = secure_join(rootfs, dest)
            .map_err(|e| EngineError::invalid(format!("{field}.destination"), e.to_string()))?;
        if !target.starts_with(rootfs) || target == rootfs {
            return Err(EngineError::invalid(
                format!("{field}.destination"),
                "resolves to the rootfs itself",
            ));
        }
        let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
        let mut fstype = m.typ().clone().unwrap_or_default();
        if fstype == "bind" {
            fstype.clear();
        }
        let bind = opts.bind || fstype.is_empty();
        if bind && !opts.bind {
            return Err(EngineError::invalid(
                format!("{field}.options"),
                "a mount without a type needs bind or rbind",
            ));
        }
        // A v1 `cgroup` mount means "the container's cgroups": cgroup v2 here.
        if fstype == "cgroup" {
            fstype = "cgroup2".into();
        }
        let source = match m.source() {
            Some(s) => Some(cpath(s, &format!("{field}.source"))?),
            None if bind => {
                return Err(EngineError::invalid(
                    format!("{field}.source"),
                    "required for a bind mount",
                ))
            }
            None => Some(cstr(fstype.as_bytes(), &format!("{field}.type"))?),
        };
        let mut file_target = false;
        if bind {
            let src = m
                .source()
                .as_ref()
                .map(PathBuf::as_path)
                .unwrap_or(Path::new(""));
            let md = std::fs::metadata(src).map_err(|e| {
                EngineError::invalid(format!("{field}.source"), format!("{}: {e}", src.display()))
            })?;
            file_target = !md.is_dir();
        }
        // Directories to create: every ancestor below the rootfs, and the
        // target itself unless it is a file.
        let mut mkdirs = Vec::new();
        let rel = target.strip_prefix(rootfs).unwrap_or(&target);
        let mut cur = rootfs.to_path_buf();
        let comps: Vec<_> = rel.components().collect();
        for (j, c) in comps.iter().enumerate() {
            cur.push(c);
            if j + 1 < comps.len() || !file_target {
                mkdirs.push(cpath(&cur, &format!("{field}.destination"))?);
            }
        }
        has_dev |= dest == Path::new("/dev");
        let data = opts.data.join(",");
        let l = label(&mut p, format!("{field} ({})", dest.display()));
        p.mounts.push(MountOp {
            label: l,
            source,
            target: cpath(&target, &format!("{field}.destination"))?,
            mkdirs,
            file_target,
            fstype: (!bind)
                .then(|| cstr(fstype.as_bytes(), &format!("{field}.type")))
                .transpose()?,
            flags: opts.flags,
            data: (!data.is_empty())
                .then(|| cstr(data.as_bytes(), &format!("{field}.options")))
                .transpose()?,
            bind_remount: bind && opts.flags & !(libc::MS_BIND | libc::MS_REC) != 0,
            propagation: opts.propagation,
            fallback_bind: match (bind, fstype.as_str()) {
                (false, "sysfs") => Some(c"/sys".to_owned()),
                (false, "cgroup2") => Some(c"/sys/fs/cgroup".to_owned()),
                _ => None,
            },
        });
    }
    let dev_dir = rootfs.join("dev");
    if has_dev {
        for (name, maj, min) in DEFAULT_DEVICES {
            let l = label(&mut p, format!("device /dev/{name}"));
            p.devices.push(DeviceOp {
                label: l,
                path: cpath(&dev_dir.join(name), "devices")?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(*maj, *min),
                uid: 0,
                gid: 0,
                host: Some(cpath(&Path::new("/dev").join(name), "devices")?),
            });
        }
        for (target, name) in DEV_LINKS {
            p.dev_links.push((
                cstr(target.as_bytes(), "devices")?,
                cpath(&dev_dir.join(name), "devices")?,
            ));
        }
    }
    for (i, d) in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("linux.devices[{i}]");
        let path = d.path();
        if !path.starts_with("/dev/") {
            return Err(EngineError::invalid(
                format!("{field}.path"),
                "must be under /dev",
            ));
        }
        let kind = match d.typ() {
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => {
                libc::S_IFCHR
            }
            oci_spec::runtime::LinuxDeviceType::B => libc::S_IFBLK,
            oci_spec::runtime::LinuxDeviceType::P => libc::S_IFIFO,
            _ => {
                return Err(EngineError::invalid(
                    format!("{field}.type"),
                    "must be c, u, b or p",
                ))
            }
        };
        let (maj, min) = (u32::try_from(d.major()), u32::try_from(d.minor()));
        let (Ok(maj), Ok(min)) = (maj, min) else {
            return Err(EngineError::invalid(
                format!("{field}.major"),
                "out of range",
            ));
        };
        let target = secure_join(rootfs, path)
            .map_err(|e| EngineError::invalid(format!("{field}.path"), e.to_string()))?;
        let l = label(&mut p, format!("{field} ({})", path.display()));
        p.devices.push(DeviceOp {
            label: l,
            path: cpath(&target, &field)?,
            mode: kind | (d.file_mode().unwrap_or(0o666) & 0o7777),
            dev: libc::makedev(maj, min),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
            host: None,
        });
    }
    for (k, v) in linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let field = format!("linux.sysctl[{k:?}]");
        let ok = !k.is_empty()
            && !k.starts_with('.')
            && !k.contains("..")
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !ok || v.contains('\n') {
            return Err(EngineError::invalid(field, "bad key or value"));
        }
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        let l = label(&mut p, field.clone());
        p.sysctls
            .push((l, cstr(path.as_bytes(), &field)?, v.as_bytes().to_vec()));
    }
    for (i, m) in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("linux.maskedPaths[{i}]");
        if !m.starts_with('/') {
            return Err(EngineError::invalid(field, "must be absolute"));
        }
        let l = label(&mut p, format!("{field} ({m})"));
        p.masked.push((l, cstr(m.as_bytes(), &field)?));
    }
    for (i, m) in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("linux.readonlyPaths[{i}]");
        if !m.starts_with('/') {
            return Err(EngineError::invalid(field, "must be absolute"));
        }
        let l = label(&mut p, format!("{field} ({m})"));
        p.readonly.push((l, cstr(m.as_bytes(), &field)?));
    }
    Ok(p)
}

// ---- child side: no allocation below this line ----

fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

fn chk(r: libc::c_int, step: Step, item: u32) -> Result<(), Fail> {
    if r < 0 {
        return Err(Fail {
            step,
            item,
            errno: errno(),
        });
    }
    Ok(())
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Mount flags of the mount at `path` that a bind remount must keep.
fn locked_flags(path: &std::ffi::CStr) -> libc::c_ulong {
    // SAFETY: statvfs into a zeroed struct with a valid C path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut f = 0;
    for (st_flag, ms) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            f |= ms;
        }
    }
    f
}

/// Child: performs the whole plan and changes the root. Leaves the cwd at `/`.
pub(crate) fn apply(p: &RootfsPlan) -> Result<(), Fail> {
    // SAFETY (whole function): raw syscalls on C strings owned by the plan.
    unsafe {
        chk(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                p.propagation,
                std::ptr::null(),
            ),
            Step::RootPropagation,
            0,
        )?;
        chk(
            libc::mount(
                p.rootfs.as_ptr(),
                p.rootfs.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            Step::BindRootfs,
            0,
        )?;
        for m in &p.mounts {
            for d in &m.mkdirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                    return Err(Fail {
                        step: Step::Mkdir,
                        item: m.label,
                        errno: errno(),
                    });
                }
            }
            if m.file_target {
                let fd = libc::open(
                    m.target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 && errno() != libc::EISDIR {
                    return Err(Fail {
                        step: Step::Mkdir,
                        item: m.label,
                        errno: errno(),
                    });
                }
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            let first_flags = if m.fstype.is_none() {
                m.flags & (libc::MS_BIND | libc::MS_REC)
            } else {
                m.flags
            };
            let r = libc::mount(
                opt_ptr(&m.source),
                m.target.as_ptr(),
                opt_ptr(&m.fstype),
                first_flags,
                m.data
                    .as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            );
            match &m.fallback_bind {
                Some(host) if r != 0 && errno() == libc::EPERM => {
                    chk(
                        libc::mount(
                            host.as_ptr(),
                            m.target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ),
                        Step::Mount,
                        m.label,
                    )?;
                    let keep = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                    chk(
                        libc::mount(
                            std::ptr::null(),
                            m.target.as_ptr(),
                            std::ptr::null(),
                            (m.flags & keep)
                                | libc::MS_REMOUNT
                                | libc::MS_BIND
                                | locked_flags(&m.target),
                            std::ptr::null(),
                        ),
                        Step::Remount,
                        m.label,
                    )?;
                }
                _ => chk(r, Step::Mount, m.label)?,
            }
            if m.bind_remount {
                let flags = (m.flags & !libc::MS_REC)
                    | libc::MS_REMOUNT
                    | libc::MS_BIND
                    | locked_flags(&m.target);
                chk(
                    libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ),
                    Step::Remount,
                    m.label,
                )?;
            }
            if m.propagation != 0 {
                chk(
                    libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        m.propagation,
                        std::ptr::null(),
                    ),
                    Step::MountPropagation,
                    m.label,
                )?;
            }
        }
        for d in &p.devices {
            if libc::mknod(d.path.as_ptr(), d.mode, d.dev) != 0 {
                let e = errno();
                match &d.host {
                    Some(host) if e == libc::EPERM => {
                        let fd = libc::open(
                            d.path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        if fd >= 0 {
                            libc::close(fd);
                        }
                        chk(
                            libc::mount(
                                host.as_ptr(),
                                d.path.as_ptr(),
                                std::ptr::null(),
                                libc::MS_BIND,
                                std::ptr::null(),
                            ),
                            Step::Mknod,
                            d.label,
                        )?;
                    }
                    _ if e == libc::EEXIST => {}
                    _ => {
                        return Err(Fail {
                            step: Step::Mknod,
                            item: d.label,
                            errno: e,
                        })
                    }
                }
                continue;
            }
            // mknod applies the umask: set the exact mode, then the owner.
            chk(
                libc::chmod(d.path.as_ptr(), d.mode & 0o7777),
                Step::Mknod,
                d.label,
            )?;
            chk(
                libc::chown(d.path.as_ptr(), d.uid, d.gid),
                Step::Mknod,
                d.label,
            )?;
        }
        for (target, link) in &p.dev_links {
            if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 && errno() != libc::EEXIST {
                return Err(Fail {
                    step: Step::Symlink,
                    item: 0,
                    errno: errno(),
                });
            }
        }
        chk(libc::chdir(p.rootfs.as_ptr()), Step::PivotRoot, 0)?;
        // pivot_root(".", "."): the old root ends up stacked on the new one
        // and is then detached.
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
            chk(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                Step::PivotRoot,
                1,
            )?;
        } else if errno() == libc::EINVAL {
            // The current root is the initramfs: move the rootfs over `/`.
            chk(
                libc::mount(
                    c".".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                ),
                Step::PivotRoot,
                2,
            )?;
            chk(libc::chroot(c".".as_ptr()), Step::PivotRoot, 3)?;
        } else {
            return Err(Fail {
                step: Step::PivotRoot,
                item: 0,
                errno: errno(),
            });
        }
        chk(libc::chdir(c"/".as_ptr()), Step::PivotRoot, 4)?;

        for (label, path, value) in &p.sysctls {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            chk(fd, Step::Sysctl, *label)?;
            let n = libc::write(fd, value.as_ptr().cast(), value.len());
            let e = errno();
            libc::close(fd);
            if n < 0 {
                return Err(Fail {
                    step: Step::Sysctl,
                    item: *label,
                    errno: e,
                });
            }
        }
        for (label, path) in &p.masked {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(path.as_ptr(), &mut st) != 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                return Err(Fail {
                    step: Step::Mask,
                    item: *label,
                    errno: errno(),
                });
            }
            let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                )
            } else {
                libc::mount(
                    c"/dev/null".as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            chk(r, Step::Mask, *label)?;
        }
        for (label, path) in &p.readonly {
            if libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                if errno() == libc::ENOENT {
                    continue;
                }
                return Err(Fail {
                    step: Step::ReadonlyPath,
                    item: *label,
                    errno: errno(),
                });
            }
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(path);
            chk(
                libc::mount(
                    std::ptr::null(),
                    path.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ),
                Step::ReadonlyPath,
                *label,
            )?;
        }
        if p.root_readonly {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(c"/");
            chk(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ),
                Step::RootReadonly,
                0,
            )?;
        }
    }
    Ok(())
}
