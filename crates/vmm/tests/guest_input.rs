//! Property tests: whatever a guest or an image file contains, the host answers or refuses it
//! — it never panics, and never touches memory outside guest RAM.

use proptest::prelude::*;
use vmcall_vmm::boot::elf::{minimal_elf, ElfImage};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::{emulate, Call, DetachedPlatform, HypercallExit, HypercallInsn};
use vmcall_vmm::hypercall::{HypercallResult, HypercallTable};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::paging::{translate, Access};
use vmcall_vmm::x86::{CpuMode, PagingContext, VirtualMemory};

fn mode() -> impl Strategy<Value = CpuMode> {
    prop_oneof![
        Just(CpuMode::Long64),
        Just(CpuMode::Compat32),
        Just(CpuMode::Compat16),
        Just(CpuMode::Protected),
        Just(CpuMode::Real)
    ]
}

/// Numbers the host gives meaning to, plus anything else.
fn nr() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..16, Just(20u64), Just(vmcall_abi::hc::VMCALL_HC_BATCH), any::<u64>()]
}

/// Guest-physical addresses near the interesting edges, plus anything else.
fn gpa(ram: u64) -> impl Strategy<Value = u64> {
    prop_oneof![0..ram, (ram - 256)..(ram + 256), (u64::MAX - 256)..=u64::MAX, any::<u64>()]
}

fn table() -> HypercallTable {
    let t = HypercallTable::new();
    // A handler that reads and writes guest memory at a guest-chosen address.
    t.register(20, "mem", |c: &Call<'_>| -> HypercallResult {
        let v = c.mem.read_u64(c.args[0])?;
        c.mem.write_u64(c.args[0].wrapping_add(8), v)?;
        Ok(v)
    })
    .unwrap();
    t.register(12, "map", Builtin::Const(1)).unwrap();
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_hypercall_is_answered(
        nr in nr(),
        a0 in gpa(2 << 20),
        a1 in prop_oneof![0u64..600, any::<u64>()],
        a2 in any::<u64>(),
        a3 in any::<u64>(),
        cpl in 0u8..4,
        mode in mode(),
        fill in proptest::collection::vec(any::<u64>(), 0..64),
    ) {
        let ram = GuestRam::new(2 << 20).unwrap();
        // Guest memory full of guest-chosen values, batch entries included.
        for (i, v) in fill.iter().enumerate() {
            ram.write_u64(0x1000 + 8 * i as u64, *v).unwrap();
        }
        let exit = HypercallExit { nr, args: [a0, a1, a2, a3], cpl, mode, rip: 0x20_0000, insn: HypercallInsn::Vmcall, paging: PagingContext::default() };
        let done = emulate(&table(), &exit, 0, &ram, &DetachedPlatform { vcpus: 2 });
        if !mode.is_64bit() {
            prop_assert_eq!(done.rax >> 32, 0, "results are 32-bit outside 64-bit mode");
            prop_assert_eq!(done.nr >> 32, 0);
        }
        if cpl != 0 {
            prop_assert_eq!(done.rax as i64 & 0xffff_ffff, 0xffff_ffff, "-KVM_EPERM");
        }
    }

    #[test]
    fn batches_of_guest_garbage_are_answered(
        base in gpa(2 << 20),
        count in prop_oneof![0u64..80, 4090u64..4100, any::<u64>()],
        entries in proptest::collection::vec((nr(), any::<u64>()), 0..80),
    ) {
        let ram = GuestRam::new(2 << 20).unwrap();
        for (i, (nr, a0)) in entries.iter().enumerate() {
            let at = base.wrapping_add(48 * i as u64);
            let _ = ram.write_u64(at, *nr);
            let _ = ram.write_u64(at.wrapping_add(8), *a0);
        }
        let exit = HypercallExit {
            nr: vmcall_abi::hc::VMCALL_HC_BATCH,
            args: [base, count, 0, 0],
            cpl: 0,
            mode: CpuMode::Long64,
            rip: 0x20_0000,
            insn: HypercallInsn::Vmcall,
            paging: PagingContext::default(),
        };
        let r = emulate(&table(), &exit, 0, &ram, &DetachedPlatform { vcpus: 2 }).rax as i64;
        prop_assert!(r == -7 || r == -14 || (0..=count.min(4096) as i64).contains(&r), "batch answered {r}");
    }

    #[test]
    fn any_file_is_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ElfImage::parse(&bytes, 0x10_0000, 0x40_0000);
    }

    #[test]
    fn mutated_images_are_parsed_or_refused(
        flips in proptest::collection::vec((0usize..130, any::<u8>()), 1..8),
    ) {
        let mut elf = minimal_elf(0x20_0000, &[0x90; 10]);
        for (at, v) in flips {
            let at = at % elf.len();
            elf[at] = v;
        }
        if let Ok(img) = ElfImage::parse(&elf, 0x10_0000, 0x40_0000) {
            // Whatever was accepted fits the load area and loads without error.
            let ram = GuestRam::new(4 << 20).unwrap();
            prop_assert!(img.segments.iter().all(|s| s.paddr >= 0x10_0000 && s.paddr + s.memsz <= 0x40_0000));
            prop_assert!(img.load(&elf, &ram).is_ok());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Guest page tables are guest data: any tables, any registers and any address give a
    /// translation inside RAM or an error, never a panic or a host access.
    #[test]
    fn any_page_tables_translate_or_refuse(
        cr0 in any::<u64>(),
        cr3 in prop_oneof![0u64..(2 << 20), any::<u64>()],
        cr4 in any::<u64>(),
        efer in any::<u64>(),
        va in any::<u64>(),
        fill in proptest::collection::vec(any::<u64>(), 0..256),
    ) {
        let ram = GuestRam::new(2 << 20).unwrap();
        for (i, v) in fill.iter().enumerate() {
            // Entries that point back into this RAM, present or not.
            let _ = ram.write_u64((cr3 & 0x1f_f000).wrapping_add(8 * i as u64), v & 0x1f_ffff);
        }
        let ctx = PagingContext { cr0, cr3, cr4, efer };
        if let Ok(t) = translate(&ram, &ctx, va, Access::READ) {
            prop_assert!(t.page_size.is_power_of_two());
        }
        let mut buf = [0u8; 64];
        let _ = VirtualMemory::new(&ram, ctx).read(va, &mut buf);
        let _ = VirtualMemory::new(&ram, ctx).write(va, &buf);
    }
}
