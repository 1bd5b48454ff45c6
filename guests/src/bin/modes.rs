//! Mode guest: hypercalls from 32-bit compatibility mode (truncation of number, arguments and
//! result), then from CPL 3 (every call gets -KVM_EPERM). Prints `compat <insn> nr=.. a0=..
//! rax=..` lines, then `cpl3 <insn> nr=.. ret=..` lines, and exits with status 0 from CPL 3.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use vmcall_guest::abi::selectors::{USER_CS, USER_DS};
use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{exit, hypercall1, println, set_use_vmmcall, BootInfo};

vmcall_guest::entry!(main);

// compat_hypercall(nr: rdi, a0: rsi, use_vmmcall: rdx) -> full 64-bit RAX after returning to
// 64-bit mode. Enters a 32-bit code segment (KERNEL_CS32 = 0x30) with a far return, makes the
// call there, and far-jumps back to the 64-bit segment (0x08).
global_asm!(
    ".section .text.compat, \"ax\"",
    ".global compat_hypercall",
    "compat_hypercall:",
    "push %rbx",
    "mov %rdi, %rax",
    "mov %rsi, %rbx",
    "test %rdx, %rdx",
    "jnz 5f",
    "pushq $0x30",
    "lea 1f(%rip), %rcx",
    "push %rcx",
    "lretq",
    "5:",
    "pushq $0x30",
    "lea 3f(%rip), %rcx",
    "push %rcx",
    "lretq",
    ".code32",
    "1: vmcall",
    "ljmp $0x08, $2f",
    "3: vmmcall",
    "ljmp $0x08, $2f",
    ".code64",
    "2: pop %rbx",
    "ret",
    options(att_syntax)
);

extern "C" {
    fn compat_hypercall(nr: u64, a0: u64, use_vmmcall: u64) -> u64;
}

/// Numbers and first arguments with garbage in their upper halves.
const COMPAT_CALLS: [(u64, u64); 3] = [
    (0xdead_0000_0000_0014, 0x1_0000_0002), // nr 20 (echo) sees a0 = 2
    (0xdead_0000_0000_0015, 0),             // nr 21 returns 0xffff_ffff_ffff_fffe, truncated
    (0xdead_0000_0000_0999, 0),             // unknown: -KVM_ENOSYS as 0xffff_fc18
];

fn main(_: &'static BootInfo) -> i32 {
    for (name, amd) in [("vmcall", 0u64), ("vmmcall", 1)] {
        for (nr, a0) in COMPAT_CALLS {
            // SAFETY: compat_hypercall follows the C ABI and restores RBX.
            let rax = unsafe { compat_hypercall(nr, a0, amd) };
            println!("compat {name} nr={} a0={} rax={}", Hex(nr), Hex(a0), Hex(rax));
        }
    }
    enter_user_mode()
}

const USER_STACK_SIZE: usize = 16 * 1024;
#[repr(align(16))]
struct Stack([u8; USER_STACK_SIZE]);
static mut USER_STACK: Stack = Stack([0; USER_STACK_SIZE]);

fn enter_user_mode() -> ! {
    let top = core::ptr::addr_of_mut!(USER_STACK) as u64 + USER_STACK_SIZE as u64;
    // SAFETY: an iretq frame to CPL 3 code on its own stack; user_main never returns.
    unsafe {
        asm!(
            "push {ss}", "push {rsp3}", "push 0x2", "push {cs}", "push {rip}", "iretq",
            ss = in(reg) u64::from(USER_DS),
            rsp3 = in(reg) top,
            cs = in(reg) u64::from(USER_CS),
            rip = in(reg) user_main as usize as u64,
            options(noreturn)
        )
    }
}

extern "C" fn user_main() -> ! {
    for (name, amd) in [("vmcall", false), ("vmmcall", true)] {
        set_use_vmmcall(amd);
        for nr in [1u64, 20, 999] {
            let r = hypercall1(nr, 5);
            println!("cpl3 {name} nr={} ret={}", Dec(nr as i64), Dec(r));
        }
    }
    println!("done");
    exit(0)
}
