//! Facts for `GuestInfo`: uname, /proc/uptime, /proc/meminfo and the number
//! of online CPUs.

use husk_proto::v1::GuestInfoResponse;
use nix::unistd::{sysconf, SysconfVar};

/// Why guest facts could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum GuestInfoError {
    /// uname(2) failed.
    #[error("uname: {0}")]
    Uname(#[source] nix::Error),
    /// A /proc file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A /proc file had unexpected contents.
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file.
        path: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// sysconf(_SC_NPROCESSORS_ONLN) failed or returned nonsense.
    #[error("sysconf(_SC_NPROCESSORS_ONLN): {0}")]
    Cpus(String),
}

const UPTIME: &str = "/proc/uptime";
const MEMINFO: &str = "/proc/meminfo";

/// Collects everything `GuestInfo` reports.
pub fn collect() -> Result<GuestInfoResponse, GuestInfoError> {
    let uts = nix::sys::utsname::uname().map_err(GuestInfoError::Uname)?;
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| GuestInfoError::Read { path, source })
    };
    let uptime_ms = parse_uptime_ms(&read(UPTIME)?).map_err(|reason| GuestInfoError::Parse {
        path: UPTIME,
        reason,
    })?;
    let (mem_total_bytes, mem_available_bytes) =
        parse_meminfo(&read(MEMINFO)?).map_err(|reason| GuestInfoError::Parse {
            path: MEMINFO,
            reason,
        })?;
    let online_cpus = match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => {
            u32::try_from(n).map_err(|e| GuestInfoError::Cpus(e.to_string()))?
        }
        Ok(other) => return Err(GuestInfoError::Cpus(format!("returned {other:?}"))),
        Err(e) => return Err(GuestInfoError::Cpus(e.to_string())),
    };
    Ok(GuestInfoResponse {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        kernel_version: uts.version().to_string_lossy().into_owned(),
        uptime_ms,
        mem_total_bytes,
        mem_available_bytes,
        online_cpus,
    })
}

/// Parses the first field of /proc/uptime ("12345.67 ...") into milliseconds,
/// without going through floating point.
pub fn parse_uptime_ms(s: &str) -> Result<u64, String> {
    let first = s
        .split_ascii_whitespace()
        .next()
        .ok_or_else(|| "empty".to_string())?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let bad = || format!("bad uptime {first:?}");
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let mut ms = 0u64;
    for i in 0..3 {
        ms = ms * 10 + frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
    }
    secs.checked_mul(1000)
        .and_then(|v| v.checked_add(ms))
        .ok_or_else(bad)
}

/// Returns (MemTotal, MemAvailable) in bytes from /proc/meminfo contents.
pub fn parse_meminfo(s: &str) -> Result<(u64, u64), String> {
    let mut total = None;
    let mut available = None;
    for line in s.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        let mut it = rest.split_ascii_whitespace();
        let value: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad {key} line {line:?}"))?;
        let bytes = match it.next() {
            Some("kB") => value.checked_mul(1024),
            None => Some(value),
            Some(unit) => return Err(format!("unknown unit {unit:?} for {key}")),
        }
        .ok_or_else(|| format!("{key} overflows"))?;
        *slot = Some(bytes);
    }
    match (total, available) {
        (Some(t), Some(a)) => Ok((t, a.min(t))),
        _ => Err("MemTotal or MemAvailable missing".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_ms("1234.56 789.01\n"), Ok(1_234_560));
        assert_eq!(parse_uptime_ms("0.05 0.00"), Ok(50));
        assert_eq!(parse_uptime_ms("7 1"), Ok(7000));
        assert_eq!(parse_uptime_ms("1.23456 1"), Ok(1234));
        assert!(parse_uptime_ms("").is_err());
        assert!(parse_uptime_ms("-1.0 0").is_err());
        assert!(parse_uptime_ms("1e5 0").is_err());
        assert!(parse_uptime_ms("99999999999999999999.0 0").is_err());
    }

    #[test]
    fn meminfo() {
        let s = "MemTotal:         253952 kB\nMemFree:          200000 kB\nMemAvailable:     220000 kB\nBuffers: 0 kB\n";
        assert_eq!(parse_meminfo(s), Ok((253952 * 1024, 220000 * 1024)));
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB").is_err());
        assert!(parse_meminfo("MemTotal: 1 MB\nMemAvailable: 1 kB").is_err());
    }

    #[test]
    fn collect_on_this_machine() {
        let info = collect().unwrap();
        assert!(!info.kernel_release.is_empty());
        assert!(info.mem_total_bytes > 0 && info.mem_available_bytes <= info.mem_total_bytes);
        assert!(info.online_cpus >= 1);
        assert!(info.uptime_ms > 0);
    }
}
