//! The devices a guest reaches through port I/O: COM1 (console output), vmcall's exit port, and
//! what a PC answers at ports with nothing behind them. One model serves port accesses whether
//! they arrive as exits or inline from a backend's hooks.

use std::io::Write;
use std::sync::Mutex;

use vmcall_abi::ports;

/// A console line longer than this is written out in pieces.
const CONSOLE_LINE_MAX: usize = 4096;

/// Where COM1 output goes.
pub type ConsoleWriter = Box<dyn Write + Send>;

/// The VM's console, shared by its vCPUs; each writes whole lines, so lines never interleave.
pub struct Console(Mutex<ConsoleWriter>);

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
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

    pub fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// What a port write asks of the vCPU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortWrite {
    /// Handled; the vCPU runs on.
    Done,
    /// The guest asked to end the run with this status.
    Exit(u32),
}

/// What a port write does: COM1 adds to the vCPU's console line, the exit port ends the run,
/// anything else is ignored as on a PC with nothing at that port. The one device model for
/// port writes, whether they arrive as exits or inline ([`InlineExits`]).
pub fn port_out(
    vcpu_id: u32,
    console: &Console,
    line: &mut Vec<u8>,
    port: u16,
    size: u8,
    data: u32,
) -> PortWrite {
    match port {
        ports::COM1 => {
            line.push(data as u8);
            if data as u8 == b'\n' || line.len() >= CONSOLE_LINE_MAX {
                console.write(line);
                line.clear();
            }
            PortWrite::Done
        }
        ports::PORT_EXIT => {
            let status = if size >= 4 { data } else { data & ((1 << (8 * u32::from(size))) - 1) };
            PortWrite::Exit(status)
        }
        _ => {
            tracing::debug!(vcpu = vcpu_id, port, size, data, "write to an unclaimed port ignored");
            PortWrite::Done
        }
    }
}

/// What a port read returns: COM1's line status says "transmitter empty" (so polling guests
/// never wait), its other registers read 0, and unclaimed ports read all ones as on a PC.
/// Backends that must answer a read synchronously (the emulator) call this too.
pub fn port_in(port: u16, size: u8) -> u32 {
    match port {
        p if p == ports::COM1 + 5 => 0x60,
        p if (ports::COM1..=ports::COM1_END).contains(&p) => 0,
        _ => u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4))),
    }
}
