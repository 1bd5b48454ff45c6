//! vmcall guest SDK: make hypercalls, print to the console and exit, from a `no_std` guest.
//!
//! A guest binary is `#![no_std] #![no_main]`, names its main function with [`entry!`] and is
//! linked with `link.ld` (the `guests/` crate shows how). The VMM starts it in 64-bit mode at CPL 0
//! with RDI pointing at its [`BootInfo`]; see `docs/guest-abi.md`.
//!
//! ```ignore
//! // A whole guest (not run as a doctest: it is a bare-metal binary).
//! #![no_std]
//! #![no_main]
//! use vmcall_guest::fmt::Dec;
//! use vmcall_guest::{hc, hypercall1, println, BootInfo};
//!
//! vmcall_guest::entry!(main);
//!
//! fn main(info: &'static BootInfo) -> i32 {
//!     let r = hypercall1(hc::KVM_HC_MY_VMCALL, 41);
//!     println!("vCPU {}: hypercall 20 answered {}", Dec(info.vcpu_id.into()), Dec(r));
//!     0 // halt this vCPU; any other value ends the run with that status
//! }
//! ```
#![warn(missing_docs)]
// A host test build of this crate (which only `cargo clippy --all-targets` makes, without
// linking: the manifest turns its tests off) has std and std's panic handler.
#![cfg_attr(not(test), no_std)]

use core::arch::{asm, global_asm};
use core::fmt as core_fmt;
use core::sync::atomic::{AtomicBool, Ordering};

pub use vmcall_abi as abi;
pub use vmcall_abi::{errno, hc, BatchEntry, BootInfo, HypercallInfo};

static USE_VMMCALL: AtomicBool = AtomicBool::new(false);

/// Use VMMCALL (AMD) instead of VMCALL (Intel) for [`hypercall0`]..[`hypercall4`].
/// The entry glue sets this from CPUID; tests call it to exercise both instructions.
pub fn set_use_vmmcall(amd: bool) {
    USE_VMMCALL.store(amd, Ordering::Relaxed);
}

/// Whether hypercalls use VMMCALL.
pub fn uses_vmmcall() -> bool {
    USE_VMMCALL.load(Ordering::Relaxed)
}

/// The CPU vendor's hypercall instruction, as Linux picks it: VMMCALL on AMD and Hygon.
fn detect_vmmcall() -> bool {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    leaf0.ebx == abi::cpuid::VENDOR_AMD_EBX || leaf0.ebx == abi::cpuid::VENDOR_HYGON_EBX
}

/// Expands to one hypercall with the vendor's instruction. RBX is reserved by LLVM, so a0 is
/// swapped into it around the instruction.
macro_rules! hypercall_asm {
    ($nr:expr, $a0:expr, $a1:expr, $a2:expr, $a3:expr) => {{
        let ret: i64;
        let nr: u64 = $nr;
        let a0: u64 = $a0;
        if uses_vmmcall() {
            // SAFETY: VMMCALL only changes RAX (the result); RBX is restored by the second xchg.
            unsafe {
                asm!("xchg {a0}, rbx", "vmmcall", "xchg {a0}, rbx",
                     a0 = inout(reg) a0 => _, inout("rax") nr => ret,
                     in("rcx") $a1, in("rdx") $a2, in("rsi") $a3, options(nostack))
            }
        } else {
            // SAFETY: as above, with VMCALL.
            unsafe {
                asm!("xchg {a0}, rbx", "vmcall", "xchg {a0}, rbx",
                     a0 = inout(reg) a0 => _, inout("rax") nr => ret,
                     in("rcx") $a1, in("rdx") $a2, in("rsi") $a3, options(nostack))
            }
        }
        ret
    }};
}

/// Hypercall `nr` with no arguments; returns RAX.
#[inline]
pub fn hypercall0(nr: u64) -> i64 {
    hypercall_asm!(nr, 0u64, 0u64, 0u64, 0u64)
}
/// Hypercall `nr` with a0 in RBX.
#[inline]
pub fn hypercall1(nr: u64, a0: u64) -> i64 {
    hypercall_asm!(nr, a0, 0u64, 0u64, 0u64)
}
/// Hypercall `nr` with a0, a1 in RBX, RCX.
#[inline]
pub fn hypercall2(nr: u64, a0: u64, a1: u64) -> i64 {
    hypercall_asm!(nr, a0, a1, 0u64, 0u64)
}
/// Hypercall `nr` with a0..a2 in RBX, RCX, RDX.
#[inline]
pub fn hypercall3(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    hypercall_asm!(nr, a0, a1, a2, 0u64)
}
/// Hypercall `nr` with a0..a3 in RBX, RCX, RDX, RSI.
#[inline]
pub fn hypercall4(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    hypercall_asm!(nr, a0, a1, a2, a3)
}

/// Run every call in `entries` with one hypercall (`VMCALL_HC_BATCH`): each entry's `ret`
/// gets what that call alone would have returned. Returns the number of entries processed, or
/// a negative KVM error (-KVM_E2BIG beyond `VMCALL_BATCH_MAX` entries).
pub fn hypercall_batch(entries: &mut [BatchEntry]) -> i64 {
    // The hypercall's asm is not `nomem`, so the compiler assumes it reads and writes the
    // array, whose address it is given.
    hypercall2(hc::VMCALL_HC_BATCH, entries.as_mut_ptr() as u64, entries.len() as u64)
}

/// How many custom hypercalls the host has registered right now (`VMCALL_HC_LIST` with no
/// array), or a negative KVM error.
pub fn hypercall_count() -> i64 {
    hypercall2(hc::VMCALL_HC_LIST, 0, 0)
}

