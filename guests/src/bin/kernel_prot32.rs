//! Kernel-like guest that leaves long mode for 32-bit protected mode with its own paging and
//! its own 32-bit IDT, as a 32-bit kernel runs, makes hypercalls there, and comes back.
//!
//! The command line picks the paging: `prot32-2level` (classic 32-bit paging, CR4.PSE, 4 MiB
//! pages) or `prot32-pae` (PAE, 2 MiB pages). Either way the tables identity-map the low 16 MiB
//! (where the image, its 32-bit stack and the tables are) and map the 32-bit code's pages a
//! second time at 0x4000_0000.
//!
//! In 32-bit mode it records CR0, CR4 and EFER, makes hypercalls (nr 20 = the test's echo with
//! VMCALL and VMMCALL, an unknown nr, nr 21 whose 64-bit answer is truncated to EAX, with
//! every other register checked unchanged), calls the same code through its alias, and runs a
//! `ud2` that the 32-bit IDT's handler must catch. Back in long mode it prints what it saw:
//! `<variant> <what>: ...` lines, then `<variant>: done`, and exits with 0. An exception
//! nobody expected in 32-bit mode ends the run with status 200 + vector.
#![no_std]
#![no_main]

use core::arch::global_asm;
use core::mem::offset_of;

use vmcall_guest::abi::selectors::{KERNEL_CS, KERNEL_CS32, KERNEL_DS};
use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{cmdline, exit, println, BootInfo};
use vmcall_guests::paging::Frames;

vmcall_guest::entry!(main);

/// Where the 32-bit code's pages are mapped a second time.
const ALIAS32: u32 = 0x4000_0000;
/// The low memory both 32-bit page tables identity-map.
const IDENTITY_END: u64 = 16 << 20;
const STACK32_SIZE: usize = 8192;

/// What the 32-bit code needs and what it reports, at fixed offsets the assembly uses.
#[repr(C)]
struct Prot32 {
    /// CR4 and CR3 for 32-bit mode.
    cr4: u32,
    cr3: u32,
    /// The alias addresses of p32_vmcall and p32_vmmcall.
    alias_vmcall: u32,
    alias_vmmcall: u32,
    /// Top of the 32-bit stack.
    stack_top: u32,
    /// The 32-bit IDT's descriptor for LIDT: limit, then base in two halves.
    idt32: [u16; 3],
    /// Long mode's state, restored on the way back (SIDT's 10 bytes, RSP, CR3, CR4).
    saved_idt: [u16; 5],
    saved_rsp: u64,
    saved_cr3: u64,
    saved_cr4: u64,
    /// The 32-bit exception handler: where to resume (0: nothing expected), and what it saw.
    recovery: u32,
    trap_vector: u32,
    trap_error: u32,
    trap_eip: u32,
    traps: u32,
    /// What the 32-bit code recorded; indices in [`R`].
    results: [u32; 12],
}

/// Indices into `Prot32::results`.
#[allow(non_snake_case)]
mod R {
    pub const CR0: usize = 0;
    pub const CR4: usize = 1;
    pub const EFER: usize = 2;
    pub const VMCALL: usize = 3;
    pub const VMMCALL: usize = 4;
    pub const UNKNOWN: usize = 5;
    pub const TRUNCATED: usize = 6;
    pub const REGS_CHANGED: usize = 7;
    pub const ALIAS_VMCALL: usize = 8;
    pub const ALIAS_VMMCALL: usize = 9;
    pub const UD2_SITE: usize = 10;
}

static mut P32: Prot32 = Prot32 {
    cr4: 0,
    cr3: 0,
    alias_vmcall: 0,
    alias_vmmcall: 0,
    stack_top: 0,
    idt32: [0; 3],
    saved_idt: [0; 5],
    saved_rsp: 0,
    saved_cr3: 0,
    saved_cr4: 0,
    recovery: 0,
    trap_vector: 0,
    trap_error: 0,
    trap_eip: 0,
    traps: 0,
    results: [0; 12],
};

