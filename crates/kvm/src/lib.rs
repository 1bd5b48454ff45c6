//! vmcall's KVM backend: runs guests through `/dev/kvm` and brings every VMCALL/VMMCALL of an
//! unmodified guest to user space, where vmcall's one dispatcher answers it.
//!
//! A stock KVM answers hypercalls inside the kernel, and some KVMs (PVM, see
//! `docs/kvm-backend.md`) even spin forever on them, so a hypercall must never reach the
//! kernel's own handler. The trap strategies (see [`Trap`]):
//! - **rewrite**: every VMCALL/VMMCALL that a recursive decode from the entry point and the
//!   function symbols proves to be code becomes `out PORT_DOORBELL, al; nop`, one plain
//!   port-I/O exit; so does every other site once it has trapped as a hypercall.
//! - **ud**: no rewriting: every hypercall traps as below.
//! - **hwbp**: hardware breakpoints on up to four sites.
//! - **xen**: KVM's Xen hypercall intercept (`KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL`, kernels
//!   built with `CONFIG_KVM_XEN`) sends every hypercall that reaches the kernel to user space
//!   as `KVM_EXIT_XEN`; nothing is rewritten (see [`xen`]).
//!
//! Under every strategy the `KVM_X86_QUIRK_FIX_HYPERCALL_INSN` quirk is disabled where
//! possible, so a hypercall instruction the kernel does not handle raises #UD (or #GP at
//! CPL > 0 on some KVMs) inside the guest: into the VMM's IDT stub, which forwards it to user
//! space, or — once the guest owns its IDT — into the guest's handler, whose entry carries a
//! hardware breakpoint so the host answers first (`debugregs`).
//! Under `xen` the #UD path still catches the other vendor's instruction when the quirk is
//! disabled.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod baseline;
pub mod coverage;
mod debugregs;
mod regs;
mod rewrite;
mod seccomp;
mod signal;
mod vcpu;
pub mod xen;

use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmcall_vmm::backend::{BackendError, GuestInfo, Hypervisor, Vcpu, VmBackend};
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::hypercall::{HypercallInsn, InsnAction, SiteTable};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::cpuid::PvCpuid;

pub use rewrite::{find_sites, prove_sites};

const KVM_CAP_DISABLE_QUIRKS2: u32 = kvm_bindings::KVM_CAP_DISABLE_QUIRKS2;
const KVM_X86_QUIRK_FIX_HYPERCALL_INSN: u64 = kvm_bindings::KVM_X86_QUIRK_FIX_HYPERCALL_INSN as u64;
const KVM_CAP_SYNC_REGS: u32 = kvm_bindings::KVM_CAP_SYNC_REGS;
const SYNC_REGS_NEEDED: i32 =
    (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS) as i32;

/// How hypercalls are brought to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trap {
    /// Pick the best strategy this host supports: xen where the intercept is available, else
    /// rewrite (with the #UD catch-all).
    Auto,
    /// Rewrite known sites into a port doorbell (#UD catch-all for the rest).
    Rewrite,
    /// No rewriting: every hypercall goes through #UD (needs the quirk to be disableable).
    Ud,
    /// Hardware breakpoints on the first four sites (#UD catch-all for the rest).
    Hwbp,
    /// KVM's Xen hypercall intercept: every hypercall reaching the kernel exits to user space.
    Xen,
}

impl Trap {
    /// The strategy's name, as `--trap` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Trap::Auto => "auto",
            Trap::Rewrite => "rewrite",
            Trap::Ud => "ud",
            Trap::Hwbp => "hwbp",
            Trap::Xen => "xen",
        }
    }
}

impl std::str::FromStr for Trap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Trap::Auto),
            "rewrite" => Ok(Trap::Rewrite),
            "ud" => Ok(Trap::Ud),
            "hwbp" => Ok(Trap::Hwbp),
            "xen" => Ok(Trap::Xen),
            _ => Err(format!("unknown trap strategy '{s}' (auto, rewrite, ud, hwbp, xen)")),
        }
    }
}

/// What the `xen` strategy requires of the kernel.
const XEN_NEEDS: &str = "needs KVM_CAP_XEN_HVM with KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL";

