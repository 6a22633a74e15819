//! The process's user: uid, gid, supplementary groups, umask and `HOME`.
//!
//! The agent is a static binary: it must never call NSS (`getpwnam`,
//! `getgrouplist`), so the container's `/etc/passwd` and `/etc/group` are
//! parsed here, read through the rootfs with symlinks resolved inside it.

use std::io::Read;
use std::path::Path;

use super::rootfs::secure_join;
use super::EngineError;

/// Largest `/etc/passwd` or `/etc/group` read (bytes); the rest is ignored.
const MAX_DB_SIZE: u64 = 4 << 20;
/// NGROUPS_MAX on Linux.
pub const MAX_GROUPS: usize = 65536;

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member login names.
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` text; malformed lines and comments are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text; malformed lines and comments are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// The user a process runs as, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups: the spec's `additionalGids`, then the groups of
    /// `/etc/group` that list the user's name, without duplicates.
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd` (for a default `HOME`).
    pub home: Option<String>,
    /// umask, if the spec sets one.
    pub umask: Option<u32>,
}

/// Resolves `user` against the databases in `rootfs`. Missing databases are
/// fine (a uid without a passwd entry is allowed, like runc).
pub fn resolve(rootfs: &Path, user: &oci_spec::runtime::User) -> Result<ResolvedUser, EngineError> {
    if let Some(mask) = user.umask() {
        if mask > 0o777 {
            return Err(EngineError::invalid(
                "process.user.umask",
                format!("{mask:#o} is not a permission mask"),
            ));
        }
    }
    let passwd = read_db(rootfs, "/etc/passwd")
        .map(|t| parse_passwd(&t))
        .unwrap_or_default();
    let groups_db = read_db(rootfs, "/etc/group")
        .map(|t| parse_group(&t))
        .unwrap_or_default();
    let entry = passwd.iter().find(|p| p.uid == user.uid());
    let mut groups: Vec<u32> = Vec::new();
    for g in user.additional_gids().iter().flatten() {
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    if let Some(e) = entry {
        for g in &groups_db {
            if g.members.contains(&e.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    if groups.len() > MAX_GROUPS {
        return Err(EngineError::invalid(
            "process.user.additionalGids",
            format!("{} groups, limit {MAX_GROUPS}", groups.len()),
        ));
    }
    Ok(ResolvedUser {
        uid: user.uid(),
        gid: user.gid(),
        groups,
        home: entry.map(|e| e.home.clone()).filter(|h| !h.is_empty()),
        umask: user.umask(),
    })
}

/// Reads a small text file of the container (`path` is container-absolute).
fn read_db(rootfs: &Path, path: &str) -> Option<String> {
    let host = secure_join(rootfs, Path::new(path)).ok()?;
    let f = std::fs::File::open(host).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_DB_SIZE).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_databases() {
        let p = parse_passwd(
            "root:x:0:0:root:/root:/bin/sh\n# comment\nbad line\nalice:x:1000:1001:A:/home/alice:/bin/sh\nbob:x:notanumber:1:b:/:/bin/sh\n",
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].name, "alice");
        assert_eq!((p[1].uid, p[1].gid), (1000, 1001));
        assert_eq!(p[1].home, "/home/alice");
        let g = parse_group("staff:x:50:alice,bob\nempty:x:60:\nbroken\n");
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].members, ["alice", "bob"]);
        assert!(g[1].members.is_empty());
    }

    #[test]
    fn resolves_against_a_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "alice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "staff:x:50:alice\nother:x:70:bob\n",
        )
        .unwrap();
        let user: oci_spec::runtime::User =
            serde_json::from_str(r#"{"uid":1000,"gid":1000,"additionalGids":[60,50],"umask":18}"#)
                .unwrap();
        let r = resolve(dir.path(), &user).unwrap();
        assert_eq!(r.groups, [60, 50]);
        assert_eq!(r.home.as_deref(), Some("/home/alice"));
        assert_eq!(r.umask, Some(0o22));
        // Unknown uid: allowed, no home, only the spec's groups.
        let user: oci_spec::runtime::User =
            serde_json::from_str(r#"{"uid":4242,"gid":4242}"#).unwrap();
        let r = resolve(dir.path(), &user).unwrap();
        assert!(r.groups.is_empty() && r.home.is_none());
        let user: oci_spec::runtime::User =
            serde_json::from_str(r#"{"uid":0,"gid":0,"umask":4095}"#).unwrap();
        let e = resolve(dir.path(), &user).unwrap_err();
        assert!(e.to_string().contains("process.user.umask"), "{e}");
    }
}
