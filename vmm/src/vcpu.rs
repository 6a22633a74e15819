//! The vCPU threads: run KVM_RUN, dispatch port-I/O and MMIO exits to the buses, report the exits
//! that end the VM. Stop and pause requests interrupt KVM_RUN with a signal; a paused vCPU parks on
//! the [`VcpuGate`] until it is resumed or stopped; on its way there it leaves a [`VcpuSnapshot`] of
//! its registers, which the control socket's `vcpus` request shows (where is a stuck guest?).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
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

/// Where vCPU threads park while the VM is paused.
#[derive(Default)]
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// Registers of each vCPU as it parked for the current pause (by vCPU id).
    snapshots: BTreeMap<u8, VcpuSnapshot>,
}

/// A parked vCPU's registers: enough to tell where a guest that stopped making progress runs.
/// Registers serialize as hex strings: kernel addresses exceed what JSON numbers carry exactly
/// in most clients (2^53).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VcpuSnapshot {
    pub id: u8,
    /// KVM's multiprocessing state (`runnable`, `halted`, …), `unknown` if unreadable.
    pub mp_state: &'static str,
    #[serde(serialize_with = "hex")]
    pub rip: u64,
    #[serde(serialize_with = "hex")]
    pub rsp: u64,
    #[serde(serialize_with = "hex")]
    pub rflags: u64,
    #[serde(serialize_with = "hex")]
    pub cr0: u64,
    #[serde(serialize_with = "hex")]
    pub cr3: u64,
    #[serde(serialize_with = "hex")]
    pub cr4: u64,
    #[serde(serialize_with = "hex")]
    pub efer: u64,
    /// Why the registers could not be read, if they could not (the numbers are then 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// KVM's counters for this vCPU ([`crate::kvm_stats`]); empty where the kernel has none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kvm_stats: BTreeMap<String, u64>,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

impl VcpuGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread between runs: blocks while the VM is paused and not stopping. The
    /// snapshot is taken (outside the lock) before the vCPU counts as parked, so that once
    /// [`Self::wait_parked`] succeeds every parked vCPU has left one.
    fn park_if_paused(&self, stop: &AtomicBool, snapshot: impl FnOnce() -> VcpuSnapshot) {
        if !self.lock().paused {
            return;
        }
        let snap = snapshot();
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.snapshots.insert(snap.id, snap);
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }

    pub fn set_paused(&self, paused: bool) {
        let mut s = self.lock();
        if paused && !s.paused {
            // Registers of an earlier pause would describe the past.
            s.snapshots.clear();
        }
        s.paused = paused;
        self.changed.notify_all();
    }

    /// The registers each parked vCPU left for the current pause; empty while running.
    pub fn snapshots(&self) -> Vec<VcpuSnapshot> {
        let s = self.lock();
        if !s.paused {
            return Vec::new();
        }
        s.snapshots.values().cloned().collect()
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Waits until `count` vCPUs are parked, or `timeout` passes; returns whether they all are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.parked < count)
            .unwrap_or_else(|e| e.into_inner());
        s.parked >= count
    }

    /// Wakes parked vCPUs so that they notice a stop.
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }
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
    pub fn start(
        self,
        exit: Arc<ExitLatch>,
        stop: Arc<AtomicBool>,
        gate: Arc<VcpuGate>,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                if let Some(reason) = self.run_loop(&stop, &gate) {
                    exit.set(reason);
                }
            })?;
        Ok(VcpuHandle { thread })
    }

    fn run_loop(mut self, stop: &AtomicBool, gate: &VcpuGate) -> Option<VmExit> {
        while !stop.load(Ordering::Acquire) {
            gate.park_if_paused(stop, || self.snapshot());
            if stop.load(Ordering::Acquire) {
                break;
            }
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
                Ok(VcpuExit::Shutdown) => return Some(self.triple_fault()),
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

impl Vcpu {
    fn snapshot(&self) -> VcpuSnapshot {
        let mp_state = match self.fd.get_mp_state().map(|m| m.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_RUNNABLE) => "runnable",
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => "uninitialized",
            Ok(kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => "init_received",
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => "halted",
            Ok(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED) => "sipi_received",
            _ => "unknown",
        };
        let mut snap = VcpuSnapshot {
            id: self.id,
            mp_state,
            rip: 0,
            rsp: 0,
            rflags: 0,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            error: None,
            kvm_stats: crate::kvm_stats::read_vcpu_stats(&self.fd).unwrap_or_default(),
        };
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(sr)) => {
                (snap.rip, snap.rsp, snap.rflags) = (r.rip, r.rsp, r.rflags);
                (snap.cr0, snap.cr3, snap.cr4, snap.efer) = (sr.cr0, sr.cr3, sr.cr4, sr.efer);
            }
            (Err(e), _) | (_, Err(e)) => snap.error = Some(e.to_string()),
        }
        snap
    }

    /// KVM_EXIT_SHUTDOWN: a triple fault. Husk guests reboot through the i8042 (`reboot=k`), so
    /// a triple fault is a guest crash, reported with the registers that explain it. Two
    /// exceptions: Linux's `reboot=t` loads an empty IDT first (on Intel the registers still show
    /// it, and that is a reboot); on AMD, KVM reinitializes the vCPU before it reports the
    /// shutdown, so the registers show the reset vector and say nothing about the crash.
    fn triple_fault(&self) -> VmExit {
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                return VmExit::TripleFault {
                    vcpu: self.id,
                    state: format!("registers unavailable: {e}"),
                }
            }
        };
        if sregs.idt.limit == 0 {
            return VmExit::GuestReset;
        }
        let state = if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
            "registers reset by KVM before the exit".to_string()
        } else {
            format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
                 cr4={:#x} efer={:#x} idt={:#x}/{:#x}",
                regs.rip,
                regs.rsp,
                regs.rflags,
                sregs.cs.selector,
                sregs.cr0,
                sregs.cr2,
                sregs.cr3,
                sregs.cr4,
                sregs.efer,
                sregs.idt.base,
                sregs.idt.limit
            )
        };
        VmExit::TripleFault {
            vcpu: self.id,
            state,
        }
    }
}

