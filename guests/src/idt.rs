//! The guest's own 64-bit IDT, as a kernel installs it: all 32 exception vectors, one stub per
//! vector, a common handler that records what happened and resumes at a recovery address set
//! before the faulting code ran (Linux's exception table, reduced to one entry at a time).
//!
//! [`guarded_call`] calls a function with a recovery point armed: an exception inside it comes
//! back as `Err(Trap)` instead of ending the run. An exception with nothing armed is printed as
//! `unexpected exception: ...` and ends the run with status 99.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use core::fmt;
use vmcall_guest::abi::selectors::KERNEL_CS;

use vmcall_guest::fmt::{Dec, Hex};
use vmcall_guest::{exit, println};

/// Exit status of a run that took an exception nobody expected.
pub const UNEXPECTED_EXCEPTION: u32 = 99;

/// What the common stub leaves on the stack: the general registers it saved, the vector and
/// error code the vector's stub pushed (0 where the CPU pushes none), and the CPU's frame.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One exception the guest's handler saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trap {
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cr2: u64,
}

static RECOVERY: AtomicU64 = AtomicU64::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);
static COUNTS: [AtomicU64; 32] = [const { AtomicU64::new(0) }; 32];
static LAST: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// How many exceptions of `vector` the guest's handler has seen.
pub fn count(vector: usize) -> u64 {
    COUNTS[vector].load(Relaxed)
}

/// How many exceptions the guest's handler has seen in all.
pub fn total() -> u64 {
    TOTAL.load(Relaxed)
}

fn last() -> Trap {
    Trap {
        vector: LAST[0].load(Relaxed),
        error: LAST[1].load(Relaxed),
        rip: LAST[2].load(Relaxed),
        cr2: LAST[3].load(Relaxed),
    }
}

extern "C" fn kidt_handler(f: &mut Frame) {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; the handler runs at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let v = (f.vector & 31) as usize;
    COUNTS[v].store(COUNTS[v].load(Relaxed) + 1, Relaxed);
    TOTAL.store(TOTAL.load(Relaxed) + 1, Relaxed);
    for (slot, value) in LAST.iter().zip([f.vector, f.error, f.rip, cr2]) {
        slot.store(value, Relaxed);
    }
    let recovery = RECOVERY.swap(0, Relaxed);
    if recovery != 0 {
        f.rip = recovery;
        return;
    }
    println!(
        "unexpected exception: vector={} err={} rip={} cr2={} cs={}",
        Dec(f.vector as i64),
        Hex(f.error),
        Hex(f.rip),
        Hex(cr2),
        Hex(f.cs)
    );
    exit(UNEXPECTED_EXCEPTION)
}

// One stub per vector: push a dummy error code where the CPU pushes none (every vector but 8,
// 10-14, 17, 21, 29 and 30), push the vector, and join the common part, which saves the general
// registers, calls the handler with a pointer to the frame on a 16-byte aligned stack, restores
// the registers (RIP may have changed) and returns with IRETQ. The gates use IST1 (the VMM's
// TSS points it at the vCPU's exception stack), so an exception never writes into the red zone
// of the code it interrupted: these guests are built with a red zone, unlike a real kernel.
global_asm!(
    ".section .text.kernel_idt, \"ax\"",
    ".macro KIDT_STUB v, err",
    "kidt_stub_\\v:",
    ".if \\err == 0",
    "push 0",
    ".endif",
    "push \\v",
    "jmp kidt_common",
    ".endm",
    "KIDT_STUB 0, 0",
    "KIDT_STUB 1, 0",
    "KIDT_STUB 2, 0",
    "KIDT_STUB 3, 0",
    "KIDT_STUB 4, 0",
    "KIDT_STUB 5, 0",
    "KIDT_STUB 6, 0",
    "KIDT_STUB 7, 0",
    "KIDT_STUB 8, 1",
    "KIDT_STUB 9, 0",
    "KIDT_STUB 10, 1",
    "KIDT_STUB 11, 1",
    "KIDT_STUB 12, 1",
    "KIDT_STUB 13, 1",
    "KIDT_STUB 14, 1",
    "KIDT_STUB 15, 0",
    "KIDT_STUB 16, 0",
    "KIDT_STUB 17, 1",
    "KIDT_STUB 18, 0",
    "KIDT_STUB 19, 0",
    "KIDT_STUB 20, 0",
    "KIDT_STUB 21, 1",
    "KIDT_STUB 22, 0",
    "KIDT_STUB 23, 0",
    "KIDT_STUB 24, 0",
    "KIDT_STUB 25, 0",
    "KIDT_STUB 26, 0",
    "KIDT_STUB 27, 0",
    "KIDT_STUB 28, 0",
    "KIDT_STUB 29, 1",
    "KIDT_STUB 30, 1",
    "KIDT_STUB 31, 0",
    "kidt_common:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rdi, rsp",
    "mov rbx, rsp",
    "and rsp, -16",
    "cld",
    "call {handler}",
    "mov rsp, rbx",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "add rsp, 16",
    "iretq",
    ".section .rodata.kernel_idt, \"a\"",
    ".p2align 3",
    "kidt_stubs:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad kidt_stub_\\v",
    ".endr",
    handler = sym kidt_handler,
);

