//! The guest image's file tree: the agent as `/init`, the mount points it needs and `/dev/console` (the
//! kernel opens it for init's stdio before any devtmpfs exists). Both outputs hold exactly these
//! entries: the initrd ([`crate::initrd`]) writes them into a cpio archive, the read-only root
//! ([`crate::erofs`]) stages them in a directory for `mkfs.erofs`.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an executable regular file")]
    NotExecutable { path: PathBuf },
    #[error("cannot stage {path}: {source}")]
    Stage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot create the device node {path}: {source} (staging a read-only root needs root, \
         CAP_MKNOD)"
    )]
    DeviceNode { path: PathBuf, source: nix::Error },
}

/// One entry of the tree. Paths are relative to the image root, without a leading slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        source: PathBuf,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// What the guest image holds: `init` as /init, plus `extra` files as (host path, path in the image);
/// their parent directories are created. Parents come before their children.
pub fn guest_entries(init: &Path, extra: &[(PathBuf, String)]) -> Vec<Entry> {
    let dir = |p: &str| Entry::Dir {
        path: p.into(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("dev"),
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::CharDev {
            path: "dev/null".into(),
            mode: 0o666,
            major: 1,
            minor: 3,
        },
        dir("proc"),
        dir("sys"),
        dir("run"),
        Entry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        dir("etc"),
    ];
    entries.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        source: init.to_path_buf(),
    });
    for (source, dest) in extra {
        let dest = dest.trim_start_matches('/');
        // Parent directories first, each once.
        let mut parent = String::new();
        for part in dest
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !entries
                .iter()
                .any(|e| matches!(e, Entry::Dir { path, .. } if *path == parent))
            {
                entries.push(dir(&parent));
            }
        }
        entries.push(Entry::File {
            path: dest.to_string(),
            mode: 0o755,
            source: source.clone(),
        });
    }
    entries
}

/// Checks that `init` and every `extra` source is an executable regular file, before anything is written.
pub fn check_executables(init: &Path, extra: &[(PathBuf, String)]) -> Result<(), TreeError> {
    for exe in std::iter::once(init).chain(extra.iter().map(|(p, _)| p.as_path())) {
        let meta = std::fs::metadata(exe).map_err(|source| TreeError::Read {
            path: exe.to_path_buf(),
            source,
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(TreeError::NotExecutable {
                path: exe.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Writes `entries` into the empty directory `root` with exactly their modes (the umask does not
/// apply: every mode is set after creation). Owners and times are left to the image writer, which
/// fixes them (`mkfs.erofs --all-root -T0`).
pub fn stage(entries: &[Entry], root: &Path) -> Result<(), TreeError> {
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            TreeError::Stage {
                path: path.to_path_buf(),
                source,
            }
        })
    };
    set_mode(root, 0o755)?;
    for entry in entries {
        match entry {
            Entry::Dir { path, mode } => {
                let p = root.join(path);
                std::fs::create_dir(&p).map_err(|source| TreeError::Stage {
                    path: p.clone(),
                    source,
                })?;
                set_mode(&p, *mode)?;
            }
            Entry::File { path, mode, source } => {
                let p = root.join(path);
                let mut from = File::open(source).map_err(|e| TreeError::Read {
                    path: source.clone(),
                    source: e,
                })?;
                let mut to = File::create_new(&p).map_err(|source| TreeError::Stage {
                    path: p.clone(),
                    source,
                })?;
                std::io::copy(&mut from, &mut to).map_err(|source| TreeError::Stage {
                    path: p.clone(),
                    source,
                })?;
                set_mode(&p, *mode)?;
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => {
                let p = root.join(path);
                mknod(
                    &p,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(*mode),
                    makedev((*major).into(), (*minor).into()),
                )
                .map_err(|source| TreeError::DeviceNode {
                    path: p.clone(),
                    source,
                })?;
                set_mode(&p, *mode)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn parents_come_first_and_once() {
        let e = guest_entries(
            Path::new("/a"),
            &[
                ("/x".into(), "/usr/bin/one".into()),
                ("/y".into(), "usr/bin/two".into()),
            ],
        );
        let paths: Vec<&str> = e
            .iter()
            .map(|e| match e {
                Entry::Dir { path, .. }
                | Entry::File { path, .. }
                | Entry::CharDev { path, .. } => path.as_str(),
            })
            .collect();
        let pos = |p: &str| paths.iter().position(|q| *q == p).unwrap();
        assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/one"));
        assert_eq!(paths.iter().filter(|p| **p == "usr/bin").count(), 1);
        assert!(pos("usr/bin/two") > pos("usr/bin/one"));
    }

    #[test]
    fn stage_writes_exact_modes_and_device_nodes() {
        let d = tempfile::tempdir().unwrap();
        let init = d.path().join("agent");
        std::fs::write(&init, b"agent").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        stage(&guest_entries(&init, &[]), &root).unwrap_or_else(|e| panic!("{e}"));
        let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(meta("tmp").mode(), 0o041777);
        assert_eq!(meta("proc").mode(), 0o040755);
        assert_eq!(meta("init").mode(), 0o100755);
        assert_eq!(std::fs::read(root.join("init")).unwrap(), b"agent");
        let console = meta("dev/console");
        assert!(console.file_type().is_char_device());
        assert_eq!(console.mode() & 0o7777, 0o600);
        assert_eq!(console.rdev(), makedev(5, 1));
    }
}
