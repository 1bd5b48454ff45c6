//! Hypercall emulation and batches against a `DetachedPlatform`, with random guest RAM, random
//! paging registers and handlers that follow guest pointers, physical and virtual: no call
//! panics or reaches outside guest RAM, a CPL > 0 call is refused, a 32-bit caller gets a
//! 32-bit answer, and every entry of a batch is answered as the same call made alone.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_abi::errno::{KVM_EFAULT, KVM_EPERM};
use vmcall_abi::hc::{KVM_HC_CLOCK_PAIRING, VMCALL_HC_BATCH};
use vmcall_abi::VMCALL_BATCH_MAX;
use vmcall_fuzz::{fill_chunks, fill_tables, fresh_ram, gpa, paging};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::{
    emulate, neg, Call, DetachedPlatform, HypercallExit, HypercallInsn, HypercallTable,
};
use vmcall_vmm::x86::CpuMode;

/// Numbers whose answer writes guest memory: a batch with one of them is not compared entry
/// by entry (it may rewrite later entries).
const WRITERS: [u64; 2] = [0x31, KVM_HC_CLOCK_PAIRING];
/// Numbers whose answer reads guest memory, which the batch itself changes (each entry's
/// `ret`): their entries are not compared with the same call alone.
const READERS: [u64; 2] = [0x30, 0x32];

fn table() -> HypercallTable {
    let t = HypercallTable::new();
    t.register(20, "echo", Builtin::Echo).unwrap();
    t.register(21, "add", Builtin::Add).unwrap();
    t.register(22, "einval", Builtin::Errno("EINVAL", 22)).unwrap();
    // The sum of a1 (at most 4096) bytes at guest-virtual a0, as the kernel guests' handler.
    t.register(0x30, "virt-sum", |c: &Call<'_>| {
        let mut buf = vec![0u8; c.args[1].min(4096) as usize];
        c.virt().read(c.args[0], &mut buf)?;
        Ok(buf.iter().map(|b| u64::from(*b)).sum())
    })
    .unwrap();
    // Store a1 at guest-virtual a0.
    t.register(WRITERS[0], "virt-store", |c: &Call<'_>| {
        c.virt().write_u64(c.args[0], c.args[1])?;
        Ok(0)
    })
    .unwrap();
    // The u64 at guest-physical a0.
    t.register(0x32, "phys-load", |c: &Call<'_>| Ok(c.mem.read_u64(c.args[0])?)).unwrap();
    t
}

fn number(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=3)? {
        0 => u.int_in_range(0..=13)?,
        1 => *u.choose(&[20, 21, 22, 0x30, 0x31, 0x32, VMCALL_HC_BATCH])?,
        2 => u.arbitrary::<u64>()? & 0xffff_ffff_0000_0000 | 20,
        _ => u.arbitrary()?,
    })
}

fn mode(u: &mut Unstructured<'_>) -> Result<CpuMode> {
    Ok(*u.choose(&[
        CpuMode::Long64,
        CpuMode::Compat32,
        CpuMode::Compat16,
        CpuMode::Protected,
        CpuMode::Real,
    ])?)
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let ram = fresh_ram();
    let ctx = paging(&mut u, &ram)?;
    fill_tables(&mut u, &ram, 16)?;
    fill_chunks(&mut u, &ram, 8)?;
    static TABLE: std::sync::OnceLock<HypercallTable> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(table);
    let platform = DetachedPlatform { vcpus: u.int_in_range(1..=64)? };
    for _ in 0..u.int_in_range(1..=4)? {
        let nr = number(&mut u)?;
        let mut args = [gpa(&mut u)?, u.arbitrary()?, u.arbitrary()?, u.arbitrary()?];
        if nr == VMCALL_HC_BATCH && u.ratio(3, 4)? {
            // Mostly short batches (each entry is answered twice: in the batch and alone),
            // sometimes up to and past the limit.
            args[1] = if u.ratio(7, 8)? {
                u.int_in_range(0..=80)?
            } else {
                u.int_in_range(0..=VMCALL_BATCH_MAX + 1)?
            };
            write_batch(&mut u, &ram, args[0], args[1])?;
        }
        let exit = HypercallExit {
            nr,
            args,
            cpl: if u.ratio(7, 8)? { 0 } else { u.int_in_range(1..=3)? },
            mode: mode(&mut u)?,
            rip: u.arbitrary()?,
            insn: if u.arbitrary()? { HypercallInsn::Vmcall } else { HypercallInsn::Vmmcall },
            paging: ctx,
        };
        let entries = batch_entries(&ram, &exit);
        let done = emulate(table, &exit, 0, &ram, &platform);
        if exit.cpl != 0 {
            let eperm =
                if exit.mode.is_64bit() { neg(KVM_EPERM) } else { neg(KVM_EPERM) as u32 as u64 };
            assert_eq!(done.rax, eperm, "CPL {} call not refused", exit.cpl);
        }
        if !exit.mode.is_64bit() {
            assert!(done.rax <= u64::from(u32::MAX), "32-bit caller got {:#x}", done.rax);
        }
        if let Some(entries) = entries {
            check_batch(table, &exit, &ram, &platform, &entries, done.rax);
        }
    }
    Ok(())
}

