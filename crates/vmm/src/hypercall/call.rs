//! What a custom handler sees and answers: the [`Call`] after KVM's CPL and truncation rules,
//! and the [`HypercallHandler`] trait.

use crate::memory::{GuestRam, OutOfBounds};
use crate::x86::paging::{PagingContext, VirtError, VirtualMemory};
use crate::x86::CpuMode;

/// What a handler sees: the call after KVM's truncation and CPL rules, and checked guest memory.
#[derive(Debug)]
pub struct Call<'a> {
    /// The hypercall number (RAX, truncated to 32 bits outside 64-bit mode).
    pub nr: u64,
    /// a0..a3 (RBX, RCX, RDX, RSI, truncated as the number is).
    pub args: [u64; 4],
    /// The calling vCPU.
    pub vcpu_id: u32,
    /// The caller's CPU mode.
    pub mode: CpuMode,
    /// Guest RAM by guest-physical address; every access is bounds-checked.
    pub mem: &'a GuestRam,
    /// The caller's paging registers: what its pointers mean (see [`Call::virt`]).
    pub paging: PagingContext,
}

impl<'a> Call<'a> {
    /// Guest memory as the caller sees it: guest-virtual addresses translated through the
    /// caller's own page tables (bounds-checked; an unmapped or read-only page is an error
    /// that `?` turns into `-KVM_EFAULT`). Many hypercall ABIs pass virtual pointers.
    pub fn virt(&self) -> VirtualMemory<'a> {
        VirtualMemory::new(self.mem, self.paging)
    }
}

/// What a handler answers: the value for RAX, or an error the guest sees as `-errno`.
pub type HypercallResult = Result<u64, HypercallError>;

/// A handler's error, mapped to a KVM error code for the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    /// Return `-code` (a positive `KVM_E*` value from `vmcall_abi::errno`).
    #[error("error {0}")]
    Errno(i64),
    /// A guest-memory access failed: the guest sees `-KVM_EFAULT`.
    #[error(transparent)]
    Fault(#[from] OutOfBounds),
    /// A guest-virtual access failed (unmapped, read-only, outside RAM): `-KVM_EFAULT`.
    #[error(transparent)]
    VirtFault(#[from] VirtError),
}

impl HypercallError {
    /// The value the guest sees in RAX.
    pub fn to_rax(&self) -> u64 {
        match self {
            HypercallError::Errno(code) => code.wrapping_neg() as u64,
            HypercallError::Fault(_) | HypercallError::VirtFault(_) => {
                neg(vmcall_abi::errno::KVM_EFAULT)
            }
        }
    }
}

/// A custom hypercall handler. Called on the vCPU thread that made the call; must not block
/// for long, since that vCPU waits for the answer.
pub trait HypercallHandler: Send + Sync + 'static {
    /// Answer one call: the value for RAX, or an error the guest sees as `-KVM_E*`.
    fn call(&self, call: &Call<'_>) -> HypercallResult;

    /// Answer a run of calls to this handler's number one after another, exactly as [`call`]
    /// would answer each: call `i` has the arguments `args[i]` (the rest of `call` as given)
    /// and its value for RAX goes to `rets[i]`, for `i` from `*next` on; `*next` is set to `i`
    /// before call `i` is answered, so that a panic can be pinned on its call. A batch
    /// (`VMCALL_HC_BATCH`) answers each run of same-number entries with one call of this: one
    /// indirect call a run instead of one an entry, and the default body calls [`call`]
    /// directly, where the compiler can inline it. There is no reason to override it.
    ///
    /// [`call`]: HypercallHandler::call
    fn call_run(&self, call: &mut Call<'_>, args: &[[u64; 4]], rets: &mut [u64], next: &mut usize) {
        for i in *next..args.len().min(rets.len()) {
            *next = i;
            call.args = args[i];
            rets[i] = match self.call(call) {
                Ok(v) => v,
                Err(err) => err.to_rax(),
            };
        }
    }

    /// What kind of handler this is, for listings: `const`, `echo`, `exec`, ...; `native` for
    /// code registered through the library.
    fn kind(&self) -> &str {
        "native"
    }

    /// Whether the handler may read or write guest memory (through [`Call::mem`] or
    /// [`Call::virt`]): a replay without the guest (`vmcall replay`) cannot answer its calls.
    /// The default is the safe answer for code nobody has looked at: yes.
    fn uses_guest_memory(&self) -> bool {
        true
    }
}

impl<F> HypercallHandler for F
where
    F: Fn(&Call<'_>) -> HypercallResult + Send + Sync + 'static,
{
    fn call(&self, call: &Call<'_>) -> HypercallResult {
        self(call)
    }
}

/// A KVM error code as the guest sees it in RAX: negated.
pub fn neg(code: i64) -> u64 {
    code.wrapping_neg() as u64
}
