//! The few unicorn calls the safe binding gets wrong, done through its C API with the right
//! structs. (In unicorn-engine 2.1.5 `reg_write(MSR/GDTR, u64)` hands C an 8-byte value where
//! it reads a 16- or 24-byte struct, and `reg_read_long(GDTR)` under-allocates.)

use core::ffi::c_void;

use unicorn_engine::{
    uc_ctl, uc_error, uc_reg_read, uc_reg_write, uc_x86_mmr, uc_x86_msr, ControlType, RegisterX86,
    Unicorn,
};

/// Size the engine's translation buffer (`UC_CTL_TCG_BUFFER_SIZE`, which the binding does not
/// wrap). Takes effect only before the engine's first other call, which allocates the buffer.
pub fn set_tcg_buffer_size<D>(uc: &mut Unicorn<'_, D>, bytes: u32) -> Result<(), uc_error> {
    let control = ControlType(ControlType::TCG_BUFFER_SIZE.0 | ControlType::IO_WRITE.0);
    // SAFETY: for a write of this control uc_ctl reads exactly one uint32_t argument; the handle
    // is this engine's own.
    unsafe { uc_ctl(uc.get_handle(), control, bytes) }.into()
}

/// Write a descriptor-table or segment register (GDTR, IDTR, TR, LDTR).
pub fn write_mmr<D>(
    uc: &mut Unicorn<'_, D>,
    reg: RegisterX86,
    mmr: uc_x86_mmr,
) -> Result<(), uc_error> {
    let ptr = &mmr as *const uc_x86_mmr as *const c_void;
    // SAFETY: for these registers uc_reg_write reads exactly one uc_x86_mmr from `ptr`, which
    // points at a live local; the handle is this engine's own.
    unsafe { uc_reg_write(uc.get_handle(), reg as i32, ptr) }.into()
}

/// Read a descriptor-table register (GDTR, IDTR).
pub fn read_mmr<D>(uc: &Unicorn<'_, D>, reg: RegisterX86) -> Result<uc_x86_mmr, uc_error> {
    let mut mmr = uc_x86_mmr { selector: 0, base: 0, limit: 0, flags: 0 };
    let ptr = &mut mmr as *mut uc_x86_mmr as *mut c_void;
    // SAFETY: uc_reg_read writes exactly one uc_x86_mmr to `ptr`, a live local.
    unsafe { uc_reg_read(uc.get_handle(), reg as i32, ptr) }.and(Ok(mmr))
}

/// Write a model-specific register.
pub fn write_msr<D>(uc: &mut Unicorn<'_, D>, index: u32, value: u64) -> Result<(), uc_error> {
    let msr = uc_x86_msr { rid: index, value };
    let ptr = &msr as *const uc_x86_msr as *const c_void;
    // SAFETY: for RegisterX86::MSR uc_reg_write reads one uc_x86_msr from `ptr`, a live local.
    unsafe { uc_reg_write(uc.get_handle(), RegisterX86::MSR as i32, ptr) }.into()
}

/// Read a model-specific register.
pub fn read_msr<D>(uc: &Unicorn<'_, D>, index: u32) -> Result<u64, uc_error> {
    let mut msr = uc_x86_msr { rid: index, value: 0 };
    let ptr = &mut msr as *mut uc_x86_msr as *mut c_void;
    // SAFETY: for RegisterX86::MSR uc_reg_read reads `rid` and writes `value` of the one
    // uc_x86_msr at `ptr`, a live local.
    unsafe { uc_reg_read(uc.get_handle(), RegisterX86::MSR as i32, ptr) }.and(Ok(msr.value))
}

