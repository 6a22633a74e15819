//! Virtio over MMIO: the transport and the devices (block, net, vsock, fs).
//!
//! The split is the usual one: [`mmio::MmioTransport`] owns everything the guest driver programs
//! through registers (status, features, queue addresses) and hands a device implementing
//! [`VirtioDevice`] its ready queues on `DRIVER_OK`. Devices signal the guest through the shared
//! [`IrqTrigger`]. A device whose ring breaks at run time says so through
//! [`VirtioDevice::needs_reset`] and raises a config interrupt ([`health`]); the transport then
//! shows `DEVICE_NEEDS_RESET` in the status register until the driver resets it.

pub mod block;
pub mod chain;
pub mod fs;
pub mod health;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as the virtio devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Feature bit: the device follows virtio 1.x (mandatory for the modern MMIO transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Feature bit: `used_event` / `avail_event` (virtio 1.2, 2.7.10). The driver tells the device after
/// which used entry it wants an interrupt, the device tells the driver after which available entry it
/// wants a notification. Every notification and interrupt is a VM exit, so the devices that process
/// queues themselves (block, net) offer it to batch both.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Errors a device reports when the transport activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, the transport passed {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} was not made ready by the driver")]
    QueueNotReady(usize),
    #[error("device is already active")]
    AlreadyActive,
    #[error("cannot clone/signal an event fd for activation: {0}")]
    EventFd(#[source] io::Error),
    #[error("device backend: {0}")]
    Backend(String),
}

/// The checks every device makes before it takes the queues the transport hands it on `DRIVER_OK`:
/// not already active, exactly `expected` queues with their eventfds, every queue made ready.
pub fn check_activation(
    already_active: bool,
    expected: usize,
    queues: &[Queue],
    queue_evts: &[EventFd],
) -> Result<(), ActivateError> {
    if already_active {
        return Err(ActivateError::AlreadyActive);
    }
    if queues.len() != expected || queue_evts.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len().min(queue_evts.len()),
        });
    }
    match queues.iter().position(|q| !q.ready()) {
        Some(i) => Err(ActivateError::QueueNotReady(i)),
        None => Ok(()),
    }
}

/// Interrupt line shared between a transport and its device: the MMIO `InterruptStatus` bits plus
/// the eventfd the VMM registers as a KVM irqfd. Cloning shares both.
#[derive(Clone, Debug)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl IrqTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Sets `bits` in the interrupt status and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current `InterruptStatus` register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears all pending bits (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as the device's irqfd.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

/// A virtio device behind a transport. All methods are called with guest-controlled arguments
/// from vCPU threads; implementations must validate them.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`), called on `FEATURES_OK`.
    fn ack_features(&mut self, features: u64);
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device config space at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space; out-of-range or read-only writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up. `queue_evts[i]` is signalled when the
    /// driver notifies queue `i`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: IrqTrigger,
    ) -> Result<(), ActivateError>;
    /// Stops the device and drops everything tied to the current driver instance.
    fn reset(&mut self);
    /// Whether the device broke on its own after activation (e.g. its backend process died or
    /// the driver corrupted a ring); the transport then reports `DEVICE_NEEDS_RESET`. The device
    /// raises the config interrupt itself when it breaks, and a reset clears the condition
    /// unless the backend is gone for good.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Why the device could not register its file descriptors with the event loop (in
    /// `MutEventSubscriber::init`), if it could not. Such a device would never hear from its
    /// queues, so the VM does not start.
    fn event_loop_error(&self) -> Option<&str> {
        None
    }
}

/// Copies `config[offset..offset+data.len()]` into `data`, zero-filling whatever lies outside
/// `config` (the offset and length come from the guest).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounds_checked() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 3];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0, 0, 0]);
        let mut empty = [];
        read_config_bytes(&cfg, 0, &mut empty);
    }

    #[test]
    fn irq_trigger_sets_and_acks_bits() {
        let irq = IrqTrigger::new().unwrap();
        irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        irq.trigger(VIRTIO_MMIO_INT_CONFIG).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.event().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }
}
