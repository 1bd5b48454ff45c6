//! One emulated vCPU: a unicorn engine over the shared guest RAM, whose hooks turn what the
//! guest does into vmcall's neutral exits.
//!
//! Hypercalls and port writes are handled inside the hooks through the VMM's [`InlineExits`]
//! (the same code that handles them as exits on KVM), so the engine runs on. Hooks stop it
//! only for what ends the run or needs the vCPU loop: an exception the guest cannot take (see
//! `hooks`), the exit port, unbacked memory.
//! Unicorn stops at the end of a translation block, so more than one such exit can be queued
//! before `emu_start` returns; `run` hands them out in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use unicorn_engine::unicorn_const::{uc_error, Arch, HookType, MemType, Mode, Prot};
use unicorn_engine::UcHookId;
use unicorn_engine::{uc_engine, uc_x86_mmr, RegisterX86 as R, Unicorn};
use vmcall_abi::insn;
use vmcall_vmm::backend::{
    BackendError, DebugCaps, DebugStop, GuestDebug, InlineExits, Interrupter, Vcpu, VcpuExit,
    WatchKind,
};
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::hypercall::{ForeignInsn, HypercallInsn};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::cpuid::PvCpuid;
use vmcall_vmm::x86::{mode, CpuMode, DescriptorTable, Regs, SpecialRegs};

use crate::cpu_state::{
    CpuState, LiveCpu, SegCache, SEG_CS, SEG_DS, SEG_ES, SEG_FS, SEG_GS, SEG_SS,
};
use crate::doorbell::{LocalSites, SiteTable};
use crate::hooks::{guest_tsc, on_doorbell, on_exception, on_invalid, read_code};
use crate::ram::RamView;
use crate::uc::{add_cpuid_hook, read_mmr, set_tcg_buffer_size, write_mmr, write_msr};
use vmcall_abi::ports::PORT_DOORBELL;

pub(crate) const MSR_EFER: u32 = 0xc000_0080;
/// QEMU's cached TR flags for a present, available 64-bit TSS (what `ltr` leaves there).
const TR_FLAGS_TSS64: u32 = (1 << 15) | (0x9 << 8);

/// The key of `HookState::mode_cache`: CS selector, GDT base and limit, CR0.PE, EFER.LMA.
pub(crate) type ModeKey = (u16, u64, u32, u64, u64);

/// What the hooks share with `run`.
pub(crate) struct HookState {
    pub ram: Arc<GuestRam>,
    queue: VecDeque<VcpuExit>,
    /// A hook asked the engine to stop (the queue ends with the reason).
    stopped_by_hook: bool,
    /// The VMM's inline exit handler of the `run` in progress; set only while `emu_start`
    /// runs.
    pub sink: Option<SinkPtr>,
    /// The caller's mode and CS base last read for a key (see `hooks::current_mode`).
    pub mode_cache: Option<(ModeKey, CpuMode, u64)>,
    /// The engine's CPU state beyond the register API; set right after the engine is
    /// created.
    pub cpu: Option<CpuState>,
    /// CR2 when a hook last ran (the guest's CR2, unless it wrote CR2 itself since).
    pub cr2_seen: u64,
    /// What the other vendor's hypercall instruction does, and which is the native one.
    pub foreign: ForeignInsn,
    pub native: HypercallInsn,
    /// The VM's rewritten hypercall sites, and this vCPU's copy of those it has used.
    pub sites: Arc<SiteTable>,
    pub local_sites: LocalSites,
    /// Guest RAM through its host mapping, for the doorbell's page walk and byte checks.
    pub view: RamView,
    /// The engine's CPU state read in place, for the doorbell (None: through the API).
    pub live: Option<LiveCpu>,
    /// Whether this is the VM's only vCPU (sites may then be rewritten byte by byte).
    pub single_vcpu: bool,
    /// A breakpoint at this address lets its instruction run once: the run resumes there.
    pub skip_breakpoint: Option<u64>,
    /// A watchpoint fired during the current instruction: the stop comes at the next
    /// instruction boundary, once the access is complete (as on the CPU).
    pub watch_hit: Option<(u64, WatchKind)>,
}

