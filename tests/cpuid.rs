//! What a guest learns about its hypervisor is the same on every backend: the KVM CPUID leaves
//! (signature, and exactly the PV features vmcall implements), and a CLOCK_PAIRING TSC that
//! matches the guest's own RDTSC.

use std::sync::Arc;

use vmcall_conformance::{backends, run};
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::RunStatus;

#[test]
fn kvm_leaves_and_clock_pairing_tsc_agree_on_every_backend() {
    for b in backends("kvm_leaves_and_clock_pairing_tsc_agree_on_every_backend") {
        let out = run(b.hv.as_ref(), "cpuid", "", Arc::new(HypercallTable::new()));
        out.expect_status(RunStatus::AllHalted, &b.name);
        assert_eq!(
            out.lines("cpuid"),
            vec![
                "cpuid 0x40000000: eax=0x40000001 ebx=0x4b4d564b ecx=0x564b4d56 edx=0x4d",
                // KVM_FEATURE_PV_UNHALT (7) | KVM_FEATURE_PV_SCHED_YIELD (13)
                "cpuid 0x40000001: eax=0x2080 edx=0x0",
            ],
            "{}",
            b.name
        );
        assert_eq!(
            out.lines("clock pairing"),
            vec!["clock pairing: ret=0x0 tsc between rdtsc before and after: true"],
            "{}",
            b.name
        );
    }
}
