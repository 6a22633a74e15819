//! virtio-fs device (ID 26) as a vhost-user frontend: the FUSE server is a separate daemon
//! (`virtiofsd`), reached over a Unix socket.
//!
//! The VMM owns the virtio-mmio transport and the device config space (tag + number of request
//! queues) but never looks at the queues: when the driver sets `DRIVER_OK` it hands the daemon
//! the guest memory table (the memfd behind guest RAM, see [`crate::memory`]), each vring's size,
//! addresses and base, the transport's queue eventfds as *kick* fds (KVM signals them on
//! `QueueNotify` through ioeventfds; the event loop never reads them for this device), and one
//! *call* eventfd per queue. The event loop watches the call eventfds and turns each signal into
//! `IrqTrigger::trigger(VRING)` so the MMIO `InterruptStatus` bit is set before the irqfd fires.
//!
//! The daemon is another process and is treated as untrusted-ish: every request has a reply
//! timeout (a hung daemon cannot wedge a vCPU forever), replies are bounded and validated by the
//! `vhost` crate, the feature bits it offers are masked to the few we pass to the guest, and its
//! queue count is checked. If its socket hangs up, the device logs it once, reports
//! `DEVICE_NEEDS_RESET` through the transport and raises a config interrupt; the VMM goes on.

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::health;
use super::{
    check_activation, read_config_bytes, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};

/// Virtio device ID of file system devices.
pub const FS_DEVICE_ID: u32 = 26;
/// Bytes of the tag in the config space (virtio 1.2, 5.11.4); shorter tags are NUL padded.
pub const TAG_LEN: usize = 36;
/// Queue size offered to the driver (virtiofsd accepts up to 32768).
pub const QUEUE_SIZE: u16 = 1024;
/// Request queues (besides the high-priority queue). virtiofsd serves exactly one.
pub const NUM_REQUEST_QUEUES: u32 = 1;
const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// `struct virtio_fs_config`: tag[36], num_request_queues (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;
/// How long one request to the daemon may take before the device gives up on it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport feature bits we let through from the daemon to the guest.
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// vhost-user: the backend speaks the protocol-feature extension (never offered to the guest).
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
const GUEST_FEATURE_MASK: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

// Event-manager data tags; call eventfd `i` uses `EV_CALL + i`.
const EV_CTL: u32 = 0;
const EV_SOCKET: u32 = 1;
const EV_CALL: u32 = 16;

/// A shared directory served by a vhost-user-fs daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The daemon's vhost-user socket (e.g. `virtiofsd --socket-path`).
    pub socket: PathBuf,
    /// The name the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
}

