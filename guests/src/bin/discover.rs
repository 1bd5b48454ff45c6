//! Discovery: lists the host's custom hypercalls with `VMCALL_HC_LIST` and prints
//! `count=N`, `small ret=R` (an array one entry short: -KVM_E2BIG unless there are none),
//! one `hc nr=NR name=NAME` per entry, and `wild ret=R` (an array outside RAM: -KVM_EFAULT).
#![no_std]
#![no_main]

use vmcall_guest::abi::hc;
use vmcall_guest::fmt::Dec;
use vmcall_guest::{
    hypercall2, hypercall_count, list_hypercalls, println, BootInfo, HypercallInfo,
};

vmcall_guest::entry!(main);

const MAX: usize = 16;

fn main(info: &'static BootInfo) -> i32 {
    if info.vcpu_id != 0 {
        return 0;
    }
    let count = hypercall_count();
    println!("count={}", Dec(count));
    let mut buf = [HypercallInfo::default(); MAX];
    let short = (count.max(1) as usize - 1).min(MAX);
    println!("small ret={}", Dec(list_hypercalls(&mut buf[..short])));
    let got = list_hypercalls(&mut buf);
    for info in buf.iter().take(got.max(0) as usize) {
        println!("hc nr={} name={}", Dec(info.nr as i64), info.name());
    }
    println!("wild ret={}", Dec(hypercall2(hc::VMCALL_HC_LIST, 0xffff_ffff_f000, 32 * MAX as u64)));
    0
}
