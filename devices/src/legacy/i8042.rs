//! Just enough of the i8042 keyboard controller for a Linux guest to probe it quickly and to
//! reset the machine through it (`reboot=k`: command 0xFE).
//!
//! There is no keyboard behind it and it raises no interrupts; the VMM should pass
//! `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd` so Linux neither probes an AUX port nor
//! sends keyboard commands whose answers it would wait for.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{warn_once, LogOnce, Problem};

/// Ports the controller decodes from its base (0x60): 0x60 data, 0x64 status/command.
pub const I8042_PORT_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Status: output buffer full (a byte waits at the data port).
const STATUS_OBF: u8 = 0x01;
/// Status: system flag, set once the controller passed its self-test (always, here).
const STATUS_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
const STATUS_CMD: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_RESET_CPU: u8 = 0xfe;

/// Controller configuration byte: keyboard interrupt, system flag, scancode translation.
const CTR_DEFAULT: u8 = 0x45;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// What a keyboard answers to any command byte.
const KBD_ACK: u8 = 0xfa;

/// Bytes the output buffer holds; a guest writing commands without reading answers loses the
/// oldest ones instead of growing host memory.
const OUTPUT_CAPACITY: usize = 16;

/// The i8042 controller; map it at port 0x60 with length [`I8042_PORT_LEN`].
pub struct I8042 {
    reset_evt: EventFd,
    ctr: u8,
    status: u8,
    /// The previous command byte takes a parameter at the data port.
    awaiting_ctr: bool,
    output: VecDeque<u8>,
    warned: LogOnce,
}

impl I8042 {
    /// Creates the controller; `reset_evt` is signalled when the guest requests a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            ctr: CTR_DEFAULT,
            status: STATUS_SYS,
            awaiting_ctr: false,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            warned: LogOnce::default(),
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() == OUTPUT_CAPACITY {
            self.output.pop_front();
        }
        self.output.push_back(byte);
    }

    fn command(&mut self, cmd: u8) {
        self.awaiting_ctr = false;
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR => self.awaiting_ctr = true,
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_KBD_TEST => self.push_output(PORT_TEST_OK),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset_evt.write(1) {
                    warn_once!(
                        self.warned,
                        Problem::Signal,
                        "i8042: cannot signal the reset: {e}"
                    );
                }
            }
            // Other commands (AUX, output port, password...) are not implemented; ignoring them
            // is what a controller without those features does.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        if std::mem::take(&mut self.awaiting_ctr) {
            self.ctr = byte;
        } else {
            // A byte for the keyboard: acknowledge it like a keyboard that accepts anything.
            self.push_output(KBD_ACK);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let obf = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OBF
                };
                self.status | obf
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => {
                self.status &= !STATUS_CMD;
                self.data(byte);
            }
            COMMAND_OFFSET => {
                self.status |= STATUS_CMD;
                self.command(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn controller() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xaa];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_eventfd() {
        let (mut dev, evt) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_writes_do_not_reset() {
        let (mut dev, evt) = controller();
        for cmd in 0..=u8::MAX {
            if cmd != CMD_RESET_CPU {
                dev.write(COMMAND_OFFSET, &[cmd]);
            }
            // 0xFE at the data port or elsewhere is not a reset either.
            dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
            dev.write(1, &[CMD_RESET_CPU]);
        }
        dev.write(COMMAND_OFFSET, &[]);
        assert!(evt.read().is_err());
    }

    #[test]
    fn idle_status_has_an_empty_output_buffer() {
        let (mut dev, _evt) = controller();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OBF, 0);
        // Input buffer never full, so `kb_wait()` before a reset never spins.
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & 0x02, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
        assert_eq!(read(&mut dev, 2), 0);
    }

    #[test]
    fn answers_linux_probe_commands() {
        let (mut dev, _evt) = controller();
        let mut ask = |cmd: u8| {
            dev.write(COMMAND_OFFSET, &[cmd]);
            assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OBF, 0, "{cmd:#x}");
            let answer = read(&mut dev, DATA_OFFSET);
            assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OBF, 0, "{cmd:#x}");
            answer
        };
        assert_eq!(ask(CMD_SELF_TEST), SELF_TEST_OK);
        assert_eq!(ask(CMD_KBD_TEST), PORT_TEST_OK);
        assert_eq!(ask(CMD_READ_CTR), CTR_DEFAULT);

        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x61]);
        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_KBD]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x61 | CTR_KBD_DISABLED);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut dev, _evt) = controller();
        for _ in 0..1000 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        dev.write(DATA_OFFSET, &[0xf2]);
        let answers: Vec<u8> = (0..OUTPUT_CAPACITY)
            .map(|_| read(&mut dev, DATA_OFFSET))
            .collect();
        assert_eq!(answers.last(), Some(&KBD_ACK));
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OBF, 0);
    }
}
