//! containerd's Task API (`containerd.task.v2.Task` and `.v3`, the same messages) for every container of one
//! pod, forwarded to the pod VM's agent.
//!
//! Pids: the pids reported to containerd are guest pids (unique per process inside the pod VM); host
//! namespace paths containerd derives from them are rewritten by [`super::spec`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::shim::shim::CheckpointTaskRequest;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use husk_proto::client::{ClientError, CreateContainer};
use tokio::sync::Notify;

use super::events::{timestamp, topics, Events};
use super::process::{Container, Exit, ProcState, Process};
use super::spec::{BundleSpec, PodRole};
use super::stats;
use super::stdio::{self, Output, StdioPaths};
use crate::config::ShimConfig;
use crate::host_mount::{self, RootfsMount};
use crate::sandbox::{Sandbox, SandboxDir};

/// How long an exit report waits for the process's output to drain (a daemonized grandchild may keep the
/// pipe open forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Exit status reported for processes that were running when the VM died (as if SIGKILLed).
const VM_GONE_EXIT: u32 = 128 + 9;
/// Exit status reported when the agent cannot say how a process ended.
const AGENT_LOST_EXIT: u32 = 255;
/// containerd decodes `ProcessInfo.info` by this name (runc's shim uses the same message).
const PROCESS_DETAILS_TYPE_URL: &str = "containerd.runc.v1.ProcessDetails";

fn err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// containerd understands gRPC codes: keep the agent's classification (NotFound, InvalidArgument...).
fn agent_err(e: ClientError) -> ttrpc::Error {
    let code = match &e {
        ClientError::Rpc { code, .. } => match code {
            tonic::Code::NotFound => Code::NOT_FOUND,
            tonic::Code::InvalidArgument => Code::INVALID_ARGUMENT,
            tonic::Code::AlreadyExists => Code::ALREADY_EXISTS,
            tonic::Code::FailedPrecondition => Code::FAILED_PRECONDITION,
            tonic::Code::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
            tonic::Code::Unimplemented => Code::UNIMPLEMENTED,
            _ => Code::INTERNAL,
        },
        ClientError::InvalidRequest { .. } => Code::INVALID_ARGUMENT,
        ClientError::Timeout { .. } | ClientError::DeadlineExceeded { .. } => {
            Code::DEADLINE_EXCEEDED
        }
        _ => Code::UNAVAILABLE,
    };
    err(code, e)
}

struct Shared {
    events: Events,
    /// The node's configuration, or why it could not be read (reported on every Create).
    base_config: Result<ShimConfig, String>,
    /// The shim's pod id (CRI sandbox id, or the container id of a standalone container).
    pod_id: String,
    /// The pod VM, booted by the first Create.
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<BTreeMap<String, Container>>,
    /// Ids of containers whose Create is under way (taken with `containers` locked, see `reserve`).
    creating: Mutex<std::collections::BTreeSet<String>>,
    /// Set by Shutdown once it decided to stop the VM: later Creates are refused.
    shutting_down: std::sync::atomic::AtomicBool,
    exit: Arc<Notify>,
}

/// An id reserved for a Create in progress; released when the Create ends either way.
struct Reservation<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.creating.lock() {
            c.remove(&self.id);
        }
    }
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    shared: Arc<Shared>,
}

