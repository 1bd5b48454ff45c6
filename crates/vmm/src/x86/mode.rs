//! Processor modes: the control-register bits that define them and the mode of the code that
//! made a hypercall, which decides KVM's argument truncation.

use super::regs::Segment;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1;
/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native FPU error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR: FXSAVE/FXRSTOR and SSE enabled by the OS.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: the OS handles SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active (set by the CPU).
pub const EFER_LMA: u64 = 1 << 10;

/// The execution mode of the code that made a hypercall, which decides argument truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuMode {
    /// Long mode with CS.L = 1.
    Long64,
    /// Long mode, 32-bit compatibility-mode code segment.
    Compat32,
    /// Long mode, 16-bit compatibility-mode code segment.
    Compat16,
    /// Protected mode without paging/long mode.
    Protected,
    /// Real mode.
    Real,
}

impl CpuMode {
    /// Whether KVM treats a hypercall from this mode as 64-bit (`is_64_bit_hypercall`).
    pub fn is_64bit(self) -> bool {
        self == CpuMode::Long64
    }

    /// The mode of code running with `cs` under `efer` and `cr0`.
    pub fn from_cs(cs: &Segment, efer: u64, cr0: u64) -> Self {
        if cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if efer & EFER_LMA == 0 {
            CpuMode::Protected
        } else if cs.l {
            CpuMode::Long64
        } else if cs.db {
            CpuMode::Compat32
        } else {
            CpuMode::Compat16
        }
    }

    /// The mode's name, as traces and statistics print it.
    pub fn name(self) -> &'static str {
        match self {
            CpuMode::Long64 => "64-bit",
            CpuMode::Compat32 => "compat-32",
            CpuMode::Compat16 => "compat-16",
            CpuMode::Protected => "protected",
            CpuMode::Real => "real",
        }
    }

    /// The mode [`CpuMode::name`] calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [CpuMode::Long64, CpuMode::Compat32, CpuMode::Compat16, CpuMode::Protected, CpuMode::Real]
            .into_iter()
            .find(|m| m.name() == name)
    }
}
