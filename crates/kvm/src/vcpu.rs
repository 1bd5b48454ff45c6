//! One KVM vCPU: runs KVM_RUN and translates each exit into vmcall's neutral [`VcpuExit`].
//!
//! Registers move through `kvm_run`'s sync-regs area (KVM_CAP_SYNC_REGS): the kernel stores
//! GPRs and sregs there on every exit, and loads them back when we mark them dirty, so a
//! hypercall costs no register ioctl at all.
//!
//! Every guest address the host reads here — the instruction at RIP, an exception frame at
//! RSP, the GDT and IDT — is *virtual* and goes through the guest's own page tables
//! ([`VirtualMemory`]), so guests that build their own tables are read exactly.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{SyncReg, VcpuExit as KvmExit, VcpuFd};
use vmcall_abi::{insn, ports};
use vmcall_vmm::backend::{
    BackendError, DebugCaps, DebugStop, GuestDebug, GuestFault, InlineExits, Interrupter, Vcpu,
    VcpuExit,
};
use vmcall_vmm::boot;
use vmcall_vmm::hypercall::sites::{SiteTable, DOORBELL_SITE};
use vmcall_vmm::hypercall::{ForeignInsn, HypercallExit, HypercallInsn, InsnAction};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::descriptors::{self, code_segment, read_trap_frame, TrapFrame};
use vmcall_vmm::x86::mode::EFER_LMA;
use vmcall_vmm::x86::{CpuMode, DescriptorTable, Regs, Segment, SpecialRegs, VirtualMemory};

use crate::debugregs::{guest_handlers, DebugRegs, Slot, HW_BREAKPOINTS};
use crate::regs::{
    paging_context, regs_from_kvm, regs_to_kvm, segment_from_kvm, segment_to_kvm, sregs_from_kvm,
};
use crate::rewrite::DOORBELL_OUT_LEN;
use crate::signal::SignalInterrupter;
use crate::xen;

/// How the VM's vCPUs trap hypercalls, shared by all of them.
#[derive(Debug)]
pub(crate) struct Traps {
    pub sites: SiteTable,
    /// Rewrite a site into the doorbell once it has trapped as a hypercall (`--trap rewrite`).
    pub rewrite_on_trap: bool,
    /// One vCPU: sites may be rewritten with plain writes.
    pub single_vcpu: bool,
    /// A triple fault at a hypercall instruction is answered and the vCPU resumed (verified on
    /// kvm_pvm only; see docs/kvm-backend.md).
    pub resume_shutdown: bool,
    /// Put breakpoints on the guest's own #UD/#GP handlers once it loads its IDT (needs
    /// KVM_CAP_SET_GUEST_DEBUG, and the quirk disabled so that hypercalls raise #UD at all).
    pub watch_guest_idt: bool,
    /// KVM_SET_GUEST_DEBUG works (KVM_CAP_SET_GUEST_DEBUG): a debugger's breakpoints.
    pub guest_debug: bool,
    /// Data breakpoints fire (not on kvm_pvm): a debugger's watchpoints.
    pub data_breakpoints: bool,
    /// INT3 traps under KVM_GUESTDBG_USE_SW_BP (not on kvm_pvm): a debugger's software
    /// breakpoints. Not tested on these machines (no hardware KVM here).
    pub sw_breakpoints: bool,
    /// Bytes KVM maps for `kvm_run` (KVM_GET_VCPU_MMAP_SIZE).
    pub mmap_size: usize,
    /// The host vendor's hypercall instruction (the only one a Xen exit can come from).
    pub native: HypercallInsn,
    /// What the other vendor's instruction does.
    pub foreign: ForeignInsn,
    /// Whether the guest-IDT watch has been reported (once per VM).
    pub watch_reported: std::sync::atomic::AtomicBool,
}

