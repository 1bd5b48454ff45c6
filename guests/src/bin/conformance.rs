//! Conformance guest: every standard number (and some others) through VMCALL and VMMCALL at
//! CPL 0 in 64-bit mode, register preservation and the RIP advance. One line per check:
//! `<insn> nr=<nr> ret=<ret>`, `regs <insn> ok|clobbered <mask>`, `rip <insn> ok`.
#![no_std]
#![no_main]

use core::arch::asm;
use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{hypercall4, println, set_use_vmmcall, BootInfo};

vmcall_guest::entry!(main);

const NUMBERS: [u64; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 0x7fff_ffff, u64::MAX];

fn main(_: &'static BootInfo) -> i32 {
    for (name, amd) in [("vmcall", false), ("vmmcall", true)] {
        set_use_vmmcall(amd);
        for nr in NUMBERS {
            // Arguments that are harmless for every standard number: KICK_CPU/SCHED_YIELD target
            // APIC id 0 (this vCPU), CLOCK_PAIRING gets an unsupported clock type, SEND_IPI an
            // empty bitmap, MAP_GPA_RANGE a zero page count.
            let r = hypercall4(nr, 0, 1, 0, 0);
            println!("{name} nr={} ret={}", Hex(nr), Dec(r));
        }
        let clobbered = if amd { regs_check::<true>() } else { regs_check::<false>() };
        if clobbered == 0 {
            println!("regs {name} ok");
        } else {
            println!("regs {name} clobbered {}", Hex(clobbered));
        }
        let rip_ok = if amd { rip_check::<true>() } else { rip_check::<false>() };
        println!("rip {name} {}", if rip_ok { "ok" } else { "bad" });
    }
    println!("done");
    0
}

/// Make a hypercall with every general-purpose register holding a known value and return a
/// bit mask of the registers (other than RAX) that changed.
fn regs_check<const AMD: bool>() -> u64 {
    let mut mask: u64;
    macro_rules! body {
        ($insn:literal) => {
            // SAFETY: saves and restores every callee-saved register it uses; the hypercall
            // (number 1, KVM_HC_VAPIC_POLL_IRQ) changes RAX only.
            unsafe {
                asm!(
                    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
                    "mov rbx, 0x1111111111111101", "mov rcx, 0x2222222222222202",
                    "mov rdx, 0x3333333333333303", "mov rsi, 0x4444444444444404",
                    "mov rdi, 0x5555555555555505", "mov rbp, 0x6666666666666606",
                    "mov r8, 0x7777777777777708", "mov r9, 0x8888888888888809",
                    "mov r10, 0x999999999999990a", "mov r11, 0xaaaaaaaaaaaaaa0b",
                    "mov r12, 0xbbbbbbbbbbbbbb0c", "mov r13, 0xcccccccccccccc0d",
                    "mov r14, 0xdddddddddddddd0e", "mov r15, 0xeeeeeeeeeeeeee0f",
                    "mov eax, 1",
                    $insn,
                    "xor eax, eax",
                    "mov r11, 0x1111111111111101", "cmp rbx, r11", "jz 2f", "or eax, 1", "2:",
                    "mov r11, 0x2222222222222202", "cmp rcx, r11", "jz 2f", "or eax, 2", "2:",
                    "mov r11, 0x3333333333333303", "cmp rdx, r11", "jz 2f", "or eax, 4", "2:",
                    "mov r11, 0x4444444444444404", "cmp rsi, r11", "jz 2f", "or eax, 8", "2:",
                    "mov r11, 0x5555555555555505", "cmp rdi, r11", "jz 2f", "or eax, 16", "2:",
                    "mov r11, 0x6666666666666606", "cmp rbp, r11", "jz 2f", "or eax, 32", "2:",
                    "mov r11, 0x7777777777777708", "cmp r8, r11", "jz 2f", "or eax, 64", "2:",
                    "mov r11, 0x8888888888888809", "cmp r9, r11", "jz 2f", "or eax, 128", "2:",
                    "mov r11, 0x999999999999990a", "cmp r10, r11", "jz 2f", "or eax, 256", "2:",
                    "mov r11, 0xbbbbbbbbbbbbbb0c", "cmp r12, r11", "jz 2f", "or eax, 512", "2:",
                    "mov r11, 0xcccccccccccccc0d", "cmp r13, r11", "jz 2f", "or eax, 1024", "2:",
                    "mov r11, 0xdddddddddddddd0e", "cmp r14, r11", "jz 2f", "or eax, 2048", "2:",
                    "mov r11, 0xeeeeeeeeeeeeee0f", "cmp r15, r11", "jz 2f", "or eax, 4096", "2:",
                    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
                    out("rax") mask, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                    out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                )
            }
        };
    }
    if AMD {
        body!("vmmcall")
    } else {
        body!("vmcall")
    }
    mask
}

/// Whether execution resumes exactly after the 3-byte instruction: a `jmp` that skips a
/// marker follows it; resuming one byte early or late would run the marker or a broken opcode.
fn rip_check<const AMD: bool>() -> bool {
    let ok: u64;
    macro_rules! body {
        ($insn:literal) => {
            // SAFETY: only RAX and RCX change; RBX is saved and restored.
            unsafe {
                asm!(
                    "push rbx", "xor ecx, ecx", "mov eax, 1",
                    $insn,
                    "jmp 3f",
                    "mov ecx, 0xbad",
                    "3:",
                    "cmp ecx, 0", "sete al", "movzx eax, al",
                    "pop rbx",
                    out("rax") ok, out("rcx") _,
                )
            }
        };
    }
    if AMD {
        body!("vmmcall")
    } else {
        body!("vmcall")
    }
    ok == 1
}
