//! The container table (bounded) and the per-container / per-process state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::cgroups::Cgroup;
use super::process::Launched;
use super::stdio::ParentStdio;
use super::EngineError;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// Reap time, nanoseconds since the Unix epoch.
    pub at_unix_nanos: u64,
    /// The container's cgroup had an OOM kill before the exit.
    pub oom_killed: bool,
}

/// A process the agent started (init or exec).
#[derive(Debug)]
pub struct ProcessState {
    /// Empty for init.
    pub exec_id: String,
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    /// The agent's ends of its stdio.
    pub stdio: ParentStdio,
    /// `None` until it exits.
    pub exit: watch::Receiver<Option<Exit>>,
}

impl ProcessState {
    /// The exit, if it happened.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// Lifecycle of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Set up, waiting for StartContainer.
    Created,
    /// Init runs.
    Running,
    /// Init exited.
    Stopped,
}

/// One container.
#[derive(Debug)]
pub struct Container {
    /// Its id.
    pub id: String,
    /// Root file system path in the guest.
    pub rootfs: PathBuf,
    /// Its cgroup, when cgroup v2 is available.
    pub cgroup: Option<Cgroup>,
    /// The init process.
    pub init: Arc<ProcessState>,
    /// Until StartContainer: the child waiting to exec.
    pub launched: Mutex<Option<Launched>>,
    /// Exec'd processes by exec id.
    pub execs: Mutex<HashMap<String, Arc<ProcessState>>>,
    /// Compiled seccomp filters, applied to exec'd processes too.
    pub seccomp: Vec<seccompiler::BpfProgram>,
    /// memory.events oom_kill count already reported.
    pub oom_seen: AtomicU64,
    /// An OOM kill happened in the container.
    pub oom_killed: AtomicBool,
    /// Removed from the table (stops the OOM monitor).
    pub removed: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Container {
    /// Current status.
    pub fn status(&self) -> Status {
        if self.init.exited().is_some() {
            Status::Stopped
        } else if lock(&self.launched).is_some() {
            Status::Created
        } else {
            Status::Running
        }
    }

    /// Init (empty id) or an exec'd process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcessState>, EngineError> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            EngineError::NotFound(format!("container {}: no process {exec_id:?}", self.id))
        })
    }

    /// Whether an OOM kill was recorded.
    pub fn oom(&self) -> bool {
        self.oom_killed.load(Ordering::SeqCst)
    }
}

enum Slot {
    Reserved,
    Ready(Arc<Container>),
}

/// The container table: at most `max` entries (including creations in
/// progress, which reserve their id).
pub struct Table {
    map: Mutex<HashMap<String, Slot>>,
    max: usize,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &lock(&self.map).len())
            .finish()
    }
}

impl Table {
    /// An empty table for at most `max` containers.
    pub fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// Reserves `id` for a creation.
    pub fn reserve(&self, id: &str) -> Result<(), EngineError> {
        let mut m = lock(&self.map);
        if m.contains_key(id) {
            return Err(EngineError::AlreadyExists(format!("container {id} exists")));
        }
        if m.len() >= self.max {
            return Err(EngineError::ResourceExhausted(format!(
                "at most {} containers",
                self.max
            )));
        }
        m.insert(id.to_string(), Slot::Reserved);
        Ok(())
    }

    /// Drops a reservation (creation failed).
    pub fn unreserve(&self, id: &str) {
        let mut m = lock(&self.map);
        if matches!(m.get(id), Some(Slot::Reserved)) {
            m.remove(id);
        }
    }

    /// Fills a reservation.
    pub fn insert(&self, c: Arc<Container>) {
        lock(&self.map).insert(c.id.clone(), Slot::Ready(c));
    }

    /// A ready container.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, EngineError> {
        match lock(&self.map).get(id) {
            Some(Slot::Ready(c)) => Ok(Arc::clone(c)),
            Some(Slot::Reserved) => Err(EngineError::FailedPrecondition(format!(
                "container {id} is being created"
            ))),
            None => Err(EngineError::NotFound(format!("no container {id}"))),
        }
    }

    /// Removes a ready container.
    pub fn remove(&self, id: &str) -> Option<Arc<Container>> {
        let mut m = lock(&self.map);
        match m.get(id) {
            Some(Slot::Ready(_)) => match m.remove(id) {
                Some(Slot::Ready(c)) => Some(c),
                _ => None,
            },
            _ => None,
        }
    }

    /// All ready containers.
    pub fn all(&self) -> Vec<Arc<Container>> {
        lock(&self.map)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(Arc::clone(c)),
                Slot::Reserved => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_bounds_and_reservations() {
        let t = Table::new(2);
        t.reserve("a").unwrap();
        assert!(matches!(t.reserve("a"), Err(EngineError::AlreadyExists(_))));
        t.reserve("b").unwrap();
        assert!(matches!(
            t.reserve("c"),
            Err(EngineError::ResourceExhausted(_))
        ));
        assert!(matches!(
            t.get("a"),
            Err(EngineError::FailedPrecondition(_))
        ));
        assert!(matches!(t.get("zz"), Err(EngineError::NotFound(_))));
        t.unreserve("a");
        t.reserve("c").unwrap();
        assert!(t.remove("c").is_none(), "reservations are not removable");
    }
}
