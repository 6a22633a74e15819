//! The agent's OCI container engine.
//!
//! One concept per module: [`spec`] (parsing, validation), [`rootfs`]
//! (mounts, pivot_root, masked / read-only paths), [`namespaces`], [`user`],
//! [`capabilities`], [`seccomp`], [`rlimits`], [`cgroups`] (v2 files),
//! [`process`] (clone + exec with a sync pipe), [`stdio`], [`console`]
//! (a terminal from the container's own devpts), [`state`]. This
//! module ties them together in [`Engine`]; the gRPC layer is in
//! `crate::service`. Design notes: `docs/agent-container-engine.md`.
//!
//! The engine's blocking methods (create, start, exec, pause...) must be
//! called off the async workers (`spawn_blocking`); the async ones may be
//! awaited directly.

pub mod capabilities;
pub mod cgroups;
pub mod console;
pub mod devices;
pub mod namespaces;
pub mod process;
pub mod rlimits;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod user;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, oneshot, watch};

use crate::reaper::{ExitStatus, Reaper};
use cgroups::Cgroup;
use console::ConsoleSocket;
use process::{ChildFailed, ChildPlan};
use state::{lock, Container, Exit, ProcessState, Status, Table};

/// Engine errors; each maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request field or spec field is invalid.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `process.rlimits[2].type`.
        field: String,
        /// Why.
        reason: String,
    },
    /// Unknown container or process.
    #[error("{0}")]
    NotFound(String),
    /// Id taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Wrong state, or a missing facility.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A table is full.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A setup step failed.
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            EngineError::NotFound(_) => tonic::Status::not_found(msg),
            EngineError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            EngineError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            EngineError::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            EngineError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// cgroup v2 mount. If it is not cgroup2, containers get no cgroup
    /// (and specs asking for resource limits are refused).
    pub cgroup_root: PathBuf,
    /// Parent of container cgroups (relative to the root) when the spec has
    /// no `linux.cgroupsPath`.
    pub cgroup_parent: PathBuf,
    /// Most containers at once.
    pub max_containers: usize,
    /// Most exec'd processes per container (exited ones count until the
    /// container is removed).
    pub max_execs: usize,
    /// How often memory.events is polled for OOM kills.
    pub oom_poll: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: PathBuf::from("husk"),
            max_containers: 1024,
            max_execs: 1024,
            oom_poll: Duration::from_millis(200),
        }
    }
}

/// Parameters of [`Engine::create`].
#[derive(Debug, Clone)]
pub struct CreateParams {
    /// Container id.
    pub id: String,
    /// config.json bytes.
    pub spec_json: Vec<u8>,
    /// Root file system (guest path).
    pub rootfs: PathBuf,
    /// Stdin pipe.
    pub stdin: bool,
    /// Terminal (or the spec's process.terminal).
    pub terminal: bool,
}

/// Parameters of [`Engine::exec`].
#[derive(Debug, Clone)]
pub struct ExecParams {
    /// Container id.
    pub id: String,
    /// New exec id.
    pub exec_id: String,
    /// OCI process JSON.
    pub process_json: Vec<u8>,
    /// Stdin pipe.
    pub stdin: bool,
    /// Terminal (or the process's terminal).
    pub terminal: bool,
}

/// A process in [`Engine::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedProcess {
    /// Empty for init.
    pub exec_id: String,
    /// Pid.
    pub pid: i32,
    /// Exit, if it exited.
    pub exit: Option<Exit>,
}

/// The container engine. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    cgroup_v2: bool,
    reaper: Arc<Reaper>,
    table: Table,
    oom_tx: broadcast::Sender<String>,
    rt: tokio::runtime::Handle,
}

