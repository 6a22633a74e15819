//! `MountStorage` / `UnmountStorage`: file systems for containers (the pod's
//! virtio-fs share, block devices, tmpfs, bind mounts) below `/run/husk/`.
//!
//! Requests are validated with `husk_proto::storage` (the same rules the
//! host client applies). The agent remembers what it mounted, so a repeated
//! request is a no-op (the shim may retry after a lost reply) and
//! `UnmountStorage` only ever undoes mounts made here, never the agent's own
//! or a container's.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_proto::storage::{
    validate_mount, validate_target, Atime, FsType, StorageSource, STORAGE_ROOT,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::container::EngineError;

/// What a target has mounted on it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mounted {
    fstype: FsType,
    /// The resolved source (a `serial:` becomes its `/dev/vdX`).
    source: String,
    /// Directories created for the target (deepest last), removed again on
    /// unmount.
    created: Vec<PathBuf>,
}

/// The storage table. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Storage {
    /// Where block devices are listed (`/sys/block`), for serial lookups.
    sys_block: PathBuf,
    /// Where their nodes are (`/dev`).
    dev: PathBuf,
    mounts: Mutex<HashMap<String, Mounted>>,
}

impl Default for Storage {
    fn default() -> Self {
        Self::new(PathBuf::from("/sys/block"), PathBuf::from("/dev"))
    }
}

fn invalid(e: husk_proto::storage::StorageError) -> EngineError {
    EngineError::invalid(e.field, e.reason)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-updated
    // (single inserts/removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Storage {
    /// A table that looks block devices up in `sys_block` and `dev`.
    pub fn new(sys_block: PathBuf, dev: PathBuf) -> Self {
        Self {
            sys_block,
            dev,
            mounts: Mutex::new(HashMap::new()),
        }
    }

    /// Targets currently mounted, sorted.
    pub fn targets(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.mounts).keys().cloned().collect();
        v.sort();
        v
    }

    /// Finds the block device whose virtio-blk serial is `serial`.
    fn by_serial(&self, serial: &str) -> Result<PathBuf, EngineError> {
        let entries = fs::read_dir(&self.sys_block).map_err(|e| {
            EngineError::FailedPrecondition(format!("{}: {e}", self.sys_block.display()))
        })?;
        for ent in entries.flatten() {
            // Short reads only: the file is a sysfs attribute of 20 bytes.
            let Ok(s) = fs::read_to_string(ent.path().join("serial")) else {
                continue;
            };
            if s.trim_end_matches(['\n', '\0']) == serial {
                return Ok(self.dev.join(ent.file_name()));
            }
        }
        Err(EngineError::FailedPrecondition(format!(
            "source: no block device with serial {serial:?} in {}",
            self.sys_block.display()
        )))
    }

    fn resolve(&self, src: &StorageSource) -> Result<String, EngineError> {
        let dev = match src {
            StorageSource::Tag(t) => return Ok(t.clone()),
            StorageSource::None => return Ok("tmpfs".into()),
            StorageSource::Path(p) => {
                return match fs::metadata(p) {
                    Ok(_) => Ok(p.clone()),
                    Err(e) => Err(EngineError::FailedPrecondition(format!("source: {p}: {e}"))),
                }
            }
            StorageSource::BlockPath(p) => PathBuf::from(p),
            StorageSource::BlockSerial(s) => self.by_serial(s)?,
        };
        match fs::metadata(&dev) {
            Ok(md) if md.file_type().is_block_device() => Ok(dev.to_string_lossy().into_owned()),
            Ok(_) => Err(EngineError::FailedPrecondition(format!(
                "source: {} is not a block device",
                dev.display()
            ))),
            Err(e) => Err(EngineError::FailedPrecondition(format!(
                "source: {}: {e}",
                dev.display()
            ))),
        }
    }

    /// Mounts (blocking). Idempotent for the same fstype, source and target.
    pub fn mount(
        &self,
        fstype: &str,
        source: &str,
        target: &str,
        options: &[String],
        readonly: bool,
    ) -> Result<(), EngineError> {
        let spec = validate_mount(fstype, source, target, options, readonly).map_err(invalid)?;
        // Held across the mount so that two requests for one target cannot
        // both mount; storage requests are rare and short.
        let mut mounts = lock(&self.mounts);
        let resolved = self.resolve(&spec.source)?;
        if let Some(m) = mounts.get(target) {
            if m.fstype == spec.fstype && m.source == resolved {
                tracing::debug!(target, "MountStorage: already mounted");
                return Ok(());
            }
            return Err(EngineError::AlreadyExists(format!(
                "target {target} has {} {} mounted",
                m.fstype.as_str(),
                m.source
            )));
        }
        let created = make_dirs(Path::new(target))?;
        let undo = |created: &[PathBuf]| {
            for d in created.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        };
        // The target must be the path itself, not somewhere a symlink
        // (planted through a bind-mounted, container-writable directory)
        // points to.
        match fs::canonicalize(target) {
            Ok(p) if p == Path::new(target) => {}
            _ => {
                undo(&created);
                return Err(EngineError::invalid(
                    "target",
                    "resolves through a symbolic link",
                ));
            }
        }
        if let Err(e) = do_mount(&spec, &resolved) {
            undo(&created);
            return Err(e);
        }
        tracing::info!(fstype, source = %resolved, target, "storage mounted");
        mounts.insert(
            target.to_string(),
            Mounted {
                fstype: spec.fstype,
                source: resolved,
                created,
            },
        );
        Ok(())
    }

    /// Unmounts a target of [`Storage::mount`] (blocking); detaches lazily if
    /// busy, then removes the directories the mount created.
    pub fn unmount(&self, target: &str) -> Result<(), EngineError> {
        validate_target(target).map_err(invalid)?;
        let mut mounts = lock(&self.mounts);
        let Some(m) = mounts.get(target) else {
            return Err(EngineError::NotFound(format!(
                "{target} was not mounted by MountStorage"
            )));
        };
        match umount2(target, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                tracing::info!(target, "busy: detaching lazily");
                umount2(target, MntFlags::MNT_DETACH).map_err(|e| {
                    EngineError::Internal(format!("umount2({target}, MNT_DETACH): {e}"))
                })?;
            }
            // Unmounted behind our back (EINVAL: not a mount point): the
            // request's goal is reached.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                tracing::warn!(target, "was not mounted any more");
            }
            Err(e) => return Err(EngineError::Internal(format!("umount2({target}): {e}"))),
        }
        for d in m.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
        mounts.remove(target);
        tracing::info!(target, "storage unmounted");
        Ok(())
    }
}

