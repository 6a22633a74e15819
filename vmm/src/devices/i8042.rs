//! Just enough of the i8042 keyboard controller for the guest to reboot: Linux with `reboot=k` writes
//! the CPU-reset command 0xfe to port 0x64. Husk treats a guest reboot as the end of the VM.

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// `reset_evt` is signalled when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for a command).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("guest requested a reset through the i8042 controller");
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("cannot signal the guest reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        dev.write(COMMAND_OFFSET, &[]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
