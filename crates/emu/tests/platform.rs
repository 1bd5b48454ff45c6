//! What the emulated CPU answers must be what KVM answers: the KVM CPUID leaves, a pairing
//! TSC that agrees with the guest's own RDTSC, #GP for clearing CR4.PAE in long mode, and
//! hypercalls from 32-bit protected mode entered by the guest itself.

mod common;

use common::*;
use vmcall_vmm::backend::VcpuExit;
use vmcall_vmm::x86::CpuMode;

#[test]
fn kvm_cpuid_leaves_are_vmms_definition() {
    let m = Machine::new();
    let mut a = Asm::default();
    for (i, leaf) in [0x4000_0000u32, 0x4000_0001].into_iter().enumerate() {
        a.b(&[0xb8]).b(&leaf.to_le_bytes()).b(&[0x0f, 0xa2]); // mov eax, leaf; cpuid
        a.store_rax(RECORDS + 16 * i as u64);
        a.b(&[0x48, 0x89, 0xd8]).store_rax(RECORDS + 16 * i as u64 + 8); // mov rax, rbx
    }
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    for (i, leaf) in [0x4000_0000u32, 0x4000_0001].into_iter().enumerate() {
        let want = vmcall_vmm::x86::cpuid::PvCpuid::default().leaf(leaf).unwrap();
        let eax = m.ram.read_u64(RECORDS + 16 * i as u64).unwrap() as u32;
        let ebx = m.ram.read_u64(RECORDS + 16 * i as u64 + 8).unwrap() as u32;
        assert_eq!((eax, ebx), (want[0], want[1]), "leaf {leaf:#x}");
    }
}

#[test]
fn the_pairing_tsc_lies_between_the_guests_own_rdtscs() {
    let m = Machine::new();
    let mut a = Asm::default();
    a.rdtsc64().store_rax(RECORDS);
    a.mov_rax(9).vmcall().store_rax(RECORDS + 8); // the test sink answers with the guest TSC
    a.rdtsc64().store_rax(RECORDS + 16);
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let q = |i: u64| m.ram.read_u64(RECORDS + 8 * i).unwrap();
    let (before, pairing, after) = (q(0), q(1), q(2));
    assert!(before != 0 && before <= pairing && pairing <= after, "{before} {pairing} {after}");
}

#[test]
fn clearing_cr4_pae_in_long_mode_is_a_gp_at_the_mov() {
    let m = Machine::new();
    m.record_vector(13, true, Some(3), 0);
    m.record_vector(14, true, None, 0);
    let mut a = Asm::default();
    a.b(&[0x0f, 0x20, 0xe0]); // mov rax, cr4
    a.b(&[0x48, 0x83, 0xe0, 0xdf]); // and rax, ~0x20
    let mov_cr4 = CODE + a.len();
    a.b(&[0x0f, 0x22, 0xe0]); // mov cr4, rax
    a.b(&[0x0f, 0x20, 0xe0]).store_rax(RECORDS); // mov rax, cr4
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?}", run.exit);
    let gp = record(&m.ram, 13);
    assert_eq!((gp.count, gp.error_code, gp.rip, gp.cr2), (1, 0, mov_cr4, 0));
    assert_eq!(record(&m.ram, 14).count, 0, "no #PF");
    assert_eq!(m.ram.read_u64(RECORDS).unwrap(), 0x620, "CR4 unchanged");
}

/// The same code seen through the second 4 MiB page directory entry.
const ALIAS: u64 = 0x40_0000;

