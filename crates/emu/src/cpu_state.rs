//! The parts of unicorn's CPU state that no register id reaches: the cached segment
//! descriptors and the CPL (QEMU's `hflags`), the error code and kind of the exception being
//! reported, and QEMU's "exception in flight" used for #DF escalation.
//!
//! They are reached through the context API: `uc_context_save` copies QEMU's `CPUX86State`
//! verbatim (up to `end_reset_fields`) into a buffer, and `uc_context_restore` copies it back.
//! **The offsets below are pinned to unicorn-engine 2.1.5** (QEMU 5's `target/i386/cpu.h`,
//! x86-64 target), which `Cargo.lock` pins. [`CpuState::new`] checks them against the running
//! engine (known values written through the API must appear at the expected offsets) and refuses
//! to create the vCPU otherwise, so an upgrade fails loudly instead of corrupting guest state.
//!
//! The buffer may only be saved and restored from a hook that runs between translation blocks
//! (the invalid-instruction and interrupt hooks), never from one that runs inside a block.

use core::ffi::c_void;

use unicorn_engine::{uc_context_alloc, uc_context_free, uc_context_restore, uc_context_save};
use unicorn_engine::{uc_context_size, uc_engine, uc_error, RegisterX86 as R, Unicorn};

/// `sizeof` the saved part of `CPUX86State` in 2.1.5.
const ENV_LEN: usize = 5568;
/// `CPUX86State::eip`.
const OFF_EIP: usize = 128;
/// `CPUX86State::hflags` (CPL in bits 0-1, mode bits, see `HF_*`).
const OFF_HFLAGS: usize = 176;
/// `CPUX86State::segs[6]`, each a `SegmentCache { u32 selector; u64 base; u32 limit; u32 flags }`.
const OFF_SEGS: usize = 184;
const SEG_SIZE: usize = 24;
/// `CPUX86State::error_code`, followed by `exception_is_int` (both `int`).
const OFF_ERROR_CODE: usize = 5384;
const OFF_IS_INT: usize = 5388;
/// `CPUX86State::dr[0]`, only used to check the layout.
const OFF_DR0: usize = 5400;
/// `CPUX86State::old_exception` (`int`, -1 when no exception is in flight).
const OFF_OLD_EXCEPTION: usize = 5496;

/// QEMU's segment register indices.
pub(crate) const SEG_ES: usize = 0;
pub(crate) const SEG_CS: usize = 1;
pub(crate) const SEG_SS: usize = 2;
pub(crate) const SEG_DS: usize = 3;
pub(crate) const SEG_FS: usize = 4;
pub(crate) const SEG_GS: usize = 5;

pub(crate) const HF_CPL_MASK: u32 = 3;
pub(crate) const HF_CS32: u32 = 1 << 4;
pub(crate) const HF_SS32: u32 = 1 << 5;
pub(crate) const HF_ADDSEG: u32 = 1 << 6;
pub(crate) const HF_LMA: u32 = 1 << 14;
pub(crate) const HF_CS64: u32 = 1 << 15;

/// A cached segment descriptor as QEMU keeps it: `flags` is the descriptor's high dword
/// (type, S, DPL, P, AVL, L, D/B, G at their descriptor bit positions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SegCache {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub flags: u32,
}

impl SegCache {
    /// The cache a segment register holds after loading `s`.
    pub(crate) fn from_segment(s: &vmcall_vmm::x86::Segment) -> Self {
        let bit = |b: bool, at: u32| u32::from(b) << at;
        let flags = (u32::from(s.type_) << 8)
            | bit(s.s, 12)
            | (u32::from(s.dpl & 3) << DESC_DPL_SHIFT)
            | bit(s.present, 15)
            | bit(s.avl, 20)
            | bit(s.l, 21)
            | bit(s.db, 22)
            | bit(s.g, 23);
        Self { selector: s.selector, base: s.base, limit: s.limit, flags }
    }

