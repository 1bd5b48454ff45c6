//! KVM_HC_KICK_CPU across vCPUs: every vCPU but 0 halts; vCPU 0 kicks each of them awake
//! (a kick that lands before its target halts makes that HLT return at once, as in KVM), and
//! each woken vCPU says so and halts again. When all have halted for good, the run ends.
#![no_std]
#![no_main]

use core::arch::asm;
use vmcall_guest::fmt::Dec;
use vmcall_guest::{hc, hypercall2, println, BootInfo};

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    let me = info.vcpu_id;
    if me == 0 {
        for target in 1..info.vcpu_count {
            let r = hypercall2(hc::KVM_HC_KICK_CPU, 0, u64::from(target));
            println!("kicked {} ret={}", Dec(target.into()), Dec(r));
        }
        // An APIC id with no vCPU behind it: still 0, and nothing happens.
        let r = hypercall2(hc::KVM_HC_KICK_CPU, 0, 1000);
        println!("kicked 1000 ret={}", Dec(r));
    } else {
        // SAFETY: HLT with interrupts off stops this vCPU until KVM_HC_KICK_CPU wakes it.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
        println!("vCPU {} woke", Dec(me.into()));
    }
    0
}
