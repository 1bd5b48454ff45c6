//! The instruction decoding that decides which bytes are hypercall sites: the recursive decode
//! that proves sites before the KVM backend rewrites them (`prove_sites`) and the linear sweep
//! for hardware breakpoints (`find_sites`), on random code, roots and bitness. Every site
//! either one reports holds a VMCALL or VMMCALL, inside the code it was given: a wrong answer
//! here would have the host rewrite bytes that are not a hypercall.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_abi::insn::{VMCALL, VMMCALL};
use vmcall_fuzz::{fresh_ram, RAM_SIZE};
use vmcall_kvm::{find_sites, prove_sites};
use vmcall_vmm::boot::elf::{CodeRoot, Segment};
use vmcall_vmm::hypercall::HypercallInsn;

fn bytes_of(insn: HypercallInsn) -> [u8; 3] {
    match insn {
        HypercallInsn::Vmcall => VMCALL,
        HypercallInsn::Vmmcall => VMMCALL,
    }
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let bitness = *u.choose(&[64u32, 32, 16])?;
    let vaddr: u64 = if u.arbitrary()? { 0x20_0000 } else { u.arbitrary::<u64>()? & !0xfff };
    let nroots = u.int_in_range(0..=4)?;
    let root_offsets: Vec<u64> =
        (0..nroots).map(|_| u.int_in_range(0..=0x1100u64)).collect::<Result<_>>()?;
    let code = u.take_rest();
    let paddr = 0x1000u64;
    let len = (code.len() as u64).min(RAM_SIZE - paddr);
    let code = &code[..len as usize];
    let ram = fresh_ram();
    ram.write(paddr, code).expect("inside RAM");
    let seg = Segment { paddr, vaddr, memsz: len, filesz: len, offset: 0, executable: true };
    let roots: Vec<CodeRoot> = root_offsets
        .iter()
        .map(|o| CodeRoot { vaddr: vaddr.wrapping_add(*o), bits: bitness })
        .collect();
    for (gpa, insn) in prove_sites(&ram, &[seg], &roots) {
        assert!(gpa >= paddr && gpa + 3 <= paddr + len, "site {gpa:#x} outside the code");
        let off = (gpa - paddr) as usize;
        assert_eq!(code[off..off + 3], bytes_of(insn), "proven site at {gpa:#x}");
    }
    for (va, insn) in find_sites(code, vaddr) {
        let off = va.wrapping_sub(vaddr) as usize;
        assert!(off + 3 <= code.len(), "swept site {va:#x} outside the code");
        assert_eq!(code[off..off + 3], bytes_of(insn), "swept site at {va:#x}");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
