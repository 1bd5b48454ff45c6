//! The fast hypercall path: a site that trapped as a hypercall at CPL 0 becomes `out 0xf5, al;
//! nop` and is answered from the OUT hook, with the KVM rewrite's exactness rules (see
//! `doorbell.rs`): the guest's own `out` to the port elsewhere is a port write, a site the guest
//! overwrote runs the guest's new code, CPL 3 at a rewritten site is still reported as CPL 3, and
//! 32-bit code is reported as such.

mod common;

use common::*;
use vmcall_vmm::backend::VcpuExit;
use vmcall_vmm::hypercall::HypercallInsn;
use vmcall_vmm::x86::CpuMode;

/// A subroutine `<the host's hypercall instruction>; ret`, shared by the calls in these guests
/// (the other vendor's would first be patched into it, as KVM does).
const SUB: u64 = CODE + 0x800;
const DOORBELL: [u8; 3] = [0xe6, 0xf5, 0x90];

/// call rel32 to `target`, from code that will sit at `at`.
fn call(a: &mut Asm, at: u64, target: u64) {
    let next = at + a.len() + 5;
    a.b(&[0xe8]).b(&(target.wrapping_sub(next) as u32).to_le_bytes());
}

/// The host's own hypercall instruction, then `ret`.
fn sub() -> [u8; 4] {
    let [a, b, c] = HypercallInsn::native().bytes();
    [a, b, c, 0xc3]
}

fn bytes_at(m: &Machine, at: u64) -> [u8; 3] {
    let mut b = [0u8; 3];
    m.ram.read(at, &mut b).unwrap();
    b
}

#[test]
fn a_site_that_trapped_is_answered_through_the_doorbell() {
    let m = Machine::new();
    m.code(SUB, &sub());
    let mut a = Asm::default();
    for i in 1..=4u64 {
        a.mov_rax(0x40 + i).mov_rbx(i);
        call(&mut a, CODE, SUB);
        a.store_rax(RECORDS + 8 * i);
    }
    // The guest's own `out 0xf5, al` from another address: an ordinary port write, which the
    // test sink ends the run on.
    a.b(&[0xb0, 0x5a, 0xe6, 0xf5]); // mov al, 0x5a; out 0xf5, al
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(
        matches!(run.exit, VcpuExit::IoOut { port: 0xf5, size: 1, data: 0x5a }),
        "{:?} {:?}",
        run.exit,
        run.calls
    );
    assert_eq!(bytes_at(&m, SUB), DOORBELL, "rewritten after the first call");
    assert_eq!(run.calls.len(), 4, "{:?}", run.calls);
    for (i, c) in run.calls.iter().enumerate() {
        let i = i as u64 + 1;
        assert_eq!((c.nr, c.args[0], c.rip, c.cpl, c.mode), (0x40 + i, i, SUB, 0, CpuMode::Long64));
        assert_eq!(m.ram.read_u64(RECORDS + 8 * i).unwrap(), 0x1040 + i, "answer {i} in RAX");
    }
}

/// A guest that writes new code over a rewritten site runs its new code, and the site is no
/// longer answered as a hypercall.
#[test]
fn a_guest_that_overwrites_a_site_runs_its_new_code() {
    let m = Machine::new();
    m.code(SUB, &sub());
    let mut a = Asm::default();
    a.mov_rax(0x41);
    call(&mut a, CODE, SUB); // traps, then the site is rewritten
    a.store_rax(RECORDS + 8);
    a.mov_rax(0x42);
    call(&mut a, CODE, SUB); // the doorbell
    a.store_rax(RECORDS + 16);
    // mov eax, 0x55; ret; nop; nop  over the site
    a.mov_rax(u64::from_le_bytes([0xb8, 0x55, 0, 0, 0, 0xc3, 0x90, 0x90])).store_rax(SUB);
    a.mov_rax(0x43);
    call(&mut a, CODE, SUB);
    a.store_rax(RECORDS + 24);
    a.done();
    m.code(CODE, &a.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { port: 0x80, .. }), "{:?}", run.exit);
    let nrs: Vec<u64> = run.calls.iter().map(|c| c.nr).collect();
    assert_eq!(nrs, [0x41, 0x42], "the new code makes no hypercall");
    let r = |i: u64| m.ram.read_u64(RECORDS + 8 * i).unwrap();
    assert_eq!((r(1), r(2), r(3)), (0x1041, 0x1042, 0x55));
}

