//! Finding hypercall sites with a real x86 decoder, to rewrite into the doorbell.
//!
//! A site `VMCALL`/`VMMCALL` (3 bytes) becomes `out PORT_DOORBELL, al; nop` (3 bytes,
//! [`DOORBELL_SITE`](vmcall_vmm::hypercall::sites::DOORBELL_SITE), kept in the VM's
//! [`SiteTable`](vmcall_vmm::hypercall::SiteTable)): `out imm8, al` changes no register, KVM
//! exits to user space with RIP just after it, and the `nop` makes the resumed instruction
//! stream end exactly where the original instruction did.
//!
//! Only bytes *proven* to be code are ever rewritten: [`prove_sites`] decodes recursively from
//! the entry point and the image's function symbols, following direct jumps, branches and
//! calls, so a data byte in `.text` (a jump table, a constant, hand-written asm) is never
//! mistaken for an instruction. [`scan_segments`], a linear sweep, is kept for hardware
//! breakpoints, which change no byte and simply never fire on a wrong guess.

use std::collections::{HashSet, VecDeque};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};
use vmcall_vmm::boot::elf::{CodeRoot, Segment};
use vmcall_vmm::hypercall::HypercallInsn;
use vmcall_vmm::memory::{GuestRam, OutOfBounds};

/// Length of `out imm8, al`: RIP at the doorbell exit is site + this.
pub const DOORBELL_OUT_LEN: u64 = 2;

/// The hypercall a decoded instruction is, if it is one in its plain 3-byte encoding: the
/// bytes every trap path and the rewrite check. A prefixed form (`66 0f 01 d9`) decodes as
/// VMMCALL too, but its address is the prefix's, so it is no site.
fn site(insn: &iced_x86::Instruction) -> Option<HypercallInsn> {
    match insn.code() {
        _ if insn.len() != vmcall_abi::insn::HYPERCALL_LEN as usize => None,
        Code::Vmcall => Some(HypercallInsn::Vmcall),
        Code::Vmmcall => Some(HypercallInsn::Vmmcall),
        _ => None,
    }
}

/// Hypercall instructions found in `code`, which is loaded at `base`.
pub fn find_sites(code: &[u8], base: u64) -> Vec<(u64, HypercallInsn)> {
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    (&mut decoder).into_iter().filter_map(|insn| Some((insn.ip(), site(&insn)?))).collect()
}

/// Every hypercall site a linear sweep finds in the executable segments loaded in `ram`, by
/// the linear (virtual) address the guest executes it at.
pub fn scan_segments(
    ram: &GuestRam,
    segments: &[Segment],
) -> Result<Vec<(u64, HypercallInsn)>, OutOfBounds> {
    let mut all = Vec::new();
    for seg in segments.iter().filter(|s| s.executable) {
        let mut code = vec![0u8; seg.filesz as usize];
        ram.read(seg.paddr, &mut code)?;
        all.extend(find_sites(&code, seg.vaddr));
    }
    Ok(all)
}

