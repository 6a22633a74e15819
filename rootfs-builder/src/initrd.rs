//! The guest initramfs: the agent as `/init`, the mount points it needs and `/dev/console` (the kernel
//! opens it for init's stdio before any devtmpfs exists). Reproducible: fixed owners, times and inode
//! numbers, entries in a fixed order, so the same agent gives the same bytes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes: too large for a cpio newc entry")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path} is not an executable regular file")]
    NotExecutable { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One entry of the archive. Paths are relative to the archive root, without a leading slash.
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
/// their parent directories are created.
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

/// Writes `entries` as a cpio newc archive.
pub fn write_archive<W: Write>(entries: &[Entry], out: W) -> Result<W, InitrdError> {
    let mut out = out;
    let werr = |source| InitrdError::Write {
        path: PathBuf::from("<archive>"),
        source,
    };
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let base = |path: &str, mode: u32| {
            Builder::new(path)
                .ino(ino)
                .mode(mode)
                .uid(0)
                .gid(0)
                .mtime(0)
        };
        out = match entry {
            Entry::Dir { path, mode } => base(path, *mode)
                .nlink(2)
                .set_mode_file_type(ModeFileType::Directory)
                .write(out, 0)
                .finish()
                .map_err(werr)?,
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => base(path, *mode)
                .nlink(1)
                .rdev_major(*major)
                .rdev_minor(*minor)
                .set_mode_file_type(ModeFileType::Char)
                .write(out, 0)
                .finish()
                .map_err(werr)?,
            Entry::File { path, mode, source } => {
                let rerr = |e| InitrdError::Read {
                    path: source.clone(),
                    source: e,
                };
                let mut f = File::open(source).map_err(rerr)?;
                let size = f.metadata().map_err(rerr)?.len();
                let size32 = u32::try_from(size).map_err(|_| InitrdError::TooLarge {
                    path: source.clone(),
                    size,
                })?;
                let mut w = base(path, *mode)
                    .nlink(1)
                    .set_mode_file_type(ModeFileType::Regular)
                    .write(out, size32);
                let copied = std::io::copy(&mut (&mut f).take(size), &mut w).map_err(rerr)?;
                if copied != size {
                    return Err(rerr(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while being archived",
                    )));
                }
                w.finish().map_err(werr)?
            }
        };
    }
    cpio::newc::trailer(out).map_err(werr)
}

/// Builds the guest initrd at `out` (written to a temporary file, then renamed into place) with `init`
/// (the agent, in production) as /init and `extra` executables at the given image paths.
pub fn build_guest_initrd(
    init: &Path,
    extra: &[(PathBuf, String)],
    out: &Path,
) -> Result<u64, InitrdError> {
    use std::os::unix::fs::PermissionsExt;
    for exe in std::iter::once(init).chain(extra.iter().map(|(p, _)| p.as_path())) {
        let meta = std::fs::metadata(exe).map_err(|source| InitrdError::Read {
            path: exe.to_path_buf(),
            source,
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(InitrdError::NotExecutable {
                path: exe.to_path_buf(),
            });
        }
    }
    let tmp = out.with_extension("tmp");
    let werr = |source| InitrdError::Write {
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(&tmp).map_err(werr)?;
    let w = write_archive(&guest_entries(init, extra), BufWriter::new(file))?;
    let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    let size = file.metadata().map_err(werr)?.len();
    std::fs::rename(&tmp, out).map_err(werr)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-initrd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn archive_is_reproducible_and_complete() {
        let d = temp_dir("repro");
        let agent = d.join("agent");
        std::fs::write(&agent, b"\x7fELF fake agent bytes").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (a, b) = (d.join("a.img"), d.join("b.img"));
        let extra = vec![(agent.clone(), "/usr/bin/tool".to_string())];
        build_guest_initrd(&agent, &extra, &a).unwrap();
        build_guest_initrd(&agent, &extra, &b).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap());

        let mut names = Vec::new();
        let mut rest: &[u8] = &bytes;
        loop {
            let r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            names.push((
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
                e.mtime(),
            ));
            if e.name() == "init" {
                assert_eq!(e.file_size() as usize, b"\x7fELF fake agent bytes".len());
            }
            rest = r.finish().unwrap();
        }
        assert!(names.contains(&("dev/console".into(), 0o020600, 5, 1, 0)));
        assert!(names.contains(&("init".into(), 0o100755, 0, 0, 0)));
        assert!(names.iter().any(|n| n.0 == "proc" && n.1 == 0o040755));
        let pos = |p: &str| names.iter().position(|n| n.0 == p).unwrap();
        assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/tool"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refuses_a_missing_or_non_executable_agent() {
        let d = temp_dir("bad");
        let out = d.join("x.img");
        assert!(matches!(
            build_guest_initrd(&d.join("nope"), &[], &out),
            Err(InitrdError::Read { .. })
        ));
        let plain = d.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            build_guest_initrd(&plain, &[], &out),
            Err(InitrdError::NotExecutable { .. })
        ));
        assert!(!out.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
