//! Kernel-like guest that reads ports as drivers do: COM1's line status and receive buffer,
//! the POST port, 16- and 32-bit reads of a port with nothing behind it, and a serial driver
//! that polls the line status before every byte it sends. Then a hypercall.
//!
//! Each `in` runs with RAX preset to 0x1122334455667788, and the whole RAX is printed: an 8- or
//! 16-bit `in` changes only AL or AX, a 32-bit one zero-extends into RAX, as on the CPU.
#![no_std]
#![no_main]

use core::arch::asm;

use vmcall_guest::abi::ports::COM1;
use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{exit, hypercall1, println, BootInfo};

vmcall_guest::entry!(main);

const PRESET: u64 = 0x1122_3344_5566_7788;
/// COM1's line status register, and its "transmitter holding register empty" and "transmitter
/// empty" bits.
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// COM2's base: no device there, so every read gives all ones.
const EMPTY_PORT: u16 = 0x2f8;

fn in8(port: u16) -> u64 {
    let mut rax = PRESET;
    // SAFETY: a port read changes only AL.
    unsafe { asm!("in al, dx", inout("rax") rax, in("dx") port, options(nomem, nostack)) };
    rax
}

fn in16(port: u16) -> u64 {
    let mut rax = PRESET;
    // SAFETY: a port read changes only AX.
    unsafe { asm!("in ax, dx", inout("rax") rax, in("dx") port, options(nomem, nostack)) };
    rax
}

fn in32(port: u16) -> u64 {
    let mut rax = PRESET;
    // SAFETY: a port read changes only RAX (EAX, zero-extended).
    unsafe { asm!("in eax, dx", inout("rax") rax, in("dx") port, options(nomem, nostack)) };
    rax
}

/// The immediate forms: `in al, imm8` for the POST port.
fn in8_post() -> u64 {
    let mut rax = PRESET;
    // SAFETY: a port read changes only AL.
    unsafe { asm!("in al, 0x80", inout("rax") rax, options(nomem, nostack)) };
    rax
}

/// A polled serial driver, as every kernel has one: wait for THRE before each byte. Returns
/// how many status reads it took (one per byte when the transmitter is always ready).
fn serial_write(s: &str) -> u64 {
    let mut polls = 0;
    for b in s.bytes() {
        for tries in 1.. {
            polls += 1;
            if in8(LSR) as u8 & LSR_THRE != 0 {
                break;
            }
            if tries == 1000 {
                println!("ports driver: COM1 never became ready");
                exit(3);
            }
        }
        // SAFETY: a port write has no effect on guest memory or registers.
        unsafe { asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack)) };
    }
    polls
}

fn main(_: &'static BootInfo) -> i32 {
    let lsr = in8(LSR);
    let ready = lsr as u8 & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT;
    println!("ports lsr: rax={} thre_temt={}", Hex(lsr), ready as u8);
    println!("ports rbr: rax={}", Hex(in8(COM1)));
    println!("ports post: rax={}", Hex(in8_post()));
    println!("ports empty in8: rax={}", Hex(in8(EMPTY_PORT)));
    println!("ports empty in16: rax={}", Hex(in16(EMPTY_PORT)));
    println!("ports empty in32: rax={}", Hex(in32(EMPTY_PORT)));
    let line = "ports driver: written by a polling driver\n";
    let polls = serial_write(line);
    println!("ports driver: bytes={} polls={}", Dec(line.len() as i64), Dec(polls as i64));
    println!("ports hypercall: ret={}", Dec(hypercall1(20, 0x60)));
    println!("ports: done");
    exit(0)
}
