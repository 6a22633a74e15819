//! Turning the OCI spec containerd wrote for the host into the spec the agent runs in the guest.
//!
//! The spec is edited as JSON (not through typed structs) so that fields this crate does not know reach the
//! agent unchanged. What changes:
//! * `network` namespace: removed. The pod's network is the guest's own network namespace.
//! * namespace `path`s point at host processes (`/proc/<pause pid>/ns/ipc`): for a container of a pod, pid,
//!   ipc and uts paths are rewritten to the sandbox container's init in the guest; other paths are dropped
//!   (a new namespace).
//! * bind mounts of host files and directories (volumes, `/etc/hosts`, `/etc/resolv.conf`, the pod's shm)
//!   are made visible through the pod's share: the shim bind-mounts each source into the share and the
//!   spec's `source` becomes the guest path.
//! * `hooks`: run nowhere yet (logged).

use std::path::PathBuf;

use serde_json::Value;

use crate::sandbox::SandboxDir;

/// Largest config.json the shim reads (the agent's limit too).
pub const MAX_SPEC_SIZE: u64 = husk_proto::MAX_SPEC_SIZE as u64;

pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than {MAX_SPEC_SIZE}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: not an OCI runtime spec: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("OCI spec field {field}: {reason}")]
    Field { field: String, reason: String },
}

/// What role a container plays in its pod, from the CRI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// The pod's sandbox (pause) container: it boots the VM.
    Sandbox { sandbox_id: String },
    /// An application container of the pod `sandbox_id`.
    Container { sandbox_id: String },
    /// No CRI annotations (`ctr run`): a pod of its own.
    Standalone,
}

impl PodRole {
    /// The id that groups containers into one shim and one VM.
    pub fn group<'a>(&'a self, container_id: &'a str) -> &'a str {
        match self {
            PodRole::Sandbox { sandbox_id } | PodRole::Container { sandbox_id } => sandbox_id,
            PodRole::Standalone => container_id,
        }
    }
}

/// A parsed config.json.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub json: Value,
}

/// A host path to bind-mount into the share for the container (index = the spec's mount index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub index: usize,
    pub source: PathBuf,
    /// `rbind` (submounts too) rather than `bind`.
    pub recursive: bool,
    pub readonly: bool,
}

/// The spec for the guest plus the host bind mounts it relies on.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub binds: Vec<HostBind>,
}

