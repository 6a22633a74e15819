//! cgroup v2, through its files (no cgroups-rs: it pulls zbus). One cgroup
//! per container under the engine's root (`/sys/fs/cgroup` in the guest).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use super::EngineError;

/// Controllers the engine enables down to container cgroups.
const CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io"];

/// Whether `path` is the root of a cgroup2 mount (statfs magic).
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The files to write for the spec's resources: (file name, value), in order.
/// Resources cgroup v2 cannot express without eBPF (device rules) or that
/// this engine does not handle yet (hugepages, rdma, network classes, block
/// I/O throttling) are logged and ignored.
pub fn resource_files(r: &LinuxResources) -> Result<Vec<(String, String)>, EngineError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| out.push((k.to_string(), v));
    if let Some(m) = r.memory() {
        let limit = m.limit();
        match limit {
            Some(l) if l < 0 => put("memory.max", "max".into()),
            Some(l) if l > 0 => put("memory.max", l.to_string()),
            _ => {}
        }
        if let Some(res) = m.reservation() {
            if res > 0 {
                put("memory.low", res.to_string());
            }
        }
        if let Some(swap) = m.swap() {
            // OCI's swap is memory + swap; v2's memory.swap.max is swap only.
            if swap < 0 {
                put("memory.swap.max", "max".into());
            } else if swap > 0 {
                let l = limit.filter(|l| *l > 0).ok_or_else(|| {
                    EngineError::invalid(
                        "linux.resources.memory.swap",
                        "needs linux.resources.memory.limit",
                    )
                })?;
                if swap < l {
                    return Err(EngineError::invalid(
                        "linux.resources.memory.swap",
                        format!("{swap} is below memory.limit {l} (swap counts memory + swap)"),
                    ));
                }
                put("memory.swap.max", (swap - l).to_string());
            }
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares().filter(|s| *s > 0) {
            // runc's mapping of [2, 262144] onto [1, 10000].
            let s = shares.clamp(2, 262_144);
            put("cpu.weight", (1 + ((s - 2) * 9999) / 262_142).to_string());
        }
        let period = c.period().filter(|p| *p > 0);
        match (c.quota(), period) {
            (Some(q), p) if q > 0 => put("cpu.max", format!("{q} {}", p.unwrap_or(100_000))),
            (Some(_), p) => put("cpu.max", format!("max {}", p.unwrap_or(100_000))),
            (None, Some(p)) => put("cpu.max", format!("max {p}")),
            (None, None) => {}
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            check_list(cpus, "linux.resources.cpu.cpus")?;
            put("cpuset.cpus", cpus.to_string());
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            check_list(mems, "linux.resources.cpu.mems")?;
            put("cpuset.mems", mems.to_string());
        }
    }
    if let Some(p) = r.pids() {
        put(
            "pids.max",
            if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".into()
            },
        );
    }
    for (k, v) in r.unified().iter().flatten() {
        let ok_key = !k.is_empty()
            && k.len() <= 64
            && k.contains('.')
            && !k.starts_with("cgroup.")
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        if !ok_key {
            return Err(EngineError::invalid(
                format!("linux.resources.unified[{k:?}]"),
                "not a cgroup v2 interface file name",
            ));
        }
        if v.len() > 4096 || v.contains('\0') {
            return Err(EngineError::invalid(
                format!("linux.resources.unified[{k:?}]"),
                "bad value",
            ));
        }
        put(k, v.clone());
    }
    // Device rules are an eBPF program, not a file: see `devices`.
    if r.block_io().is_some()
        || r.hugepage_limits().is_some()
        || r.rdma().is_some()
        || r.network().is_some()
    {
        tracing::warn!(
            "linux.resources: blockIO / hugepageLimits / rdma / network are not applied yet"
        );
    }
    Ok(out)
}

fn check_list(s: &str, field: &str) -> Result<(), EngineError> {
    if s.len() > 1024
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
    {
        return Err(EngineError::invalid(
            field,
            format!("{s:?} is not a list like 0-3,5"),
        ));
    }
    Ok(())
}

/// Validates `linux.cgroupsPath` (relative to the engine's cgroup root;
/// a leading `/` is allowed; no `..`; no systemd `slice:prefix:name` form).
pub fn relative_path(p: &Path) -> Result<PathBuf, EngineError> {
    let s = p.to_string_lossy();
    if s.contains(':') {
        return Err(EngineError::invalid(
            "linux.cgroupsPath",
            "systemd cgroup paths are not supported",
        ));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(EngineError::invalid(
                    "linux.cgroupsPath",
                    "must not contain ..",
                ))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(EngineError::invalid("linux.cgroupsPath", "empty"));
    }
    Ok(out)
}

