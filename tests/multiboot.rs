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

/// What `multiboot_kernel` prints, in order (the higher-half address line checked apart).
const KERNEL_LINES: [&str; 16] = [
    "multiboot kernel: magic 0x2badb002, command line \"kernel.elf a b\"",
    "fw_cfg: signature QEMU, 0x2 CPUs",
    "local APIC: id 0x0, version 0x14",
    "own GDT and IDT loaded",
    "32-bit static vmcall nr=20 a0=0x32: 0x32",
    "32-bit static vmmcall nr=20 a0=0x33: 0x33",
    "32-bit static vmcall nr=999: 0xfffffc18",
    "32-bit run-time vmcall nr=20 a0=0x34: 0x34",
    "32-bit #UD handler ran 0x0 times",
    "long mode: running in the higher half at 0xffffffff801",
    "64-bit static vmcall nr=20 a0=0x1234567890: 0x1234567890",
    "64-bit static vmmcall nr=20 a0=0x2234567890: 0x2234567890",
    "64-bit static vmcall nr=999: 0xfffffffffffffc18",
    "64-bit run-time vmmcall nr=20 a0=0x65: 0x65",
    "64-bit ud2 reached the kernel's #UD handler, count 0x1",
    "done, exiting through isa-debug-exit ",
];

/// The "bring your own kernel" case: a multiboot ELF32 kernel written for QEMU's `-kernel`
/// (own GDT, IDT and page tables, the higher half, its own switch to long mode, a polled
/// 16550, fw_cfg, the APIC, isa-debug-exit) runs unchanged with no extra flag, gives the same
/// output on every backend, and exits with QEMU's status: (0x10 << 1) | 1.
#[test]
fn a_kernel_written_for_qemu_runs_unchanged_on_every_backend() {
    let mut first: Option<(String, String)> = None;
    for b in backends("a_kernel_written_for_qemu_runs_unchanged_on_every_backend") {
        let out = run_image(b.hv.as_ref(), guest("c-multiboot_kernel"), "a b", table(), |v| {
            v.image_name("kernel.elf").vcpus(2)
        });
        out.expect_status(RunStatus::Exited(33), &b.name);
        let lines: Vec<&str> = out.console.lines().collect();
        assert_eq!(lines.len(), KERNEL_LINES.len(), "{}: {}", b.name, out.console);
        for (got, want) in lines.iter().zip(KERNEL_LINES) {
            assert!(got.starts_with(want), "{}: got {got:?}, want {want:?}", b.name);
        }
        if b.sees_every_call {
            assert_eq!(out.stats.total_hypercalls(), 8, "{}", b.name);
        }
        match &first {
            None => first = Some((b.name.clone(), out.console.clone())),
            Some((name, console)) => {
                assert_eq!(&out.console, console, "{} differs from {name}", b.name)
            }
        }
    }
}

/// A multiboot ELF64 image with its 32-bit entry (as 64-bit kernels are built): loaded by its
/// program headers and entered in 32-bit protected mode all the same.
#[test]
fn an_elf64_multiboot_kernel_starts_in_protected_mode_too() {
    const MAGIC: u32 = 0x1bad_b002;
    let mut code: Vec<u8> =
        [MAGIC, 0, MAGIC.wrapping_neg()].iter().flat_map(|w| w.to_le_bytes()).collect();
    let entry = 0x10_0000 + code.len() as u64;
    code.extend([
        0x3d, 0x02, 0xb0, 0xad, 0x2b, // cmp eax, 0x2badb002
        0x75, 0x0d, // jne bad
        0xb8, 20, 0, 0, 0, // mov eax, 20
        0xbb, 0x77, 0, 0, 0, // mov ebx, 0x77 (as 32-bit code: no REX anywhere)
        0x0f, 0x01, 0xc1, // vmcall
        0xe7, 0xf8, // out 0xf8, eax
        0xf4, // bad: hlt
    ]);
    let mut elf = vmcall_vmm::boot::elf::minimal_elf(0x10_0000, &code);
    elf[24..32].copy_from_slice(&entry.to_le_bytes());
    for b in backends("an_elf64_multiboot_kernel_starts_in_protected_mode_too") {
        let out = run_image(b.hv.as_ref(), elf.clone(), "", table(), |v| v);
        out.expect_status(RunStatus::Exited(0x77), &b.name);
    }
}
