//! Host-side mounts the shim makes inside a pod's share: the share itself (a shared bind mount), container
//! root filesystems (containerd's rootfs mounts) and bind-mounted volumes. Every mount made here is undone by
//! [`unmount_tree`] when the container or the pod goes away.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("rootfs mount {index}: {reason}")]
    Rootfs { index: usize, reason: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Io { what, path, source }
}

/// Makes `dir` a bind mount of itself with shared propagation, so that mounts made below it later also
/// appear in virtiofsd's mount namespace (a slave copy made when the daemon started).
pub fn make_shared_mountpoint(dir: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|source| {
        MountError::Mount {
            what: "the share (bind)".into(),
            target: dir.into(),
            source,
        }
    })?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        what: "the share (make shared)".into(),
        target: dir.into(),
        source,
    })
}

/// One of containerd's rootfs mounts (`CreateTaskRequest.rootfs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mounts containerd's rootfs mounts for a container on `target` (in order, like runc's shim does). With no
/// mounts, the bundle's own `rootfs` directory is bind-mounted (containerd prepared it already).
pub fn mount_rootfs(
    mounts: &[RootfsMount],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(io("creating", target))?;
    if mounts.is_empty() {
        return bind(bundle_rootfs, target, false);
    }
    for (index, m) in mounts.iter().enumerate() {
        if m.fstype.is_empty() && !m.options.iter().any(|o| o == "bind" || o == "rbind") {
            return Err(MountError::Rootfs {
                index,
                reason: "no file system type".into(),
            });
        }
        containerd_shim::mount::mount_rootfs(
            (!m.fstype.is_empty()).then_some(m.fstype.as_str()),
            Some(m.source.as_str()),
            &m.options,
            target,
        )
        .map_err(|e| MountError::Rootfs {
            index,
            reason: format!("{} {} on {}: {e}", m.fstype, m.source, target.display()),
        })?;
    }
    Ok(())
}

/// Bind-mounts a host file or directory (recursively) on `target`, read-only if asked. The target is created
/// with the source's kind.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let meta = std::fs::metadata(source).map_err(io("reading", source))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(io("creating", target))?;
    } else if std::fs::symlink_metadata(target).is_err() {
        std::fs::File::create(target).map_err(io("creating", target))?;
    }
    let what = || format!("bind of {}", source.display());
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        what: what(),
        target: target.into(),
        source,
    })?;
    if readonly {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|source| MountError::Mount {
            what: what() + " (read-only remount)",
            target: target.into(),
            source,
        })?;
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (deepest first, lazily if busy) and removes the directory tree.
/// Errors are returned after every step was tried, so that one stuck mount does not leave the rest behind.
pub fn unmount_tree(dir: &Path) -> Result<(), MountError> {
    let mut first_err = None;
    for m in mounts_below(dir) {
        // A mount stacked several times shows up once per layer; loop until it is gone.
        for _ in 0..16 {
            match umount2(&m, MntFlags::empty()) {
                Ok(()) => continue,
                Err(nix::Error::EBUSY) => {
                    let _ = umount2(&m, MntFlags::MNT_DETACH);
                    continue;
                }
                Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => break,
                Err(source) => {
                    first_err.get_or_insert(MountError::Mount {
                        what: "unmount".into(),
                        target: m.clone(),
                        source,
                    });
                    break;
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MountError::Io {
            what: "removing",
            path: dir.into(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trail\\04"), "/trail\\04");
    }

    #[test]
    fn bind_share_and_unmount_tree() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (mounts); run the unit tests as root");
        }
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        make_shared_mountpoint(&share).unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "y").unwrap();
        mount_rootfs(&[], &src, &share.join("c1/rootfs")).unwrap();
        bind(&file, &share.join("c1/mounts/0"), true).unwrap();
        assert_eq!(
            std::fs::read_to_string(share.join("c1/rootfs/f")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(share.join("c1/mounts/0")).unwrap(),
            "y"
        );
        assert!(std::fs::write(share.join("c1/mounts/0"), "z").is_err());
        assert_eq!(mounts_below(&share).len(), 3);
        unmount_tree(&share).unwrap();
        assert!(mounts_below(&share).is_empty());
        assert!(!share.exists());
        // The sources are untouched.
        assert_eq!(std::fs::read_to_string(src.join("f")).unwrap(), "x");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "y");
        let e = mount_rootfs(
            &[RootfsMount {
                fstype: String::new(),
                source: "/nope".into(),
                options: vec![],
            }],
            &src,
            &tmp.path().join("t"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rootfs mount 0"), "{e}");
    }
}
