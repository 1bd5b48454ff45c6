//! The guest's own page tables: guest-virtual (linear) addresses to guest-physical ones.
//!
//! Every time the host reads guest state by a virtual address — the instruction at RIP, an
//! exception frame at RSP, the GDT or IDT, a pointer a hypercall handler was given — it goes
//! through [`translate`], which walks the tables the guest itself loaded in CR3: no paging,
//! 32-bit paging (4 KiB and 4 MiB pages), PAE, and 4- and 5-level long-mode paging (4 KiB, 2 MiB
//! and 1 GiB pages). Table entries are read through [`GuestRam`], so a table pointer outside
//! RAM is a [`WalkError`], never a host access. The same walk serves every backend.

use super::mode::{CR0_PG, CR4_PAE, EFER_LMA};
use super::regs::SpecialRegs;
use crate::memory::GuestRam;

const CR4_PSE: u64 = 1 << 4;
const CR4_LA57: u64 = 1 << 12;
const CR0_WP: u64 = 1 << 16;
const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
/// Physical-address bits of a table entry (MAXPHYADDR 52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The registers that decide how the guest translates addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PagingContext {
    /// CR0 (PG, WP).
    pub cr0: u64,
    /// CR3: the root table.
    pub cr3: u64,
    /// CR4 (PAE, PSE, LA57).
    pub cr4: u64,
    /// EFER (LMA, NXE).
    pub efer: u64,
}

/// The kind of page walk a [`PagingContext`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: linear = physical (32 bits).
    None,
    /// Two-level 32-bit paging.
    Bits32,
    /// Three-level PAE paging.
    Pae,
    /// Four-level long-mode paging.
    Level4,
    /// Five-level long-mode paging (CR4.LA57).
    Level5,
}

impl PagingContext {
    /// The context of the registers `s`.
    pub fn from_sregs(s: &SpecialRegs) -> Self {
        Self { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer }
    }

    /// The paging mode these registers select.
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if self.efer & EFER_LMA != 0 {
            if self.cr4 & CR4_LA57 != 0 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            }
        } else if self.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }
}

/// Why a guest-virtual address has no translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// No present entry maps the address.
    #[error("guest-virtual {va:#x} is not mapped (no present entry at level {level})")]
    NotPresent {
        /// The guest-virtual address.
        va: u64,
        /// The paging level without a present entry (4: PML4).
        level: u8,
    },
    /// The address is not canonical.
    #[error("guest-virtual {va:#x} is not a canonical address")]
    NonCanonical {
        /// The guest-virtual address.
        va: u64,
    },
    /// A write to a read-only page.
    #[error("guest-virtual {va:#x} is mapped read-only")]
    ReadOnly {
        /// The guest-virtual address.
        va: u64,
    },
    /// A CPL 3 access to a supervisor page.
    #[error("guest-virtual {va:#x} is a supervisor page, refused to CPL 3")]
    Supervisor {
        /// The guest-virtual address.
        va: u64,
    },
    /// A page table lies outside guest RAM.
    #[error("a page table for guest-virtual {va:#x} lies at guest-physical {table:#x}, outside guest RAM")]
    TableOutsideRam {
        /// The guest-virtual address.
        va: u64,
        /// The table's guest-physical address.
        table: u64,
    },
}

/// What an access through a translation intends, for the permission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// A write (read-only pages refuse it).
    pub write: bool,
    /// Checked as a CPL 3 access (user pages only).
    pub user: bool,
}

impl Access {
    /// A supervisor read.
    pub const READ: Access = Access { write: false, user: false };
    /// A supervisor write.
    pub const WRITE: Access = Access { write: true, user: false };
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 or 4 MiB, 1 GiB; 4 GiB with paging off).
    pub page_size: u64,
    /// Whether the page is writable.
    pub writable: bool,
    /// Whether the page is user-accessible.
    pub user: bool,
}

impl Translation {
    /// Bytes from `gpa` to the end of its page.
    pub fn room(&self) -> u64 {
        self.page_size - (self.gpa & (self.page_size - 1))
    }
}

