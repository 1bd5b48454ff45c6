//! Backend-neutral register state: one plain struct per register class, which each backend
//! converts to and from its own representation.

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B: default operation size 32 bits.
    pub db: bool,
    /// S: code/data (not system) segment.
    pub s: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

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
        const EFER_LMA: u64 = 1 << 10;
        if cr0 & 1 == 0 {
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
}
