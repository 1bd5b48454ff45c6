//! Benchmark guest. Command line:
//! - `hc N NR`: N hypercalls to NR in a tight loop, then exit(0);
//! - `out N`: the same loop with `out 0x80, al; nop` in place of the 3-byte hypercall, so both
//!   run identical guest instructions (the baseline for one user-space exit);
//! - `kernel N`: N hypercalls to an unknown number, for a host kernel that answers them itself;
//! - `cold NR`: one hypercall, then exit(0);
//! - `batch N SIZE NR`: N batched hypercalls of SIZE calls to NR each (the loop of `hc`, with
//!   the batch's number), then exit(0);
//! - `idle NR`: one hypercall to NR (to say it is up), then spin until the host stops it.
#![no_std]
#![no_main]

use core::arch::asm;
use vmcall_guest::abi::BatchEntry;
use vmcall_guest::{cmdline, exit, hypercall1, uses_vmmcall, BootInfo};

vmcall_guest::entry!(main);

/// An unknown number: -KVM_ENOSYS from any KVM.
const UNKNOWN_NR: u64 = 0x7fff_0000;
const BENCH_PORT: u8 = 0x80;

fn arg(words: &[&str], i: usize, default: u64) -> u64 {
    words.get(i).and_then(|w| w.parse().ok()).unwrap_or(default)
}

fn hypercall_loop(n: u64, nr: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: a counted loop that only changes RAX and RCX (the counter, also a1).
    unsafe {
        if uses_vmmcall() {
            asm!("2:", "mov rax, {nr}", "vmmcall", "dec rcx", "jnz 2b",
                 nr = in(reg) nr, inout("rcx") n => _, out("rax") _, options(nostack));
        } else {
            asm!("2:", "mov rax, {nr}", "vmcall", "dec rcx", "jnz 2b",
                 nr = in(reg) nr, inout("rcx") n => _, out("rax") _, options(nostack));
        }
    }
}

fn out_loop(n: u64, nr: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: as `hypercall_loop`, with a port write in place of the hypercall.
    unsafe {
        asm!("2:", "mov rax, {nr}", "out {port}, al", "nop", "dec rcx", "jnz 2b",
             nr = in(reg) nr, port = const BENCH_PORT, inout("rcx") n => _, out("rax") _, options(nostack));
    }
}

const MAX_BATCH: usize = 512;
static mut ENTRIES: [BatchEntry; MAX_BATCH] = [BatchEntry { nr: 0, args: [0; 4], ret: 0 }; MAX_BATCH];

fn batch_loop(n: u64, size: usize, nr: u64) {
    let size = size.clamp(1, MAX_BATCH);
    let entries = core::ptr::addr_of_mut!(ENTRIES) as *mut BatchEntry;
    for i in 0..size {
        // SAFETY: i < MAX_BATCH; the static is this guest's own.
        unsafe { entries.add(i).write(BatchEntry { nr, args: [i as u64, 0, 0, 0], ret: 0 }) };
    }
    if n == 0 {
        return;
    }
    // The same loop as `hypercall_loop` (mov rax; hypercall; dec; jnz), with a0 (RBX) and a1
    // (RCX) set once before it: the host writes only RAX and the entries' `ret`. Under a KVM
    // that emulates guest instructions one by one (kvm_pvm, ~1 µs each) a loop through
    // `hypercall_batch` ran 17 instructions a call to `hc`'s 5 and cost twice as much per
    // hypercall; with identical loops a batch of one costs what a single call does.
    // RBX cannot be an asm operand (LLVM reserves it), hence the exchanges; every operand
    // has a fixed register so that none is given RBX's slot by the allocator.
    let hc = vmcall_guest::abi::hc::VMCALL_HC_BATCH;
    // SAFETY: a counted loop over this guest's own static array (the first `size` entries),
    // which only the host writes meanwhile; RBX is restored by the second exchange.
    unsafe {
        if uses_vmmcall() {
            asm!("xchg r9, rbx", "2:", "mov rax, r10", "vmmcall", "dec r8", "jnz 2b",
                 "xchg r9, rbx", inout("r9") entries => _, in("r10") hc, inout("r8") n => _,
                 in("rcx") size, out("rax") _, options(nostack));
        } else {
            asm!("xchg r9, rbx", "2:", "mov rax, r10", "vmcall", "dec r8", "jnz 2b",
                 "xchg r9, rbx", inout("r9") entries => _, in("r10") hc, inout("r8") n => _,
                 in("rcx") size, out("rax") _, options(nostack));
        }
    }
}

fn main(info: &'static BootInfo) -> i32 {
    let mut words = [""; 4];
    for (slot, w) in words.iter_mut().zip(cmdline(info).split_whitespace()) {
        *slot = w;
    }
    match words[0] {
        "hc" => hypercall_loop(arg(&words, 1, 1000), arg(&words, 2, 20)),
        "out" => out_loop(arg(&words, 1, 1000), arg(&words, 2, 20)),
        "kernel" => hypercall_loop(arg(&words, 1, 1000), UNKNOWN_NR),
        "cold" => {
            hypercall1(arg(&words, 1, 20), 0);
        }
        "batch" => batch_loop(arg(&words, 1, 100), arg(&words, 2, 64) as usize, arg(&words, 3, 20)),
        "idle" => {
            hypercall1(arg(&words, 1, 20), 0);
            loop {
                core::hint::spin_loop();
            }
        }
        _ => return 2,
    }
    exit(0)
}
