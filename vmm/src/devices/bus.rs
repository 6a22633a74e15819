//! Port-I/O and MMIO buses: which device answers a guest access at a given address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that the guest reaches through port I/O or MMIO exits.
///
/// `offset` is relative to the base of the range the device was inserted at. Accesses come from vCPU
/// threads with guest-controlled sizes; implementations must tolerate any length, including 0.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges mapped to devices. Ranges never overlap.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; returns false if no device claims `addr` (the data is then left as is).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A poisoned device lock means a device handler panicked earlier; its state is still the best we have.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            if let Some(b) = data.first() {
                self.0 = *b;
            }
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x110, 0x10)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 2),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 20);
        assert!(!bus.read(0x120, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x111, &[5]));
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 5);
        let mut empty = [];
        assert!(bus.read(0x100, &mut empty));
    }
}
