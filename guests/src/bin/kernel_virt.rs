//! Kernel-like guest with its own 4-level page tables, in which virtual and physical addresses
//! part ways. The command line picks the case:
//!
//! - `alias`: identity-maps all RAM (as the VMM does) plus an alias of the whole loaded image at
//!   `0x400_0000_0000 + PA` in 4 KiB pages, and a page of code written at run time mapped at
//!   `0x500_0000_0000`. Calls the static hypercall sites (the SDK's and both instructions
//!   forced) at their identity address and through the alias, then the run-time functions at
//!   the high address. Every call is nr 20 (the test's echo): `ret=7`, and `ret=9` from the
//!   run-time code.
//! - `twin`: also installs its own IDT. Physical page P1 holds `vmcall; ret`, P2 `ud2; ret`
//!   (and `vmmcall; ret` / `ud2; ret` 16 bytes in). After calling each at its identity
//!   address, it swaps the two pages' mappings (VA P1 -> PA P2, VA P2 -> PA P1) and flushes the
//!   TLB: the call to VA P1 must reach the guest's own #UD handler (vector 6, RIP = P1), the
//!   call to VA P2 must be answered as a hypercall.
//! - `virtptr`: passes guest-virtual pointers to hypercall 0x30 (the test's handler sums the
//!   a1 bytes at virtual a0): strings in pages mapped only at high addresses (one within a
//!   page, one across two pages whose physical frames are in reverse order), an identity-mapped
//!   string, an unmapped address and a range running into an unmapped page (both -14).
//!
//! Lines are `<case> <what>: <result>`; the last one is `<case>: done`, then exit(0).
#![no_std]
#![no_main]

use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{cmdline, exit, hypercall2, println, BootInfo};
use vmcall_guests::code::{write_code, write_hypercall_fn, Insn};
use vmcall_guests::idt::{self, guarded_call, Shown};
use vmcall_guests::paging::{flush_tlb, Frames, PageTables, KERNEL};
use vmcall_guests::scratch_page;

vmcall_guest::entry!(main);

/// The image's alias: VA = ALIAS + PA.
const ALIAS: u64 = 0x0000_0400_0000_0000;
/// Where the run-time code page is mapped.
const RUNTIME_VA: u64 = 0x0000_0500_0000_0000;
/// Where the strings of `virtptr` are mapped (and nowhere else).
const STRINGS_VA: u64 = 0x0000_0600_0000_0000;
/// Nothing is mapped here.
const UNMAPPED_VA: u64 = 0x0000_0700_0000_0000;

/// Hypercall 0x30: the test's handler answers the sum of the a1 bytes at guest-virtual a0.
const HC_SUM: u64 = 0x30;

extern "C" {
    fn _start();
}

fn main(info: &'static BootInfo) -> i32 {
    let case = cmdline(info);
    let mut frames = Frames::new(info);
    let mut pt = PageTables::new(&mut frames);
    pt.identity_ram(&mut frames, info.ram_size, KERNEL);
    match case {
        "alias" => alias(info, &mut frames, &mut pt),
        "twin" => twin(info, &mut frames, &mut pt),
        "virtptr" => virtptr(info, &mut frames, &mut pt),
        _ => {
            println!("kernel_virt: unknown case {case:?} (alias, twin, virtptr)");
            return 2;
        }
    }
    println!("{case}: done");
    exit(0)
}

fn alias(info: &BootInfo, frames: &mut Frames, pt: &mut PageTables) {
    let image_start = (_start as *const () as u64) & !0xfff;
    let mut pa = image_start;
    while pa < info.free_start {
        pt.map_4k(frames, ALIAS + pa, pa, KERNEL);
        pa += 4096;
    }
    let code = frames.alloc();
    for (i, insn) in [Insn::Vmcall, Insn::Vmmcall].into_iter().enumerate() {
        write_hypercall_fn(code + 32 * i as u64, insn, 20, 9);
    }
    pt.map_4k(frames, RUNTIME_VA, code, KERNEL);
    pt.load();
    println!("alias: own page tables, image alias at {}", Hex(ALIAS + image_start));
    for insn in Insn::ALL {
        let r = guarded_call(insn.site(), 20, 7);
        println!("alias identity {}: {}", insn.name(), Shown::abs(r));
        let r = guarded_call(ALIAS + insn.site(), 20, 7);
        println!("alias high {}: {}", insn.name(), Shown::abs(r));
    }
    for (i, insn) in [Insn::Vmcall, Insn::Vmmcall].into_iter().enumerate() {
        let va = RUNTIME_VA + 32 * i as u64;
        println!(
            "alias runtime {} at {}: {}",
            insn.name(),
            Hex(va),
            Shown::abs(guarded_call(va, 0, 0))
        );
    }
}

