//! virtio-mmio transport, version 2 ("modern", virtio 1.x only).
//!
//! The guest driver programs the device through 32-bit registers in a 4 KiB window; the device
//! config space starts at 0x100. Status changes go through an explicit state machine so that a
//! driver cannot, for example, change features after `FEATURES_OK` or start a device whose queues
//! point outside guest memory.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::health::{warn_limited, LogLimit};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};
use crate::devices::bus::BusDevice;

/// Size of the MMIO window of one device.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "HUSK" in little endian; drivers do not interpret the vendor ID.
const VENDOR_ID: u32 = 0x4b53_5548;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error(
        "device queue {index} has invalid max size {max_size} (must be a power of two <= 32768)"
    )]
    InvalidQueueSize { index: usize, max_size: u16 },
    #[error("device has no queues")]
    NoQueues,
    #[error("cannot create eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    avail_features: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: IrqTrigger,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Driver protocol violations: the guest can repeat them as fast as it can write a register.
    /// Survives resets.
    violations: LogLimit,
}

impl MmioTransport {
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features() | (1 << VIRTIO_F_VERSION_1),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues);
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size).map_err(|_| MmioError::InvalidQueueSize { index, max_size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| MmioError::EventFd {
                    what: "queue notification",
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt = IrqTrigger::new().map_err(|source| MmioError::EventFd {
            what: "interrupt",
            source,
        })?;
        Ok(Self {
            mem,
            device,
            device_type,
            avail_features,
            queues,
            queue_evts,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            violations: LogLimit::default(),
        })
    }

    /// One eventfd per queue; register each as a KVM ioeventfd at `base + 0x50` with the queue
    /// index as 32-bit datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd to register as the KVM irqfd of the device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                if self.status & DRIVER_OK != 0 && lock(&self.device).needs_reset() {
                    self.status |= DEVICE_NEEDS_RESET;
                }
                self.status
            }
            // No shared memory regions: a length of all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, val: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = val,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = val,
            reg::DRIVER_FEATURES => self.write_driver_features(val),
            reg::QUEUE_SEL => self.queue_sel = val,
            reg::QUEUE_NOTIFY => self.notify(val),
            reg::INTERRUPT_ACK => self.interrupt.ack(val),
            reg::STATUS => self.write_status(val),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, val),
            _ => debug!(
                offset,
                val, "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn write_driver_features(&mut self, val: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            warn_limited!(
                self.violations,
                status = self.status,
                "virtio-mmio: driver features written outside negotiation"
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                debug!(sel, "virtio-mmio: driver features select out of range");
                return;
            }
        };
        let offered = (self.avail_features >> shift) as u32;
        if val & !offered != 0 {
            warn_limited!(
                self.violations,
                val,
                offered,
                "virtio-mmio: driver acked features that were not offered"
            );
        }
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | (u64::from(val & offered) << shift);
    }

    fn write_queue_reg(&mut self, offset: u64, val: u32) {
        if !self.queue_config_allowed() {
            debug!(
                offset,
                status = self.status,
                "virtio-mmio: queue register written in wrong state"
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            debug!(
                sel,
                "virtio-mmio: queue register written for a nonexistent queue"
            );
            return;
        };
        // The `set_*` helpers of virtio-queue log an error for every bad value; a guest could
        // repeat those at will, so use the fallible versions and log rate-limited.
        let res = match offset {
            reg::QUEUE_NUM => u16::try_from(val)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            reg::QUEUE_READY => {
                q.set_ready(val == 1);
                Ok(())
            }
            reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(half(q.desc_table(), val, false)),
            reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(half(q.desc_table(), val, true)),
            reg::QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(half(q.avail_ring(), val, false)),
            reg::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(half(q.avail_ring(), val, true)),
            reg::QUEUE_DEVICE_LOW => q.try_set_used_ring_address(half(q.used_ring(), val, false)),
            reg::QUEUE_DEVICE_HIGH => q.try_set_used_ring_address(half(q.used_ring(), val, true)),
            _ => Ok(()),
        };
        if let Err(e) = res {
            warn_limited!(
                self.violations,
                sel,
                offset,
                val,
                "virtio-mmio: invalid queue register value: {e}"
            );
        }
    }

    /// QueueNotify without an ioeventfd (or before one is registered): signal the same eventfd.
    fn notify(&mut self, val: u32) {
        if self.status & DRIVER_OK == 0 {
            debug!(val, "virtio-mmio: queue notify before DRIVER_OK");
            return;
        }
        match self.queue_evts.get(val as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!(queue = val, "virtio-mmio: cannot signal queue eventfd: {e}");
                }
            }
            None => debug!(queue = val, "virtio-mmio: notify for nonexistent queue"),
        }
    }

    /// The status state machine. Besides reset (0) and setting FAILED, each write may add exactly
    /// the next bit of ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK.
    fn write_status(&mut self, val: u32) {
        if val == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if val & !old == FAILED && val & old == old {
            debug!("virtio-mmio: driver set FAILED");
            self.status = val;
            return;
        }
        if old & (FAILED | DEVICE_NEEDS_RESET) != 0 {
            warn_limited!(
                self.violations,
                old,
                val,
                "virtio-mmio: status write on a failed device needs a reset first"
            );
            return;
        }
        match (old, val) {
            (0, ACKNOWLEDGE) => self.status = val,
            (ACKNOWLEDGE, v) if v == ACKNOWLEDGE | DRIVER => self.status = val,
            (o, v) if o == ACKNOWLEDGE | DRIVER && v == o | FEATURES_OK => {
                if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                    // Leave FEATURES_OK clear: the driver reads it back and gives up.
                    warn_limited!(
                        self.violations,
                        "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1"
                    );
                    return;
                }
                lock(&self.device).ack_features(self.acked_features);
                self.status = val;
            }
            (o, v) if o == ACKNOWLEDGE | DRIVER | FEATURES_OK && v == o | DRIVER_OK => {
                self.status = val;
                self.activate();
            }
            _ => warn_limited!(
                self.violations,
                old,
                val,
                "virtio-mmio: invalid device status transition"
            ),
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            // Our own check first: `is_valid` logs an error each time it fails.
            if q.ready() && !(queue_in_memory(q, &self.mem) && q.is_valid(&self.mem)) {
                warn_limited!(
                    self.violations,
                    queue = i,
                    "virtio-mmio: queue is not valid, device needs reset"
                );
                self.needs_reset();
                return;
            }
        }
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                warn!("virtio-mmio: cannot copy queue state: {e}");
                self.needs_reset();
                return;
            }
        };
        let evts = match self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(e) => e,
            Err(e) => {
                warn!("virtio-mmio: cannot clone queue eventfds: {e}");
                self.needs_reset();
                return;
            }
        };
        let res =
            lock(&self.device).activate(self.mem.clone(), queues, evts, self.interrupt.clone());
        if let Err(e) = res {
            warn_limited!(
                self.violations,
                device = self.device_type,
                "virtio-mmio: device activation failed: {e}"
            );
            self.needs_reset();
        }
    }

    fn needs_reset(&mut self) {
        self.status |= DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
            warn!("virtio-mmio: cannot raise config interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if self.status & DRIVER_OK != 0 {
            lock(&self.device).reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        // Drop notifications that raced with the reset so the next activation starts clean.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such (virtio 1.2, 4.2.2.2).
        if data.len() != 4 || offset & 3 != 0 {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read size"
            );
            data.fill(0);
            return;
        }
        let val = self.read_reg(offset);
        data.copy_from_slice(&val.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write size"
            );
            return;
        };
        if offset & 3 != 0 {
            debug!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// `addr` with its low or high 32 bits replaced by `val`.
fn half(addr: u64, val: u32, high: bool) -> GuestAddress {
    GuestAddress(if high {
        (addr & 0xffff_ffff) | (u64::from(val) << 32)
    } else {
        (addr & !0xffff_ffff) | u64::from(val)
    })
}

/// Whether the descriptor table and both rings of `q` lie in guest memory (virtio 1.2, 2.7).
fn queue_in_memory(q: &Queue, mem: &GuestMemory) -> bool {
    let n = q.size() as usize;
    [
        (q.desc_table(), 16 * n, Permissions::Read),
        (q.avail_ring(), 6 + 2 * n, Permissions::Read),
        (q.used_ring(), 6 + 8 * n, Permissions::Write),
    ]
    .into_iter()
    .all(|(addr, len, perm)| mem.check_range(GuestAddress(addr), len, perm))
}

/// A poisoned device lock means a handler panicked; its state is still the best we have.
fn lock(dev: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use crate::devices::virtio::{read_config_bytes, ActivateError};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: Option<usize>,
        resets: usize,
        config: [u8; 8],
        fail_activate: bool,
        /// A ring broke at run time (what block, net and vsock report).
        broken: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0x5
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get_mut(o..o.checked_add(data.len())?))
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<Queue>,
            _evts: Vec<EventFd>,
            _irq: IrqTrigger,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::QueueNotReady(0));
            }
            self.activated = Some(queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
            self.broken = false;
        }
        fn needs_reset(&self) -> bool {
            self.broken
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let t = MmioTransport::new(test_memory(), dev.clone()).unwrap();
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        w(t, reg::STATUS, ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0xffff_ffff);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, q: &GuestQueue) {
        w(t, reg::QUEUE_SEL, sel);
        w(t, reg::QUEUE_NUM, u32::from(q.size()));
        let (d, a, u) = q.addrs();
        w(t, reg::QUEUE_DESC_LOW, d as u32);
        w(t, reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, a as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, u as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn transport_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<MmioTransport>();
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0x5);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
        assert_eq!(r(&mut t, 0x0f0), 0);
        assert_eq!(t.queue_evts().len(), 2);
    }

    #[test]
    fn odd_sized_and_unaligned_accesses_do_not_panic() {
        let (mut t, _) = setup();
        for len in [0usize, 1, 2, 3, 5, 8, 16] {
            for off in [0u64, 1, 2, 3, 0x4e, 0x70, 0xfe, 0xff, 0xfff, u64::MAX] {
                let mut b = vec![0xaau8; len];
                t.read(off, &mut b);
                t.write(off, &b);
            }
        }
        // Non-4-byte register reads return zeros and writes are ignored.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(t.status(), 0);
        t.write(reg::STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn config_space_is_forwarded_and_bounded() {
        let (mut t, dev) = setup();
        t.write(0x100 + 2, &[7, 8]);
        assert_eq!(dev.lock().unwrap().config[2..4], [7, 8]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 7, 8, 0, 0, 0, 0]);
        // Partially outside and fully outside: zero filled, no panic.
        let mut b = [0xffu8; 4];
        t.read(0x106, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        t.write(0x106, &[1, 2, 3, 4]);
        t.read(0xfff, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
    }

    #[test]
    fn status_state_machine_rejects_bad_sequences() {
        let (mut t, dev) = setup();
        // Skipping ACKNOWLEDGE.
        w(&mut t, reg::STATUS, DRIVER);
        assert_eq!(t.status(), 0);
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        // Jumping straight to DRIVER_OK.
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(t.status(), ACKNOWLEDGE);
        // Features before DRIVER are ignored.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        // FEATURES_OK without VERSION_1 is refused.
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Only offered features are recorded.
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 0x5);
        // Feature writes after FEATURES_OK are ignored.
        w(&mut t, reg::DRIVER_FEATURES, 0);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 0x5);
        // Clearing a bit without a reset is refused.
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // FAILED sticks until reset.
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED,
        );
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
        );
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED);
        assert!(dev.lock().unwrap().activated.is_none());
        w(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(
            dev.lock().unwrap().resets,
            0,
            "never activated, nothing to reset"
        );
    }

    #[test]
    fn driver_ok_validates_queues_and_activates() {
        let (mut t, dev) = setup();
        let mem = t.mem.clone();
        let q0 = GuestQueue::new(&mem, GuestAddress(0x10000), 16);
        let q1 = GuestQueue::new(&mem, GuestAddress(0x20000), 8);
        // Queue registers before FEATURES_OK are ignored.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t, 1);
        // Sizes above the max or not a power of two are rejected.
        w(&mut t, reg::QUEUE_NUM, 32);
        w(&mut t, reg::QUEUE_NUM, 3);
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Notifies before DRIVER_OK are dropped.
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert!(t.queue_evts()[1].read().is_err());
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(t.status() & DRIVER_OK, DRIVER_OK);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Notify without ioeventfd signals the queue's eventfd; bad indexes are ignored.
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err());
        // Interrupt status / ack.
        t.interrupt.trigger(1).unwrap();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset resets the device and the queues.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(dev.lock().unwrap().activated, None);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn invalid_queue_address_sets_needs_reset() {
        let (mut t, dev) = setup();
        negotiate(&mut t, 1);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 16);
        // Descriptor table far outside the 1 MiB test memory.
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        w(&mut t, reg::QUEUE_READY, 1);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(t.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
        // Only a reset gets it out.
        let failed = t.status() | FAILED;
        w(&mut t, reg::STATUS, failed);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, dev) = setup();
        dev.lock().unwrap().fail_activate = true;
        negotiate(&mut t, 1);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn device_reported_breakage_shows_as_needs_reset_until_reset() {
        let (mut t, dev) = setup();
        let mem = t.mem.clone();
        let q0 = GuestQueue::new(&mem, GuestAddress(0x10000), 16);
        let q1 = GuestQueue::new(&mem, GuestAddress(0x20000), 8);
        let bring_up = |t: &mut MmioTransport| {
            negotiate(t, 1);
            setup_queue(t, 0, &q0);
            setup_queue(t, 1, &q1);
            w(
                t,
                reg::STATUS,
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            );
        };
        bring_up(&mut t);
        let ok = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        assert_eq!(r(&mut t, reg::STATUS), ok);
        dev.lock().unwrap().broken = true;
        assert_eq!(r(&mut t, reg::STATUS), ok | DEVICE_NEEDS_RESET);
        // It sticks: status writes other than FAILED and reset are refused.
        w(&mut t, reg::STATUS, ok);
        assert_eq!(r(&mut t, reg::STATUS), ok | DEVICE_NEEDS_RESET);
        w(&mut t, reg::STATUS, ok | DEVICE_NEEDS_RESET | FAILED);
        assert_eq!(r(&mut t, reg::STATUS), ok | DEVICE_NEEDS_RESET | FAILED);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        bring_up(&mut t);
        assert_eq!(r(&mut t, reg::STATUS), ok);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
    }

    #[test]
    fn driver_protocol_violations_are_counted_for_rate_limited_logging() {
        let (mut t, _) = setup();
        for _ in 0..1000 {
            w(&mut t, reg::STATUS, DRIVER_OK);
        }
        assert_eq!(t.violations.count(), 1000);
        // A reset does not restart the loud phase.
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::STATUS, DRIVER);
        assert_eq!(t.violations.count(), 1001);
    }

    #[test]
    fn bad_queue_values_are_refused_and_counted() {
        let (mut t, dev) = setup();
        let mem = t.mem.clone();
        let q0 = GuestQueue::new(&mem, GuestAddress(0x10000), 16);
        let q1 = GuestQueue::new(&mem, GuestAddress(0x20000), 8);
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        let before = t.violations.count();
        // Misaligned descriptor table (16 bytes), avail ring (2), used ring (4), bad sizes.
        w(&mut t, reg::QUEUE_SEL, 0);
        for (off, val) in [
            (reg::QUEUE_DESC_LOW, 0x10008),
            (reg::QUEUE_DRIVER_LOW, 0x10101),
            (reg::QUEUE_DEVICE_LOW, 0x10202),
            (reg::QUEUE_NUM, 0x1_0000),
            (reg::QUEUE_NUM, 12),
        ] {
            w(&mut t, off, val);
        }
        assert_eq!(t.violations.count(), before + 5);
        // Nothing was taken: the device activates on the rings set up before.
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        assert_eq!(
            half(0x1234_5678_9abc_def0, 0x11, false).0,
            0x1234_5678_0000_0011
        );
        assert_eq!(half(0x1234_5678_9abc_def0, 0x11, true).0, 0x11_9abc_def0);
    }
}
