//! virtio-blk device (ID 2) backed by a raw image file (or a host block device).
//!
//! One request queue. When the guest notifies it, the event loop pops the chains, checks their
//! layout (a malformed chain is returned at once) and hands each request to the disk's I/O
//! threads ([`worker`]), which execute it (IN, OUT, FLUSH, GET_ID) and write its status; the event
//! loop returns completions to the used ring as they arrive and interrupts the guest when it asked
//! for it. A slow host disk therefore never stalls the event loop, and several requests are in
//! flight on the host at once.
//!
//! Threads: the transport calls [`VirtioDevice`] methods from vCPU threads, the event loop calls
//! [`MutEventSubscriber`] methods, both through the same `Mutex<Block>`; activation and reset kick
//! `ctl_evt` and the event loop (un)registers the queue eventfd. The I/O threads never take that
//! mutex. A reset waits, under it, for the requests already running on the host (as QEMU drains
//! a disk on reset): until they finish, the event loop of this VM waits too.

mod request;
#[cfg(test)]
mod tests;
mod worker;

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain;
use super::health::{self, warn_limited, DeviceState, LogLimit, RingError};
use super::{
    check_activation, read_config_bytes, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
use request::{Disk, Kind, Malformed, RequestChain};
pub use request::{ID_LEN, MAX_DATA_LEN, SECTOR_SIZE};
pub use worker::MAX_WORKERS;
use worker::{Completion, IoPool, Job};

/// Virtio device ID of block devices.
pub const BLOCK_DEVICE_ID: u32 = 2;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (`seg_max`): the queue minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest chain we accept: header + `SEG_MAX` data descriptors + status.
const MAX_CHAIN_DESCS: usize = SEG_MAX as usize + 2;
/// Requests taken from the ring per wakeup before the event loop serves the other devices: a guest that keeps
/// the ring full cannot monopolize the loop. The rest is picked up after a self-notification.
const REQUESTS_PER_WAKEUP: usize = QUEUE_SIZE as usize;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes of `struct virtio_blk_config` we expose: capacity, size_max, seg_max, geometry,
/// blk_size.
const CONFIG_LEN: usize = 24;

// Event-manager data tags.
const EV_CTL: u32 = 0;
const EV_QUEUE: u32 = 1;
const EV_DONE: u32 = 2;

/// How long a reset waits for requests already running on the host. The spec wants the device
/// quiet after a reset; a host file that does not answer for this long is reported instead of
/// hanging the vCPU that reset the device (and this VM's event loop, which waits for the device
/// lock). Past it, a late request may still write its data and status byte into guest memory
/// the driver already reuses; its completion is dropped, never returned.
const RESET_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the block device is backed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`; guest writes fail with IOERR.
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (`/sys/block/vdX/serial`), at most 20 bytes.
    pub id: Option<String>,
}

/// Errors creating the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("size of disk image {path} ({size} bytes) is not a multiple of {SECTOR_SIZE} bytes")]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("block device id {id:?} is {len} bytes long; at most {ID_LEN} are allowed")]
    IdTooLong { id: String, len: usize },
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Request and error counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests answered with IOERR (bad layout, out of bounds, read-only, host I/O errors).
    pub failed: u64,
    /// Requests answered with UNSUPP.
    pub unsupported: u64,
    /// Chains without a usable status byte, returned with used length 0.
    pub malformed: u64,
}

/// State that exists only between activation and reset.
struct Active {
    /// Shared with the I/O threads.
    mem: Arc<GuestMemory>,
    queue: Queue,
    evt: EventFd,
    irq: IrqTrigger,
    /// Tags this driver instance's requests (see [`Completion::epoch`]).
    epoch: u64,
    /// Requests handed to the I/O threads and not yet returned.
    in_flight: usize,
    /// Popping stopped at [`Active::max_in_flight`]; completions resume it.
    throttled: bool,
}

impl Active {
    /// Requests in flight on the I/O threads, at most: the negotiated queue size. A driver
    /// cannot have more chains outstanding than its queue has entries; a hostile one that
    /// republishes heads still in flight is held here instead of growing the job queue.
    fn max_in_flight(&self) -> usize {
        usize::from(self.queue.size())
    }
}

impl AsRef<IrqTrigger> for Active {
    fn as_ref(&self) -> &IrqTrigger {
        &self.irq
    }
}

/// Index of the request queue.
const REQUEST_QUEUE: usize = 0;

/// Rate limits for what a guest can make us log per request.
#[derive(Default)]
struct Logs {
    malformed: LogLimit,
    failed: LogLimit,
}

pub struct Block {
    path: PathBuf,
    io: IoPool,
    /// Bumped on every activation.
    epoch: u64,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    ctl_evt: EventFd,
    /// What `init` could not register with the event loop (the VM then does not start).
    loop_error: Option<String>,
    state: DeviceState<Active>,
    /// Queue eventfd clone currently registered with the event manager.
    registered: Option<EventFd>,
    stats: BlockStats,
    logs: Logs,
}

impl Block {
    /// Opens the backing file and builds the device.
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_LEN];
        if let Some(s) = &cfg.id {
            if s.len() > ID_LEN {
                return Err(BlockError::IdTooLong {
                    id: s.clone(),
                    len: s.len(),
                });
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|source| BlockError::Open {
                path: cfg.path.clone(),
                source,
            })?;
        // Seeking to the end also works for block devices, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: cfg.path.clone(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: cfg.path,
                size,
            });
        }
        let capacity = size / SECTOR_SIZE;
        let ctl_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BlockError::Sys {
            what: "block control eventfd",
            source,
        })?;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12) and geometry (16..20) are not offered and stay 0.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let io = IoPool::new(Disk {
            file,
            capacity,
            read_only: cfg.read_only,
            id,
        })
        .map_err(|source| BlockError::Sys {
            what: "block I/O completion eventfd",
            source,
        })?;
        Ok(Self {
            path: cfg.path,
            io,
            epoch: 0,
            avail_features,
            acked_features: 0,
            config,
            ctl_evt,
            loop_error: None,
            state: DeviceState::default(),
            registered: None,
            stats: BlockStats::default(),
            logs: Logs::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.io.disk().capacity
    }

    pub fn is_read_only(&self) -> bool {
        self.io.disk().read_only
    }

    /// I/O threads started so far (at most [`MAX_WORKERS`]).
    pub fn io_threads(&self) -> usize {
        self.io.workers()
    }

    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Takes the available requests (at most [`REQUESTS_PER_WAKEUP`]) and hands them to the I/O
    /// threads; malformed chains are returned at once, with an interrupt if the guest asked for
    /// one. A broken ring puts the device into `NEEDS_RESET`.
    pub fn process_queue(&mut self) {
        let (io, stats, logs) = (&mut self.io, &mut self.stats, &mut self.logs);
        self.state.run("virtio-blk", |a| {
            let mut used = false;
            let res = drain_queue(a, io, stats, logs, &mut used);
            // Returned chains are the driver's even if the ring broke afterwards.
            if used {
                notify_used(a);
            }
            res
        });
    }

    /// Returns the requests the I/O threads completed to the used ring, then interrupts the
    /// guest once (if it asked for it).
    pub fn complete_io(&mut self) {
        let done = self.io.take_done();
        if done.is_empty() {
            return;
        }
        let (stats, logs) = (&mut self.stats, &mut self.logs);
        self.state.run("virtio-blk", |a| {
            let mut used = false;
            let mut res = Ok(());
            for c in done {
                if c.epoch != a.epoch {
                    // Completed after the reset that ended its driver instance.
                    continue;
                }
                a.in_flight = a.in_flight.saturating_sub(1);
                record(stats, logs, &c);
                if let Err(e) =
                    health::add_used(&mut a.queue, &a.mem, REQUEST_QUEUE, c.head, c.used_len)
                {
                    res = Err(e);
                    break;
                }
                used = true;
            }
            if used {
                notify_used(a);
            }
            res
        });
        if self
            .state
            .active()
            .is_some_and(|a| a.throttled && a.in_flight < a.max_in_flight())
        {
            self.process_queue();
        }
    }

    /// Waits (up to 10 s) until the I/O threads finished everything handed to them, then
    /// completes it: what the event loop does when their completion event fires. For tests and
    /// fuzzing, which play the event loop themselves.
    #[doc(hidden)]
    pub fn settle(&mut self) {
        if !self.io.wait_idle(Duration::from_secs(10)) {
            warn!("virtio-blk: I/O threads still busy after 10 s");
        }
        self.complete_io();
    }

    /// Makes the event manager watch exactly what the current state needs.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.registered.take() {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                warn!("virtio-blk: cannot unregister queue eventfd: {e:?}");
            }
        }
        let Some(a) = self.state.active() else {
            return;
        };
        match health::watch_queue(ops, &a.evt, REQUEST_QUEUE, EV_QUEUE) {
            Ok(clone) => self.registered = Some(clone),
            Err(e) => {
                self.state.fail("virtio-blk", &e);
                return;
            }
        }
        // The driver may have queued requests before we were watching.
        self.process_queue();
    }
}

/// Interrupts the guest for new used entries, if it asked for it: with EVENT_IDX when its
/// `used_event` was crossed; without, always (virtio-queue does not read
/// `VRING_AVAIL_F_NO_INTERRUPT`).
fn notify_used(a: &mut Active) {
    if a.queue.needs_notification(&*a.mem).unwrap_or(true) {
        if let Err(e) = a.irq.trigger(VIRTIO_MMIO_INT_VRING) {
            warn!("virtio-blk: cannot signal used ring: {e}");
        }
    }
}

/// Drains the request queue within the per-wakeup budget; `used` tells whether any chain was
/// returned to the driver here (malformed ones; the others complete through the I/O threads).
///
/// While the ring is drained, driver notifications are suppressed (with EVENT_IDX the
/// `avail_event` stays behind, otherwise `VRING_USED_F_NO_NOTIFY` is set): requests the guest
/// queues meanwhile are picked up by the re-check below instead of each costing a VM exit.
fn drain_queue(
    a: &mut Active,
    io: &mut IoPool,
    stats: &mut BlockStats,
    logs: &mut Logs,
    used: &mut bool,
) -> Result<(), RingError> {
    let q = REQUEST_QUEUE;
    let mut budget = REQUESTS_PER_WAKEUP;
    let mut empty_passes = 0;
    a.throttled = false;
    loop {
        health::disable_notification(&mut a.queue, &a.mem, q)?;
        let pass_start = a.queue.next_avail();
        while budget > 0 {
            if a.in_flight >= a.max_in_flight() {
                // Notifications stay off; the next completion calls us again.
                a.throttled = true;
                return Ok(());
            }
            let Some(chain) = health::pop(&mut a.queue, &a.mem, q)? else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            match validate_chain(&a.mem, chain) {
                Ok((chain, status)) => {
                    a.in_flight += 1;
                    io.submit(Job {
                        epoch: a.epoch,
                        head,
                        chain,
                        status,
                        mem: a.mem.clone(),
                    });
                }
                Err(e) => {
                    record_malformed(stats, logs, &e);
                    health::add_used(&mut a.queue, &a.mem, q, head, 0)?;
                    *used = true;
                }
            }
        }
        if budget == 0 {
            // Come back after the other devices had their turn; notifications stay off until
            // then, so the self-notification is what wakes us.
            if let Err(e) = a.evt.write(1) {
                warn!("virtio-blk: cannot reschedule the queue: {e}");
            }
            return Ok(());
        }
        let popped = a.queue.next_avail() != pass_start;
        if !health::rearm(&mut a.queue, &a.mem, q, popped, &mut empty_passes)? {
            return Ok(());
        }
    }
}

/// Checks a chain's layout: descriptors within memory and bounds, readable before writable, a
/// status byte at the end. Returns the request and the address of its status byte.
fn validate_chain<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<(RequestChain, vm_memory::GuestAddress), Malformed>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let rc = chain::walk(chain, mem, MAX_CHAIN_DESCS)
        .map_err(Malformed::from)
        .and_then(|descs| RequestChain::new(&descs))?;
    let status = rc.status_addr().ok_or(Malformed::NoStatus)?;
    Ok((rc, status))
}

/// Counts a completed request and reports a failed one.
fn record(stats: &mut BlockStats, logs: &mut Logs, c: &Completion) {
    match &c.result {
        Ok(done) => match done.kind {
            Kind::Read => {
                stats.reads += 1;
                stats.read_bytes += done.bytes;
            }
            Kind::Write => {
                stats.writes += 1;
                stats.write_bytes += done.bytes;
            }
            Kind::Flush => stats.flushes += 1,
            Kind::GetId => stats.get_ids += 1,
        },
        Err(e) => {
            match e {
                request::RequestError::Unsupported(_) => stats.unsupported += 1,
                _ => stats.failed += 1,
            }
            warn_limited!(logs.failed, "virtio-blk: request failed: {e}");
        }
    }
    if c.used_len == 0 {
        record_malformed(stats, logs, &Malformed::NoStatus);
    }
}

fn record_malformed(stats: &mut BlockStats, logs: &mut Logs, e: &Malformed) {
    stats.malformed += 1;
    warn_limited!(
        logs.malformed,
        "virtio-blk: dropping malformed descriptor chain: {e}"
    );
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_ID
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` (with VIRTIO_BLK_F_CONFIG_WCE) is writable, and we do not offer it.
        debug!(
            offset,
            len = data.len(),
            "virtio-blk: ignoring write to read-only config"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        mut queue_evts: Vec<EventFd>,
        interrupt: IrqTrigger,
    ) -> Result<(), ActivateError> {
        check_activation(!self.state.is_inactive(), 1, &queues, &queue_evts)?;
        let (Some(mut queue), Some(evt)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.ctl_evt.write(1).map_err(ActivateError::EventFd)?;
        self.epoch += 1;
        self.state.activate(Active {
            mem: Arc::new(mem),
            queue,
            evt,
            irq: interrupt,
            epoch: self.epoch,
            in_flight: 0,
            throttled: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        // Requests not started are dropped; running ones finish (within RESET_IO_TIMEOUT) before
        // the driver may reuse their buffers. Their completions are never returned.
        if !self.io.cancel(RESET_IO_TIMEOUT) {
            warn!(
                path = %self.path.display(),
                "virtio-blk: host I/O still running {RESET_IO_TIMEOUT:?} after a reset"
            );
        }
        drop(self.io.take_done());
        self.acked_features = 0;
        if let Err(e) = self.ctl_evt.write(1) {
            warn!("virtio-blk: cannot signal reset to the event loop: {e}");
        }
    }

    fn needs_reset(&self) -> bool {
        self.state.needs_reset()
    }

    fn event_loop_error(&self) -> Option<&str> {
        self.loop_error.as_deref()
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ctl_evt, EV_CTL, EventSet::IN)) {
            self.loop_error = Some(format!("cannot register the control eventfd: {e:?}"));
        }
        let done = self.io.done_event();
        if let Err(e) = ops.add(Events::with_data(done, EV_DONE, EventSet::IN)) {
            // Requests would never complete: the device would stop at the in-flight cap.
            let path = self.path.display();
            self.loop_error.get_or_insert_with(|| {
                format!("cannot register the I/O completion eventfd of {path}: {e:?}")
            });
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_CTL => {
                let _ = self.ctl_evt.read();
                self.sync_registrations(ops);
            }
            EV_QUEUE => {
                if let Some(evt) = &self.registered {
                    let _ = evt.read();
                }
                self.process_queue();
            }
            EV_DONE => self.complete_io(),
            other => debug!(data = other, "virtio-blk: event with unknown tag"),
        }
    }
}