/// A container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

fn ctx(path: &Path, what: &str) -> impl FnOnce(io::Error) -> EngineError {
    let what = what.to_string();
    let path = path.display().to_string();
    move |e| EngineError::Internal(format!("cgroup {path}: {what}: {e}"))
}

impl Cgroup {
    /// Creates `root/rel`, enabling the controllers in every ancestor.
    pub fn create(root: &Path, rel: &Path) -> Result<Cgroup, EngineError> {
        let mut cur = root.to_path_buf();
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            enable_controllers(&cur);
            cur.push(c);
            match fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && i + 1 < comps.len() => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(EngineError::AlreadyExists(format!(
                        "cgroup {} exists already",
                        cur.display()
                    )))
                }
                Err(e) => return Err(ctx(&cur, "mkdir")(e)),
            }
        }
        Ok(Cgroup { path: cur })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the resource files.
    pub fn apply(&self, files: &[(String, String)]) -> Result<(), EngineError> {
        for (k, v) in files {
            fs::write(self.path.join(k), v).map_err(|e| {
                EngineError::Internal(format!(
                    "cgroup {}: writing {v:?} to {k}: {e}",
                    self.path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Moves a process into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), EngineError> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(ctx(&self.path, "cgroup.procs"))
    }

    /// Pids in the cgroup (at most `max`).
    pub fn procs(&self, max: usize) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(max)
            .collect()
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel
    /// reports the new state (up to 5 s).
    pub fn freeze(&self, frozen: bool) -> Result<(), EngineError> {
        fs::write(
            self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
        .map_err(ctx(&self.path, "cgroup.freeze"))?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let ev = fs::read_to_string(self.path.join("cgroup.events"))
                .map_err(ctx(&self.path, "cgroup.events"))?;
            if ev.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::Internal(format!(
                    "cgroup {}: not {want} after 5 s",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the cgroup is frozen.
    pub fn is_frozen(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.freeze"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Sends `sig` to every process in the cgroup.
    pub fn signal_all(&self, sig: i32) {
        for pid in self.procs(usize::MAX) {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGKILLs everything (cgroup.kill when available, which also catches
    /// forks racing with us), thawing first so the kill is delivered.
    pub fn kill_all(&self) {
        let _ = fs::write(self.path.join("cgroup.freeze"), "0");
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            self.signal_all(libc::SIGKILL);
        }
    }

    /// memory.events `oom_kill` (0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        read_kv(&self.path.join("memory.events"))
            .into_iter()
            .find(|(k, _)| k == "oom_kill")
            .map(|(_, v)| v)
            .unwrap_or(0)
    }

    /// Removes the (empty) cgroup, retrying while processes drain.
    pub fn remove(&self) -> Result<(), EngineError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(ctx(&self.path, "rmdir")(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Resource usage.
    pub fn stats(&self) -> Stats {
        let p = &self.path;
        let cpu = read_kv(&p.join("cpu.stat"));
        let get = |kv: &[(String, u64)], k: &str| {
            kv.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| *v)
                .unwrap_or(0)
        };
        let mut memory_stat = read_kv(&p.join("memory.stat"));
        memory_stat.truncate(128);
        memory_stat.retain(|(k, _)| k.len() <= 64);
        let io = fs::read_to_string(p.join("io.stat"))
            .unwrap_or_default()
            .lines()
            .take(256)
            .filter_map(parse_io_line)
            .collect();
        Stats {
            cpu_usage_usec: get(&cpu, "usage_usec"),
            cpu_user_usec: get(&cpu, "user_usec"),
            cpu_system_usec: get(&cpu, "system_usec"),
            cpu_nr_periods: get(&cpu, "nr_periods"),
            cpu_nr_throttled: get(&cpu, "nr_throttled"),
            cpu_throttled_usec: get(&cpu, "throttled_usec"),
            memory_usage: read_u64(&p.join("memory.current")),
            memory_limit: read_u64(&p.join("memory.max")),
            swap_usage: read_u64(&p.join("memory.swap.current")),
            oom_kills: self.oom_kills(),
            memory_stat,
            pids_current: read_u64(&p.join("pids.current")),
            pids_limit: read_u64(&p.join("pids.max")),
            io,
        }
    }
}

/// Writes `+ctrl` for each wanted controller that `dir` offers into its
/// cgroup.subtree_control, one at a time (failures are not fatal: a
/// missing controller just means that limit cannot be set).
fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        let has = |s: &str| s.split_ascii_whitespace().any(|x| x == *c);
        if has(&available) && !has(&enabled) {
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::debug!("{}: +{c}: {e}", dir.display());
            }
        }
    }
}

/// A cgroup's usage numbers (0 where a file is missing; limits: 0 = max).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// cpu.stat user_usec.
    pub cpu_user_usec: u64,
    /// cpu.stat system_usec.
    pub cpu_system_usec: u64,
    /// cpu.stat nr_periods.
    pub cpu_nr_periods: u64,
    /// cpu.stat nr_throttled.
    pub cpu_nr_throttled: u64,
    /// cpu.stat throttled_usec.
    pub cpu_throttled_usec: u64,
    /// memory.current.
    pub memory_usage: u64,
    /// memory.max.
    pub memory_limit: u64,
    /// memory.swap.current.
    pub swap_usage: u64,
    /// memory.events oom_kill.
    pub oom_kills: u64,
    /// memory.stat (at most 128 keys).
    pub memory_stat: Vec<(String, u64)>,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max.
    pub pids_limit: u64,
    /// io.stat: (major, minor, rbytes, wbytes, rios, wios).
    pub io: Vec<(u32, u32, u64, u64, u64, u64)>,
}

fn read_u64(p: &Path) -> u64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_kv(p: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn parse_io_line(l: &str) -> Option<(u32, u32, u64, u64, u64, u64)> {
    let mut it = l.split_ascii_whitespace();
    let (maj, min) = it.next()?.split_once(':')?;
    let mut r = (maj.parse().ok()?, min.parse().ok()?, 0, 0, 0, 0);
    for kv in it {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "rbytes" => r.2 = v,
            "wbytes" => r.3 = v,
            "rios" => r.4 = v,
            "wios" => r.5 = v,
            _ => {}
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(j: &str) -> LinuxResources {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn maps_oci_resources_to_v2_files() {
        let f = resource_files(&res(
            r#"{"memory":{"limit":104857600,"swap":209715200,"reservation":1000},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
                "pids":{"limit":100},"unified":{"memory.high":"90000000"},
                "devices":[{"allow":false,"access":"rwm"}]}"#,
        ))
        .unwrap();
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("104857600"));
        assert_eq!(get("memory.swap.max"), Some("104857600"));
        assert_eq!(get("memory.low"), Some("1000"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0-1"));
        assert_eq!(get("cpuset.mems"), Some("0"));
        assert_eq!(get("pids.max"), Some("100"));
        assert_eq!(get("memory.high"), Some("90000000"));

        let f = resource_files(&res(
            r#"{"memory":{"limit":-1,"swap":-1},"cpu":{"quota":-1},"pids":{"limit":0}}"#,
        ))
        .unwrap();
        assert_eq!(
            f,
            [
                ("memory.max".to_string(), "max".to_string()),
                ("memory.swap.max".into(), "max".into()),
                ("cpu.max".into(), "max 100000".into()),
                ("pids.max".into(), "max".into())
            ]
        );
        let e = resource_files(&res(r#"{"memory":{"limit":100,"swap":50}}"#)).unwrap_err();
        assert!(e.to_string().contains("linux.resources.memory.swap"), "{e}");
        let e = resource_files(&res(r#"{"unified":{"../../x":"1"}}"#)).unwrap_err();
        assert!(e.to_string().contains("unified"), "{e}");
        let e = resource_files(&res(r#"{"cpu":{"cpus":"0;rm"}}"#)).unwrap_err();
        assert!(e.to_string().contains("linux.resources.cpu.cpus"), "{e}");
    }

    #[test]
    fn cgroups_paths() {
        assert_eq!(relative_path(Path::new("/a/b")).unwrap(), Path::new("a/b"));
        assert!(relative_path(Path::new("/a/../b")).is_err());
        assert!(relative_path(Path::new("system.slice:docker:x")).is_err());
        assert!(relative_path(Path::new("/")).is_err());
    }

    #[test]
    fn parses_stat_files() {
        assert_eq!(
            parse_io_line("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0"),
            Some((8, 0, 10, 20, 1, 2))
        );
        assert_eq!(parse_io_line("garbage"), None);
    }
}
