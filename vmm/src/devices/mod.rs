//! Emulated devices: the buses, legacy PC devices (serial console, i8042 reset) and virtio-mmio devices.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
