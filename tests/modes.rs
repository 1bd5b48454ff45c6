//! Callers outside 64-bit CPL 0: compatibility mode truncates number, arguments and result to
//! 32 bits; CPL 3 gets -KVM_EPERM for every number, custom ones included.

use std::sync::Arc;

use vmcall_conformance::{backends, run};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::RunStatus;

#[test]
fn compat_mode_truncates_and_cpl3_gets_eperm() {
    for b in backends("compat_mode_truncates_and_cpl3_gets_eperm") {
        let table = Arc::new(HypercallTable::new());
        table.register(20, "echo", Builtin::Echo).unwrap();
        table.register(21, "big", Builtin::Const(0xffff_ffff_ffff_fffe)).unwrap();
        let out = run(b.hv.as_ref(), "modes", "", table);
        out.expect_status(RunStatus::Exited(0), &b.name);
        for insn in ["vmcall", "vmmcall"] {
            let compat = out.lines(&format!("compat {insn} "));
            let want = [
                // nr 0xdead..0014 is truncated to 20 (echo), a0 0x1_0000_0002 to 2.
                format!("compat {insn} nr=0xdead000000000014 a0=0x100000002 rax=0x2"),
                // The handler's 64-bit answer is truncated to its low 32 bits.
                format!("compat {insn} nr=0xdead000000000015 a0=0x0 rax=0xfffffffe"),
                // -KVM_ENOSYS as a 32-bit value, upper half clear.
                format!("compat {insn} nr=0xdead000000000999 a0=0x0 rax=0xfffffc18"),
            ];
            assert_eq!(compat, want, "{}:\n{}", b.name, out.console);
            let cpl3 = out.lines(&format!("cpl3 {insn} "));
            let want: Vec<String> =
                [1, 20, 999].iter().map(|nr| format!("cpl3 {insn} nr={nr} ret=-1")).collect();
            assert_eq!(cpl3, want, "{}:\n{}", b.name, out.console);
        }
        assert!(out.console.ends_with("done\n"), "{}", b.name);
    }
}
