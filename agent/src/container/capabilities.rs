//! Linux capabilities: OCI names to bit masks (parent side), and applying
//! all five sets in the child (bounding via `PR_CAPBSET_DROP`, effective /
//! permitted / inheritable via `capset(2)`, ambient via `PR_CAP_AMBIENT`).
//!
//! The child-side functions are allocation free: they run between `clone`
//! and `execve` in a copy of a multi-threaded process.

use super::EngineError;

/// Capability names in kernel numbering order (`CAP_CHOWN` = 0 ...).
pub const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Capability number of an OCI name (`CAP_SYS_ADMIN`).
pub fn number(name: &str) -> Option<u32> {
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// The five sets as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

/// The highest capability the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

/// Converts the spec's capabilities (absent = no capabilities at all).
/// Capabilities unknown to the running kernel are dropped from the sets.
pub fn from_spec(
    caps: Option<&oci_spec::runtime::LinuxCapabilities>,
) -> Result<CapSets, EngineError> {
    let Some(caps) = caps else {
        return Ok(CapSets::default());
    };
    let known = if last_cap() >= 63 {
        u64::MAX
    } else {
        (1u64 << (last_cap() + 1)) - 1
    };
    let mask = |field: &'static str,
                set: &Option<oci_spec::runtime::Capabilities>|
     -> Result<u64, EngineError> {
        let mut m = 0u64;
        for cap in set.iter().flatten() {
            // oci-spec serialises a capability as its OCI name.
            let name = serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let n = number(&name).ok_or_else(|| {
                EngineError::invalid(
                    format!("process.capabilities.{field}"),
                    format!("unknown capability {name:?}"),
                )
            })?;
            m |= 1u64 << n;
        }
        Ok(m & known)
    };
    Ok(CapSets {
        bounding: mask("bounding", caps.bounding())?,
        effective: mask("effective", caps.effective())?,
        permitted: mask("permitted", caps.permitted())?,
        inheritable: mask("inheritable", caps.inheritable())?,
        ambient: mask("ambient", caps.ambient())?,
    })
}

/// Child side: drops every capability not in `bounding` from the bounding
/// set. Needs CAP_SETPCAP (run before changing user). Returns the errno.
pub(crate) fn drop_bounding(bounding: u64, last_cap: u32) -> Result<(), (u32, i32)> {
    for cap in 0..=last_cap {
        if bounding & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = errno();
            if e != libc::EINVAL {
                return Err((cap, e));
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Child side: sets effective, permitted and inheritable of this thread.
pub(crate) fn capset(sets: &CapSets) -> Result<(), i32> {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = |m: u64| m as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let data = [
        CapData {
            effective: lo(sets.effective),
            permitted: lo(sets.permitted),
            inheritable: lo(sets.inheritable),
        },
        CapData {
            effective: hi(sets.effective),
            permitted: hi(sets.permitted),
            inheritable: hi(sets.inheritable),
        },
    ];
    // SAFETY: header and a two-element data array as capset(2) expects for
    // version 3; both live across the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Child side: clears the ambient set, then raises the requested ones (each
/// must be permitted and inheritable).
pub(crate) fn set_ambient(ambient: u64, last_cap: u32) -> Result<(), (u32, i32)> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        let e = errno();
        // Kernels without ambient capabilities: fine unless some are asked.
        if ambient == 0 {
            return Ok(());
        }
        return Err((0, e));
    }
    for cap in 0..=last_cap {
        if ambient & (1u64 << cap) == 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if r != 0 {
            return Err((cap, errno()));
        }
    }
    Ok(())
}

fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_masks() {
        assert_eq!(number("CAP_CHOWN"), Some(0));
        assert_eq!(number("CAP_NET_RAW"), Some(13));
        assert_eq!(number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(number("CAP_NOPE"), None);
        let caps: oci_spec::runtime::LinuxCapabilities = serde_json::from_str(
            r#"{"bounding":["CAP_CHOWN","CAP_NET_RAW"],"effective":["CAP_NET_RAW"],
                "permitted":["CAP_CHOWN","CAP_NET_RAW"],"ambient":[]}"#,
        )
        .unwrap();
        let s = from_spec(Some(&caps)).unwrap();
        assert_eq!(s.bounding, 0x2001);
        assert_eq!(s.effective, 0x2000);
        assert_eq!(s.permitted, 0x2001);
        assert_eq!(s.inheritable, 0);
        assert_eq!(from_spec(None).unwrap(), CapSets::default());
        assert!(
            serde_json::from_str::<oci_spec::runtime::LinuxCapabilities>(
                r#"{"bounding":["CAP_BOGUS"]}"#
            )
            .is_err()
        );
    }
}
