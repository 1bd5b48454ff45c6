//! The demo guest: a few standard hypercalls and the seed's custom one (nr 20).
#![no_std]
#![no_main]

use vmcall_guest::fmt::Dec;
use vmcall_guest::{hc, hypercall0, hypercall1, hypercall4, println, BootInfo};

vmcall_guest::entry!(main);

fn main(info: &'static BootInfo) -> i32 {
    println!(
        "demo guest: vCPU {}/{}, {} MiB RAM, using {}",
        Dec(info.vcpu_id.into()),
        Dec(info.vcpu_count.into()),
        Dec((info.ram_size >> 20) as i64),
        if vmcall_guest::uses_vmmcall() { "VMMCALL" } else { "VMCALL" }
    );
    let r = hypercall0(hc::KVM_HC_VAPIC_POLL_IRQ);
    println!("KVM_HC_VAPIC_POLL_IRQ      -> {}", Dec(r));
    let r = hypercall0(hc::KVM_HC_MMU_OP);
    println!("KVM_HC_MMU_OP (removed)    -> {}", Dec(r));
    let r = hypercall1(hc::KVM_HC_MY_VMCALL, 41);
    println!("KVM_HC_MY_VMCALL(41)       -> {}", Dec(r));
    let r = hypercall4(21, 1, 2, 3, 4);
    println!("hypercall 21(1, 2, 3, 4)   -> {}", Dec(r));
    let r = hypercall0(0xdead);
    println!("hypercall 0xdead (unknown) -> {}", Dec(r));
    0
}
