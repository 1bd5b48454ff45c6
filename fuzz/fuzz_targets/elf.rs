//! The ELF loader on any file a user could hand `vmcall run`: `ElfImage::parse` either refuses
//! it or returns segments that lie inside the load area without overlapping and an entry point
//! inside an executable segment; such an image then loads and boots (`prepare_guest`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcall_abi::layout::GUEST_LOAD_MIN;
use vmcall_vmm::boot::elf::ElfImage;
use vmcall_vmm::boot::load_limit;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::vm::{prepare_guest, Boot, BootOptions};

const RAM: u64 = 4 << 20;

/// vmcall's own ELF64 contract, whatever the bytes look like (a multiboot header in random
/// data would otherwise pick the other protocol).
fn elf64() -> BootOptions {
    BootOptions { boot: Boot::Elf64, ..Default::default() }
}

fuzz_target!(|data: &[u8]| {
    let limit = load_limit(RAM, 1);
    let Ok(img) = ElfImage::parse(data, GUEST_LOAD_MIN, limit) else {
        assert!(
            prepare_guest(data, RAM, 1, b"", &elf64()).is_err(),
            "prepare_guest took a refused image"
        );
        return;
    };
    for (i, s) in img.segments.iter().enumerate() {
        assert!(s.memsz > 0 && s.filesz <= s.memsz, "segment {i}: {s:?}");
        assert!(s.paddr >= GUEST_LOAD_MIN && s.paddr + s.memsz <= limit, "segment {i}: {s:?}");
        assert!(s.offset + s.filesz <= data.len() as u64, "segment {i}: {s:?}");
        for t in &img.segments[i + 1..] {
            assert!(s.paddr + s.memsz <= t.paddr || t.paddr + t.memsz <= s.paddr, "overlap");
        }
    }
    assert!(
        img.segments
            .iter()
            .any(|s| s.executable && (s.paddr..s.paddr + s.memsz).contains(&img.entry)),
        "entry {:#x} outside every executable segment",
        img.entry
    );
    assert!(
        img.code_roots.windows(2).all(|w| w[0].vaddr < w[1].vaddr),
        "code roots sorted and unique"
    );
    // One RAM for every input: a load writes every byte it is later checked against.
    static LOAD_RAM: std::sync::OnceLock<GuestRam> = std::sync::OnceLock::new();
    let ram = LOAD_RAM.get_or_init(|| GuestRam::new(RAM).expect("map guest RAM"));
    img.load(data, ram).expect("a validated image loads");
    for s in &img.segments {
        let mut got = vec![0u8; s.memsz.min(4096) as usize];
        ram.read(s.paddr, &mut got).expect("inside RAM");
        let file = &data[s.offset as usize..(s.offset + s.filesz) as usize];
        for (k, b) in got.iter().enumerate() {
            assert_eq!(
                *b,
                file.get(k).copied().unwrap_or(0),
                "byte {k} of segment at {:#x}",
                s.paddr
            );
        }
    }
    let prepared = prepare_guest(data, RAM, 1, b"fuzz", &elf64()).expect("a validated image boots");
    assert_eq!(prepared.guest.entry, img.entry);
});
