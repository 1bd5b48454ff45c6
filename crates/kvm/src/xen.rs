//! The `xen` trap strategy: KVM's Xen hypercall intercept used as a catch-all hypercall exit.
//!
//! On a kernel built with `CONFIG_KVM_XEN` (5.12 or later), `KVM_XEN_HVM_CONFIG` with the
//! `KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL` flag makes the kernel's hypercall handler hand *every*
//! VMCALL/VMMCALL that reaches it to user space as `KVM_EXIT_XEN` of type `KVM_EXIT_XEN_HCALL`,
//! at any CPL, KVM's own numbers included. vmcall then answers it as Linux KVM would.
//!
//! The exit carries Xen's argument registers, not KVM's, so the KVM registers (RAX, RBX, RCX,
//! RDX, RSI) are read from the sync-regs area. The vCPU is still *on* the instruction: the
//! answer goes into `xen.u.hcall.result`, and on the next `KVM_RUN` the kernel copies it into
//! RAX and skips the instruction — but only if RIP was left alone, and after applying dirty
//! sync regs, so user space must neither move RIP nor write RAX itself.
//!
//! Everything here except [`enable_intercept`] is a pure function over plain values or a
//! `kvm_run`, so it is tested without `/dev/kvm` (the machines this is developed on report
//! `KVM_CAP_XEN_HVM = 0`).

use kvm_bindings::{
    kvm_regs, kvm_run, kvm_sregs, kvm_xen_hvm_config, KVM_EXIT_XEN, KVM_EXIT_XEN_HCALL,
    KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, KVM_XEN_MSR_MAX_INDEX, KVM_XEN_MSR_MIN_INDEX,
};
use kvm_ioctls::VmFd;
use vmcall_vmm::backend::BackendError;
use vmcall_vmm::hypercall::{HypercallExit, HypercallInsn};
use vmcall_vmm::x86::CpuMode;

use crate::regs::{paging_context, segment_from_kvm};

/// `KVM_CHECK_EXTENSION` number whose value is the mask of supported `KVM_XEN_HVM_CONFIG_*`.
pub const KVM_CAP_XEN_HVM: u32 = kvm_bindings::KVM_CAP_XEN_HVM;

/// The Xen hypercall-page MSR index given to the kernel. It must be non-zero (the kernel turns
/// the intercept's global switch on only when an MSR is set) and, since Linux 6.14, inside
/// `KVM_XEN_MSR_MIN_INDEX..=KVM_XEN_MSR_MAX_INDEX`. 0x40000200 collides neither with Hyper-V's
/// synthetic MSRs nor with KVM's own (0x4b564dxx). A guest that writes it makes the kernel
/// fill one page of its own memory with hypercall stubs, whose calls exit here like any other.
pub const INTERCEPT_MSR: u32 = 0x4000_0200;

const _: () =
    assert!(INTERCEPT_MSR >= KVM_XEN_MSR_MIN_INDEX && INTERCEPT_MSR <= KVM_XEN_MSR_MAX_INDEX);

// `_IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config)`, issued on the VM fd; kvm-ioctls lacks it.
// (In a private module: the macro makes a `pub fn`, which is not part of this crate's API.)
mod ioctl {
    use kvm_bindings::{kvm_xen_hvm_config, KVMIO};
    vmm_sys_util::ioctl_iow_nr!(KVM_XEN_HVM_CONFIG, KVMIO, 0x7a, kvm_xen_hvm_config);
}
use ioctl::KVM_XEN_HVM_CONFIG;

/// Whether a `KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM)` value offers the hypercall intercept.
/// A plain `> 0` test is wrong: kernels before 5.12 report 1 (only the hypercall-page MSR)
/// and refuse any flag.
pub fn intercept_available(cap: i32) -> bool {
    cap > 0 && cap as u32 & KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL != 0
}

/// Why a `KVM_CAP_XEN_HVM` value rules the `xen` strategy out, or `None` if it does not.
pub fn unavailable_reason(cap: i32) -> Option<String> {
    if intercept_available(cap) {
        None
    } else if cap < 0 {
        Some(format!("KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM) failed ({cap})"))
    } else if cap == 0 {
        Some("KVM_CAP_XEN_HVM = 0 (kernel without CONFIG_KVM_XEN)".into())
    } else {
        Some(format!(
            "KVM_CAP_XEN_HVM = {cap:#x} lacks KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL (kernel older than 5.12)"
        ))
    }
}

/// The configuration vmcall asks for: the intercept and nothing else. No event-channel,
/// shared-info, timer or version feature is enabled, so the kernel keeps as few Xen calls to
/// itself as it can (see docs/kvm-backend.md for the ones it still answers).
pub fn intercept_config() -> kvm_xen_hvm_config {
    kvm_xen_hvm_config {
        flags: KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
        msr: INTERCEPT_MSR,
        ..Default::default()
    }
}