impl VcpuHandle {
    /// Interrupts KVM_RUN on this vCPU so that it looks at the gate and the stop flag.
    pub fn kick(&self) {
        if !self.thread.is_finished() {
            if let Err(e) = self.thread.kill(SIGRTMIN()) {
                tracing::warn!("cannot kick a vCPU thread: {e}");
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(id: u8) -> VcpuSnapshot {
        VcpuSnapshot {
            id,
            mp_state: "runnable",
            rip: 0x1000 + u64::from(id),
            rsp: 0,
            rflags: 0x2,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            error: None,
            kvm_stats: BTreeMap::from([("exits".to_string(), 5)]),
        }
    }

    #[test]
    fn gate_parks_until_resumed_or_stopped() {
        let gate = Arc::new(VcpuGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.set_paused(true);
        let threads: Vec<_> = (0..3u8)
            .map(|id| {
                let (g, s) = (gate.clone(), stop.clone());
                std::thread::spawn(move || g.park_if_paused(&s, || fake(id)))
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        assert!(threads.iter().all(|t| !t.is_finished()));
        // Every parked vCPU left its registers, in id order.
        let rips: Vec<u64> = gate.snapshots().iter().map(|s| s.rip).collect();
        assert_eq!(rips, [0x1000, 0x1001, 0x1002]);
        gate.set_paused(false);
        for t in threads {
            t.join().unwrap();
        }
        assert!(gate.snapshots().is_empty(), "no registers while running");

        // A new pause forgets the old registers; a running VM takes no snapshot at all.
        gate.park_if_paused(&stop, || panic!("snapshot taken while running"));
        gate.set_paused(true);
        assert!(gate.snapshots().is_empty());
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park_if_paused(&s, || fake(7)));
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        assert_eq!(gate.snapshots(), [fake(7)]);
        let json = serde_json::to_value(&gate.snapshots()[0]).unwrap();
        assert_eq!(json["rip"], "0x1007");
        assert_eq!(json["mp_state"], "runnable");
        assert!(json.get("error").is_none());
        assert_eq!(json["kvm_stats"]["exits"], 5);
        stop.store(true, Ordering::Release);
        gate.wake_all();
        t.join().unwrap();
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }
}
