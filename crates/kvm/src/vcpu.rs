//! One KVM vCPU: runs KVM_RUN and translates each exit into vmcall's neutral [`VcpuExit`].
//!
//! Registers move through `kvm_run`'s sync-regs area (KVM_CAP_SYNC_REGS): the kernel stores
//! GPRs and sregs there on every exit, and loads the GPRs back when we mark them dirty, so a
//! hypercall costs no register ioctl at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{SyncReg, VcpuExit as KvmExit, VcpuFd};
use vmcall_abi::{insn, ports};
use vmcall_vmm::backend::{BackendError, GuestFault, InlineExits, Interrupter, Vcpu, VcpuExit};
use vmcall_vmm::boot;
use vmcall_vmm::hypercall::{HypercallExit, HypercallInsn};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::descriptors::{self, read_trap_frame};
use vmcall_vmm::x86::{CpuMode, DescriptorTable, PagingContext, Regs, Segment};

use crate::rewrite::DOORBELL_OUT_LEN;
use crate::signal::SignalInterrupter;
use crate::xen;

/// How to finish the hypercall of the last exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// A rewritten site: RIP is already past `out`, the `nop` completes the 3 bytes.
    Doorbell,
    /// Raised #UD or #GP into the VMM's IDT stub: the frame's RIP slot must point past the
    /// instruction.
    Frame {
        rip_slot: u64,
        resume: u64,
    },
    /// Hardware breakpoint before the instruction: move RIP past it.
    Breakpoint {
        resume: u64,
    },
    /// A `KVM_EXIT_XEN` hypercall: the answer goes in `kvm_run`, the kernel sets RAX and
    /// skips the instruction on the next KVM_RUN.
    Xen,
    /// An `in` whose data goes at this offset of `kvm_run`.
    IoIn {
        offset: usize,
        size: usize,
    },
}

pub(crate) struct KvmVcpu {
    // Declared first so that the fd (and its kvm_run mapping) is dropped before RAM.
    fd: VcpuFd,
    ram: Arc<GuestRam>,
    sites: Arc<HashMap<u64, HypercallInsn>>,
    breakpoints: Arc<Vec<u64>>,
    /// The host vendor's hypercall instruction (the only one a Xen exit can come from).
    native: HypercallInsn,
    pending: Pending,
    alive: Arc<Mutex<bool>>,
    /// Bytes KVM maps for `kvm_run` (KVM_GET_VCPU_MMAP_SIZE).
    mmap_size: usize,
}

impl KvmVcpu {
    pub(crate) fn new(
        mut fd: VcpuFd,
        ram: Arc<GuestRam>,
        sites: Arc<HashMap<u64, HypercallInsn>>,
        breakpoints: Arc<Vec<u64>>,
        native: HypercallInsn,
        mmap_size: usize,
    ) -> Self {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        Self {
            fd,
            ram,
            sites,
            breakpoints,
            native,
            pending: Pending::None,
            alive: Arc::new(Mutex::new(true)),
            mmap_size,
        }
    }

    fn hypercall(&self, rip: u64, insn: HypercallInsn, cpl: u8, mode: CpuMode) -> VcpuExit {
        let sync = self.fd.sync_regs();
        let r = &sync.regs;
        VcpuExit::Hypercall(HypercallExit {
            nr: r.rax,
            args: [r.rbx, r.rcx, r.rdx, r.rsi],
            cpl,
            mode,
            rip,
            insn,
            paging: paging_context(&sync.sregs),
        })
    }

    /// CPL and mode of the code running now, from the synced sregs.
    fn current_cpl_mode(&self) -> (u8, CpuMode) {
        let s = &self.fd.sync_regs().sregs;
        (s.ss.dpl, CpuMode::from_cs(&segment_from_kvm(&s.cs), s.efer, s.cr0))
    }

