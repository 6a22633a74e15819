//! The short-lived actions containerd runs the shim binary for.
//!
//! * `start` (in the bundle directory): decide which pod the container belongs to, reuse that pod's shim if
//!   it already serves, else start a new long-running shim process (this binary without an action, with
//!   `-socket`), and print the TTRPC address for containerd.
//! * `delete` (after a shim died): remove what the dead shim left (the pod VM, mounts, state), and report the
//!   task as killed.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::DeleteResponse;

use crate::config::ShimConfig;
use crate::sandbox::{leftovers, SandboxDir};
use crate::task::events::timestamp;
use crate::task::spec::BundleSpec;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("container {id}: {source}")]
    Spec {
        id: String,
        #[source]
        source: crate::task::spec::SpecError,
    },
    #[error("starting the shim server {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the shim server exited before serving ({status}); see containerd's log for the shim's own"
    )]
    ServerFailed { status: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parameters containerd passes on the command line.
#[derive(Debug, Clone, Default)]
pub struct ShimArgs {
    pub namespace: String,
    pub id: String,
    pub address: String,
    pub debug: bool,
}

/// The pod (grouping) id of a container from its bundle's spec.
pub fn pod_id(bundle: &Path, id: &str) -> Result<String, BootstrapError> {
    let spec = BundleSpec::load(bundle).map_err(|source| BootstrapError::Spec {
        id: id.into(),
        source,
    })?;
    let role = spec.role().map_err(|source| BootstrapError::Spec {
        id: id.into(),
        source,
    })?;
    Ok(role.group(id).to_string())
}

/// The filesystem path of a `unix://` TTRPC address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Whether a shim already serves `address` (a container joining its pod's shim).
fn serving(address: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(address)).is_ok()
}

/// `start`: returns the address to print.
pub fn start(args: &ShimArgs, bundle: &Path) -> Result<String, BootstrapError> {
    let pod = pod_id(bundle, &args.id)?;
    let address = containerd_shim::socket_address(&args.address, &args.namespace, &pod);
    let write_address = || {
        std::fs::write(bundle.join("address"), &address).map_err(|source| BootstrapError::Io {
            what: format!("writing {}/address", bundle.display()),
            source,
        })
    };
    if serving(&address) {
        write_address()?;
        return Ok(address);
    }
    // A socket file without a server: a shim that was killed. Its pod is gone; start afresh.
    let _ = std::fs::remove_file(socket_path(&address));
    if let Some(dir) = Path::new(socket_path(&address)).parent() {
        std::fs::create_dir_all(dir).map_err(|source| BootstrapError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
    }
    let exe = std::env::current_exe().map_err(|source| BootstrapError::Io {
        what: "locating the shim binary".into(),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.current_dir(bundle)
        .args([
            "-namespace",
            &args.namespace,
            "-id",
            &pod,
            "-address",
            &args.address,
        ])
        .args(["-socket", &address])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own session: the server outlives this `start` process and containerd's signals to it.
        .process_group(0);
    if args.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd.spawn().map_err(|source| BootstrapError::Spawn {
        exe: exe.clone(),
        source,
    })?;
    // The server closes its stdout once its socket is listening (or dies trying).
    let mut sink = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut sink);
    }
    if let Ok(Some(st)) = child.try_wait() {
        return Err(BootstrapError::ServerFailed {
            status: st.to_string(),
        });
    }
    if !serving(&address) {
        return Err(BootstrapError::ServerFailed {
            status: "not listening".into(),
        });
    }
    write_address()?;
    Ok(address)
}

/// `delete`: cleans up after a dead shim and answers containerd with the task's end (SIGKILL, now).
pub fn delete(args: &ShimArgs, bundle: &Path) -> Vec<u8> {
    let cfg = ShimConfig::load_from_env().unwrap_or_default();
    match pod_id(bundle, &args.id) {
        Ok(pod) => {
            let dir = SandboxDir::new(&cfg.state_dir, &pod);
            let address = containerd_shim::socket_address(&args.address, &args.namespace, &pod);
            if serving(&address) {
                // The pod's shim is alive and owns its state (containerd lost only this connection).
                tracing::info!(
                    pod,
                    "delete: the pod's shim still serves; leaving its state to it"
                );
            } else if pod == args.id {
                tracing::debug!(pod, "cleaning up a dead shim's pod");
                leftovers::remove(&dir);
                let _ = std::fs::remove_file(socket_path(&address));
            } else if let Err(e) = crate::host_mount::unmount_tree(&dir.container(&args.id)) {
                tracing::warn!(container = %args.id, error = %e, "removing the container's share");
            }
        }
        Err(e) => {
            tracing::warn!(container = %args.id, error = %e, "cleanup without a readable spec")
        }
    }
    DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(timestamp(SystemTime::now())),
        ..Default::default()
    }
    .write_to_bytes()
    .unwrap_or_default()
}