fn validate_id(id: &str, field: &str) -> Result<(), EngineError> {
    if !husk_proto::is_valid_id(id) {
        return Err(EngineError::invalid(
            field,
            format!(
                "{:?} does not match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}",
                id.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(())
}

fn child_error(f: ChildFailed, labels: &[String], argv0: &str) -> EngineError {
    let msg = process::describe(&f.0, labels, argv0);
    if f.0.step == process::Step::Exec {
        EngineError::FailedPrecondition(format!("starting the process: {msg}"))
    } else {
        EngineError::Internal(format!("container setup: {msg}"))
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The exit code convention of shells and containerd: 128 + signal.
pub fn exit_code(s: ExitStatus) -> u32 {
    match s {
        ExitStatus::Exited(c) => (c & 0xff) as u32,
        ExitStatus::Signaled { signal, .. } => 128 + signal as u32,
    }
}

impl Engine {
    /// A new engine. Must be called within a tokio runtime.
    pub fn new(cfg: EngineConfig, reaper: Arc<Reaper>) -> Arc<Engine> {
        let cgroup_v2 = cgroups::is_cgroup2(&cfg.cgroup_root);
        if !cgroup_v2 {
            tracing::warn!(
                "{} is not a cgroup v2 mount: containers get no cgroup",
                cfg.cgroup_root.display()
            );
        }
        let (oom_tx, _) = broadcast::channel(64);
        Arc::new(Engine {
            table: Table::new(cfg.max_containers),
            cfg,
            cgroup_v2,
            reaper,
            oom_tx,
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// Whether containers get cgroups.
    pub fn has_cgroups(&self) -> bool {
        self.cgroup_v2
    }

    /// Creates a container (blocking). Returns the init pid.
    pub fn create(self: &Arc<Self>, p: CreateParams) -> Result<i32, EngineError> {
        validate_id(&p.id, "container_id")?;
        self.table.reserve(&p.id)?;
        let r = self.create_reserved(&p);
        if r.is_err() {
            self.table.unreserve(&p.id);
        }
        r
    }

    fn create_reserved(self: &Arc<Self>, p: &CreateParams) -> Result<i32, EngineError> {
        let spec = spec::parse_spec(&p.spec_json)?;
        if !p.rootfs.is_absolute() {
            return Err(EngineError::invalid("rootfs_path", "must be absolute"));
        }
        match std::fs::metadata(&p.rootfs) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(EngineError::invalid("rootfs_path", "not a directory")),
            Err(e) => {
                return Err(EngineError::invalid(
                    "rootfs_path",
                    format!("{}: {e}", p.rootfs.display()),
                ))
            }
        }
        let rootfs = std::fs::canonicalize(&p.rootfs)
            .map_err(|e| EngineError::invalid("rootfs_path", e.to_string()))?;
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| EngineError::invalid("linux", "required"))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| EngineError::invalid("process", "required"))?;
        let ns = namespaces::from_spec(linux.namespaces().as_deref().unwrap_or(&[]))?;
        let id_maps = namespaces::id_maps(linux, &ns)?;
        let terminal = p.terminal || process.terminal().unwrap_or(false);
        let mut plan = spec::process_plan(process, &rootfs, terminal)?;
        let rplan = rootfs::plan(&spec, &rootfs)?;
        let labels = rplan.labels.clone();
        plan.rootfs = Some(rplan);
        if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            if !ns.uts {
                return Err(EngineError::invalid("hostname", "needs a UTS namespace"));
            }
            if h.len() > 64 {
                return Err(EngineError::invalid("hostname", "longer than 64 bytes"));
            }
            plan.hostname = Some(rootfs::cstr(h.as_bytes(), "hostname")?);
        }
        if let Some(d) = spec.domainname().as_deref().filter(|h| !h.is_empty()) {
            if !ns.uts {
                return Err(EngineError::invalid("domainname", "needs a UTS namespace"));
            }
            plan.domainname = Some(rootfs::cstr(d.as_bytes(), "domainname")?);
        }
        let seccomp = match linux.seccomp() {
            Some(s) => seccomp::compile(s)?,
            None => Vec::new(),
        };
        plan.seccomp = seccomp.clone();
        let joins = namespaces::open_joins(&ns)?;
        plan.setns = joins.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        // setns(CLONE_NEWPID) only applies to the caller's children: to run
        // inside a joined pid namespace (a pod's shared one), init is a
        // second clone, as for exec.
        plan.double_clone = ns.join.iter().any(|(_, t)| *t == libc::CLONE_NEWPID);
        plan.new_cgroup_ns = ns.new_cgroup;
        plan.userns_root = id_maps.as_ref().is_some_and(|(u, g)| {
            u.lines().any(|l| l.starts_with("0 ")) && g.lines().any(|l| l.starts_with("0 "))
        });

        let files = match linux.resources() {
            Some(r) => cgroups::resource_files(r)?,
            None => Vec::new(),
        };
        let device_rules = device_rules(linux)?;
        let cgroup = if self.cgroup_v2 {
            let rel = match linux.cgroups_path() {
                Some(cp) => cgroups::relative_path(cp)?,
                None => self.cfg.cgroup_parent.join(&p.id),
            };
            let cg = Cgroup::create(&self.cfg.cgroup_root, &rel)?;
            let applied = cg.apply(&files).and_then(|()| match &device_rules {
                Some(rules) => devices::attach(cg.path(), rules),
                None => Ok(()),
            });
            if let Err(e) = applied {
                let _ = cg.remove();
                return Err(e);
            }
            Some(cg)
        } else {
            if !files.is_empty() {
                return Err(EngineError::FailedPrecondition(format!(
                    "linux.resources needs cgroup v2, which is not mounted at {}",
                    self.cfg.cgroup_root.display()
                )));
            }
            None
        };
        let cleanup_cg = |cg: &Option<Cgroup>| {
            if let Some(cg) = cg {
                cg.kill_all();
                let _ = cg.remove();
            }
        };
        // A terminal comes from the container's own devpts (so that `tty` names it, as under runc) when
        // the spec mounts one; the child allocates it after pivot_root and sends the master back.
        let console_size = spec::console_size(process);
        let stdio = if terminal && mounts_devpts(&spec) {
            ConsoleSocket::new().and_then(|s| Ok((None, stdio::placeholder()?, Some(s))))
        } else {
            stdio::make(p.stdin, terminal, console_size).map(|(pi, ci)| (Some(pi), ci, None))
        };
        let (parent_io, child_io, console) = match stdio {
            Ok(x) => x,
            Err(e) => {
                cleanup_cg(&cgroup);
                return Err(e);
            }
        };
        plan.stdio = child_io.raw();
        plan.console_socket = console.as_ref().map(ConsoleSocket::child_fd);
        let oom_adj = process.oom_score_adj();
        let argv0 = process
            .args()
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        let launched = process::launch(&mut plan, &self.reaper, ns.clone_flags, |pid| {
            if let Some(maps) = &id_maps {
                namespaces::write_id_maps(pid, maps)?;
            }
            if let Some(cg) = &cgroup {
                cg.add(pid)?;
            }
            write_oom_score_adj(pid, oom_adj)
        });
        drop(child_io);
        drop(joins);
        let launched = match launched {
            Ok(l) => l,
            Err(e) => {
                cleanup_cg(&cgroup);
                return Err(match e {
                    Ok(f) => child_error(f, &labels, &argv0),
                    Err(e) => e,
                });
            }
        };
        let parent_io = match receive_console(parent_io, console, console_size) {
            Ok(p) => p,
            Err(e) => {
                drop(launched.abandon());
                cleanup_cg(&cgroup);
                return Err(e);
            }
        };
        let pid = launched.pid;
        let (exit_tx, exit_rx) = watch::channel(None);
        let init = Arc::new(ProcessState {
            exec_id: String::new(),
            pid,
            stdio: parent_io,
            exit: exit_rx,
        });
        // The exit receiver moves to the watcher; Launched keeps a dummy.
        let (launched, status_rx) = split_exit(launched);
        let c = Arc::new(Container {
            id: p.id.clone(),
            rootfs,
            cgroup,
            init,
            launched: std::sync::Mutex::new(Some(launched)),
            execs: std::sync::Mutex::new(HashMap::new()),
            seccomp,
            oom_seen: Default::default(),
            oom_killed: Default::default(),
            removed: Default::default(),
        });
        self.watch_exit(&c, status_rx, exit_tx);
        self.watch_oom(&c);
        self.table.insert(Arc::clone(&c));
        tracing::info!(container = %p.id, pid, "created");
        Ok(pid)
    }

    fn watch_exit(
        &self,
        c: &Arc<Container>,
        rx: oneshot::Receiver<ExitStatus>,
        tx: watch::Sender<Option<Exit>>,
    ) {
        let weak = Arc::downgrade(c);
        let oom_tx = self.oom_tx.clone();
        self.rt.spawn(async move {
            let status = rx.await;
            let at = now_nanos();
            let code = match status {
                Ok(s) => exit_code(s),
                // The reaper dropped the sender: should not happen.
                Err(_) => 255,
            };
            let oom = weak.upgrade().is_some_and(|c| {
                if check_oom(&c) {
                    let _ = oom_tx.send(c.id.clone());
                }
                c.oom()
            });
            let _ = tx.send(Some(Exit {
                status: code,
                at_unix_nanos: at,
                oom_killed: oom,
            }));
        });
    }

    fn watch_oom(&self, c: &Arc<Container>) {
        if c.cgroup.is_none() {
            return;
        }
        let weak: Weak<Container> = Arc::downgrade(c);
        let tx = self.oom_tx.clone();
        let every = self.cfg.oom_poll;
        self.rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(c) = weak.upgrade() else { return };
                if c.removed.load(Ordering::SeqCst) {
                    return;
                }
                if check_oom(&c) {
                    tracing::warn!(container = %c.id, "OOM kill");
                    let _ = tx.send(c.id.clone());
                }
            }
        });
    }

    /// Runs the created container's process (blocking).
    pub fn start(&self, id: &str) -> Result<(), EngineError> {
        validate_id(id, "container_id")?;
        let c = self.table.get(id)?;
        let launched = lock(&c.launched).take();
        let Some(launched) = launched else {
            return Err(EngineError::FailedPrecondition(format!(
                "container {id} is {:?}, not created",
                c.status()
            )));
        };
        match launched.start() {
            Ok(_) => {
                tracing::info!(container = %id, "started");
                Ok(())
            }
            Err(Ok(f)) => Err(child_error(f, &[], "process.args[0]")),
            Err(Err(e)) => Err(e),
        }
    }

    /// Starts a process in a running container (blocking). Returns its pid.
    pub fn exec(&self, p: ExecParams) -> Result<i32, EngineError> {
        validate_id(&p.id, "container_id")?;
        validate_id(&p.exec_id, "exec_id")?;
        let c = self.table.get(&p.id)?;
        if c.status() != Status::Running {
            return Err(EngineError::FailedPrecondition(format!(
                "container {} is {:?}, not running",
                p.id,
                c.status()
            )));
        }
        {
            let execs = lock(&c.execs);
            if execs.contains_key(&p.exec_id) {
                return Err(EngineError::AlreadyExists(format!(
                    "exec {} exists",
                    p.exec_id
                )));
            }
            if execs.len() >= self.cfg.max_execs {
                return Err(EngineError::ResourceExhausted(format!(
                    "at most {} processes per container",
                    self.cfg.max_execs
                )));
            }
        }
        let process = spec::parse_process(&p.process_json)?;
        let init_pid = c.init.pid;
        let root = PathBuf::from(format!("/proc/{init_pid}/root"));
        let terminal = p.terminal || process.terminal().unwrap_or(false);
        let mut plan: ChildPlan = spec::process_plan(&process, &root, terminal)?;
        let joins = namespaces::open_of_pid(init_pid)?;
        let root_dir = File::open(&root).map_err(|e| {
            EngineError::FailedPrecondition(format!("container {} init is gone: {e}", p.id))
        })?;
        // The init may have exited and its pid been reused while we opened.
        if c.init.exited().is_some() {
            return Err(EngineError::FailedPrecondition(format!(
                "container {} stopped",
                p.id
            )));
        }
        plan.setns = joins.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        plan.join_root = Some(root_dir.as_raw_fd());
        plan.double_clone = true;
        plan.seccomp = c.seccomp.clone();
        // The container's own devpts (its /dev/ptmx), so that `tty` in the exec names its terminal; the
        // child allocates it after its chroot into the container. A container without one (no /dev/pts
        // mount) gets a terminal from the guest's.
        let console_size = spec::console_size(&process);
        let (parent_io, child_io, console) =
            if terminal && std::fs::metadata(root.join("dev/ptmx")).is_ok() {
                (None, stdio::placeholder()?, Some(ConsoleSocket::new()?))
            } else {
                let (pi, ci) = stdio::make(p.stdin, terminal, console_size)?;
                (Some(pi), ci, None)
            };
        plan.stdio = child_io.raw();
        plan.console_socket = console.as_ref().map(ConsoleSocket::child_fd);
        let oom_adj = process.oom_score_adj();
        let argv0 = process
            .args()
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        let launched = process::launch(&mut plan, &self.reaper, 0, |pid| {
            if let Some(cg) = &c.cgroup {
                cg.add(pid)?;
            }
            write_oom_score_adj(pid, oom_adj)
        });
        drop(child_io);
        drop(joins);
        drop(root_dir);
        let launched = launched.map_err(|e| match e {
            Ok(f) => child_error(f, &[], &argv0),
            Err(e) => e,
        })?;
        let parent_io = match receive_console(parent_io, console, console_size) {
            Ok(p) => p,
            Err(e) => {
                drop(launched.abandon());
                return Err(e);
            }
        };
        let pid = launched.pid;
        let (pid2, status_rx) = launched.start().map_err(|e| match e {
            Ok(f) => child_error(f, &[], &argv0),
            Err(e) => e,
        })?;
        debug_assert_eq!(pid, pid2);
        let (exit_tx, exit_rx) = watch::channel(None);
        let ps = Arc::new(ProcessState {
            exec_id: p.exec_id.clone(),
            pid,
            stdio: parent_io,
            exit: exit_rx,
        });
        self.watch_exit(&c, status_rx, exit_tx);
        lock(&c.execs).insert(p.exec_id.clone(), ps);
        tracing::info!(container = %p.id, exec = %p.exec_id, pid, "exec");
        Ok(pid)
    }

    /// Sends `signal` to a process, or to all of the container's.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), EngineError> {
        validate_id(id, "container_id")?;
        if !exec_id.is_empty() {
            validate_id(exec_id, "exec_id")?;
        }
        if !(1..=64).contains(&signal) {
            return Err(EngineError::invalid("signal", "must be 1..=64"));
        }
        let sig = signal as i32;
        let c = self.table.get(id)?;
        if all {
            match &c.cgroup {
                Some(cg) => cg.signal_all(sig),
                None => {
                    for p in
                        std::iter::once(Arc::clone(&c.init)).chain(lock(&c.execs).values().cloned())
                    {
                        if p.exited().is_none() {
                            // SAFETY: kill(2) with integers.
                            unsafe { libc::kill(p.pid, sig) };
                        }
                    }
                }
            }
            return Ok(());
        }
        let p = c.process(exec_id)?;
        if p.exited().is_some() {
            return Err(EngineError::NotFound(format!(
                "process {:?} has exited",
                p.exec_id
            )));
        }
        // SAFETY: kill(2) with integers. The pid is not reused while its
        // exit is undelivered (the reaper delivers before we see exited).
        if unsafe { libc::kill(p.pid, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(EngineError::NotFound(format!(
                    "process {:?} has exited",
                    p.exec_id
                )));
            }
            return Err(EngineError::Internal(format!("kill: {e}")));
        }
        Ok(())
    }

    /// Waits for a process to exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, EngineError> {
        validate_id(id, "container_id")?;
        if !exec_id.is_empty() {
            validate_id(exec_id, "exec_id")?;
        }
        let p = self.table.get(id)?.process(exec_id)?;
        let mut rx = p.exit.clone();
        let r = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| EngineError::Internal("exit watcher gone".into()))?;
        Ok(r.expect("checked"))
    }

    /// Removes a container (with `force`, kills it first).
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), EngineError> {
        validate_id(id, "container_id")?;
        let c = self.table.get(id)?;
        if c.status() == Status::Running && !force {
            return Err(EngineError::FailedPrecondition(format!(
                "container {id} is running (use force)"
            )));
        }
        if let Some(l) = lock(&c.launched).take() {
            drop(l.abandon());
        }
        if c.init.exited().is_none() {
            match &c.cgroup {
                Some(cg) => cg.kill_all(),
                None => {
                    // SAFETY: kill(2) with integers.
                    unsafe { libc::kill(c.init.pid, libc::SIGKILL) };
                }
            }
            let mut rx = c.init.exit.clone();
            if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
                .await
                .is_err()
            {
                return Err(EngineError::Internal(format!(
                    "container {id}: init did not die"
                )));
            }
        }
        // Without a pid namespace, exec'd processes outlive init.
        for p in lock(&c.execs).values() {
            if p.exited().is_none() {
                // SAFETY: kill(2) with integers.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
        }
        let c2 = Arc::clone(&c);
        tokio::task::spawn_blocking(move || {
            if let Some(cg) = &c2.cgroup {
                cg.kill_all();
                cg.remove()
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
        c.removed.store(true, Ordering::SeqCst);
        self.table.remove(id);
        tracing::info!(container = %id, "removed");
        Ok(())
    }

    /// The container's processes, and every pid in it (at most `max_pids`).
    pub fn list(
        &self,
        id: &str,
        max_pids: usize,
    ) -> Result<(Vec<ListedProcess>, Vec<i32>), EngineError> {
        validate_id(id, "container_id")?;
        let c = self.table.get(id)?;
        let mut procs = vec![ListedProcess {
            exec_id: String::new(),
            pid: c.init.pid,
            exit: c.init.exited(),
        }];
        let mut execs: Vec<_> = lock(&c.execs).values().cloned().collect();
        execs.sort_by(|a, b| a.exec_id.cmp(&b.exec_id));
        procs.extend(execs.iter().map(|p| ListedProcess {
            exec_id: p.exec_id.clone(),
            pid: p.pid,
            exit: p.exited(),
        }));
        let pids = match &c.cgroup {
            Some(cg) => cg.procs(max_pids),
            None => procs
                .iter()
                .filter(|p| p.exit.is_none())
                .map(|p| p.pid)
                .take(max_pids)
                .collect(),
        };
        Ok((procs, pids))
    }

    /// A process (for stdio).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<ProcessState>, EngineError> {
        validate_id(id, "container_id")?;
        if !exec_id.is_empty() {
            validate_id(exec_id, "exec_id")?;
        }
        self.table.get(id)?.process(exec_id)
    }

    /// Freezes or thaws (blocking).
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<(), EngineError> {
        validate_id(id, "container_id")?;
        let c = self.table.get(id)?;
        let cg = c.cgroup.as_ref().ok_or_else(|| {
            EngineError::FailedPrecondition("pause needs cgroup v2 (not available)".into())
        })?;
        if c.status() != Status::Running {
            return Err(EngineError::FailedPrecondition(format!(
                "container {id} is {:?}, not running",
                c.status()
            )));
        }
        cg.freeze(paused)
    }

    /// Applies an OCI `linux.resources` JSON object to the container's
    /// cgroup (blocking: writes files). Only the resources present change.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), EngineError> {
        validate_id(id, "container_id")?;
        if resources_json.len() > husk_proto::MAX_SPEC_SIZE {
            return Err(EngineError::invalid(
                "resources_json",
                format!(
                    "{} bytes, limit {}",
                    resources_json.len(),
                    husk_proto::MAX_SPEC_SIZE
                ),
            ));
        }
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| EngineError::invalid("resources_json", e.to_string()))?;
        // The mapping names fields as in a full spec; here the object is the
        // request's resources_json.
        let files = cgroups::resource_files(&r).map_err(|e| match e {
            EngineError::InvalidArgument { field, reason } => EngineError::InvalidArgument {
                field: field.replacen("linux.resources", "resources_json", 1),
                reason,
            },
            e => e,
        })?;
        let c = self.table.get(id)?;
        if c.status() == Status::Stopped {
            return Err(EngineError::FailedPrecondition(format!(
                "container {id} is stopped"
            )));
        }
        let cg = c.cgroup.as_ref().ok_or_else(|| {
            EngineError::FailedPrecondition("update needs cgroup v2 (not available)".into())
        })?;
        cg.apply(&files)?;
        if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            // Replacing the attached program needs BPF_F_REPLACE bookkeeping.
            tracing::warn!(container = %id, "UpdateContainer: device rules are not changed after create");
        }
        tracing::info!(container = %id, files = files.len(), "resources updated");
        Ok(())
    }

    /// Whether the container is frozen.
    pub fn is_paused(&self, id: &str) -> Result<bool, EngineError> {
        let c = self.table.get(id)?;
        Ok(c.cgroup.as_ref().is_some_and(Cgroup::is_frozen))
    }

    /// cgroup statistics (blocking: reads files).
    pub fn stats(&self, id: &str) -> Result<cgroups::Stats, EngineError> {
        validate_id(id, "container_id")?;
        let c = self.table.get(id)?;
        let cg = c.cgroup.as_ref().ok_or_else(|| {
            EngineError::FailedPrecondition("stats need cgroup v2 (not available)".into())
        })?;
        Ok(cg.stats())
    }

    /// Subscribes to OOM kills (container ids).
    pub fn oom_events(&self) -> broadcast::Receiver<String> {
        self.oom_tx.subscribe()
    }

    /// Ids of all containers.
    pub fn ids(&self) -> Vec<String> {
        self.table.all().iter().map(|c| c.id.clone()).collect()
    }

    /// Root of the container's file system as given at create.
    pub fn rootfs(&self, id: &str) -> Result<PathBuf, EngineError> {
        Ok(self.table.get(id)?.rootfs.clone())
    }

    /// The engine's cgroup root.
    pub fn cgroup_root(&self) -> &Path {
        &self.cfg.cgroup_root
    }
}

