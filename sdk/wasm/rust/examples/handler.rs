//! The test handler of tests/wasm/ (handler.wat, handler.c) in Rust: hypercall 20 with an
//! operation in a0 — 0 count, 1 sum a2 bytes at guest-physical a1, 2 the same at guest-virtual
//! a1, 3 write "wasm says hi" at guest-virtual a1, 4 trap, 5 loop forever, 6 grow memory past
//! the cap, other -KVM_ENOSYS.
//!
//! cargo build --release --target wasm32-unknown-unknown --example handler
//! vmcall run GUEST --hypercall 20=wasm:target/wasm32-unknown-unknown/release/examples/handler.wasm
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use vmcall_wasm_sdk::{
    errno, handler, log, memory_grow, read_phys, read_virt, trap, write_virt, Call, Errno, Fault,
    HcResult,
};

static COUNT: AtomicU64 = AtomicU64::new(0);
static mut BUF: [u8; 4096] = [0; 4096];

/// The sum of `len` (at most 4096) bytes at `at`, read with `read`.
fn sum(read: fn(u64, &mut [u8]) -> Result<(), Fault>, at: u64, len: u64) -> HcResult {
    // SAFETY: calls run one at a time, so BUF has one user.
    let buf = unsafe { &mut *core::ptr::addr_of_mut!(BUF) };
    let buf = &mut buf[..len.min(4096) as usize];
    read(at, buf)?;
    Ok(buf.iter().map(|b| u64::from(*b)).sum())
}

fn handle(c: &Call) -> HcResult {
    let [op, a1, a2, _] = c.args;
    match op {
        0 => {
            if COUNT.load(Ordering::Relaxed) == 0 {
                log("handler.rs: first call");
            }
            Ok(COUNT.fetch_add(1, Ordering::Relaxed) + 1)
        }
        1 => sum(read_phys, a1, a2),
        2 => sum(read_virt, a1, a2),
        3 => {
            let hi = b"wasm says hi";
            let n = a2.min(hi.len() as u64) as usize;
            write_virt(a1, &hi[..n])?;
            Ok(n as u64)
        }
        4 => trap(),
        5 => loop {
            core::hint::spin_loop()
        },
        6 => Ok(memory_grow(1000) as u64),
        _ => Err(Errno(errno::KVM_ENOSYS)),
    }
}

handler!(handle);