/// The guest leaves long mode itself (compat CS, CR0.PG = 0, EFER.LME = 0, its own 32-bit
/// page tables with 4 MiB pages, CR0.PG = 1), makes VMCALLs, then takes a #UD through an
/// 8-byte 32-bit interrupt gate.
#[test]
fn a_guest_that_enters_32_bit_protected_mode_itself() {
    let m = Machine::new();
    let handler = CODE + 0x400;
    m.ram.write_u64(IDT32 + 6 * 8, gate32(handler as u32, CS32, 0xe, 0)).unwrap();
    let alias_code = CODE + 0x300;
    let mut c = protected_mode(&m);
    c.b(&[0xb8, 0x66, 0, 0, 0]); // mov eax, 0x66
    let first = CODE32 + c.len();
    c.vmcall();
    c.b(&[0xa3]).b(&(RECORDS as u32).to_le_bytes()); // mov [RECORDS], eax
    c.b(&[0xb9]).b(&((ALIAS + alias_code) as u32).to_le_bytes()).jmp_rcx(); // jmp ecx
    m.code(CODE32, &c.0);

    let mut d = Asm::default();
    d.b(&[0xb8, 0x67, 0, 0, 0]).vmcall(); // mov eax, 0x67
    let ud = ALIAS + alias_code + d.len();
    d.ud2();
    m.code(alias_code, &d.0);

    let mut h = Asm::default();
    for (i, off) in [0u8, 4, 8].into_iter().enumerate() {
        h.b(&[0x8b, 0x44, 0x24, off]); // mov eax, [esp + off]
        h.b(&[0xa3]).b(&((RECORDS + 8 + 4 * i as u64) as u32).to_le_bytes());
    }
    h.b(&[0x89, 0xe0, 0xa3]).b(&((RECORDS + 20) as u32).to_le_bytes()); // mov eax, esp
    h.done();
    m.code(handler, &h.0);

    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?} {:?}", run.exit, run.calls);
    assert_eq!(run.calls.len(), 2, "{:?}", run.calls);
    let c0 = run.calls[0];
    assert_eq!((c0.nr, c0.mode, c0.rip, c0.cpl), (0x66, CpuMode::Protected, first, 0));
    assert_eq!(c0.args[0] as u32, 7);
    let c1 = run.calls[1];
    assert_eq!((c1.nr as u32, c1.mode, c1.rip), (0x67, CpuMode::Protected, ud - 3));
    assert_eq!(c1.paging.cr3, PD32);
    let q = |off: u64| {
        let mut b = [0u8; 4];
        m.ram.read(RECORDS + off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    assert_eq!(q(0), 0x1066, "the answer in EAX");
    assert_eq!((q(8), q(12)), (ud as u32, u32::from(CS32)), "EIP, CS pushed");
    assert_ne!(q(16) & (1 << 16), 0, "RF pushed for a fault");
    assert_eq!(q(20), (STACK32 - 12) as u32, "3 dwords on the same stack");
}

fn dword(m: &Machine, at: u64) -> u32 {
    let mut b = [0u8; 4];
    m.ram.read(at, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// In 32-bit protected mode, a CPL 3 #GP goes to a CPL 0 handler on the TSS's SS0:ESP0, with
/// the outer SS:ESP pushed.
#[test]
fn a_cpl3_gp_in_protected_mode_switches_to_the_tss_stack() {
    const ESP0: u64 = 0x2_c000;
    const USER_ESP: u64 = 0x2_e000;
    const USER_CS32: u16 = 0x1b;
    let m = Machine::new();
    m.ram.write_u64(GDT + 0x18, 0x00cf_fa00_0000_ffff).unwrap(); // 32-bit code, DPL 3
                                                                 // The 32-bit view of the TSS: ESP0 at +4, SS0 at +8.
    m.ram.write(TSS + 4, &(ESP0 as u32).to_le_bytes()).unwrap();
    m.ram.write(TSS + 8, &u32::from(DS32).to_le_bytes()).unwrap();
    let handler = CODE + 0x400;
    m.ram.write_u64(IDT32 + 13 * 8, gate32(handler as u32, CS32, 0xe, 0)).unwrap();
    let user = CODE + 0x300;
    let mut c = protected_mode(&m);
    c.push_imm8(USER_DS as u8).b(&[0x68]).b(&(USER_ESP as u32).to_le_bytes()); // SS, ESP
    c.push_imm8(2).push_imm8(USER_CS32 as u8).b(&[0x68]).b(&(user as u32).to_le_bytes());
    c.b(&[0xcf]); // iretd to CPL 3
    m.code(CODE32, &c.0);
    let mut u = Asm::default();
    u.b(&[0xb8, 0x68, 0, 0, 0]).vmcall(); // answered at CPL 3
    let fault = user + u.len();
    u.b(&[0x0f, 0x20, 0xc0]); // mov eax, cr0: #GP(0)
    m.code(user, &u.0);
    let mut h = Asm::default();
    for i in 0..6u8 {
        h.b(&[0x8b, 0x44, 0x24, 4 * i]); // mov eax, [esp + 4i]
        h.b(&[0xa3]).b(&((RECORDS + 4 * u64::from(i)) as u32).to_le_bytes());
    }
    h.b(&[0x89, 0xe0, 0xa3]).b(&((RECORDS + 24) as u32).to_le_bytes()); // mov eax, esp
    h.b(&[0x8c, 0xc8, 0xa3]).b(&((RECORDS + 28) as u32).to_le_bytes()); // mov eax, cs
    h.b(&[0x8c, 0xd0, 0xa3]).b(&((RECORDS + 32) as u32).to_le_bytes()); // mov eax, ss
    h.done();
    m.code(handler, &h.0);

    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { .. }), "{:?} {:?}", run.exit, run.calls);
    assert_eq!(run.calls.len(), 1);
    let c = run.calls[0];
    assert_eq!((c.nr as u32, c.cpl, c.mode), (0x68, 3, CpuMode::Protected));
    let q = |i: u64| dword(&m, RECORDS + 4 * i);
    assert_eq!((q(0), q(1), q(2)), (0, fault as u32, u32::from(USER_CS32)), "err, EIP, CS");
    assert_eq!((q(4), q(5)), (USER_ESP as u32, u32::from(USER_DS)), "outer ESP, SS");
    assert_eq!(q(6), (ESP0 - 24) as u32, "six dwords on the TSS stack");
    assert_eq!((q(7), q(8)), (u32::from(CS32), u32::from(DS32)), "handler CS, SS at CPL 0");
}
