//! A guest that reads ports as kernels and their drivers do (`kernel_ports`): COM1's line
//! status says the transmitter is empty (a polling driver never waits), its receive buffer is
//! empty, ports with nothing behind them read all ones, and `in` writes only the part of RAX
//! its size names (a 32-bit `in` zero-extends), as on the CPU.

use vmcall_conformance::{
    backends, check_counts, check_lines, check_status, kernel_table, run, Verdicts,
};
use vmcall_vmm::vm::RunStatus;

/// `ports lsr: rax=0x11223344556677XX thre_temt=1` with XX having THRE and TEMT (0x60) set.
fn check_lsr(line: &str) -> Result<(), String> {
    let ok = line
        .strip_prefix("ports lsr: rax=0x11223344556677")
        .and_then(|rest| rest.strip_suffix(" thre_temt=1"))
        .and_then(|lsr| u8::from_str_radix(lsr, 16).ok())
        .is_some_and(|lsr| lsr & 0x60 == 0x60);
    if ok {
        Ok(())
    } else {
        Err(format!("line 1: expected THRE|TEMT set and RAX's upper bytes kept, got `{line}`"))
    }
}

#[test]
fn port_reads_answer_as_a_pc_does() {
    let want: Vec<String> = [
        "ports rbr: rax=0x1122334455667700",
        "ports post: rax=0x11223344556677ff",
        "ports empty in8: rax=0x11223344556677ff",
        "ports empty in16: rax=0x112233445566ffff",
        "ports empty in32: rax=0xffffffff",
        "ports driver: written by a polling driver",
        "ports driver: bytes=42 polls=42",
        "ports hypercall: ret=96",
        "ports: done",
    ]
    .map(String::from)
    .into();
    let mut verdicts = Verdicts::default();
    for b in backends("kernel_ports") {
        let out = run(b.hv.as_ref(), "kernel_ports", "", kernel_table());
        let (first, rest) = out.console.split_once('\n').unwrap_or((&out.console, ""));
        let verdict = check_status(&out, RunStatus::Exited(0))
            .and_then(|()| check_lsr(first))
            .and_then(|()| check_lines(rest, &want).map_err(|e| format!("after line 1, {e}")))
            .and_then(|()| check_counts(&out, &b, &[(20, 1)]));
        verdicts.record("kernel_ports", &b.name, verdict, &out.console);
    }
    verdicts.finish();
}
