//! The syscalls a KVM vCPU thread makes beyond vmcall's common list (`vmcall_vmm::seccomp`):
//! `ioctl` on its vCPU file descriptor, and only the requests the run loop uses.

#![allow(non_upper_case_globals)]

use kvm_bindings::{kvm_guest_debug, kvm_msrs, kvm_regs, kvm_sregs, KVMIO};
use vmcall_vmm::seccomp::{Allowed, ThreadKind};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_GUEST_DEBUG, KVMIO, 0x9b, kvm_guest_debug);

/// The KVM backend's additions for threads of `kind`.
pub(crate) fn syscalls(kind: ThreadKind) -> Vec<Allowed> {
    match kind {
        ThreadKind::Vcpu => vec![Allowed::one_of(
            libc::SYS_ioctl,
            1,
            &[
                // Running the guest until its next exit.
                KVM_RUN(),
                // The registers for diagnostics (`Vcpu::regs`); the run loop itself reads
                // and writes them through the shared kvm_run page (KVM_CAP_SYNC_REGS).
                KVM_GET_REGS(),
                // The guest's TSC for KVM_HC_CLOCK_PAIRING.
                KVM_GET_MSRS(),
                // Hardware breakpoints: `--trap hwbp` sites, the guest-IDT watch, a debugger's.
                KVM_SET_GUEST_DEBUG(),
                // A debugger's register access before the vCPU's first exit (after it, the
                // sync-regs area serves): `vmcall run --gdb`.
                KVM_SET_REGS(),
                KVM_GET_SREGS(),
            ],
            "KVM vCPU: KVM_RUN, KVM_GET_REGS, KVM_GET_MSRS, KVM_SET_GUEST_DEBUG, KVM_SET_REGS, KVM_GET_SREGS",
        )],
        // The gdb stub stops a running guest (Ctrl-C, a stop request) by kicking each vCPU
        // thread out of KVM_RUN with the kick signal (`signal.rs`), as the run's own stop does.
        ThreadKind::Gdb => vec![Allowed::one_of(
            libc::SYS_tgkill,
            2,
            &[crate::signal::kick_signal() as u64],
            "gdb stub: kicking vCPUs out of KVM_RUN to stop the guest (the kick signal only)",
        )],
        ThreadKind::Main => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_SET_GUEST_DEBUG(), 0x4048_ae9b);
        assert_eq!(KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
    }
}
