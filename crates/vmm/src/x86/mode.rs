//! Processor modes: the control-register bits that define them and the mode of the code that
//! made a hypercall, which decides KVM's argument truncation.

use super::regs::Segment;

pub const CR0_PE: u64 = 1;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const EFER_LME: u64 = 1 << 8;
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
