//! virtio-net device (ID 1) with a TAP backend.
//!
//! * tx: each chain (12-byte `virtio_net_hdr_v1` + frame, device-readable) is gathered into a
//!   fixed 65562-byte buffer and written to the tap in one `write`; the tap applies the header
//!   (checksum offload, TSO) itself. Oversized or malformed chains are dropped and counted.
//! * rx: we read from the tap only when the guest has posted an rx buffer. With
//!   `VIRTIO_NET_F_MRG_RXBUF` (offered, and what Linux negotiates) a frame may span several
//!   buffers, so the guest can post small (page-sized) buffers and still receive 64 KiB TSO
//!   frames; without it a frame must fit one buffer or is dropped. When buffers run out we keep
//!   the frame we hold, stop polling the tap for input (the tap queues, then drops, further
//!   frames) and resume on the next rx queue notification.
//! * The guest is interrupted at most once per batch and queue, and only when it asked for it
//!   (EVENT_IDX's `used_event`).
//! * Notifications (each one a VM exit) are suppressed where we do not need them: on tx while
//!   we drain the ring, on rx whenever we are not waiting for buffers (we take rx buffers from
//!   the ring as frames arrive; only a stalled rx needs to hear about new ones).
//!
//! Threading and event registration follow the vsock device: the transport calls
//! [`VirtioDevice`] methods from vCPU threads, the event loop calls [`MutEventSubscriber`]
//! methods, both through the same `Mutex<Net>`; activation and reset kick `ctl_evt` and the
//! event loop (un)registers the queue eventfds and the tap.

mod tap;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, ChainError, GuestBufs};
use super::health::{self, warn_limited, DeviceState, LogLimit, RingError};
use super::{
    check_activation, read_config_bytes, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// Virtio device ID of network devices.
pub const NET_DEVICE_ID: u32 = 1;
/// Size of the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame including the vnet header: a 64 KiB GSO payload plus Ethernet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 14 + 65536;
/// Longest chain we accept. Linux uses up to MAX_SKB_FRAGS + 2 descriptors for tx.
pub const MAX_CHAIN_DESCS: usize = 64;
/// Frames read from the tap per wakeup before yielding to the other devices (epoll is
/// level-triggered, so we are called again if more are queued).
const RX_BATCH: usize = 256;
/// Frames sent per wakeup before yielding to the other devices; the rest is picked up after a
/// self-notification of the tx queue.
const TX_BATCH: usize = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
const CONFIG_LEN: usize = 8;

// virtio_net_hdr gso_type values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

// Event-manager data tags.
const EV_CTL: u32 = 0;
const EV_RXQ: u32 = 1;
const EV_TXQ: u32 = 2;
const EV_TAP: u32 = 3;

/// Where the device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface to attach to (created, non-persistent, if it does not exist).
    pub tap_name: String,
    /// Guest MAC address; a random locally administered one if `None`.
    pub mac: Option<[u8; 6]>,
    /// Network namespace (e.g. `/var/run/netns/NAME` or `/proc/PID/ns/net`) to find the tap in.
    pub netns: Option<PathBuf>,
}

/// Errors creating the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("MAC address {0} is multicast; a guest NIC needs a unicast address")]
    MulticastMac(String),
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Frame and error counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Well-formed chains whose frame was not sent: too large, a header using an offload the
    /// driver did not negotiate, or the tap refused it (e.g. link down).
    pub tx_dropped: u64,
    /// Malformed tx chains (bad descriptors, device-writable buffers, shorter than the header).
    pub tx_malformed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the tap that did not fit the guest's buffers (or were runts).
    pub rx_dropped: u64,
    /// Malformed rx chains, returned with used length 0.
    pub rx_malformed: u64,
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

/// A validated rx buffer taken from the queue but not yet returned.
struct RxChain {
    head: u16,
    bufs: GuestBufs,
}

struct Rx {
    /// The frame read from the tap and not yet delivered: `frame[..pending]`.
    frame: Box<[u8]>,
    pending: usize,
    /// Buffers popped from the rx queue, in order, waiting for a frame.
    reserved: VecDeque<RxChain>,
    reserved_bytes: u64,
    /// The guest has no buffers for us: do not poll the tap for input.
    stalled: bool,
    /// Rx problems a guest (or a peer on the tap) can cause at will.
    log: LogLimit,
}

