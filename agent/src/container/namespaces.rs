//! Namespaces: which to create (clone flags), which to join (setns on a
//! path), and the namespaces of a running container for `ExecProcess`.

use std::fs::File;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxNamespaceType as T;

use super::EngineError;

/// What the init process of a container does about namespaces.
#[derive(Debug, Default)]
pub struct NsPlan {
    /// CLONE_NEW* flags for clone(2) (never CLONE_NEWCGROUP, see below).
    pub clone_flags: libc::c_int,
    /// Create a cgroup namespace, after the process was moved into the
    /// container's cgroup (so that the cgroup is its namespace root).
    pub new_cgroup: bool,
    /// Existing namespaces to join: (path, CLONE_NEW* type).
    pub join: Vec<(PathBuf, libc::c_int)>,
    /// Whether the process gets its own UTS namespace (hostname allowed).
    pub uts: bool,
    /// A new user namespace (CLONE_NEWUSER is in `clone_flags`): the
    /// parent writes its uid/gid maps before letting the child go on.
    pub new_user: bool,
    /// A user namespace at all (new or joined).
    pub user: bool,
}

fn flag(t: T) -> Option<(libc::c_int, &'static str)> {
    Some(match t {
        T::Mount => (libc::CLONE_NEWNS, "mount"),
        T::Pid => (libc::CLONE_NEWPID, "pid"),
        T::Network => (libc::CLONE_NEWNET, "network"),
        T::Ipc => (libc::CLONE_NEWIPC, "ipc"),
        T::Uts => (libc::CLONE_NEWUTS, "uts"),
        T::Cgroup => (libc::CLONE_NEWCGROUP, "cgroup"),
        T::User => (libc::CLONE_NEWUSER, "user"),
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// Validates `linux.namespaces`. A new mount namespace is required (the
/// engine changes the root); time namespaces are not supported yet. A user
/// namespace, new or joined, is joined after all the others.
pub fn from_spec(list: &[oci_spec::runtime::LinuxNamespace]) -> Result<NsPlan, EngineError> {
    let mut plan = NsPlan::default();
    let mut seen = 0;
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let (f, name) = flag(ns.typ())
            .ok_or_else(|| EngineError::invalid(format!("{field}.type"), "not supported"))?;
        if seen & f != 0 {
            return Err(EngineError::invalid(
                format!("{field}.type"),
                format!("{name} namespace given twice"),
            ));
        }
        seen |= f;
        match ns.path() {
            Some(p) => {
                if f == libc::CLONE_NEWNS {
                    return Err(EngineError::invalid(
                        format!("{field}.path"),
                        "joining an existing mount namespace is not supported",
                    ));
                }
                if !p.is_absolute() {
                    return Err(EngineError::invalid(
                        format!("{field}.path"),
                        "must be absolute",
                    ));
                }
                plan.join.push((p.clone(), f));
                if f == libc::CLONE_NEWUTS {
                    plan.uts = true;
                }
            }
            None if f == libc::CLONE_NEWCGROUP => plan.new_cgroup = true,
            None => {
                plan.clone_flags |= f;
                if f == libc::CLONE_NEWUTS {
                    plan.uts = true;
                }
                if f == libc::CLONE_NEWUSER {
                    plan.new_user = true;
                }
            }
        }
        if f == libc::CLONE_NEWUSER {
            plan.user = true;
        }
    }
    // Join a user namespace last: once in it, the process has no
    // privileges over namespaces owned by the guest's (initial) one, such as
    // the guest's network namespace.
    plan.join.sort_by_key(|(_, f)| *f == libc::CLONE_NEWUSER);
    if seen & libc::CLONE_NEWNS == 0 {
        return Err(EngineError::invalid(
            "linux.namespaces",
            "a mount namespace is required",
        ));
    }
    Ok(plan)
}

/// Opens the namespace files to join (O_CLOEXEC). Missing ones are errors.
/// Most lines in a uid_map / gid_map (the kernel's limit since 4.15).
const MAX_ID_MAPPINGS: usize = 340;

fn id_map(
    list: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>,
    field: &str,
) -> Result<String, EngineError> {
    let list = list.map(Vec::as_slice).unwrap_or(&[]);
    if list.is_empty() {
        return Err(EngineError::invalid(
            field,
            "required with a new user namespace",
        ));
    }
    if list.len() > MAX_ID_MAPPINGS {
        return Err(EngineError::invalid(
            field,
            format!("{} entries, limit {MAX_ID_MAPPINGS}", list.len()),
        ));
    }
    let mut out = String::new();
    for (i, m) in list.iter().enumerate() {
        let end = |start: u32| u64::from(start) + u64::from(m.size());
        if m.size() == 0 || end(m.container_id()) > 1 << 32 || end(m.host_id()) > 1 << 32 {
            return Err(EngineError::invalid(
                format!("{field}[{i}]"),
                "size must be > 0 and the ranges within 32 bits",
            ));
        }
        out.push_str(&format!(
            "{} {} {}\n",
            m.container_id(),
            m.host_id(),
            m.size()
        ));
    }
    Ok(out)
}

/// For a new user namespace: the contents of its uid_map and gid_map.
/// Mappings without a new user namespace are refused.
pub fn id_maps(
    linux: &oci_spec::runtime::Linux,
    plan: &NsPlan,
) -> Result<Option<(String, String)>, EngineError> {
    let given = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.as_ref().is_some_and(|m| !m.is_empty())
    };
    if !plan.new_user {
        for (m, field) in [
            (linux.uid_mappings(), "linux.uidMappings"),
            (linux.gid_mappings(), "linux.gidMappings"),
        ] {
            if given(m) {
                return Err(EngineError::invalid(
                    field,
                    "needs a new user namespace (linux.namespaces type user without a path)",
                ));
            }
        }
        return Ok(None);
    }
    Ok(Some((
        id_map(linux.uid_mappings().as_ref(), "linux.uidMappings")?,
        id_map(linux.gid_mappings().as_ref(), "linux.gidMappings")?,
    )))
}

/// Writes the maps of a new user namespace (the parent, before the child
/// goes on). The agent is root in the initial namespace, so any mapping is
/// allowed, and setgroups stays allowed in the container.
pub fn write_id_maps(pid: i32, maps: &(String, String)) -> Result<(), EngineError> {
    for (file, content, field) in [
        ("uid_map", &maps.0, "linux.uidMappings"),
        ("gid_map", &maps.1, "linux.gidMappings"),
    ] {
        std::fs::write(format!("/proc/{pid}/{file}"), content).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                EngineError::invalid(
                    field,
                    format!("refused by the kernel (overlapping ranges?): {e}"),
                )
            } else {
                EngineError::Internal(format!("writing /proc/{pid}/{file}: {e}"))
            }
        })?;
    }
    Ok(())
}

