//! The COM1 16550 UART (vm-superio) with its output captured per VM in a bounded buffer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use super::bus::BusDevice;

/// Captured console output: keeps the last `cap` bytes.
#[derive(Debug)]
pub struct ConsoleBuffer {
    buf: Mutex<VecDeque<u8>>,
    cap: usize,
    echo: bool,
}

impl ConsoleBuffer {
    /// A buffer keeping the last `cap` bytes; `echo` also copies output to the host's stderr.
    pub fn new(cap: usize, echo: bool) -> ConsoleBuffer {
        ConsoleBuffer {
            buf: Mutex::new(VecDeque::new()),
            cap,
            echo,
        }
    }

    fn push(&self, data: &[u8]) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.extend(data);
        let excess = b.len().saturating_sub(self.cap);
        b.drain(..excess);
        drop(b);
        if self.echo {
            let _ = io::stderr().write_all(data);
        }
    }

    /// Everything captured (lossy UTF-8).
    pub fn contents(&self) -> String {
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let (x, y) = b.as_slices();
        let mut v = Vec::with_capacity(b.len());
        v.extend_from_slice(x);
        v.extend_from_slice(y);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let s = self.contents();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

struct Capture(Arc<ConsoleBuffer>);

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// No interrupt line: the guest polls the UART.
struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The serial device on the I/O bus (8 ports from 0x3f8).
pub struct SerialDevice {
    uart: Serial<NoIrq, NoEvents, Capture>,
}

impl SerialDevice {
    /// A UART writing into `out`.
    pub fn new(out: Arc<ConsoleBuffer>) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(NoIrq, Capture(out)),
        }
    }
}

/// Saved UART registers (serializable mirror of `vm_superio::serial::SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// Capture the UART registers.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state, writing into `out`.
    pub fn from_state(
        st: &SerialSnapshot,
        out: Arc<ConsoleBuffer>,
    ) -> Result<SerialDevice, String> {
        let r = st.regs;
        let s = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: st.in_buffer.clone(),
        };
        Serial::from_state(&s, NoIrq, NoEvents, Capture(out))
            .map(|uart| SerialDevice { uart })
            .map_err(|e| format!("saved serial state is invalid: {e:?}"))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_bounded_output() {
        let out = Arc::new(ConsoleBuffer::new(8, false));
        let mut s = SerialDevice::new(out.clone());
        for b in b"hello world\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.contents(), "o world\n");
        // LSR reports the transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        let out = Arc::new(ConsoleBuffer::new(100, false));
        out.push(b"a\nb\nc\n");
        assert_eq!(out.tail(2), "b\nc");
    }
}