/// Hypercall instructions on every path a recursive decode reaches from `roots` (virtual
/// addresses: the entry point and function symbols, each with the width of its code) through
/// the executable `segments` loaded in `ram`. Returns each site's guest-physical address.
/// Indirect jumps end a path (their targets are reached only through symbols), and so does
/// anything that cannot fall through (return, `ud2`, `int3`, an undecodable byte).
pub fn prove_sites(
    ram: &GuestRam,
    segments: &[Segment],
    roots: &[CodeRoot],
) -> Vec<(u64, HypercallInsn)> {
    let code: Vec<(&Segment, Vec<u8>)> = segments
        .iter()
        .filter(|s| s.executable)
        .filter_map(|s| {
            let mut bytes = vec![0u8; s.filesz as usize];
            ram.read(s.paddr, &mut bytes).ok().map(|()| (s, bytes))
        })
        .collect();
    let mut seen = HashSet::new();
    let mut work: VecDeque<(u64, u32)> = roots.iter().map(|r| (r.vaddr, r.bits)).collect();
    let mut sites = Vec::new();
    while let Some((start, bitness)) = work.pop_front() {
        let Some((seg, bytes)) =
            code.iter().find(|(s, _)| start >= s.vaddr && start - s.vaddr < s.filesz)
        else {
            continue;
        };
        let off = (start - seg.vaddr) as usize;
        let mut decoder = Decoder::with_ip(bitness, &bytes[off..], start, DecoderOptions::NONE);
        while decoder.can_decode() {
            let insn = decoder.decode();
            if !seen.insert(insn.ip()) || insn.is_invalid() {
                break;
            }
            if let Some(kind) = site(&insn) {
                sites.push((seg.paddr + (insn.ip() - seg.vaddr), kind));
            }
            match insn.flow_control() {
                FlowControl::Next | FlowControl::IndirectCall => {}
                FlowControl::ConditionalBranch | FlowControl::Call => {
                    work.push_back((insn.near_branch_target(), bitness))
                }
                FlowControl::UnconditionalBranch => {
                    // A far jump (`jmp ptr16:32`) has no near target and may change the width.
                    if insn.near_branch_target() != 0 {
                        work.push_back((insn.near_branch_target(), bitness));
                    }
                    break;
                }
                FlowControl::IndirectBranch
                | FlowControl::Return
                | FlowControl::Interrupt
                | FlowControl::XbeginXabortXend
                | FlowControl::Exception => break,
            }
        }
    }
    sites.sort_unstable_by_key(|(gpa, _)| *gpa);
    sites.dedup();
    sites
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

    /// Found by the `trap_decode` fuzz target: a prefixed VMMCALL (`66 0f 01 d9`) was
    /// reported at its prefix, where the three bytes are not a hypercall (under `--trap hwbp`
    /// its breakpoint then fired on bytes no trap path takes for a hypercall).
    #[test]
    fn prefixed_encodings_are_not_sites() {
        // 66 vmmcall; vmcall; ret
        let code = [0x66, 0x0f, 0x01, 0xd9, 0x0f, 0x01, 0xc1, 0xc3];
        assert_eq!(find_sites(&code, 0x1000), vec![(0x1004, HypercallInsn::Vmcall)]);
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write(0x20_0000, &code).unwrap();
        let len = code.len() as u64;
        let seg = Segment {
            paddr: 0x20_0000,
            vaddr: 0x20_0000,
            memsz: len,
            filesz: len,
            offset: 0,
            executable: true,
        };
        let proven = prove_sites(&ram, &[seg], &[CodeRoot { vaddr: 0x20_0000, bits: 64 }]);
        assert_eq!(proven, vec![(0x20_0004, HypercallInsn::Vmcall)]);
    }

    #[test]
    fn only_code_reached_from_the_roots_is_proven() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // 0x20_0000: mov eax, 0x00c1010f; call 1f; jmp 2f; (data) 0f 01 c1; 1: vmcall; ret;
        // 2: jz 3f; hlt; 3: vmmcall; jmp [rip]  (then more data: 0f 01 d9)
        let code = [
            0xb8, 0x0f, 0x01, 0xc1, 0x00, // mov eax, imm32
            0xe8, 0x05, 0x00, 0x00, 0x00, // call +5 -> 0x0f
            0xeb, 0x07, // jmp +7 -> 0x13
            0x0f, 0x01, 0xc1, // data
            0x0f, 0x01, 0xc1, 0xc3, // 0x0f: vmcall; ret
            0x74, 0x01, 0xf4, // 0x13: jz +1 -> 0x16; hlt
            0x0f, 0x01, 0xd9, // 0x16: vmmcall
            0xff, 0x25, 0x00, 0x00, 0x00, 0x00, // jmp [rip]
            0x0f, 0x01, 0xd9, // data after an indirect jump
        ];
        ram.write(0x30_0000, &code).unwrap();
        let seg = Segment {
            paddr: 0x30_0000,
            vaddr: 0x20_0000,
            memsz: code.len() as u64,
            filesz: code.len() as u64,
            offset: 0,
            executable: true,
        };
        let root = |vaddr| CodeRoot { vaddr, bits: 64 };
        let sites = prove_sites(&ram, &[seg], &[root(0x20_0000)]);
        assert_eq!(
            sites,
            vec![(0x30_000f, HypercallInsn::Vmcall), (0x30_0016, HypercallInsn::Vmmcall)],
            "physical addresses of the reachable sites only"
        );
        // The linear sweep finds the data too (it is only used where guessing is harmless).
        assert!(scan_segments(&ram, &[seg]).unwrap().len() > 2);
        // A root in the data island proves it: symbols are trusted.
        assert_eq!(prove_sites(&ram, &[seg], &[root(0x20_000c)]).len(), 2);
    }
}
