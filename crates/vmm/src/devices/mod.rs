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
    /// A 1- or 2-byte write to the exit port. Only the SDKs' full-width `out PORT_EXIT, eax`
    /// ends a run with a status; a narrower write is what a guest gone wrong leaves behind (a
    /// probe loop or a crash writing a stray byte to every port), so the run ends with an
    /// error instead of a status that could read as success (docs/guest-abi.md).
    StrayExit { size: u8, data: u32 },
}

/// What a port write does: COM1 adds to the vCPU's console line, a 4-byte write to the exit
/// port ends the run (a narrower one is a [`PortWrite::StrayExit`]), anything else is ignored
/// as on a PC with nothing at that port. The one device model for
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
        ports::PORT_EXIT if size == 4 => PortWrite::Exit(data),
        ports::PORT_EXIT => PortWrite::StrayExit {
            size,
            data: data & (u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4)))),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn out(port: u16, size: u8, data: u32) -> PortWrite {
        let console = Console::new(Box::new(std::io::sink()));
        port_out(0, &console, &mut Vec::new(), port, size, data)
    }

    #[test]
    fn only_a_full_width_write_to_the_exit_port_ends_a_run_with_a_status() {
        assert_eq!(out(ports::PORT_EXIT, 4, 0), PortWrite::Exit(0));
        assert_eq!(out(ports::PORT_EXIT, 4, 0x1_0003), PortWrite::Exit(0x1_0003));
        // A stray byte of 0 (a crash spraying every port) must not read as success.
        assert_eq!(
            out(ports::PORT_EXIT, 1, 0xffff_ff00),
            PortWrite::StrayExit { size: 1, data: 0 }
        );
        assert_eq!(
            out(ports::PORT_EXIT, 2, 0x1234_5678),
            PortWrite::StrayExit { size: 2, data: 0x5678 }
        );
        for port in ports::PORT_EXIT + 1..=ports::PORT_EXIT + 3 {
            assert_eq!(out(port, 1, 0), PortWrite::Done, "port {port:#x} is not the exit port");
        }
    }

    #[test]
    fn reads_answer_only_the_bytes_asked_for() {
        assert_eq!(port_in(ports::COM1 + 5, 1), 0x60);
        assert_eq!(
            (port_in(0x80, 1), port_in(0x80, 2), port_in(0x80, 4)),
            (0xff, 0xffff, u32::MAX)
        );
    }
}
