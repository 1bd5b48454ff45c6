//! What the kernel-like test guests (`kernel_*`) share: their own page tables, their own IDT with
//! a Linux-style exception table, calls that survive an exception, and code written at run time.
//!
//! These guests behave like real kernels rather than like guests written to vmcall's contract:
//! they replace the VMM's page tables and IDT, so the host can no longer assume that a virtual
//! address is a physical one, nor that an exception reaches the VMM's own stubs.
#![no_std]

pub mod code;
pub mod idt;
pub mod paging;

use vmcall_guest::BootInfo;

/// Physical pages the kernel guests put things at whose addresses they print (16 MiB up), so
/// that every line they print is the same on every run and the tests can assert it exactly.
pub const SCRATCH: u64 = 0x0100_0000;
/// How many scratch pages there are.
pub const SCRATCH_PAGES: u64 = 16;

/// Scratch page `n`, zeroed. Panics if the image or the stacks reach into the scratch area.
pub fn scratch_page(info: &BootInfo, n: u64) -> u64 {
    assert!(n < SCRATCH_PAGES, "scratch page {n} out of range");
    assert!(
        info.free_start <= SCRATCH && SCRATCH + SCRATCH_PAGES * 4096 <= info.free_end,
        "the scratch area is not free RAM"
    );
    let page = SCRATCH + n * 4096;
    // SAFETY: the page is free RAM (checked above), identity-mapped in the VMM's tables and in
    // every table this crate builds.
    unsafe { core::ptr::write_bytes(page as *mut u8, 0, 4096) };
    page
}
