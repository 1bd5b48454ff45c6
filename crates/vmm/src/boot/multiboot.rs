//! Multiboot (version 1): the boot protocol of the test kernels people run with QEMU's
//! `-kernel`. The header in the image's first 8 KiB, the image (ELF32, ELF64, or raw with the
//! header's load addresses), and the information structure the kernel finds through EBX.

use vmcall_abi::layout::{CMDLINE, CMDLINE_MAX, IDT_STUBS, STACK_SIZE};

use super::elf::{CodeRoot, ElfError, ElfImage, ElfKinds, Segment};
use super::{initial_sregs, write_gdt, write_idt, write_tss, VcpuInit, Width};
use crate::memory::{GuestRam, OutOfBounds};
use crate::x86::Regs;

/// The header's magic number.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
const SEARCH_LEN: usize = 8192;

/// Header flags a kernel may require (bits 0–15): page-aligned modules, memory information,
/// video mode. vmcall loads no modules and provides memory information; a video-mode request
/// is one a loader may decline ("no framebuffer"), as QEMU does.
const KNOWN_REQUIRED: u32 = 0b111;
/// Flag bit 16: the load addresses in the header are valid (the "a.out kludge").
const AOUT_KLUDGE: u32 = 1 << 16;

/// Where vmcall puts the information structure and what it points to (inside the VMM's area
/// below 1 MiB, which the memory map reports as reserved).
pub const INFO: u64 = 0x4000;
const MMAP: u64 = 0x4100;
const LOADER_NAME: u64 = 0x4200;

/// Why a multiboot image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultibootError {
    #[error("no multiboot header in the image's first 8 KiB (--boot multiboot)")]
    /// No header where multiboot requires one.
    NoHeader,
    #[error("multiboot header at offset {0:#x} has a bad checksum (--boot elf64 ignores it)")]
    /// A header whose checksum is wrong (at this offset).
    Checksum(usize),
    #[error("multiboot header requires features vmcall does not provide (flags {0:#x})")]
    /// Required features vmcall lacks (the header's flags).
    Unsupported(u32),
    #[error("multiboot header is truncated")]
    /// The header runs past the image's end.
    Truncated,
    #[error("multiboot load addresses are inconsistent: {0}")]
    /// The header's load addresses contradict each other; says how.
    BadAddresses(&'static str),
    #[error("multiboot image")]
    /// The kernel's ELF image was refused.
    Elf(#[from] ElfError),
    #[error("{0} bytes of command line do not fit in {CMDLINE_MAX}")]
    /// The command line is too long.
    CmdlineTooLong(usize),
    #[error("guest RAM too small for the multiboot information")]
    /// The multiboot information does not fit in guest RAM.
    Memory(#[from] OutOfBounds),
}

/// The parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: usize,
    pub flags: u32,
    /// header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr (valid with bit 16).
    pub addresses: Option<[u32; 5]>,
}

/// The multiboot header of `image`: `None` if it has none, an error if it has a broken one.
pub fn find_header(image: &[u8]) -> Option<Result<Header, MultibootError>> {
    let word = |at: usize| {
        image.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let offset =
        (0..image.len().min(SEARCH_LEN)).step_by(4).find(|&at| word(at) == Some(HEADER_MAGIC))?;
    Some((|| {
        let (Some(flags), Some(checksum)) = (word(offset + 4), word(offset + 8)) else {
            return Err(MultibootError::Truncated);
        };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return Err(MultibootError::Checksum(offset));
        }
        if flags & 0xffff & !KNOWN_REQUIRED != 0 {
            return Err(MultibootError::Unsupported(flags));
        }
        let addresses = if flags & AOUT_KLUDGE != 0 {
            let mut a = [0u32; 5];
            for (i, slot) in a.iter_mut().enumerate() {
                *slot = word(offset + 12 + 4 * i).ok_or(MultibootError::Truncated)?;
            }
            Some(a)
        } else {
            None
        };
        Ok(Header { offset, flags, addresses })
    })())
}

/// Lay out `image` as the header says: by its load addresses (bit 16), or as an ELF32/ELF64
/// executable. The entry point is reached in 32-bit protected mode, whatever the ELF class.
pub fn parse_image(
    image: &[u8],
    header: &Header,
    load_min: u64,
    load_max: u64,
) -> Result<ElfImage, MultibootError> {
    let Some([header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr]) = header.addresses
    else {
        let mut elf = ElfImage::parse_kinds(image, load_min, load_max, ElfKinds::Elf32Or64)?;
        // The entry is 32-bit code even in an ELF64 kernel (it switches to long mode itself).
        if let Some(root) = elf.code_roots.iter_mut().find(|r| r.vaddr == entry_vaddr(image)) {
            root.bits = 32;
        }
        return Ok(elf);
    };
    let bad = |why| MultibootError::BadAddresses(why);
    let (header_addr, load_addr) = (u64::from(header_addr), u64::from(load_addr));
    // The file offset that loads at load_addr.
    let start = (header.offset as u64)
        .checked_sub(header_addr.checked_sub(load_addr).ok_or(bad("header_addr < load_addr"))?)
        .ok_or(bad("load_addr lies before the file's start"))?;
    let file_end = image.len() as u64;
    let load_end =
        if load_end_addr == 0 { load_addr + (file_end - start) } else { u64::from(load_end_addr) };
    let filesz = load_end.checked_sub(load_addr).ok_or(bad("load_end_addr < load_addr"))?;
    if start + filesz > file_end {
        return Err(bad("load_end_addr lies past the file's end"));
    }
    let memsz = if bss_end_addr == 0 {
        filesz
    } else {
        u64::from(bss_end_addr).checked_sub(load_addr).ok_or(bad("bss_end_addr < load_addr"))?
    };
    if memsz < filesz {
        return Err(bad("bss_end_addr < load_end_addr"));
    }
    let entry = u64::from(entry_addr);
    if !(load_addr..load_addr + memsz).contains(&entry) {
        return Err(bad("entry_addr is outside the loaded image"));
    }
    if load_addr < load_min || load_addr + memsz > load_max {
        return Err(MultibootError::Elf(ElfError::OutsideRam {
            index: 0,
            paddr: load_addr,
            memsz,
            min: load_min,
            max: load_max,
        }));
    }
    let segment = Segment {
        paddr: load_addr,
        vaddr: load_addr,
        memsz,
        filesz,
        offset: start,
        executable: true,
    };
    Ok(ElfImage {
        entry,
        segments: vec![segment],
        code_roots: vec![CodeRoot { vaddr: entry, bits: 32 }],
        bits: 32,
    })
}

/// e_entry of an ELF file of either class (0 for anything else).
fn entry_vaddr(image: &[u8]) -> u64 {
    let field = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(image.get(at..at + n).unwrap_or(&[0; 8][..n]));
        u64::from_le_bytes(b)
    };
    match image.get(4) {
        Some(1) => field(24, 4),
        Some(2) => field(24, 8),
        _ => 0,
    }
}

