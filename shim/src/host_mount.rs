//! Host-side mounts the shim makes inside a pod's share: the share itself (a shared bind mount), container
//! root filesystems (containerd's rootfs mounts) and bind-mounted volumes. Every mount made here is undone by
//! [`unmount_tree`] when the container or the pod goes away.
//!
//! The guest can write into the share, so it can plant symlinks where the shim is about to mount (say
//! `shared/<id>/mounts/0 -> /usr/sbin`). Mount targets inside the share are therefore created and opened
//! one component at a time below the share's directory, never following a symlink ([`ShareTarget`]), and
//! mounted through the opened descriptor (`/proc/self/fd/N`), so no path is resolved twice.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};

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

/// Makes `dir` a small tmpfs with shared propagation: the share's own directory. Shared, so that mounts
/// made below it later also appear in virtiofsd's mount namespace (a slave copy made when the daemon
/// started); a size-limited tmpfs, so that what the guest writes outside the containers' root filesystems
/// cannot fill the host's /run.
pub fn make_shared_mountpoint(dir: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    mount(
        Some("husk-share"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=16m,nr_inodes=16384,mode=0755"),
    )
    .map_err(|source| MountError::Mount {
        what: "the share (tmpfs)".into(),
        target: dir.into(),
        source,
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

/// A mount target inside the share, created and opened without following symlinks.
#[derive(Debug)]
pub struct ShareTarget {
    share: PathBuf,
    rel: Vec<String>,
    fd: OwnedFd,
}

fn walk_err(share: &Path, rel: &[String], source: nix::Error) -> MountError {
    MountError::Io {
        what: "creating a mount point in the share (refusing symlinks)",
        path: share.join(rel.join("/")),
        source: source.into(),
    }
}

impl ShareTarget {
    /// Creates `share/rel[0]/.../rel[n]` (the last one a directory or an empty file), each component a
    /// plain name, never following a symlink the guest may have planted.
    pub fn create(share: &Path, rel: &[&str], leaf_is_dir: bool) -> Result<Self, MountError> {
        let rel: Vec<String> = rel.iter().map(|c| c.to_string()).collect();
        let fd = Self::walk(share, &rel, Some(leaf_is_dir))?;
        Ok(Self {
            share: share.into(),
            rel,
            fd,
        })
    }

    /// Opens (or with `create`, makes) each component below `share` with O_NOFOLLOW.
    fn walk(share: &Path, rel: &[String], create: Option<bool>) -> Result<OwnedFd, MountError> {
        let bad = |c: &String| c.is_empty() || c == "." || c == ".." || c.contains('/');
        if rel.is_empty() || rel.iter().any(bad) {
            return Err(walk_err(share, rel, nix::Error::EINVAL));
        }
        let mut dir = open(
            share,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| walk_err(share, rel, e))?;
        for (i, name) in rel.iter().enumerate() {
            let last = i + 1 == rel.len();
            let as_dir = !last || create.unwrap_or(true);
            if create.is_some() {
                let made = if as_dir {
                    mkdirat(dir.as_fd(), name.as_str(), Mode::from_bits_truncate(0o755))
                } else {
                    openat(
                        dir.as_fd(),
                        name.as_str(),
                        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map(drop)
                };
                match made {
                    Ok(()) | Err(nix::Error::EEXIST) => {}
                    Err(e) => return Err(walk_err(share, rel, e)),
                }
            }
            let mut flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            if as_dir && (!last || create.is_some()) {
                flags |= OFlag::O_DIRECTORY;
            }
            let next = openat(dir.as_fd(), name.as_str(), flags, Mode::empty())
                .map_err(|e| walk_err(share, rel, e))?;
            // O_PATH|O_NOFOLLOW opens a symlink itself instead of failing: refuse it explicitly.
            let st = nix::sys::stat::fstat(next.as_fd()).map_err(|e| walk_err(share, rel, e))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(walk_err(share, rel, nix::Error::ELOOP));
            }
            dir = next;
        }
        Ok(dir)
    }

    /// The path the kernel resolves to exactly the opened inode (no second lookup of the share path).
    fn proc_path(fd: &OwnedFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// The same place, opened again through the share: after a mount it yields the new mount's root.
    fn reopen(&self) -> Result<OwnedFd, MountError> {
        Self::walk(&self.share, &self.rel, None)
    }

    /// The host path, for messages.
    pub fn display_path(&self) -> PathBuf {
        self.share.join(self.rel.join("/"))
    }
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
    target: &ShareTarget,
) -> Result<(), MountError> {
    if mounts.is_empty() {
        return bind_at(bundle_rootfs, target, false);
    }
    for (index, m) in mounts.iter().enumerate() {
        if m.fstype.is_empty() && !m.options.iter().any(|o| o == "bind" || o == "rbind") {
            return Err(MountError::Rootfs {
                index,
                reason: "no file system type".into(),
            });
        }
        // Stacked mounts: each goes on top of the previous one, reached through the share again.
        let fd = if index == 0 {
            None
        } else {
            Some(target.reopen()?)
        };
        let at = ShareTarget::proc_path(fd.as_ref().unwrap_or(&target.fd));
        containerd_shim::mount::mount_rootfs(
            (!m.fstype.is_empty()).then_some(m.fstype.as_str()),
            Some(m.source.as_str()),
            &m.options,
            &at,
        )
        .map_err(|e| MountError::Rootfs {
            index,
            reason: format!(
                "{} {} on {}: {e}",
                m.fstype,
                m.source,
                target.display_path().display()
            ),
        })?;
    }
    Ok(())
}

/// Bind-mounts a host file or directory on `share/rel...`, created with the source's kind, recursively
/// (`rbind`) or not, read-only if asked.
pub fn bind(
    source: &Path,
    share: &Path,
    rel: &[&str],
    recursive: bool,
    readonly: bool,
) -> Result<(), MountError> {
    let meta = std::fs::metadata(source).map_err(io("reading", source))?;
    let target = ShareTarget::create(share, rel, meta.is_dir())?;
    bind_flags(source, &target, recursive, readonly)
}

fn bind_at(source: &Path, target: &ShareTarget, readonly: bool) -> Result<(), MountError> {
    bind_flags(source, target, true, readonly)
}

fn bind_flags(
    source: &Path,
    target: &ShareTarget,
    recursive: bool,
    readonly: bool,
) -> Result<(), MountError> {
    let what = || format!("bind of {}", source.display());
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(
        Some(source),
        &ShareTarget::proc_path(&target.fd),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|e| MountError::Mount {
        what: what(),
        target: target.display_path(),
        source: e,
    })?;
    if readonly {
        let top = target.reopen()?;
        mount(
            None::<&str>,
            &ShareTarget::proc_path(&top),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| MountError::Mount {
            what: what() + " (read-only remount)",
            target: target.display_path(),
            source: e,
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
        let rootfs = ShareTarget::create(&share, &["c1", "rootfs"], true).unwrap();
        mount_rootfs(&[], &src, &rootfs).unwrap();
        bind(&file, &share, &["c1", "mounts", "0"], false, true).unwrap();
        assert_eq!(
            std::fs::read_to_string(share.join("c1/rootfs/f")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(share.join("c1/mounts/0")).unwrap(),
            "y"
        );
        assert!(std::fs::write(share.join("c1/mounts/0"), "z").is_err());
        // The share itself plus two mounts in it.
        assert_eq!(mounts_below(&share).len(), 3);

        // A symlink planted by the guest where a mount point is about to be made is refused, at any
        // depth, and nothing is mounted outside the share.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("evil")).unwrap();
        std::fs::create_dir(share.join("c2")).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("c2/mounts")).unwrap();
        for rel in [
            &["evil"][..],
            &["evil", "x"],
            &["c2", "mounts", "0"],
            &["c2", "..", "x"],
        ] {
            let e = bind(&src, &share, rel, true, false).unwrap_err();
            assert!(e.to_string().contains("refusing symlinks"), "{rel:?}: {e}");
        }
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert_eq!(mounts_below(&share).len(), 3);

        unmount_tree(&share).unwrap();
        assert!(mounts_below(&share).is_empty());
        assert!(!share.exists());
        // The sources are untouched.
        assert_eq!(std::fs::read_to_string(src.join("f")).unwrap(), "x");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "y");
        let share2 = tmp.path().join("share2");
        std::fs::create_dir(&share2).unwrap();
        let t = ShareTarget::create(&share2, &["t"], true).unwrap();
        let e = mount_rootfs(
            &[RootfsMount {
                fstype: String::new(),
                source: "/nope".into(),
                options: vec![],
            }],
            &src,
            &t,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rootfs mount 0"), "{e}");
    }
}