impl Rx {
    fn new() -> Self {
        Self {
            frame: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
            pending: 0,
            reserved: VecDeque::new(),
            reserved_bytes: 0,
            stalled: false,
            log: LogLimit::default(),
        }
    }

    /// Forgets every frame and buffer of the current driver instance.
    fn clear(&mut self) {
        self.pending = 0;
        self.reserved.clear();
        self.reserved_bytes = 0;
        self.stalled = false;
    }
}

struct Tx {
    buf: Box<[u8]>,
    /// The tap returned EAGAIN: wait for it to become writable.
    blocked: bool,
    /// Tx frames we drop; the guest chooses how many.
    log: LogLimit,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    ctl_evt: EventFd,
    /// What `init` could not register with the event loop (the VM then does not start).
    loop_error: Option<String>,
    state: DeviceState<Active>,
    /// Queue eventfd clones currently registered with the event manager (by index).
    registered: Vec<EventFd>,
    /// The tap's current registration with the event manager, if any.
    tap_events: Option<EventSet>,
    /// The tap reported an error (e.g. the interface was deleted); it is no longer polled.
    tap_failed: bool,
    rx: Rx,
    tx: Tx,
    stats: NetStats,
    /// Failed offload changes: the driver renegotiates (and so retries) as often as it likes.
    offload_log: LogLimit,
}