/// How to finish the hypercall (or port read) of the last exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// A rewritten site: RIP is already past `out`, the `nop` completes the 3 bytes.
    Doorbell,
    /// Stopped before the instruction (a breakpoint on it, a triple fault at it): move RIP.
    SetRip {
        resume: u64,
    },
    /// A `KVM_EXIT_XEN` hypercall: the answer goes in `kvm_run`, the kernel sets RAX and
    /// skips the instruction on the next KVM_RUN.
    Xen,
    /// Stopped in an exception's handler — the guest's own (at its first instruction) or the
    /// VMM's stub: return to the caller as the handler's `iret` would, past the instruction.
    Iret(IretState),
    /// An MMIO read of this many bytes, answered in `kvm_run.mmio.data`.
    MmioRead {
        len: usize,
    },
    /// An `in` whose data goes at this offset of `kvm_run`.
    IoIn {
        offset: usize,
        size: usize,
    },
}

/// The caller's state an `iret` from the exception frame restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IretState {
    rip: u64,
    rflags: u64,
    rsp: u64,
    /// New CS and SS when the caller ran at another privilege level than the handler.
    segments: Option<(Segment, Segment)>,
}

/// A hypercall instruction the CPU refused with an exception.
struct Refused {
    /// Linear address of the instruction.
    rip: u64,
    insn: HypercallInsn,
    cpl: u8,
    mode: CpuMode,
}

pub(crate) struct KvmVcpu {
    // Declared first so that the fd (and its kvm_run mapping) is dropped before RAM.
    fd: VcpuFd,
    ram: Arc<GuestRam>,
    traps: Arc<Traps>,
    debug: DebugRegs,
    pending: Pending,
    alive: Arc<Mutex<bool>>,
    /// The sync-regs area holds real state only after the first exit.
    exited: bool,
    /// Where the last debugger breakpoint stopped the vCPU: resuming there runs that
    /// instruction first (stepped over with its slot off: kvm_pvm ignores RFLAGS.RF).
    user_stop_at: Option<u64>,
}

impl KvmVcpu {
    pub(crate) fn new(
        mut fd: VcpuFd,
        ram: Arc<GuestRam>,
        traps: Arc<Traps>,
        hw_sites: Vec<u64>,
    ) -> Result<Self, BackendError> {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        let mut debug = DebugRegs::new(hw_sites);
        // The VMM's own IDT is in use at the start: only sites, no watch.
        debug.arm(&fd, &[])?;
        Ok(Self {
            fd,
            ram,
            traps,
            debug,
            pending: Pending::None,
            alive: Arc::new(Mutex::new(true)),
            exited: false,
            user_stop_at: None,
        })
    }

    /// Before a run a debugger resumes: a single step, or a resume from a breakpoint, at a
    /// hypercall instruction (or a rewritten site) is the hypercall itself — answered without
    /// entering the guest, as one instruction — since the trap strategies' paths (a #UD
    /// through the IDT, a breakpoint on the site) must not run under a single step or with
    /// the site's breakpoint lifted. Otherwise a resume from a breakpoint steps over it.
    fn debugger_resume(&mut self) -> Result<Option<VcpuExit>, BackendError> {
        let rip = self.fd.sync_regs().regs.rip;
        let pc = self.linear(rip);
        let at_breakpoint = self.user_stop_at.take() == Some(pc) && self.debug.user_breakpoint(pc);
        if !at_breakpoint && !self.debug.single_step() {
            return Ok(None);
        }
        let (cpl, mode) = self.current_cpl_mode();
        let insn = match self.hypercall_at(pc) {
            Some(insn) => self.accept(pc, insn, cpl).then_some(insn),
            None => {
                let mut bytes = [0u8; 3];
                let rewritten = self.view().read(pc, &mut bytes).is_ok() && bytes == DOORBELL_SITE;
                let gpa = self.view().gpa(pc).ok().filter(|_| rewritten);
                gpa.and_then(|gpa| self.traps.sites.lookup(&self.ram, gpa))
            }
        };
        if let Some(insn) = insn {
            self.pending = Pending::SetRip { resume: rip.wrapping_add(insn::HYPERCALL_LEN) };
            return Ok(Some(self.hypercall(pc, insn, cpl, mode)));
        }
        if at_breakpoint {
            self.debug.step_over(&self.fd, pc)?;
        }
        Ok(None)
    }