fn twin(info: &BootInfo, frames: &mut Frames, pt: &mut PageTables) {
    let (p1, p2) = (scratch_page(info, 0), scratch_page(info, 1));
    const VMCALL_RET: [u8; 4] = [0x0f, 0x01, 0xc1, 0xc3];
    const VMMCALL_RET: [u8; 4] = [0x0f, 0x01, 0xd9, 0xc3];
    const UD2_RET: [u8; 3] = [0x0f, 0x0b, 0xc3];
    write_code(p1, &VMCALL_RET);
    write_code(p1 + 16, &VMMCALL_RET);
    write_code(p2, &UD2_RET);
    write_code(p2 + 16, &UD2_RET);
    pt.load();
    idt::install();
    println!("twin: own page tables and IDT, p1={} p2={}", Hex(p1), Hex(p2));
    let calls =
        [(p1, "vmcall", 11), (p1 + 16, "vmmcall", 12), (p2, "ud2", 13), (p2 + 16, "ud2", 14)];
    for (va, what, a0) in calls {
        println!("twin before va={} ({what}): {}", Hex(va), Shown::abs(guarded_call(va, 20, a0)));
    }
    pt.map_4k(frames, p1, p2, KERNEL);
    pt.map_4k(frames, p2, p1, KERNEL);
    flush_tlb();
    println!("twin: swapped va {} <-> {}", Hex(p1), Hex(p2));
    let calls =
        [(p1, "ud2", 21), (p1 + 16, "ud2", 22), (p2, "vmcall", 23), (p2 + 16, "vmmcall", 24)];
    for (va, what, a0) in calls {
        println!("twin after va={} ({what}): {}", Hex(va), Shown::abs(guarded_call(va, 20, a0)));
    }
    println!(
        "twin: guest #UD handler ran {} times, {} exceptions in all",
        Dec(idt::count(6) as i64),
        Dec(idt::total() as i64)
    );
}

/// The strings `virtptr` passes; the test sums the same bytes.
const ONE_PAGE: &str = "a string only mapped at a high virtual address";
const CROSS_PAGE: &str = "this string crosses from one page into the next";
const IDENTITY: &str = "an identity-mapped string";

fn virtptr(info: &BootInfo, frames: &mut Frames, pt: &mut PageTables) {
    let (s0, s1, s2) = (scratch_page(info, 2), scratch_page(info, 3), scratch_page(info, 4));
    // One page at STRINGS_VA, then two consecutive virtual pages whose frames are in reverse
    // physical order; none of the three frames stays identity-mapped.
    pt.map_4k(frames, STRINGS_VA, s0, KERNEL);
    pt.map_4k(frames, STRINGS_VA + 0x1000, s2, KERNEL);
    pt.map_4k(frames, STRINGS_VA + 0x2000, s1, KERNEL);
    for pa in [s0, s1, s2] {
        pt.unmap_4k(frames, pa);
    }
    pt.load();
    let one = STRINGS_VA + 0x100;
    let cross = STRINGS_VA + 0x2000 - 16;
    write_code(one, ONE_PAGE.as_bytes());
    write_code(cross, CROSS_PAGE.as_bytes());
    println!("virtptr: own page tables, strings mapped only at {}", Hex(STRINGS_VA));
    let cases = [
        ("one-page", one, ONE_PAGE.len() as u64),
        ("cross-page", cross, CROSS_PAGE.len() as u64),
        ("identity", IDENTITY.as_ptr() as u64, IDENTITY.len() as u64),
        ("unmapped", UNMAPPED_VA, 16),
        ("half-mapped", STRINGS_VA + 0x3000 - 8, 16),
    ];
    for (what, va, len) in cases {
        let r = hypercall2(HC_SUM, va, len);
        // The identity-mapped string's address depends on the image's layout: not printed.
        if what == "identity" {
            println!("virtptr {what}: len={} ret={}", Dec(len as i64), Dec(r));
        } else {
            println!("virtptr {what}: va={} len={} ret={}", Hex(va), Dec(len as i64), Dec(r));
        }
    }
}
