//! The invalid-instruction and interrupt hooks: hypercalls answered, every other exception
//! delivered through the guest's own IDT (see `exceptions`), or the run ended as on KVM.
//!
//! Both hooks run between translation blocks, so they may save and restore the CPU state
//! through the context (`cpu_state`).

use unicorn_engine::RegisterX86 as R;
use vmcall_abi::insn;
use vmcall_vmm::backend::VcpuExit;
use vmcall_vmm::hypercall::{HypercallExit, HypercallInsn, InsnAction};
use vmcall_vmm::x86::mode::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA};
use vmcall_vmm::x86::{CpuMode, PagingContext, VirtualMemory};

use crate::cpu_state::{CpuState, SegCache, DESC_B, HF_CS64, HF_LMA, SEG_CS, SEG_SS};
use crate::doorbell::DOORBELL_SITE;
use crate::exceptions::{self, Cpu, Event, Outcome, Table, GP, PF};
use crate::uc::{
    read_hypercall_regs, read_mmr, read_msr, write_regs_between_blocks, HypercallRegs,
};
use crate::vcpu::{Engine, SinkPtr, MSR_EFER};

/// The mode of the running code from CR0, QEMU's hidden flags and CS's cached descriptor
/// flags: what KVM reads from the CPU's descriptor cache.
fn cpu_mode(cr0: u64, hflags: u32, cs_flags: u32) -> CpuMode {
    if cr0 & CR0_PE == 0 {
        CpuMode::Real
    } else if hflags & HF_LMA == 0 {
        CpuMode::Protected
    } else if hflags & HF_CS64 != 0 {
        CpuMode::Long64
    } else if cs_flags & DESC_B != 0 {
        CpuMode::Compat32
    } else {
        CpuMode::Compat16
    }
}

/// The registers that say how the guest translates addresses now.
pub(crate) fn paging_context(uc: &Engine<'_>) -> PagingContext {
    PagingContext {
        cr0: uc.reg_read(R::CR0).unwrap_or(0),
        cr3: uc.reg_read(R::CR3).unwrap_or(0),
        cr4: uc.reg_read(R::CR4).unwrap_or(0),
        efer: read_msr(uc, MSR_EFER).unwrap_or(0),
    }
}

/// The mode of code running with the current CS and CS's base, from the CPU's own cached CS
/// descriptor and mode bits (the same source KVM reads: the descriptor cache, not the GDT,
/// which the guest may have changed or unmapped since it loaded CS).
///
/// Reading them costs a context save, so the answer is cached per (CS selector, GDTR, CR0.PE,
/// EFER.LMA): like the CPU's own cache, it goes stale only if the guest rewrites the
/// descriptor in place and reloads the same selector under the same GDTR.
fn current_mode(uc: &mut Engine<'_>, cs: u16, paging: &PagingContext) -> (CpuMode, u64) {
    let gdtr = read_mmr(uc, R::GDTR).map(|m| (m.base, m.limit)).unwrap_or_default();
    current_mode_with(uc, cs, gdtr, paging)
}

/// [`current_mode`] with GDTR's base and limit already read. Inside a translation block (the
/// OUT hook) the context is only ever saved, which copies the CPU state and changes nothing.
fn current_mode_with(
    uc: &mut Engine<'_>,
    cs: u16,
    gdtr: (u64, u32),
    paging: &PagingContext,
) -> (CpuMode, u64) {
    let key = (cs, gdtr.0, gdtr.1, paging.cr0 & CR0_PE, paging.efer & EFER_LMA);
    if let Some((k, mode, base)) = uc.get_data().mode_cache {
        if k == key {
            return (mode, base);
        }
    }
    let state = cpu_state(uc);
    state.save();
    let (hflags, cs_cache) = (state.hflags(), state.seg(SEG_CS));
    let mode = cpu_mode(paging.cr0, hflags, cs_cache.flags);
    // 64-bit code ignores CS's base.
    let base = if mode == CpuMode::Long64 { 0 } else { cs_cache.base };
    uc.get_data_mut().mode_cache = Some((key, mode, base));
    (mode, base)
}