/// What a VM's vCPUs are configured with beyond their registers.
#[derive(Debug, Clone, Default)]
pub(crate) struct VcpuConfig {
    pub pv: PvCpuid,
    pub foreign: ForeignInsn,
    /// Bytes of the engine's translation buffer (0: unicorn's own default, 1 GiB).
    pub tcg_buffer: u32,
    /// The VM's rewritten hypercall sites, shared by its vCPUs.
    pub sites: Arc<SiteTable>,
    /// Whether the VM has one vCPU (no other vCPU can hold a stale translation of a site).
    pub single_vcpu: bool,
}

/// The `&mut dyn InlineExits` of the current `run`, with its lifetime erased so that the
/// engine's `'static` hooks can hold it.
#[derive(Clone, Copy)]
pub(crate) struct SinkPtr(pub *mut (dyn InlineExits + 'static));

impl HookState {
    /// Queue the exit that stops the engine.
    pub(crate) fn stop_with(&mut self, exit: VcpuExit) {
        self.queue.push_back(exit);
        self.stopped_by_hook = true;
    }
}

pub(crate) type Engine<'a> = Unicorn<'a, HookState>;

/// The engine handle, for stopping it from another thread.
struct StopHandle(*mut uc_engine);

// SAFETY: the handle is only passed to `uc_emu_stop`, which unicorn documents as callable
// from another thread while the engine runs (its own timeout thread does exactly this); the
// engine outlives every use because `EmuVcpu` clears the handle before dropping the engine.
unsafe impl Send for StopHandle {}

struct StopState {
    handle: Mutex<Option<StopHandle>>,
    /// Set by `interrupt`; a stop that lands before `emu_start` begins is lost inside unicorn,
    /// so `run` checks this flag too.
    requested: AtomicBool,
    /// A hook on the vCPU's own thread stops the engine at the next block when `requested`
    /// is set (under a debugger, whose stops are resumed): `interrupt` then leaves the engine
    /// alone. A `uc_emu_stop` from another thread is fine to end a run, but a run resumed
    /// after one sometimes went on with corrupted registers (seen with Ctrl-C in gdb).
    stop_in_thread: AtomicBool,
}

struct EmuInterrupter(Arc<StopState>);

impl Interrupter for EmuInterrupter {
    fn interrupt(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
        if self.0.stop_in_thread.load(Ordering::SeqCst) {
            return;
        }
        let handle = self.0.handle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handle.as_ref() {
            // SAFETY: see `StopHandle`: the engine is alive while the handle is installed.
            unsafe { unicorn_engine::uc_emu_stop(h.0) };
        }
    }
}

pub(crate) struct EmuVcpu {
    /// Created on the vCPU's own thread at the first `run`, since unicorn engines are not
    /// `Send`; declared first so it is dropped before RAM.
    engine: Option<Engine<'static>>,
    ram: Arc<GuestRam>,
    init: VcpuInit,
    stop: Arc<StopState>,
    /// RIP of the hypercall being answered.
    pending_hypercall: Option<u64>,
    config: VcpuConfig,
    /// What a debugger asked for, and the hooks that serve it.
    debug: GuestDebug,
    debug_hooks: Vec<UcHookId>,
}

// SAFETY: an `EmuVcpu` is moved to its vCPU thread before any method is called (the VMM's
// contract for `Vcpu`), and the engine — the only non-`Send` part — is created there, at the
// first `run`, and never leaves that thread.
unsafe impl Send for EmuVcpu {}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        *self.stop.handle.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

pub(crate) fn uc_err(what: &'static str) -> impl FnOnce(uc_error) -> BackendError {
    move |e| BackendError::emulator(what, e)
}

impl EmuVcpu {
    pub(crate) fn new(ram: Arc<GuestRam>, init: VcpuInit, config: VcpuConfig) -> Self {
        let stop = Arc::new(StopState {
            handle: Mutex::new(None),
            requested: AtomicBool::new(false),
            stop_in_thread: AtomicBool::new(false),
        });
        Self {
            engine: None,
            ram,
            init,
            stop,
            pending_hypercall: None,
            config,
            debug: GuestDebug::default(),
            debug_hooks: Vec::new(),
        }
    }

    /// The next queued exit, running the engine when none is queued.
    fn next_exit(&mut self, sink: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        let stop = self.stop.clone();
        let step = self.debug.single_step;
        let breakpoints = self.debug.breakpoints.clone();
        let uc = self.engine()?;
        if let Some(exit) = uc.get_data_mut().queue.pop_front() {
            return Ok(exit);
        }
        if stop.requested.swap(false, Ordering::SeqCst) {
            return Ok(VcpuExit::Interrupted);
        }
        let start = uc.reg_read(R::RIP).map_err(uc_err("RIP"))?;
        uc.get_data_mut().stopped_by_hook = false;
        // Resuming at a breakpoint: its instruction runs (the stop there already happened).
        uc.get_data_mut().skip_breakpoint = breakpoints.contains(&start).then_some(start);
        // SAFETY (of the later dereference in `hooks::on_invalid`): the pointer is installed only
        // for the duration of this `emu_start`, during which `sink` stays mutably borrowed by
        // this call and is used by nothing else; hooks run only inside `emu_start`.
        let sink: *mut (dyn InlineExits + '_) = sink;
        // SAFETY: only the trait object's lifetime changes; see above for why it never
        // outlives the borrow.
        let sink: *mut (dyn InlineExits + 'static) = unsafe { std::mem::transmute(sink) };
        uc.get_data_mut().sink = Some(SinkPtr(sink));
        let result = uc.emu_start(start, 0, 0, usize::from(step));
        uc.get_data_mut().sink = None;
        let watch_hit = uc.get_data_mut().watch_hit.take();
        if !uc.get_data().stopped_by_hook {
            // Nothing of ours stopped it: a HLT, an interrupt from another thread, a single
            // step's end, or an error.
            let rip = uc.reg_read(R::RIP).unwrap_or(0);
            let mut last = [0u8; 1];
            let after_hlt = read_code(uc, rip.wrapping_sub(1), &mut last) && last[0] == 0xf4;
            let end = match result {
                Err(e) => VcpuExit::Unknown(format!("emulator error {e:?} at RIP {rip:#x}")),
                // The engine ended right after an instruction that hit a watchpoint.
                Ok(()) if watch_hit.is_some() => {
                    let (addr, kind) = watch_hit.expect("checked");
                    VcpuExit::Debugger(DebugStop::Watch { addr, kind })
                }
                // An interrupt first: a stop can land right after any instruction, including
                // one whose last byte happens to be 0xf4.
                Ok(()) if stop.requested.swap(false, Ordering::SeqCst) => VcpuExit::Interrupted,
                // A single step: the one instruction was a HLT only if it started at `start`.
                Ok(()) if step => {
                    let mut first = [0u8; 1];
                    let hlt = rip == start.wrapping_add(1)
                        && read_code(uc, start, &mut first)
                        && first[0] == 0xf4;
                    if hlt {
                        VcpuExit::Hlt
                    } else {
                        VcpuExit::Debugger(DebugStop::Step)
                    }
                }
                Ok(()) if after_hlt => VcpuExit::Hlt,
                Ok(()) => VcpuExit::Unknown(format!(
                    "emulator stopped for no known reason at RIP {rip:#x}"
                )),
            };
            uc.get_data_mut().queue.push_back(end);
        }
        Ok(uc.get_data_mut().queue.pop_front().expect("an exit was queued"))
    }

    fn engine(&mut self) -> Result<&mut Engine<'static>, BackendError> {
        if self.engine.is_none() {
            let engine = create_engine(&self.ram, &self.init, &self.config)?;
            *self.stop.handle.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(StopHandle(engine.get_handle()));
            self.engine = Some(engine);
        }
        Ok(self.engine.as_mut().expect("just created"))
    }
}

/// An engine over `ram` in the state `init`, with only the CPUID hook.
pub(crate) fn new_engine<D: 'static>(
    ram: &Arc<GuestRam>,
    init: &VcpuInit,
    data: D,
    pv_features: u32,
    tcg_buffer: u32,
) -> Result<Unicorn<'static, D>, BackendError> {
    let mut uc = Unicorn::new_with_data(Arch::X86, Mode::MODE_64, data).map_err(uc_err("open"))?;
    // Before anything else: the first other call allocates the buffer.
    if tcg_buffer != 0 {
        set_tcg_buffer_size(&mut uc, tcg_buffer).map_err(uc_err("translation buffer size"))?;
    }
    let (host, len) = ram.host_mapping();
    // SAFETY: `host..host+len` is guest RAM's live mapping, and the engine never outlives it:
    // its owners (`EmuVcpu`, the baseline) hold the `Arc<GuestRam>` and drop the engine first.
    unsafe { uc.mem_map_ptr(0, len as u64, Prot::ALL, host.cast()) }
        .map_err(uc_err("map guest RAM"))?;

    let s = &init.sregs;
    let mmr = |base: u64, limit: u32, selector: u16, flags: u32| uc_x86_mmr {
        selector,
        base,
        limit,
        flags,
    };
    write_mmr(&mut uc, R::GDTR, mmr(s.gdt.base, u32::from(s.gdt.limit), 0, 0))
        .map_err(uc_err("GDTR"))?;
    write_mmr(&mut uc, R::IDTR, mmr(s.idt.base, u32::from(s.idt.limit), 0, 0))
        .map_err(uc_err("IDTR"))?;
    // PAE before paging, paging before the segment loads that read the GDT through it.
    uc.reg_write(R::CR4, s.cr4).map_err(uc_err("CR4"))?;
    write_msr(&mut uc, MSR_EFER, s.efer).map_err(uc_err("EFER"))?;
    uc.reg_write(R::CR3, s.cr3).map_err(uc_err("CR3"))?;
    uc.reg_write(R::CR0, s.cr0).map_err(uc_err("CR0"))?;
    for (reg, seg) in
        [(R::CS, s.cs), (R::SS, s.ss), (R::DS, s.ds), (R::ES, s.es), (R::FS, s.fs), (R::GS, s.gs)]
    {
        uc.reg_write(reg, u64::from(seg.selector)).map_err(uc_err("segment"))?;
    }
    write_mmr(&mut uc, R::TR, mmr(s.tr.base, s.tr.limit, s.tr.selector, TR_FLAGS_TSS64))
        .map_err(uc_err("TR"))?;
    write_regs(&mut uc, &init.regs).map_err(uc_err("registers"))?;
    add_cpuid_hook(&mut uc, pv_features).map_err(uc_err("CPUID hook"))?;
    Ok(uc)
}

/// Put a fresh engine, which unicorn starts in long mode, into the protected-mode state of
/// `init` (a multiboot kernel's entry). Clearing EFER does not leave long mode in unicorn, and
/// neither does clearing CR0.PG alone: long mode must be entered properly (PAE, LME, PG) and
/// then left by clearing PG, which clears LMA as on the CPU. Segment registers written through
/// the API in a 64-bit engine only take the selector, so their caches are loaded directly.
fn enter_protected_mode(
    uc: &mut Engine<'_>,
    cpu: &mut CpuState,
    init: &VcpuInit,
) -> Result<(), BackendError> {
    let s = &init.sregs;
    uc.reg_write(R::CR4, mode::CR4_PAE).map_err(uc_err("CR4"))?;
    write_msr(uc, MSR_EFER, mode::EFER_LME).map_err(uc_err("EFER"))?;
    uc.reg_write(R::CR0, mode::CR0_PE | mode::CR0_PG).map_err(uc_err("CR0"))?;
    uc.reg_write(R::CR0, s.cr0).map_err(uc_err("CR0"))?;
    write_msr(uc, MSR_EFER, s.efer).map_err(uc_err("EFER"))?;
    uc.reg_write(R::CR4, s.cr4).map_err(uc_err("CR4"))?;
    uc.reg_write(R::CR3, s.cr3).map_err(uc_err("CR3"))?;
    cpu.save();
    let pe = s.cr0 & mode::CR0_PE != 0;
    for (i, seg) in [
        (SEG_ES, s.es),
        (SEG_SS, s.ss),
        (SEG_DS, s.ds),
        (SEG_FS, s.fs),
        (SEG_GS, s.gs),
        (SEG_CS, s.cs),
    ] {
        cpu.load_seg(i, SegCache::from_segment(&seg), pe);
    }
    cpu.restore();
    // RIP (EIP) and the GPRs again: leaving long mode may have touched nothing, but the
    // restored context must not hold stale values.
    write_regs(uc, &init.regs).map_err(uc_err("registers"))
}

fn create_engine(
    ram: &Arc<GuestRam>,
    init: &VcpuInit,
    config: &VcpuConfig,
) -> Result<Engine<'static>, BackendError> {
    let state = HookState {
        sites: config.sites.clone(),
        local_sites: LocalSites::default(),
        view: RamView::new(ram.clone()),
        live: None,
        single_vcpu: config.single_vcpu,
        foreign: config.foreign,
        native: HypercallInsn::native(),
        ram: ram.clone(),
        queue: VecDeque::new(),
        stopped_by_hook: false,
        sink: None,
        mode_cache: None,
        cpu: None,
        cr2_seen: init.sregs.cr2,
        skip_breakpoint: None,
        watch_hit: None,
    };
    let mut uc = new_engine(ram, init, state, config.pv.features, config.tcg_buffer)?;
    let mut cpu = CpuState::new(&mut uc)
        .map_err(|e| BackendError::setup("checking unicorn's CPU state layout", e))?;
    if init.sregs.efer & mode::EFER_LMA == 0 {
        enter_protected_mode(&mut uc, &mut cpu, init)?;
    }
    uc.get_data_mut().cpu = Some(cpu);
    uc.get_data_mut().live = LiveCpu::find(&mut uc);
    uc.add_insn_invalid_hook(on_invalid).map_err(uc_err("hook"))?;
    uc.add_insn_out_hook(|uc: &mut Engine<'_>, port: u32, size: usize, value: u32| {
        let (port, size) = (port as u16, size as u8);
        if port == PORT_DOORBELL && size == 1 && on_doorbell(uc) {
            return;
        }
        let state = uc.get_data_mut();
        let needs_loop = match state.sink {
            // SAFETY: installed by `next_exit` for exactly this `emu_start` (see there).
            Some(SinkPtr(sink)) => unsafe { &mut *sink }.port_out(port, size, value),
            None => true,
        };
        if needs_loop {
            // Only for what ends the run: unicorn stops at the end of the block, and registers
            // are not guaranteed exact when it stops from an out hook.
            state.stop_with(VcpuExit::IoOut { port, size, data: value });
            let _ = uc.emu_stop();
        }
    })
    .map_err(uc_err("hook"))?;
    uc.add_insn_in_hook(|uc: &mut Engine<'_>, port: u32, size: usize| {
        match uc.get_data().sink {
            // SAFETY: installed by `next_exit` for exactly this `emu_start` (see there).
            Some(SinkPtr(sink)) => unsafe { &mut *sink }.port_in(port as u16, size as u8),
            None => u32::MAX,
        }
    })
    .map_err(uc_err("hook"))?;
    map_apic(&mut uc, ram.size())?;
    uc.add_intr_hook(on_exception).map_err(uc_err("hook"))?;
    uc.add_mem_hook(
        HookType::MEM_UNMAPPED,
        1,
        0,
        |uc: &mut Engine<'_>, kind: MemType, addr: u64, size: usize, _| {
            let write = matches!(kind, MemType::WRITE_UNMAPPED);
            uc.get_data_mut().stop_with(VcpuExit::Mmio {
                gpa: addr,
                write,
                len: size as u8,
                data: 0,
            });
            let _ = uc.emu_stop();
            false
        },
    )
    .map_err(uc_err("hook"))?;
    Ok(uc)
}

