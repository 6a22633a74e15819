//! The 16550 UART at COM1 (port 0x3f8, IRQ 4): the guest console. vm-superio emulates the registers;
//! this wires it to the port-I/O bus, to an irqfd, and to the console sink (a file or stdout).

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by signalling an EventFd registered as a KVM irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqFdTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider or empty accesses read as all ones.
        match data {
            [b] if offset < COM1_LEN => *b = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            if offset < COM1_LEN {
                if let Err(e) = self.uart.write(offset as u8, *b) {
                    tracing::debug!("serial console write failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_sink_and_odd_accesses_are_harmless() {
        let sink = Sink::default();
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        s.write(0, &[]);
        s.write(0, &[1, 2]);
        s.write(100, &[1]);
        let mut wide = [0u8; 4];
        s.read(5, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
    }
}
