//! The guest's own 4-level page tables, built in free RAM as a kernel builds them.
//!
//! Every table lives in RAM that is identity-mapped both by the VMM's tables and by the ones
//! built here, so a table's physical address is also a pointer to it.

use core::arch::asm;

use vmcall_guest::BootInfo;

/// Present.
pub const P: u64 = 1;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User-accessible.
pub const US: u64 = 1 << 2;
/// Large page (2 MiB in a page directory).
pub const PS: u64 = 1 << 7;
/// Flags of a kernel mapping: present, writable, supervisor only, as a kernel maps itself.
pub const KERNEL: u64 = P | RW;

const ADDR: u64 = 0x000f_ffff_ffff_f000;
const LARGE_ADDR: u64 = 0x000f_ffff_ffe0_0000;
const PAGE: u64 = 4096;
const LARGE: u64 = 2 << 20;

/// Physical pages for tables, handed out from the guest's free RAM below [`crate::SCRATCH`].
#[derive(Debug)]
pub struct Frames {
    next: u64,
    end: u64,
}

impl Frames {
    pub fn new(info: &BootInfo) -> Self {
        Self { next: info.free_start, end: info.free_end.min(crate::SCRATCH) }
    }

    /// A zeroed page.
    pub fn alloc(&mut self) -> u64 {
        assert!(self.next + PAGE <= self.end, "out of free RAM for page tables");
        let page = self.next;
        self.next += PAGE;
        // SAFETY: the page is free RAM that nothing else uses, identity-mapped (module docs).
        unsafe { core::ptr::write_bytes(page as *mut u8, 0, PAGE as usize) };
        page
    }
}

fn entry(table: u64, index: u64) -> *mut u64 {
    (table + 8 * index) as *mut u64
}

fn read(e: *mut u64) -> u64 {
    // SAFETY: `e` points into a page table this module allocated (identity-mapped RAM).
    unsafe { e.read_volatile() }
}

fn write(e: *mut u64, value: u64) {
    // SAFETY: as `read`; the CPU sees the change once the TLB is flushed.
    unsafe { e.write_volatile(value) }
}

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * level)) & 0x1ff
}

/// A PML4 and everything under it.
#[derive(Debug)]
pub struct PageTables {
    pub pml4: u64,
}

impl PageTables {
    pub fn new(frames: &mut Frames) -> Self {
        Self { pml4: frames.alloc() }
    }

    /// The table `e` points to, allocated if `e` is empty, or split from the large page it
    /// maps (the same mapping, in 512 smaller pages).
    fn table(frames: &mut Frames, e: *mut u64) -> u64 {
        let v = read(e);
        if v & P == 0 {
            let t = frames.alloc();
            write(e, t | P | RW | US);
            return t;
        }
        if v & PS != 0 {
            let t = frames.alloc();
            for i in 0..512 {
                write(entry(t, i), ((v & LARGE_ADDR) + i * PAGE) | (v & 0xfff & !PS));
            }
            write(e, t | P | RW | US);
            return t;
        }
        v & ADDR
    }

    /// The page-directory entry for `va`, with the tables above it created.
    fn pde(&mut self, frames: &mut Frames, va: u64) -> *mut u64 {
        let pdpt = Self::table(frames, entry(self.pml4, index(va, 3)));
        let pd = Self::table(frames, entry(pdpt, index(va, 2)));
        entry(pd, index(va, 1))
    }

    /// Map the 2 MiB page at `va` to `pa`.
    pub fn map_2m(&mut self, frames: &mut Frames, va: u64, pa: u64, flags: u64) {
        let e = self.pde(frames, va);
        write(e, pa | flags | PS);
    }

    /// Map the 4 KiB page at `va` to `pa` (splitting a large page that covers it).
    pub fn map_4k(&mut self, frames: &mut Frames, va: u64, pa: u64, flags: u64) {
        let pde = self.pde(frames, va);
        let pt = Self::table(frames, pde);
        write(entry(pt, index(va, 0)), pa | flags);
    }

    /// Remove the 4 KiB page at `va` (splitting a large page that covers it).
    pub fn unmap_4k(&mut self, frames: &mut Frames, va: u64) {
        let pde = self.pde(frames, va);
        let pt = Self::table(frames, pde);
        write(entry(pt, index(va, 0)), 0);
    }

    /// Identity-map all RAM as the VMM does: 2 MiB pages, the first 2 MiB (the VMM's GDT, IDT,
    /// TSS and exception stacks) in 4 KiB pages with page 0 absent.
    pub fn identity_ram(&mut self, frames: &mut Frames, ram_size: u64, flags: u64) {
        for page in 1..LARGE / PAGE {
            self.map_4k(frames, page * PAGE, page * PAGE, flags);
        }
        let mut pa = LARGE;
        while pa < ram_size {
            self.map_2m(frames, pa, pa, flags);
            pa += LARGE;
        }
    }

    /// Make these tables the CPU's (which also flushes the TLB).
    pub fn load(&self) {
        // SAFETY: the tables identity-map all RAM (the caller built them so), so the code, stack
        // and data in use stay where they are.
        unsafe { asm!("mov cr3, {}", in(reg) self.pml4, options(nostack)) };
    }
}

/// The current CR3.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Flush the TLB by reloading CR3, as a kernel does after changing a mapping.
pub fn flush_tlb() {
    // SAFETY: writing CR3 its own value changes no mapping.
    unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack)) };
}