fn cpu_state<'a>(uc: &'a mut Engine<'_>) -> &'a mut CpuState {
    uc.get_data_mut().cpu.as_mut().expect("attached when the engine was created")
}

/// The linear address of `rip` in `mode` with CS based at `cs_base`.
fn linear_rip(mode: CpuMode, cs_base: u64, rip: u64) -> u64 {
    if mode == CpuMode::Long64 {
        rip
    } else {
        cs_base.wrapping_add(rip) & 0xffff_ffff
    }
}

/// Read the code bytes at `rip` (CS-relative) as the guest's page tables map them.
pub(crate) fn read_code(uc: &mut Engine<'_>, rip: u64, buf: &mut [u8]) -> bool {
    let cs = uc.reg_read(R::CS).unwrap_or(0) as u16;
    let paging = paging_context(uc);
    let (mode, cs_base) = current_mode(uc, cs, &paging);
    let linear = linear_rip(mode, cs_base, rip);
    VirtualMemory::new(&uc.get_data().ram, paging).read(linear, buf).is_ok()
}

/// An invalid instruction (#UD). VMCALL and VMMCALL are invalid to the emulator at any CPL
/// and in any mode, and are answered right here through the VMM's sink without stopping the
/// engine; they are recognised by the bytes at RIP as the guest's own page tables map it.
/// A hypercall answered at CPL 0 has its site rewritten into the doorbell (see `doorbell`),
/// which later calls take. Anything else is a real #UD, delivered to the guest.
pub(crate) fn on_invalid(uc: &mut Engine<'_>) -> bool {
    let Ok(r) = read_hypercall_regs(uc) else {
        let exit = VcpuExit::Unknown("unicorn: cannot read the registers at a #UD".into());
        uc.get_data_mut().stop_with(exit);
        let _ = uc.emu_stop();
        return true;
    };
    let (rip, cs) = (r.rip, r.cs);
    let paging = paging_of(&r);
    let (mode, cs_base) = current_mode_with(uc, cs, (r.gdtr_base, r.gdtr_limit), &paging);
    let linear = linear_rip(mode, cs_base, rip);
    let mut bytes = [0u8; 3];
    let state = uc.get_data();
    let memory = VirtualMemory::new(&state.ram, paging);
    let found = match memory.read(linear, &mut bytes) {
        Ok(()) => HypercallInsn::decode(&bytes),
        Err(e) => {
            // The fetch itself would fault (the page tables changed under the emulator's
            // translation cache).
            let user = cs & 3 == 3;
            raise(uc, |_| exceptions::fetch_fault(e, rip, user, &paging));
            return true;
        }
    };
    if found.is_none() && bytes == DOORBELL_SITE {
        // This engine translated the site before another vCPU rewrote it: drop the stale
        // translation and run the doorbell now in memory.
        let live = memory.gpa(linear).ok().and_then(|gpa| state.sites.lookup(&state.ram, gpa));
        if live.is_some() {
            let _ = uc.ctl_remove_cache(linear, linear + insn::HYPERCALL_LEN);
            return true;
        }
    }
    let action = found.map(|insn| state.foreign.action(insn, state.native));
    let insn = match (found, action) {
        (Some(insn), Some(InsnAction::Answer)) => {
            if cs & 3 == 0 {
                rewrite_site(uc, &paging, linear, insn);
            }
            insn
        }
        (Some(insn), Some(InsnAction::PatchThenAnswer { native })) => {
            // KVM's FIX_HYPERCALL_INSN quirk: the native instruction from now on.
            let _ = VirtualMemory::new(&state.ram, paging).write(linear, &native.bytes());
            insn
        }
        _ => {
            // Not a hypercall, or the other vendor's with the quirk off: a real #UD.
            raise(uc, |_| Ok(Event::exception(exceptions::UD, 0, rip)));
            return true;
        }
    };
    let call = HypercallExit {
        nr: r.rax,
        args: [r.rbx, r.rcx, r.rdx, r.rsi],
        cpl: (cs & 3) as u8,
        mode,
        rip,
        insn,
        paging,
    };
    match uc.get_data().sink {
        Some(SinkPtr(sink))
            // SAFETY: installed by `next_exit` for exactly this `emu_start` (see there); no
            // other reference to the sink exists while a hook runs.
            if !unsafe { &mut *sink }.hypercall_needs_loop(&call) =>
        {
            // SAFETY: as above.
            let sink = unsafe { &mut *sink };
            let rax = sink.hypercall(&call, &mut guest_tsc);
            let next = rip.wrapping_add(insn::HYPERCALL_LEN);
            let _ = write_regs_between_blocks(uc, &[(R::RAX, rax), (R::RIP, next)]);
        }
        _ => {
            uc.get_data_mut().stop_with(VcpuExit::Hypercall(call));
            let _ = uc.emu_stop();
        }
    }
    true
}

