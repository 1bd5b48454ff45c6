//! C guests written the Linux way: seed.c uses its own inline `vmcall` at several sites,
//! hello.c the header's `kvm_hypercall0..4`, batch.c the header's `vmcall_hypercall_batch`. All
//! must get KVM's answers and the registered handler's result, on every backend.

use std::sync::Arc;

use vmcall_abi::hc::VMCALL_HC_BATCH;
use vmcall_conformance::{backends, run};
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::RunStatus;

fn table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(20, "my_vmcall", |c: &Call<'_>| Ok(c.args[0] * 2 + 1)).unwrap();
    t.register(21, "weighted", |c: &Call<'_>| {
        Ok(c.args[0] + 10 * c.args[1] + 100 * c.args[2] + 1000 * c.args[3])
    })
    .unwrap();
    t
}

#[test]
fn seed_style_c_guest() {
    for b in backends("seed_style_c_guest") {
        let out = run(b.hv.as_ref(), "c-seed", "", table());
        out.expect_status(RunStatus::Exited(0), &b.name);
        let lines: Vec<&str> = out.console.lines().collect();
        assert_eq!(
            lines,
            ["nr=1 ret=0", "nr=20 arg=41 ret=83", "nr=999 ret=-1000", "cpl3 nr=20 ret=-1"],
            "{}",
            b.name
        );
    }
}

#[test]
fn c_guest_using_kvm_hypercall_n() {
    for b in backends("c_guest_using_kvm_hypercall_n") {
        let out = run(b.hv.as_ref(), "c-hello", "", table());
        out.expect_status(RunStatus::AllHalted, &b.name);
        for want in
            ["nr=1 ret=0", "nr=20 arg=41 ret=83", "nr=999 ret=-1000", "nr=21 arg=1,2,3,4 ret=4321"]
        {
            assert!(
                out.console.lines().any(|l| l == want),
                "{}: no {want:?} in\n{}",
                b.name,
                out.console
            );
        }
    }
}

#[test]
fn c_guest_batches() {
    for b in backends("c_guest_batches") {
        let out = run(b.hv.as_ref(), "c-batch", "", table());
        out.expect_status(RunStatus::AllHalted, &b.name);
        let nested = format!("entry 4 nr={VMCALL_HC_BATCH} ret=-22");
        let lines: Vec<&str> = out.console.lines().collect();
        assert_eq!(
            lines,
            [
                "batch ret=5",
                "entry 0 nr=20 ret=3",
                "entry 1 nr=20 ret=5",
                "entry 2 nr=1 ret=0",
                "entry 3 nr=999 ret=-1000",
                nested.as_str(),
                "toobig ret=-7",
                "wild ret=-14",
            ],
            "{}",
            b.name
        );
    }
}

#[test]
fn c_guest_without_data_whose_image_has_an_empty_segment() {
    let elf = vmcall_conformance::guest("c-nodata");
    let empty_loads = elf_load_sizes(&elf).iter().filter(|memsz| **memsz == 0).count();
    assert!(empty_loads >= 1, "link.ld should give this guest an empty PT_LOAD");
    for b in backends("c_guest_without_data_whose_image_has_an_empty_segment") {
        let out = run(b.hv.as_ref(), "c-nodata", "", table());
        out.expect_status(RunStatus::Exited(7), &b.name);
    }
}

/// p_memsz of each PT_LOAD of a little-endian ELF64 image.
fn elf_load_sizes(elf: &[u8]) -> Vec<u64> {
    let word = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&elf[at..at + n]);
        u64::from_le_bytes(b)
    };
    let (phoff, phnum) = (word(32, 8) as usize, word(56, 2) as usize);
    (0..phnum)
        .map(|i| phoff + 56 * i)
        .filter(|&ph| word(ph, 4) == 1)
        .map(|ph| word(ph + 40, 8))
        .collect()
}
