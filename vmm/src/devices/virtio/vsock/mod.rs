//! virtio-vsock device (ID 19) with a hybrid Unix-socket backend.
//!
//! * Host -> guest: a host process connects to `uds_path` and writes `CONNECT <port>\n`; once the
//!   guest accepts, it reads `OK <host port>\n` and the stream carries the connection.
//! * Guest -> host: a guest connection to host port `P` is connected to the Unix socket
//!   `<uds_path>_<P>`; if nobody listens there, the guest gets a reset.
//!
//! Threading: the transport calls [`VirtioDevice`] methods from vCPU threads, the VMM event loop
//! calls [`MutEventSubscriber`] methods; both go through the same `Mutex<Vsock>`. Activation and
//! reset only record the new state and kick `ctl_evt`; the event loop then (un)registers the queue
//! eventfds and the muxer's epoll fd, since only it holds the `EventOps`.

mod connection;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::health::{self, warn_limited, DeviceState, LogLimit, RingError};
use super::{
    check_activation, read_config_bytes, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use muxer::Muxer;
pub use muxer::MAX_CONNECTIONS;
use packet::{RxBuffer, TxPacket};

/// Virtio device ID of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const NUM_QUEUES: usize = 3;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Tx packets handled per wakeup before the event loop serves the other devices: a guest that
/// refills its tx ring as fast as we drain it cannot monopolize the loop. Half a ring, so that
/// a full ring already takes two turns. The rest is picked up after a self-notification of the
/// tx queue.
const TX_PACKETS_PER_WAKEUP: usize = QUEUE_SIZE as usize / 2;

// Event-manager data tags.
const EV_CTL: u32 = 0;
const EV_RXQ: u32 = 1;
const EV_TXQ: u32 = 2;
const EV_EVQ: u32 = 3;
const EV_MUXER: u32 = 4;

/// Errors creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is invalid (must be between 3 and 2^32 - 2)")]
    InvalidCid(u64),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot bind vsock Unix socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// State that exists only between activation and reset.
struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    irq: IrqTrigger,
}

impl AsRef<IrqTrigger> for Active {
    fn as_ref(&self) -> &IrqTrigger {
        &self.irq
    }
}

/// Rate limits for what a guest can make us log.
#[derive(Default)]
struct Logs {
    /// Malformed chains (both queues); its count is [`Vsock::dropped_chains`].
    drops: LogLimit,
    rx_write: LogLimit,
}

pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    config: [u8; 8],
    muxer: Muxer,
    ctl_evt: EventFd,
    /// What `init` could not register with the event loop (the VM then does not start).
    loop_error: Option<String>,
    state: DeviceState<Active>,
    /// Queue eventfd clones currently registered with the event manager (by index).
    registered: Vec<EventFd>,
    muxer_registered: bool,
    logs: Logs,
}

impl Vsock {
    /// Creates the device and binds the host listener at `uds_path` (replacing a stale socket).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let ctl_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VsockError::Sys {
            what: "vsock control eventfd",
            source,
        })?;
        Ok(Self {
            guest_cid,
            acked_features: 0,
            config: guest_cid.to_le_bytes(),
            muxer: Muxer::new(guest_cid, uds_path)?,
            ctl_evt,
            loop_error: None,
            state: DeviceState::default(),
            registered: Vec::new(),
            muxer_registered: false,
            logs: Logs::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Open connections (not counting host clients still in the handshake).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Number of malformed descriptor chains dropped so far.
    pub fn dropped_chains(&self) -> u64 {
        self.logs.drops.count()
    }

    /// Consumes the guest's tx queue (at most [`TX_PACKETS_PER_WAKEUP`] packets): every chain is
    /// validated, handed to the muxer and returned. Then delivers what the muxer has.
    pub fn process_tx(&mut self) {
        let was_active = self.state.is_active();
        let (cid, muxer, logs) = (self.guest_cid, &mut self.muxer, &mut self.logs);
        self.state.run("vsock", |a| {
            let mut used = false;
            let res = drain_tx(a, cid, muxer, logs, &mut used);
            if used {
                notify(a, TXQ);
            }
            res
        });
        self.after_ring_use(was_active);
        self.process_rx();
    }

    /// Fills guest rx buffers with whatever the muxer has for the guest.
    pub fn process_rx(&mut self) {
        let was_active = self.state.is_active();
        let (muxer, logs) = (&mut self.muxer, &mut self.logs);
        self.state.run("vsock", |a| {
            let mut used = false;
            let res = fill_rx(a, muxer, logs, &mut used);
            if used {
                notify(a, RXQ);
            }
            res
        });
        self.after_ring_use(was_active);
    }

    /// If a ring just broke, the connections cannot carry data any more: close them so host
    /// clients see EOF now instead of waiting on a guest that is no longer served.
    fn after_ring_use(&mut self, was_active: bool) {
        if was_active && self.state.needs_reset() {
            self.muxer.reset();
        }
    }

    /// Handles host-side readiness (new clients, stream data, timeouts), then delivers.
    pub fn process_muxer(&mut self) {
        self.muxer.poll();
        self.process_rx();
    }

    fn drain_queue_evt(&self, index: usize) {
        if let Some(evt) = self.registered.get(index) {
            let _ = evt.read();
        }
    }

    /// Makes the event manager watch exactly what the current state needs.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                warn!("vsock: cannot unregister queue eventfd: {e:?}");
            }
        }
        if self.muxer_registered {
            if let Err(e) = ops.remove(Events::empty_raw(self.muxer.epoll_fd())) {
                warn!("vsock: cannot unregister muxer: {e:?}");
            }
            self.muxer_registered = false;
        }
        let Some(a) = self.state.active() else {
            return;
        };
        let mut failure = health::watch_queues(ops, &a.evts, EV_RXQ, &mut self.registered).err();
        if failure.is_none() {
            match ops.add(Events::with_data_raw(
                self.muxer.epoll_fd(),
                EV_MUXER,
                EventSet::IN,
            )) {
                Ok(()) => self.muxer_registered = true,
                Err(e) => {
                    failure = Some(RingError::Unwatched {
                        what: "the connection muxer".into(),
                        reason: format!("{e:?}"),
                    })
                }
            }
        }
        if let Some(e) = failure {
            self.state.fail("vsock", &e);
            self.after_ring_use(true);
            // No longer active: this only takes back what was registered.
            self.sync_registrations(ops);
            return;
        }
        // The driver may have queued packets before we were watching.
        self.process_tx();
    }
}

