//! Guests that own their page tables and IDT: exceptions reach the guest's own handlers
//! exactly as the CPU delivers them, hypercall instructions never do, and only an exception
//! the guest cannot take ends the run.

mod common;

use common::*;
use vmcall_vmm::backend::VcpuExit;
use vmcall_vmm::hypercall::HypercallInsn;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::CpuMode;

const RF: u64 = 1 << 16;

#[test]
fn ud_gp_and_pf_reach_the_guests_own_handlers() {
    let m = Machine::new();
    m.record_vector(6, false, Some(2), 0);
    m.record_vector(13, true, Some(2), 0);
    m.record_vector(14, true, Some(10), 1); // on IST1
                                            // A read-only page at 0x80000.
    m.ram.write_u64(PT + 8 * 0x80, 0x80000 | 5).unwrap();
    let mut a = Asm::default();
    let ud = CODE + a.len();
    a.ud2();
    let gp = CODE + a.len();
    a.load_ds(0x1230); // mov ax, 0x1230 (4 bytes); mov ds, ax (2): #GP(0x1230) at the mov ds
    let gp = gp + 4;
    let pf_read = CODE + a.len();
    a.load_rax(0x4000_0000); // not mapped: #PF(0), 10 bytes
    let pf_write = CODE + a.len();
    a.b(&[0x48, 0xa3]).b(&0x80008u64.to_le_bytes()); // mov [0x80008], rax: #PF(P|W)
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);

    let r = record(&m.ram, 6);
    assert_eq!((r.vector, r.count, r.rip, r.cs), (6, 1, ud, u64::from(KERNEL_CS)));
    assert_eq!((r.old_rsp, r.ss), (STACK, u64::from(KERNEL_DS)));
    assert_ne!(r.rflags & RF, 0, "faults push RF = 1");
    assert_eq!(r.rsp, STACK - 40, "same-privilege frame on the interrupted stack");
    assert_eq!(r.handler_cs, u64::from(KERNEL_CS));

    let r = record(&m.ram, 13);
    assert_eq!((r.count, r.error_code, r.rip), (1, 0x1230, gp));

    let r = record(&m.ram, 14);
    assert_eq!(r.count, 2, "both page faults");
    assert_eq!(r.cr2, 0x80008, "the last one's address");
    assert_eq!(r.error_code, 3, "present, write, supervisor");
    assert_eq!(r.rip, pf_write);
    assert_eq!(r.rsp, IST1 - 40, "IST1 stack");
    let _ = pf_read;
}

#[test]
fn a_divide_error_is_delivered_at_the_div() {
    let m = Machine::new();
    m.record_vector(0, false, Some(2), 0);
    let mut a = Asm::default();
    a.b(&[0x31, 0xc9]); // xor ecx, ecx
    let div = CODE + a.len();
    a.b(&[0xf7, 0xf1]).done(); // div ecx
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 0);
    assert_eq!((r.count, r.rip), (1, div));
}

#[test]
fn page_fault_error_code_and_cr2_of_a_read() {
    let m = Machine::new();
    m.record_vector(14, true, Some(10), 0);
    let mut a = Asm::default();
    a.load_rax(0x4000_0000).done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 14);
    assert_eq!((r.count, r.error_code, r.cr2, r.rip), (1, 0, 0x4000_0000, CODE));
}

#[test]
fn a_later_unrelated_fault_is_not_a_double_fault() {
    let m = Machine::new();
    m.record_vector(8, true, None, 0);
    m.record_vector(13, true, Some(2), 0);
    m.record_vector(14, true, Some(10), 0);
    let mut a = Asm::default();
    a.load_ds(0x1230).load_ds(0x1238).load_rax(0x4000_0000).done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    assert_eq!(record(&m.ram, 8).count, 0, "no #DF");
    let gp = record(&m.ram, 13);
    assert_eq!((gp.count, gp.error_code), (2, 0x1238));
    assert_eq!(record(&m.ram, 14).count, 1);
}