/// Creates `target` and its missing parents (mode 0755); returns the
/// directories created, outermost first.
fn make_dirs(target: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let mut missing = Vec::new();
    let mut cur = Some(target);
    while let Some(p) = cur {
        if fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match fs::DirBuilder::new().mode(0o755).create(&d) {
            // The root stays: other targets live there too.
            Ok(()) if d == Path::new(STORAGE_ROOT) => {}
            Ok(()) => created.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                for c in created.iter().rev() {
                    let _ = fs::remove_dir(c);
                }
                return Err(EngineError::Internal(format!(
                    "creating {}: {e}",
                    d.display()
                )));
            }
        }
    }
    match fs::metadata(target) {
        Ok(md) if md.is_dir() => Ok(created),
        _ => Err(EngineError::invalid(
            "target",
            "exists and is not a directory",
        )),
    }
}

fn do_mount(spec: &husk_proto::storage::MountSpec, source: &str) -> Result<(), EngineError> {
    let o = &spec.options;
    let mut flags = MsFlags::empty();
    flags.set(MsFlags::MS_RDONLY, o.readonly);
    flags.set(MsFlags::MS_NOSUID, o.nosuid);
    flags.set(MsFlags::MS_NODEV, o.nodev);
    flags.set(MsFlags::MS_NOEXEC, o.noexec);
    match o.atime {
        Some(Atime::Relative) => flags |= MsFlags::MS_RELATIME,
        Some(Atime::Never) => flags |= MsFlags::MS_NOATIME,
        None => {}
    }
    let target = spec.target.as_str();
    let fail = |what: &str, e: nix::errno::Errno| match e {
        nix::errno::Errno::ENODEV => EngineError::FailedPrecondition(format!(
            "fstype: the guest kernel has no {} file system",
            spec.fstype.as_str()
        )),
        e => EngineError::Internal(format!("{what} {source} on {target}: {e}")),
    };
    if spec.fstype == FsType::Bind {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| fail("bind mount", e))?;
        // Flags of a bind mount only take effect on a remount.
        if !flags.is_empty() {
            if let Err(e) = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                None::<&str>,
            ) {
                let _ = umount2(target, MntFlags::MNT_DETACH);
                return Err(fail("remounting the bind mount of", e));
            }
        }
        return Ok(());
    }
    let data = o.data.join(",");
    mount(
        Some(source),
        target,
        Some(spec.fstype.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| fail("mount", e))
}
