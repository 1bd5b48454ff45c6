//! Names for guest addresses, from the image's ELF symbol table: what fault reports print
//! next to a RIP (`bad::main+0x1a`). Rust names are demangled; a stripped image, or one that is
//! not an ELF, simply has none.

use object::elf::{
    FileHeader32, FileHeader64, ELFCLASS32, ELFCLASS64, SHT_SYMTAB, STT_FUNC, STT_NOTYPE,
};
use object::read::elf::{FileHeader, Sym};
use object::LittleEndian as LE;

/// The code symbols of an image, sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Symbols {
    /// (address, size, demangled name).
    syms: Vec<(u64, u64, String)>,
}

impl Symbols {
    /// The function (and untyped code label) symbols of `image`, an ELF32 or ELF64 file; none
    /// for anything else, or a stripped or malformed file.
    pub fn parse(image: &[u8]) -> Self {
        let little = image.len() >= 6 && image[5] == object::elf::ELFDATA2LSB;
        let mut syms = match image.get(4).copied() {
            Some(ELFCLASS64) if little => {
                FileHeader64::<LE>::parse(image).map(|h| collect(h, image)).unwrap_or_default()
            }
            Some(ELFCLASS32) if little => {
                FileHeader32::<LE>::parse(image).map(|h| collect(h, image)).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        // Several names for one address (aliases): keep the sized one, then the first.
        syms.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        syms.dedup_by_key(|s| s.0);
        Symbols { syms }
    }

    /// How many symbols there are.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The symbol `addr` is in, and the offset into it: the nearest symbol at or below `addr`
    /// that covers it (one of unknown size covers everything up to the next symbol).
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.syms.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (start, size, name) = &self.syms[i];
        let off = addr - start;
        (*size == 0 || off < *size).then_some((name.as_str(), off))
    }

    /// `name+0x1a` for `addr`, if a symbol covers it.
    pub fn describe(&self, addr: u64) -> Option<String> {
        self.lookup(addr).map(|(name, off)| format!("{name}+{off:#x}"))
    }
}

fn collect<H: FileHeader<Endian = LE>>(hdr: &H, data: &[u8]) -> Vec<(u64, u64, String)> {
    let Ok(sections) = hdr.sections(LE, data) else { return Vec::new() };
    let Ok(table) = sections.symbols(LE, data, SHT_SYMTAB) else { return Vec::new() };
    table
        .symbols()
        .iter()
        .filter(|s| matches!(s.st_type(), STT_FUNC | STT_NOTYPE) && s.st_shndx(LE) != 0)
        .filter_map(|s| {
            let addr: u64 = s.st_value(LE).into();
            let raw = s.name(LE, table.strings()).ok()?;
            let raw = std::str::from_utf8(raw).ok()?;
            if addr == 0 || raw.is_empty() || raw.starts_with('$') || raw.starts_with(".L") {
                return None;
            }
            let name = match rustc_demangle::try_demangle(raw) {
                Ok(d) => format!("{d:#}"),
                Err(_) => raw.to_string(),
            };
            Some((addr, s.st_size(LE).into(), name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_a_symbol_table_have_none() {
        assert!(Symbols::parse(b"").is_empty());
        assert!(Symbols::parse(b"\x7fELF\x02\x01garbage").is_empty());
        assert!(Symbols::parse(&crate::boot::elf::minimal_elf(0x20_0000, &[0xf4])).is_empty());
    }

    #[test]
    fn lookup_takes_the_covering_symbol() {
        let s = Symbols {
            syms: vec![
                (0x1000, 0x10, "a".into()),
                (0x1010, 0, "b".into()),
                (0x2000, 4, "c".into()),
            ],
        };
        assert_eq!(s.lookup(0xfff), None);
        assert_eq!(s.lookup(0x1000), Some(("a", 0)));
        assert_eq!(s.describe(0x100f).as_deref(), Some("a+0xf"));
        assert_eq!(s.lookup(0x1fff), Some(("b", 0xfef)), "unknown size: up to the next one");
        assert_eq!(s.lookup(0x2004), None, "past c's end");
    }
}