    /// The neutral segment this cache holds (the inverse of [`SegCache::from_segment`]).
    pub(crate) fn to_segment(self) -> vmcall_vmm::x86::Segment {
        let f = self.flags;
        let bit = |at: u32| f & (1 << at) != 0;
        vmcall_vmm::x86::Segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: ((f >> 8) & 0xf) as u8,
            present: bit(15),
            dpl: ((f >> DESC_DPL_SHIFT) & 3) as u8,
            db: bit(22),
            s: bit(12),
            l: bit(21),
            g: bit(23),
            avl: bit(20),
            unusable: !bit(15),
        }
    }
}

pub(crate) const DESC_DPL_SHIFT: u32 = 13;
pub(crate) const DESC_L: u32 = 1 << 21;
pub(crate) const DESC_B: u32 = 1 << 22;

/// A context buffer of one engine and the accessors of the fields above.
pub(crate) struct CpuState {
    engine: *mut uc_engine,
    ctx: *mut c_void,
    /// The `CPUX86State` copy: the last `ENV_LEN` bytes of the context allocation.
    data: *mut u8,
}

impl std::fmt::Debug for CpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuState").field("hflags", &self.hflags()).finish()
    }
}

impl Drop for CpuState {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `uc_context_alloc` and is freed exactly once, here;
        // `uc_context_free` only frees the allocation and does not touch the engine.
        unsafe { uc_context_free(self.ctx.cast()) };
    }
}

/// Why the layout check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unicorn's CPU state does not have the layout of unicorn-engine 2.1.5: {0}")]
pub(crate) struct LayoutMismatch(pub String);

impl CpuState {
    /// A context buffer for `uc`, after checking that the engine's CPU state has the pinned
    /// layout. The engine must outlive the result (keep it in the engine's own data).
    pub(crate) fn new<D>(uc: &mut Unicorn<'_, D>) -> Result<Self, LayoutMismatch> {
        let engine = uc.get_handle();
        let mut ctx: *mut c_void = core::ptr::null_mut();
        // SAFETY: `engine` is the live engine behind `uc`; `uc_context_alloc` writes one
        // context pointer to the local `ctx`.
        let err = unsafe { uc_context_alloc(engine, (&raw mut ctx).cast()) };
        if err != uc_error::OK || ctx.is_null() {
            return Err(LayoutMismatch(format!("uc_context_alloc: {err:?}")));
        }
        // SAFETY: `engine` is live; the call only reads its CPU context size.
        let total = unsafe { uc_context_size(engine) };
        // SAFETY: the allocation starts with `size_t context_size` (`struct uc_context`), the
        // size of the state copy that ends the allocation of `total` bytes.
        let len = unsafe { ctx.cast::<usize>().read() };
        if len != ENV_LEN || total < len {
            // SAFETY: allocated above by `uc_context_alloc`, freed once.
            unsafe { uc_context_free(ctx.cast()) };
            return Err(LayoutMismatch(format!("state size {len}, expected {ENV_LEN}")));
        }
        // SAFETY: `total - len` is within the `total`-byte allocation (checked just above).
        let data = unsafe { ctx.cast::<u8>().add(total - len) };
        let state = Self { engine, ctx, data };
        state.check_layout(uc)?;
        Ok(state)
    }

