//! Booting a guest: the ELF loader, and the GDT, IDT and exception stubs, TSSes, identity page
//! tables and boot info that put every vCPU in 64-bit long mode at CPL 0 before its first
//! instruction (`docs/guest-abi.md` is the contract this module implements).

pub mod elf;
pub(crate) mod multiboot;
pub mod symbols;

pub use multiboot::MultibootError;

use vmcall_abi::layout::*;
use vmcall_abi::{ports, selectors, BootInfo, ABI_VERSION, BOOT_INFO_MAGIC};

use crate::memory::{GuestRam, OutOfBounds};
use crate::x86::descriptors::{GP_VECTOR, UD_VECTOR};
use crate::x86::mode::*;
use crate::x86::regs::{DescriptorTable, Regs, Segment, SpecialRegs};

/// Initial state of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuInit {
    /// General-purpose registers at entry.
    pub regs: Regs,
    /// Segment, control and descriptor-table registers at entry.
    pub sregs: SpecialRegs,
}

/// What the boot setup needs to know about the VM.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// The entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub image_end: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The guest's command line.
    pub cmdline: &'a [u8],
    /// Whether the host CPU is AMD-like (VMMCALL is native).
    pub amd: bool,
}

/// Offset of vector `v`'s stub inside the stub page.
const STUB_STRIDE: u64 = 16;
/// The IDT covers the 32 exception vectors.
pub const EXCEPTION_VECTORS: u8 = 32;

/// Guest-physical address of vector `v`'s stub.
pub fn stub_gpa(vector: u8) -> u64 {
    IDT_STUBS + u64::from(vector) * STUB_STRIDE
}

/// Top of the RAM area guest segments may occupy (the vCPU stacks sit above it).
pub fn load_limit(ram_size: u64, vcpus: u32) -> u64 {
    ram_size.saturating_sub(u64::from(vcpus) * STACK_SIZE)
}

/// Write every boot structure into `ram` (fresh, zeroed RAM) and return each vCPU's initial
/// state.
pub fn setup(ram: &GuestRam, p: &BootParams) -> Result<Vec<VcpuInit>, OutOfBounds> {
    assert!(p.vcpus >= 1 && p.vcpus <= MAX_VCPUS, "vCPU count checked by the builder");
    assert!(p.cmdline.len() as u64 <= CMDLINE_MAX, "command line length checked by the builder");
    // RAM comes zeroed from the kernel (anonymous mapping); writing zeroes here would only
    // fault in the whole VMM area for nothing.
    write_gdt(ram, p.vcpus)?;
    write_idt(ram, Width::Long)?;
    write_tss(ram, p.vcpus, Width::Long)?;
    write_page_tables(ram)?;
    ram.write(CMDLINE, p.cmdline)?;

    let free_end = load_limit(ram.size(), p.vcpus);
    let free_start = (p.image_end + 0xfff) & !0xfff;
    (0..p.vcpus)
        .map(|id| {
            let stack_top = ram.size() - u64::from(id) * STACK_SIZE;
            let info = BootInfo {
                magic: BOOT_INFO_MAGIC,
                abi_version: ABI_VERSION,
                vcpu_id: id,
                vcpu_count: p.vcpus,
                amd: u32::from(p.amd),
                ram_size: ram.size(),
                cmdline_gpa: CMDLINE,
                cmdline_len: p.cmdline.len() as u64,
                stack_top,
                free_start: free_start.min(free_end),
                free_end,
            };
            let info_gpa = boot_info_gpa(id);
            ram.write(info_gpa, &boot_info_bytes(&info))?;
            let regs = Regs {
                rip: p.entry,
                rsp: stack_top,
                rdi: info_gpa,
                rflags: 0x2,
                ..Default::default()
            };
            Ok(VcpuInit { regs, sregs: initial_sregs(id, p.vcpus, Width::Long) })
        })
        .collect()
}

/// Guest-physical address of vCPU `id`'s boot info.
pub fn boot_info_gpa(id: u32) -> u64 {
    BOOT_INFO + u64::from(id) * core::mem::size_of::<BootInfo>() as u64
}

