//! Kernel-like guest with its own IDT (the VMM's GDT, TSS and page tables stay). In order:
//! hypercalls from static sites and from code written at run time (answered by the host, never
//! delivered to the guest's #UD handler), genuine exceptions caught by the guest's own handlers
//! (#UD, #GP, #PF read and write, #DE, #BP), the hypercalls again, then hypercalls from CPL 3
//! (-1, -KVM_EPERM) and the guest handler's counts, and exit(0) from CPL 3.
//!
//! Lines: `idt <insn> <where>: ret=<n>` for hypercalls (`trapped ...` if an exception reached
//! the guest instead), `idt <fault>: trapped vector=.. err=.. rip=site+..` for the exceptions,
//! `cpl3 ...` from user mode, `idt counts: ...`, `idt: done`.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

use vmcall_guest::abi::selectors::{USER_CS, USER_DS};
use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, exit, println, BootInfo};
use vmcall_guests::code::{write_hypercall_fn, Insn};
use vmcall_guests::idt::{self, guarded_call, Shown};
use vmcall_guests::scratch_page;

vmcall_guest::entry!(main);

/// An address no page table maps (PML4 slot 0x24 is empty in the VMM's tables).
const UNMAPPED: u64 = 0x0000_1234_5678_9000;
/// A non-canonical address: loading from it is a #GP(0).
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

// Functions that fault on purpose, each `fn(RDI, RSI)` like the hypercall sites.
global_asm!(
    ".section .text.kernel_faults, \"ax\"",
    "fault_ud2:",
    "ud2",
    "ret",
    // movabs (10 bytes), then the load that faults: RIP = site + 0xa.
    "fault_gp:",
    "movabs rax, {noncanonical}",
    "mov rax, [rax]",
    "ret",
    "fault_pf_read:",
    "mov rax, [rdi]",
    "ret",
    "fault_pf_write:",
    "mov [rdi], rsi",
    "ret",
    // A trap: the frame's RIP is after the int3 (site + 1).
    "fault_int3:",
    "int3",
    "ret",
    // xor, xor, mov (2 + 2 + 5 bytes), then the division by zero: RIP = site + 9.
    "fault_div:",
    "xor edx, edx",
    "xor ecx, ecx",
    "mov eax, 1",
    "div ecx",
    "ret",
    noncanonical = const NON_CANONICAL,
);

extern "C" {
    fn fault_ud2();
    fn fault_gp();
    fn fault_pf_read();
    fn fault_pf_write();
    fn fault_int3();
    fn fault_div();
}

/// Where run-time code goes: a scratch page (identity-mapped, user-accessible in the VMM's
/// tables, so CPL 3 can run it too).
static mut RUNTIME: u64 = 0;

fn runtime(i: u64) -> u64 {
    // SAFETY: written once in main before anything reads it.
    unsafe { core::ptr::addr_of!(RUNTIME).read() + 32 * i }
}

/// Every hypercall site once: the static ones with a0 = `a0`, and the run-time ones, which carry
/// their own a0 (0x101 and 0x102) as immediates.
fn hypercalls(prefix: &str, a0: u64) {
    for insn in Insn::ALL {
        let r = guarded_call(insn.site(), 20, a0);
        println!("{prefix} {} static: {}", insn.name(), Shown::at(r, insn.site()));
    }
    for (i, insn) in [Insn::Vmcall, Insn::Vmmcall].into_iter().enumerate() {
        let at = runtime(i as u64);
        println!("{prefix} {} runtime: {}", insn.name(), Shown::at(guarded_call(at, 0, 0), at));
    }
}

fn fault(name: &str, f: unsafe extern "C" fn(), rdi: u64, rsi: u64) {
    let site = f as *const () as u64;
    println!("idt {name}: {}", Shown::at(guarded_call(site, rdi, rsi), site));
}

fn main(info: &'static BootInfo) -> i32 {
    let page = scratch_page(info, 0);
    // SAFETY: single vCPU, nothing reads RUNTIME yet.
    unsafe { core::ptr::addr_of_mut!(RUNTIME).write(page) };
    write_hypercall_fn(runtime(0), Insn::Vmcall, 20, 0x101);
    write_hypercall_fn(runtime(1), Insn::Vmmcall, 20, 0x102);
    write_hypercall_fn(runtime(2), Insn::Vmcall, 20, 0x301);
    write_hypercall_fn(runtime(3), Insn::Vmmcall, 20, 0x302);
    idt::install();
    println!("idt: own IDT loaded");
    hypercalls("idt before", 0x100);
    fault("ud2", fault_ud2, 0, 0);
    fault("gp", fault_gp, 0, 0);
    fault("pf read", fault_pf_read, UNMAPPED, 0);
    fault("pf write", fault_pf_write, UNMAPPED + 8, 0);
    fault("div0", fault_div, 0, 0);
    // `no-int3`: for hosts that cannot run INT3 at all (kvm_pvm); the test says so.
    if !cmdline(info).split(' ').any(|w| w == "no-int3") {
        fault("int3", fault_int3, 0, 0);
    }
    hypercalls("idt after", 0x200);
    enter_user_mode()
}

const USER_STACK_SIZE: usize = 16 * 1024;
/// CPL 3's stack (u128: 16-byte aligned).
static mut USER_STACK: [u128; USER_STACK_SIZE / 16] = [0; USER_STACK_SIZE / 16];

fn enter_user_mode() -> ! {
    let top = core::ptr::addr_of_mut!(USER_STACK) as u64 + USER_STACK_SIZE as u64;
    // SAFETY: an iretq frame to CPL 3 code on its own stack (every page is user-accessible in
    // the VMM's tables); user_main never returns.
    unsafe {
        asm!(
            "push {ss}", "push {rsp3}", "push 0x2", "push {cs}", "push {rip}", "iretq",
            ss = in(reg) u64::from(USER_DS),
            rsp3 = in(reg) top,
            cs = in(reg) u64::from(USER_CS),
            rip = in(reg) user_main as *const () as u64,
            options(noreturn)
        )
    }
}

extern "C" fn user_main() -> ! {
    for insn in Insn::ALL {
        let r = guarded_call(insn.site(), 20, 0x300);
        println!("cpl3 {} static: {}", insn.name(), Shown::at(r, insn.site()));
    }
    for (i, insn) in [Insn::Vmcall, Insn::Vmmcall].into_iter().enumerate() {
        let at = runtime(2 + i as u64);
        println!("cpl3 {} runtime: {}", insn.name(), Shown::at(guarded_call(at, 0, 0), at));
    }
    println!(
        "idt counts: de={} bp={} ud={} gp={} pf={} total={}",
        Dec(idt::count(0) as i64),
        Dec(idt::count(3) as i64),
        Dec(idt::count(6) as i64),
        Dec(idt::count(13) as i64),
        Dec(idt::count(14) as i64),
        Dec(idt::total() as i64)
    );
    println!("idt: done");
    exit(0)
}
