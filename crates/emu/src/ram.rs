//! Guest RAM read straight through its host mapping, for the doorbell's hot path: a page walk
//! and the site's bytes are a handful of loads, where `GuestRam`'s general reads (bounds and
//! region lookups, volatile slice copies) cost several times the rest of the call.

use std::sync::Arc;

use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::paging::PagingMode;
use vmcall_vmm::x86::{PagingContext, VirtualMemory};

const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A read-only view of guest RAM through its host mapping; holds the RAM alive.
pub(crate) struct RamView {
    ram: Arc<GuestRam>,
    host: *const u8,
    len: u64,
}

impl RamView {
    pub(crate) fn new(ram: Arc<GuestRam>) -> Self {
        let (host, len) = ram.host_mapping();
        Self { ram, host: host.cast_const(), len: len as u64 }
    }

    /// The `N` bytes at `gpa`, if they are all in RAM.
    pub(crate) fn read<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        let end = gpa.checked_add(N as u64)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `gpa..gpa+N` is inside the mapping (checked above), which lives as long as
        // `self.ram`.
        let at = unsafe { self.host.add(gpa as usize) }.cast::<[u8; N]>();
        // SAFETY: `at` points at N bytes of the live mapping. Guest RAM may change under other
        // vCPUs at any time, so it is read with a volatile load, never through a reference;
        // `[u8; N]` needs no alignment.
        Some(unsafe { std::ptr::read_volatile(at) })
    }

    /// The little-endian u64 at `gpa`, which must be 8-byte aligned (a page-table entry).
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) || gpa.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: `gpa..gpa+8` is inside the mapping (checked above).
        let at = unsafe { self.host.add(gpa as usize) }.cast::<u64>();
        // SAFETY: as in `read`; the host mapping is page-aligned, so an 8-aligned guest
        // address is an 8-aligned host address, as a u64 load needs.
        let v = unsafe { std::ptr::read_volatile(at) };
        Some(u64::from_le(v))
    }

    /// The guest-physical address of linear `va` for a read at CPL 0: a fast walk of 4-level
    /// paging (what a long-mode guest runs with), `VirtualMemory` for every other mode and
    /// for anything the fast walk does not resolve (so the answer is always the general walk's).
    pub(crate) fn gpa(&self, paging: &PagingContext, va: u64) -> Option<u64> {
        if paging.mode() == PagingMode::Level4 {
            if let Some(gpa) = self.walk4(paging.cr3, va) {
                return Some(gpa);
            }
        }
        VirtualMemory::new(&self.ram, *paging).gpa(va).ok()
    }

    fn walk4(&self, cr3: u64, va: u64) -> Option<u64> {
        let top = (va as i64) >> 47;
        if top != 0 && top != -1 {
            return None;
        }
        let mut table = cr3 & ADDR_MASK;
        for level in (1..=4u32).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = self.read_u64(table + ((va >> shift) & 0x1ff) * 8)?;
            if e & PTE_P == 0 {
                return None;
            }
            let size = 1u64 << shift;
            if level == 1 || (level <= 3 && e & PTE_PS != 0) {
                return Some((e & ADDR_MASK & !(size - 1)) | (va & (size - 1)));
            }
            table = e & ADDR_MASK;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast walk finds what the general one finds, through 4 KiB, 2 MiB and 1 GiB pages.
    #[test]
    fn the_fast_walk_agrees_with_the_general_one() {
        let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
        let w = |at: u64, v: u64| ram.write_u64(at, v).unwrap();
        w(0x1000, 0x2000 | 3); // PML4[0] -> PDPT
        w(0x1000 + 8 * 0x1ff, 0x5000 | 3); // PML4[511] -> PDPT for the high half
        w(0x2000, 0x3000 | 3); // PDPT[0] -> PD
        w(0x2008, 0x4000_0000 | 0x83); // PDPT[1]: 1 GiB page (outside RAM: no walk reads it)
        w(0x3000, 0x4000 | 3); // PD[0] -> PT
        w(0x3008, 0x60_0000 | 0x83); // PD[1]: 2 MiB page at 6 MiB
        w(0x4000 + 8 * 0x10, 0x7_3000 | 3); // PT[0x10]: 0x10000 -> 0x73000
        w(0x5000 + 8 * 0x1fe, 0x2000 | 3); // high half aliases the low PDPT
        let view = RamView::new(ram.clone());
        let paging = PagingContext { cr0: 0x8000_0011, cr3: 0x1000, cr4: 0x20, efer: 0x500 };
        let general = VirtualMemory::new(&ram, paging);
        for va in [
            0x10_123,
            0x20_0000 + 0x1_2345,
            0x4000_0000 + 0x777,
            0xffff_ff80_0001_0008,
            0x11_000,
            0x0000_8000_0000_0000,
            0xffff_8000_0000_0000,
        ] {
            assert_eq!(view.gpa(&paging, va), general.gpa(va).ok(), "{va:#x}");
        }
        assert_eq!(view.gpa(&paging, 0x10_123), Some(0x7_3123));
        assert_eq!(view.walk4(paging.cr3, 0x11_000), None, "not present");
    }
}
