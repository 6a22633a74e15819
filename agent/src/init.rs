//! PID 1 duties: mounting the basic file systems, cgroup2 controllers, the
//! standard file descriptors, the hostname and the loopback interface.
//!
//! Nothing here is fatal: every step that fails is reported and skipped, so
//! the agent still comes up (and can say what is wrong) in an odd guest.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Guest hostname.
pub const HOSTNAME: &str = "husk";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors of the PID 1 setup steps.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Creating a mount point failed.
    #[error("mkdir {path}: {source}")]
    Mkdir {
        /// The directory.
        path: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// Reading or writing a cgroup2 control file failed.
    #[error("cgroup2 {path}: {source}")]
    Cgroup {
        /// The file (and controller, when enabling one).
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// sethostname(2) failed.
    #[error("sethostname: {0}")]
    Hostname(#[source] nix::Error),
    /// Bringing up `lo` failed at `step`.
    #[error("lo up: {step}: {source}")]
    Loopback {
        /// Which step.
        step: &'static str,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// Re-opening a closed standard file descriptor failed.
    #[error("reopening fd {fd} on {path}: {source}")]
    StdFd {
        /// The descriptor (0, 1 or 2).
        fd: i32,
        /// What we tried to open.
        path: &'static str,
        /// The error.
        #[source]
        source: nix::Error,
    },
}

/// Outcome of one mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// We mounted it.
    Now,
    /// Something was mounted there already.
    Already,
}

struct MountSpec {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// Create the mount point if missing (not possible inside sysfs).
    mkdir: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounted before logging starts: the console device and /proc/cmdline.
const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        mkdir: true,
    },
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mkdir: true,
    },
];

const LATE_MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mkdir: true,
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
        mkdir: true,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mkdir: true,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        mkdir: true,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mkdir: true,
    },
    MountSpec {
        fstype: "cgroup2",
        target: CGROUP_ROOT,
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mkdir: false,
    },
];

/// Results of the early steps, reported once logging is up.
#[derive(Debug, Default)]
pub struct EarlyReport {
    /// Errors, in order.
    pub errors: Vec<InitError>,
    /// File systems that we mounted.
    pub mounted: Vec<&'static str>,
}

/// First thing PID 1 does: mount /dev and /proc and make sure fds 0-2 are
/// open (otherwise a socket could become fd 2 and receive log lines).
/// Nothing is logged yet; see [`EarlyReport`].
pub fn early() -> EarlyReport {
    let mut report = EarlyReport::default();
    for spec in EARLY_MOUNTS {
        match mount_one(spec) {
            Ok(Mounted::Now) => report.mounted.push(spec.target),
            Ok(Mounted::Already) => {}
            Err(e) => report.errors.push(e),
        }
    }
    if let Err(e) = ensure_std_fds() {
        report.errors.push(e);
    }
    report
}