pub use debugregs::HW_BREAKPOINTS;

/// Where a KVM backend cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `/dev/kvm` could not be opened (missing, or no permission).
    #[error("cannot open /dev/kvm")]
    Open(#[source] vmm_sys_util::errno::Error),
    /// The kernel speaks another KVM API version than 12.
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    /// The kernel lacks `KVM_CAP_SYNC_REGS`, which the run loop relies on.
    #[error("this KVM lacks KVM_CAP_SYNC_REGS for regs and sregs")]
    NoSyncRegs,
    /// `VMCALL_NO_KVM` is set: act as a host without KVM.
    #[error("KVM is disabled by VMCALL_NO_KVM")]
    DisabledByEnv,
    /// The trap strategy asked for cannot work on this KVM.
    #[error("--trap {trap} is unavailable on this KVM: {reason}")]
    TrapUnavailable {
        /// The strategy's name.
        trap: &'static str,
        /// What the kernel lacks.
        reason: String,
    },
}

/// What this host's KVM offers vmcall.
#[derive(Debug, Clone)]
pub struct KvmCapabilities {
    /// `KVM_GET_API_VERSION` (12 on every kernel vmcall runs on).
    pub api_version: i32,
    /// `KVM_CAP_MAX_VCPUS`: most vCPUs per VM.
    pub max_vcpus: usize,
    /// `KVM_CAP_SYNC_REGS`: registers shared through the run structure.
    pub sync_regs: bool,
    /// `KVM_CAP_IMMEDIATE_EXIT`: a vCPU can be stopped without a signal race.
    pub immediate_exit: bool,
    /// KVM_X86_QUIRK_FIX_HYPERCALL_INSN can be disabled (needed by the #UD path).
    pub can_disable_hypercall_quirk: bool,
    /// `KVM_CAP_SET_GUEST_DEBUG`: hardware breakpoints (the `hwbp` strategy).
    pub guest_debug: bool,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM)` as reported: a mask of
    /// `KVM_XEN_HVM_CONFIG_*` bits (0 without `CONFIG_KVM_XEN`, 1 before Linux 5.12).
    pub xen_hvm: i32,
    /// `xen_hvm` has `KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL`: the `xen` strategy works here.
    pub xen_intercept: bool,
    /// `/sys/module/kvm_pvm` exists: the software PVM KVM, slow guest code.
    pub pvm: bool,
}

/// The KVM backend.
pub struct KvmHypervisor {
    kvm: Kvm,
    trap: Trap,
    caps: KvmCapabilities,
    /// KVM_GET_SUPPORTED_CPUID, fetched once: it never changes and costs more than creating
    /// a VM does.
    cpuid: std::sync::OnceLock<CpuId>,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor").field("trap", &self.trap).field("caps", &self.caps).finish()
    }
}

impl KvmHypervisor {
    /// Open `/dev/kvm` and check what vmcall needs. Setting the environment variable
    /// `VMCALL_NO_KVM=1` makes this fail, to exercise hosts without KVM.
    ///
    /// ```no_run
    /// use vmcall_kvm::{KvmHypervisor, Trap};
    /// use vmcall_vmm::vm::VmBuilder;
    ///
    /// let hv = KvmHypervisor::open(Trap::Auto)?;
    /// println!("trapping hypercalls with {}", hv.resolved_trap().name());
    /// let vm = VmBuilder::new(std::fs::read("guest.elf")?).build(&hv)?;
    /// println!("{:?}", vm.run().result);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(trap: Trap) -> Result<Self, OpenError> {
        if std::env::var_os("VMCALL_NO_KVM").is_some_and(|v| !v.is_empty() && v != "0") {
            return Err(OpenError::DisabledByEnv);
        }
        let kvm = Kvm::new().map_err(OpenError::Open)?;
        let caps = capabilities(&kvm);
        if caps.api_version != 12 {
            return Err(OpenError::ApiVersion(caps.api_version));
        }
        if !caps.sync_regs {
            return Err(OpenError::NoSyncRegs);
        }
        if trap == Trap::Xen {
            if let Some(why) = xen::unavailable_reason(caps.xen_hvm) {
                let reason = format!("it {XEN_NEEDS}; {why}");
                return Err(OpenError::TrapUnavailable { trap: trap.name(), reason });
            }
        }
        signal::install_handler();
        Ok(Self { kvm, trap, caps, cpuid: std::sync::OnceLock::new() })
    }

    /// What this KVM offers.
    pub fn capabilities(&self) -> &KvmCapabilities {
        &self.caps
    }

    /// The strategy asked for (see [`KvmHypervisor::resolved_trap`] for what `auto` picks).
    pub fn trap(&self) -> Trap {
        self.trap
    }

    /// The strategy VMs will use: the one asked for, or for [`Trap::Auto`] the one it picks
    /// on this KVM (xen where the intercept is available, else rewrite).
    pub fn resolved_trap(&self) -> Trap {
        match self.trap {
            Trap::Auto => auto_trap(&self.caps),
            t => t,
        }
    }

    fn supported_cpuid(&self) -> Result<CpuId, BackendError> {
        if let Some(c) = self.cpuid.get() {
            return Ok(c.clone());
        }
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(crate::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(self.cpuid.get_or_init(|| c).clone())
    }
}