/// The device cgroup rules of a spec (`None`: no rules, no program), with
/// the nodes of `linux.devices` allowed.
fn device_rules(
    linux: &oci_spec::runtime::Linux,
) -> Result<Option<Vec<devices::Rule>>, EngineError> {
    let spec_rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or(&[]);
    let mut extra = Vec::new();
    for d in linux.devices().as_deref().unwrap_or(&[]) {
        let block = match d.typ() {
            oci_spec::runtime::LinuxDeviceType::B => true,
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => false,
            // FIFOs are not device-controlled.
            _ => continue,
        };
        if let (Ok(ma), Ok(mi)) = (u32::try_from(d.major()), u32::try_from(d.minor())) {
            extra.push((block, ma, mi));
        }
    }
    devices::rules(spec_rules, "linux.resources.devices", &extra)
}

/// Whether the spec mounts a devpts at /dev/pts (then `/dev/ptmx`, linked to `pts/ptmx`, is the
/// container's own).
fn mounts_devpts(spec: &oci_spec::runtime::Spec) -> bool {
    spec.mounts()
        .iter()
        .flatten()
        .any(|m| m.destination() == Path::new("/dev/pts") && m.typ().as_deref() == Some("devpts"))
}

/// The agent's stdio ends: `made` (pipes or a guest pty), or the pty master the child sent over
/// `console` (called once the child reported ready, so it was sent).
fn receive_console(
    made: Option<stdio::ParentStdio>,
    console: Option<ConsoleSocket>,
    size: Option<(u16, u16)>,
) -> Result<stdio::ParentStdio, EngineError> {
    match (made, console) {
        (Some(p), _) => Ok(p),
        (None, Some(c)) => stdio::from_pty_master(c.receive()?, size),
        (None, None) => Err(EngineError::Internal("stdio: neither made nor sent".into())),
    }
}

/// Reads memory.events; records and reports a new OOM kill.
fn check_oom(c: &Container) -> bool {
    let Some(cg) = &c.cgroup else { return false };
    let n = cg.oom_kills();
    let seen = c.oom_seen.swap(n, Ordering::SeqCst);
    if n > seen {
        c.oom_killed.store(true, Ordering::SeqCst);
        return true;
    }
    false
}

fn write_oom_score_adj(pid: i32, adj: Option<i32>) -> Result<(), EngineError> {
    let Some(adj) = adj else { return Ok(()) };
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string())
        .map_err(|e| EngineError::Internal(format!("oom_score_adj: {e}")))
}

/// Takes the exit receiver out of a launched child (for the watcher).
fn split_exit(mut l: process::Launched) -> (process::Launched, oneshot::Receiver<ExitStatus>) {
    let (_tx, dummy) = oneshot::channel();
    let rx = std::mem::replace(&mut l.exit_rx, dummy);
    (l, rx)
}