/// The 32-bit IDT: 32 interrupt gates of 8 bytes.
static mut IDT32: [u64; 32] = [0; 32];
/// The stack of the 32-bit code (u128: 16-byte aligned), in the identity-mapped low 16 MiB.
static mut STACK32: [u128; STACK32_SIZE / 16] = [0; STACK32_SIZE / 16];

// prot32_run(): everything between long mode and long mode, in one block. The 32-bit code and
// its stubs sit in their own page-aligned section, which is what the alias maps.
global_asm!(
    ".section .text.prot32, \"ax\"",
    ".p2align 12",
    "p32_page:",
    // ---- 64-bit: save long mode's state, switch to the 32-bit stack, enter 32-bit code -----
    ".code64",
    "prot32_run:",
    "push %rbx",
    "push %rbp",
    "push %r12",
    "push %r13",
    "push %r14",
    "push %r15",
    "mov %rsp, {p}+{saved_rsp}(%rip)",
    "mov %cr3, %rax",
    "mov %rax, {p}+{saved_cr3}(%rip)",
    "mov %cr4, %rax",
    "mov %rax, {p}+{saved_cr4}(%rip)",
    "sidt {p}+{saved_idt}(%rip)",
    "movl {p}+{stack_top}(%rip), %esp", // zero-extended into RSP
    "pushq ${cs32}",
    "lea .Lp32_compat(%rip), %rax",
    "push %rax",
    "lretq", // far return into the 32-bit code segment: compatibility mode
    // ---- 32-bit: leave long mode, enter 32-bit protected mode with the guest's paging ------
    ".code32",
    ".Lp32_compat:",
    "mov %cr0, %eax",
    "and $0x7fffffff, %eax",
    "mov %eax, %cr0", // CR0.PG off: long mode is deactivated (EFER.LMA = 0)
    "mov $0xc0000080, %ecx",
    "rdmsr",
    "and $0xfffffeff, %eax",
    "wrmsr", // EFER.LME off
    "lidt {p}+{idt32}", // the guest's 32-bit IDT
    "mov {p}+{cr4}, %eax",
    "mov %eax, %cr4", // PSE for 2-level paging, or PAE
    "mov {p}+{cr3}, %eax",
    "mov %eax, %cr3", // the page directory, or the PAE page-directory-pointer table
    "mov %cr0, %eax",
    "or $0x80000000, %eax",
    "mov %eax, %cr0", // CR0.PG on: 32-bit protected mode with paging
    "jmp .Lp32_paged",
    ".Lp32_paged:",
    "mov ${ds}, %ax",
    "mov %ax, %ds",
    "mov %ax, %es",
    "mov %ax, %fs",
    "mov %ax, %gs",
    "mov %ax, %ss",
    // Where we are: CR0, CR4, EFER (LME and LMA must both be clear).
    "mov %cr0, %eax",
    "mov %eax, {p}+{results}+0",
    "mov %cr4, %eax",
    "mov %eax, {p}+{results}+4",
    "mov $0xc0000080, %ecx",
    "rdmsr",
    "mov %eax, {p}+{results}+8",
    // Hypercalls: echo with each instruction, an unknown number, a truncated 64-bit answer.
    "mov $20, %eax",
    "mov $0x11, %ebx",
    "vmcall",
    "mov %eax, {p}+{results}+12",
    "mov $20, %eax",
    "mov $0x12, %ebx",
    "vmmcall",
    "mov %eax, {p}+{results}+16",
    "mov $999, %eax",
    "xor %ebx, %ebx",
    "vmcall",
    "mov %eax, {p}+{results}+20",
    "mov $21, %eax",
    "mov $0x13, %ebx",
    "mov $0x1111, %ecx",
    "mov $0x2222, %edx",
    "mov $0x3333, %esi",
    "mov $0x4444, %edi",
    "mov $0x5555, %ebp",
    "vmcall",
    "mov %eax, {p}+{results}+24",
    // Only EAX may have changed: OR together what every other register differs by.
    "xor $0x13, %ebx",
    "xor $0x1111, %ecx",
    "xor $0x2222, %edx",
    "xor $0x3333, %esi",
    "xor $0x4444, %edi",
    "xor $0x5555, %ebp",
    "or %ecx, %ebx",
    "or %edx, %ebx",
    "or %esi, %ebx",
    "or %edi, %ebx",
    "or %ebp, %ebx",
    "mov %ebx, {p}+{results}+28",
    // The same instructions through the alias of this code.
    "mov $20, %eax",
    "mov $0x21, %ebx",
    "mov {p}+{alias_vmcall}, %ecx",
    "call *%ecx",
    "mov %eax, {p}+{results}+32",
    "mov $20, %eax",
    "mov $0x22, %ebx",
    "mov {p}+{alias_vmmcall}, %ecx",
    "call *%ecx",
    "mov %eax, {p}+{results}+36",
    // A genuine #UD for the 32-bit IDT: its handler resumes at .Lp32_recovered.
    "movl $.Lp32_recovered, {p}+{recovery}",
    "movl $.Lp32_ud2, {p}+{results}+40",
    ".Lp32_ud2:",
    "ud2",
    ".Lp32_recovered:",
    // ---- back to long mode: paging off, PAE and the VMM's PML4, LME, paging on, far jump ---
    "mov %cr0, %eax",
    "and $0x7fffffff, %eax",
    "mov %eax, %cr0",
    "mov {p}+{saved_cr4}, %eax",
    "mov %eax, %cr4",
    "mov {p}+{saved_cr3}, %eax",
    "mov %eax, %cr3",
    "mov $0xc0000080, %ecx",
    "rdmsr",
    "or $0x100, %eax",
    "wrmsr",
    "mov %cr0, %eax",
    "or $0x80000000, %eax",
    "mov %eax, %cr0", // long mode again, in the 32-bit segment: compatibility mode
    "ljmp ${cs64}, $.Lp32_long",
    ".code64",
    ".Lp32_long:",
    "lidt {p}+{saved_idt}(%rip)",
    "mov {p}+{saved_rsp}(%rip), %rsp",
    "pop %r15",
    "pop %r14",
    "pop %r13",
    "pop %r12",
    "pop %rbp",
    "pop %rbx",
    "ret",
    // ---- 32-bit hypercall sites, called at their alias: nr in EAX, a0 in EBX -------------
    ".code32",
    "p32_vmcall:",
    "vmcall",
    "ret",
    "p32_vmmcall:",
    "vmmcall",
    "ret",
    // ---- the 32-bit IDT's stubs and handler ----------------------------------------------
    ".macro P32_STUB v, err",
    "p32_stub_\\v:",
    ".if \\err == 0",
    "push $0",
    ".endif",
    "push $\\v",
    "jmp .Lp32_common",
    ".endm",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "P32_STUB \\v, 0",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "P32_STUB \\v, 1",
    ".endr",
    // Stack: vector, error code, EIP, CS, EFLAGS (no privilege change: no ESP/SS).
    ".Lp32_common:",
    "push %eax",
    "mov 4(%esp), %eax",
    "mov %eax, {p}+{trap_vector}",
    "mov 8(%esp), %eax",
    "mov %eax, {p}+{trap_error}",
    "mov 12(%esp), %eax",
    "mov %eax, {p}+{trap_eip}",
    "incl {p}+{traps}",
    "mov {p}+{recovery}, %eax",
    "test %eax, %eax",
    "jz .Lp32_unexpected",
    "mov %eax, 12(%esp)",
    "movl $0, {p}+{recovery}",
    "pop %eax",
    "add $8, %esp",
    "iretl",
    // Nothing armed: say what happened on COM1 and end the run with status 200 + vector.
    ".Lp32_unexpected:",
    "mov ${com1}, %dx",
    "mov $p32_msg_vector, %esi",
    "call .Lp32_puts",
    "mov {p}+{trap_vector}, %eax",
    "call .Lp32_hex",
    "mov $p32_msg_error, %esi",
    "call .Lp32_puts",
    "mov {p}+{trap_error}, %eax",
    "call .Lp32_hex",
    "mov $p32_msg_eip, %esi",
    "call .Lp32_puts",
    "mov {p}+{trap_eip}, %eax",
    "call .Lp32_hex",
    "mov $p32_msg_cr0, %esi",
    "call .Lp32_puts",
    "mov %cr0, %eax",
    "call .Lp32_hex",
    "mov $p32_msg_cr4, %esi",
    "call .Lp32_puts",
    "mov %cr4, %eax",
    "call .Lp32_hex",
    "mov $p32_msg_efer, %esi",
    "call .Lp32_puts",
    "push %edx",
    "mov $0xc0000080, %ecx",
    "rdmsr",
    "pop %edx",
    "call .Lp32_hex",
    "mov $10, %al",
    "out %al, %dx",
    "mov {p}+{trap_vector}, %eax",
    "add $200, %eax",
    "mov ${exit_port}, %dx",
    "out %eax, %dx",
    ".Lp32_halt:",
    "cli",
    "hlt",
    "jmp .Lp32_halt",
    // Write the NUL-terminated string at ESI to port DX.
    ".Lp32_puts:",
    "lodsb",
    "test %al, %al",
    "jz .Lp32_puts_done",
    "out %al, %dx",
    "jmp .Lp32_puts",
    ".Lp32_puts_done:",
    "ret",
    // Write EAX as 8 hex digits to port DX.
    ".Lp32_hex:",
    "mov %eax, %ebx",
    "mov $8, %ecx",
    ".Lp32_hex_next:",
    "rol $4, %ebx",
    "mov %ebx, %eax",
    "and $0xf, %eax",
    "cmp $10, %eax",
    "jb .Lp32_hex_digit",
    "add $39, %eax", // 'a' - 10 - '0'
    ".Lp32_hex_digit:",
    "add $48, %eax", // '0'
    "out %al, %dx",
    "dec %ecx",
    "jnz .Lp32_hex_next",
    "ret",
    ".code64",
    "p32_page_end:",
    ".section .rodata.prot32, \"a\"",
    "p32_msg_vector:",
    ".asciz \"prot32: unexpected exception in 32-bit mode (exit status 200 + vector): vector=0x\"",
    "p32_msg_error:",
    ".asciz \" err=0x\"",
    "p32_msg_eip:",
    ".asciz \" eip=0x\"",
    "p32_msg_cr0:",
    ".asciz \" cr0=0x\"",
    "p32_msg_cr4:",
    ".asciz \" cr4=0x\"",
    "p32_msg_efer:",
    ".asciz \" efer=0x\"",
    ".p2align 3",
    "p32_symbols:",
    ".quad p32_page, p32_page_end, p32_vmcall, p32_vmmcall",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad p32_stub_\\v",
    ".endr",
    p = sym P32,
    cr4 = const offset_of!(Prot32, cr4),
    cr3 = const offset_of!(Prot32, cr3),
    alias_vmcall = const offset_of!(Prot32, alias_vmcall),
    alias_vmmcall = const offset_of!(Prot32, alias_vmmcall),
    stack_top = const offset_of!(Prot32, stack_top),
    idt32 = const offset_of!(Prot32, idt32),
    saved_idt = const offset_of!(Prot32, saved_idt),
    saved_rsp = const offset_of!(Prot32, saved_rsp),
    saved_cr3 = const offset_of!(Prot32, saved_cr3),
    saved_cr4 = const offset_of!(Prot32, saved_cr4),
    recovery = const offset_of!(Prot32, recovery),
    trap_vector = const offset_of!(Prot32, trap_vector),
    trap_error = const offset_of!(Prot32, trap_error),
    trap_eip = const offset_of!(Prot32, trap_eip),
    traps = const offset_of!(Prot32, traps),
    results = const offset_of!(Prot32, results),
    cs32 = const KERNEL_CS32,
    cs64 = const KERNEL_CS,
    ds = const KERNEL_DS,
    com1 = const vmcall_guest::abi::ports::COM1,
    exit_port = const vmcall_guest::abi::ports::PORT_EXIT,
    options(att_syntax)
);

