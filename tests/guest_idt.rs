//! A guest that loads its own IDT, as every kernel does: its hypercalls are still answered by
//! the host (never delivered to its #UD handler), and its real #UD reaches its own handler.

use std::sync::Arc;

use vmcall_conformance::{backends, run_image};
use vmcall_vmm::boot::elf::minimal_elf;
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::vm::RunStatus;

const LOAD: u64 = 0x20_0000;
const HANDLER: usize = 0x800;
const IDT: usize = 0x1000;
const IDTR: usize = 0x2000;

/// The image: code at 0, a #UD handler counting real #UDs in R15 at `HANDLER`, a 32-gate IDT
/// with only #UD present at `IDT`, and the IDTR operand at `IDTR`.
fn own_idt_guest() -> Vec<u8> {
    let mut image = vec![0u8; IDTR + 10];
    let disp = (IDTR as i32 - 7).to_le_bytes();
    let code: Vec<u8> = [
        &[0x0f, 0x01, 0x1d][..],
        &disp,         // lidt [rip + IDTR]
        &[0xe6, 0x80], // out 0x80, al (any exit)
        &[0xb8, 0x77, 0x77, 0, 0],
        &[0x0f, 0x01, 0xc1], // mov eax, 0x7777; vmcall
        &[0x89, 0xc3],       // mov ebx, eax
        &[0x0f, 0x0b],       // ud2: the guest's handler skips it
        &[0xb8, 0x77, 0x77, 0, 0],
        &[0x0f, 0x01, 0xd9], // mov eax, 0x7777; vmmcall
        &[0x01, 0xd8],       // add eax, ebx
        &[0x4c, 0x01, 0xf8], // add rax, r15
        &[0xe7, 0xf8, 0xf4], // out 0xf8, eax; hlt
    ]
    .concat();
    image[..code.len()].copy_from_slice(&code);
    // inc r15; add qword [rsp], 2; iretq
    let handler = [0x49, 0xff, 0xc7, 0x48, 0x83, 0x04, 0x24, 0x02, 0x48, 0xcf];
    image[HANDLER..HANDLER + handler.len()].copy_from_slice(&handler);
    let h = LOAD + HANDLER as u64;
    let gate = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((h & 0xffff_0000) << 32);
    image[IDT + 16 * 6..IDT + 16 * 6 + 8].copy_from_slice(&gate.to_le_bytes());
    image[IDTR..IDTR + 2].copy_from_slice(&(16u16 * 32 - 1).to_le_bytes());
    image[IDTR + 2..IDTR + 10].copy_from_slice(&(LOAD + IDT as u64).to_le_bytes());
    minimal_elf(LOAD, &image)
}

#[test]
fn hypercalls_bypass_the_guests_ud_handler_and_real_ud_reaches_it() {
    for b in backends("hypercalls_bypass_the_guests_ud_handler_and_real_ud_reaches_it") {
        let table = Arc::new(HypercallTable::new());
        table.register(0x7777, "answer", Builtin::Const(42)).unwrap();
        let out = run_image(b.hv.as_ref(), own_idt_guest(), "", table, |v| v);
        // 42 + 42 from the host, + 1 real #UD counted by the guest's own handler.
        out.expect_status(RunStatus::Exited(85), &b.name);
        assert_eq!(out.stats.total_hypercalls(), 2, "{}", b.name);
    }
}
