//! The minimal PC a guest reaches through port I/O and MMIO: COM1 (a 16550), vmcall's exit
//! port, QEMU's `isa-debug-exit` and fw_cfg, and a local APIC page per vCPU. Everything else
//! reads as absent hardware does (all ones) and accepts writes. One model serves accesses
//! whether they arrive as exits or inline from a backend's hooks.

pub(crate) mod apic;
pub(crate) mod fw_cfg;
pub mod serial;

use std::sync::Mutex;

use vmcall_abi::{mmio, ports};

pub use serial::{Console, ConsoleWriter};

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
    StrayExit {
        /// Bytes written: 1 or 2.
        size: u8,
        /// The value written.
        data: u32,
    },
}

/// The devices of one VM.
#[derive(Debug)]
pub struct Devices {
    uart: serial::Uart,
    fw_cfg: Mutex<fw_cfg::FwCfg>,
    apics: Vec<Mutex<apic::Apic>>,
}

/// `data` cut to an access of `size` bytes.
fn sized(data: u32, size: u8) -> u32 {
    if size >= 4 {
        data
    } else {
        data & ((1 << (8 * u32::from(size))) - 1)
    }
}

impl Devices {
    /// The devices of a VM with `vcpus` vCPUs and `ram_size` bytes of RAM, printing to `console`.
    pub fn new(console: Console, vcpus: u32, ram_size: u64) -> Self {
        Self {
            uart: serial::Uart::new(console),
            fw_cfg: Mutex::new(fw_cfg::FwCfg::new(vcpus, ram_size)),
            apics: (0..vcpus).map(|id| Mutex::new(apic::Apic::new(id))).collect(),
        }
    }

    /// The console the serial port and the console port write to.
    pub fn console(&self) -> &Console {
        self.uart.console()
    }

    /// A port write by vCPU `vcpu_id`; `line` is that vCPU's console line so far.
    pub fn port_out(
        &self,
        vcpu_id: u32,
        line: &mut Vec<u8>,
        port: u16,
        size: u8,
        data: u32,
    ) -> PortWrite {
        match port {
            ports::COM1..=ports::COM1_END => {
                self.uart.write((port - ports::COM1) as u8, data as u8, line);
                PortWrite::Done
            }
            ports::PORT_EXIT if size == 4 => PortWrite::Exit(data),
            ports::PORT_EXIT => PortWrite::StrayExit { size, data: sized(data, size) },
            // QEMU's isa-debug-exit: status (V << 1) | 1, so a kernel cannot exit with 0 by it.
            ports::ISA_DEBUG_EXIT => PortWrite::Exit((sized(data, size) << 1) | 1),
            ports::FW_CFG_SELECTOR => {
                self.fw_cfg.lock().unwrap_or_else(|p| p.into_inner()).select(data as u16);
                PortWrite::Done
            }
            _ => {
                tracing::debug!(
                    vcpu = vcpu_id,
                    port,
                    size,
                    data,
                    "write to an unclaimed port ignored"
                );
                PortWrite::Done
            }
        }
    }

