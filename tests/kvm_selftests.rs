//! Linux's own KVM selftests, re-expressed as vmcall guests (`selftest_pv`) with the same
//! assertions: `fix_hypercall_test` (the other vendor's hypercall instruction under KVM's
//! FIX_HYPERCALL_INSN quirk and without it) and `kvm_pv_test` (hypercalls and PV MSRs refused
//! when the PV CPUID does not offer them and KVM_CAP_ENFORCE_PV_FEATURE_CPUID is on).

use std::sync::Arc;

use vmcall_conformance::{backends, guest, run_image, visible, Outcome};
use vmcall_vmm::hypercall::{ForeignInsn, HypercallTable};
use vmcall_vmm::vm::RunStatus;
use vmcall_vmm::x86::cpuid::PvCpuid;

fn run(b: &vmcall_conformance::Backend, case: &str, foreign: ForeignInsn, pv: PvCpuid) -> Outcome {
    let out = run_image(
        b.hv.as_ref(),
        guest("selftest_pv"),
        case,
        Arc::new(HypercallTable::new()),
        |v| v.foreign_hypercall(foreign).pv_cpuid(pv),
    );
    out.expect_status(RunStatus::AllHalted, &format!("{} {case}", b.name));
    out
}

#[test]
fn the_other_vendors_instruction_is_patched_or_raises_ud_as_the_quirk_says() {
    for b in backends("the_other_vendors_instruction_is_patched_or_raises_ud_as_the_quirk_says") {
        let out = run(&b, "fix-hypercall", ForeignInsn::Patch, PvCpuid::default());
        assert_eq!(
            out.lines("fix-hypercall"),
            ["fix-hypercall: other vendor's sched_yield ret=0; its bytes now native"],
            "{}: quirk on",
            b.name
        );
        let out = run(&b, "fix-hypercall", ForeignInsn::Ud, PvCpuid::default());
        assert_eq!(
            out.lines("fix-hypercall"),
            ["fix-hypercall: other vendor's sched_yield trapped vector=6 err=0x0 rip=site+0xa; its bytes now unchanged"],
            "{}: quirk off",
            b.name
        );
    }
}

#[test]
fn pv_hypercalls_answer_whatever_cpuid_says_unless_enforced() {
    let none_enforced = PvCpuid { features: 0, enforce: true };
    let all_enforced = PvCpuid { features: (1 << 7) | (1 << 11) | (1 << 13), enforce: true };
    for b in backends("pv_hypercalls_answer_whatever_cpuid_says_unless_enforced") {
        for (pv, want) in [
            (PvCpuid::default(), "kick_cpu=0 send_ipi=1 sched_yield=0"),
            (PvCpuid { features: 0, enforce: false }, "kick_cpu=0 send_ipi=1 sched_yield=0"),
            (none_enforced, "kick_cpu=-1000 send_ipi=-1000 sched_yield=-1000"),
            (all_enforced, "kick_cpu=0 send_ipi=1 sched_yield=0"),
        ] {
            let out = run(&b, "pv-hypercalls", ForeignInsn::default(), pv);
            assert_eq!(
                out.lines("pv"),
                [format!("pv features: {:#x}", pv.features), format!("pv-hypercalls: {want}")],
                "{}: {pv:?}",
                b.name
            );
        }
    }
}

#[test]
fn pv_msrs_fault_when_enforced_and_not_offered() {
    for b in backends("pv_msrs_fault_when_enforced_and_not_offered") {
        if b.name == "emu" {
            // Unicorn 2.1.5 neither faults nor offers a hook on RDMSR/WRMSR of an MSR it does
            // not know (it reads 0 and ignores writes): nothing can raise the #GP.
            visible("SKIP pv_msrs_fault_when_enforced_and_not_offered on emu: unicorn's RDMSR/WRMSR cannot fault or be hooked");
            continue;
        }
        let out =
            run(&b, "pv-msrs", ForeignInsn::default(), PvCpuid { features: 0, enforce: true });
        let lines = out.lines("pv-msrs");
        assert_eq!(lines.len(), 10, "{}: {}", b.name, out.console);
        for line in lines {
            assert!(line.ends_with("rdmsr #GP wrmsr #GP"), "{}: {line}", b.name);
        }
    }
}
