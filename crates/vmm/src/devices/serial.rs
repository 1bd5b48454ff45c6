//! COM1, a 16550A UART (rust-vmm's `vm-superio` model): THR/RBR, IER, IIR/FCR, LCR with DLAB and
//! the divisor latch, MCR, LSR, MSR, scratch. What the guest transmits goes to the console a
//! whole line at a time per vCPU, so lines from different vCPUs never interleave mid-line.
//! There is no interrupt controller to raise the UART's interrupt at: drivers poll LSR, which
//! always says the transmitter is empty (output is instant).

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// A console line longer than this is written out in pieces.
const CONSOLE_LINE_MAX: usize = 4096;

/// Where COM1 output goes.
pub type ConsoleWriter = Box<dyn Write + Send>;

/// The VM's console, shared by its vCPUs; each writes whole lines.
pub struct Console(Mutex<ConsoleWriter>);

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    /// A console writing to `writer`.
    pub fn new(writer: ConsoleWriter) -> Self {
        Self(Mutex::new(writer))
    }

    /// Write and flush `bytes` (output errors are ignored: the guest must not stop for them).
    pub fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.write_all(bytes);
        let _ = c.flush();
    }

    /// Write out what is buffered.
    pub fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// The UART's interrupt line, connected to nothing.
#[derive(Debug, Clone, Copy)]
struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1.
pub struct Uart {
    /// The register model; what it transmits lands in its `Vec` and moves to a console line.
    regs: Mutex<Serial<NoIrq, NoEvents, Vec<u8>>>,
    console: Console,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Uart")
    }
}

impl Uart {
    /// A serial port printing to `console`.
    pub fn new(console: Console) -> Self {
        Self { regs: Mutex::new(Serial::new(NoIrq, Vec::new())), console }
    }

    /// The console it prints to.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// A write of `value` to register `offset`; a transmitted byte joins `line`, which goes
    /// to the console at a newline or when it is long.
    pub fn write(&self, offset: u8, value: u8, line: &mut Vec<u8>) {
        let mut regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        // The model cannot fail without an interrupt line to fail on.
        let _ = regs.write(offset, value);
        let sent = std::mem::take(regs.writer_mut());
        drop(regs);
        for byte in sent {
            line.push(byte);
            if byte == b'\n' || line.len() >= CONSOLE_LINE_MAX {
                self.console.write(line);
                line.clear();
            }
        }
    }

    /// A read of register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        self.regs.lock().unwrap_or_else(|p| p.into_inner()).read(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Capture;

    #[test]
    fn registers_behave_like_a_16550() {
        let sink = Capture::default();
        let uart = Uart::new(Console::new(Box::new(sink.clone())));
        let mut line = Vec::new();
        // LSR: transmitter holding register and transmitter empty, no data ready.
        assert_eq!(uart.read(5) & 0x61, 0x60);
        // The divisor latch replaces THR/IER while DLAB is set, and transmits nothing.
        uart.write(3, 0x83, &mut line);
        uart.write(0, 0x01, &mut line);
        uart.write(1, 0x00, &mut line);
        assert_eq!((uart.read(0), uart.read(1)), (0x01, 0x00));
        uart.write(3, 0x03, &mut line);
        assert_eq!(uart.read(3), 0x03);
        // Scratch keeps what is written; IIR says "no interrupt pending" with FIFOs.
        uart.write(7, 0x5a, &mut line);
        assert_eq!(uart.read(7), 0x5a);
        assert_eq!(uart.read(2) & 0x0f, 0x01);
        for b in b"hi\nthere" {
            uart.write(0, *b, &mut line);
        }
        assert_eq!(sink.bytes(), b"hi\n");
        assert_eq!(line, b"there");
    }
}
