//! The port-I/O device models (COM1, the exit port, the doorbell and stub ports, unclaimed
//! ports) on any sequence of `in`/`out` a guest can make: the console keeps at most one line
//! per vCPU and loses no byte, reads answer only as many bytes as were asked for, and only
//! the exit port ends a run.
//!
//! The PC devices of the multiboot work (PIC, PIT, RTC, ...) plug in here once they exist:
//! one more arm in `port()` and their invariants below.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_abi::ports;
use vmcall_vmm::devices::{port_in, port_out, Console, PortWrite};

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
    Ok(match u.int_in_range(0..=4)? {
        0 => ports::COM1 + u.int_in_range(0..=7)?,
        1 => ports::PORT_EXIT + u.int_in_range(0..=3)?,
        2 => *u.choose(&[ports::PORT_DOORBELL, ports::PORT_HC_TRAP, ports::PORT_FAULT, 0x80])?,
        _ => u.arbitrary()?,
    })
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let written = Count::default();
    let console = Console::new(Box::new(written.clone()));
    let mut line = Vec::new();
    let mut com1_bytes = 0usize;
    while !u.is_empty() {
        let port = port(&mut u)?;
        let size = if u.ratio(15, 16)? { *u.choose(&[1u8, 2, 4])? } else { u.arbitrary()? };
        if u.arbitrary()? {
            let data: u32 = u.arbitrary()?;
            match port_out(0, &console, &mut line, port, size, data) {
                PortWrite::Done => {}
                PortWrite::Exit(status) => {
                    assert_eq!(port, ports::PORT_EXIT, "only the exit port ends a run");
                    assert_eq!((size, status), (4, data), "only a full-width write exits");
                }
                PortWrite::StrayExit { .. } => {
                    assert_eq!(port, ports::PORT_EXIT, "only the exit port");
                    assert_ne!(size, 4, "a full-width write is an exit");
                }
            }
            com1_bytes += usize::from(port == ports::COM1);
            assert!(line.len() < 4096, "a console line is written out at 4096 bytes");
        } else if (1..=4).contains(&size) {
            let value = port_in(port, size);
            assert_eq!(u64::from(value) >> (8 * u32::from(size)), 0, "in{size} at {port:#x}");
        } else {
            let _ = port_in(port, size);
        }
    }
    console.write(&line);
    assert_eq!(*written.0.lock().unwrap(), com1_bytes, "every COM1 byte reaches the console");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
