//! The device models (COM1's 16550, the exit port, isa-debug-exit, fw_cfg, the doorbell and
//! stub ports, unclaimed ports, the APIC page) on any sequence of `in`/`out` and MMIO a guest
//! can make: the console keeps at most one line per vCPU and loses no transmitted byte, reads
//! answer only as many bytes as were asked for, and only the exit ports end a run.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_abi::{mmio, ports};
use vmcall_vmm::devices::{Console, Devices, PortWrite};

#[derive(Clone, Default)]
struct Count(Arc<Mutex<usize>>);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().unwrap() += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn port(u: &mut Unstructured<'_>) -> Result<u16> {
    Ok(match u.int_in_range(0..=5)? {
        0 | 1 => ports::COM1 + u.int_in_range(0..=7)?,
        2 => ports::PORT_EXIT + u.int_in_range(0..=3)?,
        3 => *u.choose(&[
            ports::PORT_DOORBELL,
            ports::PORT_HC_TRAP,
            ports::PORT_FAULT,
            ports::ISA_DEBUG_EXIT,
            ports::FW_CFG_SELECTOR,
            ports::FW_CFG_DATA,
            0x80,
        ])?,
        _ => u.arbitrary()?,
    })
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let written = Count::default();
    let devices = Devices::new(Console::new(Box::new(written.clone())), 2, 32 << 20);
    let mut line = Vec::new();
    let mut com1_bytes = 0usize;
    // What decides whether a byte written to COM1's data register is transmitted: DLAB
    // (LCR bit 7) selects the divisor latch instead, loopback (MCR bit 4) loops it back.
    let (mut dlab, mut loopback) = (false, false);
    while !u.is_empty() {
        if u.ratio(1, 8)? {
            let gpa = mmio::APIC_BASE.wrapping_add(u.int_in_range(0..=0x1100)?);
            let len = *u.choose(&[1u8, 2, 4, 8])?;
            if u.arbitrary()? {
                let _ = devices.mmio_write(u.int_in_range(0..=2)?, gpa, len, u.arbitrary()?);
            } else if let Some(v) = devices.mmio_read(u.int_in_range(0..=2)?, gpa, len) {
                assert!(len >= 4 || v >> (8 * u32::from(len)) == 0, "mmio read{len} at {gpa:#x}");
            }
            continue;
        }
        let port = port(&mut u)?;
        let size = if u.ratio(15, 16)? { *u.choose(&[1u8, 2, 4])? } else { u.arbitrary()? };
        if u.arbitrary()? {
            let data: u32 = u.arbitrary()?;
            match devices.port_out(0, &mut line, port, size, data) {
                PortWrite::Done => {}
                PortWrite::Exit(status) if port == ports::ISA_DEBUG_EXIT => {
                    assert_eq!(status & 1, 1, "isa-debug-exit's status is (V << 1) | 1");
                }
                PortWrite::Exit(status) => {
                    assert_eq!(port, ports::PORT_EXIT, "only the exit ports end a run");
                    assert_eq!((size, status), (4, data), "only a full-width write exits");
                }
                PortWrite::StrayExit { .. } => {
                    assert_eq!(port, ports::PORT_EXIT, "only the exit port");
                    assert_ne!(size, 4, "a full-width write is an exit");
                }
            }
            match port {
                p if p == ports::COM1 + 3 => dlab = data & 0x80 != 0,
                p if p == ports::COM1 + 4 => loopback = data & 0x10 != 0,
                p if p == ports::COM1 => com1_bytes += usize::from(!dlab && !loopback),
                _ => {}
            }
            assert!(line.len() < 4096, "a console line is written out at 4096 bytes");
        } else if (1..=4).contains(&size) {
            let value = devices.port_in(port, size);
            assert_eq!(u64::from(value) >> (8 * u32::from(size)), 0, "in{size} at {port:#x}");
        } else {
            let _ = devices.port_in(port, size);
        }
    }
    devices.console().write(&line);
    assert_eq!(*written.0.lock().unwrap(), com1_bytes, "every COM1 byte reaches the console");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