/// Rewrite the hypercall that just executed at `linear` into the doorbell, and drop this
/// engine's translations of its bytes (the write goes straight to guest RAM, past the
/// emulator's self-modifying-code tracking).
fn rewrite_site(uc: &mut Engine<'_>, paging: &PagingContext, linear: u64, insn: HypercallInsn) {
    let state = uc.get_data();
    // Only with one vCPU. Unicorn's translator reads an instruction's bytes one at a time, so
    // another vCPU translating the site while it is rewritten can read the old first byte and
    // the new ones after it (`0f f5 90`: a PMADDWD with a memory operand) and fault on an
    // address the guest never used; the soak run caught exactly that. No store order avoids
    // it without stopping the other vCPUs, so with several vCPUs sites keep trapping.
    if !state.single_vcpu {
        return;
    }
    let Ok(gpa) = VirtualMemory::new(&state.ram, *paging).gpa(linear) else { return };
    // Not rewritten (straddling a word with several vCPUs, or no longer a hypercall), the
    // site keeps trapping, which answers it the same.
    if let Ok(true) = state.sites.rewrite(&state.ram, gpa, insn, state.single_vcpu) {
        let _ = uc.ctl_remove_cache(linear, linear + insn::HYPERCALL_LEN);
    }
}

/// An `out` to the doorbell port (from the OUT hook, inside a translation block, where RIP is
/// the `out`'s own address). If it is a rewritten site, answer it as the hypercall it was and
/// return true; otherwise it is the guest's own port write (false).
pub(crate) fn on_doorbell(uc: &mut Engine<'_>) -> bool {
    let (r, mode, cs_base) = match &uc.get_data().live {
        Some(live) => {
            // The CPU state read in place: CS's cached descriptor and the mode flags give the
            // mode directly, as a context save would.
            let s = live.hypercall_state();
            let mode = cpu_mode(s.regs.cr0, s.hflags, s.cs.flags);
            let base = if mode == CpuMode::Long64 { 0 } else { s.cs.base };
            (s.regs, mode, base)
        }
        None => {
            let Ok(r) = read_hypercall_regs(uc) else { return false };
            let paging = paging_of(&r);
            let (mode, base) = current_mode_with(uc, r.cs, (r.gdtr_base, r.gdtr_limit), &paging);
            (r, mode, base)
        }
    };
    let paging = paging_of(&r);
    let linear = linear_rip(mode, cs_base, r.rip);
    let state = uc.get_data_mut();
    let Some(gpa) = state.view.gpa(&paging, linear) else { return false };
    let Some(insn) = state.local_sites.lookup(&state.sites, &state.view, gpa) else {
        return false;
    };
    let Some(SinkPtr(sink)) = state.sink else { return false };
    let call = HypercallExit {
        nr: r.rax,
        args: [r.rbx, r.rcx, r.rdx, r.rsi],
        cpl: (r.cs & 3) as u8,
        mode,
        rip: r.rip,
        insn,
        paging,
    };
    // SAFETY: installed by `next_exit` for exactly this `emu_start` (see there); no other
    // reference to the sink exists while a hook runs.
    let rax = unsafe { &mut *sink }.hypercall(&call, &mut guest_tsc);
    // RAX written here is what the next instruction (the site's `nop`) sees: the OUT helper
    // reloads the engine's registers before it returns to the block. RIP needs no write.
    match &uc.get_data().live {
        Some(live) => live.set_rax(rax),
        None => {
            let _ = uc.reg_write(R::RAX, rax);
        }
    }
    true
}

