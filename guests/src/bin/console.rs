//! Console guest: prints N numbered lines (N from the command line) and nothing else — long
//! runs of port writes with no hypercall in between.
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, println, BootInfo};

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    let n: i64 = cmdline(info).trim().parse().unwrap_or(10);
    for i in 0..n {
        println!("line {} of {}: the quick brown fox jumps over the lazy dog", Dec(i), Dec(n));
    }
    0
}
