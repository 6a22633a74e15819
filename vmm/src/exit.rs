//! Why a VM ended, and the latch through which the first reason is recorded.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset, KVM reset event, or Linux's deliberate `reboot=t`
    /// triple fault): Husk ends the VM.
    GuestReset,
    /// A vCPU triple-faulted while the guest had a working IDT: the guest kernel crashed
    /// without a panic message. `state` is the register snapshot taken at the exit.
    TripleFault { vcpu: u8, state: String },
    /// The guest powered off.
    GuestShutdown,
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    GuestCrash,
    /// The VMM received a termination signal.
    Signal(i32),
    /// Stopped through the control socket (a hard stop, or a graceful one that timed out).
    Stopped,
    /// The VMM could not continue running the guest.
    Error(String),
}

impl VmExit {
    /// The process exit status of `husk-vmm` for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestShutdown | VmExit::Stopped => 0,
            VmExit::Error(_) => 1,
            VmExit::GuestCrash | VmExit::TripleFault { .. } => 3,
            VmExit::Signal(n) => 128 + n,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest rebooted"),
            VmExit::GuestShutdown => write!(f, "guest powered off"),
            VmExit::GuestCrash => write!(f, "guest crashed"),
            VmExit::TripleFault { vcpu, state } => {
                write!(f, "guest triple-faulted on vCPU {vcpu} ({state})")
            }
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::Stopped => write!(f, "stopped through the control socket"),
            VmExit::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Records the first reason the VM ends and wakes whoever waits on `event()`.
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn set(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal the VM exit: {e}");
        }
    }

    pub fn take(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let l = ExitLatch::new().unwrap();
        assert!(l.evt.read().is_err());
        l.set(VmExit::GuestReset);
        l.set(VmExit::Error("late".into()));
        assert!(l.event().read().unwrap() >= 1);
        assert_eq!(l.take(), Some(VmExit::GuestReset));
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
        assert_eq!(VmExit::GuestReset.exit_code(), 0);
    }
}