/// One memory-map entry type: usable RAM.
const AVAILABLE: u32 = 1;
/// One memory-map entry type: not for the kernel's use.
const RESERVED: u32 = 2;

/// The memory map of a guest with `ram_size` bytes: the VMM's structures in the first 64 KiB
/// and the legacy holes reserved, the rest of conventional memory and all RAM above 1 MiB
/// available.
pub fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x1_0000, RESERVED),
        (0x1_0000, 0x9_fc00 - 0x1_0000, AVAILABLE),
        (0x9_fc00, 0x400, RESERVED),
        (0xf_0000, 0x1_0000, RESERVED),
        (0x10_0000, ram_size - 0x10_0000, AVAILABLE),
    ]
}

/// Write the information structure at [`INFO`] (with the memory map, the boot loader's name
/// and the command line QEMU gives for `-kernel NAME -append ARGS`: "NAME ARGS") and return
/// its address, for EBX.
pub fn write_info(ram: &GuestRam, image_name: &str, args: &[u8]) -> Result<u64, MultibootError> {
    let mut cmdline = image_name.as_bytes().to_vec();
    if !args.is_empty() {
        cmdline.push(b' ');
        cmdline.extend_from_slice(args);
    }
    cmdline.push(0);
    if cmdline.len() as u64 > CMDLINE_MAX {
        return Err(MultibootError::CmdlineTooLong(cmdline.len()));
    }
    ram.write(CMDLINE, &cmdline)?;
    let name = concat!("vmcall ", env!("CARGO_PKG_VERSION"), "\0");
    ram.write(LOADER_NAME, name.as_bytes())?;
    let map = memory_map(ram.size());
    for (i, (base, len, kind)) in map.iter().enumerate() {
        let at = MMAP + 24 * i as u64;
        ram.write(at, &20u32.to_le_bytes())?;
        ram.write_u64(at + 4, *base)?;
        ram.write_u64(at + 12, *len)?;
        ram.write(at + 20, &kind.to_le_bytes())?;
    }
    // flags: mem_* (0), cmdline (2), mods (3, none), mmap (6), boot_loader_name (9).
    let flags: u32 = 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9;
    let upper_kib = (ram.size().min(0xffff_ffff) - 0x10_0000) / 1024;
    let fields: [(u64, u32); 9] = [
        (0, flags),
        (4, 639),
        (8, upper_kib as u32),
        (16, CMDLINE as u32),
        (20, 0),
        (24, 0),
        (44, 24 * map.len() as u32),
        (48, MMAP as u32),
        (64, LOADER_NAME as u32),
    ];
    for (off, v) in fields {
        ram.write(INFO + off, &v.to_le_bytes())?;
    }
    Ok(INFO)
}

