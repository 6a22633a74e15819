//! Guest power-off for the `Shutdown` RPC.
//!
//! The RPC handler only calls [`Shutdown::trigger`], which returns at once so
//! that the reply goes out; a dedicated thread then waits a moment for the
//! reply to be flushed and:
//! * as PID 1: SIGTERM to every process, up to [`GRACE`] for them to exit,
//!   SIGKILL to the rest, `sync`, `reboot(RB_AUTOBOOT)`. The guest runs with
//!   `reboot=k`, so the VMM sees a keyboard-controller reset and exits 0;
//! * otherwise (host-side testing): exits the agent process with status 0.
//!   It never signals other processes then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::reaper::Reaper;

/// Time given to processes between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);
/// Delay between acknowledging the RPC and starting to tear down.
const REPLY_FLUSH: Duration = Duration::from_millis(100);

/// Errors while powering off.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// kill(-1, sig) failed.
    #[error("kill(-1, {signal}): {source}")]
    Signal {
        /// The signal being sent.
        signal: Signal,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The shutdown thread could not be started.
    #[error("spawning the shutdown thread: {0}")]
    Thread(#[source] std::io::Error),
    /// reboot(2) failed.
    #[error("reboot(RB_AUTOBOOT): {0}")]
    Reboot(#[source] nix::Error),
}

/// What a triggered shutdown does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the guest: kill everything and reboot (= VM exit).
    PowerOff,
    /// Not PID 1: just exit this process.
    ExitProcess,
}

/// One-shot shutdown trigger.
#[derive(Debug)]
pub struct Shutdown {
    mode: Mode,
    reaper: Arc<Reaper>,
    started: AtomicBool,
}

impl Shutdown {
    /// A trigger that does `mode` when fired.
    pub fn new(mode: Mode, reaper: Arc<Reaper>) -> Arc<Self> {
        Arc::new(Self {
            mode,
            reaper,
            started: AtomicBool::new(false),
        })
    }

    /// Whether a shutdown is already under way.
    pub fn in_progress(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Starts the shutdown in the background. Idempotent: returns `Ok(false)`
    /// if it was already started.
    pub fn trigger(self: &Arc<Self>) -> Result<bool, ShutdownError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(REPLY_FLUSH);
                match this.mode {
                    Mode::ExitProcess => {
                        tracing::info!("shutdown: exiting (not PID 1)");
                        std::process::exit(0);
                    }
                    Mode::PowerOff => {
                        let err = this.power_off();
                        tracing::error!("shutdown failed: {err}; idling");
                        loop {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Ok(true),
            Err(e) => {
                self.started.store(false, Ordering::SeqCst);
                Err(ShutdownError::Thread(e))
            }
        }
    }

    /// Kills everything, syncs and reboots. Returns only on failure.
    fn power_off(&self) -> ShutdownError {
        tracing::info!("shutdown: terminating processes");
        if let Err(e) = signal_all(Signal::SIGTERM) {
            tracing::warn!("{e}");
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline && user_processes_left() > 0 {
            self.reaper.reap_all();
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = user_processes_left();
        if left > 0 {
            tracing::info!("shutdown: killing {left} remaining processes");
            if let Err(e) = signal_all(Signal::SIGKILL) {
                tracing::warn!("{e}");
            }
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline && user_processes_left() > 0 {
                self.reaper.reap_all();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.reaper.reap_all();
        nix::unistd::sync();
        tracing::info!("shutdown: rebooting");
        match reboot(RebootMode::RB_AUTOBOOT) {
            Ok(never) => match never {},
            Err(e) => ShutdownError::Reboot(e),
        }
    }
}

/// kill(-1, sig): every process except PID 1 itself. Only ever called as PID
/// 1 inside the guest.
fn signal_all(signal: Signal) -> Result<(), ShutdownError> {
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(ShutdownError::Signal { signal, source }),
    }
}

/// Number of live user-space processes other than this one. Kernel threads
/// and zombies have an empty /proc/PID/cmdline and are not counted.
fn user_processes_left() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.bytes().all(|b| b.is_ascii_digit()) && name != me.as_str()
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_processes_without_panicking() {
        // On the host there are other processes; the scan must see some.
        assert!(user_processes_left() > 0);
    }

    #[test]
    fn trigger_is_idempotent_without_running() {
        // Mark as started by hand so no thread (which would exit) is spawned.
        let s = Shutdown::new(Mode::ExitProcess, Reaper::new());
        s.started.store(true, Ordering::SeqCst);
        assert!(s.in_progress());
        assert!(!s.trigger().unwrap());
    }
}
