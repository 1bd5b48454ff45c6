//! Raw KVM loops for `vmcall bench`: the least host work KVM allows, so that vmcall's costs
//! can be stated as ratios against them, measured in the same run.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmcall_abi::ports;
use vmcall_vmm::backend::{BackendError, Interrupter};
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::stats::Latency;

use crate::signal::{self, SignalInterrupter};
use crate::{disable_hypercall_quirk, map_guest_ram};

fn err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError {
    crate::ioctl(what)
}

/// One VM with one vCPU and no vmcall machinery: no rewriting, no dispatch, no statistics.
pub struct RawVm {
    // Declared first so the fds are closed before RAM is unmapped.
    vcpu: VcpuFd,
    _vm: VmFd,
    _ram: Arc<GuestRam>,
}

impl std::fmt::Debug for RawVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawVm")
    }
}

impl RawVm {
    /// A VM over `ram` with one vCPU in the state `init`. With `kernel_hypercalls` the KVM
    /// defaults stay (the kernel answers hypercalls itself); otherwise the hypercall quirk is
    /// disabled as vmcall does.
    pub fn new(
        ram: Arc<GuestRam>,
        init: &VcpuInit,
        kernel_hypercalls: bool,
    ) -> Result<Self, BackendError> {
        signal::install_handler();
        let kvm = Kvm::new().map_err(err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        // SAFETY: `_ram` keeps the mapping alive and is declared after the fds, so it is
        // dropped after them.
        unsafe { map_guest_ram(&vm, &ram, 0) }?;
        if !kernel_hypercalls {
            disable_hypercall_quirk(&vm)?;
        }
        let vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        crate::regs::apply_sregs(&mut sregs, &init.sregs);
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&crate::regs::regs_to_kvm(&init.regs)).map_err(err("KVM_SET_REGS"))?;
        Ok(Self { vcpu, _vm: vm, _ram: ram })
    }

    /// Run the guest until it writes the exit port, doing nothing but KVM_RUN for each `out`
    /// to `port` and recording the time between consecutive ones (one round trip each).
    pub fn out_round_trips(&mut self, port: u16, lat: &mut Latency) -> Result<(), BackendError> {
        let mut last: Option<Instant> = None;
        loop {
            match self.vcpu.run().map_err(err("KVM_RUN"))? {
                KvmExit::IoOut(p, _) if p == port => {
                    let now = Instant::now();
                    if let Some(prev) = last.replace(now) {
                        lat.record(now.duration_since(prev).as_nanos() as u64);
                    }
                }
                KvmExit::IoOut(ports::PORT_EXIT, _) => return Ok(()),
                KvmExit::IoOut(..) => {}
                other => return Err(BackendError::UnexpectedExit(format!("{other:?}"))),
            }
        }
    }

    /// Run until the guest writes the exit port, or give up after `limit` (a KVM that never
    /// returns from a hypercall, like kvm_pvm's): the elapsed time, or `None` if it gave up.
    pub fn run_to_exit(&mut self, limit: Duration) -> Result<Option<Duration>, BackendError> {
        let alive = Arc::new(Mutex::new(true));
        let kick = SignalInterrupter::for_current_thread(alive.clone());
        let (done, wait) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if wait.recv_timeout(limit).is_err() {
                // Keep kicking until the vCPU thread notices (a kick can land between runs).
                while wait.recv_timeout(Duration::from_millis(5)).is_err() {
                    kick.interrupt();
                }
            }
        });
        let start = Instant::now();
        let result = loop {
            match self.vcpu.run() {
                Ok(KvmExit::IoOut(ports::PORT_EXIT, _)) => break Ok(Some(start.elapsed())),
                Ok(KvmExit::IoOut(..)) => {}
                Ok(other) => break Err(BackendError::UnexpectedExit(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR => {
                    if start.elapsed() >= limit {
                        break Ok(None);
                    }
                }
                Err(e) => break Err(crate::ioctl("KVM_RUN")(e)),
            }
        };
        *alive.lock().unwrap_or_else(|p| p.into_inner()) = false;
        let _ = done.send(());
        let _ = watchdog.join();
        result
    }
}

/// The least a VMM can do to run a guest: open /dev/kvm, create a VM with one 4 KiB memory
/// slot and one vCPU in real mode, run it until its first exit (`out 0x80, al`), and tear it all
/// down again. Returns the time all of that took.
pub fn cold_start_minimal() -> Result<Duration, BackendError> {
    let start = Instant::now();
    minimal_vm_first_exit()?;
    Ok(start.elapsed())
}

fn minimal_vm_first_exit() -> Result<(), BackendError> {
    const PAGE: usize = 4096;
    const CODE_AT: u64 = 0x1000;
    let kvm = Kvm::new().map_err(err("open /dev/kvm"))?;
    let ram = GuestRam::anonymous(PAGE).map_err(|e| BackendError::setup("guest page", e))?;
    ram.write(0, &[0xe6, 0x80, 0xf4]).map_err(|e| BackendError::setup("guest code", e))?; // out 0x80, al; hlt
    let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
    // SAFETY: `ram` is declared before `vm`, so it is dropped after it.
    unsafe { map_guest_ram(&vm, &ram, CODE_AT) }?;
    let mut vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs { rip: CODE_AT, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    match vcpu.run().map_err(err("KVM_RUN"))? {
        KvmExit::IoOut(0x80, _) => Ok(()),
        other => Err(BackendError::UnexpectedExit(format!("{other:?}"))),
    }
}