fn capabilities(kvm: &Kvm) -> KvmCapabilities {
    let raw = |cap: u32| kvm.check_extension_raw(u64::from(cap));
    KvmCapabilities {
        api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus(),
        sync_regs: raw(KVM_CAP_SYNC_REGS) & SYNC_REGS_NEEDED == SYNC_REGS_NEEDED,
        immediate_exit: kvm.check_extension(Cap::ImmediateExit),
        can_disable_hypercall_quirk: raw(KVM_CAP_DISABLE_QUIRKS2) as u64
            & KVM_X86_QUIRK_FIX_HYPERCALL_INSN
            != 0,
        guest_debug: kvm.check_extension(Cap::SetGuestDebug),
        xen_hvm: raw(xen::KVM_CAP_XEN_HVM),
        xen_intercept: xen::intercept_available(raw(xen::KVM_CAP_XEN_HVM)),
        pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
    }
}

struct KvmVm {
    // Declared first so that the VM fd is closed before RAM is unmapped.
    vm: VmFd,
    ram: Arc<GuestRam>,
    cpuid: CpuId,
    traps: Arc<vcpu::Traps>,
    /// Linear addresses of the `hwbp` strategy's sites.
    hw_sites: Vec<u64>,
    description: String,
    pv: PvCpuid,
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(
        &self,
        ram: Arc<GuestRam>,
        guest: &GuestInfo,
    ) -> Result<Box<dyn VmBackend>, BackendError> {
        if guest.vcpus as usize > self.caps.max_vcpus {
            return Err(BackendError::Unsupported(format!(
                "{} vCPUs requested, this KVM supports {}",
                guest.vcpus, self.caps.max_vcpus
            )));
        }
        let vm = self.kvm.create_vm().map_err(crate::ioctl("KVM_CREATE_VM"))?;
        // SAFETY: `KvmVm` keeps the `Arc<GuestRam>` and drops the VM fd first.
        unsafe { map_guest_ram(&vm, &ram, 0) }?;
        let quirk_off =
            self.caps.can_disable_hypercall_quirk && disable_hypercall_quirk(&vm).is_ok();
        let trap = match (self.trap, self.resolved_trap()) {
            (Trap::Auto, Trap::Xen) => match xen::enable_intercept(&vm) {
                Ok(()) => Trap::Xen,
                Err(e) => {
                    tracing::warn!(error = %e, "the Xen hypercall intercept is advertised but could not be enabled; using --trap rewrite");
                    Trap::Rewrite
                }
            },
            (Trap::Auto, t) => t,
            (Trap::Xen, _) => {
                if let Some(why) = xen::unavailable_reason(self.caps.xen_hvm) {
                    return Err(BackendError::Unsupported(format!(
                        "--trap xen {XEN_NEEDS}; {why}; use --trap rewrite"
                    )));
                }
                xen::enable_intercept(&vm)?;
                Trap::Xen
            }
            (Trap::Ud, _) if !quirk_off => {
                return Err(BackendError::Unsupported(
                    "--trap ud needs KVM_CAP_DISABLE_QUIRKS2 with KVM_X86_QUIRK_FIX_HYPERCALL_INSN, which this KVM lacks; use --trap rewrite".into(),
                ))
            }
            (Trap::Hwbp, _) if !self.caps.guest_debug => {
                return Err(BackendError::Unsupported(
                    "--trap hwbp needs KVM_CAP_SET_GUEST_DEBUG, which this KVM lacks".into(),
                ))
            }
            (t, _) => t,
        };
        let sites = SiteTable::default();
        let single_vcpu = guest.vcpus == 1;
        let hw_sites = match trap {
            Trap::Rewrite => {
                let sites_proven = rewrite::prove_sites(&ram, &guest.segments, &guest.code_roots);
                // With the quirk off the other vendor's instruction must raise #UD: never
                // rewrite it.
                let wanted = |insn: &HypercallInsn| {
                    guest.foreign.action(*insn, HypercallInsn::native()) != InsnAction::RaiseUd
                };
                for (gpa, insn) in sites_proven.into_iter().filter(|(_, i)| wanted(i)) {
                    sites
                        .rewrite(&ram, gpa, insn, single_vcpu)
                        .map_err(|e| BackendError::setup("rewriting hypercall sites", e))?;
                }
                Vec::new()
            }
            Trap::Hwbp => {
                let mut all: Vec<u64> = rewrite::scan_segments(&ram, &guest.segments)
                    .map_err(|e| BackendError::setup("reading code", e))?
                    .into_iter()
                    .filter(|(_, insn)| {
                        guest.foreign.action(*insn, HypercallInsn::native()) != InsnAction::RaiseUd
                    })
                    .map(|(addr, _)| addr)
                    .collect();
                all.sort_unstable();
                if all.len() > HW_BREAKPOINTS {
                    tracing::warn!(
                        sites = all.len(),
                        "more hypercall sites than hardware breakpoints; the rest go through #UD"
                    );
                }
                all.truncate(HW_BREAKPOINTS);
                all
            }
            _ => Vec::new(),
        };
        let catch_all = if quirk_off {
            "other hypercalls trap through #UD into the VMM's IDT, or into the guest's own IDT under a breakpoint on its handler"
        } else {
            "the hypercall quirk cannot be disabled here, so sites not found statically are not trapped"
        };
        let gap = unseen_native_calls(self.caps.pvm, trap, self.caps.xen_intercept);
        if let Some(gap) = &gap {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("{gap}"));
        }
        let description = match trap {
            Trap::Xen => format!(
                "trap=xen (KVM_XEN_HVM_CONFIG intercept: every native hypercall exits as KVM_EXIT_XEN; {})",
                if quirk_off {
                    "the other vendor's instruction traps through #UD into the VMM's IDT"
                } else {
                    "the kernel patches the other vendor's instruction into the native one, which then exits"
                }
            ),
            Trap::Rewrite => format!(
                "trap=rewrite ({} proven sites rewritten to port doorbells, others once they trap; {catch_all})",
                sites.len()
            ),
            Trap::Hwbp => {
                format!("trap=hwbp ({} sites on debug registers; {catch_all})", hw_sites.len())
            }
            _ => format!("trap=ud ({catch_all})"),
        };
        let description = match gap {
            Some(gap) => format!("{description}; warning: {gap}"),
            None => description,
        };
        let traps = Arc::new(vcpu::Traps {
            sites,
            rewrite_on_trap: trap == Trap::Rewrite,
            single_vcpu,
            resume_shutdown: self.caps.pvm,
            // kvm_pvm never fires a data breakpoint (tried: a watched write runs on).
            data_breakpoints: !self.caps.pvm && self.caps.guest_debug,
            guest_debug: self.caps.guest_debug,
            // INT3 under KVM_GUESTDBG_USE_SW_BP is an internal error on kvm_pvm.
            sw_breakpoints: !self.caps.pvm && self.caps.guest_debug,
            watch_guest_idt: quirk_off && self.caps.guest_debug,
            mmap_size: self
                .kvm
                .get_vcpu_mmap_size()
                .map_err(crate::ioctl("KVM_GET_VCPU_MMAP_SIZE"))?,
            native: HypercallInsn::native(),
            foreign: guest.foreign,
            watch_reported: Default::default(),
        });
        if !vmcall_vmm::vm::host_is_amd() && ram.size() <= 0xfffb_d000 {
            // Intel only: VMX needs it for real-mode emulation on CPUs without unrestricted
            // guest support (a new vCPU starts in real mode).
            let _ = vm.set_tss_address(0xfffb_d000);
        }
        let cpuid = self.supported_cpuid()?;
        Ok(Box::new(KvmVm { vm, ram, cpuid, traps, hw_sites, description, pv: guest.pv }))
    }
}

