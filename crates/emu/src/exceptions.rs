//! Exception and interrupt delivery through the guest's own IDT, as the CPU does it.
//!
//! Unicorn reports exceptions to hooks and never delivers them, so this module plans the
//! delivery the CPU would make: gate lookup and checks, the handler's code segment, the stack
//! (TSS RSP0/IST in long mode, TSS SS:ESP in 32-bit protected mode on a privilege change), the
//! frame and its error code, and the flags. Every table and stack access goes through the
//! guest's own page tables, and a fault while delivering escalates by the CPU's rules (a
//! contributory fault or #PF on top of another → #DF; any fault delivering #DF → triple
//! fault). The plan is pure: nothing is written until the caller applies a [`Delivery`].
//!
//! Not modelled: task gates and 16-bit gates (reported as [`VcpuExit::Unknown`]), real and
//! virtual-8086 mode, and segment-limit checks on the stack (the stack segment is taken as
//! flat, which every 32-bit kernel's is).

use vmcall_abi::{layout, selectors};
use vmcall_vmm::backend::{GuestFault, VcpuExit};
use vmcall_vmm::boot::stub_gpa;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::descriptors::has_error_code;
use vmcall_vmm::x86::mode::{CR0_PE, CR4_PAE, EFER_LMA};
use vmcall_vmm::x86::paging::{translate, Access, VirtError, WalkError};
use vmcall_vmm::x86::{PagingContext, VirtualMemory};

use crate::cpu_state::{SegCache, DESC_B, DESC_DPL_SHIFT, DESC_L};

pub(crate) const DE: u8 = 0;
pub(crate) const UD: u8 = 6;
pub(crate) const DF: u8 = 8;
pub(crate) const TS: u8 = 10;
pub(crate) const NP: u8 = 11;
pub(crate) const SS: u8 = 12;
pub(crate) const GP: u8 = 13;
pub(crate) const PF: u8 = 14;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;

const PF_P: u32 = 1;
const PF_W: u32 = 1 << 1;
const PF_U: u32 = 1 << 2;
const PF_ID: u32 = 1 << 4;
const EFER_NXE: u64 = 1 << 11;
const CR4_SMEP: u64 = 1 << 20;

/// How an event was raised, which decides the pushed RIP and RF and the error codes of faults
/// in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A fault: the pushed RIP is the faulting instruction and RF is set in the pushed RFLAGS.
    Fault,
    /// A trap or an abort raised by the processor: the pushed RIP is where execution goes on.
    Trap,
    /// INT n, INT3 or INTO at `insn`: the gate's DPL is checked against the CPL, no error
    /// code is pushed, and a fault in delivering it is reported at the instruction.
    Soft { insn: u64 },
}

/// An exception or software interrupt to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Event {
    pub vector: u8,
    pub error_code: Option<u32>,
    pub kind: Kind,
    /// The RIP pushed in the frame (a CS-relative offset, as the CPU pushes it).
    pub rip: u64,
    /// CR2 to load when it is delivered: a #PF raised by an earlier delivery.
    pub cr2: Option<u64>,
}

impl Event {
    /// An exception the processor raised with `error_code` (used only for the vectors that
    /// push one), at `rip`.
    pub(crate) fn exception(vector: u8, error_code: u32, rip: u64) -> Self {
        // Faults push the faulting instruction; #DB (as the emulator raises it: single-step),
        // NMI, #DF and #MC are traps or aborts here.
        let kind = if matches!(vector, 1 | 2 | 3 | 4 | DF | 18) { Kind::Trap } else { Kind::Fault };
        let error_code = has_error_code(vector).then_some(error_code);
        Self { vector, error_code, kind, rip, cr2: None }
    }

    /// INT n (or INT3/INTO) at `insn`, returning to `next`.
    pub(crate) fn software(vector: u8, insn: u64, next: u64) -> Self {
        Self { vector, error_code: None, kind: Kind::Soft { insn }, rip: next, cr2: None }
    }

