//! The vCPU threads: run KVM_RUN, dispatch port-I/O and MMIO exits to the buses, report the exits
//! that end the VM. A stop request interrupts KVM_RUN with a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::exit::{ExitLatch, VmExit};

/// KVM_SYSTEM_EVENT_* types (linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

/// The kick signal only needs to interrupt the KVM_RUN ioctl (EINTR); the handler does nothing.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(SIGRTMIN(), kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

impl Vcpu {
    /// Starts the vCPU on its own thread. It runs until the guest ends the VM, an error occurs, or
    /// `stop` is set and the thread is kicked.
    pub fn start(self, exit: Arc<ExitLatch>, stop: Arc<AtomicBool>) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                if let Some(reason) = self.run_loop(&stop) {
                    exit.set(reason);
                }
            })?;
        Ok(VcpuHandle { thread })
    }

    fn run_loop(mut self, stop: &AtomicBool) -> Option<VmExit> {
        while !stop.load(Ordering::Acquire) {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    // Unclaimed ports float high, as on real hardware.
                    if !self.pio.read(port.into(), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(port.into(), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => {
                    // Triple fault, or `reboot=t`.
                    return Some(VmExit::GuestReset);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Some(match kind {
                        SYSTEM_EVENT_SHUTDOWN => VmExit::GuestShutdown,
                        SYSTEM_EVENT_RESET => VmExit::GuestReset,
                        SYSTEM_EVENT_CRASH => VmExit::GuestCrash,
                        other => VmExit::Error(format!(
                            "vCPU {}: unknown KVM system event {other}",
                            self.id
                        )),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Some(VmExit::Error(format!(
                        "vCPU {}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                        self.id
                    )));
                }
                Ok(VcpuExit::InternalError) => {
                    return Some(VmExit::Error(format!(
                        "vCPU {}: KVM internal error (the host cannot emulate the guest)",
                        self.id
                    )));
                }
                Ok(other) => {
                    return Some(VmExit::Error(format!(
                        "vCPU {}: unexpected exit {other:?}",
                        self.id
                    )));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return Some(VmExit::Error(format!("vCPU {}: KVM_RUN: {e}", self.id)));
                }
            }
        }
        None
    }
}

impl VcpuHandle {
    /// Kicks the thread out of KVM_RUN until it notices `stop` (which the caller has set) and exits.
    /// The signal may land just before the thread re-enters KVM_RUN, so it is repeated.
    pub fn stop_and_join(self) {
        while !self.thread.is_finished() {
            if let Err(e) = self.thread.kill(SIGRTMIN()) {
                tracing::warn!("cannot kick a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
