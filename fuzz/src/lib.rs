//! What the fuzz targets share: guest RAM, addresses and paging state built from fuzz input,
//! biased towards values that lead somewhere (addresses inside RAM, page-table entries that
//! point at other tables), with room left for anything at all.
#![forbid(unsafe_code)]

use arbitrary::{Result, Unstructured};
use vmcall_vmm::boot::{self, BootParams};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::mode::{CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME};
use vmcall_vmm::x86::PagingContext;

/// Guest RAM of the targets that need some: small, so that random table entries and
/// addresses land inside it often and a fresh mapping per input is cheap, yet room for
/// vmcall's own boot structures (everything they write lies below 0x60000).
pub const RAM_SIZE: u64 = 512 << 10;

/// Fresh, zeroed guest RAM (a fresh mapping per input keeps runs reproducible).
pub fn fresh_ram() -> GuestRam {
    GuestRam::anonymous(RAM_SIZE as usize).expect("map guest RAM")
}

/// A guest-physical address: mostly inside RAM, sometimes anywhere.
pub fn gpa(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(7, 8)? {
        u.int_in_range(0..=RAM_SIZE - 1)
    } else {
        u.arbitrary()
    }
}

/// A guest-virtual address: small ones, ones near the canonical boundaries and the top of
/// the address space, or anything.
pub fn virt_addr(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=4)? {
        0 => u.int_in_range(0..=RAM_SIZE + 0x1000)?,
        1 => {
            0x0000_8000_0000_0000u64.wrapping_add(u.int_in_range(0..=0x2000)?).wrapping_sub(0x1000)
        }
        2 => u64::MAX - u.int_in_range(0..=0x2000u64)?,
        3 => 0x0100_0000_0000_0000u64.wrapping_sub(u.int_in_range(0..=0x2000u64)?),
        _ => u.arbitrary()?,
    })
}

/// A page-table entry: usually a pointer to a page inside RAM with fuzzed flag bits.
pub fn table_entry(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(3, 4)? {
        let page = u.int_in_range(0..=(RAM_SIZE >> 12) - 1)?;
        let flags: u8 = u.arbitrary()?;
        let nx: bool = u.arbitrary()?;
        Ok(page << 12 | u64::from(flags) | if nx { 1 << 63 } else { 0 })
    } else {
        u.arbitrary()
    }
}

/// Write up to `max` fuzz-chosen byte chunks into `ram`.
pub fn fill_chunks(u: &mut Unstructured<'_>, ram: &GuestRam, max: usize) -> Result<()> {
    for _ in 0..u.int_in_range(0..=max)? {
        let at = u.int_in_range(0..=RAM_SIZE - 1)?;
        let len = u.int_in_range(0..=256usize)?;
        let bytes = u.bytes(len)?;
        let n = bytes.len().min((RAM_SIZE - at) as usize);
        ram.write(at, &bytes[..n]).expect("inside RAM");
    }
    Ok(())
}

/// Write up to `max` fuzz-chosen page-table entries (8 bytes each, at 8-byte slots).
pub fn fill_tables(u: &mut Unstructured<'_>, ram: &GuestRam, max: usize) -> Result<()> {
    for _ in 0..u.int_in_range(0..=max)? {
        let slot = u.int_in_range(0..=RAM_SIZE / 8 - 1)?;
        ram.write_u64(slot * 8, table_entry(u)?).expect("inside RAM");
    }
    Ok(())
}

/// vmcall's own boot state in `ram` (GDT, IDT, identity page tables for 1 vCPU) and the
/// paging registers a vCPU starts with.
pub fn vmm_boot_state(ram: &GuestRam) -> PagingContext {
    let params = BootParams {
        entry: vmcall_abi::layout::GUEST_LOAD_MIN,
        image_end: vmcall_abi::layout::GUEST_LOAD_MIN + 0x1000,
        vcpus: 1,
        cmdline: b"",
        amd: false,
    };
    let inits = boot::setup(ram, &params).expect("boot setup in fresh RAM");
    // The setup maps RAM in 2 MiB units, and this RAM is smaller than one: map its first
    // 2 MiB through the 4 KiB table the setup wrote, as it does for a VM's.
    use vmcall_abi::layout::{PD, PT_LOW};
    ram.write_u64(PD, PT_LOW | 7).expect("inside RAM");
    PagingContext::from_sregs(&inits[0].sregs)
}

/// Paging registers: each paging mode with a CR3 that is usually inside RAM, vmcall's own
/// boot state, or any bits at all.
pub fn paging(u: &mut Unstructured<'_>, ram: &GuestRam) -> Result<PagingContext> {
    const LA57: u64 = 1 << 12;
    const PSE: u64 = 1 << 4;
    let cr3 = gpa(u)?;
    let wp = if u.arbitrary()? { CR0_WP } else { 0 };
    let pg = CR0_PE | CR0_PG | wp;
    Ok(match u.int_in_range(0..=6)? {
        0 => PagingContext { cr0: CR0_PE, ..Default::default() },
        1 => PagingContext { cr0: pg, cr3, cr4: if u.arbitrary()? { PSE } else { 0 }, efer: 0 },
        2 => PagingContext { cr0: pg, cr3, cr4: CR4_PAE, efer: 0 },
        3 => PagingContext { cr0: pg, cr3, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA },
        4 => PagingContext { cr0: pg, cr3, cr4: CR4_PAE | LA57, efer: EFER_LME | EFER_LMA },
        5 => vmm_boot_state(ram),
        _ => PagingContext {
            cr0: u.arbitrary()?,
            cr3: u.arbitrary()?,
            cr4: u.arbitrary()?,
            efer: u.arbitrary()?,
        },
    })
}
