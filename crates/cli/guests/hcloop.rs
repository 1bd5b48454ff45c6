//! A guest that loops calling one hypercall and counts the answers by value — the README's
//! headline scenario. Command line: `N NR A0 [quiet]`: N calls (0: forever) to NR with a0 = A0
//! (defaults 0, 20, 7). Unless `quiet`, prints `hypercall NR(A0) -> V (call #I)` each time the
//! answer changes; after N calls prints `answers calls=N V=COUNT ... other=COUNT` (the eight
//! first distinct values, then `other`) and halts.
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, hypercall1, print, println, BootInfo};

vmcall_guest::entry!(main);

const SLOTS: usize = 8;

fn main(info: &'static BootInfo) -> i32 {
    if info.vcpu_id != 0 {
        return 0;
    }
    let mut words = [""; 4];
    for (slot, w) in words.iter_mut().zip(cmdline(info).split_whitespace()) {
        *slot = w;
    }
    let num = |i: usize, default: u64| words[i].parse().unwrap_or(default);
    let (n, nr, a0) = (num(0, 0), num(1, 20), num(2, 7));
    let quiet = words[3] == "quiet";
    let mut values = [(0i64, 0u64); SLOTS];
    let (mut used, mut other, mut last) = (0usize, 0u64, 0usize);
    let mut i = 0u64;
    while n == 0 || i < n {
        let r = hypercall1(nr, a0);
        i += 1;
        if used > 0 && values[last].0 == r {
            values[last].1 += 1;
            continue;
        }
        if !quiet {
            println!(
                "hypercall {}({}) -> {} (call #{})",
                Dec(nr as i64),
                Dec(a0 as i64),
                Dec(r),
                Dec(i as i64)
            );
        }
        match values[..used].iter().position(|(v, _)| *v == r) {
            Some(k) => last = k,
            None if used < SLOTS => {
                values[used] = (r, 0);
                last = used;
                used += 1;
            }
            None => {
                other += 1;
                continue;
            }
        }
        values[last].1 += 1;
    }
    print!("answers calls={}", Dec(i as i64));
    for (v, count) in &values[..used] {
        print!(" {}={}", Dec(*v), Dec(*count as i64));
    }
    println!(" other={}", Dec(other as i64));
    0
}