/// Fill `out` with the custom hypercalls the host has registered right now (number and handler
/// name), sorted by number, and return how many there are. If `out` cannot hold them all,
/// nothing is written and the result is -KVM_E2BIG: ask [`hypercall_count`] and call again (the
/// list may grow in between). An empty `out` only counts them.
pub fn list_hypercalls(out: &mut [HypercallInfo]) -> i64 {
    // Not `nomem`: the compiler assumes the hypercall writes the array it is given.
    hypercall2(hc::VMCALL_HC_LIST, out.as_mut_ptr() as u64, core::mem::size_of_val(out) as u64)
}

/// Write one byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: a port write has no effect on guest memory or registers.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem)) }
}

/// Write four bytes to an I/O port.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem)) }
}

/// Integer formatting that stays within instructions every KVM can emulate.
///
/// `core`'s own integer `Display` is precompiled with SSE2 digit-pair tricks (`movd`, `pinsrw`)
/// that the instruction emulator of software KVMs such as kvm_pvm cannot run (the vCPU stops with
/// a KVM internal error). Format integers with [`fmt::Dec`] and [`fmt::Hex`] in guests that
/// must run there; on hardware KVM and the software CPU backend either way works.
pub mod fmt {
    use core::fmt;

    /// A signed decimal integer.
    #[derive(Debug, Clone, Copy)]
    pub struct Dec(pub i64);

    /// An unsigned hexadecimal integer with a `0x` prefix.
    #[derive(Debug, Clone, Copy)]
    pub struct Hex(pub u64);

    fn digits(mut v: u64, radix: u64, buf: &mut [u8; 20]) -> usize {
        let mut at = buf.len();
        loop {
            at -= 1;
            let d = (v % radix) as u8;
            buf[at] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            v /= radix;
            if v == 0 {
                return at;
            }
        }
    }

    impl fmt::Display for Dec {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let mut buf = [0u8; 20];
            let at = digits(self.0.unsigned_abs(), 10, &mut buf);
            if self.0 < 0 {
                f.write_str("-")?;
            }
            f.write_str(core::str::from_utf8(&buf[at..]).map_err(|_| fmt::Error)?)
        }
    }

    impl fmt::Display for Hex {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let mut buf = [0u8; 20];
            let at = digits(self.0, 16, &mut buf);
            f.write_str("0x")?;
            f.write_str(core::str::from_utf8(&buf[at..]).map_err(|_| fmt::Error)?)
        }
    }
}

/// The COM1 console; bytes go to the host's stdout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Console;

impl core_fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core_fmt::Result {
        for b in s.bytes() {
            outb(abi::ports::COM1, b);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: core_fmt::Arguments) {
    let _ = core_fmt::Write::write_fmt(&mut Console, args);
}

/// Print to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::_print(format_args!($($arg)*)) };
}

/// Print a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// End the whole VM with `status` as the `vmcall run` exit status (a 32-bit `out PORT_EXIT,
/// eax`: the only width the exit port takes as an exit).
pub fn exit(status: u32) -> ! {
    outl(abi::ports::PORT_EXIT, status);
    halt_forever()
}

/// Stop this vCPU: HLT with interrupts off. When every vCPU has halted the run ends with 0.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI; HLT only stops this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// The precompiled `core` refers to the unwinder's personality routine even under panic=abort;
/// nothing ever calls it in a guest.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {}", info);
    exit(101)
}

// The VMM enters with RSP 16-byte aligned; a call makes it what a function expects.
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "xor ebp, ebp",
    "and rsp, -16",
    "call {start}",
    "2: cli",
    "hlt",
    "jmp 2b",
    start = sym rust_start,
);

extern "Rust" {
    fn __vmcall_guest_main(info: &'static BootInfo) -> i32;
}

extern "C" fn rust_start(info: *const BootInfo) -> ! {
    set_use_vmmcall(detect_vmmcall());
    // SAFETY: the VMM passes a valid, 'static BootInfo in RDI (docs/guest-abi.md).
    let info = unsafe { &*info };
    // SAFETY: `entry!` defines this symbol with this signature.
    let status = unsafe { __vmcall_guest_main(info) };
    if status == 0 {
        halt_forever()
    }
    exit(status as u32)
}

/// Name the guest's main function: `fn(&'static BootInfo) -> i32`. Returning 0 halts this vCPU
/// (the run ends with 0 once all have halted); any other value ends the run with that status.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn __vmcall_guest_main(info: &'static $crate::BootInfo) -> i32 {
            let f: fn(&'static $crate::BootInfo) -> i32 = $main;
            f(info)
        }
    };
}

/// The guest's command line.
pub fn cmdline(info: &BootInfo) -> &'static str {
    // SAFETY: the VMM wrote `cmdline_len` bytes of UTF-8 at `cmdline_gpa` (identity-mapped).
    let bytes = unsafe {
        core::slice::from_raw_parts(info.cmdline_gpa as *const u8, info.cmdline_len as usize)
    };
    core::str::from_utf8(bytes).unwrap_or("")
}

// The memory functions the compiler expects; the host target's compiler_builtins leaves them to
// libc, which a guest does not have. `rep movsb/stosb` keep LLVM from turning them into calls to
// themselves.

/// # Safety
/// Standard `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards with the direction flag set, then clear it again.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack))
    };
    dest
}

/// # Safety
/// Standard `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges hold n bytes.
        let (x, y) =
            unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
