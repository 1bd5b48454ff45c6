//! Density guest (`vmcall bench --density`): one of many small VMs in one process.
//! Command line: `ID CALLS PARK NR`.
//!
//! 1. Calls `PARK` with a0 = ID. The host answers it only when it lets every VM go, so until
//!    then the VM is *idle*: booted, its vCPU thread blocked inside that handler.
//!    The answer must be `ID + 1`.
//! 2. Calls `NR` `CALLS` times with a0 = ID, a1 = i; each answer must be
//!    `ID * 1_000_003 + i` (wrapping), so an answer meant for another VM or another call is
//!    caught.
//! 3. Exits with the number of wrong answers (capped at 255): 0 when every one was right.
#![no_std]
#![no_main]

use vmcall_guest::{cmdline, exit, hypercall1, hypercall2, BootInfo};

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    let mut words = [0u64; 4];
    for (slot, w) in words.iter_mut().zip(cmdline(info).split_whitespace()) {
        *slot = w.parse().unwrap_or(u64::MAX);
    }
    let [id, calls, park, nr] = words;
    let mut wrong = 0u64;
    if hypercall1(park, id) as u64 != id.wrapping_add(1) {
        wrong += 1;
    }
    for i in 0..calls {
        if hypercall2(nr, id, i) as u64 != id.wrapping_mul(1_000_003).wrapping_add(i) {
            wrong += 1;
        }
    }
    exit(wrong.min(255) as u32)
}