    /// Guest memory as the vCPU sees it now.
    fn view(&self) -> VirtualMemory<'_> {
        VirtualMemory::new(&self.ram, paging_context(&self.fd.sync_regs().sregs))
    }

    fn gdt(&self) -> DescriptorTable {
        let s = &self.fd.sync_regs().sregs;
        DescriptorTable { base: s.gdt.base, limit: s.gdt.limit }
    }

    /// The hypercall instruction at linear `rip`, if that is what the guest executes there.
    fn hypercall_at(&self, rip: u64) -> Option<HypercallInsn> {
        let mut bytes = [0u8; 3];
        self.view().read(rip, &mut bytes).ok()?;
        match bytes {
            insn::VMCALL => Some(HypercallInsn::Vmcall),
            insn::VMMCALL => Some(HypercallInsn::Vmmcall),
            _ => None,
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

    /// The linear address of the code running now at `rip`.
    fn linear(&self, rip: u64) -> u64 {
        let s = &self.fd.sync_regs().sregs;
        if s.cs.l != 0 {
            rip
        } else {
            s.cs.base.wrapping_add(rip) & 0xffff_ffff
        }
    }

    /// Decide what becomes of a hypercall instruction that trapped at linear `rip`: whether
    /// it is answered (false: the other vendor's with the quirk off, a genuine #UD), and what
    /// happens to its bytes. The other vendor's instruction under KVM's default quirk becomes
    /// the native one, exactly as KVM patches it. Otherwise the site is rewritten into the
    /// doorbell if this VM does that, only for CPL 0 callers: a guest that owns its TSS may deny
    /// CPL 3 code the doorbell port.
    fn accept(&self, rip: u64, insn: HypercallInsn, cpl: u8) -> bool {
        let action = self.traps.foreign.action(insn, self.traps.native);
        let Ok(gpa) = self.view().gpa(rip) else {
            return action != InsnAction::RaiseUd;
        };
        match action {
            InsnAction::RaiseUd => return false,
            InsnAction::PatchThenAnswer { native } => {
                let _ = self.ram.write(gpa, &native.bytes());
            }
            InsnAction::Answer if self.traps.rewrite_on_trap && cpl == 0 => {
                if let Err(e) =
                    self.traps.sites.rewrite(&self.ram, gpa, insn, self.traps.single_vcpu)
                {
                    tracing::debug!(gpa, error = %e, "hypercall site not rewritten");
                }
            }
            InsnAction::Answer => {}
        }
        true
    }

    fn translate_out(&mut self, port: u16, data: &[u8]) -> VcpuExit {
        let rip = self.fd.sync_regs().regs.rip;
        // `out imm8, al` is 2 bytes: RIP is just past it. The stubs ring their port first.
        let from_stub = |vector: u8| rip == boot::stub_gpa(vector) + 2;
        match port {
            ports::PORT_DOORBELL if data.len() == 1 => {
                let site = self.linear(rip.wrapping_sub(DOORBELL_OUT_LEN));
                let gpa = self.view().gpa(site).ok();
                if let Some(insn) = gpa.and_then(|gpa| self.traps.sites.lookup(&self.ram, gpa)) {
                    let (cpl, mode) = self.current_cpl_mode();
                    self.pending = Pending::Doorbell;
                    return self.hypercall(site, insn, cpl, mode);
                }
            }
            ports::PORT_HC_TRAP if from_stub(descriptors::UD_VECTOR) => {
                return self.translate_stub(descriptors::UD_VECTOR)
            }
            ports::PORT_HC_TRAP if from_stub(descriptors::GP_VECTOR) => {
                return self.translate_stub(descriptors::GP_VECTOR)
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

    /// The frame of `vector` at the current RSP, as the CPU pushed it for the running handler.
    fn frame(&self, vector: u8) -> Option<TrapFrame> {
        let sync = self.fd.sync_regs();
        let long = sync.sregs.efer & EFER_LMA != 0;
        let handler_cpl = sync.sregs.cs.selector as u8 & 3;
        read_trap_frame(&self.view(), sync.regs.rsp, vector, long, handler_cpl).ok()
    }

    /// Whether `frame` was pushed for a hypercall instruction the CPU refused — #UD at any
    /// CPL, or #GP with error code 0 from CPL > 0 (what some KVMs raise there; a hypercall
    /// never raises #GP at CPL 0) — and if so, the call.
    fn refused_hypercall(&self, frame: &TrapFrame) -> Option<Refused> {
        let sregs = &self.fd.sync_regs().sregs;
        let cs = code_segment(&self.view(), self.gdt(), frame.cs)?;
        let mode = CpuMode::from_cs(&cs, sregs.efer, sregs.cr0);
        let rip =
            if mode.is_64bit() { frame.rip } else { cs.base.wrapping_add(frame.rip) & 0xffff_ffff };
        let insn = self.hypercall_at(rip)?;
        let cpl = (frame.cs & 3) as u8;
        let is_refusal = frame.vector == descriptors::UD_VECTOR
            || (frame.vector == descriptors::GP_VECTOR && cpl != 0 && frame.error_code == Some(0));
        (is_refusal && self.accept(rip, insn, cpl)).then_some(Refused { rip, insn, cpl, mode })
    }

    /// A #UD or #GP stub of the VMM's IDT rang: a hypercall instruction the CPU refused (any
    /// CPL, any mode, rewritten or not) or a genuine fault.
    fn translate_stub(&mut self, vector: u8) -> VcpuExit {
        let Some(frame) = self.frame(vector) else {
            let rsp = self.fd.sync_regs().regs.rsp;
            return VcpuExit::Unknown(format!(
                "exception {vector} frame at RSP {rsp:#x} is not readable guest memory"
            ));
        };
        let Some(call) = self.refused_hypercall(&frame) else {
            return VcpuExit::Fault(GuestFault {
                vector,
                error_code: frame.error_code,
                rip: frame.rip,
                cs: frame.cs,
                cr2: None,
            });
        };
        let Some(state) = self.iret_state(&frame) else {
            return VcpuExit::Unknown(format!(
                "exception {vector} frame names code segment {:#x}, not in the GDT",
                frame.cs
            ));
        };
        self.pending = Pending::Iret(state);
        self.hypercall(call.rip, call.insn, call.cpl, call.mode)
    }

    /// The state an `iret` from `frame` would restore, with RIP past the hypercall: the host
    /// returns to the caller itself instead of letting a handler run (or, for the VMM's stubs,
    /// executing their `iret`: kvm_pvm cannot emulate a 32-bit IRET).
    fn iret_state(&self, frame: &TrapFrame) -> Option<IretState> {
        let sregs = &self.fd.sync_regs().sregs;
        let (rsp, ss) = frame.stack.unwrap_or((frame.end, sregs.ss.selector));
        let segments = if frame.cs == sregs.cs.selector && ss == sregs.ss.selector {
            None
        } else {
            let mem = self.view();
            let cs = code_segment(&mem, self.gdt(), frame.cs)?;
            let ss = match code_segment(&mem, self.gdt(), ss) {
                Some(s) => s,
                // A null SS (allowed in 64-bit mode): unusable, with the selector's RPL.
                None => Segment {
                    selector: ss,
                    dpl: (ss & 3) as u8,
                    unusable: true,
                    ..Default::default()
                },
            };
            Some((cs, ss))
        };
        Some(IretState {
            rip: frame.rip.wrapping_add(insn::HYPERCALL_LEN),
            rflags: frame.rflags,
            rsp,
            segments,
        })
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
        VcpuExit::Hypercall(xen::hypercall_exit(&call, &sync.regs, &sync.sregs, self.traps.native))
    }

    fn translate_fault(&mut self, vector: u8) -> VcpuExit {
        match self.frame(vector) {
            Some(f) => VcpuExit::Fault(GuestFault {
                vector,
                error_code: f.error_code,
                rip: f.rip,
                cs: f.cs,
                cr2: (vector == 14).then(|| self.fd.sync_regs().sregs.cr2),
            }),
            None => VcpuExit::Unknown(format!(
                "exception {vector} with its frame outside readable guest memory"
            )),
        }
    }

    /// A debug exit, `None` when it only let a real exception reach the guest's handler.
    fn translate_debug(&mut self, pc: u64, dr6: u64) -> Result<Option<VcpuExit>, BackendError> {
        const DR6_BS: u64 = 1 << 14;
        let stepped = dr6 & DR6_BS != 0;
        if self.debug.stepping() && stepped {
            // Stepped over a watched handler's first instruction or a debugger breakpoint:
            // breakpoints go back on at the next run.
            self.debug.finish_step();
            if !self.debug.single_step() {
                return Ok(None);
            }
        }
        // A debugger's data breakpoint fires after the access, possibly with the step.
        if let Some(Slot::Watch { addr, kind, .. }) = self.debug.hit_by_dr6(dr6) {
            return Ok(Some(VcpuExit::Debugger(DebugStop::Watch { addr, kind })));
        }
        if stepped && self.debug.single_step() {
            return Ok(Some(VcpuExit::Debugger(DebugStop::Step)));
        }
        Ok(self.classify_debug(pc, dr6))
    }

    fn classify_debug(&mut self, pc: u64, dr6: u64) -> Option<VcpuExit> {
        // dr7 is unreliable on some KVMs (kvm-host-facts.md): classify by pc and dr6 alone.
        match (dr6 & 0xf != 0).then(|| self.debug.hit(pc)).flatten() {
            Some(Slot::Break(addr)) => {
                self.user_stop_at = Some(addr);
                Some(VcpuExit::Debugger(DebugStop::Breakpoint(addr)))
            }
            Some(Slot::Watch { .. }) => Some(VcpuExit::Debug { rip: pc }),
            Some(Slot::Handler { vector, .. }) => self.translate_guest_handler(vector),
            Some(Slot::Site(_)) => {
                let (cpl, mode) = self.current_cpl_mode();
                match self.hypercall_at(pc).filter(|i| self.accept(pc, *i, cpl)) {
                    Some(insn) => {
                        let resume = self.fd.sync_regs().regs.rip.wrapping_add(insn::HYPERCALL_LEN);
                        self.pending = Pending::SetRip { resume };
                        Some(self.hypercall(pc, insn, cpl, mode))
                    }
                    None => Some(VcpuExit::Debug { rip: pc }),
                }
            }
            None => Some(VcpuExit::Debug { rip: pc }),
        }
    }

    /// An INT3 trapped under KVM_GUESTDBG_USE_SW_BP (stock KVM; untested here): the exit
    /// comes with RIP at the instruction; leave it past, as the CPU's #BP would.
    fn translate_int3(&mut self) -> VcpuExit {
        let rip = self.fd.sync_regs().regs.rip;
        let mut byte = [0u8; 1];
        let _ = self.view().read(self.linear(rip), &mut byte);
        let len = if byte[0] == 0xcc { 1 } else { 2 }; // INT3, or INT 3 (CD 03)
        self.fd.sync_regs_mut().regs.rip = rip.wrapping_add(len);
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        VcpuExit::Debugger(DebugStop::Int3)
    }

    /// Stopped at the first instruction of the guest's own handler for `vector`.
    fn translate_guest_handler(&mut self, vector: u8) -> Option<VcpuExit> {
        let frame = self.frame(vector);
        let call = frame.as_ref().and_then(|f| self.refused_hypercall(f));
        let (Some(frame), Some(call)) = (frame, call) else {
            // A real exception: let the guest's handler run, stepping past this breakpoint.
            let pc = self.linear(self.fd.sync_regs().regs.rip);
            return match self.debug.step_over(&self.fd, pc) {
                Ok(()) => None,
                Err(e) => Some(VcpuExit::Unknown(format!("cannot step over a breakpoint: {e}"))),
            };
        };
        let state = self.iret_state(&frame)?;
        self.pending = Pending::Iret(state);
        Some(self.hypercall(call.rip, call.insn, call.cpl, call.mode))
    }

    /// A triple fault: at a hypercall instruction (a guest with no usable IDT) it is the
    /// hypercall itself on a KVM where resuming after it is known to work.
    fn translate_shutdown(&mut self) -> VcpuExit {
        let rip = self.fd.sync_regs().regs.rip;
        let linear = self.linear(rip);
        if self.traps.resume_shutdown {
            let (cpl, mode) = self.current_cpl_mode();
            if let Some(insn) = self.hypercall_at(linear).filter(|i| self.accept(linear, *i, cpl)) {
                self.pending = Pending::SetRip { resume: rip.wrapping_add(insn::HYPERCALL_LEN) };
                return self.hypercall(linear, insn, cpl, mode);
            }
        }
        VcpuExit::Shutdown { rip }
    }

    /// Watch the guest's own #UD/#GP handlers while its IDT is not the VMM's (checked at every
    /// exit, since a guest loads its IDT without exiting).
    fn arm_watch(&mut self) -> Result<(), BackendError> {
        let sregs = self.fd.sync_regs().sregs;
        let idt = DescriptorTable { base: sregs.idt.base, limit: sregs.idt.limit };
        let handlers = if boot::is_vmm_idt(idt) || !self.traps.watch_guest_idt {
            Vec::new()
        } else {
            let mem = self.view();
            let gdt = self.gdt();
            let base = |sel: u16| code_segment(&mem, gdt, sel).map_or(0, |s| s.base);
            guest_handlers(&mem, idt, sregs.efer & EFER_LMA != 0, base)
        };
        if !handlers.is_empty()
            && !self.traps.watch_reported.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // Exact from here on; said once, since a hypercall written at run time that ran
            // between the guest's LIDT and this exit reached the guest's own handler.
            tracing::warn!(
                idt = format_args!("{:#x}", idt.base),
                "the guest loaded its own IDT: hypercalls that raise #UD/#GP are caught at its handlers from this exit on (a run-time hypercall before it would have reached the guest's handler)"
            );
        }
        self.debug.arm(&self.fd, &handlers)
    }

    fn internal_error(&mut self) -> VcpuExit {
        let rip = self.fd.sync_regs().regs.rip;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let mut bytes = [0u8; 8];
        let _ = self.view().read(self.linear(rip), &mut bytes);
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

    /// One KVM_RUN, translated; `None` for an exit handled here entirely.
    fn run_once(&mut self) -> Result<Option<VcpuExit>, BackendError> {
        if self.exited {
            self.arm_watch()?;
        }
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Some(VcpuExit::Interrupted))
            }
            Err(e) => return Err(crate::ioctl("KVM_RUN")(e)),
        };
        let exit = match exit {
            KvmExit::IoOut(port, data) => {
                let data = data.to_vec();
                self.exited = true;
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
            KvmExit::Shutdown => {
                self.exited = true;
                self.translate_shutdown()
            }
            KvmExit::Debug(arch) => {
                self.exited = true;
                if arch.exception == kvm_bindings::BP_VECTOR && self.debug.int3() {
                    return Ok(Some(self.translate_int3()));
                }
                return self.translate_debug(arch.pc, arch.dr6);
            }
            KvmExit::MmioRead(gpa, data) => {
                let len = data.len().min(8);
                self.pending = Pending::MmioRead { len };
                VcpuExit::Mmio { gpa, write: false, len: len as u8, data: 0 }
            }
            KvmExit::MmioWrite(gpa, data) => {
                let mut word = [0u8; 8];
                let len = data.len().min(8);
                word[..len].copy_from_slice(&data[..len]);
                VcpuExit::Mmio { gpa, write: true, len: len as u8, data: u64::from_le_bytes(word) }
            }
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::Unsupported(kvm_bindings::KVM_EXIT_XEN) => self.translate_xen(),
            KvmExit::InternalError => self.internal_error(),
            KvmExit::FailEntry(reason, cpu) => VcpuExit::Unknown(format!(
                "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
            )),
            other => VcpuExit::Unknown(format!("KVM exit {other:?}")),
        };
        self.exited = true;
        Ok(Some(exit))
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        *self.alive.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

fn err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError {
    crate::ioctl(what)
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, _: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        self.pending = Pending::None;
        if self.exited {
            if let Some(exit) = self.debugger_resume()? {
                return Ok(exit);
            }
        }
        loop {
            if let Some(exit) = self.run_once()? {
                return Ok(exit);
            }
        }
    }

    fn complete_hypercall(&mut self, rax: u64) -> Result<(), BackendError> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Doorbell => {}
            Pending::SetRip { resume } => self.fd.sync_regs_mut().regs.rip = resume,
            Pending::Xen => {
                // Neither RAX nor RIP through sync regs: the kernel writes RAX from `result`
                // and skips the instruction only if RIP is unchanged.
                if !xen::complete(self.fd.get_kvm_run(), rax) {
                    return Err(BackendError::NotPending("KVM_EXIT_XEN hypercall"));
                }
                return Ok(());
            }
            Pending::Iret(state) => {
                let sync = self.fd.sync_regs_mut();
                sync.regs.rip = state.rip;
                sync.regs.rflags = state.rflags;
                sync.regs.rsp = state.rsp;
                if let Some((cs, ss)) = state.segments {
                    sync.sregs.cs = segment_to_kvm(&cs);
                    sync.sregs.ss = segment_to_kvm(&ss);
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
            }
            other => {
                tracing::debug!(pending = ?other, "complete_hypercall without a hypercall");
                return Err(BackendError::NotPending("hypercall"));
            }
        }
        self.fd.sync_regs_mut().regs.rax = rax;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        Ok(())
    }

    fn complete_io_in(&mut self, data: u32) -> Result<(), BackendError> {
        let Pending::IoIn { offset, size } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return Err(BackendError::NotPending("port read"));
        };
        // The data lives past `struct kvm_run`, usually on the mapping's second page (kernel
        // `KVM_PIO_PAGE_OFFSET`): anywhere inside the KVM_GET_VCPU_MMAP_SIZE bytes mapped.
        let run_size = std::mem::size_of::<kvm_bindings::kvm_run>();
        let mmap_size = self.traps.mmap_size;
        if offset < run_size || offset.checked_add(size).is_none_or(|end| end > mmap_size) {
            return Err(BackendError::UnexpectedExit(format!(
                "port-read data offset {offset} outside the {mmap_size} byte kvm_run mapping"
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

    fn complete_mmio_read(&mut self, data: u64) -> Result<(), BackendError> {
        let Pending::MmioRead { len } = std::mem::replace(&mut self.pending, Pending::None) else {
            return Err(BackendError::NotPending("MMIO read"));
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (a read: `pending` says so), so `mmio` is the
        // active union field; KVM copies `data[..len]` into the guest's register on the next
        // KVM_RUN, and `len` <= 8 = the array's size.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        mmio.data[..len].copy_from_slice(&data.to_le_bytes()[..len]);
        Ok(())
    }

    fn regs(&mut self) -> Result<Regs, BackendError> {
        // After the first exit the sync-regs area is the truth: it may hold changes (an
        // answered hypercall's RAX) that KVM loads only at the next KVM_RUN.
        if self.exited {
            return Ok(regs_from_kvm(&self.fd.sync_regs().regs));
        }
        Ok(regs_from_kvm(&self.fd.get_regs().map_err(err("KVM_GET_REGS"))?))
    }

    fn rewind_hypercall(&mut self) -> Result<(), BackendError> {
        let at_insn = match self.pending {
            // RIP is past the doorbell's `out`: back to the site.
            Pending::Doorbell => {
                let rip = self.fd.sync_regs().regs.rip.wrapping_sub(DOORBELL_OUT_LEN);
                self.fd.sync_regs_mut().regs.rip = rip;
                rip
            }
            // In an exception handler: back in the caller, as its `iret` would return, but at
            // the instruction rather than past it.
            Pending::Iret(state) => {
                let sync = self.fd.sync_regs_mut();
                sync.regs.rip = state.rip.wrapping_sub(insn::HYPERCALL_LEN);
                sync.regs.rflags = state.rflags;
                sync.regs.rsp = state.rsp;
                let rip = sync.regs.rip;
                if let Some((cs, ss)) = state.segments {
                    sync.sregs.cs = segment_to_kvm(&cs);
                    sync.sregs.ss = segment_to_kvm(&ss);
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
                rip
            }
            // Already at the instruction (a breakpoint on it, a triple fault, a Xen exit).
            _ => return Ok(()),
        };
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.pending = Pending::SetRip { resume: at_insn.wrapping_add(insn::HYPERCALL_LEN) };
        Ok(())
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
        if self.exited {
            self.fd.sync_regs_mut().regs = regs_to_kvm(regs);
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.fd.set_regs(&regs_to_kvm(regs)).map_err(err("KVM_SET_REGS"))
    }

    fn sregs(&mut self) -> Result<SpecialRegs, BackendError> {
        if self.exited {
            return Ok(sregs_from_kvm(&self.fd.sync_regs().sregs));
        }
        Ok(sregs_from_kvm(&self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?))
    }

    fn debug_caps(&self) -> DebugCaps {
        // Every breakpoint, software or hardware, is a debug register here: INT3 under
        // KVM_GUESTDBG_USE_SW_BP fails on kvm_pvm (docs/gdb.md).
        DebugCaps {
            supported: self.traps.guest_debug,
            max_slots: Some(HW_BREAKPOINTS),
            watchpoints: self.traps.data_breakpoints,
            int3: self.traps.sw_breakpoints,
        }
    }

    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<(), BackendError> {
        let mut slots: Vec<Slot> = debug.breakpoints.iter().map(|a| Slot::Break(*a)).collect();
        for w in &debug.watchpoints {
            // The debug registers watch 1, 2, 4 or 8 aligned bytes: the smallest such range
            // that holds the watched one.
            let len = [1u64, 2, 4, 8]
                .into_iter()
                .find(|&n| w.addr & !(n - 1) == w.addr.wrapping_add(w.len.max(1) - 1) & !(n - 1))
                .ok_or_else(|| {
                    BackendError::Unsupported(format!(
                        "a watchpoint of {} bytes at {:#x} does not fit one debug register",
                        w.len, w.addr
                    ))
                })?;
            slots.push(Slot::Watch { addr: w.addr & !(len - 1), len: len as u8, kind: w.kind });
        }
        self.debug.set_user(slots, debug.single_step, debug.int3 && self.traps.sw_breakpoints);
        if !self.exited {
            // Before the first run (a breakpoint at the entry point): the VMM's IDT is in use.
            self.debug.arm(&self.fd, &[])?;
        }
        Ok(())
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