/// Translate `va` through the guest's tables, checking `access` against the page's rights
/// (writes honour CR0.WP for supervisor accesses, as the CPU does).
pub fn translate(
    mem: &GuestRam,
    ctx: &PagingContext,
    va: u64,
    access: Access,
) -> Result<Translation, WalkError> {
    let t = walk(mem, ctx, va)?;
    if access.user && !t.user {
        return Err(WalkError::Supervisor { va });
    }
    if access.write && !t.writable && (access.user || ctx.cr0 & CR0_WP != 0) {
        return Err(WalkError::ReadOnly { va });
    }
    Ok(t)
}

fn walk(mem: &GuestRam, ctx: &PagingContext, va: u64) -> Result<Translation, WalkError> {
    let entry = |table: u64, index: u64, size: u64| -> Result<u64, WalkError> {
        let at = table + index * size;
        let mut b = [0u8; 8];
        mem.read(at, &mut b[..size as usize])
            .map_err(|_| WalkError::TableOutsideRam { va, table: at })?;
        Ok(u64::from_le_bytes(b))
    };
    match ctx.mode() {
        PagingMode::None => Ok(Translation {
            gpa: va & 0xffff_ffff,
            page_size: 1 << 32,
            writable: true,
            user: true,
        }),
        PagingMode::Bits32 => {
            let va = va & 0xffff_ffff;
            let pde = entry(ctx.cr3 & 0xffff_f000, va >> 22, 4)?;
            present(pde, va, 2)?;
            if pde & PTE_PS != 0 && ctx.cr4 & CR4_PSE != 0 {
                // PSE-36: PDE bits 20:13 are physical bits 39:32.
                let base = (pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32);
                return Ok(leaf(base, va, 4 << 20, pde));
            }
            let pte = entry(pde & 0xffff_f000, (va >> 12) & 0x3ff, 4)?;
            present(pte, va, 1)?;
            Ok(leaf(pte & 0xffff_f000, va, 4096, pde & pte))
        }
        PagingMode::Pae => {
            let va = va & 0xffff_ffff;
            // The four PDPTEs carry no R/W or U/S rights.
            let pdpte = entry(ctx.cr3 & 0xffff_ffe0, va >> 30, 8)?;
            present(pdpte, va, 3)?;
            table_walk(entry, pdpte & ADDR_MASK, va, 2, PTE_RW | PTE_US)
        }
        PagingMode::Level4 | PagingMode::Level5 => {
            let bits = if ctx.mode() == PagingMode::Level5 { 57 } else { 48 };
            let top = (va as i64) >> (bits - 1);
            if top != 0 && top != -1 {
                return Err(WalkError::NonCanonical { va });
            }
            let levels = if bits == 57 { 5 } else { 4 };
            table_walk(entry, ctx.cr3 & ADDR_MASK, va, levels, PTE_RW | PTE_US)
        }
    }
}

/// Walk 64-bit entries from `level` down to 1 (9 index bits a level), with large pages at
/// levels 3 (1 GiB) and 2 (2 MiB). `rights` accumulates R/W and U/S down the walk.
fn table_walk(
    entry: impl Fn(u64, u64, u64) -> Result<u64, WalkError>,
    mut table: u64,
    va: u64,
    mut level: u8,
    mut rights: u64,
) -> Result<Translation, WalkError> {
    loop {
        let shift = 12 + 9 * u32::from(level - 1);
        let e = entry(table, (va >> shift) & 0x1ff, 8)?;
        present(e, va, level)?;
        rights &= e;
        let size = 1u64 << shift;
        if level == 1 || (level <= 3 && e & PTE_PS != 0) {
            return Ok(leaf(e & ADDR_MASK & !(size - 1), va, size, rights));
        }
        table = e & ADDR_MASK;
        level -= 1;
    }
}

fn present(e: u64, va: u64, level: u8) -> Result<(), WalkError> {
    if e & PTE_P == 0 {
        return Err(WalkError::NotPresent { va, level });
    }
    Ok(())
}

fn leaf(base: u64, va: u64, size: u64, rights: u64) -> Translation {
    Translation {
        gpa: base | (va & (size - 1)),
        page_size: size,
        writable: rights & PTE_RW != 0,
        user: rights & PTE_US != 0,
    }
}