/// CPL 3 at a site rewritten by a CPL 0 call is reported as CPL 3 (the VMM answers it
/// -KVM_EPERM), and a site only CPL 3 has executed is never rewritten.
#[test]
fn cpl3_at_a_rewritten_site_is_still_cpl3() {
    const USER_ONLY: u64 = SUB + 0x10;
    let m = Machine::new();
    m.code(SUB, &sub());
    m.code(USER_ONLY, &sub());
    let user = CODE + 0x400;
    let mut a = Asm::default();
    a.mov_rax(0x41);
    call(&mut a, CODE, SUB);
    a.mov_rax(0x42);
    call(&mut a, CODE, SUB);
    // iretq to CPL 3: SS, RSP, RFLAGS, CS, RIP
    a.push_imm8(USER_DS as u8).mov_rax(USER_STACK).push_rax().push_imm8(2);
    a.push_imm8(USER_CS as u8).mov_rax(user).push_rax().iretq();
    m.code(CODE, &a.0);
    let mut u = Asm::default();
    u.mov_rax(0x43);
    call(&mut u, user, SUB);
    u.store_rax(RECORDS + 8);
    u.mov_rax(0x44);
    call(&mut u, user, USER_ONLY);
    u.mov_rax(0x45);
    call(&mut u, user, USER_ONLY);
    u.done();
    m.code(user, &u.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { port: 0x80, .. }), "{:?}", run.exit);
    let seen: Vec<(u64, u64, u8)> = run.calls.iter().map(|c| (c.nr, c.rip, c.cpl)).collect();
    assert_eq!(
        seen,
        [
            (0x41, SUB, 0),
            (0x42, SUB, 0),
            (0x43, SUB, 3),
            (0x44, USER_ONLY, 3),
            (0x45, USER_ONLY, 3)
        ]
    );
    assert_eq!(bytes_at(&m, SUB), DOORBELL);
    assert_eq!(bytes_at(&m, USER_ONLY), HypercallInsn::native().bytes(), "executed at CPL 3 only");
    assert_eq!(m.ram.read_u64(RECORDS + 8).unwrap(), 0x1043);
}

/// In 32-bit protected mode a rewritten site is answered as 32-bit code (the VMM truncates the
/// number and arguments), at the address the guest runs it at.
#[test]
fn a_32_bit_guest_is_answered_as_32_bit_code() {
    let m = Machine::new();
    let sub32 = CODE32 + 0x200;
    m.code(sub32, &sub());
    let mut c = protected_mode(&m);
    for i in 1..=3u32 {
        c.b(&[0xb8]).b(&(0x60 + i).to_le_bytes()); // mov eax, 0x60 + i
        call(&mut c, CODE32, sub32); // e8 rel32 is the same in 32-bit code
        c.b(&[0xa3]).b(&((RECORDS + 8 * u64::from(i)) as u32).to_le_bytes()); // mov [abs], eax
    }
    c.done();
    m.code(CODE32, &c.0);
    let run = m.run();
    assert!(matches!(run.exit, VcpuExit::IoOut { port: 0x80, .. }), "{:?}", run.exit);
    assert_eq!(bytes_at(&m, sub32), DOORBELL);
    assert_eq!(run.calls.len(), 3, "{:?}", run.calls);
    for (i, c) in run.calls.iter().enumerate() {
        let i = i as u64 + 1;
        assert_eq!(
            (c.nr as u32, c.rip, c.mode, c.cpl),
            (0x60 + i as u32, sub32, CpuMode::Protected, 0)
        );
        assert_eq!(c.args[0] as u32, 7, "EBX");
        let mut b = [0u8; 4];
        m.ram.read(RECORDS + 8 * i, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1060 + i as u32);
    }
}

