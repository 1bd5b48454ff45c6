//! x86 architecture knowledge shared by every backend: registers, processor modes, descriptor
//! tables and exceptions.

pub mod descriptors;
pub mod mode;
pub mod regs;

pub use mode::CpuMode;
pub use regs::{DescriptorTable, Regs, Segment, SpecialRegs};