/// Hands up to [`TX_PACKETS_PER_WAKEUP`] tx packets to the muxer; `used` tells whether any chain
/// was returned to the driver.
fn drain_tx(
    a: &mut Active,
    guest_cid: u64,
    muxer: &mut Muxer,
    logs: &mut Logs,
    used: &mut bool,
) -> Result<(), RingError> {
    for _ in 0..TX_PACKETS_PER_WAKEUP {
        let Some(chain) = health::pop(&mut a.queues[TXQ], &a.mem, TXQ)? else {
            return Ok(());
        };
        let head = chain.head_index();
        match TxPacket::parse(chain, &a.mem, guest_cid) {
            Ok(pkt) => muxer.handle_guest_packet(&pkt, &a.mem),
            Err(e) => warn_limited!(
                logs.drops,
                queue = "tx",
                "vsock: dropping malformed descriptor chain: {e}"
            ),
        }
        health::add_used(&mut a.queues[TXQ], &a.mem, TXQ, head, 0)?;
        *used = true;
    }
    // Budget spent: if more is queued, come back after the other devices had their turn. The
    // queue eventfd is the one the event loop watches, so this is exactly a driver notification.
    let avail = a.queues[TXQ]
        .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|source| RingError::Avail { queue: TXQ, source })?;
    if avail.0 != a.queues[TXQ].next_avail() {
        if let Err(e) = a.evts[TXQ].write(1) {
            warn!("vsock: cannot reschedule the tx queue: {e}");
        }
    }
    Ok(())
}

/// Moves muxer packets into rx buffers while both exist; `used` as in [`drain_tx`].
fn fill_rx(
    a: &mut Active,
    muxer: &mut Muxer,
    logs: &mut Logs,
    used: &mut bool,
) -> Result<(), RingError> {
    while muxer.has_rx_pending() {
        let Some(chain) = health::pop(&mut a.queues[RXQ], &a.mem, RXQ)? else {
            break;
        };
        let head = chain.head_index();
        let len = match RxBuffer::parse(chain, &a.mem) {
            Err(e) => {
                warn_limited!(
                    logs.drops,
                    queue = "rx",
                    "vsock: dropping malformed descriptor chain: {e}"
                );
                0
            }
            Ok(buf) => match muxer.next_rx(buf.room()) {
                None => {
                    // Nothing to send after all: give the buffer back.
                    a.queues[RXQ].go_to_previous_position();
                    break;
                }
                Some(hdr) => {
                    let payload = muxer.payload(hdr.len);
                    buf.write(&a.mem, &hdr, payload).unwrap_or_else(|e| {
                        warn_limited!(logs.rx_write, "vsock: cannot write rx packet: {e}");
                        0
                    })
                }
            },
        };
        health::add_used(&mut a.queues[RXQ], &a.mem, RXQ, head, len)?;
        *used = true;
    }
    Ok(())
}

fn notify(a: &mut Active, q: usize) {
    // Without EVENT_IDX (not offered) this is always true; it keeps us correct if it ever is.
    if a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
        if let Err(e) = a.irq.trigger(VIRTIO_MMIO_INT_VRING) {
            warn!(queue = q, "vsock: cannot signal used ring: {e}");
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "vsock: ignoring write to read-only config"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: IrqTrigger,
    ) -> Result<(), ActivateError> {
        check_activation(!self.state.is_inactive(), NUM_QUEUES, &queues, &queue_evts)?;
        self.ctl_evt.write(1).map_err(ActivateError::EventFd)?;
        self.state.activate(Active {
            mem,
            queues,
            evts: queue_evts,
            irq: interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.acked_features = 0;
        self.muxer.reset();
        if let Err(e) = self.ctl_evt.write(1) {
            warn!("vsock: cannot signal reset to the event loop: {e}");
        }
    }

    fn needs_reset(&self) -> bool {
        self.state.needs_reset()
    }

    fn event_loop_error(&self) -> Option<&str> {
        self.loop_error.as_deref()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ctl_evt, EV_CTL, EventSet::IN)) {
            self.loop_error = Some(format!("cannot register the control eventfd: {e:?}"));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_CTL => {
                let _ = self.ctl_evt.read();
                self.sync_registrations(ops);
            }
            EV_RXQ => {
                self.drain_queue_evt(RXQ);
                self.process_rx();
            }
            EV_TXQ => {
                self.drain_queue_evt(TXQ);
                self.process_tx();
            }
            // We never send transport events; just consume the notification.
            EV_EVQ => self.drain_queue_evt(EVQ),
            EV_MUXER => self.process_muxer(),
            other => debug!(data = other, "vsock: event with unknown tag"),
        }
    }
}
