//! The ELF loader: a static ELF64 x86-64 executable, each PT_LOAD copied to its p_paddr.
//!
//! Everything about the file is checked before a byte is copied, so a malformed or hostile ELF
//! gets a precise error and never a partial load.

use object::elf::{
    FileHeader32, FileHeader64, ELFCLASS32, ELFCLASS64, EM_386, EM_X86_64, ET_EXEC, PF_X, PT_LOAD,
    SHT_SYMTAB, STT_FUNC,
};
use object::read::elf::{FileHeader, ProgramHeader, Sym};
use object::LittleEndian as LE;

use crate::memory::GuestRam;

/// Why a guest image was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file (bad magic)")]
    /// No ELF magic.
    NotElf,
    #[error("not a 64-bit little-endian ELF")]
    /// Not ELF64 little-endian (vmcall's ELF64 contract).
    NotElf64,
    #[error("not a little-endian ELF32 or ELF64 file")]
    /// Neither a little-endian ELF32 nor ELF64 (multiboot).
    NotElfX86,
    #[error("ELF machine is {0:#x}, not x86 (0x3e for ELF64, 0x3 for ELF32)")]
    /// Built for another machine (`e_machine`).
    WrongMachine(u16),
    #[error("ELF type is {0}, not a static executable (ET_EXEC = 2); build without -pie")]
    /// Not a static executable (`e_type`).
    NotExecutable(u16),
    #[error("malformed ELF: {0}")]
    /// Headers that cannot be read; says which.
    Malformed(&'static str),
    #[error("ELF has no PT_LOAD segment")]
    /// Nothing to load.
    NoSegments,
    #[error("segment {index} has file size {filesz:#x} larger than its memory size {memsz:#x}")]
    /// A segment's file size exceeds its memory size.
    FileLargerThanMemory {
        /// The segment's index among the program headers.
        index: usize,
        /// Its file size.
        filesz: u64,
        /// Its memory size.
        memsz: u64,
    },
    #[error("segment {index} ({paddr:#x}+{memsz:#x}) is outside the guest's load area {min:#x}..{max:#x}; link it at or above {min:#x} or give the VM more memory")]
    /// A segment outside the area the guest may load into.
    OutsideRam {
        /// The segment's index among the program headers.
        index: usize,
        /// Where it loads.
        paddr: u64,
        /// Its memory size.
        memsz: u64,
        /// The load area's start.
        min: u64,
        /// The load area's end.
        max: u64,
    },
    #[error("segments {a} and {b} overlap")]
    /// Two segments overlap.
    Overlap {
        /// One segment's index.
        a: usize,
        /// The other's.
        b: usize,
    },
    #[error("entry point {0:#x} is not inside an executable segment")]
    /// The entry point is outside every executable segment.
    BadEntry(u64),
}

/// One loaded segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where it loads in guest-physical memory.
    pub paddr: u64,
    /// Where the guest's code sees it once the guest maps it (p_vaddr; = `paddr` for images
    /// that run on vmcall's identity mapping, different for higher-half kernels).
    pub vaddr: u64,
    pub memsz: u64,
    pub filesz: u64,
    pub offset: u64,
    pub executable: bool,
}

/// A validated guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    /// Guest-physical address of the entry point.
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// Where code is known to start: the entry point and every function symbol inside an
    /// executable segment (for a decoder that must not mistake data for code).
    pub code_roots: Vec<CodeRoot>,
    /// 32 for an ELF32 image, 64 for ELF64.
    pub bits: u32,
}

/// A virtual address known to start code, and the width of the code there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeRoot {
    pub vaddr: u64,
    /// 16, 32 or 64: how to decode the instructions from here.
    pub bits: u32,
}

/// Which ELF files a boot protocol accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfKinds {
    /// vmcall's own contract: ELF64 x86-64 only.
    Elf64Only,
    /// Multiboot: ELF32 i386 or ELF64 x86-64.
    Elf32Or64,
}

impl ElfImage {
    /// Parse and validate `data`, an ELF64 x86-64 executable, for a load area of
    /// `load_min..load_max`.
    pub fn parse(data: &[u8], load_min: u64, load_max: u64) -> Result<Self, ElfError> {
        Self::parse_kinds(data, load_min, load_max, ElfKinds::Elf64Only)
    }

    /// Parse and validate `data`, an executable of one of `kinds`, for a load area of
    /// `load_min..load_max`.
    pub fn parse_kinds(
        data: &[u8],
        load_min: u64,
        load_max: u64,
        kinds: ElfKinds,
    ) -> Result<Self, ElfError> {
        if data.len() < 4 || data[..4] != *b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        let little = data.len() >= 6 && data[5] == object::elf::ELFDATA2LSB;
        match (data.get(4).copied(), kinds) {
            (Some(ELFCLASS64), _) if little => {
                let hdr =
                    FileHeader64::<LE>::parse(data).map_err(|_| ElfError::Malformed("header"))?;
                parse_header(hdr, data, EM_X86_64, load_min, load_max)
            }
            (Some(ELFCLASS32), ElfKinds::Elf32Or64) if little => {
                let hdr =
                    FileHeader32::<LE>::parse(data).map_err(|_| ElfError::Malformed("header"))?;
                parse_header(hdr, data, EM_386, load_min, load_max)
            }
            (_, ElfKinds::Elf64Only) => Err(ElfError::NotElf64),
            _ => Err(ElfError::NotElfX86),
        }
    }

