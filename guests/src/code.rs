//! Hypercall sites for the kernel guests: static ones in the image (each instruction forced,
//! and the SDK's vendor pick), and tiny functions written into RAM at run time, which no scan
//! of the image can have seen.
//!
//! Every site is a function `fn(nr: RDI, a0: RSI) -> RAX` that [`crate::idt::guarded_call`]
//! can call; the run-time ones carry their number and argument as immediates.

use core::arch::global_asm;

use vmcall_guest::abi::insn::{VMCALL, VMMCALL};

// Static sites: the instruction itself, with nr and a0 moved into RAX and RBX first (RBX is
// restored by the caller, guarded_call).
global_asm!(
    ".section .text.kernel_sites, \"ax\"",
    ".global kernel_vmcall",
    "kernel_vmcall:",
    "mov rax, rdi",
    "mov rbx, rsi",
    "vmcall",
    "ret",
    ".global kernel_vmmcall",
    "kernel_vmmcall:",
    "mov rax, rdi",
    "mov rbx, rsi",
    "vmmcall",
    "ret",
);

extern "C" {
    fn kernel_vmcall();
    fn kernel_vmmcall();
}

/// The SDK's hypercall (the vendor's instruction, picked as Linux does), as a static site.
#[inline(never)]
pub extern "C" fn sdk_hypercall(nr: u64, a0: u64) -> i64 {
    vmcall_guest::hypercall1(nr, a0)
}

/// Which hypercall instruction a site uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// The SDK's choice: VMMCALL on AMD and Hygon, VMCALL elsewhere.
    Sdk,
    Vmcall,
    Vmmcall,
}

impl Insn {
    pub const ALL: [Insn; 3] = [Insn::Sdk, Insn::Vmcall, Insn::Vmmcall];

    pub fn name(self) -> &'static str {
        match self {
            Insn::Sdk => "sdk",
            Insn::Vmcall => "vmcall",
            Insn::Vmmcall => "vmmcall",
        }
    }

    /// The static site in the image making this hypercall.
    pub fn site(self) -> u64 {
        match self {
            Insn::Sdk => sdk_hypercall as *const () as u64,
            Insn::Vmcall => kernel_vmcall as *const () as u64,
            Insn::Vmmcall => kernel_vmmcall as *const () as u64,
        }
    }

    /// The instruction's bytes (the SDK's choice as it stands now).
    pub fn bytes(self) -> [u8; 3] {
        match self {
            Insn::Vmcall => VMCALL,
            Insn::Vmmcall => VMMCALL,
            Insn::Sdk if vmcall_guest::uses_vmmcall() => VMMCALL,
            Insn::Sdk => VMCALL,
        }
    }
}

/// Length of a function written by [`write_hypercall_fn`].
pub const HYPERCALL_FN_LEN: u64 = 14;

/// Write `mov eax, nr; mov ebx, a0; <insn>; ret` at `at` (which must be writable through its
/// own address) and return `at`.
pub fn write_hypercall_fn(at: u64, insn: Insn, nr: u32, a0: u32) -> u64 {
    let mut code = [0u8; HYPERCALL_FN_LEN as usize];
    code[0] = 0xb8;
    code[1..5].copy_from_slice(&nr.to_le_bytes());
    code[5] = 0xbb;
    code[6..10].copy_from_slice(&a0.to_le_bytes());
    code[10..13].copy_from_slice(&insn.bytes());
    code[13] = 0xc3;
    write_code(at, &code);
    at
}

/// Write `code` at `at`, byte by byte, as a kernel writes code it is about to run.
pub fn write_code(at: u64, code: &[u8]) {
    for (i, b) in code.iter().enumerate() {
        // SAFETY: the caller hands us RAM it owns, mapped writable at `at`.
        unsafe { ((at + i as u64) as *mut u8).write_volatile(*b) };
    }
}
