//! A minimal i8042 keyboard controller. The guest uses it for one thing: Linux with `reboot=k` writes
//! the CPU-reset command 0xfe to port 0x64, and Husk treats a guest reboot as the end of the VM.
//! The controller also answers the probe commands of the kernel's i8042 driver (read/write the
//! control register, self tests) so that the probe finishes at once instead of timing out.
//! There is no keyboard behind it.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// Set means the keyboard is *not* inhibited by the keylock.
const STATUS_UNLOCKED: u8 = 0x10;
/// Control register after reset: keyboard interrupt on, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;
/// The output buffer holds a byte or two on real hardware; a guest cannot make it grow.
const OUTPUT_MAX: usize = 16;

pub struct I8042 {
    reset_evt: EventFd,
    ctr: u8,
    expecting_ctr: bool,
    output: VecDeque<u8>,
}

impl I8042 {
    /// `reset_evt` is signalled when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            ctr: CTR_DEFAULT,
            expecting_ctr: false,
            output: VecDeque::new(),
        }
    }

    fn push_output(&mut self, b: u8) {
        if self.output.len() < OUTPUT_MAX {
            self.output.push_back(b);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR => self.expecting_ctr = true,
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push_output(0),
            CMD_RESET_CPU => {
                tracing::info!("guest requested a reset through the i8042 controller");
                if let Err(e) = self.reset_evt.write(1) {
                    tracing::error!("cannot signal the guest reset: {e}");
                }
            }
            // Enable/disable ports and the rest: accepted, nothing to do without devices.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                STATUS_SYSTEM_FLAG | STATUS_UNLOCKED | full
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            COMMAND_OFFSET => self.command(b),
            DATA_OFFSET if self.expecting_ctr => {
                self.ctr = b;
                self.expecting_ctr = false;
            }
            // Bytes for a keyboard that does not exist.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(COMMAND_OFFSET, &[]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn answers_the_linux_probe() {
        let mut dev = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), CTR_DEFAULT);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x30]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x30);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        // A guest flooding commands cannot grow the buffer.
        for _ in 0..1000 {
            dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        }
        assert_eq!(dev.output.len(), OUTPUT_MAX);
        let mut wide = [0xffu8; 4];
        dev.read(COMMAND_OFFSET, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }
}
