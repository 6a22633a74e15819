//! Parsing and validating the OCI runtime spec and process objects, and
//! turning a process into a [`ChildPlan`]. Errors name the offending field.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use oci_spec::runtime::{Process, Spec};

use super::process::ChildPlan;
use super::rootfs::cstr;
use super::{capabilities, rlimits, user, EngineError};

/// PATH used when the process environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most args / env entries accepted.
const MAX_ARGS: usize = 65536;

/// Parses config.json bytes.
pub fn parse_spec(json: &[u8]) -> Result<Spec, EngineError> {
    if json.len() > husk_proto::MAX_SPEC_SIZE {
        return Err(EngineError::invalid(
            "oci_spec_json",
            format!("{} bytes, limit {}", json.len(), husk_proto::MAX_SPEC_SIZE),
        ));
    }
    let spec: Spec = parse_json("oci_spec_json", json)?;
    if spec.process().is_none() {
        return Err(EngineError::invalid("process", "required"));
    }
    if spec.linux().is_none() {
        return Err(EngineError::invalid("linux", "required"));
    }
    if let Some(h) = spec.hooks() {
        let any = h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_container().as_ref().is_some_and(|v| !v.is_empty())
            || h.start_container().as_ref().is_some_and(|v| !v.is_empty())
            || h.poststart().as_ref().is_some_and(|v| !v.is_empty())
            || h.poststop().as_ref().is_some_and(|v| !v.is_empty());
        if any {
            return Err(EngineError::invalid("hooks", "OCI hooks are not supported"));
        }
    }
    Ok(spec)
}

/// Parses an OCI process object (ExecProcess).
pub fn parse_process(json: &[u8]) -> Result<Process, EngineError> {
    if json.len() > husk_proto::MAX_SPEC_SIZE {
        return Err(EngineError::invalid(
            "process_json",
            format!("{} bytes, limit {}", json.len(), husk_proto::MAX_SPEC_SIZE),
        ));
    }
    parse_json("process_json", json)
}

/// Deserializes `json`; a type error names the JSON path of the offending value (e.g.
/// `oci_spec_json.linux.resources.memory.limit`), not only its line and column.
fn parse_json<T: serde::de::DeserializeOwned>(what: &str, json: &[u8]) -> Result<T, EngineError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            what.to_string()
        } else {
            format!("{what}.{path}")
        };
        EngineError::invalid(field, e.into_inner().to_string())
    })?;
    // Trailing bytes after the object are as malformed as a truncated one.
    de.end()
        .map_err(|e| EngineError::invalid(what.to_string(), e.to_string()))?;
    Ok(value)
}

