//! Child reaper. As PID 1 the agent inherits every orphan in the guest and
//! must wait for it, or zombies pile up.
//!
//! Every reaping goes through [`Reaper::reap_all`], which runs
//! `waitpid(-1, WNOHANG)` until nothing is left, triggered by SIGCHLD (and a
//! slow periodic sweep, in case a signal was coalesced before the handler
//! existed). Exit statuses of unknown pids are logged at debug level and
//! dropped.
//!
//! Code that needs the exit status of a child it spawns (the future
//! container engine) must not `wait` itself (it would race this reaper) but:
//!
//! ```text
//! let mut guard = reaper.lock();        // reaping paused
//! let pid = spawn_the_child()?;         // fork/clone + exec
//! let status_rx = guard.register(pid);  // before the guard is dropped
//! drop(guard);
//! let status = status_rx.await?;        // delivered by the reaper
//! ```
//!
//! Holding the guard across the spawn guarantees the child cannot be reaped
//! before it is registered, so no status is ever lost, and a recycled pid can
//! never be confused with an old one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled {
        /// Signal number.
        signal: i32,
        /// Whether a core dump was written.
        core_dumped: bool,
    },
}

/// Reaper errors.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The SIGCHLD handler could not be installed.
    #[error("installing the SIGCHLD handler: {0}")]
    Signal(#[source] std::io::Error),
}

type Waiters = HashMap<i32, oneshot::Sender<ExitStatus>>;

/// Reaps all children; forwards the statuses of registered pids.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<Waiters>,
}

/// Pauses reaping while held; see the module docs.
pub struct ReapGuard<'a> {
    waiters: MutexGuard<'a, Waiters>,
}

impl ReapGuard<'_> {
    /// Registers interest in `pid`'s exit status. Must be called while the
    /// guard that was taken before spawning `pid` is still held.
    pub fn register(&mut self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(pid, tx);
        rx
    }
}

impl Reaper {
    /// A new reaper, not yet running; see [`Reaper::run`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Pauses reaping until the guard is dropped.
    pub fn lock(&self) -> ReapGuard<'_> {
        ReapGuard {
            waiters: self.waiters.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Reaps every exited child now. Returns how many were reaped.
    pub fn reap_all(&self) -> usize {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let mut reaped = 0;
        loop {
            let status = match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => (
                    pid,
                    ExitStatus::Signaled {
                        signal: sig as i32,
                        core_dumped,
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue, // stop/continue/ptrace events: not an exit
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
            };
            reaped += 1;
            let (pid, status) = status;
            match waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped"),
            }
        }
        reaped
    }

    /// Reaps on every SIGCHLD, and every `SWEEP` as a safety net. Returns
    /// only if the signal handler cannot be installed.
    pub async fn run(self: Arc<Self>) -> Result<(), ReaperError> {
        const SWEEP: Duration = Duration::from_secs(30);
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        loop {
            let this = Arc::clone(&self);
            // waitpid never blocks (WNOHANG), but the lock may be held by a
            // spawner for a moment: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || this.reap_all()).await;
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(SWEEP) => {}
            }
        }
    }
}
