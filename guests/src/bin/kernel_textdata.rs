//! Kernel-like guest whose `.text` holds hypercall bytes that are not hypercalls, as hand-written
//! kernel assembly does: an immediate operand that spells VMCALL, a data island after an
//! unconditional jump that holds VMCALL and VMMCALL as data, and a jump table in `.text`. The
//! code must run and read back exactly as written (nothing may rewrite it), and a real
//! hypercall must still be answered.
#![no_std]
#![no_main]

use core::arch::global_asm;

use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{exit, hypercall1, println, BootInfo};

vmcall_guest::entry!(main);

global_asm!(
    ".section .text.kernel_textdata, \"ax\"",
    // mov eax, 0x00c1010f: B8 0F 01 C1 00, the VMCALL bytes as an immediate operand.
    "text_mov_imm:",
    "mov eax, 0x00c1010f",
    "ret",
    "text_mov_imm_end:",
    // Returns the island's address: code, then a data island after an unconditional jump.
    "text_island:",
    "lea rax, [rip + text_island_data]",
    "jmp 2f",
    "text_island_data:",
    ".byte 0x0f, 0x01, 0xc1, 0x0f, 0x01, 0xd9",
    "2:",
    "ret",
    // switch (edi) { case 0..=3: ...; default: ... } through a table of 32-bit offsets in .text.
    "text_switch:",
    "cmp edi, 3",
    "ja 7f",
    "lea rcx, [rip + 8f]",
    "movsxd rax, dword ptr [rcx + 4*rdi]",
    "add rax, rcx",
    "jmp rax",
    ".p2align 2",
    "8:",
    ".long 3f - 8b",
    ".long 4f - 8b",
    ".long 5f - 8b",
    ".long 6f - 8b",
    "3:",
    "mov eax, 0x0f01c1",
    "ret",
    "4:",
    "mov eax, 0x0f01d9",
    "ret",
    "5:",
    "mov eax, 0xc1",
    "ret",
    "6:",
    "mov eax, 0xd9",
    "ret",
    "7:",
    "mov eax, -1",
    "ret",
    ".global text_symbols",
    ".section .rodata.kernel_textdata, \"a\"",
    ".p2align 3",
    "text_symbols:",
    ".quad text_mov_imm, text_mov_imm_end, text_island_data",
);

extern "C" {
    fn text_mov_imm() -> u32;
    fn text_island() -> *const u8;
    fn text_switch(i: u32) -> u32;
    static text_symbols: [u64; 3];
}

/// `n` bytes at `at`, read as data, as `0f 01 c1 ...`.
struct Bytes(u64, usize);

impl core::fmt::Display for Bytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for i in 0..self.1 {
            // SAFETY: the caller names bytes of this image's .text (readable, identity-mapped).
            let b = unsafe { ((self.0 + i as u64) as *const u8).read_volatile() };
            let digit = |d: u8| (if d < 10 { b'0' + d } else { b'a' + d - 10 }) as char;
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}{}", digit(b >> 4), digit(b & 0xf))?;
        }
        Ok(())
    }
}

fn main(_: &'static BootInfo) -> i32 {
    // SAFETY: the functions above follow the C ABI; text_symbols holds three addresses.
    let (imm, island, symbols) = unsafe { (text_mov_imm(), text_island(), text_symbols) };
    let [mov, mov_end, island_data] = symbols;
    println!("textdata mov_imm: eax={}", Hex(u64::from(imm)));
    println!("textdata mov_imm code: {}", Bytes(mov, (mov_end - mov) as usize));
    println!(
        "textdata island: same={} bytes={}",
        (island as u64 == island_data) as u8,
        Bytes(island as u64, 6)
    );
    for i in 0..5 {
        // SAFETY: as above; any index is fine (out of range takes the default).
        let v = unsafe { text_switch(i) };
        println!("textdata switch {}: eax={}", Dec(i.into()), Hex(u64::from(v)));
    }
    println!("textdata hypercall: ret={}", Dec(hypercall1(20, 0xc1)));
    println!("textdata: done");
    exit(0)
}