/// The local APIC's page, answered inline by the VMM's device model like port I/O (unless RAM
/// reaches that high and hides it, as a memory slot does on KVM).
fn map_apic(uc: &mut Engine<'_>, ram_size: u64) -> Result<(), BackendError> {
    use vmcall_abi::mmio::{APIC_BASE, APIC_SIZE};
    if ram_size > APIC_BASE {
        return Ok(());
    }
    let read = |uc: &mut Engine<'_>, off: u64, size: usize| {
        let Some(SinkPtr(sink)) = uc.get_data().sink else { return 0 };
        // SAFETY: installed by `next_exit` for exactly this `emu_start` (see there); MMIO
        // callbacks run only inside it.
        let sink = unsafe { &mut *sink };
        sink.mmio_read(APIC_BASE + off, size as u8).unwrap_or(0)
    };
    let write = |uc: &mut Engine<'_>, off: u64, size: usize, value: u64| {
        if let Some(SinkPtr(sink)) = uc.get_data().sink {
            // SAFETY: as for reads.
            unsafe { &mut *sink }.mmio_write(APIC_BASE + off, size as u8, value);
        }
    };
    uc.mmio_map(APIC_BASE, APIC_SIZE, Some(read), Some(write)).map_err(uc_err("map the APIC page"))
}