    fn translate_out(&mut self, port: u16, data: &[u8]) -> VcpuExit {
        let rip = self.fd.sync_regs().regs.rip;
        // `out imm8, al` is 2 bytes: RIP is just past it. The stubs ring their port first.
        let from_stub = |vector: u8| rip == boot::stub_gpa(vector) + 2;
        match port {
            ports::PORT_DOORBELL if data.len() == 1 => {
                let site = rip.wrapping_sub(DOORBELL_OUT_LEN);
                if let Some(&insn) = self.sites.get(&site) {
                    let (cpl, mode) = self.current_cpl_mode();
                    self.pending = Pending::Doorbell;
                    return self.hypercall(site, insn, cpl, mode);
                }
            }
            ports::PORT_HC_TRAP if from_stub(descriptors::UD_VECTOR) => {
                return self.translate_trap(descriptors::UD_VECTOR)
            }
            ports::PORT_HC_TRAP if from_stub(descriptors::GP_VECTOR) => {
                return self.translate_trap(descriptors::GP_VECTOR)
            }
            ports::PORT_FAULT if data.len() == 1 && rip == boot::stub_gpa(data[0]) + 4 => {
                return self.translate_fault(data[0]);
            }
            _ => {}
        }
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        VcpuExit::IoOut { port, size: n as u8, data: u32::from_le_bytes(word) }
    }

    /// A #UD or #GP stub rang: a hypercall instruction the CPU refused (any CPL, any mode,
    /// rewritten or not) or a genuine fault.
    fn translate_trap(&mut self, vector: u8) -> VcpuExit {
        let rsp = self.fd.sync_regs().regs.rsp;
        let Ok(frame) = read_trap_frame(&self.ram, rsp, vector) else {
            return VcpuExit::Unknown(format!(
                "exception {vector} frame at RSP {rsp:#x} is outside guest RAM"
            ));
        };
        let mut bytes = [0u8; 3];
        let is_hypercall =
            self.ram.read(frame.rip, &mut bytes).is_ok() && insn::is_hypercall(&bytes);
        // A #GP is a refused hypercall only from CPL > 0 (with error code 0); at CPL 0 a
        // hypercall instruction never raises #GP, so the fault is genuine.
        let refused_hypercall = is_hypercall
            && (vector == descriptors::UD_VECTOR
                || (frame.cs & 3 != 0 && frame.error_code == Some(0)));
        if !refused_hypercall {
            return VcpuExit::Fault(GuestFault {
                vector,
                error_code: frame.error_code,
                rip: frame.rip,
                cs: frame.cs,
                cr2: None,
            });
        }
        let sregs = &self.fd.sync_regs().sregs;
        let gdt = DescriptorTable { base: sregs.gdt.base, limit: sregs.gdt.limit };
        let mode = match descriptors::code_segment(&self.ram, gdt, frame.cs) {
            Some(cs) => CpuMode::from_cs(&cs, sregs.efer, sregs.cr0),
            None => CpuMode::Long64,
        };
        let insn =
            if bytes == insn::VMCALL { HypercallInsn::Vmcall } else { HypercallInsn::Vmmcall };
        self.pending =
            Pending::Frame { rip_slot: frame.rip_slot, resume: frame.rip + insn::HYPERCALL_LEN };
        self.hypercall(frame.rip, insn, (frame.cs & 3) as u8, mode)
    }

    /// A `KVM_EXIT_XEN`: under the `xen` strategy, every hypercall that reached the kernel.
    fn translate_xen(&mut self) -> VcpuExit {
        let run = self.fd.get_kvm_run();
        let Some(call) = xen::decode(run) else {
            return VcpuExit::Unknown(format!(
                "KVM_EXIT_XEN of type {} (only KVM_EXIT_XEN_HCALL is expected)",
                xen::exit_type(run).unwrap_or(u32::MAX)
            ));
        };
        let sync = self.fd.sync_regs();
        self.pending = Pending::Xen;
        VcpuExit::Hypercall(xen::hypercall_exit(&call, &sync.regs, &sync.sregs, self.native))
    }

