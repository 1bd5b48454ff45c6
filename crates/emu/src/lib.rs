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
#![warn(missing_docs)]

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

/// Guests with at most this much RAM get [`SMALL_TCG_BUFFER`] unless
/// [`EmuHypervisor::tcg_buffer`] says otherwise; larger ones get unicorn's own default.
pub const SMALL_GUEST_RAM: u64 = 64 << 20;
/// The translation buffer of each vCPU's engine in a small guest. Unicorn's own default is
/// 1 GiB, which QEMU asks the kernel to back with transparent huge pages: the first
/// translated block then makes a whole 2 MiB page resident, per vCPU, and faulting it in
/// (with compaction) is most of a small VM's start time. No huge page fits in a buffer below
/// 2 MiB, so a small guest pays only for the 4 KiB pages its translations touch
/// (docs/bench.md, "Density"). Code that outgrows the buffer is not lost: unicorn flushes it
/// and translates again, correct but slower.
pub const SMALL_TCG_BUFFER: u32 = 1 << 20;

/// The translation buffer a guest with `ram` bytes of RAM gets by default: [`SMALL_TCG_BUFFER`]
/// up to [`SMALL_GUEST_RAM`], else 0 (unicorn's own default, 1 GiB).
pub fn default_tcg_buffer(ram: u64) -> u32 {
    if ram <= SMALL_GUEST_RAM {
        SMALL_TCG_BUFFER
    } else {
        0
    }
}

/// The software-CPU backend.
///
/// ```no_run
/// use std::sync::Arc;
/// use vmcall_vmm::hypercall::{Call, HypercallTable};
/// use vmcall_vmm::vm::VmBuilder;
///
/// let table = Arc::new(HypercallTable::new());
/// table.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2))?;
/// let vm = VmBuilder::new(std::fs::read("guest.elf")?)
///     .table(table)
///     .build(&vmcall_emu::EmuHypervisor::new())?;
/// let report = vm.run();
/// println!("{:?}, {} hypercalls", report.result, report.stats.total_hypercalls());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct EmuHypervisor {
    /// The translation buffer of every engine; None: [`default_tcg_buffer`] of the guest's RAM.
    tcg_buffer: Option<u32>,
}

impl EmuHypervisor {
    /// The backend: it holds no state until a VM is created.
    pub fn new() -> Self {
        Self::default()
    }

    /// Give each vCPU's engine a translation buffer of `bytes`, whatever the guest's RAM
    /// (unicorn raises anything below 1 MiB to 1 MiB; 0 means unicorn's own default, 1 GiB).
    pub fn tcg_buffer(mut self, bytes: u32) -> Self {
        self.tcg_buffer = Some(bytes);
        self
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
        let tcg_buffer = self.tcg_buffer.unwrap_or_else(|| default_tcg_buffer(ram.size()));
        let config = vcpu::VcpuConfig {
            pv: guest.pv,
            foreign: guest.foreign,
            tcg_buffer,
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
            ThreadKind::Main | ThreadKind::Gdb => Vec::new(),
        }
    }
}
