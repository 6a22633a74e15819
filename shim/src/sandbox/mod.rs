//! One pod VM: virtiofsd serving the pod's share, husk-vmm booting the guest, and the agent client.
//!
//! Start order: state dir → shared mount point → virtiofsd (waits for its socket) → husk-vmm (vsock, fs,
//! control socket) → agent answers Ping → the agent mounts the share at [`layout::GUEST_SHARE`]. Stop is the
//! reverse, and [`leftovers`] does the same from pid files when the shim itself was killed.

pub mod layout;
pub mod leftovers;
pub mod network;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_proto::client::{AgentClient, ClientError, ClientOptions, MountStorage};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{ConfigError, ShimConfig};
use crate::host_mount::{self, MountError};
pub use layout::SandboxDir;
use network::{NetworkError, PodNetwork};

/// How long the guest has to boot and answer the agent's Ping.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of one agent RPC (WaitProcess and the streams have none). The
/// client's 10 s default is for an idle local VM; a loaded host (or nested
/// emulation) can stall a guest for longer than that while it mounts the
/// share or sets up a container, and a false timeout fails a pod for good.
pub const AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop (agent Shutdown) may take before the VMM is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("pod {sandbox}: {what} {path} is missing or unreadable: {source}")]
    Missing {
        sandbox: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {sandbox}: {source}")]
    GuestImage {
        sandbox: String,
        #[source]
        source: ConfigError,
    },
    #[error("pod {sandbox}: preparing {path}: {source}")]
    StateDir {
        sandbox: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {sandbox}: {source}")]
    Mount {
        sandbox: String,
        #[source]
        source: MountError,
    },
    #[error("pod {sandbox}: starting {what} {path}: {source}")]
    Spawn {
        sandbox: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {sandbox}: virtiofsd did not come up: {reason}; its log: {log}")]
    Virtiofsd {
        sandbox: String,
        reason: String,
        log: String,
    },
    #[error("pod {sandbox}: the VM exited during boot ({status}); VMM log: {log}; guest console: {console}")]
    VmExitedEarly {
        sandbox: String,
        status: String,
        log: String,
        console: String,
    },
    #[error("pod {sandbox}: the agent did not answer: {source}; VMM log: {log}; guest console: {console}")]
    Agent {
        sandbox: String,
        #[source]
        source: Box<ClientError>,
        log: String,
        console: String,
    },
    #[error("pod {sandbox}: pod network: {source}")]
    Network {
        sandbox: String,
        #[source]
        source: Box<NetworkError>,
    },
    #[error("pod {sandbox}: configuring the network in the guest: {source}")]
    GuestNetwork {
        sandbox: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("pod {sandbox}: mounting the share in the guest: {source}")]
    GuestShare {
        sandbox: String,
        #[source]
        source: Box<ClientError>,
    },
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// The VMM's exit status, rendered (`exit status: 0`, `signal: 9 (SIGKILL)`).
    pub status: String,
    pub at: std::time::SystemTime,
}

/// A running pod VM.
pub struct Sandbox {
    pub id: String,
    pub dir: SandboxDir,
    pub agent: AgentClient,
    pub vmm_pid: u32,
    pub config: ShimConfig,
    exit: watch::Receiver<Option<VmExit>>,
    virtiofsd: Mutex<Option<Child>>,
    /// The pod network carried into the VM, if the pod has one.
    network: Option<PodNetwork>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("vmm_pid", &self.vmm_pid)
            .finish_non_exhaustive()
    }
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            let s = String::from_utf8_lossy(&b[start..]).trim().to_string();
            if s.is_empty() {
                "(empty)".into()
            } else {
                s
            }
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

fn check_readable(sandbox: &str, what: &'static str, path: &Path) -> Result<(), SandboxError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| SandboxError::Missing {
            sandbox: sandbox.into(),
            what,
            path: path.into(),
            source,
        })
}