impl TaskService {
    /// `exit` is notified when the shim should exit (after Shutdown with no containers left).
    pub fn new(
        events: Events,
        base_config: Result<ShimConfig, String>,
        pod_id: String,
        exit: Arc<Notify>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                events,
                base_config,
                pod_id,
                sandbox: tokio::sync::Mutex::new(None),
                containers: Mutex::new(BTreeMap::new()),
                creating: Mutex::new(Default::default()),
                shutting_down: Default::default(),
                exit,
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Container>> {
        // A panic while holding the lock must not take every later call down with it.
        self.shared
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, ttrpc::Error> {
        let s = self.shared.sandbox.lock().await.clone();
        match s {
            Some(s) if !s.has_exited() => Ok(s),
            Some(_) => Err(err(
                Code::UNAVAILABLE,
                format!("pod {}: the VM has exited", self.shared.pod_id),
            )),
            None => Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "pod {}: no VM (no container created yet)",
                    self.shared.pod_id
                ),
            )),
        }
    }

    /// Boots the pod VM for the first container, sized from the configuration, the pod's annotations and
    /// (for a standalone container) its resource limits.
    async fn ensure_sandbox(
        &self,
        spec: &BundleSpec,
        role: &PodRole,
    ) -> Result<Arc<Sandbox>, ttrpc::Error> {
        let mut guard = self.shared.sandbox.lock().await;
        if let Some(s) = guard.as_ref() {
            if s.has_exited() {
                return Err(err(
                    Code::UNAVAILABLE,
                    format!("pod {}: the VM has exited", self.shared.pod_id),
                ));
            }
            return Ok(s.clone());
        }
        let base = self.shared.base_config.as_ref().map_err(|e| {
            err(
                Code::FAILED_PRECONDITION,
                format!("Husk configuration: {e}"),
            )
        })?;
        let mut cfg = base
            .with_annotations(&spec.annotations())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if *role == PodRole::Standalone {
            let (mem, cpus) = spec.standalone_resources();
            cfg.memory_mib += mem;
            cfg.vcpus = cfg.vcpus.max(cpus).min(crate::config::MAX_VCPUS);
        }
        let sandbox = Arc::new(
            Sandbox::start(
                &self.shared.pod_id,
                &cfg,
                spec.network_namespace().as_deref(),
            )
            .await
            .map_err(|e| err(Code::INTERNAL, e))?,
        );
        self.watch_vm(&sandbox);
        self.watch_oom(&sandbox);
        *guard = Some(sandbox.clone());
        Ok(sandbox)
    }

    /// When the VM dies, every process still running exits with 137 and containerd hears about it.
    fn watch_vm(&self, sandbox: &Arc<Sandbox>) {
        let this = self.clone();
        let mut exit = sandbox.exit_watch();
        tokio::spawn(async move {
            let Ok(vm_exit) = exit.wait_for(|e| e.is_some()).await.map(|e| e.clone()) else {
                return;
            };
            let at = vm_exit.map(|e| e.at).unwrap_or_else(SystemTime::now);
            let live: Vec<(String, String)> = this
                .containers()
                .values()
                .flat_map(|c| c.live_processes().into_iter().map(|e| (c.id.clone(), e)))
                .collect();
            if !live.is_empty() {
                tracing::warn!(pod = %this.shared.pod_id, processes = live.len(), "the pod VM died with processes running");
            }
            for (cid, eid) in live {
                this.record_exit(
                    &cid,
                    &eid,
                    Exit {
                        status: VM_GONE_EXIT,
                        at,
                    },
                )
                .await;
            }
        });
    }

    fn watch_oom(&self, sandbox: &Arc<Sandbox>) {
        let this = self.clone();
        let agent = sandbox.agent.clone();
        tokio::spawn(async move {
            let mut stream = match agent.oom_events().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "subscribing to OOM events");
                    return;
                }
            };
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(cid) => {
                        if this.containers().contains_key(&cid) {
                            this.shared
                                .events
                                .publish(
                                    topics::TASK_OOM_EVENT_TOPIC,
                                    Box::new(TaskOOM {
                                        container_id: cid,
                                        ..Default::default()
                                    }),
                                )
                                .await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "OOM event stream ended");
                        return;
                    }
                }
            }
        });
    }

    /// Records an exit (first report wins) and publishes TaskExit.
    async fn record_exit(&self, cid: &str, eid: &str, exit: Exit) {
        let pid = {
            let mut cs = self.containers();
            let Some(p) = cs.get_mut(cid).and_then(|c| c.process_mut(eid)) else {
                return;
            };
            if !p.set_exited(exit) {
                return;
            }
            p.pid
        };
        tracing::info!(
            container = cid,
            exec = eid,
            status = exit.status,
            "process exited"
        );
        self.shared
            .events
            .publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: cid.into(),
                    id: if eid.is_empty() {
                        cid.into()
                    } else {
                        eid.into()
                    },
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            )
            .await;
    }

    /// Waits for a started process in the guest, lets its output drain, then records the exit.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, cid: String, eid: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let exit = loop {
                match sandbox.agent.wait_process(&cid, &eid, None).await {
                    Ok(e) => {
                        break Exit {
                            status: e.exit_status,
                            at: e.exited_at,
                        }
                    }
                    // The VM is gone: so is the process (first report wins against the VM watcher).
                    Err(_) if sandbox.has_exited() => {
                        break Exit {
                            status: VM_GONE_EXIT,
                            at: SystemTime::now(),
                        }
                    }
                    // The agent does not know the process or answers nonsense: waiting longer will not help.
                    Err(
                        e @ (ClientError::Rpc {
                            code: tonic::Code::NotFound,
                            ..
                        }
                        | ClientError::InvalidReply { .. }
                        | ClientError::ReplyRejected { .. }),
                    ) => {
                        tracing::warn!(container = %cid, exec = %eid, error = %e, "the agent cannot report this process's exit");
                        break Exit {
                            status: AGENT_LOST_EXIT,
                            at: SystemTime::now(),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(container = %cid, exec = %eid, error = %e, "waiting for the process; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            let outputs = {
                let mut cs = this.containers();
                cs.get_mut(&cid)
                    .and_then(|c| c.process_mut(&eid))
                    .map(|p| std::mem::take(&mut p.outputs))
                    .unwrap_or_default()
            };
            for o in outputs {
                let _ = tokio::time::timeout(OUTPUT_DRAIN, o).await;
            }
            this.record_exit(&cid, &eid, exit).await;
        });
    }

    /// Starts copying a process's stdio between containerd's FIFOs and the agent.
    fn wire_stdio(
        &self,
        sandbox: &Sandbox,
        cid: &str,
        eid: &str,
        stdio: &StdioPaths,
    ) -> (Vec<tokio::task::JoinHandle<()>>, Option<stdio::StdinCopy>) {
        let mut outputs = Vec::new();
        if !stdio.stdout.is_empty() {
            outputs.push(stdio::copy_output(
                sandbox.agent.clone(),
                cid.into(),
                eid.into(),
                Output::Stdout,
                stdio.stdout.clone(),
            ));
        }
        if !stdio.stderr.is_empty() && !stdio.terminal {
            outputs.push(stdio::copy_output(
                sandbox.agent.clone(),
                cid.into(),
                eid.into(),
                Output::Stderr,
                stdio.stderr.clone(),
            ));
        }
        let stdin = (!stdio.stdin.is_empty()).then(|| {
            stdio::copy_stdin(
                sandbox.agent.clone(),
                cid.into(),
                eid.into(),
                std::path::Path::new(&stdio.stdin),
            )
        });
        (outputs, stdin)
    }

    /// Claims `cid` for a Create: refused if it exists, is being created, or the shim is shutting down. The
    /// check and the claim happen under the containers lock, which Shutdown also takes.
    fn reserve(&self, cid: &str) -> Result<Reservation<'_>, ttrpc::Error> {
        let containers = self.containers();
        if self
            .shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {cid}: pod {} is shutting down",
                    self.shared.pod_id
                ),
            ));
        }
        let mut creating = self
            .shared
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if containers.contains_key(cid) || !creating.insert(cid.to_string()) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {cid} already exists"),
            ));
        }
        Ok(Reservation {
            shared: &self.shared,
            id: cid.to_string(),
        })
    }

    async fn create_container(
        &self,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ttrpc::Error> {
        let cid = req.id.clone();
        if !husk_proto::is_valid_id(&cid) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("container id {cid:?}: Husk needs [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"),
            ));
        }
        let _reservation = self.reserve(&cid)?;
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported by Husk",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = BundleSpec::load(&bundle).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let role = spec.role().map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if role.group(&cid) != self.shared.pod_id {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "container {cid} belongs to pod {}, this shim serves pod {}",
                    role.group(&cid),
                    self.shared.pod_id
                ),
            ));
        }
        let sandbox_pid = match &role {
            PodRole::Container { sandbox_id } => {
                let pid = self
                    .containers()
                    .values()
                    .find(|c| matches!(c.role, PodRole::Sandbox { .. }))
                    .map(|c| c.init.pid);
                // Without its sandbox container (e.g. a shim restarted after a crash), the container would
                // silently get fresh namespaces in a fresh VM: refuse instead.
                Some(pid.ok_or_else(|| {
                    err(
                        Code::FAILED_PRECONDITION,
                        format!("container {cid}: its pod sandbox {sandbox_id} is not running in this shim"),
                    )
                })?)
            }
            _ => None,
        };
        let sandbox = self.ensure_sandbox(&spec, &role).await?;

        let guest = spec
            .for_guest(&cid, sandbox_pid)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;

        // The rootfs and bind mounts, on the host, inside the share.
        let host_dir = sandbox.dir.container(&cid);
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let dir = sandbox.dir.clone();
        let binds = guest.binds.clone();
        let (cid2, host_dir2) = (cid.clone(), host_dir.clone());
        let mounted = tokio::task::spawn_blocking(move || {
            let share = dir.shared();
            let rootfs_target = host_mount::ShareTarget::create(&share, &[&cid2, "rootfs"], true)?;
            host_mount::mount_rootfs(&rootfs, &bundle.join("rootfs"), &rootfs_target)?;
            for b in &binds {
                let n = b.index.to_string();
                host_mount::bind(
                    &b.source,
                    &share,
                    &[&cid2, "mounts", &n],
                    b.recursive,
                    b.readonly,
                )?;
            }
            Ok::<_, host_mount::MountError>(())
        })
        .await
        .map_err(|e| err(Code::INTERNAL, e))?;
        if let Err(e) = mounted {
            let _ = host_mount::unmount_tree(&host_dir2);
            return Err(err(Code::INTERNAL, format!("container {cid}: {e}")));
        }

        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = sandbox
            .agent
            .create_container(CreateContainer {
                container_id: cid.clone(),
                oci_spec_json: guest.json,
                rootfs_path: SandboxDir::guest_container_rootfs(&cid),
                stdin: !stdio.stdin.is_empty(),
                terminal: stdio.terminal,
            })
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                let _ = host_mount::unmount_tree(&host_dir);
                return Err(agent_err(e));
            }
        };
        let mut init = Process::new("", stdio.clone());
        init.pid = pid;
        let (outputs, stdin) = self.wire_stdio(&sandbox, &cid, "", &stdio);
        init.outputs = outputs;
        init.stdin = stdin;
        self.containers().insert(
            cid.clone(),
            Container {
                id: cid.clone(),
                bundle: req.bundle.clone(),
                role,
                init,
                execs: BTreeMap::new(),
                paused: false,
                host_dir,
            },
        );
        tracing::info!(container = %cid, pid, "container created");
        self.shared
            .events
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: cid,
                    bundle: req.bundle,
                    rootfs: req.rootfs,
                    io: MessageField::some(TaskIO {
                        stdin: stdio.stdin,
                        stdout: stdio.stdout,
                        stderr: stdio.stderr,
                        terminal: stdio.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn lookup<T>(
        &self,
        cid: &str,
        eid: &str,
        f: impl FnOnce(&Container, &Process) -> T,
    ) -> Result<T, ttrpc::Error> {
        let cs = self.containers();
        let c = cs
            .get(cid)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {cid} not found")))?;
        let p = c.process(eid).ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("process {eid} of container {cid} not found"),
            )
        })?;
        Ok(f(c, p))
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let id = req.id.clone();
        self.create_container(req).await.inspect_err(|e| {
            tracing::warn!(container = %id, error = ?e, "create failed");
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let (cid, eid) = (req.id.clone(), req.exec_id.clone());
        let sandbox = self.sandbox().await?;
        let (state, stdio, exec_spec) = self.lookup(&cid, &eid, |_, p| {
            (p.state.clone(), p.stdio.clone(), p.exec_spec.clone())
        })?;
        if state != ProcState::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("process {eid:?} of container {cid} was already started"),
            ));
        }
        let pid = if eid.is_empty() {
            sandbox
                .agent
                .start_container(&cid)
                .await
                .map_err(agent_err)?;
            self.lookup(&cid, "", |_, p| p.pid)?
        } else {
            let spec = exec_spec.unwrap_or_default();
            let pid = sandbox
                .agent
                .exec_process(&cid, &eid, spec, !stdio.stdin.is_empty(), stdio.terminal)
                .await
                .map_err(agent_err)?;
            let (outputs, stdin) = self.wire_stdio(&sandbox, &cid, &eid, &stdio);
            let mut cs = self.containers();
            if let Some(p) = cs.get_mut(&cid).and_then(|c| c.process_mut(&eid)) {
                p.pid = pid;
                p.outputs = outputs;
                p.stdin = stdin;
            }
            pid
        };
        {
            let mut cs = self.containers();
            if let Some(p) = cs.get_mut(&cid).and_then(|c| c.process_mut(&eid)) {
                if p.state == ProcState::Created {
                    p.state = ProcState::Running;
                }
            }
        }
        self.spawn_waiter(sandbox, cid.clone(), eid.clone());
        if eid.is_empty() {
            self.shared
                .events
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: cid,
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            self.shared
                .events
                .publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: cid,
                        exec_id: eid,
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        self.lookup(&req.id, &req.exec_id, |c, p| {
            let exit = p.exit();
            StateResponse {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                bundle: c.bundle.clone(),
                pid: p.pid,
                status: p.status(c.paused).into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                ..Default::default()
            }
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let (cid, eid) = (req.id.clone(), req.exec_id.clone());
        let (state, pid) = self.lookup(&cid, &eid, |_, p| (p.state.clone(), p.pid))?;
        if state == ProcState::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("process {eid:?} of container {cid} is running: kill it first"),
            ));
        }
        let exit = match state {
            ProcState::Exited(e) => e,
            _ => Exit {
                status: 0,
                at: SystemTime::now(),
            },
        };
        if eid.is_empty() {
            let sandbox = self.shared.sandbox.lock().await.clone();
            if let Some(s) = sandbox.as_ref().filter(|s| !s.has_exited()) {
                // A created-but-never-started container is removed forcibly, like runc's delete.
                if let Err(e) = s
                    .agent
                    .remove_container(&cid, state == ProcState::Created)
                    .await
                {
                    if !matches!(
                        &e,
                        ClientError::Rpc {
                            code: tonic::Code::NotFound,
                            ..
                        }
                    ) {
                        return Err(agent_err(e));
                    }
                }
            }
            let removed = self.containers().remove(&cid);
            if let Some(c) = removed {
                if let Some(s) = &c.init.stdin {
                    s.unblock();
                }
                let dir = c.host_dir.clone();
                let r = tokio::task::spawn_blocking(move || host_mount::unmount_tree(&dir)).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(container = %cid, error = %e, "removing the container's rootfs from the share");
                }
            }
            self.shared
                .events
                .publish(
                    topics::TASK_DELETE_EVENT_TOPIC,
                    Box::new(TaskDelete {
                        container_id: cid.clone(),
                        id: cid.clone(),
                        pid,
                        exit_status: exit.status,
                        exited_at: MessageField::some(timestamp(exit.at)),
                        ..Default::default()
                    }),
                )
                .await;
        } else if let Some(c) = self.containers().get_mut(&cid) {
            c.execs.remove(&eid);
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.lookup(&req.id, "", |_, _| ())?;
        let sandbox = self.sandbox().await?;
        let procs = sandbox
            .agent
            .list_processes(&req.id)
            .await
            .map_err(agent_err)?;
        // Like runc's shim: processes the runtime started carry their exec id (what `ctr tasks ps` shows).
        let exec_ids: BTreeMap<u32, String> = procs
            .processes
            .iter()
            .filter(|p| !p.exec_id.is_empty() && p.exit_status.is_none())
            .map(|p| (p.pid, p.exec_id.clone()))
            .collect();
        let mut processes = Vec::with_capacity(procs.pids.len());
        for pid in procs.pids {
            let info = match exec_ids.get(&pid) {
                Some(exec_id) => {
                    let details = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    MessageField::some(Any {
                        type_url: PROCESS_DETAILS_TYPE_URL.into(),
                        value: details
                            .write_to_bytes()
                            .map_err(|e| err(Code::INTERNAL, e))?,
                        ..Default::default()
                    })
                }
                None => MessageField::none(),
            };
            processes.push(ProcessInfo {
                pid,
                info,
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.lookup(&req.id, "", |_, _| ())?;
        let sandbox = self.sandbox().await?;
        sandbox
            .agent
            .pause_container(&req.id)
            .await
            .map_err(agent_err)?;
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.paused = true;
        }
        self.shared
            .events
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: req.id,
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.lookup(&req.id, "", |_, _| ())?;
        let sandbox = self.sandbox().await?;
        sandbox
            .agent
            .resume_container(&req.id)
            .await
            .map_err(agent_err)?;
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.paused = false;
        }
        self.shared
            .events
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: req.id,
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            format!("container {}: checkpoint is not supported by Husk", req.id),
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let (cid, eid) = (req.id.clone(), req.exec_id.clone());
        let state = self.lookup(&cid, &eid, |_, p| p.state.clone())?;
        if matches!(state, ProcState::Exited(_)) && !req.all {
            // What runc's shim answers; containerd treats it as "already dead".
            return Err(err(
                Code::NOT_FOUND,
                format!("process {eid:?} of container {cid}: process already finished"),
            ));
        }
        if !eid.is_empty() && state == ProcState::Created {
            return Err(err(
                Code::NOT_FOUND,
                format!("exec {eid} of container {cid} was never started"),
            ));
        }
        let sandbox = self.sandbox().await?;
        sandbox
            .agent
            .signal_process(&cid, &eid, req.signal, req.all)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let (cid, eid) = (req.id.clone(), req.exec_id.clone());
        if !husk_proto::is_valid_id(&eid) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("exec id {eid:?}: Husk needs [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if spec.is_empty() || spec.len() > husk_proto::MAX_SPEC_SIZE {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec {eid}: the process spec is empty or larger than {} bytes",
                    husk_proto::MAX_SPEC_SIZE
                ),
            ));
        }
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("exec {eid}: process spec: {e}"),
            )
        })?;
        {
            let mut cs = self.containers();
            let c = cs
                .get_mut(&cid)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {cid} not found")))?;
            if c.init.exit().is_some() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {cid} has exited"),
                ));
            }
            if c.execs.contains_key(&eid) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {eid} already exists in container {cid}"),
                ));
            }
            let mut p = Process::new(
                &eid,
                StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
            );
            p.exec_spec = Some(spec);
            c.execs.insert(eid.clone(), p);
        }
        self.shared
            .events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: cid,
                    exec_id: eid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.lookup(&req.id, &req.exec_id, |_, _| ())?;
        let sandbox = self.sandbox().await?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX).max(1);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX).max(1);
        sandbox
            .agent
            .resize_pty(&req.id, &req.exec_id, rows, cols)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let copier = {
            let mut cs = self.containers();
            let c = cs
                .get_mut(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            let p = c.process_mut(&req.exec_id).ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("process {} not found", req.exec_id),
                )
            })?;
            p.stdin.take()
        };
        let sandbox = self.sandbox().await?;
        let (cid, eid) = (req.id.clone(), req.exec_id.clone());
        match copier {
            // The client closed its side of the FIFO: the copier forwards what is left, then closes stdin.
            // If it is stuck (the client never opened the FIFO), close it ourselves after a grace period.
            Some(mut c) => {
                tokio::spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), &mut c.task)
                        .await
                        .is_err()
                    {
                        c.unblock();
                        let _ = sandbox.agent.close_stdin(&cid, &eid).await;
                    }
                });
            }
            None => {
                sandbox
                    .agent
                    .close_stdin(&cid, &eid)
                    .await
                    .map_err(agent_err)?;
            }
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.lookup(&req.id, "", |_, _| ())?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if resources.is_empty() {
            return Ok(Empty::new());
        }
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("container {}: resources: {e}", req.id),
            )
        })?;
        let sandbox = self.sandbox().await?;
        sandbox
            .agent
            .update_container(&req.id, resources)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut w = self.lookup(&req.id, &req.exec_id, |_, p| p.exit_watch())?;
        let exit = w
            .wait_for(|e| e.is_some())
            .await
            .ok()
            .and_then(|e| *e)
            .ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!(
                        "process {:?} of container {} was deleted",
                        req.exec_id, req.id
                    ),
                )
            })?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.lookup(&req.id, "", |_, _| ())?;
        let sandbox = self.sandbox().await?;
        let s = sandbox
            .agent
            .stats_container(&req.id)
            .await
            .map_err(agent_err)?;
        let value = stats::to_metrics(&s)
            .write_to_bytes()
            .map_err(|e| err(Code::INTERNAL, e))?;
        Ok(StatsResponse {
            stats: MessageField::some(Any {
                type_url: stats::METRICS_TYPE_URL.into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self.lookup(&req.id, "", |_, p| p.pid)?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        {
            let containers = self.containers();
            let creating = self
                .shared
                .creating
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !containers.is_empty() || !creating.is_empty() {
                return Ok(Empty::new());
            }
            self.shared
                .shutting_down
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let sandbox = self.shared.sandbox.lock().await.take();
        if let Some(s) = sandbox {
            s.stop().await;
        }
        tracing::info!(pod = %self.shared.pod_id, "shutting down");
        self.shared.exit.notify_one();
        Ok(Empty::new())
    }
}