impl Net {
    /// Opens the tap and builds the device.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        let mac = match cfg.mac {
            Some(mac) if mac[0] & 1 != 0 => return Err(NetError::MulticastMac(fmt_mac(&mac))),
            Some(mac) => mac,
            None => random_mac()?,
        };
        let tap = Tap::open(&cfg.tap_name, cfg.netns.as_deref())?;
        let ctl_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| NetError::Sys {
            what: "net control eventfd",
            source,
        })?;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let avail_features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0u64, |f, &bit| f | (1 << bit));
        Ok(Self {
            tap,
            mac,
            config,
            avail_features,
            acked_features: 0,
            ctl_evt,
            loop_error: None,
            state: DeviceState::default(),
            registered: Vec::new(),
            tap_events: None,
            tap_failed: false,
            rx: Rx::new(),
            tx: Tx {
                buf: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
                blocked: false,
                log: LogLimit::default(),
            },
            stats: NetStats::default(),
            offload_log: LogLimit::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the device currently wants to read from the tap (false under rx backpressure).
    pub fn wants_tap_input(&self) -> bool {
        self.state.is_active() && !self.rx.stalled && !self.tap_failed
    }

    fn has(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Sends the frames the guest queued (at most [`TX_BATCH`]), then interrupts it once.
    pub fn process_tx(&mut self) {
        let was_active = self.state.is_active();
        let acked = self.acked_features;
        let (tap, tx, stats) = (&self.tap, &mut self.tx, &mut self.stats);
        self.state.run("virtio-net", |a| {
            let mut used = false;
            let res = drain_tx(a, tap, tx, stats, acked, &mut used);
            if used {
                notify(a, TXQ);
            }
            res
        });
        self.after_ring_use(was_active);
    }

    /// Moves frames from the tap into guest rx buffers, then interrupts the guest once.
    pub fn process_rx(&mut self) {
        let was_active = self.state.is_active();
        let (acked, tap_failed) = (self.acked_features, self.tap_failed);
        let (tap, rx, stats) = (&self.tap, &mut self.rx, &mut self.stats);
        let mut read = |buf: &mut [u8]| tap.read_frame(buf);
        self.state.run("virtio-net", |a| {
            run_rx(a, rx, &mut read, tap_failed, stats, acked)
        });
        self.after_ring_use(was_active);
    }

    /// If a ring just broke, drop what belonged to it: the reserved rx buffers, the frame we
    /// held for them, and the wait for tap writability (the tap's epoll interest follows).
    fn after_ring_use(&mut self, was_active: bool) {
        if was_active && self.state.needs_reset() {
            self.rx.clear();
            self.tx.blocked = false;
        }
    }

    /// The guest posted rx buffers: leave backpressure and deliver.
    pub fn rx_queue_notified(&mut self) {
        self.rx.stalled = false;
        // Until we run out again we take buffers from the ring as frames arrive: the driver
        // need not tell us about each refill (each notification is a VM exit).
        let was_active = self.state.is_active();
        self.state.run("virtio-net", |a| {
            health::disable_notification(&mut a.queues[RXQ], &a.mem, RXQ)
        });
        self.after_ring_use(was_active);
        self.process_rx();
    }

    fn desired_tap_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.wants_tap_input() {
            ev |= EventSet::IN;
        }
        if self.tx.blocked {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Updates the tap's epoll interest to what the current state needs.
    fn sync_tap_events(&mut self, ops: &mut EventOps) {
        let Some(current) = self.tap_events else {
            return;
        };
        let want = self.desired_tap_events();
        if want != current {
            match ops.modify(Events::with_data(&self.tap, EV_TAP, want)) {
                Ok(()) => self.tap_events = Some(want),
                Err(e) => warn!("virtio-net: cannot update tap interest: {e:?}"),
            }
        }
    }

    fn unregister_tap(&mut self, ops: &mut EventOps) {
        if self.tap_events.take().is_some() {
            if let Err(e) = ops.remove(Events::empty(&self.tap)) {
                warn!("virtio-net: cannot unregister tap: {e:?}");
            }
        }
    }

    /// Makes the event manager watch exactly what the current state needs.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                warn!("virtio-net: cannot unregister queue eventfd: {e:?}");
            }
        }
        self.unregister_tap(ops);
        let Some(a) = self.state.active() else {
            return;
        };
        let mut failure = health::watch_queues(ops, &a.evts, EV_RXQ, &mut self.registered).err();
        if failure.is_none() && !self.tap_failed {
            let want = self.desired_tap_events();
            match ops.add(Events::with_data(&self.tap, EV_TAP, want)) {
                Ok(()) => self.tap_events = Some(want),
                Err(e) => {
                    failure = Some(RingError::Unwatched {
                        what: "the tap".into(),
                        reason: format!("{e:?}"),
                    })
                }
            }
        }
        if let Some(e) = failure {
            self.state.fail("virtio-net", &e);
            self.after_ring_use(true);
            // No longer active: this only takes back what was registered.
            self.sync_registrations(ops);
            return;
        }
        // The driver may have queued frames and buffers before we were watching.
        self.process_tx();
        self.rx_queue_notified();
    }

    fn drain_queue_evt(&self, index: usize) {
        if let Some(evt) = self.registered.get(index) {
            let _ = evt.read();
        }
    }

    /// Offloads the tap may use towards the guest: what the guest said it can receive.
    fn apply_offloads(&mut self) {
        let mut flags = 0;
        if self.has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if self.has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(flags) {
            warn_limited!(self.offload_log, "virtio-net: {e}");
        }
    }
}

/// Why a tx chain was not sent.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    #[error("chain holds {0} bytes, less than the virtio-net header")]
    Short(u64),
    #[error("chain holds {0} bytes, more than the {MAX_FRAME_LEN}-byte maximum")]
    TooLarge(u64),
    #[error(
        "header uses an offload the driver did not negotiate (flags {flags:#x}, gso {gso:#x})"
    )]
    Offload { flags: u8, gso: u8 },
    #[error("tap rejected the frame: {0}")]
    Tap(io::Error),
    #[error("tap took {wrote} of {len} bytes")]
    Partial { wrote: usize, len: usize },
    #[error("tap is full")]
    WouldBlock,
}