macro_rules! gpr_list {
    ($m:ident) => {
        $m!(RAX rax, RBX rbx, RCX rcx, RDX rdx, RSI rsi, RDI rdi, RSP rsp, RBP rbp, R8 r8, R9 r9,
            R10 r10, R11 r11, R12 r12, R13 r13, R14 r14, R15 r15, RIP rip, RFLAGS rflags)
    };
}

fn write_regs<D>(uc: &mut Unicorn<'_, D>, r: &Regs) -> Result<(), uc_error> {
    macro_rules! write {
        ($($reg:ident $field:ident),*) => { $(uc.reg_write(R::$reg, r.$field)?;)* };
    }
    gpr_list!(write);
    Ok(())
}

fn read_regs(uc: &Engine<'_>) -> Result<Regs, uc_error> {
    let mut r = Regs::default();
    macro_rules! read {
        ($($reg:ident $field:ident),*) => { $(r.$field = uc.reg_read(R::$reg)?;)* };
    }
    gpr_list!(read);
    Ok(r)
}

impl Vcpu for EmuVcpu {
    fn run(&mut self, sink: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        let exit = self.next_exit(sink)?;
        self.pending_hypercall = match &exit {
            VcpuExit::Hypercall(hc) => Some(hc.rip),
            _ => None,
        };
        Ok(exit)
    }