extern "C" {
    fn prot32_run();
    /// p32_page, p32_page_end, p32_vmcall, p32_vmmcall, then the 32 stubs.
    static p32_symbols: [u64; 36];
}

const P: u64 = 1;
const RW: u64 = 2;
const PS: u64 = 1 << 7;
const CR4_PSE: u32 = 1 << 4;
const CR4_PAE: u32 = 1 << 5;
const CR0_PG: u32 = 1 << 31;
const EFER_LME: u32 = 1 << 8;
const EFER_LMA: u32 = 1 << 10;

fn write32(table: u64, index: u64, value: u64) {
    // SAFETY: `table` is a page from Frames (identity-mapped free RAM) and index < 1024.
    unsafe { ((table + 4 * index) as *mut u32).write_volatile(value as u32) }
}

fn write64(table: u64, index: u64, value: u64) {
    // SAFETY: `table` is a page from Frames (identity-mapped free RAM) and index < 512.
    unsafe { ((table + 8 * index) as *mut u64).write_volatile(value) }
}

/// Classic 32-bit paging: 4 MiB pages for the identity map, a page table for the alias.
/// Returns (CR3, CR4).
fn two_level(frames: &mut Frames, code: (u64, u64)) -> (u32, u32) {
    let pd = frames.alloc();
    for i in 0..IDENTITY_END >> 22 {
        write32(pd, i, (i << 22) | P | RW | PS);
    }
    let pt = frames.alloc();
    write32(pd, u64::from(ALIAS32) >> 22, pt | P | RW);
    for (i, pa) in (code.0..code.1).step_by(4096).enumerate() {
        write32(pt, i as u64 + ((u64::from(ALIAS32) >> 12) & 0x3ff), pa | P | RW);
    }
    (pd as u32, CR4_PSE)
}