fn paging_of(r: &HypercallRegs) -> PagingContext {
    PagingContext { cr0: r.cr0, cr3: r.cr3, cr4: r.cr4, efer: r.efer }
}

/// The guest's TSC: unicorn's RDTSC returns the host's TSC plus `tsc_offset`, which only
/// SVM's VMRUN sets (not available to vmcall guests), so it is the host's TSC. (Unicorn does
/// not implement RDMSR of IA32_TSC: it reads 0.)
pub(crate) fn guest_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Every exception but #UD, and INT n / INT3 / INTO, reported instead of delivered.
pub(crate) fn on_exception(uc: &mut Engine<'_>, intno: u32) {
    let Ok(vector) = u8::try_from(intno) else {
        let rip = uc.reg_read(R::RIP).unwrap_or(0);
        let exit = VcpuExit::Unknown(format!("emulator event {intno:#x} at RIP {rip:#x}"));
        uc.get_data_mut().stop_with(exit);
        let _ = uc.emu_stop();
        return;
    };
    let rip = uc.reg_read(R::RIP).unwrap_or(0);
    raise(uc, |r| {
        if !r.is_int {
            return Ok(Event::exception(vector, r.error_code, rip));
        }
        // RIP is already past the instruction; find where it starts (for faults in
        // delivering it): INT3 (0xcc) and INTO (0xce) are one byte, INT n (0xcd n) two.
        let mut b = [0u8; 2];
        let linear = linear_rip(r.mode, r.cpu.cs.base, rip.wrapping_sub(2));
        let _ = VirtualMemory::new(r.ram, r.cpu.paging).read(linear, &mut b);
        let one_byte = (vector == 3 && b[1] == 0xcc) || (vector == 4 && b[1] == 0xce);
        let insn = rip.wrapping_sub(if one_byte { 1 } else { 2 });
        Ok(Event::software(vector, insn, rip))
    });
}

/// What the engine reported along with an exception.
pub(crate) struct Reported<'a> {
    pub cpu: Cpu,
    pub mode: CpuMode,
    pub error_code: u32,
    pub is_int: bool,
    pub ram: &'a vmcall_vmm::memory::GuestRam,
}

/// Read the CPU state, build the event with `event`, and deliver it into the guest, or end
/// the run as the CPU (or, for vmcall's own IDT, the VMM's stubs on KVM) would.
fn raise(uc: &mut Engine<'_>, event: impl FnOnce(&Reported<'_>) -> Result<Event, VcpuExit>) {
    let ram = uc.get_data().ram.clone();
    let (cpu, mode, error_code, is_int) = read_cpu(uc);
    let reported = Reported { cpu, mode, error_code, is_int, ram: &ram };
    let outcome = match event(&reported) {
        Ok(ev) => match fix_cr4_write(uc, cpu, ev) {
            Ok((cpu, ev)) => exceptions::deliver(&ram, &cpu, ev),
            Err(exit) => Outcome::Exit(exit),
        },
        Err(exit) => Outcome::Exit(exit),
    };
    match outcome {
        Outcome::Deliver(d) => {
            for piece in &d.frame {
                // Checked against RAM while planning.
                let _ = piece.write(&ram);
            }
            if let Some(cr2) = d.cr2 {
                let _ = uc.reg_write(R::CR2, cr2);
            }
            let _ = write_regs_between_blocks(
                uc,
                &[(R::RSP, d.rsp), (R::RFLAGS, d.rflags), (R::RIP, d.rip)],
            );
            let pe = cpu.paging.cr0 & CR0_PE != 0;
            let state = cpu_state(uc);
            state.save();
            if let Some(ss) = d.ss {
                state.load_seg(SEG_SS, ss, pe);
            }
            state.load_seg(SEG_CS, d.cs, pe);
            state.set_cpl(d.cpl);
            state.clear_old_exception();
            state.restore();
            let cr2 = uc.reg_read(R::CR2).unwrap_or(0);
            uc.get_data_mut().cr2_seen = cr2;
        }
        Outcome::VmmFault(fault) => {
            uc.get_data_mut().stop_with(VcpuExit::Fault(fault));
            let _ = uc.emu_stop();
        }
        Outcome::Exit(exit) => {
            uc.get_data_mut().stop_with(exit);
            let _ = uc.emu_stop();
        }
    }
}