/// Fill part of a batch array at `base` with plausible entries.
fn write_batch(
    u: &mut Unstructured<'_>,
    ram: &vmcall_vmm::memory::GuestRam,
    base: u64,
    n: u64,
) -> Result<()> {
    for i in 0..n.min(u.int_in_range(0..=80)?) {
        let at = base.wrapping_add(i * 48);
        let words = [number(u)?, gpa(u)?, u.arbitrary()?, u.arbitrary()?, u.arbitrary()?, 0];
        for (k, w) in words.iter().enumerate() {
            let _ = ram.write_u64(at.wrapping_add(8 * k as u64), *w);
        }
    }
    Ok(())
}

/// The entries of a CPL 0 batch whose calls only read guest memory, before it runs.
fn batch_entries(
    ram: &vmcall_vmm::memory::GuestRam,
    exit: &HypercallExit,
) -> Option<Vec<[u64; 5]>> {
    let trunc = |v: u64| if exit.mode.is_64bit() { v } else { v & 0xffff_ffff };
    if trunc(exit.nr) != VMCALL_HC_BATCH || exit.cpl != 0 {
        return None;
    }
    let (base, count) = (trunc(exit.args[0]), trunc(exit.args[1]));
    let mut entries = Vec::new();
    for i in 0..count.min(VMCALL_BATCH_MAX) {
        // The whole 48-byte entry must be inside RAM, its `ret` included.
        if base.checked_add((i + 1) * 48).is_none_or(|end| end > ram.size()) {
            break;
        }
        let mut e = [0u64; 5];
        for (k, w) in e.iter_mut().enumerate() {
            *w = trunc(ram.read_u64(base + i * 48 + 8 * k as u64).expect("inside RAM"));
        }
        if WRITERS.contains(&e[0]) {
            return None;
        }
        entries.push(e);
    }
    Some(entries)
}

fn check_batch(
    table: &HypercallTable,
    exit: &HypercallExit,
    ram: &vmcall_vmm::memory::GuestRam,
    platform: &DetachedPlatform,
    entries: &[[u64; 5]],
    ret: u64,
) {
    let trunc = |v: u64| if exit.mode.is_64bit() { v } else { v & 0xffff_ffff };
    let count = trunc(exit.args[1]);
    if count > VMCALL_BATCH_MAX || count == 0 {
        return;
    }
    if entries.is_empty() {
        assert_eq!(ret, trunc(neg(KVM_EFAULT)), "a batch outside RAM");
        return;
    }
    assert_eq!(ret, entries.len() as u64, "a batch answers every entry inside RAM");
    let base = trunc(exit.args[0]);
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| !READERS.contains(&e[0])) {
        let alone = HypercallExit { nr: e[0], args: [e[1], e[2], e[3], e[4]], ..*exit };
        let want = if e[0] == VMCALL_HC_BATCH {
            trunc(neg(vmcall_abi::errno::KVM_EINVAL))
        } else {
            emulate(table, &alone, 0, ram, platform).rax
        };
        let got = ram.read_u64(base + i as u64 * 48 + 40).expect("inside RAM");
        assert_eq!(got, want, "batch entry {i} {e:x?} answered unlike the same call alone");
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
