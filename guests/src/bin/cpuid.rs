//! CPUID guest: prints the KVM leaves a guest uses to find its hypervisor and its PV features,
//! and the TSC that KVM_HC_CLOCK_PAIRING pairs with the wall clock, checked against RDTSC.
#![no_std]
#![no_main]

use core::arch::x86_64::{__cpuid, _rdtsc};
use vmcall_guest::fmt::Hex;
use vmcall_guest::{hypercall2, println, BootInfo};

vmcall_guest::entry!(main);

/// Where KVM_HC_CLOCK_PAIRING writes `struct kvm_clock_pairing`.
static mut PAIRING: [u64; 8] = [0; 8];

fn main(_: &'static BootInfo) -> i32 {
    let (sig, features) = (__cpuid(0x4000_0000), __cpuid(0x4000_0001));
    println!("cpuid 0x40000000: eax={} ebx={} ecx={} edx={}", Hex(sig.eax.into()), Hex(sig.ebx.into()), Hex(sig.ecx.into()), Hex(sig.edx.into()));
    println!("cpuid 0x40000001: eax={} edx={}", Hex(features.eax.into()), Hex(features.edx.into()));
    let pairing = core::ptr::addr_of_mut!(PAIRING);
    // SAFETY: RDTSC is available on every x86-64 CPU and has no memory effects.
    let before = unsafe { _rdtsc() };
    let ret = hypercall2(vmcall_guest::hc::KVM_HC_CLOCK_PAIRING, pairing as u64, 0);
    // SAFETY: as above.
    let after = unsafe { _rdtsc() };
    // SAFETY: single-threaded guest; the host wrote the struct during the call.
    let tsc = unsafe { core::ptr::read_volatile(pairing) }[2];
    println!("clock pairing: ret={} tsc between rdtsc before and after: {}", Hex(ret as u64), before <= tsc && tsc <= after);
    0
}
