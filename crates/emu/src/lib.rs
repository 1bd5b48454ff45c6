//! vmcall's software-CPU backend: one unicorn engine (QEMU's TCG) per vCPU, all over the same
//! guest RAM, behind the same backend trait as KVM.
//!
//! VMCALL and VMMCALL are trapped exactly where they execute: unicorn raises an
//! invalid-instruction event for both, at any CPL and in any mode; this backend answers it through
//! the VMM's one dispatcher. A site that has trapped as a hypercall at CPL 0 is then rewritten into
//! a port doorbell that the emulator answers inside the translated block, about twice as fast (see
//! `doorbell` and `docs/emu-backend.md`).
//!
//! This crate links the unicorn engine and is therefore GPL-2.0; the rest of vmcall is not.

pub mod baseline;
mod cpu_state;
mod doorbell;
mod exceptions;
mod hooks;
mod ram;
mod uc;
mod vcpu;

use std::sync::Arc;

use vmcall_vmm::backend::{BackendError, GuestInfo, Hypervisor, Vcpu, VmBackend};
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::seccomp::{Allowed, ThreadKind};

/// The software-CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmuHypervisor;

impl EmuHypervisor {
    pub fn new() -> Self {
        Self
    }
}

/// The version of the unicorn engine built in, e.g. "2.1.3".
pub fn unicorn_version() -> String {
    use unicorn_engine::unicorn_const::{VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH};
    format!("{VERSION_MAJOR}.{VERSION_MINOR}.{VERSION_PATCH}")
}

struct EmuVm {
    ram: Arc<GuestRam>,
    config: vcpu::VcpuConfig,
}

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn create_vm(
        &self,
        ram: Arc<GuestRam>,
        guest: &GuestInfo,
    ) -> Result<Box<dyn VmBackend>, BackendError> {
        let config = vcpu::VcpuConfig {
            pv: guest.pv,
            foreign: guest.foreign,
            sites: Default::default(),
            single_vcpu: guest.vcpus <= 1,
        };
        Ok(Box::new(EmuVm { ram, config }))
    }
}

impl VmBackend for EmuVm {
    fn create_vcpu(&self, _id: u32, init: &VcpuInit) -> Result<Box<dyn Vcpu>, BackendError> {
        Ok(Box::new(vcpu::EmuVcpu::new(self.ram.clone(), *init, self.config.clone())))
    }

    fn describe(&self) -> String {
        format!(
            "unicorn {} software CPU (VMCALL/VMMCALL trapped where they execute; CPL 0 sites then rewritten to a port doorbell)",
            unicorn_version()
        )
    }

    fn syscalls(&self, kind: ThreadKind) -> Vec<Allowed> {
        match kind {
            // The engine is created on its vCPU thread, and its JIT maps its translation
            // buffer there: readable, writable and executable (the common list never allows
            // PROT_EXEC).
            ThreadKind::Vcpu => vec![
                Allowed::any(libc::SYS_mmap, "unicorn's JIT: its executable translation buffer"),
                Allowed::any(libc::SYS_mprotect, "unicorn's JIT: guard pages of that buffer"),
            ],
            ThreadKind::Main => Vec::new(),
        }
    }
}
