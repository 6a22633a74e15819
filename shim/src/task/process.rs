//! The shim's view of containers and their processes: state, stdio, exit status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::protos::api::Status;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::spec::PodRole;
use super::stdio::{StdinCopy, StdioPaths};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcState {
    /// Created: for the init, set up in the guest and waiting for Start; for an exec, only known to the shim.
    Created,
    Running,
    Exited(Exit),
}

/// One process: the container's init (`exec_id` empty) or an exec.
pub struct Process {
    pub exec_id: String,
    pub stdio: StdioPaths,
    pub state: ProcState,
    /// Pid in the guest (0 until the process exists there).
    pub pid: u32,
    /// The OCI process JSON of an exec, kept until Start.
    pub exec_spec: Option<Vec<u8>>,
    pub stdin: Option<StdinCopy>,
    /// Output copiers; the exit is reported once they have drained (or after a grace period).
    pub outputs: Vec<JoinHandle<()>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        Self {
            exec_id: exec_id.into(),
            stdio,
            state: ProcState::Created,
            pid: 0,
            exec_spec: None,
            stdin: None,
            outputs: Vec::new(),
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        match self.state {
            ProcState::Exited(e) => Some(e),
            _ => None,
        }
    }

    /// Records the exit once (the first report wins: the agent's, or the VM's death). Returns whether this
    /// call recorded it.
    pub fn set_exited(&mut self, exit: Exit) -> bool {
        if self.exit().is_some() {
            return false;
        }
        self.state = ProcState::Exited(exit);
        self.exit_tx.send_replace(Some(exit));
        if let Some(s) = &self.stdin {
            s.unblock();
        }
        true
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    pub fn status(&self, paused: bool) -> Status {
        match self.state {
            ProcState::Created => Status::CREATED,
            ProcState::Running if paused => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
            ProcState::Exited(_) => Status::STOPPED,
        }
    }
}

/// A container of the pod.
pub struct Container {
    pub id: String,
    pub bundle: String,
    pub role: PodRole,
    pub init: Process,
    pub execs: BTreeMap<String, Process>,
    pub paused: bool,
    /// The container's directory in the share on the host (rootfs and bind mounts), removed on Delete.
    pub host_dir: PathBuf,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// Exec ids of the processes that exist in the guest and have not exited (init included).
    pub fn live_processes(&self) -> Vec<String> {
        std::iter::once(&self.init)
            .chain(self.execs.values())
            .filter(|p| {
                p.exit().is_none() && (p.exec_id.is_empty() || p.state != ProcState::Created)
            })
            .map(|p| p.exec_id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let mut p = Process::new("", StdioPaths::default());
        let mut w = p.exit_watch();
        assert_eq!(p.status(false), Status::CREATED);
        p.state = ProcState::Running;
        assert_eq!(p.status(true), Status::PAUSED);
        let e = Exit {
            status: 3,
            at: SystemTime::UNIX_EPOCH,
        };
        assert!(p.set_exited(e));
        assert!(!p.set_exited(Exit { status: 137, ..e }));
        assert_eq!(p.exit().unwrap().status, 3);
        assert!(w.has_changed().unwrap());
        assert_eq!(w.borrow_and_update().unwrap().status, 3);
        assert_eq!(p.status(false), Status::STOPPED);
    }
}
