//! A batch rewritten mid-flight: vCPU 1 keeps scribbling over the entry array (numbers,
//! arguments, even nested batches) while vCPU 0 submits it again and again. Every batch must
//! still be processed whole, and the host must survive. Needs 2 vCPUs.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, Ordering};
use vmcall_guest::abi::{hc, BatchEntry};
use vmcall_guest::fmt::Dec;
use vmcall_guest::{exit, hypercall_batch, println, BootInfo};

vmcall_guest::entry!(main);

const N: usize = 64;
static mut ENTRIES: [BatchEntry; N] = [BatchEntry { nr: 0, args: [0; 4], ret: 0 }; N];
static DONE: AtomicBool = AtomicBool::new(false);

fn entries() -> *mut BatchEntry {
    core::ptr::addr_of_mut!(ENTRIES) as *mut BatchEntry
}

fn main(info: &'static BootInfo) -> i32 {
    if info.vcpu_id == 1 {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        while !DONE.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % N as u64) as usize;
            let nr = match x % 5 {
                0 => hc::VMCALL_HC_BATCH,
                1 => 20,
                2 => hc::KVM_HC_VAPIC_POLL_IRQ,
                _ => x >> 40,
            };
            // SAFETY: racing with the host on purpose; plain volatile stores of whole words.
            unsafe {
                let e = entries().add(i);
                core::ptr::addr_of_mut!((*e).nr).write_volatile(nr);
                core::ptr::addr_of_mut!((*e).args[0]).write_volatile(x);
            }
        }
        return 0;
    }
    let mut bad = 0;
    for _ in 0..200 {
        // SAFETY: the array is shared with vCPU 1 on purpose; the host copies each entry once.
        let batch = unsafe { core::slice::from_raw_parts_mut(entries(), N) };
        if hypercall_batch(batch) != N as i64 {
            bad += 1;
        }
    }
    DONE.store(true, Ordering::Relaxed);
    println!("batches whole: {} of 200", Dec(200 - bad));
    exit(0)
}