extern "C" {
    static kidt_stubs: [u64; 32];
}

#[repr(C, align(16))]
struct Idt([u64; 64]);

static mut IDT: Idt = Idt([0; 64]);

/// Fill the guest's IDT (interrupt gates, IST1, DPL 0) and load it with LIDT.
pub fn install() {
    let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
    // SAFETY: kidt_stubs is the table of the 32 stubs defined above, never written.
    let stubs = unsafe { kidt_stubs };
    for (v, h) in stubs.into_iter().enumerate() {
        let low = (h & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (1 << 32)
            | (0x8e << 40)
            | (((h >> 16) & 0xffff) << 48);
        // SAFETY: two u64s per vector, inside IDT; nothing reads IDT until the LIDT below.
        unsafe {
            idt.add(2 * v).write_volatile(low);
            idt.add(2 * v + 1).write_volatile(h >> 32);
        }
    }
    let mut desc = [0u8; 10];
    desc[..2].copy_from_slice(&(32u16 * 16 - 1).to_le_bytes());
    desc[2..].copy_from_slice(&(idt as u64).to_le_bytes());
    // SAFETY: the descriptor names a complete IDT of 32 present gates whose stubs are above.
    unsafe { asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack)) };
}

/// RBX, RBP and RSP of the caller of [`guarded_call`], for the way back when an exception
/// abandons the call: the callee may have changed any register by then.
static mut SAVED: [u64; 3] = [0; 3];

/// Call `target` with RAX = RDI = `nr` and RBX = RSI = `a0` (so it may be a C function
/// `fn(nr, a0) -> i64`, or bare code such as `vmcall; ret` that uses RAX and RBX), with a
/// recovery point armed: `Ok(RAX)` if it returned, `Err(trap)` if an exception reached the
/// guest's handler on the way (the call is abandoned there).
pub fn guarded_call(target: u64, nr: u64, a0: u64) -> Result<i64, Trap> {
    let before = total();
    let ret: i64;
    // SAFETY: the call follows the C ABI, and every register the callee could leave changed
    // when an exception abandons it is either declared clobbered (all caller-saved ones and
    // R12-R15) or saved in SAVED and restored on both paths (RBX and RBP, which LLVM reserves,
    // and RSP). The recovery address is this block's own label, so the compiler's view of
    // registers and stack is right either way.
    unsafe {
        asm!(
            "mov [rip + {saved}], rbx",
            "mov [rip + {saved} + 8], rbp",
            "mov [rip + {saved} + 16], rsp",
            "mov rbx, r12",
            "and rsp, -16",
            "lea r15, [rip + 2f]",
            "mov [{rec}], r15",
            "call {target}",
            "2:",
            "mov rsp, [rip + {saved} + 16]",
            "mov rbp, [rip + {saved} + 8]",
            "mov rbx, [rip + {saved}]",
            saved = sym SAVED,
            target = in(reg) target,
            rec = in(reg) RECOVERY.as_ptr(),
            inout("rax") nr => ret,
            inout("r12") a0 => _,
            inout("rdi") nr => _,
            inout("rsi") a0 => _,
            out("r13") _,
            out("r14") _,
            out("r15") _,
            clobber_abi("C"),
        )
    };
    RECOVERY.store(0, Relaxed);
    if total() != before {
        Err(last())
    } else {
        Ok(ret)
    }
}

/// How a guarded call ended, as the kernel guests print it: `ret=<decimal>`, or
/// `trapped vector=<n> err=<hex> rip=<where>` (and `cr2=<hex>` for a page fault), where the
/// RIP is absolute, or `site+<hex>` relative to the called function when that is the point.
#[derive(Debug, Clone, Copy)]
pub struct Shown {
    pub result: Result<i64, Trap>,
    pub site: Option<u64>,
}

impl Shown {
    /// RIP printed as an absolute address.
    pub fn abs(result: Result<i64, Trap>) -> Self {
        Self { result, site: None }
    }

    /// RIP printed relative to `site`.
    pub fn at(result: Result<i64, Trap>, site: u64) -> Self {
        Self { result, site: Some(site) }
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.result {
            Ok(v) => return write!(f, "ret={}", Dec(v)),
            Err(t) => t,
        };
        write!(f, "trapped vector={} err={} rip=", Dec(t.vector as i64), Hex(t.error))?;
        match self.site {
            Some(site) if t.rip >= site => write!(f, "site+{}", Hex(t.rip - site))?,
            Some(site) => write!(f, "site-{}", Hex(site - t.rip))?,
            None => write!(f, "{}", Hex(t.rip))?,
        }
        if t.vector == 14 {
            write!(f, " cr2={}", Hex(t.cr2))?;
        }
        Ok(())
    }
}
