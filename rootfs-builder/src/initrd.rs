//! The guest initramfs: the tree of [`crate::tree`] as a cpio (newc) archive. Reproducible: fixed
//! owners, times and inode numbers, entries in a fixed order, so the same agent gives the same bytes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

use crate::tree::{check_executables, guest_entries, Entry, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes: too large for a cpio newc entry")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
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
    check_executables(init, extra)?;
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
            Err(InitrdError::Tree(TreeError::Read { .. }))
        ));
        let plain = d.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            build_guest_initrd(&plain, &[], &out),
            Err(InitrdError::Tree(TreeError::NotExecutable { .. }))
        ));
        assert!(!out.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