#[test]
fn vmcall_at_a_virtual_address_without_a_physical_twin_is_answered() {
    let m = Machine::new();
    m.record_vector(6, false, None, 0);
    // VA 0x5000_0000 -> PA 0x30_0000 through a new page directory and table; there is no
    // RAM at PA 0x5000_0000.
    m.ram.write_u64(PDPT + 8, 0xc000 | 7).unwrap();
    m.ram.write_u64(0xc000 + 8 * 0x80, 0xd000 | 7).unwrap(); // VA 0x5000_0000
    m.ram.write_u64(0xd000, 0x30_0000 | 7).unwrap();
    let mut far = Asm::default();
    far.vmcall().store_rax(RECORDS).done();
    m.code(0x30_0000, &far.0);
    let mut a = Asm::default();
    a.mov_rax(0x77).mov_rbx(0x1234).mov_rcx(0x5000_0000).jmp_rcx();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    assert_eq!(run.calls.len(), 1);
    let c = run.calls[0];
    assert_eq!((c.nr, c.args[0], c.rip, c.cpl), (0x77, 0x1234, 0x5000_0000, 0));
    assert_eq!((c.mode, c.insn), (CpuMode::Long64, HypercallInsn::Vmcall));
    assert_eq!(m.ram.read_u64(RECORDS).unwrap(), 0x1077, "answer in RAX");
    assert_eq!(record(&m.ram, 6).count, 0);
}

#[test]
fn ud2_whose_physical_twin_is_a_vmcall_is_a_ud() {
    let m = Machine::new();
    m.record_vector(6, false, Some(2), 0);
    // VA 0x10_0000 -> PA 0x18_0000, where a UD2 is; PA 0x10_0000 holds a VMCALL.
    m.ram.write_u64(PT + 8 * 0x100, 0x18_0000 | 7).unwrap();
    m.code(0x10_0000, &[0x0f, 0x01, 0xc1]);
    let mut twin = Asm::default();
    twin.ud2().done();
    m.code(0x18_0000, &twin.0);
    let mut a = Asm::default();
    a.mov_rcx(0x10_0000).jmp_rcx();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    assert!(run.calls.is_empty(), "{:?}", run.calls);
    let r = record(&m.ram, 6);
    assert_eq!((r.count, r.rip), (1, 0x10_0000));
}

/// Drop to CPL 3 at `user` with iretq.
fn to_user(a: &mut Asm, user: u64) {
    a.push_imm8(USER_DS as u8);
    a.mov_rax(USER_STACK).push_rax();
    a.push_imm8(2);
    a.push_imm8(USER_CS as u8);
    a.mov_rax(user).push_rax();
    a.iretq();
}

#[test]
fn a_cpl3_gp_reaches_the_cpl0_handler_on_the_tss_rsp0_stack() {
    let m = Machine::new();
    m.record_vector(13, true, None, 0);
    let user = CODE + 0x800;
    let mut u = Asm::default();
    u.mov_rax(0x55).vmcall(); // answered at CPL 3
    let fault = user + u.len();
    u.b(&[0x0f, 0x20, 0xc0]); // mov rax, cr0: #GP(0) at CPL 3
    m.code(user, &u.0);
    let mut a = Asm::default();
    to_user(&mut a, user);
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    assert_eq!(run.calls.len(), 1);
    assert_eq!((run.calls[0].nr, run.calls[0].cpl), (0x55, 3));
    let r = record(&m.ram, 13);
    assert_eq!((r.count, r.error_code, r.rip), (1, 0, fault));
    assert_eq!((r.cs, r.ss, r.old_rsp), (u64::from(USER_CS), u64::from(USER_DS), USER_STACK));
    assert_eq!(r.rsp, RSP0 - 40, "frame on TSS.RSP0");
    assert_eq!(r.handler_cs, u64::from(KERNEL_CS), "handler at CPL 0");
}

#[test]
fn int3_and_int_n_are_delivered_with_the_next_rip() {
    let m = Machine::new();
    m.record_vector(3, false, Some(0), 0);
    m.record_vector(0x80, false, Some(0), 0);
    set_gate64(&m.ram, 3, gate64(HANDLERS + 3 * HANDLER_STRIDE, KERNEL_CS, 0, 0xf, 3));
    let mut a = Asm::default();
    a.b(&[0xcc]);
    let after_int3 = CODE + a.len();
    a.b(&[0xcd, 0x80]);
    let after_int80 = CODE + a.len();
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 3);
    assert_eq!((r.count, r.rip, r.rflags & RF), (1, after_int3, 0));
    let r = record(&m.ram, 0x80);
    assert_eq!((r.count, r.rip), (1, after_int80));
}