    fn complete_hypercall(&mut self, rax: u64) -> Result<(), BackendError> {
        let rip =
            self.pending_hypercall.take().ok_or_else(|| BackendError::NotPending("hypercall"))?;
        let uc = self.engine()?;
        uc.reg_write(R::RAX, rax).map_err(uc_err("RAX"))?;
        uc.reg_write(R::RIP, rip.wrapping_add(insn::HYPERCALL_LEN)).map_err(uc_err("RIP"))
    }

    fn complete_io_in(&mut self, _data: u32) -> Result<(), BackendError> {
        // The emulator answers port reads itself, inside its hooks.
        Err(BackendError::NotPending("port read"))
    }

    fn complete_mmio_read(&mut self, _data: u64) -> Result<(), BackendError> {
        // The emulator answers device reads itself, inside its hooks.
        Err(BackendError::NotPending("MMIO read"))
    }

    fn regs(&mut self) -> Result<Regs, BackendError> {
        read_regs(self.engine()?).map_err(uc_err("registers"))
    }

    fn guest_tsc(&mut self) -> u64 {
        guest_tsc()
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        Arc::new(EmuInterrupter(self.stop.clone()))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
        write_regs(self.engine()?, regs).map_err(uc_err("registers"))
    }

    fn sregs(&mut self) -> Result<SpecialRegs, BackendError> {
        read_sregs(self.engine()?)
    }