    fn soft(&self) -> bool {
        matches!(self.kind, Kind::Soft { .. })
    }

    /// The EXT bit of error codes raised while delivering this event.
    fn ext(&self) -> u32 {
        u32::from(!self.soft())
    }

    /// Where a fault raised while delivering this event is reported.
    pub(crate) fn restart_rip(&self) -> u64 {
        match self.kind {
            Kind::Soft { insn } => insn,
            _ => self.rip,
        }
    }
}

/// A descriptor-table register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Table {
    pub base: u64,
    pub limit: u32,
}

/// The CPU state delivery depends on, read when the exception was reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cpu {
    pub rsp: u64,
    pub rflags: u64,
    pub cpl: u8,
    pub cs: SegCache,
    pub ss: SegCache,
    pub gdt: Table,
    pub ldt: Table,
    pub idt: Table,
    /// TR: selector, base and limit of the current TSS.
    pub tr: SegCache,
    pub paging: PagingContext,
    pub cr2: u64,
}

impl Cpu {
    fn long_mode(&self) -> bool {
        self.paging.efer & EFER_LMA != 0
    }
}

/// A planned delivery: write `frame`, then load the registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub vector: u8,
    /// The pushed frame, translated and checked.
    pub frame: Vec<FramePiece>,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cs: SegCache,
    /// The new SS, on a privilege change.
    pub ss: Option<SegCache>,
    pub cpl: u8,
    pub cr2: Option<u64>,
}

/// Bytes of the frame at one guest-physical address (a slot, or the part of one in a page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FramePiece {
    pub gpa: u64,
    pub bytes: [u8; 8],
    pub len: usize,
}

impl FramePiece {
    pub(crate) fn write(&self, ram: &GuestRam) -> Result<(), vmcall_vmm::memory::OutOfBounds> {
        ram.write(self.gpa, &self.bytes[..self.len])
    }
}

/// What becomes of an exception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The guest's handler runs.
    Deliver(Delivery),
    /// The gate is one of the VMM's own stubs (vmcall's boot IDT): the exception ends the run,
    /// as it does on KVM when the stub reports it.
    VmmFault(GuestFault),
    /// The run ends: triple fault, unbacked memory, or a delivery the emulator cannot make.
    Exit(VcpuExit),
}

enum Fail {
    Fault { vector: u8, error_code: Option<u32>, cr2: Option<u64> },
    Exit(VcpuExit),
}

fn fault(vector: u8, error_code: u32) -> Fail {
    Fail::Fault { vector, error_code: Some(error_code), cr2: None }
}

#[derive(PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
}

fn class(vector: u8) -> Class {
    match vector {
        DE | TS | NP | SS | GP => Class::Contributory,
        PF => Class::PageFault,
        _ => Class::Benign,
    }
}

/// Deliver `event`, escalating faults raised on the way as the CPU does.
pub(crate) fn deliver(ram: &GuestRam, cpu: &Cpu, event: Event) -> Outcome {
    let mut ev = event;
    // benign → contributory → #PF → #DF → shutdown is the longest chain.
    for _ in 0..8 {
        let (vector, error_code, cr2) = match plan(ram, cpu, &ev) {
            Ok(outcome) => return outcome,
            Err(Fail::Exit(exit)) => return Outcome::Exit(exit),
            Err(Fail::Fault { vector, error_code, cr2 }) => (vector, error_code, cr2),
        };
        let rip = ev.restart_rip();
        if ev.vector == DF && !ev.soft() {
            return Outcome::Exit(VcpuExit::Shutdown { rip });
        }
        let first = if ev.soft() { Class::Benign } else { class(ev.vector) };
        let second = class(vector);
        let double = (first == Class::Contributory && second == Class::Contributory)
            || (first == Class::PageFault && second != Class::Benign);
        ev = if double {
            Event { vector: DF, error_code: Some(0), kind: Kind::Trap, rip, cr2: None }
        } else {
            Event { vector, error_code, kind: Kind::Fault, rip, cr2 }
        };
    }
    Outcome::Exit(VcpuExit::Shutdown { rip: ev.restart_rip() })
}

