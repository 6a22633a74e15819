//! The VM's main thread while the guest runs: waits for the end (a vCPU exit, the i8042 reset, a
//! termination signal) and answers control-socket requests (state, pause/resume, stats, stop).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::protocol::{error_reply, DEFAULT_GRACEFUL_TIMEOUT_MS};
use crate::control::{ControlCommand, DeviceHandle, Request, StopMode};
use crate::exit::{ExitLatch, VmExit};
use crate::vcpu::{VcpuGate, VcpuHandle};

/// The agent's control port: a one-line protocol (`shutdown\n`) for the VMM's graceful stop.
pub const AGENT_CONTROL_PORT: u32 = 1025;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const GUEST_ASK_TIMEOUT: Duration = Duration::from_secs(2);

const EV_EXIT: u64 = 0;
const EV_RESET: u64 = 1;
const EV_SIGNAL: u64 = 2;
const EV_CONTROL: u64 = 3;

pub struct Supervisor<'a> {
    pub exit: &'a ExitLatch,
    pub reset: &'a EventFd,
    pub signal: EventFd,
    pub signal_number: fn() -> i32,
    pub control: Option<(mpsc::Receiver<ControlCommand>, EventFd)>,
    pub vcpus: &'a [VcpuHandle],
    pub gate: &'a VcpuGate,
    pub devices: &'a [DeviceHandle],
    pub mem_mib: u64,
    pub vsock_uds: Option<PathBuf>,
    pub started: Instant,
}

impl Supervisor<'_> {
    /// Runs until the VM must end; returns why.
    pub fn run(mut self) -> VmExit {
        let epoll = match self.epoll() {
            Ok(e) => e,
            Err(e) => return VmExit::Error(format!("supervisor epoll: {e}")),
        };
        let mut graceful_deadline: Option<Instant> = None;
        let mut ready = [EpollEvent::default(); 4];
        loop {
            let timeout = graceful_deadline.map_or(-1, |d| {
                // Round up so the wait does not end a millisecond early and spin; clamp, never wrap.
                let ms = d
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            });
            let n = match epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return VmExit::Error(format!("supervisor epoll wait: {e}")),
            };
            if n == 0 && graceful_deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!("the guest did not shut down in time; stopping it");
                return VmExit::Stopped;
            }
            for ev in &ready[..n] {
                match ev.data() {
                    EV_EXIT => {
                        if let Some(r) = self.exit.take() {
                            return r;
                        }
                    }
                    EV_RESET => return VmExit::GuestReset,
                    EV_SIGNAL => return VmExit::Signal((self.signal_number)()),
                    _ => {
                        if let Some(exit) = self.control_requests(&mut graceful_deadline) {
                            return exit;
                        }
                    }
                }
            }
        }
    }

    fn epoll(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let mut fds = vec![
            (self.exit.event().as_raw_fd(), EV_EXIT),
            (self.reset.as_raw_fd(), EV_RESET),
            (self.signal.as_raw_fd(), EV_SIGNAL),
        ];
        if let Some((_, notify)) = &self.control {
            fds.push((notify.as_raw_fd(), EV_CONTROL));
        }
        for (fd, tag) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tag),
            )?;
        }
        Ok(epoll)
    }

    /// Answers every pending control request; returns an exit if one of them ends the VM now.
    fn control_requests(&mut self, graceful_deadline: &mut Option<Instant>) -> Option<VmExit> {
        let (commands, notify) = self.control.as_ref()?;
        let _ = notify.read();
        let pending: Vec<ControlCommand> = commands.try_iter().collect();
        let mut end = None;
        for cmd in pending {
            let answer = match cmd.request {
                Request::State {} => self.state(),
                Request::Pause {} => self.pause(),
                Request::Resume {} => {
                    self.gate.set_paused(false);
                    json!({"ok": true, "state": "running"})
                }
                Request::Stats {} => {
                    let devices: Vec<Value> =
                        self.devices.iter().map(DeviceHandle::stats).collect();
                    json!({"ok": true, "devices": devices})
                }
                Request::Vcpus {} => self.vcpu_snapshots(),
                Request::Stop {
                    mode: StopMode::Hard,
                    ..
                } => {
                    end = Some(VmExit::Stopped);
                    json!({"ok": true, "stopping": "hard"})
                }
                Request::Stop {
                    mode: StopMode::Graceful,
                    timeout_ms,
                } => match self.ask_guest_to_shut_down() {
                    Ok(()) => {
                        // A paused guest cannot shut down.
                        self.gate.set_paused(false);
                        let ms = timeout_ms.unwrap_or(DEFAULT_GRACEFUL_TIMEOUT_MS);
                        *graceful_deadline = Some(Instant::now() + Duration::from_millis(ms));
                        json!({"ok": true, "stopping": "graceful", "timeout_ms": ms})
                    }
                    Err(e) => error_reply(format!("cannot ask the guest to shut down: {e}")),
                },
            };
            let _ = cmd.reply.send(answer);
        }
        end
    }

    fn state(&self) -> Value {
        json!({
            "ok": true,
            "state": if self.gate.is_paused() { "paused" } else { "running" },
            "vcpus": self.vcpus.len(),
            "mem_mib": self.mem_mib,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
        })
    }

    /// The registers the vCPUs left when they parked (a debugging aid: where is a stuck guest?).
    fn vcpu_snapshots(&self) -> Value {
        if !self.gate.is_paused() {
            return error_reply("pause the VM first: registers are read from parked vCPUs");
        }
        json!({"ok": true, "vcpus": self.gate.snapshots()})
    }

    fn pause(&self) -> Value {
        self.gate.set_paused(true);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        // A kick can land just before a vCPU enters KVM_RUN; repeat until every vCPU is parked.
        loop {
            self.vcpus.iter().for_each(VcpuHandle::kick);
            if self
                .gate
                .wait_parked(self.vcpus.len(), Duration::from_millis(5))
            {
                return json!({"ok": true, "state": "paused"});
            }
            if Instant::now() >= deadline {
                self.gate.set_paused(false);
                return error_reply("the vCPUs did not stop in time; the VM keeps running");
            }
        }
    }

    fn ask_guest_to_shut_down(&self) -> Result<(), String> {
        let uds = self
            .vsock_uds
            .as_deref()
            .ok_or("the VM has no vsock device, so no agent to ask")?;
        ask_agent_shutdown(uds).map_err(|e| e.to_string())
    }
}

/// Connects to the agent's control port through the VMM's own hybrid vsock socket and asks it to shut
/// the guest down.
fn ask_agent_shutdown(uds: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(GUEST_ASK_TIMEOUT))?;
    s.set_write_timeout(Some(GUEST_ASK_TIMEOUT))?;
    s.write_all(format!("CONNECT {AGENT_CONTROL_PORT}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(&s, 64)).read_line(&mut reply)?;
    if !reply.starts_with("OK ") {
        return Err(std::io::Error::other(
            "the agent's control port did not answer",
        ));
    }
    s.write_all(b"shutdown\n")
}