/// Errors creating the device (connecting to and negotiating with the daemon).
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?} is {len} bytes; it must be 1 to {TAG_LEN} bytes")]
    TagLength { tag: String, len: usize },
    #[error("virtio-fs tag {0:?} contains a NUL byte")]
    TagNul(String),
    #[error("cannot connect to the vhost-user-fs daemon at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user-fs daemon at {path}: {what}: {source}")]
    Backend {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user-fs daemon at {path} does not offer {what}")]
    MissingFeature { path: PathBuf, what: &'static str },
    #[error("vhost-user-fs daemon at {path} serves {got} queues; {NUM_QUEUES} are needed")]
    TooFewQueues { path: PathBuf, got: u64 },
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks a tag for the config space: 1 to 36 bytes, no NUL.
pub fn validate_tag(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(FsError::TagLength {
            tag: tag.to_string(),
            len: tag.len(),
        });
    }
    if tag.as_bytes().contains(&0) {
        return Err(FsError::TagNul(tag.to_string()));
    }
    let mut out = [0u8; TAG_LEN];
    out[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(out)
}

/// State that exists only between activation and reset.
struct Active {
    irq: IrqTrigger,
    /// The daemon signals these when it used buffers; index = queue.
    calls: Vec<EventFd>,
    /// Held so the kick fds outlive the daemon's use of them (the transport owns the originals).
    _kicks: Vec<EventFd>,
}

pub struct Fs {
    socket: PathBuf,
    tag: String,
    frontend: Frontend,
    /// Raw fd of the daemon socket (owned by `frontend`), watched for hang-up.
    socket_fd: RawFd,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    ctl_evt: EventFd,
    /// What `init` could not register with the event loop (the VM then does not start).
    loop_error: Option<String>,
    active: Option<Active>,
    /// Call eventfd clones currently registered with the event manager.
    registered: Vec<EventFd>,
    socket_registered: bool,
    /// The daemon hung up or failed: the device stays broken until the VM is rebuilt.
    dead: bool,
    interrupts: u64,
}

impl Fs {
    /// Connects to the daemon and negotiates what can be negotiated before the guest driver
    /// shows up (owner, features, protocol features, queue count).
    pub fn new(cfg: FsConfig) -> Result<Self, FsError> {
        let tag = validate_tag(&cfg.tag)?;
        let stream = UnixStream::connect(&cfg.socket).map_err(|source| FsError::Connect {
            path: cfg.socket.clone(),
            source,
        })?;
        Self::from_stream(cfg, tag, stream)
    }

    fn from_stream(cfg: FsConfig, tag: [u8; TAG_LEN], stream: UnixStream) -> Result<Self, FsError> {
        let path = cfg.socket.clone();
        let sys = |what| move |source| FsError::Sys { what, source };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(sys("set socket read timeout"))?;
        stream
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .map_err(sys("set socket write timeout"))?;
        let socket_fd = stream.as_raw_fd();
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        let be = |what: &'static str| {
            let path = path.clone();
            move |source| FsError::Backend { path, what, source }
        };

        frontend.set_owner().map_err(be("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(be("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::MissingFeature {
                path,
                what: "VIRTIO_F_VERSION_1",
            });
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            // SET_FEATURES must announce PROTOCOL_FEATURES before the extension may be used.
            frontend
                .set_features(1 << VHOST_USER_F_PROTOCOL_FEATURES)
                .map_err(be("SET_FEATURES"))?;
            let offered = frontend
                .get_protocol_features()
                .map_err(be("GET_PROTOCOL_FEATURES"))?;
            protocol_features =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(be("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request is acknowledged: failures surface at activation time.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let got = frontend.get_queue_num().map_err(be("GET_QUEUE_NUM"))?;
                if got < NUM_QUEUES as u64 {
                    return Err(FsError::TooFewQueues { path, got });
                }
            }
        }

        let ctl_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| FsError::Sys {
            what: "virtio-fs control eventfd",
            source,
        })?;
        let mut config = [0u8; CONFIG_LEN];
        config[..TAG_LEN].copy_from_slice(&tag);
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        info!(socket = %cfg.socket.display(), tag = cfg.tag, backend_features, "virtio-fs: connected to the daemon");
        Ok(Self {
            socket: cfg.socket,
            tag: cfg.tag,
            frontend,
            socket_fd,
            backend_features,
            protocol_features,
            avail_features: backend_features & GUEST_FEATURE_MASK,
            acked_features: 0,
            config,
            ctl_evt,
            loop_error: None,
            active: None,
            registered: Vec::new(),
            socket_registered: false,
            dead: false,
            interrupts: 0,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Whether the daemon went away (or failed) and the device needs a reset.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// The vhost-user protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Used-buffer interrupts forwarded from the daemon to the guest.
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    fn has_protocol_features(&self) -> bool {
        self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0
    }

    /// Sends the daemon everything it needs to serve the queues.
    fn start_backend(
        &mut self,
        mem: &GuestMemory,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        // Guest RAM must be fd-backed (a memfd) for the daemon to map it.
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        let mut features = self.acked_features;
        if self.has_protocol_features() {
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(features)?;
        self.frontend.set_mem_table(&regions)?;

        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let hva = |gpa: u64| -> Result<u64, vhost::Error> {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| vhost::Error::InvalidGuestMemory)
            };
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: hva(q.desc_table())?,
                used_ring_addr: hva(q.used_ring())?,
                avail_ring_addr: hva(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_num(i, q.size())?;
            self.frontend.set_vring_addr(i, &ring)?;
            self.frontend.set_vring_base(i, q.next_avail())?;
            self.frontend.set_vring_call(i, &calls[i])?;
            self.frontend.set_vring_kick(i, &kicks[i])?;
            if self.has_protocol_features() {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }

    /// The daemon is gone or misbehaved: stop forwarding, tell the driver, keep the VMM running.
    fn mark_dead(&mut self, why: &str) {
        self.fail(&format!("daemon failed ({why})"));
    }

    /// The device cannot go on (its daemon, or the VMM's side of the forwarding): stop
    /// forwarding and report `DEVICE_NEEDS_RESET` until the driver resets it.
    fn fail(&mut self, what: &str) {
        if self.dead {
            return;
        }
        self.dead = true;
        error!(socket = %self.socket.display(), tag = self.tag, "virtio-fs: {what}; the device needs a reset");
        if let Some(a) = &self.active {
            if let Err(e) = a.irq.trigger(VIRTIO_MMIO_INT_CONFIG) {
                warn!("virtio-fs: cannot raise config interrupt: {e}");
            }
        }
    }

    /// Drains call eventfd `i` and interrupts the guest.
    fn forward_call(&mut self, i: usize) {
        if let Some(evt) = self.registered.get(i) {
            let _ = evt.read();
        }
        if let Some(a) = &self.active {
            self.interrupts += 1;
            if let Err(e) = a.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!("virtio-fs: cannot signal used ring: {e}");
            }
        }
    }

    /// Makes the event manager watch exactly what the current state needs.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                warn!("virtio-fs: cannot unregister call eventfd: {e:?}");
            }
        }
        if self.dead && self.socket_registered {
            if let Err(e) = ops.remove(Events::empty_raw(self.socket_fd)) {
                debug!("virtio-fs: cannot unregister the daemon socket: {e:?}");
            }
            self.socket_registered = false;
        }
        // A failed device forwards nothing more (and this cannot recurse again below).
        let Some(a) = self.active.as_ref().filter(|_| !self.dead) else {
            return;
        };
        if let Err(e) = health::watch_queues(ops, &a.calls, EV_CALL, &mut self.registered) {
            // The daemon's completions for that queue would never reach the guest.
            self.fail(&e.to_string());
            self.sync_registrations(ops);
            return;
        }
        // The daemon may have used buffers before we were watching.
        for i in 0..self.registered.len() {
            if self.registered[i].read().is_ok() {
                self.forward_call(i);
            }
        }
    }
}

/// Entry point for the fuzz target in `fuzz/` (no stable API): one whole session of the frontend
/// against whatever the peer of `stream` answers, as a hostile or broken daemon would.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Negotiates (as [`Fs::new`] after connecting), then, if that worked, acks
    /// `guest_features`, activates with `queues` (as on `DRIVER_OK`) and resets (as on the
    /// driver's reset or VM teardown). `mem` must be fd-backed like guest RAM with a share.
    /// Returns the first error as text; must never panic whatever the peer sends.
    pub fn session(
        stream: UnixStream,
        mem: &GuestMemory,
        queues: Vec<Queue>,
        guest_features: u64,
    ) -> Result<(), String> {
        let cfg = FsConfig {
            socket: PathBuf::from("fuzz.sock"),
            tag: "fuzz".into(),
        };
        let tag = validate_tag(&cfg.tag).map_err(|e| e.to_string())?;
        let mut fs = Fs::from_stream(cfg, tag, stream).map_err(|e| e.to_string())?;
        fs.ack_features(guest_features);
        let evts = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let irq = IrqTrigger::new().map_err(|e| e.to_string())?;
        let activated = fs.activate(mem.clone(), queues, evts, irq);
        fs.reset();
        activated.map_err(|e| e.to_string())?;
        if fs.needs_reset() {
            return Err("daemon marked dead".into());
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_ID
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
        debug!(
            offset,
            len = data.len(),
            "virtio-fs: ignoring write to read-only config"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: IrqTrigger,
    ) -> Result<(), ActivateError> {
        check_activation(self.active.is_some(), NUM_QUEUES, &queues, &queue_evts)?;
        if self.dead {
            return Err(ActivateError::Backend(
                "the vhost-user-fs daemon is gone".into(),
            ));
        }
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(ActivateError::EventFd)?;
        if let Err(e) = self.start_backend(&mem, &queues, &queue_evts, &calls) {
            let msg = format!("vhost-user-fs daemon at {}: {e}", self.socket.display());
            self.mark_dead(&msg);
            let _ = self.ctl_evt.write(1);
            return Err(ActivateError::Backend(msg));
        }
        self.ctl_evt.write(1).map_err(ActivateError::EventFd)?;
        self.active = Some(Active {
            irq: interrupt,
            calls,
            _kicks: queue_evts,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if self.active.take().is_some() && !self.dead {
            // GET_VRING_BASE stops a ring in the daemon; it must not touch guest memory after.
            for i in 0..NUM_QUEUES {
                if let Err(e) = self.frontend.get_vring_base(i) {
                    self.mark_dead(&format!("stopping queue {i}: {e}"));
                    break;
                }
            }
        }
        self.acked_features = 0;
        if let Err(e) = self.ctl_evt.write(1) {
            warn!("virtio-fs: cannot signal reset to the event loop: {e}");
        }
    }

    fn needs_reset(&self) -> bool {
        self.dead
    }

    fn event_loop_error(&self) -> Option<&str> {
        self.loop_error.as_deref()
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ctl_evt, EV_CTL, EventSet::IN)) {
            self.loop_error = Some(format!("cannot register the control eventfd: {e:?}"));
        }
        // Only hang-up matters: replies are read synchronously by whoever sent the request.
        match ops.add(Events::with_data_raw(
            self.socket_fd,
            EV_SOCKET,
            EventSet::READ_HANG_UP | EventSet::HANG_UP,
        )) {
            Ok(()) => self.socket_registered = true,
            Err(e) => {
                self.loop_error
                    .get_or_insert_with(|| format!("cannot watch the daemon socket: {e:?}"));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_CTL => {
                let _ = self.ctl_evt.read();
                self.sync_registrations(ops);
            }
            EV_SOCKET => {
                self.mark_dead("its socket hung up");
                self.sync_registrations(ops);
            }
            d if d >= EV_CALL && ((d - EV_CALL) as usize) < NUM_QUEUES => {
                self.forward_call((d - EV_CALL) as usize);
            }
            other => debug!(data = other, "virtio-fs: event with unknown tag"),
        }
    }
}