/// With two vCPUs (two engines, each with its own translation cache) a site is never rewritten:
/// unicorn translates an instruction byte by byte, so a vCPU translating it during the rewrite
/// could read a torn instruction. Both vCPUs' calls, at CPL 3 and CPL 0, are answered through
/// the trap.
#[test]
fn with_two_vcpus_sites_keep_trapping_and_every_call_is_answered() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vmcall_emu::EmuHypervisor;
    use vmcall_vmm::backend::{GuestInfo, Hypervisor};

    let m = Machine::new();
    m.code(SUB, &sub());
    // B: to CPL 3, call SUB, stop (the sink ends a run on a port write), call SUB again, stop.
    let b_code = CODE + 0x100;
    let user = CODE + 0x400;
    let mut b = Asm::default();
    b.push_imm8(USER_DS as u8).mov_rax(USER_STACK).push_rax().push_imm8(2);
    b.push_imm8(USER_CS as u8).mov_rax(user).push_rax().iretq();
    m.code(b_code, &b.0);
    let mut u = Asm::default();
    u.mov_rax(0x51);
    call(&mut u, user, SUB);
    u.store_rax(RECORDS + 8);
    // out 0x80, al; jmp +0 (ends the block, so the run resumes after the out)
    u.b(&[0xe6, 0x80, 0xeb, 0x00]);
    u.mov_rax(0x52);
    call(&mut u, user, SUB);
    u.store_rax(RECORDS + 16);
    u.done();
    m.code(user, &u.0);
    // A: call SUB at CPL 0 twice (with one vCPU the trap would rewrite it), stop.
    let mut a = Asm::default();
    a.mov_rax(0x41);
    call(&mut a, CODE, SUB);
    a.mov_rax(0x42);
    call(&mut a, CODE, SUB);
    a.done();
    m.code(CODE, &a.0);

    let info = GuestInfo { vcpus: 2, entry: CODE, ..Default::default() };
    let vm = EmuHypervisor::new().create_vm(m.ram.clone(), &info).unwrap();
    let mut init_b = m.init;
    init_b.regs.rip = b_code;
    init_b.regs.rsp = STACK - 0x1000;
    let mut vb = vm.create_vcpu(1, &init_b).unwrap();
    let mut va = vm.create_vcpu(0, &m.init).unwrap();
    // Both vCPUs are interrupted if the test runs past 20 s.
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, stop) = (done.clone(), [va.interrupter(), vb.interrupter()]);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > Duration::from_secs(20) {
                    stop.iter().for_each(|s| s.interrupt());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut sink = Sink::default();
    let first_b = vb.run(&mut sink).unwrap();
    assert!(matches!(first_b, VcpuExit::IoOut { port: 0x80, .. }), "{first_b:?}");
    assert_eq!(bytes_at(&m, SUB), HypercallInsn::native().bytes(), "CPL 3 rewrites nothing");
    let a_exit = va.run(&mut sink).unwrap();
    assert!(matches!(a_exit, VcpuExit::IoOut { port: 0x80, .. }), "{a_exit:?}");
    assert_eq!(
        bytes_at(&m, SUB),
        HypercallInsn::native().bytes(),
        "with two vCPUs a CPL 0 trap rewrites nothing either"
    );
    let second_b = vb.run(&mut sink).unwrap();
    assert!(matches!(second_b, VcpuExit::IoOut { port: 0x80, .. }), "{second_b:?}");
    let seen: Vec<(u64, u8)> = sink.calls.iter().map(|c| (c.nr, c.cpl)).collect();
    assert_eq!(seen, [(0x51, 3), (0x41, 0), (0x42, 0), (0x52, 3)]);
    assert!(sink.calls.iter().all(|c| c.rip == SUB));
    let r = |i: u64| m.ram.read_u64(RECORDS + 8 * i).unwrap();
    assert_eq!((r(1), r(2)), (0x1051, 0x1052), "both of B's calls answered");
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
}
