//! Multiboot kernels, as people run them with QEMU's `-kernel`: found by their header, loaded
//! (ELF32 here), entered in 32-bit protected mode with paging off and EAX/EBX as the
//! specification says, their command line "NAME ARGS", their hypercalls from 32-bit protected
//! mode answered with KVM's 32-bit truncation, on every backend.

use std::sync::Arc;

use vmcall_conformance::{backends, guest, run_image};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::{Boot, BuildError, RunStatus, VmBuilder};

fn table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(20, "echo", Builtin::Echo).unwrap();
    t
}

#[test]
fn a_minimal_multiboot_kernel_boots_and_calls_from_protected_mode() {
    for b in backends("a_minimal_multiboot_kernel_boots_and_calls_from_protected_mode") {
        let out = run_image(b.hv.as_ref(), guest("c-multiboot_min"), "a b", table(), |v| {
            v.image_name("kernel.elf")
        });
        out.expect_status(RunStatus::Exited(0), &b.name);
        assert_eq!(
            out.console.lines().collect::<Vec<_>>(),
            [
                "mb magic=0x2badb002 flags&0x24d=0x0000024d mem_lower=0x0000027f cr0.pe=0x00000001 cr0.pg=0x00000000",
                "mb cmdline=kernel.elf a b",
                "mb vmcall nr=20 a0=0x11: 0x00000011",
                "mb vmmcall nr=20 a0=0x12: 0x00000012",
                "mb vmcall nr=999: 0xfffffc18",
            ],
            "{}",
            b.name
        );
        if b.sees_every_call {
            assert_eq!(out.stats.total_hypercalls(), 3, "{}", b.name);
        }
    }
}

#[test]
fn boot_protocol_choice_is_explicit_when_asked() {
    // Forced elf64, a multiboot ELF32 is refused as the wrong class; forced multiboot, an
    // image without a header is refused as such.
    let mb = guest("c-multiboot_min");
    let hv = vmcall_conformance::NoVm;
    let err = VmBuilder::new(mb).boot(Boot::Elf64).build(&hv).unwrap_err();
    assert!(matches!(err, BuildError::Elf(_)), "{err}");
    let err = VmBuilder::new(guest("demo")).boot(Boot::Multiboot).build(&hv).unwrap_err();
    assert!(err.to_string().contains("multiboot"), "{err}");
    let chain = format!("{:?}", err);
    assert!(chain.contains("NoHeader"), "{chain}");
}