/// Answer the guest's CPUID for the leaves that must match the KVM backend, so that a guest
/// behaves the same on both: leaf 0 gives the host's vendor (which picks VMCALL or VMMCALL),
/// leaves 0x40000000/1 the KVM signature and PV features, from the one definition every
/// backend uses (`vmcall_vmm::x86::cpuid::PvCpuid`), with the VM's `pv_features`. Other leaves are the emulated CPU's own, which
/// describe what it can actually run (so leaf 1's initial APIC id is 0 on every vCPU here:
/// guests learn their id from `BootInfo::vcpu_id`).
///
/// Registered through the C API because the binding's `add_insn_sys_hook` gives the callback no
/// return value, while unicorn reads one (non-zero: "the hook answered, skip CPUID").
pub fn add_cpuid_hook<D>(uc: &mut Unicorn<'_, D>, pv_features: u32) -> Result<(), uc_error> {
    let mut hook: unicorn_engine::uc_hook = 0;
    // The features travel in the user-data pointer's value itself: no allocation to free.
    let user_data = pv_features as usize as *mut c_void;
    // SAFETY: `on_cpuid` has the C signature unicorn calls CPUID hooks with
    // (`uc_cb_insn_cpuid_t`) and never dereferences its user data; the range 1..0 means
    // "every address"; the variadic argument names the instruction, as uc_hook_add requires for
    // UC_HOOK_INSN.
    unsafe {
        unicorn_engine::uc_hook_add(
            uc.get_handle(),
            &mut hook,
            unicorn_engine::unicorn_const::HookType::INSN.0 as i32,
            on_cpuid as *mut c_void,
            user_data,
            1,
            0,
            unicorn_engine::unicorn_const::X86Insn::CPUID as u32,
        )
    }
    .into()
}

extern "C" fn on_cpuid(uc: *mut unicorn_engine::uc_engine, user_data: *mut c_void) -> i32 {
    let pv =
        vmcall_vmm::x86::cpuid::PvCpuid { features: user_data as usize as u32, enforce: false };
    let read = |reg: RegisterX86| {
        let mut v = 0u64;
        // SAFETY: `uc` is the engine calling this hook; a GPR read writes one u64.
        unsafe { uc_reg_read(uc, reg as i32, (&mut v as *mut u64).cast()) };
        v as u32
    };
    let (leaf, _subleaf) = (read(RegisterX86::EAX), read(RegisterX86::ECX));
    let answer: [u32; 4] = match leaf {
        0 => {
            let host = std::arch::x86_64::__cpuid(0);
            // The emulated CPU model's (qemu64's) maximum leaf, with the host's vendor string.
            [0xd, host.ebx, host.ecx, host.edx]
        }
        _ => match pv.leaf(leaf) {
            Some(answer) => answer,
            None => return 0,
        },
    };
    for (reg, v) in [RegisterX86::RAX, RegisterX86::RBX, RegisterX86::RCX, RegisterX86::RDX]
        .into_iter()
        .zip(answer)
    {
        let v = u64::from(v);
        // SAFETY: `uc` is the engine calling this hook; a GPR write reads one u64.
        unsafe { uc_reg_write(uc, reg as i32, (&v as *const u64).cast()) };
    }
    1
}

/// What answering a hypercall reads: its number and arguments, where it is, and how the caller
/// runs (CS for the CPL, the paging registers, GDTR for the mode cache's key).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HypercallRegs {
    pub rip: u64,
    pub cs: u16,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
}

/// Read [`HypercallRegs`] in one `uc_reg_read_batch`: one call into the engine instead of a
/// dozen `uc_reg_read`s (each of which pays the FFI call, the engine's entry checks and the
/// binding's error mapping).
pub(crate) fn read_hypercall_regs<D>(uc: &Unicorn<'_, D>) -> Result<HypercallRegs, uc_error> {
    let (mut rip, mut cs, mut rax, mut rbx, mut rcx, mut rdx, mut rsi) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut cr0, mut cr3, mut cr4) = (0u64, 0u64, 0u64);
    let mut efer = uc_x86_msr { rid: crate::vcpu::MSR_EFER, value: 0 };
    let mut gdtr = uc_x86_mmr { selector: 0, base: 0, limit: 0, flags: 0 };
    let ids = [
        RegisterX86::RIP,
        RegisterX86::CS,
        RegisterX86::RAX,
        RegisterX86::RBX,
        RegisterX86::RCX,
        RegisterX86::RDX,
        RegisterX86::RSI,
        RegisterX86::CR0,
        RegisterX86::CR3,
        RegisterX86::CR4,
        RegisterX86::MSR,
        RegisterX86::GDTR,
    ]
    .map(|r| r as i32);
    let mut vals: [*mut c_void; 12] = [
        (&raw mut rip).cast(),
        (&raw mut cs).cast(),
        (&raw mut rax).cast(),
        (&raw mut rbx).cast(),
        (&raw mut rcx).cast(),
        (&raw mut rdx).cast(),
        (&raw mut rsi).cast(),
        (&raw mut cr0).cast(),
        (&raw mut cr3).cast(),
        (&raw mut cr4).cast(),
        (&raw mut efer).cast(),
        (&raw mut gdtr).cast(),
    ];
    // SAFETY: each pointer in `vals` is a live local of the type the engine writes for the
    // register at the same index of `ids` (u64 for GPRs, RIP and control registers, at most 2
    // bytes for CS into a zeroed u64, one uc_x86_msr whose `rid` it reads for MSR, one
    // uc_x86_mmr for GDTR); `count` is the length of both arrays.
    unsafe {
        unicorn_engine::uc_reg_read_batch(
            uc.get_handle(),
            ids.as_ptr(),
            vals.as_mut_ptr(),
            ids.len() as i32,
        )
    }
    .and(Ok(HypercallRegs {
        rip,
        cs: cs as u16,
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        cr0,
        cr3,
        cr4,
        efer: efer.value,
        gdtr_base: gdtr.base,
        gdtr_limit: gdtr.limit,
    }))
}