impl BundleSpec {
    /// Reads `<bundle>/config.json`, bounded in size, and checks it against the OCI schema (typed parse).
    pub fn load(bundle: &std::path::Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let meta = std::fs::metadata(&path).map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.len() > MAX_SPEC_SIZE {
            return Err(SpecError::TooLarge {
                path,
                size: meta.len(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&bytes).map_err(|message| SpecError::Invalid { path, message })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        // The typed parse names the bad field; the JSON value keeps every field for the agent.
        serde_json::from_slice::<oci_spec::runtime::Spec>(bytes).map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(Self { json })
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.json
            .get("annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
    }

    pub fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        self.json
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn role(&self) -> Result<PodRole, SpecError> {
        let sandbox_id = self.annotation(ANNOTATION_SANDBOX_ID).map(str::to_string);
        // The pod id names a directory and a socket: it must be a plain id, never a path.
        if let Some(id) = sandbox_id
            .as_deref()
            .filter(|id| !husk_proto::is_valid_id(id))
        {
            return Err(SpecError::Field {
                field: format!("annotations.{ANNOTATION_SANDBOX_ID}"),
                reason: format!("{id:?} is not a valid pod id ([A-Za-z0-9][A-Za-z0-9_.-]{{0,63}})"),
            });
        }
        match (self.annotation(ANNOTATION_CONTAINER_TYPE), sandbox_id) {
            (None, _) => Ok(PodRole::Standalone),
            (Some("sandbox"), Some(sandbox_id)) => Ok(PodRole::Sandbox { sandbox_id }),
            (Some("container"), Some(sandbox_id)) => Ok(PodRole::Container { sandbox_id }),
            (Some(t), None) => Err(SpecError::Field {
                field: format!("annotations.{ANNOTATION_SANDBOX_ID}"),
                reason: format!("missing while {ANNOTATION_CONTAINER_TYPE} is {t:?}"),
            }),
            (Some(t), Some(_)) => Err(SpecError::Field {
                field: format!("annotations.{ANNOTATION_CONTAINER_TYPE}"),
                reason: format!("{t:?} is neither \"sandbox\" nor \"container\""),
            }),
        }
    }

    /// The network namespace the container is to join (`linux.namespaces[type=network].path`): the pod's,
    /// which CNI configured (or the one a user named with `ctr run --with-ns network:PATH`). Its interfaces
    /// are carried into the VM; `None` (no entry, or a new empty namespace) gives a VM with loopback only.
    pub fn network_namespace(&self) -> Option<std::path::PathBuf> {
        self.json["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|ns| ns["type"] == "network")?["path"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// Extra VM resources a standalone container asks for: (memory MiB from `linux.resources.memory.limit`,
    /// vCPUs from the CPU quota / period).
    pub fn standalone_resources(&self) -> (u64, u32) {
        let r = &self.json["linux"]["resources"];
        let mem = r["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|l| (l as u64).div_ceil(1024 * 1024))
            .unwrap_or(0);
        let quota = r["cpu"]["quota"].as_i64().filter(|q| *q > 0);
        let period = r["cpu"]["period"]
            .as_u64()
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        let cpus = quota
            .map(|q| (q as u64).div_ceil(period) as u32)
            .unwrap_or(0);
        (mem, cpus)
    }

    /// The spec for the guest. `sandbox_init_pid`: the guest pid of the pod's sandbox container init, for
    /// containers that join its namespaces.
    pub fn for_guest(
        &self,
        container_id: &str,
        sandbox_init_pid: Option<u32>,
    ) -> Result<GuestSpec, SpecError> {
        let mut json = self.json.clone();
        if json.get("hooks").is_some_and(|h| !h.is_null()) {
            tracing::warn!(
                container = container_id,
                "OCI hooks in the spec are not run by Husk (not supported yet)"
            );
            json.as_object_mut().map(|o| o.remove("hooks"));
        }
        if let Some(nss) = json
            .get_mut("linux")
            .and_then(|l| l.get_mut("namespaces"))
            .and_then(Value::as_array_mut)
        {
            nss.retain(|ns| ns["type"] != "network");
            for ns in nss.iter_mut() {
                let Some(obj) = ns.as_object_mut() else {
                    continue;
                };
                if obj.get("path").is_none_or(|p| p.is_null()) {
                    continue;
                }
                let ty = obj
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                match (ty.as_str(), sandbox_init_pid) {
                    ("pid" | "ipc" | "uts", Some(pid)) => {
                        obj.insert("path".into(), Value::from(format!("/proc/{pid}/ns/{ty}")));
                    }
                    _ => {
                        obj.remove("path");
                    }
                }
            }
        }
        let mut binds = Vec::new();
        if let Some(mounts) = json.get_mut("mounts").and_then(Value::as_array_mut) {
            for (index, m) in mounts.iter_mut().enumerate() {
                let options: Vec<String> = m["options"]
                    .as_array()
                    .map(|o| {
                        o.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let is_bind =
                    m["type"] == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    continue;
                }
                let Some(source) = m["source"].as_str().map(PathBuf::from) else {
                    return Err(SpecError::Field {
                        field: format!("mounts[{index}].source"),
                        reason: "a bind mount needs a source".into(),
                    });
                };
                if !source.is_absolute() {
                    return Err(SpecError::Field {
                        field: format!("mounts[{index}].source"),
                        reason: format!("{} is not an absolute host path", source.display()),
                    });
                }
                binds.push(HostBind {
                    index,
                    source,
                    recursive: options.iter().any(|o| o == "rbind"),
                    readonly: options.iter().any(|o| o == "ro"),
                });
                m["source"] = Value::from(SandboxDir::guest_container_mount(container_id, index));
            }
        }
        let json = serde_json::to_vec(&json).map_err(|e| SpecError::Field {
            field: "(spec)".into(),
            reason: e.to_string(),
        })?;
        Ok(GuestSpec { json, binds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: Value) -> BundleSpec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"]}
            ],
            "someFutureField": {"kept": true}
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        BundleSpec::parse(&serde_json::to_vec(&base).unwrap()).unwrap()
    }

    #[test]
    fn guest_spec_rewrites_namespaces_and_binds() {
        let s = spec(serde_json::json!({}));
        let g = s.for_guest("c1", Some(7)).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        let nss = v["linux"]["namespaces"].as_array().unwrap();
        assert!(nss.iter().all(|n| n["type"] != "network"));
        assert_eq!(nss[1]["path"], "/proc/7/ns/ipc");
        assert_eq!(nss[2]["path"], "/proc/7/ns/uts");
        assert!(nss[0].get("path").is_none());
        assert_eq!(v["mounts"][0]["source"], "proc");
        assert_eq!(v["mounts"][1]["source"], "/run/husk/shared/c1/mounts/1");
        assert_eq!(v["mounts"][2]["source"], "/run/husk/shared/c1/mounts/2");
        assert_eq!(v["someFutureField"]["kept"], true);
        assert_eq!(
            g.binds,
            vec![
                HostBind {
                    index: 1,
                    source: "/var/lib/x/hosts".into(),
                    recursive: true,
                    readonly: true
                },
                HostBind {
                    index: 2,
                    source: "/srv/data".into(),
                    recursive: true,
                    readonly: false
                },
            ]
        );
        // Without a sandbox to join, host namespace paths are dropped (new namespaces).
        let g = s.for_guest("c1", None).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert!(v["linux"]["namespaces"][1].get("path").is_none());
    }

    #[test]
    fn roles_and_errors() {
        assert_eq!(
            spec(serde_json::json!({})).role().unwrap(),
            PodRole::Standalone
        );
        let sb = spec(serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}}));
        assert_eq!(
            sb.role().unwrap(),
            PodRole::Sandbox {
                sandbox_id: "pod1".into()
            }
        );
        assert_eq!(sb.role().unwrap().group("x"), "pod1");
        for evil in ["../x", "/", "a/b", ""] {
            let s = spec(serde_json::json!({"annotations": {
                "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": evil}}));
            assert!(
                s.role()
                    .unwrap_err()
                    .to_string()
                    .contains("not a valid pod id"),
                "{evil}"
            );
        }
        let bad = spec(
            serde_json::json!({"annotations": {"io.kubernetes.cri.container-type": "container"}}),
        );
        assert!(bad.role().unwrap_err().to_string().contains("sandbox-id"));
        let rel = spec(
            serde_json::json!({"mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]}),
        );
        let e = rel.for_guest("c", None).unwrap_err().to_string();
        assert!(e.contains("mounts[0].source"), "{e}");
        let e = BundleSpec::parse(br#"{"ociVersion": "1", "process": {"args": 3}}"#).unwrap_err();
        assert!(e.contains("args") || e.contains("sequence"), "{e}");
    }

    #[test]
    fn network_namespace_path() {
        let with = BundleSpec::parse(
            br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            with.network_namespace(),
            Some(std::path::PathBuf::from("/var/run/netns/cni-1"))
        );
        let new_ns = BundleSpec::parse(
            br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"network"}]}}"#,
        )
        .unwrap();
        assert_eq!(new_ns.network_namespace(), None);
    }

    #[test]
    fn standalone_resources() {
        let s = spec(serde_json::json!({"linux": {"resources": {
            "memory": {"limit": 300 * 1024 * 1024 + 1}, "cpu": {"quota": 150000, "period": 100000}}}}));
        assert_eq!(s.standalone_resources(), (301, 2));
        assert_eq!(spec(serde_json::json!({})).standalone_resources(), (0, 0));
    }
}