/// Gathers one tx chain into `buf` and writes it to the tap; returns the frame length.
fn send_frame<M>(
    tap: &Tap,
    buf: &mut [u8],
    acked: u64,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<usize, TxError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let len = gather_frame(buf, acked, mem, chain)?;
    let frame = &buf[..len];
    loop {
        return match tap.write_frame(frame) {
            Ok(n) if n == len => Ok(len - VNET_HDR_LEN),
            Ok(n) => Err(TxError::Partial { wrote: n, len }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(TxError::WouldBlock),
            Err(e) => Err(TxError::Tap(e)),
        };
    }
}

/// Validates one tx chain and gathers it (virtio-net header included) into `buf`; returns the
/// length of what was gathered.
fn gather_frame<M>(
    buf: &mut [u8],
    acked: u64,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<usize, TxError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let descs = chain::walk(chain, mem, MAX_CHAIN_DESCS)?;
    let mut bufs = GuestBufs::new();
    for d in &descs {
        if d.writable {
            return Err(TxError::Writable);
        }
        bufs.push(d);
    }
    let total = bufs.total();
    if total < VNET_HDR_LEN as u64 {
        return Err(TxError::Short(total));
    }
    let frame = usize::try_from(total)
        .ok()
        .and_then(|n| buf.get_mut(..n))
        .ok_or(TxError::TooLarge(total))?;
    bufs.read_at(mem, 0, frame)?;
    check_tx_header(frame, acked)?;
    Ok(frame.len())
}

/// Entry points for the fuzz targets in `fuzz/` (no stable API): the guest-controlled parts of
/// the tx and rx paths, without the tap.
#[doc(hidden)]
pub mod fuzzing {
    use std::io;

    use virtio_queue::{Queue, QueueT};

    use super::{
        health, run_rx, Active, GuestMemory, IrqTrigger, NetStats, Rx, RXQ, VIRTIO_RING_F_EVENT_IDX,
    };

    /// What [`receive_frames`] did.
    #[derive(Debug)]
    pub struct RxRun {
        /// Only the rx counters are used.
        pub stats: NetStats,
        /// Frames taken from the source (delivered, dropped, runts, or still held).
        pub taken: usize,
        /// The last frame taken still waits for buffers.
        pub pending: bool,
        /// Chains popped and validated but not returned yet.
        pub reserved: usize,
        /// The device stopped reading and waits for an rx notification.
        pub stalled: bool,
        /// Set if the ring broke (the device would need a reset); nothing ran after that.
        pub broken: Option<String>,
    }

    /// Runs the device's rx path on `queue` (the rx queue, as activation hands it over) with
    /// `frames` in place of the tap (each one frame with its 12-byte vnet header, cut to what a
    /// tap read would return), for `wakeups` rx queue notifications: each does exactly what
    /// `rx_queue_notified` does, so a stalled device looks at the ring again.
    pub fn receive_frames(
        mem: &GuestMemory,
        mut queue: Queue,
        acked: u64,
        irq: IrqTrigger,
        frames: &[&[u8]],
        wakeups: usize,
    ) -> RxRun {
        queue.set_event_idx(acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let mut a = Active {
            mem: mem.clone(),
            queues: vec![queue],
            evts: Vec::new(),
            irq,
        };
        let mut rx = Rx::new();
        let mut stats = NetStats::default();
        let mut taken = 0;
        let mut read = |buf: &mut [u8]| {
            let Some(f) = frames.get(taken) else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            taken += 1;
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(n)
        };
        let mut broken = None;
        for _ in 0..wakeups {
            rx.stalled = false;
            let res = health::disable_notification(&mut a.queues[RXQ], &a.mem, RXQ)
                .and_then(|()| run_rx(&mut a, &mut rx, &mut read, false, &mut stats, acked));
            if let Err(e) = res {
                broken = Some(e.to_string());
                break;
            }
        }
        RxRun {
            stats,
            taken,
            pending: rx.pending != 0,
            reserved: rx.reserved.len(),
            stalled: rx.stalled,
            broken,
        }
    }

    /// Validates and gathers one tx chain into `buf` (at least [`super::MAX_FRAME_LEN`] bytes,
    /// like the device's buffer), exactly as `process_tx` does before writing to the tap.
    /// Returns the gathered length, or the rejection as text.
    pub fn gather_tx_frame<M>(
        buf: &mut [u8],
        acked: u64,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<M>,
    ) -> Result<usize, String>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        super::gather_frame(buf, acked, mem, chain).map_err(|e| e.to_string())
    }
}

/// The driver may only ask for offloads it negotiated (the tap validates the rest).
fn check_tx_header(frame: &[u8], acked: u64) -> Result<(), TxError> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let (flags, gso) = (frame[0], frame[1]);
    let bad = || TxError::Offload { flags, gso };
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !has(VIRTIO_NET_F_CSUM) {
        return Err(bad());
    }
    let ok = match gso & !GSO_ECN {
        GSO_NONE => gso & GSO_ECN == 0,
        // ECN-marked TSO needs HOST_ECN, which we do not offer.
        GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4) && gso & GSO_ECN == 0,
        GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6) && gso & GSO_ECN == 0,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

