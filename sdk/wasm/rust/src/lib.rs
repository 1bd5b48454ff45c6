//! Write [vmcall](../../../README.md) hypercall handlers in Rust, compiled to WebAssembly.
//!
//! ```ignore
//! #![no_std]
//! use vmcall_wasm_sdk::{handler, Call, HcResult};
//!
//! static mut CALLS: u64 = 0;
//!
//! fn handle(c: &Call) -> HcResult {
//!     // State persists between calls: one instance, calls one at a time.
//!     let n = unsafe { CALLS += 1; CALLS };
//!     let v = vmcall_wasm_sdk::read_phys_u64(c.args[0])?; // -KVM_EFAULT on a bad address
//!     Ok(v + n)
//! }
//! handler!(handle);
//! ```
//! Build: `cargo build --release --target wasm32-unknown-unknown` with `crate-type =
//! ["cdylib"]`; run: `vmcall run GUEST --hypercall 20=wasm:target/.../handler.wasm`. The ABI,
//! host API, limits and errors are in docs/wasm.md.
#![no_std]

/// Error codes, positive as in Linux's `kvm_para.h`; the guest sees them negated in RAX.
pub mod errno {
    pub const KVM_ENOSYS: i64 = 1000;
    pub const KVM_EFAULT: i64 = 14;
    pub const KVM_EINVAL: i64 = 22;
    pub const KVM_E2BIG: i64 = 7;
    pub const KVM_EPERM: i64 = 1;
    pub const KVM_EOPNOTSUPP: i64 = 95;
}

/// The raw imports of module `"vmcall"` (see the safe wrappers below).
pub mod sys {
    #[link(wasm_import_module = "vmcall")]
    extern "C" {
        pub fn read_phys(gpa: u64, buf: *mut u8, len: u32) -> i32;
        pub fn write_phys(gpa: u64, buf: *const u8, len: u32) -> i32;
        pub fn read_virt(va: u64, buf: *mut u8, len: u32) -> i32;
        pub fn write_virt(va: u64, buf: *const u8, len: u32) -> i32;
        pub fn log(text: *const u8, len: u32);
        pub fn now_ns() -> i64;
    }
}

/// One hypercall, as vmcall hands it to the handler (after KVM's CPL and truncation rules:
/// outside 64-bit mode the values were truncated to 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// The hypercall number (RAX).
    pub nr: u64,
    /// a0..a3: RBX, RCX, RDX, RSI.
    pub args: [u64; 4],
    /// The calling vCPU.
    pub vcpu: u32,
}

/// A guest address that is not guest RAM, or not mapped for the caller: the guest gets
/// `-KVM_EFAULT` when this is returned with `?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault;

/// An error the guest sees as `-code` (a positive `KVM_E*` value from [`errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i64);

impl From<Fault> for Errno {
    fn from(_: Fault) -> Self {
        Errno(errno::KVM_EFAULT)
    }
}

/// What a handler answers: the value for RAX, or an error the guest sees negated.
pub type HcResult = Result<u64, Errno>;

/// The value for RAX of a handler's result.
pub fn to_rax(r: HcResult) -> i64 {
    match r {
        Ok(v) => v as i64,
        Err(Errno(code)) => code.wrapping_neg(),
    }
}

fn check(r: i32) -> Result<(), Fault> {
    if r == 0 {
        Ok(())
    } else {
        Err(Fault)
    }
}

/// Copy guest RAM at guest-physical `gpa` into `buf`.
pub fn read_phys(gpa: u64, buf: &mut [u8]) -> Result<(), Fault> {
    // SAFETY: the host writes at most buf.len() bytes into buf, which is ours.
    check(unsafe { sys::read_phys(gpa, buf.as_mut_ptr(), buf.len() as u32) })
}

/// Copy `data` into guest RAM at guest-physical `gpa` (nothing is written on a fault).
pub fn write_phys(gpa: u64, data: &[u8]) -> Result<(), Fault> {
    // SAFETY: the host reads data.len() bytes of data.
    check(unsafe { sys::write_phys(gpa, data.as_ptr(), data.len() as u32) })
}

/// Copy guest memory at guest-virtual `va`, through the calling vCPU's page tables, into `buf`.
pub fn read_virt(va: u64, buf: &mut [u8]) -> Result<(), Fault> {
    // SAFETY: as in read_phys.
    check(unsafe { sys::read_virt(va, buf.as_mut_ptr(), buf.len() as u32) })
}

/// Copy `data` to guest-virtual `va`; every page is checked before any byte is written.
pub fn write_virt(va: u64, data: &[u8]) -> Result<(), Fault> {
    // SAFETY: as in write_phys.
    check(unsafe { sys::write_virt(va, data.as_ptr(), data.len() as u32) })
}

/// A little-endian u64 at guest-physical `gpa`.
pub fn read_phys_u64(gpa: u64) -> Result<u64, Fault> {
    let mut b = [0u8; 8];
    read_phys(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Write `v` at guest-physical `gpa`.
pub fn write_phys_u64(gpa: u64, v: u64) -> Result<(), Fault> {
    write_phys(gpa, &v.to_le_bytes())
}

/// A little-endian u64 at guest-virtual `va`.
pub fn read_virt_u64(va: u64) -> Result<u64, Fault> {
    let mut b = [0u8; 8];
    read_virt(va, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Write `v` at guest-virtual `va`.
pub fn write_virt_u64(va: u64, v: u64) -> Result<(), Fault> {
    write_virt(va, &v.to_le_bytes())
}

/// Print one line on the host's stderr (prefixed with the handler's name and the vCPU; cut at
/// about 1 KiB; at most 50 lines a second, the rest dropped and counted).
pub fn log(text: &str) {
    // SAFETY: the host reads text.len() bytes of text.
    unsafe { sys::log(text.as_ptr(), text.len() as u32) }
}

/// The host's wall-clock time, nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    // SAFETY: no arguments, no memory.
    unsafe { sys::now_ns() }
}

/// Trap: the guest gets `-KVM_EFAULT` for this call (the instance answers the next one).
pub fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    // Host builds exist only to type-check this crate.
    #[cfg(not(target_arch = "wasm32"))]
    loop {
        core::hint::spin_loop()
    }
}

/// Grow this handler's linear memory by `pages` of 64 KiB: the old size in pages. Growing past
/// the host's cap (16 MiB by default) traps, and the guest gets `-KVM_EFAULT`.
pub fn memory_grow(pages: usize) -> usize {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_grow(0, pages);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = pages;
        usize::MAX
    }
}

/// Define and export `vmcall_handle` from a function `fn(&Call) -> HcResult`.
#[macro_export]
macro_rules! handler {
    ($f:path) => {
        #[no_mangle]
        pub extern "C" fn vmcall_handle(
            nr: i64,
            a0: i64,
            a1: i64,
            a2: i64,
            a3: i64,
            vcpu: i32,
        ) -> i64 {
            let call = $crate::Call {
                nr: nr as u64,
                args: [a0 as u64, a1 as u64, a2 as u64, a3 as u64],
                vcpu: vcpu as u32,
            };
            $crate::to_rax($f(&call))
        }
    };
}

/// A panic traps, and the guest gets `-KVM_EFAULT` for the call; the next call runs normally.
#[cfg(all(feature = "panic-handler", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    trap()
}
