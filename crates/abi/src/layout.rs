//! Guest-physical memory layout the VMM builds before the first instruction runs.
//!
//! Everything below [`GUEST_LOAD_MIN`] belongs to the VMM; the guest image goes above it and the
//! vCPU stacks sit at the top of RAM.

/// Page 0 is left unmapped so that null-pointer accesses fault.
pub const NULL_PAGE_END: u64 = 0x1000;
/// The VMM-built GDT (selectors in [`crate::selectors`]).
pub const GDT: u64 = 0x1000;
/// The VMM-built IDT.
pub const IDT: u64 = 0x2000;
/// Exception stubs the IDT points at.
pub const IDT_STUBS: u64 = 0x3000;
/// `BootInfo` of vCPU `i` at `BOOT_INFO + i * size_of::<BootInfo>()`.
pub const BOOT_INFO: u64 = 0x4000;
/// The guest's command line.
pub const CMDLINE: u64 = 0x6000;
/// Longest command line, in bytes.
pub const CMDLINE_MAX: u64 = 0x1000;
/// TSS of vCPU `i` at `TSS + i * TSS_STRIDE`.
pub const TSS: u64 = 0x7000;
/// Bytes between two vCPUs' TSSes.
pub const TSS_STRIDE: u64 = 0x80;
/// The I/O permission bitmap all TSSes share (8 KiB + the terminating 0xff byte).
pub const IO_BITMAP: u64 = 0x9000;
/// The top-level page table (PML4) of the identity map.
pub const PML4: u64 = 0xc000;
/// The page-directory-pointer table of the identity map.
pub const PDPT: u64 = 0xd000;
/// 4 KiB page table for the first 2 MiB (so that page 0 can be left unmapped).
pub const PT_LOW: u64 = 0xe000;
/// Page directories, one per GiB of RAM.
pub const PD: u64 = 0xf000;
/// Per-vCPU exception stacks (IST1) of [`IST_STACK_SIZE`] bytes; vCPU `i`'s top is
/// `IST_STACKS + (i + 1) * IST_STACK_SIZE`.
pub const IST_STACKS: u64 = 0x5_0000;
/// Size of each vCPU's exception stack.
pub const IST_STACK_SIZE: u64 = 0x1000;
/// Lowest address a guest segment may be loaded at.
pub const GUEST_LOAD_MIN: u64 = 0x10_0000;

/// Most vCPUs a VM can have (bounded by the boot-info page and the TSS area).
pub const MAX_VCPUS: u32 = 64;
/// Most guest RAM (bounded by the page-directory area: one page per GiB).
pub const MAX_RAM: u64 = 64 << 30;
/// Smallest guest RAM.
pub const MIN_RAM: u64 = 2 << 20;
/// RAM size granule (one large page).
pub const RAM_ALIGN: u64 = 2 << 20;
/// Size of each vCPU's stack, at the top of RAM: vCPU `i`'s top is `ram - i * STACK_SIZE`.
pub const STACK_SIZE: u64 = 64 << 10;

const _: () = assert!(
    BOOT_INFO + MAX_VCPUS as u64 * core::mem::size_of::<crate::BootInfo>() as u64 <= CMDLINE
);
const _: () = assert!(TSS + MAX_VCPUS as u64 * TSS_STRIDE <= IO_BITMAP);
const _: () = assert!(IO_BITMAP + 8192 < PML4);
const _: () = assert!(PD + (MAX_RAM >> 30) * 0x1000 <= IST_STACKS);
const _: () = assert!(IST_STACKS + MAX_VCPUS as u64 * IST_STACK_SIZE <= GUEST_LOAD_MIN);