    fn debug_caps(&self) -> DebugCaps {
        // Breakpoints are code hooks and watchpoints memory hooks: no limit.
        DebugCaps { supported: true, max_slots: None, watchpoints: true, int3: false }
    }

    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<(), BackendError> {
        if !self.stop.stop_in_thread.load(Ordering::SeqCst) {
            // A debugger is attached (the VMM calls this before the first run then): from now
            // on interrupts stop the engine from its own thread, at a block boundary.
            let stop = self.stop.clone();
            self.engine()?
                .add_block_hook(1, 0, move |uc: &mut Engine<'_>, _addr: u64, _size: u32| {
                    if stop.requested.load(Ordering::SeqCst) {
                        let _ = uc.emu_stop();
                    }
                })
                .map_err(uc_err("interrupt hook"))?;
            self.stop.stop_in_thread.store(true, Ordering::SeqCst);
        }
        let same_hooks = debug.breakpoints == self.debug.breakpoints
            && debug.watchpoints == self.debug.watchpoints;
        self.debug = debug.clone();
        if same_hooks {
            return Ok(());
        }
        let old = std::mem::take(&mut self.debug_hooks);
        let uc = self.engine()?;
        for id in old {
            uc.remove_hook(id).map_err(uc_err("remove a debug hook"))?;
        }
        let mut hooks = Vec::new();
        for &addr in &debug.breakpoints {
            // A hook on exactly this address: code elsewhere runs at full speed.
            hooks.push(
                uc.add_code_hook(addr, addr, |uc: &mut Engine<'_>, addr: u64, _size: u32| {
                    let state = uc.get_data_mut();
                    if state.skip_breakpoint.take() == Some(addr) {
                        return;
                    }
                    state.stop_with(VcpuExit::Debugger(DebugStop::Breakpoint(addr)));
                    let _ = uc.emu_stop();
                })
                .map_err(uc_err("breakpoint hook"))?,
            );
        }
        for w in &debug.watchpoints {
            let types = match w.kind {
                WatchKind::Write => HookType::MEM_WRITE,
                WatchKind::Read => HookType::MEM_READ,
                WatchKind::Access => HookType::MEM_READ | HookType::MEM_WRITE,
            };
            let (addr, kind) = (w.addr, w.kind);
            let last = w.addr.wrapping_add(w.len.max(1) - 1);
            hooks.push(
                uc.add_mem_hook(types, addr, last, move |uc: &mut Engine<'_>, _, _, _, _| {
                    // Stopping here would leave the instruction half done: note it, and stop
                    // at the next instruction boundary (the hook below, or the end of the run).
                    uc.get_data_mut().watch_hit.get_or_insert((addr, kind));
                    true
                })
                .map_err(uc_err("watchpoint hook"))?,
            );
        }
        if !debug.watchpoints.is_empty() {
            // Every instruction while watchpoints are armed: the emulator runs slower then.
            hooks.push(
                uc.add_code_hook(1, 0, |uc: &mut Engine<'_>, _addr: u64, _size: u32| {
                    let state = uc.get_data_mut();
                    if let Some((addr, kind)) = state.watch_hit.take() {
                        state.stop_with(VcpuExit::Debugger(DebugStop::Watch { addr, kind }));
                        let _ = uc.emu_stop();
                    }
                })
                .map_err(uc_err("watchpoint hook"))?,
            );
        }
        // Code translated before the hooks changed would not call them.
        uc.ctl_flush_tb().map_err(uc_err("flush translations"))?;
        self.debug_hooks = hooks;
        Ok(())
    }
}