fn log_file(sandbox: &str, path: &Path) -> Result<std::fs::File, SandboxError> {
    std::fs::File::create(path).map_err(|source| SandboxError::StateDir {
        sandbox: sandbox.into(),
        path: path.into(),
        source,
    })
}

impl Sandbox {
    /// Boots a pod VM and waits until its agent answers and has mounted the share.
    ///
    /// `netns`: the pod's network namespace; its interfaces become the VM's (see [`network`]).
    pub async fn start(
        id: &str,
        config: &ShimConfig,
        netns: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let vmm = config.vmm_path();
        let virtiofsd = config.virtiofsd_path();
        check_readable(id, "guest kernel", &config.kernel)?;
        // Resolved again when the VMM is spawned; checked here to fail before anything is started.
        let image = config
            .guest_image()
            .map_err(|source| SandboxError::GuestImage {
                sandbox: id.into(),
                source,
            })?;
        check_readable(id, image.what(), image.path())?;
        check_readable(id, "VMM binary", &vmm)?;
        check_readable(id, "virtiofsd binary", &virtiofsd)?;

        let dir = SandboxDir::new(&config.state_dir, id);
        // A directory left by a shim that was killed before its cleanup: remove what it left first.
        if dir.root().exists() {
            tracing::warn!(sandbox = id, dir = %dir.root().display(), "removing a previous run's state");
            leftovers::remove(&dir);
        }
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::StateDir {
                sandbox: id.into(),
                path,
                source,
            }
        };
        std::fs::create_dir_all(dir.root()).map_err(state_err(dir.root()))?;
        std::fs::set_permissions(
            dir.root(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(state_err(dir.root()))?;
        let fail = |e: SandboxError| {
            leftovers::remove(&dir);
            e
        };
        host_mount::make_shared_mountpoint(&dir.shared()).map_err(|source| {
            fail(SandboxError::Mount {
                sandbox: id.into(),
                source,
            })
        })?;

        let mut fsd = Self::spawn_virtiofsd(id, &dir, &virtiofsd)
            .await
            .map_err(fail)?;
        let network = match netns {
            Some(ns) => {
                let ns = ns.to_path_buf();
                let scan = tokio::task::spawn_blocking(move || PodNetwork::scan(&ns))
                    .await
                    .unwrap_or_else(|e| {
                        Err(NetworkError::Unsupported {
                            path: PathBuf::new(),
                            what: format!("scan task: {e}"),
                        })
                    });
                match scan {
                    Ok(n) => Some(n),
                    Err(source) => {
                        let _ = fsd.start_kill();
                        return Err(fail(SandboxError::Network {
                            sandbox: id.into(),
                            source: Box::new(source),
                        }));
                    }
                }
            }
            None => None,
        };
        let net_args = network
            .as_ref()
            .map(PodNetwork::vmm_net_args)
            .unwrap_or_default();
        let mut vm = match Self::spawn_vmm(id, &dir, config, &vmm, &net_args) {
            Ok(c) => c,
            Err(e) => {
                let _ = fsd.start_kill();
                return Err(fail(e));
            }
        };
        let vmm_pid = vm.id().unwrap_or(0);
        let _ = std::fs::write(dir.vmm_pid(), vmm_pid.to_string());

        let agent = {
            let deadline = Instant::now() + BOOT_TIMEOUT;
            let vsock = dir.vsock();
            let connect = AgentClient::connect_with_retry(
                &vsock,
                husk_proto::AGENT_VSOCK_PORT,
                ClientOptions {
                    request_timeout: AGENT_REQUEST_TIMEOUT,
                    ..ClientOptions::default()
                },
                deadline,
            );
            tokio::select! {
                r = connect => match r {
                    Ok(a) => a,
                    Err(source) => {
                        let _ = vm.start_kill();
                        let _ = vm.wait().await;
                        let _ = fsd.start_kill();
                        return Err(fail(SandboxError::Agent {
                            sandbox: id.into(),
                            source: Box::new(source),
                            log: log_tail(&dir.vmm_log(), 2000),
                            console: log_tail(&dir.console(), 2000),
                        }));
                    }
                },
                st = vm.wait() => {
                    let _ = fsd.start_kill();
                    return Err(fail(SandboxError::VmExitedEarly {
                        sandbox: id.into(),
                        status: st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                        log: log_tail(&dir.vmm_log(), 2000),
                        console: log_tail(&dir.console(), 2000),
                    }));
                }
            }
        };
        if let Err(source) = agent
            .mount_storage(MountStorage {
                fstype: "virtiofs".into(),
                source: layout::SHARE_TAG.into(),
                target: layout::GUEST_SHARE.into(),
                options: vec!["nodev".into()],
                readonly: false,
            })
            .await
        {
            let _ = vm.start_kill();
            let _ = vm.wait().await;
            let _ = fsd.start_kill();
            return Err(fail(SandboxError::GuestShare {
                sandbox: id.into(),
                source: Box::new(source),
            }));
        }

        if let Some(net) = &network {
            if let Err(e) = Self::connect_network(id, &agent, net).await {
                let _ = vm.start_kill();
                let _ = vm.wait().await;
                let _ = fsd.start_kill();
                let n = net.clone();
                let _ = tokio::task::spawn_blocking(move || n.disconnect()).await;
                return Err(fail(e));
            }
        }

        let (tx, rx) = watch::channel(None);
        let sandbox_id = id.to_string();
        tokio::spawn(async move {
            let status = match vm.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            tracing::info!(sandbox = %sandbox_id, %status, "the VMM exited");
            let _ = tx.send(Some(VmExit {
                status,
                at: std::time::SystemTime::now(),
            }));
        });
        tracing::info!(sandbox = id, vmm_pid, "pod VM is up");
        Ok(Sandbox {
            id: id.into(),
            dir,
            agent,
            vmm_pid,
            config: config.clone(),
            exit: rx,
            virtiofsd: Mutex::new(Some(fsd)),
            network,
        })
    }

    /// Joins the taps husk-vmm opened to the pod interfaces, then gives the guest's interfaces the pod
    /// interfaces' names, addresses and routes.
    async fn connect_network(
        id: &str,
        agent: &AgentClient,
        net: &PodNetwork,
    ) -> Result<(), SandboxError> {
        let n = net.clone();
        tokio::task::spawn_blocking(move || n.connect_taps())
            .await
            .unwrap_or_else(|e| {
                Err(NetworkError::Unsupported {
                    path: PathBuf::new(),
                    what: format!("tap task: {e}"),
                })
            })
            .map_err(|source| SandboxError::Network {
                sandbox: id.into(),
                source: Box::new(source),
            })?;
        agent
            .setup_network(&net.guest_setup())
            .await
            .map_err(|source| SandboxError::GuestNetwork {
                sandbox: id.into(),
                source: Box::new(source),
            })?;
        tracing::info!(
            sandbox = id,
            interfaces = net.interfaces.len(),
            routes = net.routes.len(),
            "pod network is in the guest"
        );
        Ok(())
    }

    async fn spawn_virtiofsd(
        id: &str,
        dir: &SandboxDir,
        bin: &Path,
    ) -> Result<Child, SandboxError> {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path")
            .arg(dir.virtiofsd_socket())
            .arg("--shared-dir")
            .arg(dir.shared())
            // Its own mount namespace with the share as its root: no path escapes the share.
            .args(["--sandbox", "namespace", "--cache", "auto"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(id, &dir.virtiofsd_log())?)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            sandbox: id.into(),
            what: "virtiofsd",
            path: bin.into(),
            source,
        })?;
        let _ = std::fs::write(dir.virtiofsd_pid(), child.id().unwrap_or(0).to_string());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.virtiofsd_socket().exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(SandboxError::Virtiofsd {
                    sandbox: id.into(),
                    reason: format!("it exited with {st}"),
                    log: log_tail(&dir.virtiofsd_log(), 2000),
                });
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(SandboxError::Virtiofsd {
                    sandbox: id.into(),
                    reason: "no socket after 20 s".into(),
                    log: log_tail(&dir.virtiofsd_log(), 2000),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(child)
    }

    fn spawn_vmm(
        id: &str,
        dir: &SandboxDir,
        config: &ShimConfig,
        bin: &Path,
        nets: &[String],
    ) -> Result<Child, SandboxError> {
        let console = if config.debug_console {
            dir.console()
        } else {
            PathBuf::from("/dev/null")
        };
        let log = log_file(id, &dir.vmm_log())?;
        let log2 = log.try_clone().map_err(|source| SandboxError::StateDir {
            sandbox: id.into(),
            path: dir.vmm_log(),
            source,
        })?;
        // The read-only erofs root when the node has it (`--rootfs`: /dev/vda), else the initrd.
        let image = config
            .guest_image()
            .map_err(|source| SandboxError::GuestImage {
                sandbox: id.into(),
                source,
            })?;
        tracing::info!(sandbox = id, image = %image.path().display(), how = image.vmm_flag(), "guest image");
        let mut cmd = Command::new(bin);
        cmd.arg("--kernel")
            .arg(&config.kernel)
            .arg(image.vmm_flag())
            .arg(image.path())
            .arg("--vcpus")
            .arg(config.vcpus.to_string())
            .arg("--mem-mib")
            .arg(config.memory_mib.to_string())
            .arg("--vsock-uds")
            .arg(dir.vsock())
            .arg("--fs")
            .arg(format!(
                "socket={},tag={}",
                dir.virtiofsd_socket().display(),
                layout::SHARE_TAG
            ))
            .arg("--control-socket")
            .arg(dir.control())
            .arg("--console")
            .arg(console)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        for net in nets {
            cmd.arg("--net").arg(net);
        }
        cmd.spawn().map_err(|source| SandboxError::Spawn {
            sandbox: id.into(),
            what: "husk-vmm",
            path: bin.into(),
            source,
        })
    }

    /// A receiver that holds `Some` once the VMM has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Stops the VM: asks the agent to power off, kills the VMM after [`STOP_GRACE`], then stops virtiofsd and
    /// removes the pod's mounts and state directory.
    pub async fn stop(&self) {
        let mut exit = self.exit.clone();
        if exit.borrow().is_none() {
            if let Err(e) = self.agent.shutdown().await {
                tracing::warn!(sandbox = %self.id, error = %e, "graceful shutdown failed; killing the VMM");
            }
            let graceful = tokio::time::timeout(STOP_GRACE, exit.wait_for(|e| e.is_some()))
                .await
                .is_ok_and(|r| r.is_ok());
            if !graceful {
                let (pid_file, marker) = (self.dir.vmm_pid(), leftovers::marker(&self.dir));
                let _ = tokio::task::spawn_blocking(move || {
                    leftovers::kill_pid_file(&pid_file, &marker)
                })
                .await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), exit.wait_for(|e| e.is_some()))
                        .await;
            }
        }
        let fsd = self.virtiofsd.lock().map(|mut g| g.take()).ok().flatten();
        if let Some(mut fsd) = fsd {
            // virtiofsd exits by itself when the VMM disconnects; make sure.
            if tokio::time::timeout(Duration::from_secs(2), fsd.wait())
                .await
                .is_err()
            {
                let _ = fsd.start_kill();
                let _ = fsd.wait().await;
            }
        }
        if let Some(net) = self.network.clone() {
            // The taps went with the VMM; the redirect filters on the pod interfaces stay until removed.
            match tokio::task::spawn_blocking(move || net.disconnect()).await {
                Ok(Err(e)) => {
                    tracing::warn!(sandbox = %self.id, error = %e, "pod network clean-up")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %self.id, error = %e, "pod network clean-up task")
                }
                Ok(Ok(())) => {}
            }
        }
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || leftovers::remove(&dir)).await;
        tracing::info!(sandbox = %self.id, "pod VM stopped and cleaned up");
    }
}