/// Write registers from a hook that runs between translation blocks, RIP among them, through
/// `uc_reg_write_batch`. Unlike `uc_reg_write`, which also sets the engine's "skip PC sync"
/// flag on a PC write (and only clears it at the next `emu_start` or when a block is left by
/// an exit request, which a write between blocks never causes), the batch write leaves it
/// alone: with the flag stuck, hooks inside later blocks (the doorbell's OUT hook) would read
/// the RIP of their block's start instead of their own instruction's. Every RIP write while
/// the engine runs must go through here.
pub(crate) fn write_regs_between_blocks<D>(
    uc: &mut Unicorn<'_, D>,
    regs: &[(RegisterX86, u64)],
) -> Result<(), uc_error> {
    const MAX: usize = 4;
    assert!(regs.len() <= MAX, "at most {MAX} registers at once");
    let mut values = [0u64; MAX];
    let mut ids = [0i32; MAX];
    for (i, (reg, value)) in regs.iter().enumerate() {
        ids[i] = *reg as i32;
        values[i] = *value;
    }
    let ptrs: [*mut c_void; MAX] = std::array::from_fn(|i| (&raw mut values[i]).cast());
    // SAFETY: the first `regs.len()` entries of `ids` are 64-bit registers (GPRs, RIP,
    // RFLAGS) whose values the engine reads as one u64 from the matching pointer, each into
    // the live local `values`.
    unsafe {
        unicorn_engine::uc_reg_write_batch(
            uc.get_handle(),
            ids.as_ptr(),
            ptrs.as_ptr(),
            regs.len() as i32,
        )
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn_engine::unicorn_const::{Arch, Mode};

    /// The translation buffer unicorn allocated (reading it finishes the engine's set-up).
    fn tcg_buffer_size<D>(uc: &mut Unicorn<'_, D>) -> u32 {
        let mut size = 0u32;
        let control = ControlType(ControlType::TCG_BUFFER_SIZE.0 | ControlType::IO_READ.0);
        // SAFETY: for a read of this control uc_ctl writes one uint32_t through the pointer,
        // a live local.
        let r: Result<(), uc_error> =
            unsafe { uc_ctl(uc.get_handle(), control, &mut size as *mut u32) }.into();
        r.expect("read the buffer size");
        size
    }

    #[test]
    fn the_translation_buffer_takes_the_size_asked_for() {
        let mut uc = Unicorn::new(Arch::X86, Mode::MODE_64).expect("engine");
        set_tcg_buffer_size(&mut uc, crate::SMALL_TCG_BUFFER).expect("set");
        assert_eq!(tcg_buffer_size(&mut uc), crate::SMALL_TCG_BUFFER);
        let mut big = Unicorn::new(Arch::X86, Mode::MODE_64).expect("engine");
        assert_eq!(tcg_buffer_size(&mut big), 1 << 30, "unicorn's own default");
    }

    #[test]
    fn small_guests_get_the_small_buffer() {
        assert_eq!(crate::default_tcg_buffer(4 << 20), crate::SMALL_TCG_BUFFER);
        assert_eq!(crate::default_tcg_buffer(crate::SMALL_GUEST_RAM), crate::SMALL_TCG_BUFFER);
        assert_eq!(crate::default_tcg_buffer(crate::SMALL_GUEST_RAM + (2 << 20)), 0);
    }
}