    fn translate_fault(&mut self, vector: u8) -> VcpuExit {
        let rsp = self.fd.sync_regs().regs.rsp;
        match read_trap_frame(&self.ram, rsp, vector) {
            Ok(f) => VcpuExit::Fault(GuestFault {
                vector,
                error_code: f.error_code,
                rip: f.rip,
                cs: f.cs,
                cr2: (vector == 14).then(|| self.fd.sync_regs().sregs.cr2),
            }),
            Err(_) => {
                VcpuExit::Unknown(format!("exception {vector} with its frame outside guest RAM"))
            }
        }
    }

    fn translate_debug(&mut self, pc: u64, dr6: u64) -> VcpuExit {
        // dr7 is unreliable on some KVMs (kvm-host-facts.md): classify by pc and dr6 alone.
        if dr6 & 0xf != 0 && self.breakpoints.contains(&pc) {
            let mut bytes = [0u8; 3];
            if self.ram.read(pc, &mut bytes).is_ok() && insn::is_hypercall(&bytes) {
                let insn = if bytes == insn::VMCALL {
                    HypercallInsn::Vmcall
                } else {
                    HypercallInsn::Vmmcall
                };
                let (cpl, mode) = self.current_cpl_mode();
                self.pending = Pending::Breakpoint { resume: pc + insn::HYPERCALL_LEN };
                return self.hypercall(pc, insn, cpl, mode);
            }
        }
        VcpuExit::Debug { rip: pc }
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        *self.alive.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

fn err(what: &str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError + '_ {
    move |e| BackendError::with(what.to_string(), e)
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, _: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        self.pending = Pending::None;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(BackendError::with("KVM_RUN failed", e)),
        };
        let exit = match exit {
            KvmExit::IoOut(port, data) => {
                let data = data.to_vec();
                self.translate_out(port, &data)
            }
            KvmExit::IoIn(port, data) => {
                let size = data.len().min(4);
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the active union field.
                let offset = unsafe { run.__bindgen_anon_1.io.data_offset } as usize;
                self.pending = Pending::IoIn { offset, size };
                VcpuExit::IoIn { port, size: size as u8 }
            }
            KvmExit::Hlt => VcpuExit::Hlt,
            KvmExit::Shutdown => VcpuExit::Shutdown { rip: self.fd.sync_regs().regs.rip },
            KvmExit::Debug(arch) => self.translate_debug(arch.pc, arch.dr6),
            KvmExit::MmioRead(gpa, data) => {
                VcpuExit::Mmio { gpa, write: false, len: data.len() as u8 }
            }
            KvmExit::MmioWrite(gpa, data) => {
                VcpuExit::Mmio { gpa, write: true, len: data.len() as u8 }
            }
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::Unsupported(kvm_bindings::KVM_EXIT_XEN) => self.translate_xen(),
            KvmExit::InternalError => {
                let rip = self.fd.sync_regs().regs.rip;
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let mut bytes = [0u8; 8];
                let _ = self.ram.read(rip, &mut bytes);
                VcpuExit::Unknown(format!(
                    "KVM internal error {} at RIP {rip:#x} (code {bytes:02x?}){}",
                    internal.suberror,
                    if internal.suberror == 1 {
                        ": KVM could not emulate this instruction (software KVMs such as kvm_pvm emulate every guest instruction and lack many, most SSE ones among them; see docs/kvm-backend.md)"
                    } else {
                        ""
                    }
                ))
            }
            KvmExit::FailEntry(reason, cpu) => VcpuExit::Unknown(format!(
                "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
            )),
            other => VcpuExit::Unknown(format!("KVM exit {other:?}")),
        };
        Ok(exit)
    }

