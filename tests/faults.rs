//! Bad guests and bad images: each gets a clear error and the host survives.

use std::sync::Arc;
use std::time::Duration;

use vmcall_conformance::{backends, guest, run_image, NoVm};
use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::boot::elf::{minimal_elf, ElfError};
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::{Blame, BuildError, RunError, RunStatus, VmBuilder};

fn bad(hv: &dyn Hypervisor, what: &str) -> vmcall_conformance::Outcome {
    run_image(hv, guest("bad"), what, Arc::new(HypercallTable::new()), |b| {
        b.timeout(Some(Duration::from_secs(3)))
    })
}

#[test]
fn guest_faults_are_reported_with_vector_and_address() {
    for b in backends("guest_faults_are_reported_with_vector_and_address") {
        let hv = b.hv.as_ref();
        for (what, vector) in [("null", 14u8), ("ud2", 6), ("divide", 0), ("wild-write", 14)] {
            let out = bad(hv, what);
            match &out.result {
                Err(e @ RunError::GuestFault { fault, .. }) => {
                    assert_eq!(e.blame(), Blame::Guest, "{}: {what}: {e}", b.name);
                    assert_eq!(fault.vector, vector, "{}: {what}", b.name);
                    if what == "null" {
                        assert_eq!(fault.cr2, Some(0), "{}", b.name);
                    }
                    assert!(fault.rip >= 0x20_0000, "{}: {what} rip {:#x}", b.name, fault.rip);
                }
                other => panic!(
                    "{}: {what}: expected a guest fault, got {other:?}\n{}",
                    b.name, out.console
                ),
            }
            assert!(!out.console.contains("survived"), "{}: {what}", b.name);
        }
    }
}

#[test]
fn endless_loops_time_out_and_triple_faults_stop_the_vm() {
    for b in backends("endless_loops_time_out_and_triple_faults_stop_the_vm") {
        let out = bad(b.hv.as_ref(), "loop");
        assert!(matches!(out.result, Err(RunError::Timeout(_))), "{}: {:?}", b.name, out.result);
        assert_eq!(out.result.as_ref().unwrap_err().blame(), Blame::Timeout);
        let out = bad(b.hv.as_ref(), "triple");
        assert!(
            matches!(out.result, Err(RunError::TripleFault { .. })),
            "{}: {:?}",
            b.name,
            out.result
        );
        assert!(out.result.as_ref().unwrap_err().is_guest_fault(), "{}", b.name);
        let out = bad(b.hv.as_ref(), "panic");
        out.expect_status(RunStatus::Exited(101), &b.name);
        assert!(out.console.contains("guest panic: panicked at"), "{}: {}", b.name, out.console);
    }
}

/// The build error for `image`; bad input is never blamed on the host.
fn build(image: Vec<u8>, f: impl FnOnce(VmBuilder) -> VmBuilder) -> BuildError {
    let e = f(VmBuilder::new(image)).build(&NoVm).expect_err("must be refused");
    assert_eq!(e.is_host_fault(), matches!(e, BuildError::Backend { .. }), "{e}");
    e
}

#[test]
fn bad_images_and_settings_are_refused_clearly() {
    assert!(matches!(build(b"#!/bin/sh\n".to_vec(), |b| b), BuildError::Elf(ElfError::NotElf)));
    let mut arm = minimal_elf(0x20_0000, &[0xf4]);
    arm[18] = 0xb7; // EM_AARCH64
    assert!(matches!(build(arm, |b| b), BuildError::Elf(ElfError::WrongMachine(0xb7))));
    let low = minimal_elf(0x1000, &[0xf4]);
    let e = build(low, |b| b);
    assert!(e.to_string().contains("invalid guest ELF"), "{e}");
    assert!(matches!(e, BuildError::Elf(ElfError::OutsideRam { .. })));
    let high = minimal_elf((32 << 20) - 0x8000, &[0xf4; 16]); // inside vCPU 0's stack
    assert!(
        matches!(build(high, |b| b), BuildError::Elf(ElfError::OutsideRam { .. })),
        "stack area"
    );
    let ok = minimal_elf(0x20_0000, &[0xf4]);
    assert!(matches!(build(ok.clone(), |b| b.vcpus(0)), BuildError::VcpuCount(0)));
    assert!(matches!(build(ok.clone(), |b| b.vcpus(65)), BuildError::VcpuCount(65)));
    assert!(matches!(build(ok.clone(), |b| b.memory(3 << 20)), BuildError::Ram(_)));
    assert!(matches!(
        build(ok.clone(), |b| b.cmdline(vec![b'x'; 5000])),
        BuildError::CmdlineTooLong(5000)
    ));
    assert!(
        matches!(build(ok, |b| b), BuildError::Backend { .. }),
        "valid input reaches the backend"
    );
}

/// A byte of 0 to the exit port — alone, or as one of a stray write to every port — ends the
/// run with an error naming it, never with status 0 (docs/guest-abi.md, "How a run ends").
/// A spray reaches QEMU's isa-debug-exit at 0xf4 first, which ends the run as QEMU does, with
/// status (0 << 1) | 1 = 1: not success either.
#[test]
fn stray_writes_to_the_exit_port_are_errors_not_a_status() {
    for b in backends("stray_writes_to_the_exit_port_are_errors_not_a_status") {
        for what in ["stray-exit", "spray"] {
            let out = bad(b.hv.as_ref(), what);
            match &out.result {
                Err(e @ RunError::StrayExit { size: 1, data: 0, .. }) => {
                    assert!(e.to_string().contains("only a 4-byte write"), "{e}");
                    assert!(e.is_guest_fault(), "{e}");
                }
                Ok(RunStatus::Exited(1)) if what == "spray" => {}
                other => panic!("{}: {what}: expected a stray exit write, got {other:?}", b.name),
            }
            assert!(!out.console.contains("survived"), "{}: {what}", b.name);
        }
    }
}