/// The segment, control and descriptor-table registers, from the engine's own caches.
fn read_sregs(uc: &mut Engine<'_>) -> Result<SpecialRegs, BackendError> {
    let reg = |uc: &Engine<'_>, r: R| uc.reg_read(r).map_err(uc_err("control register"));
    let table = |uc: &Engine<'_>, r: R| {
        read_mmr(uc, r)
            .map(|m| DescriptorTable { base: m.base, limit: m.limit as u16 })
            .map_err(uc_err("descriptor table"))
    };
    let tr = read_mmr(uc, R::TR).map_err(uc_err("TR"))?;
    let ldt = read_mmr(uc, R::LDTR).map_err(uc_err("LDTR"))?;
    let mut s = SpecialRegs {
        gdt: table(uc, R::GDTR)?,
        idt: table(uc, R::IDTR)?,
        cr0: reg(uc, R::CR0)?,
        cr2: reg(uc, R::CR2)?,
        cr3: reg(uc, R::CR3)?,
        cr4: reg(uc, R::CR4)?,
        efer: crate::uc::read_msr(uc, MSR_EFER).map_err(uc_err("EFER"))?,
        tr: SegCache { selector: tr.selector, base: tr.base, limit: tr.limit, flags: tr.flags }
            .to_segment(),
        ldt: SegCache {
            selector: ldt.selector,
            base: ldt.base,
            limit: ldt.limit,
            flags: ldt.flags,
        }
        .to_segment(),
        ..SpecialRegs::default()
    };
    let cpu =
        uc.get_data_mut().cpu.as_mut().ok_or_else(|| {
            BackendError::Unsupported("the engine has no CPU state to read".into())
        })?;
    cpu.save();
    s.cs = cpu.seg(SEG_CS).to_segment();
    s.ss = cpu.seg(SEG_SS).to_segment();
    s.ds = cpu.seg(SEG_DS).to_segment();
    s.es = cpu.seg(SEG_ES).to_segment();
    s.fs = cpu.seg(SEG_FS).to_segment();
    s.gs = cpu.seg(SEG_GS).to_segment();
    Ok(s)
}