    /// A port read of `size` bytes (1, 2 or 4).
    pub fn port_in(&self, port: u16, size: u8) -> u32 {
        match port {
            ports::COM1..=ports::COM1_END => u32::from(self.uart.read((port - ports::COM1) as u8)),
            ports::FW_CFG_DATA => {
                let mut f = self.fw_cfg.lock().unwrap_or_else(|p| p.into_inner());
                (0..size.clamp(1, 4)).fold(0, |v, i| v | u32::from(f.read_byte()) << (8 * i))
            }
            _ => u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4))),
        }
    }

    /// The local APIC register offset of `gpa`, if it lies in the APIC page.
    fn apic_offset(gpa: u64) -> Option<u64> {
        gpa.checked_sub(mmio::APIC_BASE).filter(|off| *off < mmio::APIC_SIZE)
    }

    /// An MMIO read of `len` bytes at `gpa` by vCPU `vcpu_id`; `None` when no device is there.
    pub fn mmio_read(&self, vcpu_id: u32, gpa: u64, len: u8) -> Option<u64> {
        let off = Self::apic_offset(gpa)?;
        let apic = self.apics.get(vcpu_id as usize)?;
        Some(apic.lock().unwrap_or_else(|p| p.into_inner()).read(off, len))
    }

    /// An MMIO write of `len` bytes of `data` at `gpa`; false when no device is there.
    pub fn mmio_write(&self, vcpu_id: u32, gpa: u64, _len: u8, data: u64) -> bool {
        let (Some(off), Some(apic)) = (Self::apic_offset(gpa), self.apics.get(vcpu_id as usize))
        else {
            return false;
        };
        apic.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(Console::new(Box::new(std::io::sink())), 2, 32 << 20)
    }

    #[test]
    fn ports_of_the_minimal_pc() {
        let d = devices();
        let mut line = Vec::new();
        assert_eq!(d.port_out(0, &mut line, ports::PORT_EXIT, 4, 0x1ff), PortWrite::Exit(0x1ff));
        assert_eq!(
            d.port_out(0, &mut line, ports::PORT_EXIT, 1, 0x1ff),
            PortWrite::StrayExit { size: 1, data: 0xff }
        );
        assert_eq!(d.port_out(0, &mut line, ports::ISA_DEBUG_EXIT, 4, 0x10), PortWrite::Exit(0x21));
        assert_eq!(d.port_out(0, &mut line, ports::ISA_DEBUG_EXIT, 1, 0x100), PortWrite::Exit(1));
        assert_eq!(d.port_in(ports::COM1 + 5, 1) & 0x60, 0x60, "transmitter empty");
        d.port_out(0, &mut line, ports::FW_CFG_SELECTOR, 2, u32::from(fw_cfg::NB_CPUS));
        assert_eq!(d.port_in(ports::FW_CFG_DATA, 1), 2);
        d.port_out(0, &mut line, ports::FW_CFG_SELECTOR, 2, u32::from(fw_cfg::SIGNATURE));
        assert_eq!(d.port_in(ports::FW_CFG_DATA, 4), u32::from_le_bytes(*b"QEMU"));
        // Absent hardware: PIC, PIT, PCI configuration, CMOS.
        for port in [0x21, 0x40, 0xcfc, 0x71] {
            assert_eq!(d.port_in(port, 1), 0xff);
            assert_eq!(d.port_out(0, &mut line, port, 1, 0), PortWrite::Done);
        }
        assert_eq!(d.port_in(0xcfc, 4), u32::MAX);
        assert_eq!(line, b"", "nothing reached COM1");
    }

    #[test]
    fn each_vcpu_sees_its_own_apic() {
        let d = devices();
        assert_eq!(d.mmio_read(1, mmio::APIC_BASE + 0x20, 4), Some(1 << 24));
        assert!(d.mmio_write(0, mmio::APIC_BASE + 0x80, 4, 0x30));
        assert_eq!(d.mmio_read(0, mmio::APIC_BASE + 0x80, 4), Some(0x30));
        assert_eq!(d.mmio_read(1, mmio::APIC_BASE + 0x80, 4), Some(0));
        assert_eq!(d.mmio_read(0, mmio::APIC_BASE + 0x1000, 4), None);
        assert!(!d.mmio_write(0, 0xfec0_0000, 4, 1), "no IOAPIC");
    }

    fn out(port: u16, size: u8, data: u32) -> PortWrite {
        devices().port_out(0, &mut Vec::new(), port, size, data)
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
        let d = devices();
        assert_eq!(d.port_in(ports::COM1 + 5, 1), 0x60);
        assert_eq!(
            (d.port_in(0x80, 1), d.port_in(0x80, 2), d.port_in(0x80, 4)),
            (0xff, 0xffff, u32::MAX)
        );
    }
}