/// `BootInfo` in its `repr(C)` little-endian layout.
pub fn boot_info_bytes(b: &BootInfo) -> [u8; 72] {
    let mut out = [0u8; 72];
    let fields: [(usize, &[u8]); 11] = [
        (0, &b.magic.to_le_bytes()),
        (8, &b.abi_version.to_le_bytes()),
        (12, &b.vcpu_id.to_le_bytes()),
        (16, &b.vcpu_count.to_le_bytes()),
        (20, &b.amd.to_le_bytes()),
        (24, &b.ram_size.to_le_bytes()),
        (32, &b.cmdline_gpa.to_le_bytes()),
        (40, &b.cmdline_len.to_le_bytes()),
        (48, &b.stack_top.to_le_bytes()),
        (56, &b.free_start.to_le_bytes()),
        (64, &b.free_end.to_le_bytes()),
    ];
    for (off, bytes) in fields {
        out[off..off + bytes.len()].copy_from_slice(bytes);
    }
    out
}

/// A code or data descriptor: `access` is the P/DPL/S/type byte, `flags` the G/DB/L nibble.
const fn descriptor(access: u8, flags: u8) -> u64 {
    0xffff | (0xf << 48) | ((access as u64) << 40) | ((flags as u64) << 52)
}

/// The 8-byte descriptors of the GDT, in selector order from 0x08.
const GDT_CODE_DATA: [u64; 6] = [
    descriptor(0x9b, 0xa), // 0x08 kernel code 64
    descriptor(0x93, 0xc), // 0x10 kernel data
    descriptor(0xfb, 0xc), // 0x18 user code 32
    descriptor(0xf3, 0xc), // 0x20 user data
    descriptor(0xfb, 0xa), // 0x28 user code 64
    descriptor(0x9b, 0xc), // 0x30 kernel code 32
];
const _: () = assert!(selectors::TSS_BASE as usize == 8 * (GDT_CODE_DATA.len() + 1));

pub(crate) fn tss_gpa(id: u32) -> u64 {
    TSS + u64::from(id) * TSS_STRIDE
}

pub(crate) fn tss_limit(id: u32) -> u32 {
    (IO_BITMAP - tss_gpa(id) + 8192) as u32
}

pub(crate) fn gdt_limit(vcpus: u32) -> u16 {
    (u64::from(selectors::TSS_BASE) + 16 * u64::from(vcpus) - 1) as u16
}

pub(crate) fn write_gdt(ram: &GuestRam, vcpus: u32) -> Result<(), OutOfBounds> {
    for (i, d) in GDT_CODE_DATA.iter().enumerate() {
        ram.write_u64(GDT + 8 * (i as u64 + 1), *d)?;
    }
    for id in 0..vcpus {
        let (base, limit) = (tss_gpa(id), u64::from(tss_limit(id)));
        // A busy 64-bit TSS (type 0xb), as TR's cached descriptor already is.
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let at = GDT + u64::from(selectors::TSS_BASE) + 16 * u64::from(id);
        ram.write_u64(at, low)?;
        ram.write_u64(at + 8, base >> 32)?;
    }
    Ok(())
}

/// The width of the VMM's IDT: 16-byte long-mode gates and 64-bit stubs (vmcall's own boot),
/// or 8-byte gates and 32-bit stubs (multiboot kernels start in 32-bit protected mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Width {
    Long,
    Protected,
}

/// The stub of vector `v`. #UD and #GP ring the hypercall-trap port and return (the host decides
/// whether a hypercall instruction raised it and, if so, moves the frame's RIP past it; #GP also
/// drops its error code first); every other exception reports its vector on the fault port and
/// halts, since the host ends the run. `out imm8, al` changes no register, so the host sees the
/// caller's registers untouched.
fn stub(vector: u8, width: Width) -> Vec<u8> {
    let trap = [0xe6, ports::PORT_HC_TRAP as u8]; // out imm8, al
    match (vector, width) {
        (UD_VECTOR, Width::Long) => [&trap[..], &[0x48, 0xcf]].concat(), // iretq
        (UD_VECTOR, Width::Protected) => [&trap[..], &[0xcf]].concat(),  // iretd
        // add rsp, 8; iretq / add esp, 4; iretd
        (GP_VECTOR, Width::Long) => [&trap[..], &[0x48, 0x83, 0xc4, 0x08, 0x48, 0xcf]].concat(),
        (GP_VECTOR, Width::Protected) => [&trap[..], &[0x83, 0xc4, 0x04, 0xcf]].concat(),
        // mov al, v; out imm8, al; 1: hlt; jmp 1b (the same bytes in both widths)
        _ => vec![0xb0, vector, 0xe6, ports::PORT_FAULT as u8, 0xf4, 0xeb, 0xfd],
    }
}

