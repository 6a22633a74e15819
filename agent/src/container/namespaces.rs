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
/// engine changes the root); user and time namespaces are not supported yet.
pub fn from_spec(list: &[oci_spec::runtime::LinuxNamespace]) -> Result<NsPlan, EngineError> {
    let mut plan = NsPlan::default();
    let mut seen = 0;
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let (f, name) = flag(ns.typ())
            .ok_or_else(|| EngineError::invalid(format!("{field}.type"), "not supported"))?;
        if f == libc::CLONE_NEWUSER {
            return Err(EngineError::invalid(
                format!("{field}.type"),
                "user namespaces are not supported yet",
            ));
        }
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
            }
        }
    }
    if seen & libc::CLONE_NEWNS == 0 {
        return Err(EngineError::invalid(
            "linux.namespaces",
            "a mount namespace is required",
        ));
    }
    Ok(plan)
}

/// Opens the namespace files to join (O_CLOEXEC). Missing ones are errors.
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
        let e = parse(r#"[{"type":"mount"},{"type":"user"}]"#).unwrap_err();
        assert!(e.to_string().contains("linux.namespaces[1].type"), "{e}");
        let e = parse(r#"[{"type":"mount"},{"type":"mount"}]"#).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        let e = parse(r#"[{"type":"mount"},{"type":"ipc","path":"rel"}]"#).unwrap_err();
        assert!(e.to_string().contains("linux.namespaces[1].path"), "{e}");
    }
}
