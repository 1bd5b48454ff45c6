//! Call loop: `N NR` on the command line makes N calls `hypercall1(NR, i)` and sorts the answers:
//! a handler tagged t answers `(t << 32) | i`, so a wrong or repeated answer is caught. Prints
//! `calls n=N tag1=.. tag2=.. enosys=.. wrong=..`.
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, errno, hypercall1, println, BootInfo};

vmcall_guest::entry!(main);

fn parse(s: Option<&str>, default: u64) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main(info: &'static BootInfo) -> i32 {
    let mut words = cmdline(info).split_whitespace();
    let n = parse(words.next(), 1000);
    let nr = parse(words.next(), 20);
    let (mut tags, mut enosys, mut wrong) = ([0u64; 4], 0u64, 0u64);
    for i in 0..n {
        let r = hypercall1(nr, i);
        if r == -errno::KVM_ENOSYS {
            enosys += 1;
        } else if (r as u64 & 0xffff_ffff) == i && (1..4).contains(&((r as u64) >> 32)) {
            tags[((r as u64) >> 32) as usize] += 1;
        } else {
            wrong += 1;
        }
    }
    println!(
        "calls n={} tag1={} tag2={} tag3={} enosys={} wrong={}",
        Dec(n as i64),
        Dec(tags[1] as i64),
        Dec(tags[2] as i64),
        Dec(tags[3] as i64),
        Dec(enosys as i64),
        Dec(wrong as i64)
    );
    0
}
