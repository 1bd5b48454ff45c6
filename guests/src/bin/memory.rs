//! Guest-memory guest: hands guest addresses to the host. Nr 30's handler (registered by the
//! test) reads a u64 at a0, writes it + 1 at a0 + 8 and returns it; wild addresses must come
//! back as -KVM_EFAULT. Also KVM_HC_CLOCK_PAIRING into a buffer and at a wild address.
#![no_std]
#![no_main]

use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{hc, hypercall1, hypercall2, println, BootInfo};

vmcall_guest::entry!(main);

static mut BUF: [u64; 8] = [0; 8];

fn main(info: &'static BootInfo) -> i32 {
    let buf = core::ptr::addr_of_mut!(BUF) as *mut u64;
    // SAFETY: BUF is this guest's own static; the host writes it only during the hypercalls.
    unsafe { buf.write_volatile(0x1234) };
    let r = hypercall1(30, buf as u64);
    // SAFETY: as above.
    let written = unsafe { buf.add(1).read_volatile() };
    println!("handler read={} wrote={}", Hex(r as u64), Hex(written));
    for wild in [info.ram_size - 4, info.ram_size, u64::MAX - 7, 0xffff_8000_0000_0000] {
        println!("handler wild={} ret={}", Hex(wild), Dec(hypercall1(30, wild)));
    }
    let r = hypercall2(hc::KVM_HC_CLOCK_PAIRING, buf as u64, 0);
    // SAFETY: as above; the host wrote struct kvm_clock_pairing (sec first).
    let sec = unsafe { buf.read_volatile() };
    println!("clock ret={} sec_positive={}", Dec(r), sec > 1_600_000_000);
    println!("clock wild ret={}", Dec(hypercall2(hc::KVM_HC_CLOCK_PAIRING, info.ram_size - 8, 0)));
    println!("clock type1 ret={}", Dec(hypercall2(hc::KVM_HC_CLOCK_PAIRING, buf as u64, 1)));
    0
}