/// Turn the intercept on for `vm`: from now on every hypercall instruction that reaches the
/// kernel's handler exits with `KVM_EXIT_XEN`.
pub fn enable_intercept(vm: &VmFd) -> Result<(), BackendError> {
    let config = intercept_config();
    // SAFETY: `vm` is an open KVM VM fd (a live `VmFd`); KVM_XEN_HVM_CONFIG's number encodes
    // `size_of::<kvm_xen_hvm_config>()` and the `_IOW` direction, so the kernel only reads that
    // many bytes from `&config`, a valid, initialised value that outlives the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_XEN_HVM_CONFIG(), &config) };
    if ret == 0 {
        Ok(())
    } else {
        Err(
            crate::ioctl("KVM_XEN_HVM_CONFIG (INTERCEPT_HCALL)")(vmm_sys_util::errno::Error::last()),
        )
    }
}

/// A `KVM_EXIT_XEN_HCALL` exit, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenHypercall {
    /// The kernel's `is_64_bit_hypercall()`: 64-bit mode (EFER.LMA and CS.L).
    pub longmode: bool,
    /// The caller's CPL (0..=3).
    pub cpl: u8,
    /// RAX (EAX, zero-extended, outside 64-bit mode on 5.13+).
    pub input: u64,
    /// Xen's argument registers: RDI, RSI, RDX, R10, R8, R9 in 64-bit mode, EBX, ECX, EDX,
    /// ESI, EDI, EBP otherwise. Not KVM's; kept for diagnostics.
    pub params: [u64; 6],
}