enum Delivery {
    /// The pending frame was delivered or dropped.
    Done,
    /// The guest has to post more buffers first.
    NeedBuffers,
}

/// Sends up to [`TX_BATCH`] frames; `used` tells whether any chain was returned to the driver.
fn drain_tx(
    a: &mut Active,
    tap: &Tap,
    tx: &mut Tx,
    stats: &mut NetStats,
    acked: u64,
    used: &mut bool,
) -> Result<(), RingError> {
    let mut budget = TX_BATCH;
    let mut empty_passes = 0;
    tx.blocked = false;
    loop {
        // No notifications while we drain: frames queued meanwhile are found by the re-check
        // below.
        health::disable_notification(&mut a.queues[TXQ], &a.mem, TXQ)?;
        let pass_start = a.queues[TXQ].next_avail();
        while budget > 0 {
            let Some(chain) = health::pop(&mut a.queues[TXQ], &a.mem, TXQ)? else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            match send_frame(tap, &mut tx.buf, acked, &a.mem, chain) {
                Ok(n) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += n as u64;
                }
                Err(TxError::WouldBlock) => {
                    // Keep the chain for when the tap is writable again; notifications stay
                    // off until then (the tap's writability wakes us).
                    a.queues[TXQ].go_to_previous_position();
                    tx.blocked = true;
                    return Ok(());
                }
                Err(e) => {
                    if matches!(e, TxError::Chain(_) | TxError::Writable | TxError::Short(_)) {
                        stats.tx_malformed += 1;
                    } else {
                        stats.tx_dropped += 1;
                    }
                    warn_limited!(tx.log, "virtio-net: dropping tx frame: {e}");
                }
            }
            health::add_used(&mut a.queues[TXQ], &a.mem, TXQ, head, 0)?;
            *used = true;
        }
        if budget == 0 {
            // Let the other devices run; the self-notification brings us back.
            if let Err(e) = a.evts[TXQ].write(1) {
                warn!("virtio-net: cannot reschedule tx: {e}");
            }
            return Ok(());
        }
        let popped = a.queues[TXQ].next_avail() != pass_start;
        if !health::rearm(&mut a.queues[TXQ], &a.mem, TXQ, popped, &mut empty_passes)? {
            return Ok(());
        }
    }
}

/// One rx wakeup: [`fill_rx`], then at most one interrupt.
fn run_rx(
    a: &mut Active,
    rx: &mut Rx,
    read: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    tap_failed: bool,
    stats: &mut NetStats,
    acked: u64,
) -> Result<(), RingError> {
    let mut used = false;
    let res = fill_rx(a, rx, read, tap_failed, stats, acked, &mut used);
    if used {
        notify(a, RXQ);
    }
    res
}

