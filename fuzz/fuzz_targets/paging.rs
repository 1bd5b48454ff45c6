//! The guest page walk on random page tables and paging registers: `translate` either fails
//! or returns an address in the page the tables name, with the rights the access asked for;
//! `VirtualMemory` reads and writes never reach outside guest RAM and a write that fails
//! leaves RAM as it was.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_fuzz::{fill_chunks, fill_tables, fresh_ram, paging, virt_addr, RAM_SIZE};
use vmcall_vmm::x86::mode::CR0_WP;
use vmcall_vmm::x86::paging::{translate, Access, PagingMode};
use vmcall_vmm::x86::VirtualMemory;

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let ram = fresh_ram();
    let ctx = paging(&mut u, &ram)?;
    fill_tables(&mut u, &ram, 64)?;
    fill_chunks(&mut u, &ram, 4)?;
    let mem = VirtualMemory::new(&ram, ctx);
    for _ in 0..u.int_in_range(1..=8)? {
        let va = virt_addr(&mut u)?;
        let access = Access { write: u.arbitrary()?, user: u.arbitrary()? };
        if let Ok(t) = translate(&ram, &ctx, va, access) {
            let size = t.page_size;
            assert!([4 << 10, 2 << 20, 4 << 20, 1 << 30, 1 << 32].contains(&size), "{t:?}");
            let va_in_page = if ctx.mode() == PagingMode::Level4 || ctx.mode() == PagingMode::Level5
            {
                va
            } else {
                va & 0xffff_ffff
            };
            assert_eq!(t.gpa & (size - 1), va_in_page & (size - 1), "{va:#x} -> {t:?}");
            assert!(t.room() >= 1 && t.room() <= size);
            assert!(!access.user || t.user, "user access to a supervisor page: {t:?}");
            if access.write && (access.user || ctx.cr0 & CR0_WP != 0) {
                assert!(t.writable, "write to a read-only page: {t:?}");
            }
        }
        let len = u.int_in_range(0..=9000usize)?;
        let mut buf = vec![0u8; len];
        let _ = mem.read(va, &mut buf);
        if u.arbitrary()? {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8 ^ 0xa5).collect();
            let before = snapshot(&ram);
            if mem.write(va, &bytes).is_err() {
                assert!(snapshot(&ram) == before, "a failed virtual write changed guest RAM");
            }
        }
    }
    Ok(())
}

/// All of guest RAM (small: 2 MiB).
fn snapshot(ram: &vmcall_vmm::memory::GuestRam) -> Vec<u8> {
    let mut all = vec![0u8; RAM_SIZE as usize];
    ram.read(0, &mut all).expect("inside RAM");
    all
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