/// The strategy [`Trap::Auto`] stands for on a KVM with `caps`.
fn auto_trap(caps: &KvmCapabilities) -> Trap {
    if caps.xen_intercept {
        Trap::Xen
    } else {
        Trap::Rewrite
    }
}

/// What a hardware KVM answers behind vmcall's back under `trap` (already resolved, never
/// `Auto`), or `None` where vmcall sees every hypercall. On hardware the vendor's native
/// instruction is handled inside the kernel, so only sites vmcall changed or watches reach it;
/// on kvm_pvm every hypercall instruction the kernel meets raises #UD into the VMM's stub, and
/// under `xen` every one exits.
fn unseen_native_calls(pvm: bool, trap: Trap, xen_intercept: bool) -> Option<String> {
    if pvm || trap == Trap::Xen {
        return None;
    }
    let which = match trap {
        Trap::Ud => "all native hypercall instructions",
        Trap::Hwbp => "native hypercall instructions beyond the first four sites, and in code not present at load time (JIT, code written at run time, modules loaded later),",
        _ => "native hypercall instructions in code not present at load time (JIT, code written at run time, modules loaded later)",
    };
    let fix = if xen_intercept {
        "--trap xen would bring them to vmcall"
    } else {
        "this KVM lacks the Xen intercept (KVM_CAP_XEN_HVM with INTERCEPT_HCALL) that would bring them to vmcall"
    };
    Some(format!(
        "on hardware KVM {which} are answered by the kernel itself (-1000 for unknown numbers) and never reach vmcall; {fix}"
    ))
}