/// Where a frame goes: `size`-byte slots below `top` in the stack segment at `base`, written
/// with the new CPL's rights (`user` for CPL 3); `wrap32` makes the pointer wrap at 4 GiB.
#[derive(Clone, Copy)]
struct Stack {
    base: u64,
    top: u64,
    size: usize,
    user: bool,
    wrap32: bool,
}

/// The reads and writes a delivery makes, through the guest's page tables.
struct Mem<'a> {
    ram: &'a GuestRam,
    paging: PagingContext,
}

impl Mem<'_> {
    /// An implicit supervisor read of a system structure (IDT, GDT, LDT, TSS).
    fn read_sys(&self, va: u64, buf: &mut [u8]) -> Result<(), Fail> {
        VirtualMemory::new(self.ram, self.paging)
            .read(va, buf)
            .map_err(|e| access_fail(e, Access::READ, fault(GP, 0)))
    }

    fn read_u64(&self, va: u64) -> Result<u64, Fail> {
        let mut b = [0u8; 8];
        self.read_sys(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Translate the pushes of a frame (`values[0]` at `top - size`, the next below it, ...),
    /// from the highest address down as the CPU pushes, checking each before anything is
    /// written. Returns the new stack pointer and the pieces to write.
    fn frame(
        &self,
        stack: Stack,
        values: &[u64],
        ext: u32,
    ) -> Result<(u64, Vec<FramePiece>), Fail> {
        let Stack { base: stack_base, top, size, user, wrap32 } = stack;
        let access = Access { write: true, user };
        let mut sp = top;
        let mut out = Vec::with_capacity(values.len());
        for &v in values {
            sp = sp.wrapping_sub(size as u64);
            if wrap32 {
                sp &= 0xffff_ffff;
            }
            let mut va = stack_base.wrapping_add(sp);
            if wrap32 {
                va &= 0xffff_ffff;
            }
            // A slot that straddles a page goes in two pieces.
            let bytes = v.to_le_bytes();
            let mut done = 0usize;
            while done < size {
                let at = va.wrapping_add(done as u64);
                let t = translate(self.ram, &self.paging, at, access)
                    .map_err(|e| access_fail(VirtError::Walk(e), access, fault(SS, ext)))?;
                let n = (t.room().min((size - done) as u64)) as usize;
                if self.ram.check(t.gpa, n as u64).is_err() {
                    let len = n as u8;
                    return Err(Fail::Exit(VcpuExit::Mmio {
                        gpa: t.gpa,
                        write: true,
                        len,
                        data: 0,
                    }));
                }
                let mut piece = [0u8; 8];
                piece[..n].copy_from_slice(&bytes[done..done + n]);
                out.push(FramePiece { gpa: t.gpa, bytes: piece, len: n });
                done += n;
            }
        }
        Ok((sp, out))
    }
}

/// The fault the CPU raises for a failed access: #PF with the P/W/U bits of the access,
/// `noncanonical` for an address outside the canonical range, or a stop for memory that has
/// no RAM behind it.
fn access_fail(e: VirtError, access: Access, noncanonical: Fail) -> Fail {
    let bits = if access.write { PF_W } else { 0 } | if access.user { PF_U } else { 0 };
    let pf = |va: u64, present: bool| Fail::Fault {
        vector: PF,
        error_code: Some(bits | if present { PF_P } else { 0 }),
        cr2: Some(va),
    };
    match e {
        VirtError::Walk(WalkError::NotPresent { va, .. }) => pf(va, false),
        VirtError::Walk(WalkError::ReadOnly { va } | WalkError::Supervisor { va }) => pf(va, true),
        VirtError::Walk(WalkError::NonCanonical { .. }) => noncanonical,
        VirtError::Walk(WalkError::TableOutsideRam { table, .. }) => {
            Fail::Exit(VcpuExit::Mmio { gpa: table, write: false, len: 8, data: 0 })
        }
        VirtError::OutOfRam(o) => Fail::Exit(VcpuExit::Mmio {
            gpa: o.gpa,
            write: access.write,
            len: o.len as u8,
            data: 0,
        }),
    }
}

/// The exception of an instruction fetch at linear `va` (RIP `rip`) that the guest's page
/// tables refuse, or the stop for a fetch from memory with no RAM behind it.
pub(crate) fn fetch_fault(
    e: VirtError,
    rip: u64,
    user: bool,
    paging: &PagingContext,
) -> Result<Event, VcpuExit> {
    // The I/D bit is reported only where execute rights exist: NX (PAE paging) or SMEP.
    let id =
        (paging.efer & EFER_NXE != 0 && paging.cr4 & CR4_PAE != 0) || paging.cr4 & CR4_SMEP != 0;
    match access_fail(e, Access { write: false, user }, fault(GP, 0)) {
        Fail::Fault { vector, error_code, cr2 } => {
            let error_code = error_code.map(|c| if vector == PF && id { c | PF_ID } else { c });
            Ok(Event { vector, error_code, kind: Kind::Fault, rip, cr2 })
        }
        Fail::Exit(exit) => Err(exit),
    }
}

/// A segment descriptor as read from the GDT or LDT.
#[derive(Clone, Copy)]
struct Descriptor {
    low: u32,
    high: u32,
}

impl Descriptor {
    fn present(&self) -> bool {
        self.high & (1 << 15) != 0
    }
    fn dpl(&self) -> u8 {
        ((self.high >> DESC_DPL_SHIFT) & 3) as u8
    }
    /// S = 1 and the code bit.
    fn is_code(&self) -> bool {
        self.high & (1 << 12) != 0 && self.high & (1 << 11) != 0
    }
    fn is_writable_data(&self) -> bool {
        self.high & (1 << 12) != 0 && self.high & (1 << 11) == 0 && self.high & (1 << 9) != 0
    }
    fn conforming(&self) -> bool {
        self.high & (1 << 10) != 0
    }
    fn cache(&self, selector: u16) -> SegCache {
        let base = (self.low >> 16) | ((self.high & 0xff) << 16) | (self.high & 0xff00_0000);
        let mut limit = (self.low & 0xffff) | (self.high & 0xf_0000);
        if self.high & (1 << 23) != 0 {
            limit = (limit << 12) | 0xfff;
        }
        SegCache { selector, base: u64::from(base), limit, flags: self.high & 0x00ff_ff00 }
    }
}

/// The descriptor `selector` names; `err` is the error code of the fault for a selector
/// outside its table.
fn descriptor(mem: &Mem<'_>, cpu: &Cpu, selector: u16, err: Fail) -> Result<Descriptor, Fail> {
    let table = if selector & 4 != 0 { cpu.ldt } else { cpu.gdt };
    let index = u64::from(selector & !7);
    if index + 7 > u64::from(table.limit) {
        return Err(err);
    }
    let d = mem.read_u64(table.base.wrapping_add(index))?;
    Ok(Descriptor { low: d as u32, high: (d >> 32) as u32 })
}

/// One attempt at delivering `ev`, or the fault that stops it.
fn plan(ram: &GuestRam, cpu: &Cpu, ev: &Event) -> Result<Outcome, Fail> {
    if cpu.paging.cr0 & CR0_PE == 0 || cpu.rflags & RFLAGS_VM != 0 {
        return Err(Fail::Exit(VcpuExit::Unknown(format!(
            "exception {} in real or virtual-8086 mode, which the emulator does not deliver",
            ev.vector
        ))));
    }
    let mem = Mem { ram, paging: cpu.paging };
    let long = cpu.long_mode();
    let ext = ev.ext();
    let vector_err = (u32::from(ev.vector) << 3) | 2 | ext;
    let gate_size = if long { 16 } else { 8 };
    let at = u64::from(ev.vector) * gate_size;
    if at + gate_size - 1 > u64::from(cpu.idt.limit) {
        return Err(fault(GP, vector_err));
    }
    let mut gate = [0u8; 16];
    mem.read_sys(cpu.idt.base.wrapping_add(at), &mut gate[..gate_size as usize])?;
    let lo = u64::from_le_bytes(gate[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(gate[8..].try_into().expect("8 bytes"));
    let gate_type = ((lo >> 40) & 0x1f) as u8;
    let gate_dpl = ((lo >> 45) & 3) as u8;
    match (long, gate_type) {
        (_, 0xe | 0xf) => {}
        (false, 0x5..=0x7) => {
            return Err(Fail::Exit(VcpuExit::Unknown(format!(
                "exception {} through a task or 16-bit gate (type {gate_type:#x}), which the \
                 emulator does not deliver",
                ev.vector
            ))))
        }
        _ => return Err(fault(GP, vector_err)),
    }
    if ev.soft() && gate_dpl < cpu.cpl {
        return Err(fault(GP, vector_err));
    }
    if lo & (1 << 47) == 0 {
        return Err(fault(NP, vector_err));
    }
    let selector = (lo >> 16) as u16;
    let mut offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    if long {
        offset |= hi << 32;
    }
    let ist = if long { (lo >> 32) & 7 } else { 0 };
    // The VMM's own IDT, of either width (vmcall's contract, or a multiboot kernel that has not
    // loaded its own yet): its stubs report the fault, as they do on KVM.
    let vmm_cs = if long { selectors::KERNEL_CS } else { selectors::KERNEL_CS32 };
    if cpu.idt.base == layout::IDT && selector == vmm_cs && offset == stub_gpa(ev.vector) {
        return Ok(Outcome::VmmFault(vmm_fault(cpu, ev)));
    }

    // The handler's code segment.
    if selector & 0xfffc == 0 {
        return Err(fault(GP, ext));
    }
    let sel_err = u32::from(selector & 0xfffc) | ext;
    let code = descriptor(&mem, cpu, selector, fault(GP, sel_err))?;
    if !code.is_code() || code.dpl() > cpu.cpl {
        return Err(fault(GP, sel_err));
    }
    if !code.present() {
        return Err(fault(NP, sel_err));
    }
    if long && (code.high & DESC_L == 0 || code.high & DESC_B != 0) {
        return Err(fault(GP, sel_err));
    }
    let cpl = if code.conforming() { cpu.cpl } else { code.dpl() };
    let cs = code.cache((selector & !3) | u16::from(cpl));

    let pushed_rflags =
        if ev.kind == Kind::Fault { cpu.rflags | RFLAGS_RF } else { cpu.rflags & !RFLAGS_RF };
    let mut rflags = cpu.rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate_type & 1 == 0 {
        rflags &= !RFLAGS_IF;
    }
    let user = cpl == 3;
    let err = if ev.soft() { None } else { ev.error_code };
    let delivery = |frame, rip, rsp, ss| Delivery {
        vector: ev.vector,
        frame,
        rip,
        rsp,
        rflags,
        cs,
        ss,
        cpl,
        cr2: ev.cr2,
    };

    if long {
        if !canonical(offset) {
            return Err(fault(GP, ext));
        }
        let tss_read = |off: u64| -> Result<u64, Fail> {
            if off + 7 > u64::from(cpu.tr.limit) {
                return Err(fault(TS, u32::from(cpu.tr.selector & 0xfffc) | ext));
            }
            mem.read_u64(cpu.tr.base.wrapping_add(off))
        };
        let rsp = if ist != 0 {
            tss_read(0x24 + (ist - 1) * 8)?
        } else if cpl < cpu.cpl {
            tss_read(4 + u64::from(cpl) * 8)?
        } else {
            cpu.rsp
        };
        // A privilege change loads a null SS with RPL = the new CPL.
        let ss = (cpl < cpu.cpl).then(|| SegCache {
            selector: u16::from(cpl),
            base: 0,
            limit: 0,
            flags: u32::from(cpl) << DESC_DPL_SHIFT,
        });
        if !canonical(rsp) {
            return Err(fault(SS, ext));
        }
        let mut values = vec![
            u64::from(cpu.ss.selector),
            cpu.rsp,
            pushed_rflags,
            u64::from(cpu.cs.selector),
            ev.rip,
        ];
        values.extend(err.map(u64::from));
        let stack = Stack { base: 0, top: rsp & !0xf, size: 8, user, wrap32: false };
        let (rsp, frame) = mem.frame(stack, &values, ext)?;
        return Ok(Outcome::Deliver(delivery(frame, offset, rsp, ss)));
    }

    // 32-bit protected mode.
    let mut values = Vec::with_capacity(6);
    let (stack_base, esp, ss) = if cpl < cpu.cpl {
        let off = 4 + u64::from(cpl) * 8;
        if off + 5 > u64::from(cpu.tr.limit) {
            return Err(fault(TS, u32::from(cpu.tr.selector & 0xfffc) | ext));
        }
        let mut b = [0u8; 6];
        mem.read_sys(cpu.tr.base.wrapping_add(off), &mut b)?;
        let esp = u64::from(u32::from_le_bytes(b[..4].try_into().expect("4 bytes")));
        let ss_sel = u16::from_le_bytes([b[4], b[5]]);
        let ts = fault(TS, u32::from(ss_sel & 0xfffc) | ext);
        if ss_sel & 0xfffc == 0 || ss_sel & 3 != u16::from(cpl) {
            return Err(ts);
        }
        let d = descriptor(&mem, cpu, ss_sel, fault(TS, u32::from(ss_sel & 0xfffc) | ext))?;
        if !d.is_writable_data() || d.dpl() != cpl {
            return Err(ts);
        }
        if !d.present() {
            return Err(fault(SS, u32::from(ss_sel & 0xfffc) | ext));
        }
        let ss = d.cache(ss_sel);
        values.push(u64::from(cpu.ss.selector));
        values.push(cpu.rsp & 0xffff_ffff);
        (ss.base, esp, Some(ss))
    } else {
        (cpu.ss.base, cpu.rsp & 0xffff_ffff, None)
    };
    values.extend([pushed_rflags & 0xffff_ffff, u64::from(cpu.cs.selector), ev.rip & 0xffff_ffff]);
    values.extend(err.map(u64::from));
    let stack = Stack { base: stack_base, top: esp, size: 4, user, wrap32: true };
    let (esp, frame) = mem.frame(stack, &values, ext)?;
    Ok(Outcome::Deliver(delivery(frame, offset, esp, ss)))
}

fn canonical(va: u64) -> bool {
    let top = (va as i64) >> 47;
    top == 0 || top == -1
}

/// The fault the VMM's stub for `ev` would report on KVM: the frame's RIP and CS, its error
/// code, and CR2 for a #PF.
fn vmm_fault(cpu: &Cpu, ev: &Event) -> GuestFault {
    let error_code = if ev.soft() { None } else { ev.error_code.map(u64::from) };
    GuestFault {
        vector: ev.vector,
        error_code: error_code.filter(|_| has_error_code(ev.vector)),
        rip: ev.rip,
        cs: cpu.cs.selector,
        cr2: (ev.vector == PF).then(|| ev.cr2.unwrap_or(cpu.cr2)),
    }
}
