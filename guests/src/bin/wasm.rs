//! WebAssembly handler guest: hypercall 20 with an operation in a0, as the test handlers in
//! tests/wasm/ (`handler.wat`, and `handler.c` built with clang) answer it:
//! 0 counts (state kept in the instance), 1 sums a2 bytes at guest-physical a1, 2 the same at
//! guest-virtual a1, 3 writes "wasm says hi" at guest-virtual a1 (at most a2 bytes), 4 traps,
//! 5 loops forever (the time budget stops it), 6 grows memory past the cap, other: -1000.
//! The command line word `nospin` leaves out operation 5.
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, hypercall3, println, BootInfo};

vmcall_guest::entry!(main);

const NR: u64 = 20;
static TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog";
static mut OUT: [u8; 32] = [0; 32];

fn op(op: u64, a1: u64, a2: u64) -> i64 {
    hypercall3(NR, op, a1, a2)
}

fn main(info: &'static BootInfo) -> i32 {
    let spin = !cmdline(info).split_whitespace().any(|w| w == "nospin");
    let (c1, c2, c3) = (op(0, 0, 0), op(0, 0, 0), op(0, 0, 0));
    println!("wasm count={},{},{}", Dec(c1), Dec(c2), Dec(c3));
    let want: i64 = TEXT.iter().map(|b| i64::from(*b)).sum();
    let at = TEXT.as_ptr() as u64;
    let len = TEXT.len() as u64;
    println!("wasm phys sum={} want={}", Dec(op(1, at, len)), Dec(want));
    println!("wasm virt sum={} want={}", Dec(op(2, at, len)), Dec(want));
    println!(
        "wasm wild phys={} virt={}",
        Dec(op(1, info.ram_size - 4, 8)),
        Dec(op(2, 0xffff_8000_0000_0000, 8))
    );
    let out = core::ptr::addr_of_mut!(OUT) as *mut u8;
    let n = op(3, out as u64, 32);
    let mut text = [0u8; 32];
    for (i, t) in text.iter_mut().enumerate() {
        // SAFETY: OUT is this guest's own static; the host wrote it during the hypercall.
        *t = unsafe { out.add(i).read_volatile() };
    }
    let text = core::str::from_utf8(&text[..n.clamp(0, 32) as usize]).unwrap_or("<not utf-8>");
    println!("wasm write ret={} text={}", Dec(n), text);
    println!("wasm trap={}", Dec(op(4, 0, 0)));
    if spin {
        println!("wasm spin={}", Dec(op(5, 0, 0)));
    }
    println!("wasm grow={}", Dec(op(6, 0, 0)));
    println!("wasm unknown={}", Dec(op(99, 0, 0)));
    println!("wasm count after={}", Dec(op(0, 0, 0)));
    0
}