    /// Write known values through the API and find them where the pinned offsets say.
    fn check_layout<D>(&self, uc: &mut Unicorn<'_, D>) -> Result<(), LayoutMismatch> {
        let api = |e: uc_error| LayoutMismatch(format!("register access: {e:?}"));
        let (rip, dr0, cs) = (
            uc.reg_read(R::RIP).map_err(api)?,
            uc.reg_read(R::DR0).map_err(api)?,
            uc.reg_read(R::CS).map_err(api)?,
        );
        const RIP_PROBE: u64 = 0x1e1e_1234_5678_9abc;
        const DR0_PROBE: u64 = 0xd0d0_1234_5678_9abc;
        uc.reg_write(R::RIP, RIP_PROBE).map_err(api)?;
        uc.reg_write(R::DR0, DR0_PROBE).map_err(api)?;
        uc.reg_write(R::CS, 0x1238).map_err(api)?;
        self.save();
        let found = (self.u64(OFF_EIP), self.u64(OFF_DR0), self.u32(OFF_SEGS + SEG_SIZE * SEG_CS));
        uc.reg_write(R::RIP, rip).map_err(api)?;
        uc.reg_write(R::DR0, dr0).map_err(api)?;
        uc.reg_write(R::CS, cs).map_err(api)?;
        if found != (RIP_PROBE, DR0_PROBE, 0x1238) {
            return Err(LayoutMismatch(format!("probes read back as {found:x?}")));
        }
        // No exception in flight yet, and the fields next to it are the reset values.
        self.save();
        if self.old_exception() != -1 {
            return Err(LayoutMismatch(format!("old_exception = {}", self.old_exception())));
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the allocation of `total` bytes ends with the `ENV_LEN`-byte state copy at
        // `data` (checked by `new`); it lives as long as `self` and is only written through
        // `&mut self` or by `save`, which no live slice can overlap (they borrow `self`).
        unsafe { std::slice::from_raw_parts(self.data, ENV_LEN) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only view of the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.data, ENV_LEN) }
    }

    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[off..off + 8].try_into().expect("8 bytes"))
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes_mut()[off..off + 4].copy_from_slice(&v.to_le_bytes())
    }

    fn set_u64(&mut self, off: usize, v: u64) {
        self.bytes_mut()[off..off + 8].copy_from_slice(&v.to_le_bytes())
    }

    /// Copy the engine's CPU state into the buffer.
    pub(crate) fn save(&self) {
        // SAFETY: the engine outlives this object (see `new`) and `ctx` was allocated for it;
        // saving copies the CPU state into the buffer and changes nothing in the engine.
        unsafe { uc_context_save(self.engine, self.ctx.cast()) };
    }

    /// Copy the buffer back into the engine's CPU state.
    pub(crate) fn restore(&mut self) {
        // SAFETY: as for `save`; the buffer holds a state saved from this very engine with
        // only the fields above changed, and callers restore only from hooks that run between
        // translation blocks, where the CPU state is not cached anywhere else.
        unsafe { uc_context_restore(self.engine, self.ctx.cast()) };
    }

    pub(crate) fn hflags(&self) -> u32 {
        self.u32(OFF_HFLAGS)
    }

    pub(crate) fn set_hflags(&mut self, v: u32) {
        self.set_u32(OFF_HFLAGS, v)
    }

    pub(crate) fn seg(&self, i: usize) -> SegCache {
        let o = OFF_SEGS + SEG_SIZE * i;
        SegCache {
            selector: self.u32(o) as u16,
            base: self.u64(o + 8),
            limit: self.u32(o + 16),
            flags: self.u32(o + 20),
        }
    }

    fn set_seg_raw(&mut self, i: usize, s: SegCache) {
        let o = OFF_SEGS + SEG_SIZE * i;
        self.set_u32(o, u32::from(s.selector));
        self.set_u64(o + 8, s.base);
        self.set_u32(o + 16, s.limit);
        self.set_u32(o + 20, s.flags);
    }

    /// Load CS or SS's cache and update the mode bits of `hflags` that depend on it, as the
    /// CPU's own segment loads do: CS decides 64-bit vs 16/32-bit code, SS the CPL (its DPL)
    /// and the stack size. `pe` is CR0.PE.
    pub(crate) fn load_seg(&mut self, i: usize, s: SegCache, pe: bool) {
        self.set_seg_raw(i, s);
        let mut hf = self.hflags();
        if i == SEG_CS {
            if hf & HF_LMA != 0 && s.flags & DESC_L != 0 {
                hf |= HF_CS32 | HF_SS32 | HF_CS64;
                hf &= !HF_ADDSEG;
            } else {
                hf &= !(HF_CS32 | HF_CS64);
                if s.flags & DESC_B != 0 {
                    hf |= HF_CS32;
                }
            }
        }
        if i == SEG_SS {
            hf = (hf & !HF_CPL_MASK) | ((s.flags >> DESC_DPL_SHIFT) & 3);
        }
        // The stack size and whether segment bases must be added (always in 16-bit code;
        // never in 64-bit code).
        hf &= !(HF_SS32 | HF_ADDSEG);
        if self.seg(SEG_SS).flags & DESC_B != 0 {
            hf |= HF_SS32;
        }
        if hf & HF_CS64 == 0 {
            let bases = self.seg(SEG_DS).base | self.seg(SEG_ES).base | self.seg(SEG_SS).base;
            if !pe || hf & HF_CS32 == 0 || bases != 0 {
                hf |= HF_ADDSEG;
            }
        }
        self.set_hflags(hf);
    }

    /// The current privilege level.
    pub(crate) fn cpl(&self) -> u8 {
        (self.hflags() & HF_CPL_MASK) as u8
    }

    pub(crate) fn set_cpl(&mut self, cpl: u8) {
        let hf = self.hflags();
        self.set_hflags((hf & !HF_CPL_MASK) | u32::from(cpl & 3));
    }

    /// The error code of the exception being reported.
    pub(crate) fn error_code(&self) -> u32 {
        self.u32(OFF_ERROR_CODE)
    }

    /// Whether the exception being reported comes from INT n, INT3 or INTO.
    pub(crate) fn is_int(&self) -> bool {
        self.u32(OFF_IS_INT) != 0
    }

    fn old_exception(&self) -> i32 {
        self.u32(OFF_OLD_EXCEPTION) as i32
    }

    /// Forget the exception in flight. QEMU only does this when *it* delivers an exception,
    /// which unicorn never does; left set, the next unrelated fault would be turned into a
    /// #DF or a triple fault. vmcall does its own escalation instead.
    pub(crate) fn clear_old_exception(&mut self) {
        self.set_u32(OFF_OLD_EXCEPTION, u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn_engine::unicorn_const::{Arch, Mode, Prot};

    /// The pinned offsets are where unicorn keeps these fields: probes at creation, then a
    /// real #GP whose error code (the selector) and in-flight state must appear where
    /// expected.
    #[test]
    fn layout_matches_the_pinned_unicorn() {
        let mut uc = Unicorn::new_with_data(Arch::X86, Mode::MODE_64, None::<CpuState>).unwrap();
        let state = CpuState::new(&mut uc).expect("layout");
        uc.mem_map(0, 0x1000, Prot::ALL).unwrap();
        // mov eax, 0x1230; mov ds, ax  -> #GP(0x1230): no descriptor table covers it.
        uc.mem_write(0x100, &[0xb8, 0x30, 0x12, 0, 0, 0x8e, 0xd8]).unwrap();
        *uc.get_data_mut() = Some(state);
        uc.add_intr_hook(|uc, intno| {
            let st = uc.get_data_mut().as_mut().unwrap();
            st.save();
            assert_eq!(intno, 13);
            assert_eq!(st.error_code(), 0x1230);
            assert!(!st.is_int());
            assert_eq!(st.old_exception(), 13, "a #GP is in flight");
            st.clear_old_exception();
            st.restore();
            st.save();
            assert_eq!(st.old_exception(), -1);
            // CS as loaded by the engine's reset: 64-bit code at CPL 0.
            assert_ne!(st.hflags() & HF_CS64, 0);
            assert_eq!(st.cpl(), 0);
            let _ = uc.emu_stop();
        })
        .unwrap();
        uc.emu_start(0x100, 0x107, 0, 10).unwrap();
        assert_eq!(uc.reg_read(R::RIP).unwrap(), 0x105, "stopped at the faulting mov");
    }
}

/// `uc_struct::cpu` (the engine's `CPUState *`) in unicorn-engine 2.1.5.
const OFF_UC_CPU: usize = 440;
/// `CPUState::env_ptr`, and where `X86CPU::env` is in the `X86CPU` that starts with the
/// `CPUState`: the pointer must be exactly that (checked).
const OFF_CPU_ENV_PTR: usize = 296;
const OFF_X86CPU_ENV: usize = 35408;
/// `CPUX86State::regs[16]`, `cr[5]`, `efer`, `gdt` (a `SegmentCache`).
const OFF_REGS: usize = 0;
const OFF_CR: usize = 424;
const OFF_EFER: usize = 592;
const OFF_GDT: usize = 376;

/// The engine's live `CPUX86State`, read in place: what the doorbell needs from it costs a
/// dozen loads here, against a dozen trips through unicorn's register `switch` (whose indirect
/// jump is the dearest part of a doorbell call on these machines). Same pinned layout as
/// [`CpuState`], found and checked by [`LiveCpu::find`].
///
/// Only read, and only from hooks on the engine's own thread, where the state is current: GPRs
/// are written back before any helper that calls a hook, RIP is synced by unicorn before the OUT
/// hook, and the rest is never cached in translated code.
pub(crate) struct LiveCpu {
    env: *const u8,
}

/// What [`LiveCpu::hypercall_state`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveState {
    pub regs: crate::uc::HypercallRegs,
    pub hflags: u32,
    pub cs: SegCache,
}

