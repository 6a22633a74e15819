//! Device statistics for the control socket's `stats` request.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;

/// A VM's virtio device, kept for reporting, with the virtio-mmio slot it occupies (the guest
/// sees slot N at `VIRTIO_MMIO_START + N * 4 KiB`, IRQ `VIRTIO_FIRST_IRQ + N`).
pub struct DeviceHandle {
    pub slot: u64,
    pub device: AttachedDevice,
}

/// A typed handle on one attached virtio device.
pub enum AttachedDevice {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Fs(Arc<Mutex<Fs>>),
    Vsock(Arc<Mutex<Vsock>>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceHandle {
    pub fn stats(&self) -> Value {
        let slot = self.slot;
        match &self.device {
            AttachedDevice::Block(d) => {
                let d = lock(d);
                let s = d.stats();
                json!({
                    "type": "block", "slot": slot, "active": d.is_active(), "needs_reset": d.needs_reset(),
                    "reads": s.reads, "writes": s.writes, "flushes": s.flushes,
                    "read_bytes": s.read_bytes, "write_bytes": s.write_bytes,
                    "failed": s.failed, "unsupported": s.unsupported, "malformed": s.malformed,
                })
            }
            AttachedDevice::Net(d) => {
                let d = lock(d);
                let s = d.stats();
                json!({
                    "type": "net", "slot": slot, "active": d.is_active(), "needs_reset": d.needs_reset(), "tap": d.tap_name(),
                    "tx_frames": s.tx_frames, "tx_bytes": s.tx_bytes, "tx_dropped": s.tx_dropped,
                    "tx_malformed": s.tx_malformed, "rx_frames": s.rx_frames, "rx_bytes": s.rx_bytes,
                    "rx_dropped": s.rx_dropped, "rx_malformed": s.rx_malformed,
                })
            }
            AttachedDevice::Fs(d) => {
                let d = lock(d);
                json!({
                    "type": "fs", "slot": slot, "active": d.is_active(), "needs_reset": d.needs_reset(), "tag": d.tag(),
                    "daemon_alive": !d.is_dead(), "interrupts": d.interrupts(),
                })
            }
            AttachedDevice::Vsock(d) => {
                let d = lock(d);
                json!({
                    "type": "vsock", "slot": slot, "active": d.is_active(), "needs_reset": d.needs_reset(),
                    "connections": d.connection_count(), "malformed": d.dropped_chains(),
                })
            }
        }
    }
}