/// Moves up to [`RX_BATCH`] frames from `read` (the tap: one frame with its vnet header per
/// call, `WouldBlock` when none is queued) into guest buffers; `used` as in [`drain_tx`].
fn fill_rx(
    a: &mut Active,
    rx: &mut Rx,
    read: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    tap_failed: bool,
    stats: &mut NetStats,
    acked: u64,
    used: &mut bool,
) -> Result<(), RingError> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let (mrg, guest_csum) = (has(VIRTIO_NET_F_MRG_RXBUF), has(VIRTIO_NET_F_GUEST_CSUM));
    let mut budget = RX_BATCH;
    // Where the rx ring stood when we last re-enabled notifications (see rx_out_of_buffers).
    let mut rearmed_at = None;
    loop {
        if rx.pending == 0 {
            if budget == 0 || tap_failed {
                return Ok(());
            }
            // Backpressure: only take a frame off the tap when there is a buffer for it.
            if rx.reserved.is_empty() && !reserve_one(rx, a, stats, used)? {
                if rx_out_of_buffers(a, &mut rearmed_at)? {
                    continue;
                }
                rx.stalled = true;
                return Ok(());
            }
            match read(&mut rx.frame) {
                Ok(n) if n < VNET_HDR_LEN + 14 => {
                    budget -= 1;
                    stats.rx_dropped += 1;
                    warn_limited!(rx.log, "virtio-net: runt frame of {n} bytes from the tap");
                    continue;
                }
                Ok(n) => {
                    budget -= 1;
                    rx.pending = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn_limited!(rx.log, "virtio-net: cannot read from the tap: {e}");
                    return Ok(());
                }
            }
        }
        match deliver(rx, a, mrg, guest_csum, stats, used)? {
            Delivery::Done => {}
            Delivery::NeedBuffers => {
                if rx_out_of_buffers(a, &mut rearmed_at)? {
                    continue;
                }
                rx.stalled = true;
                return Ok(());
            }
        }
    }
}

/// Pops rx chains until one is usable and reserves it; malformed ones are returned with used
/// length 0. `false` if the queue is empty.
fn reserve_one(
    rx: &mut Rx,
    a: &mut Active,
    stats: &mut NetStats,
    used: &mut bool,
) -> Result<bool, RingError> {
    while let Some(chain) = health::pop(&mut a.queues[RXQ], &a.mem, RXQ)? {
        let head = chain.head_index();
        let parsed = chain::walk(chain, &a.mem, MAX_CHAIN_DESCS)
            .map_err(|e| e.to_string())
            .and_then(|descs| {
                let mut bufs = GuestBufs::new();
                for d in &descs {
                    if !d.writable {
                        return Err("device-readable descriptor in an rx chain".to_string());
                    }
                    bufs.push(d);
                }
                if bufs.total() < VNET_HDR_LEN as u64 {
                    return Err(format!(
                        "rx buffer of {} bytes cannot hold the virtio-net header",
                        bufs.total()
                    ));
                }
                Ok(bufs)
            });
        match parsed {
            Ok(bufs) => {
                rx.reserved_bytes += bufs.total();
                rx.reserved.push_back(RxChain { head, bufs });
                return Ok(true);
            }
            Err(e) => {
                stats.rx_malformed += 1;
                warn_limited!(rx.log, "virtio-net: dropping malformed rx chain: {e}");
                health::add_used(&mut a.queues[RXQ], &a.mem, RXQ, head, 0)?;
                *used = true;
            }
        }
    }
    Ok(false)
}