/// The error of the failed KVM call `op`, with the errno it returned as its source.
pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError {
    move |e| BackendError::hypervisor(op, e.errno())
}

/// Register `ram` as memory slot 0 of `vm` at guest-physical `gpa`.
///
/// # Safety
/// `ram`'s mapping must outlive `vm` (KVM keeps using the host addresses until the VM fd is
/// closed): keep the `GuestRam` alive and drop the VM fd first.
unsafe fn map_guest_ram(vm: &VmFd, ram: &GuestRam, gpa: u64) -> Result<(), BackendError> {
    let (host, len) = ram.host_mapping();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: len as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host..host+len` is the live mapping of `ram`, which the caller keeps alive for
    // as long as the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(crate::ioctl("KVM_SET_USER_MEMORY_REGION"))
}

/// Disable KVM_X86_QUIRK_FIX_HYPERCALL_INSN, so that a hypercall instruction the kernel does
/// not handle raises #UD in the guest instead of being patched.
fn disable_hypercall_quirk(vm: &VmFd) -> Result<(), BackendError> {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_DISABLE_QUIRKS2, ..Default::default() };
    cap.args[0] = KVM_X86_QUIRK_FIX_HYPERCALL_INSN;
    vm.enable_cap(&cap).map_err(crate::ioctl("KVM_CAP_DISABLE_QUIRKS2"))
}

impl VmBackend for KvmVm {
    fn create_vcpu(&self, id: u32, init: &VcpuInit) -> Result<Box<dyn Vcpu>, BackendError> {
        let fd = self.vm.create_vcpu(u64::from(id)).map_err(crate::ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                // Initial APIC id = vCPU id; an xAPIC (EDX bit 9), and no x2APIC (ECX bit 21),
                // which vmcall does not implement.
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                e.edx |= 1 << 9;
                e.ecx &= !(1 << 21);
            }
            // The KVM leaves say what vmcall implements (or what the user chose), the same on
            // every backend, rather than the kernel's own PV features.
            if let Some([a, b, c, d]) = self.pv.leaf(e.function) {
                (e.eax, e.ebx, e.ecx, e.edx) = (a, b, c, d);
            }
        }
        fd.set_cpuid2(&cpuid).map_err(crate::ioctl("KVM_SET_CPUID2"))?;
        if self.pv.enforce {
            // The kernel then refuses the PV MSRs the guest's CPUID does not offer (#GP), as
            // the shared emulation refuses such hypercalls.
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap).map_err(crate::ioctl("KVM_CAP_ENFORCE_PV_FEATURE_CPUID"))?;
        }
        let mut sregs = fd.get_sregs().map_err(crate::ioctl("KVM_GET_SREGS"))?;
        regs::apply_sregs(&mut sregs, &init.sregs);
        fd.set_sregs(&sregs).map_err(crate::ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::regs_to_kvm(&init.regs)).map_err(crate::ioctl("KVM_SET_REGS"))?;
        // The FPU/SSE state KVM gives a new vCPU (FCW 0x37f, MXCSR 0x1f80) is what guests
        // expect; setting it again would be one more ioctl on every VM's start.
        Ok(Box::new(vcpu::KvmVcpu::new(
            fd,
            self.ram.clone(),
            self.traps.clone(),
            self.hw_sites.clone(),
        )?))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn syscalls(&self, kind: vmcall_vmm::seccomp::ThreadKind) -> Vec<vmcall_vmm::seccomp::Allowed> {
        seccomp::syscalls(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(xen_hvm: i32, pvm: bool) -> KvmCapabilities {
        KvmCapabilities {
            api_version: 12,
            max_vcpus: 1024,
            sync_regs: true,
            immediate_exit: true,
            can_disable_hypercall_quirk: true,
            guest_debug: true,
            xen_hvm,
            xen_intercept: xen::intercept_available(xen_hvm),
            pvm,
        }
    }

    #[test]
    fn trap_names_round_trip() {
        for t in [Trap::Auto, Trap::Rewrite, Trap::Ud, Trap::Hwbp, Trap::Xen] {
            assert_eq!(t.name().parse::<Trap>(), Ok(t));
        }
        let e = "vmcall".parse::<Trap>().unwrap_err();
        assert!(e.contains("xen") && e.contains("rewrite"), "{e}");
    }

    #[test]
    fn auto_picks_xen_wherever_the_intercept_is_available() {
        assert_eq!(auto_trap(&caps(0x1ff, false)), Trap::Xen);
        assert_eq!(auto_trap(&caps(0x1b7, false)), Trap::Xen);
        assert_eq!(auto_trap(&caps(0, false)), Trap::Rewrite, "no CONFIG_KVM_XEN");
        assert_eq!(auto_trap(&caps(1, false)), Trap::Rewrite, "before Linux 5.12");
        assert_eq!(auto_trap(&caps(0, true)), Trap::Rewrite, "kvm_pvm");
    }

    #[test]
    fn warns_where_the_kernel_answers_native_calls() {
        // Hardware without the intercept: code written at run time is lost to the kernel.
        let w = unseen_native_calls(false, Trap::Rewrite, false).unwrap();
        assert!(w.contains("not present at load time") && w.contains("-1000"), "{w}");
        assert!(w.contains("KVM_CAP_XEN_HVM"), "{w}");
        let w = unseen_native_calls(false, Trap::Hwbp, false).unwrap();
        assert!(w.contains("first four sites"), "{w}");
        assert!(unseen_native_calls(false, Trap::Ud, false).unwrap().contains("all native"));
        // The same gap when the intercept exists but was not chosen, with the way out.
        let w = unseen_native_calls(false, Trap::Rewrite, true).unwrap();
        assert!(w.contains("--trap xen"), "{w}");
        // No gap under xen, nor on kvm_pvm, where every hypercall instruction raises #UD.
        assert_eq!(unseen_native_calls(false, Trap::Xen, true), None);
        assert_eq!(unseen_native_calls(true, Trap::Rewrite, false), None);
        assert_eq!(unseen_native_calls(true, Trap::Ud, false), None);
    }
}
