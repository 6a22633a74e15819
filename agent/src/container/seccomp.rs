//! OCI seccomp profiles compiled to classic BPF with `seccompiler` (pure
//! Rust, no libseccomp C library in the static agent).
//!
//! seccompiler builds filters with one "match" and one "mismatch" action,
//! while an OCI profile has a default action plus entries with their own
//! actions. The profile is therefore compiled into several filters, all
//! installed; the kernel runs every filter and applies the most restrictive
//! result (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > TRACE > LOG > ALLOW):
//!
//! * the *default* filter returns the default action for every syscall that
//!   no entry with another action matches, and ALLOW for the matched ones;
//! * one filter per distinct non-ALLOW entry action (e.g. ERRNO(EPERM)),
//!   returning that action for its entries' syscalls (with their argument
//!   conditions) and ALLOW otherwise.
//!
//! So a syscall matched by an entry gets that entry's action, unless another
//! matching entry is more restrictive (libseccomp leaves such overlaps
//! unspecified too). Argument conditions compare the full 64-bit value
//! (libseccomp's default); `SCMP_CMP_MASKED_EQ` uses `value` as the mask and
//! `valueTwo` as the expected value. Syscall names unknown on this
//! architecture are skipped, like runc does. Filters apply to the native
//! architecture only; other ABIs (e.g. x86 int 0x80) are killed.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction as A, LinuxSeccompOperator as Op};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::EngineError;

#[cfg(target_arch = "x86_64")]
#[path = "syscalls_x86_64.rs"]
mod table;

/// Number of a syscall on this architecture.
#[cfg(target_arch = "x86_64")]
pub fn syscall_number(name: &str) -> Option<i64> {
    table::SYSCALLS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table::SYSCALLS[i].1)
}

/// Number of a syscall on this architecture (none known: no table yet).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall_number(_name: &str) -> Option<i64> {
    None
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

fn action(a: A, errno: Option<u32>, field: &str) -> Result<SeccompAction, EngineError> {
    let ret = errno.unwrap_or(libc::EPERM as u32);
    Ok(match a {
        A::ScmpActAllow => SeccompAction::Allow,
        A::ScmpActErrno => SeccompAction::Errno(ret),
        A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
        A::ScmpActKillProcess => SeccompAction::KillProcess,
        A::ScmpActTrap => SeccompAction::Trap,
        A::ScmpActTrace => SeccompAction::Trace(ret),
        A::ScmpActLog => SeccompAction::Log,
        A::ScmpActNotify => {
            return Err(EngineError::invalid(
                field,
                "SCMP_ACT_NOTIFY is not supported",
            ))
        }
    })
}

fn condition(
    a: &oci_spec::runtime::LinuxSeccompArg,
    field: &str,
) -> Result<SeccompCondition, EngineError> {
    let (op, value) = match a.op() {
        Op::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
        Op::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
        Op::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
        Op::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
        Op::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
        Op::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
        Op::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(a.value()),
            a.value_two().ok_or_else(|| {
                EngineError::invalid(
                    format!("{field}.valueTwo"),
                    "required for SCMP_CMP_MASKED_EQ",
                )
            })?,
        ),
    };
    let index = u8::try_from(a.index())
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| EngineError::invalid(format!("{field}.index"), "must be 0..=5"))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| EngineError::invalid(field, e.to_string()))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds a rule (None = unconditional) for `nr`; an unconditional rule
/// absorbs any conditional ones.
fn add_rule(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    match (rules.get_mut(&nr), rule) {
        (Some(v), _) if v.is_empty() => {}
        (Some(v), Some(r)) => v.push(r),
        (Some(v), None) => v.clear(),
        (None, Some(r)) => {
            rules.insert(nr, vec![r]);
        }
        (None, None) => {
            rules.insert(nr, Vec::new());
        }
    }
}

/// Compiles `linux.seccomp` into BPF programs, to be installed in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, EngineError> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(EngineError::invalid(
            "linux.seccomp",
            "seccomp is not supported on this architecture yet",
        ));
    }
    if profile.listener_path().is_some() {
        return Err(EngineError::invalid(
            "linux.seccomp.listenerPath",
            "seccomp notification is not supported",
        ));
    }
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    // Rules of the default filter (everything matched by an entry whose
    // action differs from the default), and per-action filters.
    let mut matched: Rules = BTreeMap::new();
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(sc.action(), sc.errno_ret(), &format!("{field}.action"))?;
        if act == default {
            continue;
        }
        let conds = sc
            .args()
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, a)| condition(a, &format!("{field}.args[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let rule = if conds.is_empty() {
            None
        } else {
            Some(SeccompRule::new(conds).map_err(|e| EngineError::invalid(&field, e.to_string()))?)
        };
        for name in sc.names() {
            let Some(nr) = syscall_number(name) else {
                tracing::debug!("seccomp: skipping unknown syscall {name:?}");
                continue;
            };
            add_rule(&mut matched, nr, rule.clone());
            if act != SeccompAction::Allow {
                let idx = match by_action.iter().position(|(a, _)| *a == act) {
                    Some(idx) => idx,
                    None => {
                        by_action.push((act.clone(), BTreeMap::new()));
                        by_action.len() - 1
                    }
                };
                add_rule(&mut by_action[idx].1, nr, rule.clone());
            }
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(SeccompFilter::new(
            matched,
            default,
            SeccompAction::Allow,
            ARCH,
        ));
    }
    for (act, rules) in by_action {
        filters.push(SeccompFilter::new(rules, SeccompAction::Allow, act, ARCH));
    }
    filters
        .into_iter()
        .map(|f| {
            let f = f.map_err(|e| EngineError::invalid("linux.seccomp", e.to_string()))?;
            BpfProgram::try_from(f)
                .map_err(|e| EngineError::invalid("linux.seccomp", e.to_string()))
        })
        .collect()
}

/// Child side: installs one filter (no allocation). Without
/// no_new_privileges this needs CAP_SYS_ADMIN. Returns the errno.
pub(crate) fn install(prog: &[seccompiler::sock_filter]) -> Result<(), i32> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: a valid sock_fprog pointing at `prog`, which outlives the call
    // (the kernel copies the program).
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(j: &str) -> LinuxSeccomp {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn table_lookup() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("mkdir"), Some(83));
        assert_eq!(syscall_number("mkdirat"), Some(258));
        assert_eq!(syscall_number("not_a_syscall"), None);
    }

    #[test]
    fn compiles_deny_and_allow_lists() {
        // Deny list: default allow, one errno filter.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat","bogus"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
        // Allow list with a conditional errno entry: default + errno filter.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,"syscalls":[
                {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ERRNO","errnoRet":1,"args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 2);
        let bad = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let e = compile(&bad).unwrap_err().to_string();
        assert!(e.contains("linux.seccomp.syscalls[0].args[0].index"), "{e}");
        let bad = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":3,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        );
        let e = compile(&bad).unwrap_err().to_string();
        assert!(e.contains("valueTwo"), "{e}");
        let bad = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(compile(&bad).is_err());
    }
}