/// The IDTR of the VMM's IDT of `width`.
fn idtr(width: Width) -> DescriptorTable {
    let gate = match width {
        Width::Long => 16,
        Width::Protected => 8,
    };
    DescriptorTable { base: IDT, limit: gate * u16::from(EXCEPTION_VECTORS) - 1 }
}

/// Whether `idt` is the VMM's own IDT (of either width): exceptions then reach its stubs.
pub fn is_vmm_idt(idt: DescriptorTable) -> bool {
    idt == idtr(Width::Long) || idt == idtr(Width::Protected)
}

pub(crate) fn write_idt(ram: &GuestRam, width: Width) -> Result<(), OutOfBounds> {
    for v in 0..EXCEPTION_VECTORS {
        let handler = stub_gpa(v);
        ram.write(handler, &stub(v, width))?;
        let offset_bits = (handler & 0xffff) | (((handler >> 16) & 0xffff) << 48);
        match width {
            Width::Long => {
                // 64-bit interrupt gate, present, DPL 0, IST 1: every exception runs on the
                // per-vCPU exception stack, so the frame never lands in the interrupted code's
                // red zone.
                let low = offset_bits
                    | (u64::from(selectors::KERNEL_CS) << 16)
                    | (1 << 32)
                    | (0x8e << 40);
                ram.write_u64(IDT + 16 * u64::from(v), low)?;
                ram.write_u64(IDT + 16 * u64::from(v) + 8, handler >> 32)?;
            }
            Width::Protected => {
                // 32-bit interrupt gate, present, DPL 0, in the 32-bit kernel code segment.
                let gate = offset_bits | (u64::from(selectors::KERNEL_CS32) << 16) | (0x8e << 40);
                ram.write_u64(IDT + 8 * u64::from(v), gate)?;
            }
        }
    }
    Ok(())
}

/// Ports CPL 3 code may use (everything else in the I/O bitmap is denied).
const USER_PORTS: [core::ops::RangeInclusive<u16>; 3] = [
    ports::COM1..=ports::COM1_END,
    ports::PORT_EXIT..=ports::PORT_EXIT + 3,
    ports::PORT_DOORBELL..=ports::PORT_DOORBELL,
];

