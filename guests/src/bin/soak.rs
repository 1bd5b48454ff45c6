//! Soak guest: every vCPU makes `N` calls of hypercall 20, one at a time and in batches of 16
//! (`N` from the command line, default 100000), and checks each answer: a handler tagged t
//! answers `(t << 32) | a0` with t in 1..=3 while the host swaps them. Each vCPU then prints
//! `soak vcpu=V single=S batches=B entries=E wrong=W`, which the host compares with what it
//! answered: a call lost or answered twice shows up there.
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{cmdline, hypercall1, hypercall_batch, println, BatchEntry, BootInfo};

vmcall_guest::entry!(main);

const BATCH: usize = 16;

fn answer_ok(r: u64, a0: u64) -> bool {
    (r & 0xffff_ffff) == a0 & 0xffff_ffff && (1..=3).contains(&(r >> 32))
}

fn main(info: &'static BootInfo) -> i32 {
    let n: u64 = cmdline(info).trim().parse().unwrap_or(100_000);
    let base = u64::from(info.vcpu_id) << 24;
    let (mut single, mut batches, mut entries, mut wrong) = (0u64, 0u64, 0u64, 0u64);
    let mut i = 0u64;
    while i < n {
        if i % 64 == 63 && n - i >= BATCH as u64 {
            let mut calls = [BatchEntry::default(); BATCH];
            for (k, c) in calls.iter_mut().enumerate() {
                *c = BatchEntry { nr: 20, args: [base + i + k as u64, 0, 0, 0], ret: 0 };
            }
            let done = hypercall_batch(&mut calls);
            batches += 1;
            entries += done.max(0) as u64;
            wrong += (BATCH as u64).saturating_sub(done.max(0) as u64);
            wrong += calls.iter().filter(|c| !answer_ok(c.ret, c.args[0])).count() as u64;
            i += BATCH as u64;
        } else {
            let r = hypercall1(20, base + i) as u64;
            single += 1;
            wrong += u64::from(!answer_ok(r, base + i));
            i += 1;
        }
    }
    println!(
        "soak vcpu={} single={} batches={} entries={} wrong={}",
        Dec(i64::from(info.vcpu_id)),
        Dec(single as i64),
        Dec(batches as i64),
        Dec(entries as i64),
        Dec(wrong as i64)
    );
    0
}