#[test]
fn int_n_through_a_dpl0_gate_from_cpl3_is_a_gp() {
    let m = Machine::new();
    m.record_vector(13, true, None, 0);
    m.record_vector(0x80, false, None, 0);
    let user = CODE + 0x800;
    m.code(user, &[0xcd, 0x80]);
    let mut a = Asm::default();
    to_user(&mut a, user);
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 13);
    assert_eq!((r.count, r.error_code, r.rip), (1, 0x80 * 8 + 2, user), "#GP(IDT, vector)");
    assert_eq!(record(&m.ram, 0x80).count, 0);
}

#[test]
fn missing_gates_escalate_to_double_fault_and_triple_fault() {
    // #UD through a zero gate: #GP(6*8+2+EXT) is contributory but #UD is benign, so it is
    // delivered as such; with no #GP gate either, #GP on #GP is a #DF.
    let m = Machine::new();
    m.record_vector(8, true, None, 0);
    let mut a = Asm::default();
    a.ud2();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 8);
    assert_eq!((r.count, r.error_code, r.rip), (1, 0, CODE));

    // A not-present gate (a zero gate is not an interrupt gate: #GP instead).
    let m = Machine::new();
    m.record_vector(11, true, None, 0);
    let g = gate64(HANDLERS, KERNEL_CS, 0, 0xe, 0);
    set_gate64(&m.ram, 6, [g[0] & !(1 << 47), g[1]]);
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let r = record(&m.ram, 11);
    assert_eq!((r.count, r.error_code, r.rip), (1, 6 * 8 + 2 + 1, CODE));
}

#[test]
fn an_empty_idt_is_a_triple_fault() {
    for limit in [0u16, 0xfff] {
        let mut m = Machine::new();
        m.init.sregs.idt.limit = limit;
        let mut a = Asm::default();
        a.ud2();
        m.code(CODE, &a.0);
        let run = m.run();
        assert_eq!(run.exit, VcpuExit::Shutdown { rip: CODE }, "IDT limit {limit:#x}");
    }
    // A page fault with only a #PF gate whose stack is unmapped: #PF on #PF → #DF → none.
    let m = Machine::new();
    m.record_vector(14, true, None, 1);
    m.ram.write_u64(TSS + 0x24, 0x4000_1000).unwrap();
    let mut a = Asm::default();
    a.load_rax(0x4000_0000);
    m.code(CODE, &a.0);
    assert_eq!(m.run().exit, VcpuExit::Shutdown { rip: CODE });
}

#[test]
fn the_vmms_own_idt_reports_faults_as_before() {
    use vmcall_vmm::boot::{setup, BootParams};
    let ram = std::sync::Arc::new(GuestRam::new(4 << 20).unwrap());
    let entry = 0x20_0000;
    let p = BootParams { entry, image_end: entry + 0x1000, vcpus: 1, cmdline: b"", amd: false };
    let init = setup(&ram, &p).unwrap()[0];
    // (code, vector, error code, CR2)
    type Case<'a> = (&'a [u8], u8, Option<u64>, Option<u64>);
    let cases: [Case<'_>; 5] = [
        (&[0x0f, 0x0b], 6, None, None),
        (&[0xcc], 3, None, None),
        (&[0x48, 0xa1, 0, 0, 0, 0, 0, 0, 0, 0], 14, Some(0), Some(0)),
        (&[0x66, 0xb8, 0x30, 0x12, 0x8e, 0xd8], 13, Some(0x1230), None),
        (&[0xcd, 0x80], 13, Some(0x80 * 8 + 2), None),
    ];
    for (code, vector, error_code, cr2) in cases {
        ram.write(entry, code).unwrap();
        let run = run_vcpu(&ram, &init);
        let VcpuExit::Fault(f) = run.exit else { panic!("{vector}: {:?}", run.exit) };
        // The frame's RIP, as the stub reports it on KVM: past `int3`, a trap.
        let rip = match (vector, error_code) {
            (13, Some(0x1230)) => entry + 4,
            (3, _) => entry + 1,
            _ => entry,
        };
        assert_eq!((f.vector, f.error_code, f.cr2, f.rip, f.cs), (vector, error_code, cr2, rip, 8));
    }
}
