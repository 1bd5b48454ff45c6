//! Backend-neutral register state: one plain struct per register class, which each backend
//! converts to and from its own representation.

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    /// RAX (a hypercall's number, then its result).
    pub rax: u64,
    /// RBX (a hypercall's a0).
    pub rbx: u64,
    /// RCX (a1).
    pub rcx: u64,
    /// RDX (a2).
    pub rdx: u64,
    /// RSI (a3).
    pub rsi: u64,
    /// RDI (the `BootInfo` pointer at entry).
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit, in bytes (already scaled by the granularity).
    pub limit: u32,
    /// The selector.
    pub selector: u16,
    /// Descriptor type (the 4-bit type field).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// D/B: default operation size 32 bits.
    pub db: bool,
    /// S: code/data (not system) segment.
    pub s: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// Granularity bit (limit in 4 KiB units in the descriptor).
    pub g: bool,
    /// Available-for-software bit.
    pub avl: bool,
    /// The segment register holds no usable segment (a null selector).
    pub unusable: bool,
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit: size in bytes minus one.
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    /// CS.
    pub cs: Segment,
    /// DS.
    pub ds: Segment,
    /// ES.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// SS.
    pub ss: Segment,
    /// The task register.
    pub tr: Segment,
    /// The LDT register.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: DescriptorTable,
    /// IDTR.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2 (the last page-fault address).
    pub cr2: u64,
    /// CR3 (the page-table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// The EFER MSR.
    pub efer: u64,
}