/// The `KVM_EXIT_XEN` subtype of `run`, if that is its exit.
pub fn exit_type(run: &kvm_run) -> Option<u32> {
    if run.exit_reason != KVM_EXIT_XEN {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_XEN, so the kernel filled the `xen` member of the exit
    // union; every bit pattern is a valid u32.
    Some(unsafe { run.__bindgen_anon_1.xen.type_ })
}

/// The hypercall of a `KVM_EXIT_XEN_HCALL` exit; `None` for any other exit, including the
/// other `KVM_EXIT_XEN` types.
pub fn decode(run: &kvm_run) -> Option<XenHypercall> {
    if exit_type(run)? != KVM_EXIT_XEN_HCALL {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_XEN, so `xen` is the member of the exit union the kernel
    // filled; it is plain integers, valid for any bit pattern.
    let xen = unsafe { run.__bindgen_anon_1.xen };
    // SAFETY: its type is KVM_EXIT_XEN_HCALL, so `hcall` is the member of `u` the kernel
    // filled; plain integers as well.
    let h = unsafe { xen.u.hcall };
    Some(XenHypercall {
        longmode: h.longmode != 0,
        // Never round an unexpected value down to a privileged level.
        cpl: h.cpl.min(3) as u8,
        input: h.input,
        params: h.params,
    })
}

/// The neutral hypercall of a Xen exit: KVM's registers from the synced `regs`, the mode from
/// the exit's `longmode` refined by the synced `sregs` (the finer non-64-bit modes truncate
/// alike), CPL from the exit, RIP where the vCPU stands (on the instruction). The instruction
/// is the host's native one: the other vendor's either raises #UD (quirk disabled) or is
/// patched by the kernel into the native one before it exits.
pub fn hypercall_exit(
    call: &XenHypercall,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    native: HypercallInsn,
) -> HypercallExit {
    let mode = if call.longmode {
        CpuMode::Long64
    } else {
        match CpuMode::from_cs(&segment_from_kvm(&sregs.cs), sregs.efer, sregs.cr0) {
            // The kernel said "not 64-bit": keep its truncation even if sregs disagree.
            CpuMode::Long64 => CpuMode::Compat32,
            m => m,
        }
    };
    HypercallExit {
        nr: regs.rax,
        args: [regs.rbx, regs.rcx, regs.rdx, regs.rsi],
        cpl: call.cpl,
        mode,
        rip: regs.rip,
        insn: native,
        paging: paging_context(sregs),
    }
}

/// Store the answer of the `KVM_EXIT_XEN_HCALL` exit in `run`: exactly `result`, which the
/// kernel writes to RAX (all 64 bits) on the next `KVM_RUN` before skipping the instruction.
/// Returns false, writing nothing, if `run` does not hold such an exit.
pub fn complete(run: &mut kvm_run, result: u64) -> bool {
    if decode(run).is_none() {
        return false;
    }
    // `run` holds a KVM_EXIT_XEN_HCALL exit (checked above), so `xen.u.hcall` is the active
    // member and `result` the field user space owns until the next KVM_RUN. (Assigning a
    // `Copy` union field is safe Rust; only reading one needs `unsafe`.)
    run.__bindgen_anon_1.xen.u.hcall.result = result;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        kvm_xen_exit, kvm_xen_exit__bindgen_ty_1, kvm_xen_exit__bindgen_ty_1__bindgen_ty_1,
    };

    const EFER_LME_LMA: u64 = 0x500;
    const CR0_PE_PG: u64 = 0x8000_0001;

    /// A kvm_run as the kernel leaves it at a Xen hypercall exit.
    fn xen_run(type_: u32, longmode: u32, cpl: u32, input: u64) -> kvm_run {
        let mut run = kvm_run { exit_reason: KVM_EXIT_XEN, ..Default::default() };
        run.__bindgen_anon_1.xen = kvm_xen_exit {
            type_,
            u: kvm_xen_exit__bindgen_ty_1 {
                hcall: kvm_xen_exit__bindgen_ty_1__bindgen_ty_1 {
                    longmode,
                    cpl,
                    input,
                    // Stale bytes from an earlier exit: the kernel does not clear it.
                    result: 0xdead_beef,
                    params: [1, 2, 3, 4, 5, 6],
                },
            },
        };
        run
    }

    /// The `hcall` member of a run built by [`xen_run`].
    fn hcall(run: &kvm_run) -> kvm_xen_exit__bindgen_ty_1__bindgen_ty_1 {
        // SAFETY: every test run has the `xen` member active; plain integers.
        let xen = unsafe { run.__bindgen_anon_1.xen };
        // SAFETY: `xen_run` fills `u.hcall`; plain integers.
        unsafe { xen.u.hcall }
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rax: 0xffff_ffff_0000_0014,
            rbx: 0x1111_1111_aaaa_aaaa,
            rcx: 0x2222_2222_bbbb_bbbb,
            rdx: 0x3333_3333_cccc_cccc,
            rsi: 0x4444_4444_dddd_dddd,
            rdi: 0x5555,
            rip: 0x20_1234,
            ..Default::default()
        }
    }

    fn sregs(long: bool, cs_l: bool, cs_db: bool, cs_dpl: u8) -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: CR0_PE_PG,
            cr3: 0x1000,
            cr4: 0x20,
            efer: if long { EFER_LME_LMA } else { 0 },
            ..Default::default()
        };
        s.cs.l = u8::from(cs_l);
        s.cs.db = u8::from(cs_db);
        s.cs.dpl = cs_dpl;
        s.ss.dpl = cs_dpl;
        s
    }

    #[test]
    fn ioctl_number_and_config() {
        assert_eq!(KVM_XEN_HVM_CONFIG(), 0x4038_ae7a);
        assert_eq!(std::mem::size_of::<kvm_xen_hvm_config>(), 56);
        let c = intercept_config();
        assert_eq!(c.flags, 2, "INTERCEPT_HCALL only, never HYPERCALL_MSR or EVTCHN_SEND");
        assert_eq!(c.msr, 0x4000_0200);
        assert_eq!((c.blob_addr_32, c.blob_addr_64, c.blob_size_32, c.blob_size_64), (0, 0, 0, 0));
    }

    #[test]
    fn capability_bit() {
        // Current CONFIG_KVM_XEN kernels report 0x1ff or 0x1b7.
        assert!(intercept_available(0x1ff));
        assert!(intercept_available(0x1b7));
        assert!(intercept_available(2));
        assert!(!intercept_available(0), "kernel without CONFIG_KVM_XEN, or kvm_pvm");
        assert!(!intercept_available(1), "before 5.12: only the hypercall-page MSR");
        assert!(!intercept_available(0x1fd), "every bit but INTERCEPT_HCALL");
        assert!(!intercept_available(-1));
        assert_eq!(unavailable_reason(0x1ff), None);
        assert_eq!(
            unavailable_reason(0).as_deref(),
            Some("KVM_CAP_XEN_HVM = 0 (kernel without CONFIG_KVM_XEN)")
        );
        let old = unavailable_reason(1).unwrap();
        assert!(old.contains("0x1") && old.contains("INTERCEPT_HCALL"), "{old}");
        assert!(unavailable_reason(-1).unwrap().contains("failed"));
    }

    #[test]
    fn decodes_a_64_bit_call() {
        let run = xen_run(KVM_EXIT_XEN_HCALL, 1, 0, 0xffff_ffff_0000_0014);
        let call = decode(&run).unwrap();
        assert_eq!(
            call,
            XenHypercall {
                longmode: true,
                cpl: 0,
                input: 0xffff_ffff_0000_0014,
                params: [1, 2, 3, 4, 5, 6]
            }
        );
        let s = sregs(true, true, false, 0);
        let hc = hypercall_exit(&call, &regs(), &s, HypercallInsn::Vmmcall);
        assert_eq!(hc.nr, 0xffff_ffff_0000_0014, "full RAX, from sync regs");
        assert_eq!(
            hc.args,
            [
                0x1111_1111_aaaa_aaaa,
                0x2222_2222_bbbb_bbbb,
                0x3333_3333_cccc_cccc,
                0x4444_4444_dddd_dddd
            ],
            "KVM's RBX, RCX, RDX, RSI, not Xen's params"
        );
        assert_eq!(hc.mode, CpuMode::Long64);
        assert_eq!(hc.cpl, 0);
        assert_eq!(hc.rip, 0x20_1234, "still on the instruction");
        assert_eq!(hc.insn, HypercallInsn::Vmmcall);
        assert_eq!(hc.paging.cr3, 0x1000);
        assert_eq!(hc.paging.efer, EFER_LME_LMA);
    }

    #[test]
    fn decodes_a_32_bit_call() {
        // Compatibility-mode code: the kernel reports longmode 0 and EAX in `input`.
        let run = xen_run(KVM_EXIT_XEN_HCALL, 0, 0, 0x14);
        let call = decode(&run).unwrap();
        assert!(!call.longmode);
        let s = sregs(true, false, true, 0);
        let hc = hypercall_exit(&call, &regs(), &s, HypercallInsn::Vmcall);
        assert_eq!(hc.mode, CpuMode::Compat32);
        assert!(!hc.mode.is_64bit(), "the shared emulation truncates nr, args and result");
        assert_eq!(hc.nr, 0xffff_ffff_0000_0014, "raw RAX; emulate() truncates it");

        // Legacy protected mode.
        let hc =
            hypercall_exit(&call, &regs(), &sregs(false, false, true, 0), HypercallInsn::Vmcall);
        assert_eq!(hc.mode, CpuMode::Protected);

        // Stale sregs claiming 64-bit code never override the kernel's longmode = 0.
        let hc =
            hypercall_exit(&call, &regs(), &sregs(true, true, false, 0), HypercallInsn::Vmcall);
        assert!(!hc.mode.is_64bit());
    }

    #[test]
    fn cpl_comes_from_the_exit() {
        let run = xen_run(KVM_EXIT_XEN_HCALL, 1, 3, 20);
        let call = decode(&run).unwrap();
        assert_eq!(call.cpl, 3);
        // Even with sregs claiming CPL 0, the exit's CPL is what counts.
        let hc =
            hypercall_exit(&call, &regs(), &sregs(true, true, false, 0), HypercallInsn::Vmcall);
        assert_eq!(hc.cpl, 3);
        // An out-of-range value is never taken for a privileged caller.
        assert_eq!(decode(&xen_run(KVM_EXIT_XEN_HCALL, 1, 4, 20)).unwrap().cpl, 3);
    }

    #[test]
    fn other_exits_are_not_hypercalls() {
        // A KVM_EXIT_XEN of another type (e.g. a future one): reported, not decoded.
        let run = xen_run(2, 1, 0, 20);
        assert_eq!(exit_type(&run), Some(2));
        assert_eq!(decode(&run), None);
        // Not a Xen exit at all (KVM_EXIT_IO with the same union bytes).
        let mut io = xen_run(KVM_EXIT_XEN_HCALL, 1, 0, 20);
        io.exit_reason = kvm_bindings::KVM_EXIT_IO;
        assert_eq!(exit_type(&io), None);
        assert_eq!(decode(&io), None);
    }

    #[test]
    fn completion_writes_result_exactly() {
        let mut run = xen_run(KVM_EXIT_XEN_HCALL, 1, 0, 20);
        let before = run.s;
        assert!(complete(&mut run, 0xffff_ffff_ffff_fc18));
        let h = hcall(&run);
        assert_eq!(h.result, 0xffff_ffff_ffff_fc18, "-KVM_ENOSYS, all 64 bits");
        assert_eq!((h.input, h.longmode, h.cpl, h.params), (20, 1, 0, [1, 2, 3, 4, 5, 6]));
        assert_eq!(run.kvm_dirty_regs, 0, "no sync-regs write: the kernel sets RAX itself");
        // SAFETY: the x86 `regs` member of the sync-regs union: plain integers, any bits valid.
        let a = unsafe { before.regs }.regs;
        // SAFETY: as above.
        let b = unsafe { run.s.regs }.regs;
        assert_eq!((a.rip, a.rax), (b.rip, b.rax), "RIP and RAX untouched");

        // A 32-bit caller's answer is written as given (emulate() already truncated it).
        let mut run = xen_run(KVM_EXIT_XEN_HCALL, 0, 0, 20);
        assert!(complete(&mut run, 0xffff_fc18));
        assert_eq!(hcall(&run).result, 0xffff_fc18);

        // Nothing is written into an exit that is not a Xen hypercall.
        let mut other = xen_run(2, 1, 0, 20);
        assert!(!complete(&mut other, 7));
        assert_eq!(hcall(&other).result, 0xdead_beef);
    }
}