impl LiveCpu {
    /// Find the engine's CPU state: `uc->cpu->env_ptr`, which must point just where the
    /// pinned layout puts `env` inside the CPU object, and hold values written through the
    /// register API at the pinned offsets. Only called once `CpuState::new` has accepted the
    /// engine (so it is unicorn 2.1.5's, whose `uc_struct` is longer than `OFF_UC_CPU`); `None`
    /// if anything disagrees (the doorbell then reads registers through the API).
    pub(crate) fn find<D>(uc: &mut Unicorn<'_, D>) -> Option<Self> {
        let engine = uc.get_handle().cast::<u8>();
        // SAFETY: `engine` is the live `uc_struct`, 14912 bytes in 2.1.5 (the version the
        // caller's layout check established); the field is a pointer, read unaligned-safe.
        let cpu = unsafe { engine.wrapping_add(OFF_UC_CPU).cast::<*mut u8>().read_unaligned() };
        if cpu.is_null() {
            return None;
        }
        // SAFETY: `cpu` is the engine's `CPUState *` (the layout is 2.1.5's), an object of
        // well over OFF_CPU_ENV_PTR bytes.
        let env = unsafe { cpu.wrapping_add(OFF_CPU_ENV_PTR).cast::<*const u8>().read_unaligned() };
        if env != cpu.wrapping_add(OFF_X86CPU_ENV).cast_const() {
            return None;
        }
        let live = Self { env };
        let api = |e: uc_error| e;
        let probe = |uc: &mut Unicorn<'_, D>| -> Result<bool, uc_error> {
            let (rip, rbx, cr3) =
                (uc.reg_read(R::RIP)?, uc.reg_read(R::RBX)?, uc.reg_read(R::CR3)?);
            uc.reg_write(R::RIP, 0x1e1e_1234_5678_9abc)?;
            uc.reg_write(R::RBX, 0xb0b0_1234_5678_9abc)?;
            let seen = (live.u64(OFF_EIP), live.u64(OFF_REGS + 8 * 3), live.u64(OFF_CR + 8 * 3));
            uc.reg_write(R::RIP, rip)?;
            uc.reg_write(R::RBX, rbx)?;
            Ok(seen == (0x1e1e_1234_5678_9abc, 0xb0b0_1234_5678_9abc, cr3))
        };
        match probe(uc).map_err(api) {
            Ok(true) => Some(live),
            _ => None,
        }
    }

    fn u64(&self, off: usize) -> u64 {
        // SAFETY: `env` is the engine's live CPUX86State (checked by `find`), longer than every
        // offset read here; read volatile (never through a reference) because the engine
        // writes it between our reads, on this same thread.
        unsafe { self.env.wrapping_add(off).cast::<u64>().read_volatile() }
    }

    fn u32(&self, off: usize) -> u32 {
        // SAFETY: as in `u64`.
        unsafe { self.env.wrapping_add(off).cast::<u32>().read_volatile() }
    }

    /// Set RAX, as `uc_reg_write(RAX)` does in a 64-bit engine (a store to `regs[R_EAX]`). From
    /// a hook, the value is what the next guest instruction sees: helpers that call hooks
    /// reload the registers from this state when they return to translated code.
    pub(crate) fn set_rax(&self, v: u64) {
        // SAFETY: as in `u64`: `regs[0]` of the engine's live state, which nothing else holds
        // a reference to; written volatile, on the engine's own thread.
        unsafe { self.env.wrapping_add(OFF_REGS).cast::<u64>().cast_mut().write_volatile(v) }
    }

    /// The registers a hypercall needs, the mode flags and CS's cached descriptor.
    pub(crate) fn hypercall_state(&self) -> LiveState {
        let gpr = |i: usize| self.u64(OFF_REGS + 8 * i);
        let cs = OFF_SEGS + SEG_SIZE * SEG_CS;
        let cs = SegCache {
            selector: self.u32(cs) as u16,
            base: self.u64(cs + 8),
            limit: self.u32(cs + 16),
            flags: self.u32(cs + 20),
        };
        // QEMU's register order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI.
        let regs = crate::uc::HypercallRegs {
            rip: self.u64(OFF_EIP),
            cs: cs.selector,
            rax: gpr(0),
            rbx: gpr(3),
            rcx: gpr(1),
            rdx: gpr(2),
            rsi: gpr(6),
            cr0: self.u64(OFF_CR),
            cr3: self.u64(OFF_CR + 8 * 3),
            cr4: self.u64(OFF_CR + 8 * 4),
            efer: self.u64(OFF_EFER),
            gdtr_base: self.u64(OFF_GDT + 8),
            gdtr_limit: self.u32(OFF_GDT + 16),
        };
        LiveState { regs, hflags: self.u32(OFF_HFLAGS), cs }
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;
    use unicorn_engine::unicorn_const::{Arch, Mode};

    /// The engine's CPU state is found where the pinned layout says, and reads what the
    /// register API reads.
    #[test]
    fn live_state_matches_the_register_api() {
        let mut uc = Unicorn::new_with_data(Arch::X86, Mode::MODE_64, ()).unwrap();
        let _state = CpuState::new(&mut uc).expect("layout");
        let live = LiveCpu::find(&mut uc).expect("the CPU state of unicorn 2.1.5");
        for (reg, v) in [
            (R::RAX, 0x1111),
            (R::RBX, 0x2222),
            (R::RCX, 0x3333),
            (R::RDX, 0x4444),
            (R::RSI, 0x5555),
            (R::RIP, 0x6666),
        ] {
            uc.reg_write(reg, v).unwrap();
        }
        let s = live.hypercall_state();
        let r = s.regs;
        assert_eq!(
            (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rip),
            (0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666)
        );
        let api = crate::uc::read_hypercall_regs(&uc).unwrap();
        assert_eq!((r.cr0, r.cr3, r.cr4, r.efer), (api.cr0, api.cr3, api.cr4, api.efer));
        assert_eq!((r.gdtr_base, r.gdtr_limit, r.cs), (api.gdtr_base, api.gdtr_limit, api.cs));
        assert_ne!(s.hflags & HF_CS64, 0, "the engine starts in 64-bit code");
        live.set_rax(0x7777);
        assert_eq!(uc.reg_read(R::RAX).unwrap(), 0x7777);
    }
}