/// The remaining PID 1 setup; logs what it does and what fails.
pub fn setup() {
    let mut mounted = Vec::new();
    for spec in LATE_MOUNTS {
        match mount_one(spec) {
            Ok(Mounted::Now) => mounted.push(spec.target),
            Ok(Mounted::Already) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    tracing::debug!("mounted {}", mounted.join(" "));
    match enable_cgroup_controllers(Path::new(CGROUP_ROOT)) {
        Ok((enabled, failed)) => {
            tracing::debug!("cgroup2 controllers: {}", enabled.join(" "));
            for e in failed {
                tracing::warn!("{e}");
            }
        }
        Err(e) => tracing::warn!("{e}"),
    }
    if let Err(e) = nix::unistd::sethostname(HOSTNAME).map_err(InitError::Hostname) {
        tracing::warn!("{e}");
    }
    if let Err(e) = loopback_up() {
        tracing::warn!("{e}");
    }
}

/// Mounts one file system unless something is mounted there already.
fn mount_one(spec: &MountSpec) -> Result<Mounted, InitError> {
    if spec.mkdir {
        match fs::DirBuilder::new().mode(0o755).create(spec.target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(InitError::Mkdir {
                    path: spec.target,
                    source,
                })
            }
        }
    }
    if is_mount_point(Path::new(spec.target)) {
        return Ok(Mounted::Already);
    }
    match mount(
        Some(spec.fstype),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    ) {
        Ok(()) => Ok(Mounted::Now),
        Err(Errno::EBUSY) => Ok(Mounted::Already),
        Err(source) => Err(InitError::Mount {
            fstype: spec.fstype,
            target: spec.target,
            source,
        }),
    }
}

/// A directory on a different device than its parent is a mount point (good
/// enough here: the initramfs root is one device, every mount another).
fn is_mount_point(path: &Path) -> bool {
    let (Ok(me), Ok(parent)) = (fs::metadata(path), fs::metadata(path.join(".."))) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Re-opens any of fds 0, 1, 2 that is closed, on /dev/console or else
/// /dev/null.
fn ensure_std_fds() -> Result<(), InitError> {
    for fd in 0..3 {
        if nix::fcntl::fcntl(
            // SAFETY: only queries the flags of a raw fd number.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        ) != Err(Errno::EBADF)
        {
            continue;
        }
        let mut last = None;
        for path in ["/dev/console", "/dev/null"] {
            match open_at_fd(path, fd) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some((path, e)),
            }
        }
        if let Some((path, source)) = last {
            return Err(InitError::StdFd { fd, path, source });
        }
    }
    Ok(())
}

/// Opens `path` read-write and makes it descriptor `fd`.
fn open_at_fd(path: &'static str, fd: i32) -> Result<(), nix::Error> {
    let file = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )?;
    if file.as_raw_fd() == fd {
        // Lowest free number was `fd` itself: keep it open forever.
        std::mem::forget(file);
        return Ok(());
    }
    // SAFETY: dup2 onto a descriptor number we verified to be closed.
    let r = unsafe { libc::dup2(file.as_raw_fd(), fd) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Enables every available controller in the root's subtree_control, one at
/// a time so one refusal does not block the others. Returns the enabled ones
/// and the per-controller failures.
pub fn enable_cgroup_controllers(root: &Path) -> Result<(Vec<String>, Vec<InitError>), InitError> {
    let controllers_path = root.join("cgroup.controllers");
    let available = fs::read_to_string(&controllers_path).map_err(|source| InitError::Cgroup {
        path: controllers_path.display().to_string(),
        source,
    })?;
    let control = root.join("cgroup.subtree_control");
    let mut enabled = Vec::new();
    let mut failed = Vec::new();
    for name in available.split_ascii_whitespace() {
        match fs::write(&control, format!("+{name}")) {
            Ok(()) => enabled.push(name.to_string()),
            Err(source) => failed.push(InitError::Cgroup {
                path: format!("{} +{name}", control.display()),
                source,
            }),
        }
    }
    Ok((enabled, failed))
}

/// Sets IFF_UP on `lo` (the kernel then assigns 127.0.0.1/8 and ::1).
pub fn loopback_up() -> Result<(), InitError> {
    let err = |step| move |source| InitError::Loopback { step, source };
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialised ifreq that lives
    // across the call; SIOCGIFFLAGS writes only ifr_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(err("SIOCGIFFLAGS")(Errno::last()));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if flags & want == want {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | want;
    // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(err("SIOCSIFFLAGS")(Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_detection() {
        assert!(is_mount_point(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
        assert!(!is_mount_point(&dir.path().join("missing")));
    }

    #[test]
    fn cgroup_controllers_in_a_fake_root() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let (enabled, failed) = enable_cgroup_controllers(dir.path()).unwrap();
        assert_eq!(enabled, ["cpu", "memory", "pids"]);
        assert!(failed.is_empty());
        assert!(enable_cgroup_controllers(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn loopback_is_up_or_refused() {
        // Unprivileged on the host, lo is already up: must succeed without
        // changing anything. As root it is a no-op too.
        loopback_up().unwrap();
    }
}
