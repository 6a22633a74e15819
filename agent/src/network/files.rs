//! resolv.conf and hosts for the containers.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::NetworkError;

/// Writes `content` to `dir/name` (mode 0644), creating `dir` (0755).
///
/// The file is rewritten in place, not replaced by a rename: containers get
/// it through a bind mount of the file, which a rename would leave pointing
/// at the old inode. Symlinks are not followed (neither `dir` nor the file).
pub(super) fn write(dir: &Path, name: &'static str, content: &[u8]) -> Result<(), NetworkError> {
    let field = if name == "hosts" {
        "hosts"
    } else {
        "resolv_conf"
    };
    let path = dir.join(name);
    let fail = |step, p: &Path| {
        let path = p.display().to_string();
        move |source| NetworkError::File {
            field,
            step,
            path,
            source,
        }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(fail("creating", dir))?;
    let meta = fs::symlink_metadata(dir).map_err(fail("checking", dir))?;
    if !meta.is_dir() {
        return Err(fail("checking", dir)(std::io::Error::other(
            "not a directory (a symlink?)",
        )));
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(fail("opening", &path))?;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(fail("chmod", &path))?;
    f.write_all(content).map_err(fail("writing", &path))?;
    tracing::debug!(path = %path.display(), bytes = content.len(), "network file written");
    Ok(())
}