    fn complete_hypercall(&mut self, rax: u64) -> Result<(), BackendError> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Doorbell => {}
            Pending::Frame { rip_slot, resume } => {
                self.ram
                    .write_u64(rip_slot, resume)
                    .map_err(|e| BackendError::with("resume exception frame", e))?;
            }
            Pending::Breakpoint { resume } => self.fd.sync_regs_mut().regs.rip = resume,
            Pending::Xen => {
                // Neither RAX nor RIP through sync regs: the kernel writes RAX from `result`
                // and skips the instruction only if RIP is unchanged.
                if !xen::complete(self.fd.get_kvm_run(), rax) {
                    return Err(BackendError::new("no KVM_EXIT_XEN hypercall to complete"));
                }
                return Ok(());
            }
            other => {
                return Err(BackendError::new(format!("no hypercall to complete ({other:?})")))
            }
        }
        self.fd.sync_regs_mut().regs.rax = rax;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        Ok(())
    }

    fn complete_io_in(&mut self, data: u32) -> Result<(), BackendError> {
        let Pending::IoIn { offset, size } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return Err(BackendError::new("no port read to complete"));
        };
        // The data lives past `struct kvm_run`, usually on the mapping's second page (kernel
        // `KVM_PIO_PAGE_OFFSET`): anywhere inside the KVM_GET_VCPU_MMAP_SIZE bytes mapped.
        let run_size = std::mem::size_of::<kvm_bindings::kvm_run>();
        if offset < run_size || offset.checked_add(size).is_none_or(|end| end > self.mmap_size) {
            return Err(BackendError::new(format!(
                "port-read data offset {offset} outside the {} byte kvm_run mapping",
                self.mmap_size
            )));
        }
        let dst =
            (self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run as *mut u8).wrapping_add(offset);
        // SAFETY: kvm_run is the start of a mapping of `mmap_size` bytes (KVM_GET_VCPU_MMAP_SIZE,
        // which kvm-ioctls mapped), and `offset..offset + size` lies inside it (checked above);
        // we write `size` <= 4 bytes there while no other reference to that area exists.
        unsafe { std::ptr::copy_nonoverlapping(data.to_le_bytes().as_ptr(), dst, size) };
        Ok(())
    }

    fn regs(&mut self) -> Result<Regs, BackendError> {
        Ok(regs_from_kvm(&self.fd.get_regs().map_err(err("KVM_GET_REGS"))?))
    }

    fn guest_tsc(&mut self) -> u64 {
        const IA32_TSC: u32 = 0x10;
        let Ok(mut msrs) =
            Msrs::from_entries(&[kvm_msr_entry { index: IA32_TSC, ..Default::default() }])
        else {
            return 0;
        };
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => msrs.as_slice()[0].data,
            _ => 0,
        }
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        Arc::new(SignalInterrupter::for_current_thread(self.alive.clone()))
    }
}

/// The registers that say how the guest translates addresses, from KVM's sregs.
pub(crate) fn paging_context(s: &kvm_sregs) -> PagingContext {
    PagingContext { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer }
}

/// Build `$ty` from `$from` field by field (the two register structs share field names).
macro_rules! copy_fields {
    ($from:expr, $ty:ident { $($f:ident),* $(,)? }) => {
        $ty { $($f: $from.$f),* }
    };
}

macro_rules! gprs {
    ($from:expr, $ty:ident) => {
        copy_fields!(
            $from,
            $ty {
                rax,
                rbx,
                rcx,
                rdx,
                rsi,
                rdi,
                rsp,
                rbp,
                r8,
                r9,
                r10,
                r11,
                r12,
                r13,
                r14,
                r15,
                rip,
                rflags
            }
        )
    };
}

pub(crate) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    gprs!(r, kvm_regs)
}

pub(crate) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    gprs!(r, Regs)
}

pub(crate) fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

pub(crate) fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// Apply vmcall's special registers on top of the vCPU's current ones.
pub(crate) fn apply_sregs(k: &mut kvm_sregs, s: &vmcall_vmm::x86::SpecialRegs) {
    k.cs = segment_to_kvm(&s.cs);
    k.ds = segment_to_kvm(&s.ds);
    k.es = segment_to_kvm(&s.es);
    k.fs = segment_to_kvm(&s.fs);
    k.gs = segment_to_kvm(&s.gs);
    k.ss = segment_to_kvm(&s.ss);
    k.tr = segment_to_kvm(&s.tr);
    k.ldt = segment_to_kvm(&s.ldt);
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.efer = s.efer;
}