/// The CPU state delivery needs, the mode, and the reported error code and kind. Also
/// forgets QEMU's exception in flight, so that it never escalates on its own.
fn read_cpu(uc: &mut Engine<'_>) -> (Cpu, CpuMode, u32, bool) {
    let paging = paging_context(uc);
    let state = cpu_state(uc);
    state.save();
    let (cpl, cs, ss) = (state.cpl(), state.seg(SEG_CS), state.seg(SEG_SS));
    let (error_code, is_int) = (state.error_code(), state.is_int());
    let hflags = state.hflags();
    state.clear_old_exception();
    state.restore();
    let mode = cpu_mode(paging.cr0, hflags, cs.flags);
    let table = |r: R| read_mmr(uc, r).map(|m| Table { base: m.base, limit: m.limit });
    let tr = read_mmr(uc, R::TR)
        .map(|m| SegCache { selector: m.selector, base: m.base, limit: m.limit, flags: m.flags })
        .unwrap_or_default();
    let cpu = Cpu {
        rsp: uc.reg_read(R::RSP).unwrap_or(0),
        rflags: uc.reg_read(R::RFLAGS).unwrap_or(0),
        cpl,
        cs,
        ss,
        gdt: table(R::GDTR).unwrap_or_default(),
        ldt: table(R::LDTR).unwrap_or_default(),
        idt: table(R::IDTR).unwrap_or_default(),
        tr,
        paging,
        cr2: uc.reg_read(R::CR2).unwrap_or(0),
    };
    (cpu, mode, error_code, is_int)
}

/// Clearing CR4.PAE in long mode raises #GP at the `mov cr4`, but the emulator accepts it
/// and goes on translating with 32-bit paging, which normally faults at the very next fetch.
/// Found in that state, the fault is re-attributed: if the exception is that #PF on fetching
/// the instruction right after a `mov cr4, reg` (bytes checked through the long-mode tables),
/// CR4.PAE and CR2 are put back and the `mov cr4` raises #GP(0) instead. (The CPU leaves all
/// of CR4 unchanged; here only PAE is restored, so a write that also changed other bits keeps
/// them. CR2 is restored to what it was when the emulator last had control.) If the state is
/// found any other way, the guest ran on where the CPU would have stopped: the run ends.
fn fix_cr4_write(uc: &mut Engine<'_>, cpu: Cpu, ev: Event) -> Result<(Cpu, Event), VcpuExit> {
    let p = cpu.paging;
    if p.efer & EFER_LMA == 0 || p.cr0 & CR0_PG == 0 || p.cr4 & CR4_PAE != 0 {
        return Ok((cpu, ev));
    }
    let fixed = PagingContext { cr4: p.cr4 | CR4_PAE, ..p };
    let mut b = [0u8; 4];
    let ram = uc.get_data().ram.clone();
    let mem = VirtualMemory::new(&ram, fixed);
    let fetch_fault = ev.vector == PF && ev.cr2.is_none() && cpu.cr2 == ev.rip;
    let insn = (fetch_fault && mem.read(ev.rip.wrapping_sub(4), &mut b).is_ok())
        .then(|| {
            let mov_cr4 = |s: &[u8]| s[0] == 0x0f && s[1] == 0x22 && s[2] & 0xf8 == 0xe0;
            if b[0] & 0xf5 == 0x41 && mov_cr4(&b[1..]) {
                Some(ev.rip - 4)
            } else {
                mov_cr4(&b[1..]).then(|| ev.rip - 3)
            }
        })
        .flatten();
    let Some(insn) = insn else {
        return Err(VcpuExit::Unknown(format!(
            "the guest cleared CR4.PAE in long mode (the CPU raises #GP there) and the emulator \
             ran on to RIP {:#x}",
            ev.rip
        )));
    };
    let cr2 = uc.get_data().cr2_seen;
    let _ = uc.reg_write(R::CR4, fixed.cr4);
    let _ = uc.reg_write(R::CR2, cr2);
    let cpu = Cpu { paging: fixed, cr2, ..cpu };
    Ok((cpu, Event::exception(GP, 0, insn)))
}