/// PAE paging: 2 MiB pages for the identity map, a page table for the alias. The four
/// page-directory-pointer entries may hold nothing but P and the address. Returns (CR3, CR4).
fn pae(frames: &mut Frames, code: (u64, u64)) -> (u32, u32) {
    let pdpt = frames.alloc();
    let pd0 = frames.alloc();
    for i in 0..IDENTITY_END >> 21 {
        write64(pd0, i, (i << 21) | P | RW | PS);
    }
    write64(pdpt, 0, pd0 | P);
    let alias = u64::from(ALIAS32);
    let (pd, pt) = (frames.alloc(), frames.alloc());
    write64(pdpt, alias >> 30, pd | P);
    write64(pd, (alias >> 21) & 0x1ff, pt | P | RW);
    for (i, pa) in (code.0..code.1).step_by(4096).enumerate() {
        write64(pt, i as u64 + ((alias >> 12) & 0x1ff), pa | P | RW);
    }
    (pdpt as u32, CR4_PAE)
}

fn main(info: &'static BootInfo) -> i32 {
    let variant = cmdline(info);
    let mut frames = Frames::new(info);
    assert!(info.free_start + 0x10000 <= IDENTITY_END, "the image does not fit in the low 16 MiB");
    // SAFETY: p32_symbols is the table of addresses in the assembly above.
    let symbols = unsafe { p32_symbols };
    let [page, page_end, vmcall_site, vmmcall_site] =
        [symbols[0], symbols[1], symbols[2], symbols[3]];
    let code = (page, (page_end + 0xfff) & !0xfff);
    let (cr3, cr4) = match variant {
        "prot32-2level" => two_level(&mut frames, code),
        "prot32-pae" => pae(&mut frames, code),
        _ => {
            println!("kernel_prot32: unknown variant {variant:?} (prot32-2level, prot32-pae)");
            return 2;
        }
    };
    let alias = |site: u64| ALIAS32 + (site - page) as u32;
    let idt = core::ptr::addr_of_mut!(IDT32);
    for (v, stub) in symbols[4..].iter().enumerate() {
        let low = (stub & 0xffff) | (u64::from(KERNEL_CS32) << 16);
        let high = (stub & 0xffff_0000) | 0x8e00; // present, DPL 0, 32-bit interrupt gate
                                                  // SAFETY: v < 32; nothing uses IDT32 before prot32_run loads it.
        unsafe { (*idt)[v] = low | (high << 32) };
    }
    let stack_top = core::ptr::addr_of_mut!(STACK32) as u64 + STACK32_SIZE as u64;
    let p = core::ptr::addr_of_mut!(P32);
    // SAFETY: P32 is this guest's own; only prot32_run (on this vCPU) uses it, later.
    unsafe {
        (*p).cr4 = cr4;
        (*p).cr3 = cr3;
        (*p).alias_vmcall = alias(vmcall_site);
        (*p).alias_vmmcall = alias(vmmcall_site);
        (*p).stack_top = stack_top as u32;
        (*p).idt32 = [32 * 8 - 1, idt as u64 as u16, (idt as u64 >> 16) as u16];
    }
    println!(
        "{variant}: entering 32-bit protected mode, code alias at {}",
        Hex(u64::from(ALIAS32))
    );
    // SAFETY: prot32_run returns to long mode with every callee-saved register, RSP, CR3, CR4,
    // EFER and the IDT as they were; the tables and stack it uses are set up above.
    unsafe { prot32_run() };
    // SAFETY: prot32_run is done with P32.
    let p = unsafe { &*p };
    let r = &p.results;
    let bit = |v: u32, b: u32| (v & b != 0) as u8;
    println!(
        "{variant} mode: cr0.pg={} cr4.pae={} cr4.pse={} efer.lme={} efer.lma={}",
        bit(r[R::CR0], CR0_PG),
        bit(r[R::CR4], CR4_PAE),
        bit(r[R::CR4], CR4_PSE),
        bit(r[R::EFER], EFER_LME),
        bit(r[R::EFER], EFER_LMA)
    );
    let hex = |i: usize| Hex(u64::from(r[i]));
    println!("{variant} vmcall nr=20 a0=0x11: eax={}", hex(R::VMCALL));
    println!("{variant} vmmcall nr=20 a0=0x12: eax={}", hex(R::VMMCALL));
    println!("{variant} vmcall nr=999: eax={}", hex(R::UNKNOWN));
    println!(
        "{variant} vmcall nr=21: eax={} other_regs_changed={}",
        hex(R::TRUNCATED),
        hex(R::REGS_CHANGED)
    );
    // (The alias addresses depend on the assembly's layout: not printed.)
    println!("{variant} alias vmcall nr=20 a0=0x21: eax={}", hex(R::ALIAS_VMCALL));
    println!("{variant} alias vmmcall nr=20 a0=0x22: eax={}", hex(R::ALIAS_VMMCALL));
    let site = r[R::UD2_SITE];
    println!(
        "{variant} ud2: traps={} vector={} err={} eip=site+{}",
        Dec(p.traps.into()),
        Dec(p.trap_vector.into()),
        Hex(p.trap_error.into()),
        Hex(u64::from(p.trap_eip.wrapping_sub(site)))
    );
    println!("{variant}: done");
    exit(0)
}
