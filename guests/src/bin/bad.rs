//! Misbehaving guest: the command line picks the misdeed (null, ud2, divide, wild-write, loop,
//! triple, panic, stray-exit, spray, calls-then-null: hypercall 20 with a0 = 1, 2, 3, then a
//! null read). The host must report each clearly and survive.
#![no_std]
#![no_main]

use core::arch::asm;
use vmcall_guest::{cmdline, println, BootInfo};

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    let what = cmdline(info);
    println!("bad guest: {what}");
    // SAFETY: none of this is safe; misbehaving is the point, and the host must contain it.
    unsafe {
        match what {
            "calls-then-null" => {
                for i in 1..=3 {
                    vmcall_guest::hypercall1(20, i);
                }
                let v = core::ptr::read_volatile(core::ptr::null::<u64>());
                println!("read {}", v as u8);
            }
            "null" => {
                let v = core::ptr::read_volatile(core::ptr::null::<u64>());
                println!("read {}", v as u8);
            }
            "ud2" => asm!("ud2"),
            "divide" => asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("eax") _, out("edx") _, out("ecx") _),
            "wild-write" => {
                let beyond = info.ram_size + 0x1000;
                core::ptr::write_volatile(beyond as *mut u64, 1);
            }
            "loop" => loop {
                asm!("pause");
            },
            "triple" => {
                let zero = [0u64; 2];
                // No IDT: the page fault cannot be delivered, nor the #DF after it.
                asm!("lidt [{}]", "mov rax, [0]", in(reg) zero.as_ptr(), out("rax") _);
            }
            "panic" => panic!("on purpose"),
            // A byte of 0 to the exit port: not the SDK's exit(0), so it must not end the run
            // with status 0.
            "stray-exit" => vmcall_guest::outb(vmcall_guest::abi::ports::PORT_EXIT, 0),
            // What a crashing kernel or a probe loop does: a byte of 0 to every port, in order;
            // the exit port comes after 0xf8 others.
            "spray" => {
                for port in 0..=u16::MAX {
                    vmcall_guest::outb(port, 0);
                }
            }
            _ => return 2,
        }
    }
    println!("survived {what}");
    1
}
