//! POSIX resource limits (`process.rlimits`).

use oci_spec::runtime::PosixRlimitType as T;

use super::EngineError;

/// One limit to set: (resource, soft, hard).
pub type Rlimit = (libc::__rlimit_resource_t, u64, u64);

fn resource(t: T) -> Option<libc::__rlimit_resource_t> {
    Some(match t {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// Validates the spec's rlimits: known types, no duplicates, soft <= hard.
pub fn from_spec(limits: &[oci_spec::runtime::PosixRlimit]) -> Result<Vec<Rlimit>, EngineError> {
    let mut out: Vec<Rlimit> = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        let field = || format!("process.rlimits[{i}]");
        let res = resource(l.typ())
            .ok_or_else(|| EngineError::invalid(format!("{}.type", field()), "unsupported"))?;
        if out.iter().any(|(r, _, _)| *r == res) {
            return Err(EngineError::invalid(
                format!("{}.type", field()),
                format!("{:?} given twice", l.typ()),
            ));
        }
        if l.soft() > l.hard() {
            return Err(EngineError::invalid(
                format!("{}.soft", field()),
                format!("soft {} exceeds hard {}", l.soft(), l.hard()),
            ));
        }
        out.push((res, l.soft(), l.hard()));
    }
    Ok(out)
}

/// Child side: sets one limit. Returns the errno.
pub(crate) fn apply(limit: &Rlimit) -> Result<(), i32> {
    let rl = libc::rlimit {
        rlim_cur: limit.1,
        rlim_max: limit.2,
    };
    // SAFETY: valid rlimit struct; prlimit on ourselves (pid 0).
    let r = unsafe { libc::prlimit(0, limit.0, &rl, std::ptr::null_mut()) };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let l: Vec<oci_spec::runtime::PosixRlimit> = serde_json::from_str(
            r#"[{"type":"RLIMIT_NOFILE","soft":1024,"hard":4096},{"type":"RLIMIT_CORE","soft":0,"hard":0}]"#,
        )
        .unwrap();
        let r = from_spec(&l).unwrap();
        assert_eq!(r[0], (libc::RLIMIT_NOFILE, 1024, 4096));
        let l: Vec<oci_spec::runtime::PosixRlimit> =
            serde_json::from_str(r#"[{"type":"RLIMIT_NOFILE","soft":10,"hard":5}]"#).unwrap();
        assert!(from_spec(&l)
            .unwrap_err()
            .to_string()
            .contains("process.rlimits[0].soft"));
        let l: Vec<oci_spec::runtime::PosixRlimit> = serde_json::from_str(
            r#"[{"type":"RLIMIT_NOFILE","soft":1,"hard":5},{"type":"RLIMIT_NOFILE","soft":1,"hard":5}]"#,
        )
        .unwrap();
        assert!(from_spec(&l)
            .unwrap_err()
            .to_string()
            .contains("process.rlimits[1].type"));
    }
}