pub(crate) fn write_tss(ram: &GuestRam, vcpus: u32, width: Width) -> Result<(), OutOfBounds> {
    for id in 0..vcpus {
        let tss = tss_gpa(id);
        let ist_top = IST_STACKS + (u64::from(id) + 1) * IST_STACK_SIZE;
        match width {
            Width::Long => {
                ram.write_u64(tss + 4, ist_top)?; // RSP0
                ram.write_u64(tss + 36, ist_top)?; // IST1
            }
            Width::Protected => {
                ram.write(tss + 4, &(ist_top as u32).to_le_bytes())?; // ESP0
                ram.write(tss + 8, &u32::from(selectors::KERNEL_DS).to_le_bytes())?;
                // SS0
            }
        }
        let iomap = (IO_BITMAP - tss) as u16;
        ram.write(tss + 102, &iomap.to_le_bytes())?;
    }
    let mut bitmap = vec![0xffu8; 8192 + 1];
    for range in USER_PORTS {
        for port in range {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    ram.write(IO_BITMAP, &bitmap)
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;

/// Identity-map all RAM: 2 MiB pages, except the first 2 MiB in 4 KiB pages with page 0 absent.
fn write_page_tables(ram: &GuestRam) -> Result<(), OutOfBounds> {
    ram.write_u64(PML4, PDPT | PTE_FLAGS)?;
    let gib = ram.size().div_ceil(1 << 30);
    for g in 0..gib {
        ram.write_u64(PDPT + 8 * g, (PD + g * 0x1000) | PTE_FLAGS)?;
    }
    let large_pages = ram.size() / RAM_ALIGN;
    for i in 0..large_pages {
        let entry = if i == 0 { PT_LOW | PTE_FLAGS } else { (i * RAM_ALIGN) | PTE_FLAGS | PTE_PS };
        ram.write_u64(PD + 8 * i, entry)?;
    }
    for page in 1..512u64 {
        ram.write_u64(PT_LOW + 8 * page, (page << 12) | PTE_FLAGS)?;
    }
    Ok(())
}

pub(crate) fn flat(selector: u16, type_: u8, dpl: u8, l: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl,
        db: !l,
        s: true,
        l,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Each vCPU's special registers at its first instruction: 64-bit long mode with the VMM's
/// paging and IDT (vmcall's contract), or 32-bit protected mode with paging off (multiboot).
pub(crate) fn initial_sregs(id: u32, vcpus: u32, width: Width) -> SpecialRegs {
    let data = flat(selectors::KERNEL_DS, 0x3, 0, false);
    let long = width == Width::Long;
    let code = if long { selectors::KERNEL_CS } else { selectors::KERNEL_CS32 };
    SpecialRegs {
        cs: flat(code, 0xb, 0, long),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            base: tss_gpa(id),
            limit: tss_limit(id),
            selector: selectors::TSS_BASE + 16 * id as u16,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        ldt: Segment { type_: 0x2, present: true, unusable: true, ..Default::default() },
        gdt: DescriptorTable { base: GDT, limit: gdt_limit(vcpus) },
        idt: idtr(width),
        cr0: if long {
            CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        } else {
            CR0_PE | CR0_ET
        },
        cr2: 0,
        cr3: if long { PML4 } else { 0 },
        cr4: if long { CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT } else { 0 },
        efer: if long { EFER_LME | EFER_LMA } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::descriptors::code_segment;
    use crate::x86::{PagingContext, VirtualMemory};

    #[test]
    fn boot_structures_are_consistent() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let p = BootParams {
            entry: 0x20_0000,
            image_end: 0x20_1234,
            vcpus: 2,
            cmdline: b"hi",
            amd: false,
        };
        let inits = setup(&ram, &p).unwrap();
        assert_eq!(inits.len(), 2);
        assert_eq!(inits[1].regs.rsp, (8 << 20) - STACK_SIZE);
        assert_eq!(inits[1].regs.rdi, boot_info_gpa(1));
        let m = VirtualMemory::new(&ram, PagingContext::from_sregs(&inits[0].sregs));
        let cs = code_segment(&m, inits[0].sregs.gdt, selectors::KERNEL_CS).unwrap();
        assert!(cs.l && cs.present && cs.dpl == 0);
        let ucs32 = code_segment(&m, inits[0].sregs.gdt, selectors::USER_CS32).unwrap();
        assert!(!ucs32.l && ucs32.db && ucs32.dpl == 3);
        assert!(code_segment(&m, inits[0].sregs.gdt, 0).is_none());
        // Page 0 is absent, page 1 and the last 2 MiB page are mapped.
        assert_eq!(ram.read_u64(PT_LOW).unwrap() & PTE_P, 0);
        assert_eq!(ram.read_u64(PT_LOW + 8).unwrap(), 0x1000 | PTE_FLAGS);
        assert_eq!(ram.read_u64(PD + 8 * 3).unwrap(), (3 * RAM_ALIGN) | PTE_FLAGS | PTE_PS);
        // COM1 and the exit port are open to CPL 3, the UD-trap port is not.
        let mut b = [0u8; 1];
        ram.read(IO_BITMAP + u64::from(ports::COM1 / 8), &mut b).unwrap();
        assert_eq!(b[0], 0);
        ram.read(IO_BITMAP + u64::from(ports::PORT_HC_TRAP / 8), &mut b).unwrap();
        assert_ne!(b[0] & (1 << (ports::PORT_HC_TRAP % 8)), 0);
        let mut info = [0u8; 72];
        ram.read(boot_info_gpa(1), &mut info).unwrap();
        assert_eq!(&info[..8], b"VMCALLBI");
        assert_eq!(u32::from_le_bytes(info[12..16].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(info[56..64].try_into().unwrap()), 0x20_2000);
    }
}