/// Where application processors wait: `1: hlt; jmp 1b`, after the exception stubs.
const PARK: u64 = IDT_STUBS + 0x200;

/// Write the VMM's structures for a multiboot kernel (a GDT, a 32-bit IDT whose #UD/#GP stubs
/// catch hypercalls until the kernel loads its own, TSSes) and return each vCPU's state at
/// its first instruction: vCPU 0 at `entry` in 32-bit protected mode with paging off,
/// EAX = [`BOOTLOADER_MAGIC`], EBX = `info`, flat segments, interrupts off; the others parked
/// in `hlt` (vmcall has no INIT/SIPI yet: a multiboot kernel starts on one CPU). ESP points at
/// the top of the vCPU's stack area although the specification leaves it undefined.
pub fn setup(
    ram: &GuestRam,
    vcpus: u32,
    entry: u64,
    info: u64,
) -> Result<Vec<VcpuInit>, OutOfBounds> {
    write_gdt(ram, vcpus)?;
    write_idt(ram, Width::Protected)?;
    write_tss(ram, vcpus, Width::Protected)?;
    ram.write(PARK, &[0xf4, 0xeb, 0xfd])?;
    Ok((0..vcpus)
        .map(|id| {
            let regs = Regs {
                rip: if id == 0 { entry } else { PARK },
                rax: u64::from(BOOTLOADER_MAGIC),
                rbx: info,
                rsp: ram.size() - u64::from(id) * STACK_SIZE,
                rflags: 0x2,
                ..Default::default()
            };
            VcpuInit { regs, sregs: initial_sregs(id, vcpus, Width::Protected) }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, extra: &[u32]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        let words = [&[HEADER_MAGIC, flags, checksum][..], extra].concat();
        for (i, w) in words.iter().enumerate() {
            h[16 + 4 * i..20 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        h
    }

    #[test]
    fn headers_are_found_checked_and_refused_clearly() {
        assert_eq!(find_header(&[0u8; 100]), None);
        let h = find_header(&header(3, &[])).unwrap().unwrap();
        assert_eq!((h.offset, h.flags, h.addresses), (16, 3, None));
        let mut bad = header(3, &[]);
        bad[24] ^= 1;
        assert_eq!(find_header(&bad), Some(Err(MultibootError::Checksum(16))));
        assert_eq!(find_header(&header(1 << 4, &[])), Some(Err(MultibootError::Unsupported(16))));
        let mut far = vec![0u8; 9000];
        far[8192..8196].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        assert_eq!(find_header(&far), None, "only the first 8 KiB count");
    }

    #[test]
    fn raw_images_load_by_the_header_addresses() {
        // Header at file offset 16 says it lives at 0x100010: the file loads at 0x100000.
        let mut img = header(AOUT_KLUDGE, &[0x10_0010, 0x10_0000, 0, 0x10_2000, 0x10_0040]);
        img.resize(0x80, 0x90);
        let h = find_header(&img).unwrap().unwrap();
        let e = parse_image(&img, &h, 0x10_0000, 0x200_0000).unwrap();
        assert_eq!(e.entry, 0x10_0040);
        assert_eq!(
            (e.segments[0].paddr, e.segments[0].filesz, e.segments[0].memsz, e.segments[0].offset),
            (0x10_0000, 0x80, 0x2000, 0)
        );
        let img = header(AOUT_KLUDGE, &[0x10_0010, 0x10_0000, 0, 0, 0x20_0000]);
        let h = find_header(&img).unwrap().unwrap();
        assert!(matches!(
            parse_image(&img, &h, 0x10_0000, 0x200_0000),
            Err(MultibootError::BadAddresses(_))
        ));
    }

    #[test]
    fn the_information_structure_says_what_qemu_says() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert_eq!(write_info(&ram, "kernel.elf", b"a b").unwrap(), INFO);
        let u32_at = |at: u64| {
            let mut b = [0u8; 4];
            ram.read(at, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        assert_eq!(u32_at(INFO) & 0x24d, 0x24d);
        assert_eq!((u32_at(INFO + 4), u32_at(INFO + 8)), (639, (31 << 20) / 1024));
        let mut cmd = [0u8; 15];
        ram.read(u64::from(u32_at(INFO + 16)), &mut cmd).unwrap();
        assert_eq!(&cmd, b"kernel.elf a b\0");
        let (len, addr) = (u32_at(INFO + 44), u64::from(u32_at(INFO + 48)));
        assert_eq!(len, 5 * 24);
        // Last entry: RAM above 1 MiB, available.
        assert_eq!(ram.read_u64(addr + 4 * 24 + 4).unwrap(), 0x10_0000);
        assert_eq!(ram.read_u64(addr + 4 * 24 + 12).unwrap(), (32 << 20) - 0x10_0000);
        assert_eq!(u32_at(addr + 4 * 24 + 20), AVAILABLE);
        assert!(write_info(&ram, "k", &[b'x'; 5000]).is_err());
    }
}
