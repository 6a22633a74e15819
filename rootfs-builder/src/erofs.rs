//! The guest's read-only root: the tree of [`crate::tree`] as an erofs image for a read-only virtio-blk
//! disk (`husk-vmm --rootfs`, docs/guest-image.md). The tree is staged in a scratch directory and
//! written by Debian's `mkfs.erofs` (erofs-utils), uncompressed, reproducibly: every owner root, every
//! time 0, xattrs off (the staging host's labels must not leak into the image), a fixed UUID.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tree::{check_executables, guest_entries, stage, TreeError};

/// The program that writes the image; found on PATH.
pub const MKFS_EROFS: &str = "mkfs.erofs";
/// The file system UUID of every guest root image ("husk" "root" "fs" in hex): fixed, so the same
/// agent gives the same bytes.
pub const ROOTFS_UUID: &str = "6875736b-726f-6f74-6673-000000000001";

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{program} was not found on PATH: install Debian's erofs-utils (run 'make deps')")]
    MkfsMissing { program: &'static str },
    #[error("running {program}: {source}")]
    MkfsSpawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}) writing {out}: {output}")]
    MkfsFailed {
        program: &'static str,
        status: std::process::ExitStatus,
        out: PathBuf,
        output: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The `mkfs.erofs` invocation that writes `tree` into the image `out`.
pub fn mkfs_command(tree: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(MKFS_EROFS);
    cmd.args(["--quiet", "--all-root", "-T0", "-x-1"])
        .arg(format!("-U{ROOTFS_UUID}"))
        .arg(out)
        .arg(tree);
    cmd
}

/// Builds the guest root image at `out` (written to a temporary file, then renamed into place) with
/// `init` (the agent, in production) as /init and `extra` executables at the given image paths: the
/// same files as [`crate::initrd::build_guest_initrd`] writes. Returns the image size in bytes.
/// Staging the device nodes needs root (CAP_MKNOD).
pub fn build_guest_erofs(
    init: &Path,
    extra: &[(PathBuf, String)],
    out: &Path,
) -> Result<u64, ErofsError> {
    check_executables(init, extra)?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ErofsError::Io { what, path, source }
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Next to the output: same file system, and nothing of it survives a failed build.
    let scratch = tempfile::Builder::new()
        .prefix(".husk-rootfs-")
        .tempdir_in(parent)
        .map_err(io("creating a staging directory in", parent))?;
    let tree = scratch.path().join("tree");
    std::fs::create_dir(&tree).map_err(io("creating", &tree))?;
    stage(&guest_entries(init, extra), &tree)?;

    let tmp = scratch.path().join("rootfs.erofs");
    let result = mkfs_command(&tree, &tmp).output();
    let output = match result {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ErofsError::MkfsMissing {
                program: MKFS_EROFS,
            })
        }
        Err(source) => {
            return Err(ErofsError::MkfsSpawn {
                program: MKFS_EROFS,
                source,
            })
        }
    };
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr).to_string()
            + &String::from_utf8_lossy(&output.stdout);
        return Err(ErofsError::MkfsFailed {
            program: MKFS_EROFS,
            status: output.status,
            out: out.to_path_buf(),
            output: text.trim().to_string(),
        });
    }
    let size = std::fs::metadata(&tmp)
        .map_err(io("reading the size of", &tmp))?
        .len();
    std::fs::rename(&tmp, out).map_err(io("moving the image to", out))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// Runs one of erofs-utils' checkers; a missing tool fails the test (never a silent skip).
    fn erofs_tool(program: &str, args: &[&std::ffi::OsStr]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{program}: {e}: install Debian's erofs-utils (run 'make deps')")
            });
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{program} {args:?}: {text}");
        text
    }

    #[test]
    fn image_is_reproducible_and_holds_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        std::fs::write(&agent, b"\x7fELF fake agent bytes").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let extra = vec![(agent.clone(), "/usr/bin/tool".to_string())];
        let (a, b) = (d.path().join("a.erofs"), d.path().join("b.erofs"));
        let size = build_guest_erofs(&agent, &extra, &a).unwrap_or_else(|e| panic!("{e}"));
        build_guest_erofs(&agent, &extra, &b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::metadata(&a).unwrap().len(), size);
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "two builds of the same tree differ"
        );
        // Nothing but the two images is left next to them (the staging directory is gone).
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.erofs", "agent", "b.erofs"]);

        let sb = erofs_tool("dump.erofs", &["-s".as_ref(), a.as_os_str()]);
        assert!(sb.contains(ROOTFS_UUID), "superblock: {sb}");

        // fsck checks every inode and extracts the tree with its owners and modes (we are root).
        let x = d.path().join("x");
        let extract = format!("--extract={}", x.display());
        erofs_tool(
            "fsck.erofs",
            &[extract.as_ref(), "--preserve".as_ref(), a.as_os_str()],
        );
        let meta = |p: &str| std::fs::symlink_metadata(x.join(p)).unwrap();
        assert_eq!(
            std::fs::read(x.join("init")).unwrap(),
            b"\x7fELF fake agent bytes"
        );
        assert_eq!(meta("init").mode(), 0o100755);
        assert_eq!(meta("usr/bin/tool").mode(), 0o100755);
        assert_eq!(meta("tmp").mode(), 0o041777);
        for p in ["dev", "proc", "sys", "run", "etc", "usr/bin"] {
            assert_eq!(meta(p).mode(), 0o040755, "{p}");
        }
        let console = meta("dev/console");
        assert!(console.file_type().is_char_device());
        assert_eq!(
            (console.mode() & 0o7777, console.rdev()),
            (0o600, nix::sys::stat::makedev(5, 1))
        );
        assert_eq!(meta("dev/null").rdev(), nix::sys::stat::makedev(1, 3));
        for p in ["init", "dev/console", "tmp", "usr/bin/tool"] {
            assert_eq!((meta(p).uid(), meta(p).gid()), (0, 0), "{p}");
        }
        // Owners and times as stored (the extraction above cannot show the times).
        let ino = erofs_tool("dump.erofs", &["--path=/init".as_ref(), a.as_os_str()]);
        assert!(
            ino.contains("Uid: 0   Gid: 0") && ino.contains("Timestamp: 1970-01-01 00:00:00"),
            "{ino}"
        );
    }

    #[test]
    fn refuses_a_missing_agent_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.erofs");
        assert!(matches!(
            build_guest_erofs(&d.path().join("nope"), &[], &out),
            Err(ErofsError::Tree(TreeError::Read { .. }))
        ));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
