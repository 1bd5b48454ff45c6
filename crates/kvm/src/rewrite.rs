//! Finding hypercall sites with a real x86 decoder and rewriting them into a port doorbell.
//!
//! A site `VMCALL`/`VMMCALL` (3 bytes) becomes `out PORT_DOORBELL, al; nop` (3 bytes): `out imm8,
//! al` changes no register, KVM exits to user space with RIP just after it, and the `nop` makes
//! the resumed instruction stream end exactly where the original instruction did.

use std::collections::HashMap;

use iced_x86::{Code, Decoder, DecoderOptions};
use vmcall_abi::ports::PORT_DOORBELL;
use vmcall_vmm::boot::elf::Segment;
use vmcall_vmm::hypercall::HypercallInsn;
use vmcall_vmm::memory::{GuestRam, OutOfBounds};

/// The bytes written over a site.
pub const DOORBELL_SITE: [u8; 3] = [0xe6, PORT_DOORBELL as u8, 0x90];
/// Length of `out imm8, al`: RIP at the doorbell exit is site + this.
pub const DOORBELL_OUT_LEN: u64 = 2;

/// Hypercall instructions found in `code`, which is loaded at `base`.
pub fn find_sites(code: &[u8], base: u64) -> Vec<(u64, HypercallInsn)> {
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut sites = Vec::new();
    for insn in &mut decoder {
        match insn.code() {
            Code::Vmcall => sites.push((insn.ip(), HypercallInsn::Vmcall)),
            Code::Vmmcall => sites.push((insn.ip(), HypercallInsn::Vmmcall)),
            _ => {}
        }
    }
    sites
}

/// Every hypercall site in the executable segments loaded in `ram`, by address.
pub fn scan_segments(
    ram: &GuestRam,
    segments: &[Segment],
) -> Result<Vec<(u64, HypercallInsn)>, OutOfBounds> {
    let mut all = Vec::new();
    for seg in segments.iter().filter(|s| s.executable) {
        let mut code = vec![0u8; seg.filesz as usize];
        ram.read(seg.paddr, &mut code)?;
        all.extend(find_sites(&code, seg.paddr));
    }
    Ok(all)
}

/// Scan the executable segments in `ram`, rewrite every site, and return them by address.
pub fn rewrite_segments(
    ram: &GuestRam,
    segments: &[Segment],
) -> Result<HashMap<u64, HypercallInsn>, OutOfBounds> {
    let sites = scan_segments(ram, segments)?;
    for (addr, _) in &sites {
        ram.write(*addr, &DOORBELL_SITE)?;
    }
    Ok(sites.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_finds_only_real_instructions() {
        // mov eax, 0x00c1010f (the VMCALL bytes as an immediate); vmcall; nop; vmmcall; ret
        let code = [0xb8, 0x0f, 0x01, 0xc1, 0x00, 0x0f, 0x01, 0xc1, 0x90, 0x0f, 0x01, 0xd9, 0xc3];
        let sites = find_sites(&code, 0x1000);
        assert_eq!(sites, vec![(0x1005, HypercallInsn::Vmcall), (0x1009, HypercallInsn::Vmmcall)]);
    }

    #[test]
    fn rewrite_patches_ram() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let code = [0x90, 0x0f, 0x01, 0xc1, 0xf4];
        ram.write(0x10_0000, &code).unwrap();
        let seg = Segment {
            paddr: 0x10_0000,
            vaddr: 0x10_0000,
            memsz: 5,
            filesz: 5,
            offset: 0,
            executable: true,
        };
        let data = Segment { executable: false, paddr: 0x10_1000, ..seg };
        ram.write(0x10_1000, &code).unwrap();
        let sites = rewrite_segments(&ram, &[seg, data]).unwrap();
        assert_eq!(sites.len(), 1);
        let mut b = [0u8; 5];
        ram.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [0x90, 0xe6, PORT_DOORBELL as u8, 0x90, 0xf4]);
        ram.read(0x10_1000, &mut b).unwrap();
        assert_eq!(b, code, "data segments are left alone");
    }
}