/// A failed access to guest memory by virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VirtError {
    /// The address has no translation.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// The translation points outside guest RAM.
    #[error(transparent)]
    OutOfRam(#[from] crate::memory::OutOfBounds),
}

/// Guest memory as code running with one [`PagingContext`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct VirtualMemory<'a> {
    /// The guest's RAM.
    pub mem: &'a GuestRam,
    /// The paging registers to translate with.
    pub ctx: PagingContext,
}

impl<'a> VirtualMemory<'a> {
    /// Guest virtual memory as `ctx` maps it.
    pub fn new(mem: &'a GuestRam, ctx: PagingContext) -> Self {
        Self { mem, ctx }
    }

    /// The guest-physical address of `va`, for a read.
    pub fn gpa(&self, va: u64) -> Result<u64, WalkError> {
        translate(self.mem, &self.ctx, va, Access::READ).map(|t| t.gpa)
    }

    /// Copy guest bytes at `va` into `buf`, page by page.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), VirtError> {
        self.each_page(va, buf.len(), Access::READ, |gpa, range| {
            self.mem.read(gpa, &mut buf[range])
        })
    }

    /// Copy `data` into guest memory at `va`, page by page. Every page is translated and
    /// checked against RAM before any byte is written, and written where that walk said: a
    /// write that fails writes nothing, even one that lands on the page tables it went through.
    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), VirtError> {
        let mut pieces = Vec::new();
        self.each_page(va, data.len(), Access::WRITE, |gpa, range| {
            self.mem.check(gpa, range.len() as u64)?;
            pieces.push((gpa, range));
            Ok(())
        })?;
        for (gpa, range) in pieces {
            self.mem.write(gpa, &data[range])?;
        }
        Ok(())
    }

    /// Read a u64 at virtual address `va`.
    pub fn read_u64(&self, va: u64) -> Result<u64, VirtError> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a u64 at virtual address `va`.
    pub fn write_u64(&self, va: u64, value: u64) -> Result<(), VirtError> {
        self.write(va, &value.to_le_bytes())
    }

    fn each_page(
        &self,
        va: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), crate::memory::OutOfBounds>,
    ) -> Result<(), VirtError> {
        let mut done = 0usize;
        while done < len {
            let at = va.wrapping_add(done as u64);
            let t = translate(self.mem, &self.ctx, at, access)?;
            let n = (t.room().min((len - done) as u64)) as usize;
            f(t.gpa, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::mode::{CR0_PE, EFER_LME};

    const PG: u64 = CR0_PG | CR0_PE;

    fn ram() -> GuestRam {
        GuestRam::new(8 << 20).unwrap()
    }

    fn long4(cr3: u64) -> PagingContext {
        PagingContext { cr0: PG | CR0_WP, cr3, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA }
    }

    #[test]
    fn paging_off_is_identity_in_32_bits() {
        let m = ram();
        let ctx = PagingContext { cr0: CR0_PE, ..Default::default() };
        assert_eq!(ctx.mode(), PagingMode::None);
        assert_eq!(translate(&m, &ctx, 0x1_0012_3456, Access::READ).unwrap().gpa, 0x12_3456);
    }

    #[test]
    fn four_level_with_4k_2m_and_1g_pages() {
        let m = ram();
        // PML4 0x10000 -> PDPT 0x11000; PDPT[0] -> PD 0x12000; PD[1] -> PT 0x13000.
        m.write_u64(0x10000 + 8 * 0x80, 0x11000 | 7).unwrap(); // VA 0x4000_0000_0000
        m.write_u64(0x11000, 0x12000 | 7).unwrap();
        m.write_u64(0x12000 + 8, 0x13000 | 7).unwrap();
        m.write_u64(0x13000 + 8 * 5, 0x40_0000 | 3).unwrap(); // supervisor 4 KiB page
        m.write_u64(0x12000 + 8 * 2, 0x60_0000 | 0x80 | 5).unwrap(); // 2 MiB, read-only
        m.write_u64(0x11000 + 8, 0x4000_0000 | 0x80 | 7).unwrap(); // 1 GiB
        let ctx = long4(0x10000);
        let base = 0x4000_0000_0000u64;
        let t = translate(&m, &ctx, base + 0x20_5123, Access::READ).unwrap();
        assert_eq!((t.gpa, t.page_size, t.user), (0x40_0123, 4096, false));
        let t = translate(&m, &ctx, base + 0x40_1234, Access::READ).unwrap();
        assert_eq!((t.gpa, t.page_size, t.writable), (0x60_1234, 2 << 20, false));
        assert_eq!(
            translate(&m, &ctx, base + 0x40_1234, Access::WRITE),
            Err(WalkError::ReadOnly { va: base + 0x40_1234 })
        );
        assert_eq!(
            translate(&m, &ctx, base + 0x20_5000, Access { write: false, user: true }),
            Err(WalkError::Supervisor { va: base + 0x20_5000 })
        );
        let t = translate(&m, &ctx, base + 0x4000_0000 + 0x1234_5678, Access::READ).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x4000_0000 + 0x1234_5678, 1 << 30));
        assert_eq!(
            translate(&m, &ctx, base + 0x20_6000, Access::READ),
            Err(WalkError::NotPresent { va: base + 0x20_6000, level: 1 })
        );
        assert_eq!(
            translate(&m, &ctx, 0x8000_0000_0000, Access::READ),
            Err(WalkError::NonCanonical { va: 0x8000_0000_0000 })
        );
        assert_eq!(
            translate(&m, &ctx, 0xffff_8000_0000_0000, Access::READ),
            Err(WalkError::NotPresent { va: 0xffff_8000_0000_0000, level: 4 })
        );
    }

    #[test]
    fn five_level_adds_a_level() {
        let m = ram();
        m.write_u64(0x10000 + 8 * 0x1ff, 0x11000 | 3).unwrap(); // PML5[511]
        m.write_u64(0x11000 + 8 * 0x1ff, 0x12000 | 3).unwrap(); // PML4[511]
        m.write_u64(0x12000 + 8 * 0x1ff, 0x80 | 3).unwrap(); // 1 GiB page at 0
        let ctx = PagingContext { cr4: CR4_PAE | CR4_LA57, ..long4(0x10000) };
        assert_eq!(ctx.mode(), PagingMode::Level5);
        let t = translate(&m, &ctx, 0xffff_ffff_c000_1000, Access::READ).unwrap();
        assert_eq!(t.gpa, 0x1000);
        assert!(translate(&m, &ctx, 0x0100_0000_0000_0000, Access::READ).is_err());
    }

    #[test]
    fn pae_and_32_bit_paging() {
        let m = ram();
        // PAE: PDPT at 0x10020 (32-byte aligned), PDPTE[3] -> PD 0x11000.
        m.write_u64(0x10020 + 8 * 3, 0x11000 | 1).unwrap();
        m.write_u64(0x11000 + 8 * 0x1ff, 0x12000 | 7).unwrap();
        m.write_u64(0x12000 + 8 * 0x1ff, 0x30_0000 | 7).unwrap();
        m.write_u64(0x11000, 0x40_0000 | 0x80 | 7).unwrap();
        let pae = PagingContext { cr0: PG, cr3: 0x10020, cr4: CR4_PAE, efer: 0 };
        assert_eq!(pae.mode(), PagingMode::Pae);
        assert_eq!(translate(&m, &pae, 0xffff_f123, Access::READ).unwrap().gpa, 0x30_0123);
        assert_eq!(translate(&m, &pae, 0xc012_3456, Access::READ).unwrap().gpa, 0x52_3456);
        // 32-bit: PD at 0x20000; PDE[0x300] -> PT 0x21000; PDE[1] is a 4 MiB page.
        m.write(0x20000 + 4 * 0x300, &(0x21000u32 | 7).to_le_bytes()).unwrap();
        m.write(0x21000 + 4 * 2, &(0x50_0000u32 | 7).to_le_bytes()).unwrap();
        m.write(0x20000 + 4, &(0x40_0000u32 | 0x80 | 7).to_le_bytes()).unwrap();
        let p32 = PagingContext { cr0: PG, cr3: 0x20000, cr4: CR4_PSE, efer: 0 };
        assert_eq!(p32.mode(), PagingMode::Bits32);
        assert_eq!(translate(&m, &p32, 0xc000_2abc, Access::READ).unwrap().gpa, 0x50_0abc);
        let t = translate(&m, &p32, 0x0052_3456, Access::READ).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x52_3456, 4 << 20));
    }

    #[test]
    fn tables_outside_ram_are_errors_not_accesses() {
        let m = ram();
        let ctx = long4(0xfff_0000_0000);
        assert!(matches!(
            translate(&m, &ctx, 0x1000, Access::READ),
            Err(WalkError::TableOutsideRam { .. })
        ));
        m.write_u64(0x10000, 0x7fff_0000_0000 | 3).unwrap();
        assert!(matches!(
            translate(&m, &long4(0x10000), 0x1000, Access::READ),
            Err(WalkError::TableOutsideRam { .. })
        ));
    }

    #[test]
    fn virtual_reads_and_writes_cross_pages() {
        let m = ram();
        m.write_u64(0x10000, 0x11000 | 3).unwrap();
        m.write_u64(0x11000, 0x12000 | 3).unwrap();
        m.write_u64(0x12000, 0x13000 | 3).unwrap();
        // VA 0x0000 -> 0x30_0000, VA 0x1000 -> 0x20_0000 (reversed), VA 0x2000 unmapped.
        m.write_u64(0x13000, 0x30_0000 | 3).unwrap();
        m.write_u64(0x13008, 0x20_0000 | 3).unwrap();
        let v = VirtualMemory::new(&m, long4(0x10000));
        v.write_u64(0xffc, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.read(0x30_0ffc, &mut [0u8; 4]).map(|_| ()), Ok(()));
        let mut lo = [0u8; 4];
        m.read(0x30_0ffc, &mut lo).unwrap();
        assert_eq!(u32::from_le_bytes(lo), 0x5566_7788);
        m.read(0x20_0000, &mut lo).unwrap();
        assert_eq!(u32::from_le_bytes(lo), 0x1122_3344);
        assert_eq!(v.read_u64(0xffc).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(v.gpa(0x1010).unwrap(), 0x20_0010);
        // A write that would cross into an unmapped page writes nothing.
        m.write_u64(0x20_0ff8, 0).unwrap();
        assert!(v.write_u64(0x1ffc, u64::MAX).is_err());
        assert_eq!(m.read_u64(0x20_0ff8).unwrap(), 0);
    }

    /// Found by the `paging` fuzz target: the pages of a write were checked against the
    /// guest's tables but not against RAM, so a write whose second page was mapped beyond RAM
    /// wrote its first page and then failed; and a write that changed the page tables it went
    /// through was walked again halfway.
    #[test]
    fn a_failed_write_writes_nothing() {
        let m = ram();
        m.write_u64(0x10000, 0x11000 | 3).unwrap();
        m.write_u64(0x11000, 0x12000 | 3).unwrap();
        m.write_u64(0x12000, 0x13000 | 3).unwrap();
        m.write_u64(0x13000, 0x30_0000 | 3).unwrap(); // VA 0x0000 -> 0x30_0000
        m.write_u64(0x13008, 0x7fff_0000_0000 | 3).unwrap(); // VA 0x1000 -> beyond RAM
        let v = VirtualMemory::new(&m, long4(0x10000));
        assert!(matches!(v.write_u64(0xffc, u64::MAX), Err(VirtError::OutOfRam(_))));
        assert_eq!(m.read_u64(0x30_0ff8).unwrap(), 0, "the first page was written");
        // VA 0x2000 -> the page table itself: a write from VA 0x2018 overwrites the entry of
        // VA 0x3000 (with a non-present one) before it reaches VA 0x3000, yet its last bytes
        // go where the walk before the write said.
        m.write_u64(0x13010, 0x13000 | 3).unwrap();
        m.write_u64(0x13018, 0x20_0000 | 3).unwrap();
        let bytes: Vec<u8> = (0..0xff0).map(|i| i as u8).collect();
        v.write(0x2018, &bytes).unwrap();
        let mut back = [0u8; 8];
        m.read(0x20_0000, &mut back).unwrap();
        assert_eq!(back, [0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef], "as first walked");
    }
}