    /// Copy the segments into `ram` (zero-filling each segment's tail).
    pub fn load(&self, data: &[u8], ram: &GuestRam) -> Result<(), crate::memory::OutOfBounds> {
        for s in &self.segments {
            let bytes = &data[s.offset as usize..(s.offset + s.filesz) as usize];
            ram.write(s.paddr, bytes)?;
            ram.zero(s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
        Ok(())
    }

    /// First byte after the highest segment.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0)
    }
}

/// Check and read an ELF file's header, segments and symbols (either class).
fn parse_header<H: FileHeader<Endian = LE>>(
    hdr: &H,
    data: &[u8],
    machine: u16,
    load_min: u64,
    load_max: u64,
) -> Result<ElfImage, ElfError> {
    let e = LE;
    if hdr.e_machine(e) != machine {
        return Err(ElfError::WrongMachine(hdr.e_machine(e)));
    }
    if hdr.e_type(e) != ET_EXEC {
        return Err(ElfError::NotExecutable(hdr.e_type(e)));
    }
    let phdrs = hdr.program_headers(e, data).map_err(|_| ElfError::Malformed("program headers"))?;
    let mut segments = Vec::new();
    for (index, ph) in phdrs.iter().filter(|ph| ph.p_type(e) == PT_LOAD).enumerate() {
        let seg = Segment {
            paddr: ph.p_paddr(e).into(),
            vaddr: ph.p_vaddr(e).into(),
            memsz: ph.p_memsz(e).into(),
            filesz: ph.p_filesz(e).into(),
            offset: ph.p_offset(e).into(),
            executable: ph.p_flags(e) & PF_X != 0,
        };
        if seg.filesz > seg.memsz {
            return Err(ElfError::FileLargerThanMemory {
                index,
                filesz: seg.filesz,
                memsz: seg.memsz,
            });
        }
        match seg.offset.checked_add(seg.filesz) {
            Some(end) if end <= data.len() as u64 => {}
            _ => return Err(ElfError::Malformed("segment data past end of file")),
        }
        if seg.memsz == 0 {
            // Loads nothing (linkers emit these for empty output sections): no place to check.
            continue;
        }
        let fits = seg.paddr >= load_min
            && seg.paddr.checked_add(seg.memsz).is_some_and(|end| end <= load_max);
        if !fits {
            return Err(ElfError::OutsideRam {
                index,
                paddr: seg.paddr,
                memsz: seg.memsz,
                min: load_min,
                max: load_max,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    for (a, sa) in segments.iter().enumerate() {
        for (b, sb) in segments.iter().enumerate().skip(a + 1) {
            if sa.paddr < sb.paddr + sb.memsz && sb.paddr < sa.paddr + sa.memsz {
                return Err(ElfError::Overlap { a, b });
            }
        }
    }
    let entry_vaddr: u64 = hdr.e_entry(e).into();
    // e_entry is a virtual address; vCPUs start with paging off or on identity paging, so
    // start at its physical twin (the same address unless the segment is linked elsewhere).
    let entry = segments
        .iter()
        .filter(|s| s.executable)
        .find_map(|s| {
            let off = entry_vaddr.checked_sub(s.vaddr).filter(|off| *off < s.memsz)?;
            Some(s.paddr + off)
        })
        .ok_or(ElfError::BadEntry(entry_vaddr))?;
    let bits = if machine == EM_386 { 32 } else { 64 };
    let mut code_roots = vec![CodeRoot { vaddr: entry_vaddr, bits }];
    code_roots.extend(
        function_symbols(hdr, data)
            .into_iter()
            .filter(|va| {
                segments.iter().any(|s| s.executable && va.wrapping_sub(s.vaddr) < s.memsz)
            })
            .map(|vaddr| CodeRoot { vaddr, bits }),
    );
    code_roots.sort_unstable_by_key(|r| r.vaddr);
    code_roots.dedup_by_key(|r| r.vaddr);
    Ok(ElfImage { entry, segments, code_roots, bits })
}

/// Values of the STT_FUNC symbols in the image's symbol table (none if it is stripped or
/// malformed: symbols only ever add decoding roots).
fn function_symbols<H: FileHeader<Endian = LE>>(hdr: &H, data: &[u8]) -> Vec<u64> {
    let Ok(sections) = hdr.sections(LE, data) else { return Vec::new() };
    let Ok(symbols) = sections.symbols(LE, data, SHT_SYMTAB) else { return Vec::new() };
    symbols
        .symbols()
        .iter()
        .filter(|sym| sym.st_type() == STT_FUNC && sym.st_value(LE).into() != 0)
        .map(|sym| sym.st_value(LE).into())
        .collect()
}

/// A minimal static ELF64 x86-64 executable: one RWX PT_LOAD of `code` at `paddr`, entry at
/// its first byte. For probes and tests that need a guest without a toolchain.
pub fn minimal_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    tiny_elf(paddr, code, EM_X86_64, ET_EXEC)
}

fn tiny_elf(paddr: u64, code: &[u8], machine: u16, etype: u16) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&etype.to_le_bytes());
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&(PF_X | 6).to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_good_image_and_loads_it() {
        let elf = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        let img = ElfImage::parse(&elf, 0x10_0000, 0x40_0000).unwrap();
        assert_eq!(img.entry, 0x20_0000);
        let ram = GuestRam::new(4 << 20).unwrap();
        img.load(&elf, &ram).unwrap();
        let mut b = [0u8; 1];
        ram.read(0x20_0000, &mut b).unwrap();
        assert_eq!(b, [0xf4]);
    }

    #[test]
    fn parses_images_at_any_alignment() {
        let elf = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        for shift in 0..8 {
            let mut buf = vec![0u8; shift];
            buf.extend_from_slice(&elf);
            let img = ElfImage::parse(&buf[shift..], 0x10_0000, 0x40_0000);
            assert_eq!(img.map(|i| i.entry), Ok(0x20_0000), "offset {shift}");
        }
    }

    #[test]
    fn refuses_bad_images() {
        let p = |d: &[u8]| ElfImage::parse(d, 0x10_0000, 0x40_0000);
        assert_eq!(p(b"hello"), Err(ElfError::NotElf));
        assert_eq!(p(&tiny_elf(0x20_0000, &[0xf4], 3, ET_EXEC)), Err(ElfError::WrongMachine(3)));
        assert_eq!(p(&tiny_elf(0x20_0000, &[0xf4], EM_X86_64, 3)), Err(ElfError::NotExecutable(3)));
        assert!(matches!(
            p(&tiny_elf(0x1000, &[0xf4], EM_X86_64, ET_EXEC)),
            Err(ElfError::OutsideRam { .. })
        ));
        assert!(matches!(
            p(&tiny_elf(0x3f_ffff, &[0xf4, 0xf4], EM_X86_64, ET_EXEC)),
            Err(ElfError::OutsideRam { .. })
        ));
        let mut truncated = tiny_elf(0x20_0000, &[0xf4; 16], EM_X86_64, ET_EXEC);
        truncated.truncate(125);
        assert_eq!(p(&truncated), Err(ElfError::Malformed("segment data past end of file")));
        let mut elf32 = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        elf32[4] = 1;
        assert_eq!(p(&elf32), Err(ElfError::NotElf64));
        let mut wild = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        wild[64 + 16..64 + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        wild[64 + 24..64 + 32].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(
            matches!(p(&wild), Err(ElfError::OutsideRam { .. })),
            "paddr overflow must be refused"
        );
        let mut bad_entry = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        bad_entry[24..32].copy_from_slice(&0x30_0000u64.to_le_bytes());
        assert_eq!(p(&bad_entry), Err(ElfError::BadEntry(0x30_0000)));
    }

    #[test]
    fn higher_half_entries_and_empty_segments() {
        let high = 0xffff_ffff_8020_0000u64;
        let mut f = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        f[24..32].copy_from_slice(&high.to_le_bytes()); // e_entry
        f[64 + 16..64 + 24].copy_from_slice(&high.to_le_bytes()); // p_vaddr
        let img = ElfImage::parse(&f, 0x10_0000, 0x40_0000).unwrap();
        assert_eq!(img.entry, 0x20_0000, "vCPUs start at the entry's physical twin");
        assert_eq!((img.segments[0].paddr, img.segments[0].vaddr), (0x20_0000, high));
        // A second PT_LOAD with nothing in it at address 0, as link.ld gives a program
        // without data: it loads nothing and is not refused.
        let mut two = tiny_elf(0x20_0000, &[0xf4], EM_X86_64, ET_EXEC);
        let phoff = two.len() as u64;
        let first = two[64..120].to_vec();
        two.extend_from_slice(&first);
        let mut empty = vec![0u8; 56];
        empty[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        empty[4..8].copy_from_slice(&4u32.to_le_bytes());
        two.extend_from_slice(&empty);
        two[32..40].copy_from_slice(&phoff.to_le_bytes());
        two[56..58].copy_from_slice(&2u16.to_le_bytes());
        let img = ElfImage::parse(&two, 0x10_0000, 0x40_0000).unwrap();
        assert_eq!(img.segments.len(), 1);
        assert_eq!(img.end(), 0x20_0001);
    }
}