/// Builds the user-facing part of a child plan from `process`: user, caps,
/// rlimits, env, cwd, args, terminal. `rootfs` is where `/etc/passwd` is
/// read. Namespaces, mounts and seccomp are added by the caller.
pub(crate) fn process_plan(
    p: &Process,
    rootfs: &Path,
    terminal: bool,
) -> Result<ChildPlan, EngineError> {
    let args = p.args().as_deref().unwrap_or(&[]);
    if args.is_empty() || args[0].is_empty() {
        return Err(EngineError::invalid("process.args", "must not be empty"));
    }
    if args.len() > MAX_ARGS {
        return Err(EngineError::invalid("process.args", "too many"));
    }
    let argv = args
        .iter()
        .enumerate()
        .map(|(i, a)| cstr(a.as_bytes(), &format!("process.args[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let env = p.env().as_deref().unwrap_or(&[]);
    if env.len() > MAX_ARGS {
        return Err(EngineError::invalid("process.env", "too many"));
    }
    let mut envp = Vec::with_capacity(env.len() + 1);
    let mut path_var = None;
    let mut has_home = false;
    for (i, e) in env.iter().enumerate() {
        let field = format!("process.env[{i}]");
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                if k == "PATH" {
                    path_var = Some(v.to_string());
                }
                has_home |= k == "HOME";
            }
            _ => return Err(EngineError::invalid(field, "must be KEY=VALUE")),
        }
        envp.push(cstr(e.as_bytes(), &field)?);
    }
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return Err(EngineError::invalid("process.cwd", "must be absolute"));
    }
    let u = user::resolve(rootfs, p.user())?;
    if !has_home {
        let home = u.home.clone().unwrap_or_else(|| "/".into());
        envp.push(cstr(format!("HOME={home}").as_bytes(), "process.env")?);
    }
    let caps = capabilities::from_spec(p.capabilities().as_ref())?;
    let rl = rlimits::from_spec(p.rlimits().as_deref().unwrap_or(&[]))?;
    if let Some(adj) = p.oom_score_adj() {
        if !(-1000..=1000).contains(&adj) {
            return Err(EngineError::invalid(
                "process.oomScoreAdj",
                "must be -1000..=1000",
            ));
        }
    }
    if p.apparmor_profile().as_ref().is_some_and(|s| !s.is_empty())
        || p.selinux_label().as_ref().is_some_and(|s| !s.is_empty())
    {
        tracing::warn!("process: apparmorProfile / selinuxLabel ignored (no LSM in the guest)");
    }
    // execvp-style search, done here so the child need not allocate.
    let exec_paths = if args[0].contains('/') {
        vec![argv[0].clone()]
    } else {
        path_var
            .as_deref()
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| {
                cstr(
                    format!("{}/{}", d.trim_end_matches('/'), args[0]).as_bytes(),
                    "process.args[0]",
                )
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if exec_paths.is_empty() {
        return Err(EngineError::invalid(
            "process.env",
            "PATH has no absolute directory to find process.args[0] in",
        ));
    }
    Ok(ChildPlan {
        terminal,
        rlimits: rl,
        umask: u.umask,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        uid: u.uid,
        gid: u.gid,
        groups: u.groups,
        caps,
        last_cap: capabilities::last_cap(),
        cwd: CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| EngineError::invalid("process.cwd", "contains a NUL byte"))?,
        exec_paths,
        argv,
        envp,
        ..ChildPlan::default()
    })
}

/// Terminal size from `process.consoleSize`.
pub fn console_size(p: &Process) -> Option<(u16, u16)> {
    p.console_size().as_ref().map(|b| {
        (
            b.height().min(u16::MAX as u64) as u16,
            b.width().min(u16::MAX as u64) as u16,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_specs_naming_the_field() {
        let e = parse_spec(b"{not json").unwrap_err();
        assert!(e.to_string().contains("oci_spec_json"), "{e}");
        let e = parse_spec(br#"{"ociVersion":"1.0.2"}"#).unwrap_err();
        assert!(e.to_string().contains("process: required"), "{e}");
        let mut spec = Spec::default();
        spec.set_hooks(Some(
            serde_json::from_str(r#"{"prestart":[{"path":"/bin/true"}]}"#).unwrap(),
        ));
        let e = parse_spec(&serde_json::to_vec(&spec).unwrap()).unwrap_err();
        assert!(e.to_string().contains("hooks"), "{e}");
        let big = vec![b' '; husk_proto::MAX_SPEC_SIZE + 1];
        assert!(parse_spec(&big).is_err());
        // A wrongly typed value deep in the spec is named by its path.
        let e = parse_spec(
            br#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"cwd":"/"},"linux":{"resources":{"memory":{"limit":"lots"}}}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("oci_spec_json.linux.resources.memory.limit"),
            "{e}"
        );
        let e =
            parse_process(br#"{"user":{"uid":0,"gid":0},"cwd":"/","args":["sh",7]}"#).unwrap_err();
        assert!(e.to_string().contains("process_json.args[1]"), "{e}");
        let e = parse_process(br#"{"user":{"uid":0,"gid":0},"cwd":"/"} trailing"#).unwrap_err();
        assert!(e.to_string().contains("process_json"), "{e}");
    }

    #[test]
    fn process_plans() {
        let dir = tempfile::tempdir().unwrap();
        let p: Process = serde_json::from_str(
            r#"{"user":{"uid":0,"gid":0},"args":["sh","-c","true"],"cwd":"/","env":["PATH=/bin:rel:/usr/bin/"]}"#,
        )
        .unwrap();
        let plan = process_plan(&p, dir.path(), false).unwrap();
        assert_eq!(
            plan.exec_paths,
            [c"/bin/sh".to_owned(), c"/usr/bin/sh".to_owned()]
        );
        assert!(plan.envp.iter().any(|e| e.as_bytes() == b"HOME=/"));
        for (json, field) in [
            (
                r#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#,
                "process.args",
            ),
            (
                r#"{"user":{"uid":0,"gid":0},"args":["x"],"cwd":"rel"}"#,
                "process.cwd",
            ),
            (
                r#"{"user":{"uid":0,"gid":0},"args":["x"],"cwd":"/","env":["NOVALUE"]}"#,
                "process.env[0]",
            ),
            (
                r#"{"user":{"uid":0,"gid":0},"args":["x"],"cwd":"/","oomScoreAdj":5000}"#,
                "process.oomScoreAdj",
            ),
            (
                r#"{"user":{"uid":0,"gid":0},"args":["a\u0000b"],"cwd":"/"}"#,
                "process.args[0]",
            ),
        ] {
            let p: Process = serde_json::from_str(json).unwrap();
            let e = process_plan(&p, dir.path(), false).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        }
    }
}
