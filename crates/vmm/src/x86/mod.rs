//! x86 architecture knowledge shared by every backend: registers, processor modes, descriptor
//! tables and exceptions, and the guest's own page tables.

pub mod cpuid;
pub mod descriptors;
pub mod mode;
pub mod paging;
pub mod regs;

pub use mode::CpuMode;
pub use paging::{PagingContext, VirtualMemory};
pub use regs::{DescriptorTable, Regs, Segment, SpecialRegs};