pub fn open_joins(plan: &NsPlan) -> Result<Vec<(File, libc::c_int)>, EngineError> {
    plan.join
        .iter()
        .map(|(p, f)| {
            File::open(p).map(|file| (file, *f)).map_err(|e| {
                EngineError::invalid("linux.namespaces.path", format!("{}: {e}", p.display()))
            })
        })
        .collect()
}

/// The namespaces of a running process, for joining it (`ExecProcess`).
/// Namespaces the kernel lacks are skipped.
pub fn open_of_pid(pid: i32) -> Result<Vec<(File, libc::c_int)>, EngineError> {
    let mut out = Vec::new();
    // The container's user namespace, if it is not ours (setns into one's
    // own user namespace fails with EINVAL). Joined last, see from_spec.
    let user = {
        use std::os::unix::fs::MetadataExt;
        let path = format!("/proc/{pid}/ns/user");
        let theirs = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()));
        let ours = std::fs::metadata("/proc/self/ns/user").map(|m| (m.dev(), m.ino()));
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t != o => Some(File::open(&path).map_err(|e| {
                EngineError::FailedPrecondition(format!(
                    "container init (pid {pid}) is gone: {path}: {e}"
                ))
            })?),
            _ => None,
        }
    };
    for (name, f) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let path = Path::new("/proc")
            .join(pid.to_string())
            .join("ns")
            .join(name);
        match File::open(&path) {
            Ok(file) => out.push((file, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == "cgroup" => {}
            Err(e) => {
                return Err(EngineError::FailedPrecondition(format!(
                    "container init (pid {pid}) is gone: {}: {e}",
                    path.display()
                )))
            }
        }
    }
    if let Some(u) = user {
        out.push((u, libc::CLONE_NEWUSER));
    }
    Ok(out)
}

/// Child side: joins one namespace. Returns the errno.
pub(crate) fn setns(fd: libc::c_int, nstype: libc::c_int) -> Result<(), i32> {
    // SAFETY: setns on a descriptor kept open for the child.
    if unsafe { libc::setns(fd, nstype) } != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(j: &str) -> Result<NsPlan, EngineError> {
        let v: Vec<oci_spec::runtime::LinuxNamespace> = serde_json::from_str(j).unwrap();
        from_spec(&v)
    }

    #[test]
    fn plans() {
        let p = parse(r#"[{"type":"mount"},{"type":"pid"},{"type":"uts"},{"type":"cgroup"},{"type":"network","path":"/var/run/netns/x"}]"#).unwrap();
        assert_eq!(
            p.clone_flags,
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS
        );
        assert!(p.new_cgroup && p.uts);
        assert_eq!(
            p.join,
            [(PathBuf::from("/var/run/netns/x"), libc::CLONE_NEWNET)]
        );
        let e = parse(r#"[{"type":"pid"}]"#).unwrap_err();
        assert!(e.to_string().contains("mount namespace is required"), "{e}");
        let p = parse(r#"[{"type":"user","path":"/proc/1/ns/user"},{"type":"mount"},{"type":"ipc","path":"/proc/1/ns/ipc"}]"#).unwrap();
        assert_eq!(
            p.join[1].1,
            libc::CLONE_NEWUSER,
            "the user namespace is joined last"
        );
        assert!(p.user && !p.new_user);
        let p = parse(r#"[{"type":"mount"},{"type":"user"}]"#).unwrap();
        assert!(p.user && p.new_user);
        assert_eq!(p.clone_flags, libc::CLONE_NEWNS | libc::CLONE_NEWUSER);
        let e = parse(r#"[{"type":"mount"},{"type":"mount"}]"#).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        let e = parse(r#"[{"type":"mount"},{"type":"ipc","path":"rel"}]"#).unwrap_err();
        assert!(e.to_string().contains("linux.namespaces[1].path"), "{e}");
    }
}