/// Places the pending frame into reserved buffers (reserving more as needed).
fn deliver(
    rx: &mut Rx,
    a: &mut Active,
    mrg: bool,
    guest_csum: bool,
    stats: &mut NetStats,
    used: &mut bool,
) -> Result<Delivery, RingError> {
    let need = rx.pending as u64;
    // Gather enough buffers: any number with MRG_RXBUF, exactly one without.
    loop {
        let have = if mrg {
            rx.reserved_bytes
        } else {
            rx.reserved.front().map_or(0, |c| c.bufs.total())
        };
        if have >= need {
            break;
        }
        let hopeless = if mrg {
            rx.reserved.len() >= usize::from(a.queues[RXQ].size())
        } else {
            !rx.reserved.is_empty()
        };
        if hopeless {
            // The buffers stay reserved for the next frame.
            stats.rx_dropped += 1;
            warn_limited!(
                rx.log,
                "virtio-net: dropping a {need}-byte rx frame: it does not fit the guest's buffers"
            );
            rx.pending = 0;
            return Ok(Delivery::Done);
        }
        if !reserve_one(rx, a, stats, used)? {
            return Ok(Delivery::NeedBuffers);
        }
    }
    // How many buffers the frame takes.
    let mut count = 0u16;
    let mut acc = 0u64;
    for c in &rx.reserved {
        count += 1;
        acc += c.bufs.total();
        if acc >= need {
            break;
        }
    }
    let frame = &mut rx.frame[..rx.pending];
    frame[10..12].copy_from_slice(&count.to_le_bytes());
    if !guest_csum {
        // DATA_VALID is only defined for drivers that negotiated GUEST_CSUM.
        frame[0] &= !(VIRTIO_NET_HDR_F_DATA_VALID as u8);
    }
    let mut off = 0usize;
    for _ in 0..count {
        let Some(c) = rx.reserved.pop_front() else {
            break;
        };
        rx.reserved_bytes -= c.bufs.total();
        let n = (c.bufs.total() as usize).min(frame.len() - off);
        let len = match c.bufs.write_at(&a.mem, 0, &frame[off..off + n]) {
            Ok(()) => n as u32,
            Err(e) => {
                warn_limited!(rx.log, "virtio-net: cannot write rx frame: {e}");
                0
            }
        };
        off += n;
        health::add_used(&mut a.queues[RXQ], &a.mem, RXQ, c.head, len)?;
        *used = true;
    }
    stats.rx_frames += 1;
    stats.rx_bytes += (rx.pending - VNET_HDR_LEN) as u64;
    rx.pending = 0;
    Ok(Delivery::Done)
}

/// The rx ring is empty: asks the driver to notify us when it adds buffers, then looks once more
/// (buffers added just before the re-enable would not be notified). `true`: there are buffers
/// now, go on. If the ring still claims buffers although nothing could be popped since the last
/// re-enable, the ring is broken: a real race always lets the next pop succeed.
fn rx_out_of_buffers(a: &mut Active, rearmed_at: &mut Option<u16>) -> Result<bool, RingError> {
    let now = a.queues[RXQ].next_avail();
    match health::enable_notification(&mut a.queues[RXQ], &a.mem, RXQ)? {
        true if *rearmed_at != Some(now) => {
            *rearmed_at = Some(now);
            Ok(true)
        }
        true => Err(RingError::Stuck { queue: RXQ }),
        false => Ok(false),
    }
}

fn notify(a: &mut Active, q: usize) {
    // With EVENT_IDX: only if the driver's `used_event` was crossed; without it, unless the
    // driver suppressed interrupts.
    if a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
        if let Err(e) = a.irq.trigger(VIRTIO_MMIO_INT_VRING) {
            warn!(queue = q, "virtio-net: cannot signal used ring: {e}");
        }
    }
}

fn random_mac() -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut mac))
        .map_err(|source| NetError::Sys {
            what: "random MAC address",
            source,
        })?;
    // Unicast, locally administered.
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.apply_offloads();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only in legacy devices; we are not one.
        debug!(
            offset,
            len = data.len(),
            "virtio-net: ignoring write to read-only config"
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
        let mut queues = queues;
        let event_idx = self.has(VIRTIO_RING_F_EVENT_IDX);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
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
        self.rx.clear();
        self.tx.blocked = false;
        if let Err(e) = self.ctl_evt.write(1) {
            warn!("virtio-net: cannot signal reset to the event loop: {e}");
        }
    }

    fn needs_reset(&self) -> bool {
        self.state.needs_reset()
    }

    fn event_loop_error(&self) -> Option<&str> {
        self.loop_error.as_deref()
    }
}

impl MutEventSubscriber for Net {
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
                self.rx_queue_notified();
            }
            EV_TXQ => {
                self.drain_queue_evt(TXQ);
                self.process_tx();
            }
            EV_TAP => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    warn!(
                        tap = self.tap.name(),
                        "virtio-net: tap reported an error (interface deleted?); no longer polling it"
                    );
                    self.tap_failed = true;
                    self.unregister_tap(ops);
                    return;
                }
                if set.contains(EventSet::OUT) {
                    self.process_tx();
                }
                if set.contains(EventSet::IN) {
                    self.process_rx();
                }
            }
            other => debug!(data = other, "virtio-net: event with unknown tag"),
        }
        self.sync_tap_events(ops);
    }
}
